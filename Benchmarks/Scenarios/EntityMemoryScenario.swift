import DurableEntities

/// `entity-memory`: resident memory per idle entity with 104 bytes of inline state.
///
/// `--entities E` accounts (default 100,000) are made resident (`maxResidentEntities` well above E, so
/// none is passivated) by `--in-flight K` tasks (default 64), then left idle. The resident set size
/// (`VmRSS`, after `malloc_trim(0)`) is read before and after; the difference over E is
/// `bytes_per_entity` (and `anon_bytes_per_entity` from `RssAnon`, which leaves out the LMDB map).
/// Throughput is activations/s; latency is per activation.
///
/// `--param touch=query` (default) activates each account with its first `query`: an unknown entity
/// gets a cell with its initial state and nothing is written, so the figure is the runtime's own
/// per-entity cost. `--param touch=signal` sends each one deposit instead (relaxed durability), so
/// the entity is also registered in the journal and the journal's per-entity memory is counted too.
struct EntityMemoryScenario: BenchmarkScenario {
    static let name = "entity-memory"
    static let summary = "resident memory per idle entity (104-byte state)"

    func run(_ options: ScenarioOptions, _ recorder: LatencyRecorder) async throws -> ScenarioResult {
        let entityCount = max(1, options.value(\.entities, full: 100_000, quick: 10_000))
        let workers = max(1, options.value(\.inFlight, full: 64, quick: 64))
        let touch = options.extra("touch") ?? "query"
        guard touch == "query" || touch == "signal" else { throw BenchmarkFailure(message: "--param touch must be query or signal") }
        let load = EntityBench.loadAverage()

        let directory = try options.makeScratchDirectory("entity-memory")
        defer { directory.remove() }
        let runtime = try EntityBench.open(try EntityBench.configuration(
            directory: directory.path, durability: .relaxed, snapshotEvery: 100, maxResidentEntities: entityCount * 4 + 10_000))
        defer { runtime.close() }

        // Warm-up (not counted): one entity through the same path, so threads, the type table and
        // the codec exist before the first sample.
        let warm = runtime.entity(BenchAccount.self, id: "warm-up")
        if touch == "signal" { try await warm.signal(.deposit(1)) } else { _ = try await warm.query { $0.balance } }

        let before = ProcessMemory.sample()
        recorder.start()
        try await EntityBench.forEach(count: entityCount, workers: workers) { index in
            let ref = runtime.entity(BenchAccount.self, id: EntityBench.id(index))
            let start = ContinuousClock.Instant.now
            if touch == "signal" {
                try await ref.signal(.deposit(1))
            } else {
                _ = try await ref.query { $0.balance }
            }
            recorder.record(since: start)
        }
        recorder.stop()
        let after = ProcessMemory.sample()

        let resident = runtime.residentEntities
        guard resident == entityCount + 1 else {
            throw BenchmarkFailure(message: "\(resident) entities resident, expected \(entityCount + 1) (some were passivated?)")
        }
        var extra: [String: JSONValue] = [
            "bytes_per_entity": .double(Double(after.rss - before.rss) / Double(entityCount)),
            "anon_bytes_per_entity": .double(Double(after.anonymous - before.anonymous) / Double(entityCount)),
            "file_bytes_per_entity": .double(Double(after.file - before.file) / Double(entityCount)),
            "rss_before_mb": .double(Double(before.rss) / 1_048_576),
            "rss_after_mb": .double(Double(after.rss) / 1_048_576),
            "resident_entities": .int(resident),
        ]
        if let load { extra["load_avg_1m"] = .double(load) }
        return ScenarioResult(
            operations: entityCount,
            params: ["entities": .int(entityCount), "in_flight": .int(workers), "touch": .string(touch), "state_bytes": .int(MemoryLayout<BenchAccount.State>.size)],
            extra: extra)
    }
}
