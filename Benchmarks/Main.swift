import ArgumentParser
import TestSupport

/// `swift run -c release Benchmarks [scenario…] [options]`: runs named benchmark scenarios and
/// prints throughput, latency percentiles and peak RSS for each.
@main
struct BenchmarksCommand: AsyncParsableCommand {
    static var configuration: CommandConfiguration {
        CommandConfiguration(
            commandName: "Benchmarks",
            abstract: "Run DurableEntities benchmark scenarios: throughput, p50/p90/p99 latency, peak RSS.",
            usage: """
                swift run -c release Benchmarks [<scenario> ...] [--quick] [--json] [<options>]
                swift run -c release Benchmarks --list
                """,
            discussion: """
                Always build in release mode (-c release): figures from a debug build are meaningless, and a debug build says so loudly before it runs.

                Each scenario sets itself up, then measures a number of operations (--events) from K concurrent callers (--in-flight) over E entities (--entities), or a fixed time (--duration-seconds). A size you do not give takes the scenario's default, or its smoke-test size with --quick. Scenario-specific settings: --param key=value.

                Scenarios (--list shows them alone):
                \(Self.scenarioTable)

                Examples:
                  swift run -c release Benchmarks               # all, full size
                  swift run -c release Benchmarks noop --quick  # one, smoke size
                  swift run -c release Benchmarks journal-append --in-flight 64
                  swift run -c release Benchmarks --quick --json > results.jsonl

                With --json, standard output carries exactly one JSON line per scenario, {"scenario":…,"throughput_per_s":…,"p50_ms":…,"p90_ms":…,"p99_ms":…,"peak_rss_mb":…,"params":{…},…}, and the human-readable report moves to standard error.
                """
        )
    }

    @Argument(help: "Scenarios to run, by name, in order (default: all of them; see --list).")
    var scenarios: [String] = []

    @Flag(help: "Use each scenario's small smoke-test size (the whole suite finishes in well under a minute).")
    var quick = false

    @Flag(help: "Also write one JSON line per scenario to standard output (the report moves to standard error).")
    var json = false

    @Flag(help: "List the scenarios with a one-line summary each, and exit.")
    var list = false

    @Option(help: ArgumentHelp("How many entities to spread the work over.", valueName: "E"))
    var entities: Int?

    @Option(help: ArgumentHelp("How many operations to keep outstanding at once (concurrent callers).", valueName: "K"))
    var inFlight: Int?

    @Option(help: ArgumentHelp("How many events (operations) to perform in the measured region.", valueName: "N"))
    var events: Int?

    @Option(help: ArgumentHelp("How long a time-boxed scenario measures, in seconds.", valueName: "S"))
    var durationSeconds: Double?

    @Option(help: ArgumentHelp("Tree scenarios (fanout): children per parent.", valueName: "W"))
    var width: Int?

    @Option(help: ArgumentHelp("Tree scenarios (fanout): levels below the root.", valueName: "D"))
    var depth: Int?

    @Option(help: ArgumentHelp("The runtime's shard count (default: one per core).", valueName: "S"))
    var shards: Int?

    @Option(
        help: ArgumentHelp(
            "Directory for the scenarios' LMDB data (default: the temporary directory). Use a real disk, not tmpfs.",
            valueName: "path"))
    var dataDir: String?

    @Option(
        name: .customLong("param"),
        help: ArgumentHelp("A scenario-specific setting, e.g. --param mode=local (repeatable).", valueName: "key=value"))
    var params: [String] = []

    /// Internal: runs the `recovery` scenario's child process on this directory (see ``RecoveryScenario``).
    @Option(help: .hidden)
    var recoveryChild: String?

    func validate() throws {
        let names = Scenarios.all.map { $0.name }
        if let duplicate = Dictionary(grouping: names, by: { $0 }).first(where: { $0.value.count > 1 })?.key {
            throw ValidationError("Two scenarios are registered as '\(duplicate)'; names in Scenarios.all must be unique.")
        }
        let unknown = scenarios.filter { Scenarios.named($0) == nil }
        if !unknown.isEmpty {
            let quoted = unknown.map { "'\($0)'" }.joined(separator: ", ")
            throw ValidationError(
                "Unknown scenario \(quoted). Known scenarios: \(names.joined(separator: ", ")) (see --list).")
        }
        for (flag, value) in [("--entities", entities), ("--in-flight", inFlight), ("--events", events), ("--width", width),
                              ("--depth", depth), ("--shards", shards)] {
            if let value, value <= 0 { throw ValidationError("\(flag) must be a positive integer, not \(value).") }
        }
        if let durationSeconds, !(durationSeconds > 0) {
            throw ValidationError("--duration-seconds must be positive, not \(durationSeconds).")
        }
        _ = try parsedParams()
    }

    mutating func run() async throws {
        if list {
            print(Self.scenarioTable)
            return
        }
        if let recoveryChild {
            ParentWatch.exitWhenOrphaned()
            try await RecoveryScenario.child(directory: recoveryChild, options: try options())
            return
        }
        if BuildMode.current == .debug {
            Console.error(BuildMode.debugWarning)
        }
        var seen = Set<String>()
        let selected = scenarios.isEmpty
            ? Scenarios.all
            : scenarios.filter { seen.insert($0).inserted }.compactMap(Scenarios.named)
        let succeeded = await BenchmarkRunner(scenarios: selected, options: try options(), json: json).run()
        if !succeeded { throw ExitCode.failure }
    }

    /// The sizes and settings every scenario gets.
    private func options() throws -> ScenarioOptions {
        ScenarioOptions(
            quick: quick, entities: entities, inFlight: inFlight, events: events,
            durationSeconds: durationSeconds, dataDirectory: dataDir, width: width, depth: depth, shards: shards,
            extras: try parsedParams())
    }

    /// `--param key=value` options as a dictionary.
    private func parsedParams() throws -> [String: String] {
        var result: [String: String] = [:]
        for param in params {
            guard let equals = param.firstIndex(of: "="), equals != param.startIndex else {
                throw ValidationError("--param expects key=value, got '\(param)'.")
            }
            result[String(param[..<equals])] = String(param[param.index(after: equals)...])
        }
        return result
    }

    /// One line per registered scenario: name and summary.
    static var scenarioTable: String {
        let width = Scenarios.all.map { $0.name.count }.max() ?? 0
        return Scenarios.all.map {
            "  " + $0.name + String(repeating: " ", count: width - $0.name.count) + "  " + $0.summary
        }.joined(separator: "\n")
    }
}
