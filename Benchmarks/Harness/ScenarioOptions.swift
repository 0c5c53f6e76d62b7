import Foundation

/// The command-line sizes handed to every scenario.
///
/// Every numeric field is `nil` unless the user passed the option; a scenario picks its own default
/// with ``value(_:full:quick:)``, so `--quick` and explicit options compose: an explicit option always
/// wins, otherwise `quick` selects the smoke-test size.
struct ScenarioOptions: Sendable {
    /// `--quick`: a smoke-test size. The whole `--quick` suite must finish well under a minute.
    var quick: Bool = false
    /// `--entities E`: how many distinct entities the scenario spreads its work over.
    var entities: Int?
    /// `--in-flight K`: how many operations are outstanding at once (concurrent callers).
    var inFlight: Int?
    /// `--events N`: how many events (or operations) the measured region performs in total.
    var events: Int?
    /// `--duration-seconds S`: for time-boxed scenarios, how long the measured region runs.
    var durationSeconds: Double?
    /// `--data-dir PATH`: where scenarios create their LMDB directories (default: the temporary directory).
    var dataDirectory: String?
    /// `--width W` / `--depth D`: the shape of a tree scenario (fanout).
    var width: Int?
    var depth: Int?
    /// `--shards S`: the runtime's shard count, for scenarios that honour it.
    var shards: Int?
    /// `--param key=value`: scenario-specific settings, read with ``extra(_:full:quick:)``.
    var extras: [String: String] = [:]

    /// Picks a size: the explicit command-line value if given, else the quick or full default.
    ///
    /// ```swift
    /// let entities = options.value(\.entities, full: 1_000, quick: 50)
    /// ```
    func value<T>(_ field: KeyPath<ScenarioOptions, T?>, full: T, quick quickDefault: T) -> T {
        self[keyPath: field] ?? (quick ? quickDefault : full)
    }

    /// Picks a scenario-specific setting passed as `--param key=value`, else the quick or full default.
    ///
    /// - Throws: ``ScenarioOptionsError`` when the value does not parse as `T`.
    func extra<T: LosslessStringConvertible>(_ key: String, full: T, quick quickDefault: T) throws -> T {
        try extra(key, as: T.self) ?? (quick ? quickDefault : full)
    }

    /// A `--param key=value` setting read as `T`, or `nil` when not given.
    ///
    /// - Throws: ``ScenarioOptionsError`` when the value does not parse as `T`.
    func extra<T: LosslessStringConvertible>(_ key: String, as type: T.Type) throws -> T? {
        guard let text = extras[key] else { return nil }
        guard let parsed = T(text) else {
            throw ScenarioOptionsError(message: "--param \(key)=\(text): cannot read '\(text)' as \(T.self)")
        }
        return parsed
    }

    /// The raw text of a `--param key=value` setting, if given.
    func extra(_ key: String) -> String? { extras[key] }

    /// Creates a fresh, empty directory for one scenario's LMDB environment under `--data-dir`
    /// (or the temporary directory). Call ``ScratchDirectory/remove()`` when done.
    ///
    /// - Parameter label: A short word naming the scenario; part of the directory name.
    func makeScratchDirectory(_ label: String) throws -> ScratchDirectory {
        try ScratchDirectory(label: label, parent: dataDirectory)
    }
}

/// A `--param` value a scenario could not use.
struct ScenarioOptionsError: Error, CustomStringConvertible {
    var message: String
    var description: String { message }
}
