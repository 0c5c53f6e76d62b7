/// A named, self-contained benchmark: one capability, measured one way.
///
/// The harness creates a fresh scenario value with `init()`, hands it the command-line options and a
/// fresh ``LatencyRecorder``, and reports what ``run(_:_:)`` returns together with the latency
/// percentiles the recorder collected and the peak resident set size of the run.
///
/// A scenario owns its measured region: set-up (opening an environment, seeding entities, warming
/// caches) happens *before* it calls ``LatencyRecorder/start()``, and clean-up after
/// ``LatencyRecorder/stop()``. If it prefers to time itself it returns the wall time in
/// ``ScenarioResult/wall`` instead, and the recorder's interval is ignored.
///
/// ## Usage
///
/// ```swift
/// struct PingScenario: BenchmarkScenario {
///     static let name = "ping"
///     static let summary = "round trips through an actor, K concurrent callers"
///
///     func run(_ options: ScenarioOptions, _ recorder: LatencyRecorder) async throws -> ScenarioResult {
///         let callers = options.value(\.inFlight, full: 64, quick: 4)
///         let perCaller = options.value(\.events, full: 100_000, quick: 1_000) / callers
///         let target = PingActor()                        // set-up: not measured
///         recorder.start()
///         await withTaskGroup(of: Void.self) { group in
///             for _ in 0..<callers {
///                 group.addTask {
///                     var local = recorder.makeLocal()    // per-task histogram, merged once
///                     for _ in 0..<perCaller { await local.measure { await target.ping() } }
///                     recorder.merge(local)
///                 }
///             }
///         }
///         recorder.stop()
///         return ScenarioResult(operations: callers * perCaller,
///                               params: ["in_flight": .int(callers), "events": .int(callers * perCaller)])
///     }
/// }
/// ```
///
/// Register it by appending `PingScenario.self` to ``Scenarios/all``.
protocol BenchmarkScenario: Sendable {
    /// The name typed on the command line (`swift run -c release Benchmarks ping`).
    /// Lower-case words joined by dashes, unique among ``Scenarios/all``.
    static var name: String { get }

    /// One line shown by `--list` and `--help`: what is measured, and how. Keep it under ~65
    /// characters so `--help` does not wrap it.
    static var summary: String { get }

    init()

    /// Runs the scenario once.
    ///
    /// - Parameters:
    ///   - options: Sizes from the command line; ``ScenarioOptions/quick`` asks for a smoke-test size.
    ///   - recorder: Collects per-operation latencies and, through `start()`/`stop()`, the measured wall time.
    /// - Returns: The number of operations in the measured region, the parameters the run used,
    ///   and any extra figures worth a JSON field.
    /// - Throws: Any error; the harness reports it, runs the remaining scenarios and exits non-zero.
    func run(_ options: ScenarioOptions, _ recorder: LatencyRecorder) async throws -> ScenarioResult
}
