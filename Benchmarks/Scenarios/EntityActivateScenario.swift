import DurableEntities

/// `entity-activate`: cold activation of an entity from its snapshot plus a 100-event tail.
///
/// Set-up, not measured: `--entities N` accounts (default 2,000) each get exactly 100 deposits in a
/// runtime with `snapshotEvery = 100` (the turn that reaches sequence 100 writes the snapshot), then
/// `--param tail=T` more (default 100) in a runtime reopened with snapshots off, so every account is
/// *snapshot at 100 + T events after it* (checked through the journal). The runtime is then closed
/// and reopened: nothing is resident.
///
/// Measured: the first `query` of each account (in a shuffled order), which activates it: looks up
/// its key, reads metadata and snapshot, decodes the state, reads and replays the T tail events. With
/// `--in-flight K` (default 1) K queries run at once; latency is per activation, throughput is
/// activations/s. Extra fields: activations/s with `--param concurrent=C` in flight (default 64; 0
/// skips it) in a fresh reopen, and the journal-only part of an activation (key, metadata, snapshot and
/// tail read with no decoding) timed the same way, and a second query of each account once resident
/// (`resident_query_*`: the round trip to the shard alone), to separate storage, decoding and scheduling.
///
/// `--param codec=raw` swaps JSON for ``BenchAccountRawCodec`` (an experiment: activation without codec costs).
///
/// The LMDB file stays in the OS page cache: "cold" means not resident in the runtime.
struct EntityActivateScenario: BenchmarkScenario {
    static let name = "entity-activate"
    static let summary = "cold activation: snapshot + 100-event tail, first query"

    func run(_ options: ScenarioOptions, _ recorder: LatencyRecorder) async throws -> ScenarioResult {
        let entityCount = max(1, options.value(\.entities, full: 2_000, quick: 200))
        let inFlight = max(1, options.value(\.inFlight, full: 1, quick: 1))
        let snapshotAt = try options.extra("snapshot-at", full: 100, quick: 100)
        let tail = try options.extra("tail", full: 100, quick: 100)
        let concurrent = try options.extra("concurrent", full: 64, quick: 64)
        let codec = options.extra("codec") ?? "binary"
        let load = EntityBench.loadAverage()

        let directory = try options.makeScratchDirectory("entity-activate")
        defer { directory.remove() }
        let maxResident = max(100_000, entityCount * 2)

        // Set-up 1: exactly `snapshotAt` events each; the turn reaching `snapshotAt` snapshots.
        do {
            let runtime = try EntityBench.open(try EntityBench.configuration(
                directory: directory.path, durability: .relaxed, snapshotEvery: snapshotAt, maxResidentEntities: maxResident, noContinueAsNew: true, codec: codec))
            defer { runtime.close() }
            try await EntityBench.forEach(count: entityCount, workers: 32) { index in
                try await EntityBench.burst(runtime.entity(BenchAccount.self, id: EntityBench.id(index)), count: snapshotAt)
            }
        }
        // Set-up 2: the tail, with snapshots off.
        do {
            let runtime = try EntityBench.open(try EntityBench.configuration(
                directory: directory.path, durability: .relaxed, snapshotEvery: 1 << 40, maxResidentEntities: maxResident, noContinueAsNew: true, codec: codec))
            defer { runtime.close() }
            try await EntityBench.forEach(count: entityCount, workers: 32) { index in
                try await EntityBench.burst(runtime.entity(BenchAccount.self, id: EntityBench.id(index)), count: tail)
            }
        }

        let configuration = try EntityBench.configuration(
            directory: directory.path, durability: .durable, snapshotEvery: snapshotAt, maxResidentEntities: maxResident, noContinueAsNew: true, codec: codec)
        let expectedBalance = Int64(snapshotAt + tail)
        var random = DeterministicRandom(seed: 42)
        let order = Array(0..<entityCount).shuffled(using: &random)

        // Check the layout, and time the journal-only part of an activation.
        var storage = recorder.makeLocal()
        do {
            let runtime = try EntityBench.open(configuration)
            defer { runtime.close() }
            guard runtime.residentEntities == 0 else { throw BenchmarkFailure(message: "entities resident after reopen") }
            let journal = runtime.journal
            var checksum = 0
            for index in order {
                let name = EntityName(type: BenchAccount.entityType, id: EntityBench.id(index))
                let start = ContinuousClock.Instant.now
                guard let key = try journal.key(for: name) else { throw BenchmarkFailure(message: "\(name) is not registered") }
                _ = try journal.metadata(of: key)
                guard let snapshot = try journal.snapshot(of: key) else { throw BenchmarkFailure(message: "\(name) has no snapshot") }
                var events = 0
                try journal.forEachEvent(of: key, from: snapshot.sequence + 1) { _, payload in
                    events += 1
                    checksum &+= payload.count
                }
                storage.record(ContinuousClock.Instant.now - start)
                let latest = try journal.latestSequence(of: key)
                guard snapshot.sequence == UInt64(snapshotAt), latest == UInt64(snapshotAt + tail), events == tail else {
                    throw BenchmarkFailure(message:
                        "\(name): snapshot at \(snapshot.sequence), latest \(latest), \(events) tail events; expected \(snapshotAt), \(snapshotAt + tail), \(tail)")
                }
            }
            precondition(checksum > 0)
        }

        // Measured: first query of every account, K at a time.
        let runtime = try EntityBench.open(configuration)
        recorder.start()
        try await EntityBench.forEach(count: entityCount, workers: inFlight) { position in
            let ref = runtime.entity(BenchAccount.self, id: EntityBench.id(order[position]))
            let start = ContinuousClock.Instant.now
            let balance = try await ref.query { $0.balance }
            recorder.record(since: start)
            guard balance == expectedBalance else { throw BenchmarkFailure(message: "\(ref.name): balance \(balance), expected \(expectedBalance)") }
        }
        recorder.stop()
        // The same queries again, now resident: what an activation costs beyond a round trip.
        var residentQueries = recorder.makeLocal()
        for position in 0..<entityCount {
            let ref = runtime.entity(BenchAccount.self, id: EntityBench.id(order[position]))
            let start = ContinuousClock.Instant.now
            _ = try await ref.query { $0.balance }
            residentQueries.record(ContinuousClock.Instant.now - start)
        }
        let resident = runtime.residentEntities
        runtime.close()
        guard resident == entityCount else { throw BenchmarkFailure(message: "\(resident) resident after activating \(entityCount)") }

        var extra: [String: JSONValue] = EntityBench.microseconds(LatencySummary(storage.histogram), prefix: "journal_only")
        extra.merge(EntityBench.microseconds(LatencySummary(residentQueries.histogram), prefix: "resident_query")) { $1 }
        if concurrent > 0 {
            let again = try EntityBench.open(configuration)
            defer { again.close() }
            let started = ContinuousClock.Instant.now
            try await EntityBench.forEach(count: entityCount, workers: concurrent) { position in
                _ = try await again.entity(BenchAccount.self, id: EntityBench.id(order[position])).query { $0.balance }
            }
            extra["concurrent_activations_per_s"] = .double(Double(entityCount) / (ContinuousClock.Instant.now - started).seconds)
        }
        if let load { extra["load_avg_1m"] = .double(load) }
        return ScenarioResult(
            operations: entityCount,
            params: [
                "entities": .int(entityCount), "in_flight": .int(inFlight), "snapshot_at": .int(snapshotAt),
                "tail": .int(tail), "concurrent": .int(concurrent), "codec": .string(codec),
            ],
            extra: extra)
    }
}
