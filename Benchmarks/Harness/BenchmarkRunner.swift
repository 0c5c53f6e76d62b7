import Foundation

/// Runs scenarios one after another and prints their reports.
///
/// Without `--json` the human-readable report goes to standard output. With `--json` standard
/// output carries only the JSON lines (one per scenario, so `Benchmarks --json > results.jsonl`
/// works) and the human-readable report moves to standard error.
struct BenchmarkRunner {
    var scenarios: [any BenchmarkScenario.Type]
    var options: ScenarioOptions
    var json: Bool

    /// Runs every scenario, continuing past failures.
    ///
    /// - Returns: `true` if every scenario succeeded.
    func run() async -> Bool {
        Console.human(Self.banner(options: options), json: json)
        var failed: [String] = []
        for scenarioType in scenarios {
            do {
                let report = try await Self.runOne(scenarioType, options: options)
                Console.human("\n" + report.humanText, json: json)
                if !report.collidingExtraKeys.isEmpty {
                    Console.error(
                        "warning: \(report.name): extra fields \(report.collidingExtraKeys) repeat standard "
                            + "JSON fields and were left out")
                }
                if json { Console.out(report.jsonLine) }
            } catch {
                failed.append(scenarioType.name)
                Console.error("\nerror: scenario \(scenarioType.name) failed: \(error)")
            }
        }
        if !failed.isEmpty {
            Console.error("\n\(failed.count) of \(scenarios.count) scenario(s) failed: \(failed.joined(separator: ", "))")
        }
        return failed.isEmpty
    }

    /// Runs one scenario with a fresh recorder and a reset peak-RSS mark.
    static func runOne(_ scenarioType: any BenchmarkScenario.Type, options: ScenarioOptions) async throws
        -> ScenarioReport
    {
        let scenario = scenarioType.init()
        let recorder = LatencyRecorder()
        let peakScope: PeakMemory.Scope = PeakMemory.resetPeak() ? .scenario : .process
        var result = try await scenario.run(options, recorder)
        let peak = PeakMemory.peakMegabytes()
        guard let wall = result.wall ?? recorder.elapsed else {
            throw HarnessError(
                "scenario \(scenarioType.name) returned no wall time and did not call recorder.start() and recorder.stop()")
        }
        if options.quick, result.params["quick"] == nil { result.params["quick"] = .bool(true) }
        return ScenarioReport(
            name: scenarioType.name, summary: scenarioType.summary, result: result, wall: wall,
            latency: recorder.summary, peakRSSMegabytes: peak, peakScope: peakScope)
    }

    static func banner(options: ScenarioOptions) -> String {
        let info = ProcessInfo.processInfo
        return "DurableEntities benchmarks — \(BuildMode.current) build, \(info.activeProcessorCount) cores, "
            + "\(info.operatingSystemVersionString), malloc: \(Allocator.current), Swift runtime: \(SwiftRuntimeLinkage.current)\(options.quick ? ", --quick" : "")"
    }
}

/// A harness misuse, e.g. a scenario that reports no wall time.
struct HarnessError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Where the harness writes.
enum Console {
    /// A line for people: standard output, or standard error when JSON owns standard output.
    static func human(_ text: String, json: Bool) {
        if json { error(text) } else { out(text) }
    }

    /// A line on standard output, flushed at once so it interleaves correctly with standard error.
    static func out(_ text: String) {
        FileHandle.standardOutput.write(Data((text + "\n").utf8))
    }

    /// A line on standard error.
    static func error(_ text: String) {
        FileHandle.standardError.write(Data((text + "\n").utf8))
    }
}
