import Foundation

/// One scenario's figures, printed for people and, with `--json`, as one JSON line.
///
/// The JSON line keeps this field order: `scenario`, `throughput_per_s`, `p50_ms`, `p90_ms`,
/// `p99_ms`, `peak_rss_mb`, `params`, then `operations`, `wall_s`, `max_ms`, `latency_samples`,
/// `allocator` (``Allocator/current``), `swift_runtime` (``SwiftRuntimeLinkage/current``), (`peak_rss_scope` when the peak could not be reset per
/// scenario), then the scenario's ``ScenarioResult/extra`` fields sorted by key. A percentile with no samples is `null`.
struct ScenarioReport: Sendable {
    /// Field names the harness writes itself; a scenario's extra field may not reuse them.
    static let standardKeys: Set<String> = [
        "scenario", "throughput_per_s", "p50_ms", "p90_ms", "p99_ms", "peak_rss_mb", "params",
        "operations", "wall_s", "max_ms", "latency_samples", "allocator", "swift_runtime", "peak_rss_scope",
    ]

    var name: String
    var summary: String
    var result: ScenarioResult
    var wall: Duration
    var latency: LatencySummary
    var peakRSSMegabytes: Double?
    var peakScope: PeakMemory.Scope

    /// Operations per second over the measured wall time.
    var throughput: Double {
        let seconds = wall.seconds
        return seconds > 0 ? Double(result.operations) / seconds : 0
    }

    /// Extra fields that do not collide with ``standardKeys``, sorted by key.
    var extraFields: [(key: String, value: JSONValue)] {
        result.extra.filter { !Self.standardKeys.contains($0.key) }.sorted { $0.key < $1.key }
    }

    /// Extra field names that were dropped because they collide with ``standardKeys``.
    var collidingExtraKeys: [String] {
        result.extra.keys.filter { Self.standardKeys.contains($0) }.sorted()
    }

    // MARK: JSON

    /// Exactly one line of JSON, no trailing newline.
    var jsonLine: String {
        let hasLatency = latency.count > 0
        func ms(_ value: Double) -> String { hasLatency ? JSONValue.number(value, decimals: 6) : "null" }
        var fields: [(String, String)] = [
            ("scenario", JSONValue.quoted(name)),
            ("throughput_per_s", JSONValue.number(throughput, decimals: 1)),
            ("p50_ms", ms(latency.p50Milliseconds)),
            ("p90_ms", ms(latency.p90Milliseconds)),
            ("p99_ms", ms(latency.p99Milliseconds)),
            ("peak_rss_mb", peakRSSMegabytes.map { JSONValue.number($0, decimals: 2) } ?? "null"),
            ("params", Self.object(result.params.sorted { $0.key < $1.key }.map { ($0.key, $0.value.jsonText) })),
            ("operations", String(result.operations)),
            ("wall_s", JSONValue.number(wall.seconds, decimals: 6)),
            ("max_ms", ms(latency.maxMilliseconds)),
            ("latency_samples", String(latency.count)),
            ("allocator", JSONValue.quoted(Allocator.current)),
            ("swift_runtime", JSONValue.quoted(SwiftRuntimeLinkage.current)),
        ]
        if peakScope == .process { fields.append(("peak_rss_scope", JSONValue.quoted(peakScope.rawValue))) }
        fields += extraFields.map { ($0.key, $0.value.jsonText) }
        return Self.object(fields)
    }

    private static func object(_ fields: [(String, String)]) -> String {
        "{" + fields.map { JSONValue.quoted($0.0) + ":" + $0.1 }.joined(separator: ",") + "}"
    }

    // MARK: Human-readable

    /// A few aligned lines for a terminal.
    var humanText: String {
        var lines = ["\(name) — \(summary)"]
        lines.append(
            "  throughput  \(Self.grouped(throughput)) ops/s"
                + "   (\(Self.grouped(Double(result.operations))) ops in \(Self.duration(wall)))")
        if latency.count > 0 {
            lines.append(
                "  latency     p50 \(Self.nanos(latency.p50))   p90 \(Self.nanos(latency.p90))"
                    + "   p99 \(Self.nanos(latency.p99))   max \(Self.nanos(latency.max))"
                    + "   (\(Self.grouped(Double(latency.count))) samples)")
        } else {
            lines.append("  latency     (not recorded)")
        }
        let peak = peakRSSMegabytes.map { String(format: "%.1f MB", $0) } ?? "unknown"
        lines.append("  peak RSS    \(peak)\(peakScope == .process ? " (whole process so far)" : "")")
        if !result.params.isEmpty {
            let text = result.params.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value.plainText)" }
            lines.append("  params      " + text.joined(separator: "  "))
        }
        if !extraFields.isEmpty {
            lines.append("  extra       " + extraFields.map { "\($0.key)=\($0.value.plainText)" }.joined(separator: "  "))
        }
        return lines.joined(separator: "\n")
    }

    /// `1234567.8` → `"1,234,568"`.
    static func grouped(_ value: Double) -> String {
        guard value.isFinite else { return "-" }
        let digits = String(Int64(value.rounded()).magnitude)
        var out = ""
        for (index, digit) in digits.enumerated() {
            if index > 0, (digits.count - index) % 3 == 0 { out.append(",") }
            out.append(digit)
        }
        return value < 0 ? "-" + out : out
    }

    /// A latency in the unit that reads best: `850 ns`, `12.4 µs`, `1.235 ms`, `2.10 s`.
    static func nanos(_ value: UInt64) -> String {
        let ns = Double(value)
        switch ns {
        case ..<1_000: return "\(value) ns"
        case ..<1_000_000: return String(format: "%.1f µs", ns / 1e3)
        case ..<1_000_000_000: return String(format: "%.3f ms", ns / 1e6)
        default: return String(format: "%.2f s", ns / 1e9)
        }
    }

    /// A wall time: `0.123 s`.
    static func duration(_ value: Duration) -> String {
        String(format: "%.3f s", value.seconds)
    }
}
