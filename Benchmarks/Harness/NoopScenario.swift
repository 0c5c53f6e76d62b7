/// The harness self-check: measures nothing but the harness itself.
///
/// `K` concurrent tasks (`--in-flight`, default 4) each time an empty operation and record it,
/// `N` records in all (`--events`, default 100,000). Latencies are the cost of two clock reads;
/// throughput is how many latencies the recorder absorbs per second under contention, which must
/// stay far above any real scenario's operation rate.
///
/// `--param mode=shared` (default) records through the recorder's `Mutex`;
/// `--param mode=local` records into per-task ``LocalLatencies`` merged at the end.
struct NoopScenario: BenchmarkScenario {
    static let name = "noop"
    static let summary = "harness self-check: K tasks record N empty-operation latencies"

    func run(_ options: ScenarioOptions, _ recorder: LatencyRecorder) async throws -> ScenarioResult {
        let tasks = max(1, options.value(\.inFlight, full: 4, quick: 4))
        let total = max(tasks, options.value(\.events, full: 100_000, quick: 100_000))
        let mode: String = try options.extra("mode", full: "shared", quick: "shared")
        guard mode == "shared" || mode == "local" else {
            throw ScenarioOptionsError(message: "--param mode=\(mode): expected 'shared' or 'local'")
        }
        let perTask = total / tasks

        recorder.start()
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<tasks {
                group.addTask {
                    if mode == "local" {
                        var local = recorder.makeLocal()
                        for _ in 0..<perTask { await local.measure {} }
                        recorder.merge(local)
                    } else {
                        for _ in 0..<perTask { await recorder.measure {} }
                    }
                }
            }
        }
        recorder.stop()

        return ScenarioResult(
            operations: perTask * tasks,
            params: ["in_flight": .int(tasks), "events": .int(perTask * tasks), "mode": .string(mode)])
    }
}
