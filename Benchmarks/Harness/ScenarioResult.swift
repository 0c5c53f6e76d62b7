import Foundation

/// What a scenario returns: how much work the measured region did, with which parameters.
///
/// Latency percentiles come from the ``LatencyRecorder``; peak RSS is measured by the harness.
struct ScenarioResult: Sendable {
    /// Operations completed in the measured region; throughput is `operations / wall`.
    var operations: Int
    /// The measured wall time. `nil` means "the interval between `recorder.start()` and `recorder.stop()`".
    var wall: Duration?
    /// The sizes the run actually used (after defaults and `--quick`), e.g. `["entities": .int(1_000)]`.
    /// Printed, and written as the JSON object `"params"`. Keys in `snake_case`.
    var params: [String: JSONValue]
    /// Further figures worth a top-level JSON field, e.g. `["events": .int(n), "commits": .int(c)]`.
    /// Keys in `snake_case`; they must not repeat the standard fields (see ``ScenarioReport``).
    var extra: [String: JSONValue]

    init(
        operations: Int,
        wall: Duration? = nil,
        params: [String: JSONValue] = [:],
        extra: [String: JSONValue] = [:]
    ) {
        self.operations = operations
        self.wall = wall
        self.params = params
        self.extra = extra
    }
}

/// A JSON scalar for scenario parameters and extra fields.
enum JSONValue: Sendable, Equatable {
    case int(Int)
    /// Written with up to nine decimals, without an exponent.
    case double(Double)
    case string(String)
    case bool(Bool)
    case null

    /// The value as JSON text (strings escaped; a non-finite double becomes `null`).
    var jsonText: String {
        switch self {
        case .int(let value): String(value)
        case .double(let value): JSONValue.number(value, decimals: 9)
        case .string(let value): JSONValue.quoted(value)
        case .bool(let value): value ? "true" : "false"
        case .null: "null"
        }
    }

    /// The value as plain text for the human-readable report.
    var plainText: String {
        switch self {
        case .string(let value): value
        default: jsonText
        }
    }

    /// A finite double as a JSON number in plain decimal notation (no exponent), rounded to
    /// `decimals` places with trailing zeros dropped; `null` when not finite.
    static func number(_ value: Double, decimals: Int = 6) -> String {
        guard value.isFinite else { return "null" }
        var text = String(format: "%.\(max(0, decimals))f", value)
        if text.contains(".") {
            while text.hasSuffix("0") { text.removeLast() }
            if text.hasSuffix(".") { text.removeLast() }
        }
        return text == "-0" ? "0" : text
    }

    /// `text` as a JSON string literal.
    static func quoted(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}

extension JSONValue: ExpressibleByIntegerLiteral, ExpressibleByFloatLiteral,
    ExpressibleByStringLiteral, ExpressibleByBooleanLiteral
{
    init(integerLiteral value: Int) { self = .int(value) }
    init(floatLiteral value: Double) { self = .double(value) }
    init(stringLiteral value: String) { self = .string(value) }
    init(booleanLiteral value: Bool) { self = .bool(value) }
}
