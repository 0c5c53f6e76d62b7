import DurableEntities
import Foundation
import Synchronization
import TestSupport

/// `fanout`: a tree of child entities. The root `FanNode` starts `--width W` children, each of which
/// starts W children of its own, down `--depth D` levels (default 1,000 × 2: 1,001,001 entities,
/// 1,000,000 leaves); every leaf computes its value through the `LeafWork` activity and completes,
/// and the sums flow back up as child outcomes. Each parent keeps at most `--param window=N` children
/// running at once (default 100). Durable; `--shards S` sets the shard count.
///
/// Wall time is from the root's `start` to its `result`. Extra fields: `sum_exact` (the root's sum
/// against the one computed here), `entities`, `leaf_attempts` (activity attempts: more than the
/// leaves only if one was retried), `commits` and `operations_per_commit` from the journal writer,
/// `cpu_s` (process CPU time, all threads), and the 1-minute load average at the start.
struct FanoutScenario: BenchmarkScenario {
    static let name = "fanout"
    static let summary = "1,000 x 1,000 child entities: fan-out, an activity per leaf, sums back to the root"

    func run(_ options: ScenarioOptions, _ recorder: LatencyRecorder) async throws -> ScenarioResult {
        let width = options.width ?? (options.quick ? 30 : 1_000)
        let depth = options.depth ?? 2
        let window = try options.extra("window", full: 100, quick: 100)
        let load = EntityBench.loadAverage()
        var entities = 1, level = 1
        for _ in 0..<depth { level *= width; entities += level }

        let directory = try options.makeScratchDirectory("fanout")
        defer { directory.remove() }
        var configuration = try EntityBench.configuration(directory: directory.path, durability: .durable, snapshotEvery: 100,
                                                          maxResidentEntities: try options.extra("max-resident", full: 200_000, quick: 200_000),
                                                          shards: options.shards)
        configuration.maxConcurrentActivities = try options.extra("activities", full: 512, quick: 512)
        let counter = AttemptCounter()
        let runtime = try EntityRuntime(configuration: configuration, entityTypes: [FanNode.self],
                                        activities: [LeafWork { _ in counter.add() }])
        let root = runtime.entity(FanNode.self, id: "r")
        let cpuBefore = ProcessCPU.now()
        let commitsBefore = runtime.journal.statistics
        recorder.start()
        let started = ContinuousClock.now
        try await root.start(.init(width: width, depth: depth, maxConcurrent: window))
        let sum = try await root.result()
        let wall = ContinuousClock.now - started
        recorder.record(since: started)
        recorder.stop()
        let cpu = ProcessCPU.now() - cpuBefore
        let commitsAfter = runtime.journal.statistics
        runtime.close()
        let expected = FanNode.expectedSum(root: "r", width: width, depth: depth)
        let commits = commitsAfter.commits - commitsBefore.commits
        let operationCount = commitsAfter.operations - commitsBefore.operations
        return ScenarioResult(
            operations: entities, wall: wall,
            params: ["width": .int(width), "depth": .int(depth), "window": .int(window), "shards": .int(configuration.shards),
                     "durability": .string("durable")],
            extra: ["sum_exact": .bool(sum == expected), "sum": .int(Int(sum)), "expected_sum": .int(Int(expected)),
                    "entities": .int(entities), "leaf_attempts": .int(counter.count), "commits": .int(commits),
                    "operations_per_commit": .double(commits > 0 ? Double(operationCount) / Double(commits) : 0),
                    "cpu_s": .double(cpu.seconds), "load_average_1m": .double(load ?? -1)])
    }
}

/// Counts activity attempts from any thread.
final class AttemptCounter: Sendable {
    private let value = Atomic<Int>(0)
    func add() { value.add(1, ordering: .relaxed) }
    var count: Int { value.load(ordering: .relaxed) }
}
