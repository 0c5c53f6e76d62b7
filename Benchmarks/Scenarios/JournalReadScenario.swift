import DurableEntities
import Logging

/// `journal-read`: replay one entity's history (`--events N`, default 10,000) start to finish, many
/// times, and point-read the latest snapshots of `--entities E` entities (default 1,000) at random.
///
/// The headline throughput is replay events/s; latencies are per replay. Snapshot reads are in the
/// extra fields `snapshot_reads_per_s` and `snapshot_read_p50_us`/`p99_us`.
struct JournalReadScenario: BenchmarkScenario {
    static let name = "journal-read"
    static let summary = "replay one entity's N events; point-read snapshots"

    func run(_ options: ScenarioOptions, _ recorder: LatencyRecorder) async throws -> ScenarioResult {
        let eventCount = options.value(\.events, full: 10_000, quick: 2_000)
        let entityCount = options.value(\.entities, full: 1_000, quick: 100)
        let replays = try options.extra("replays", full: 200, quick: 20)
        let snapshotReads = try options.extra("snapshot-reads", full: 500_000, quick: 20_000)

        let directory = try options.makeScratchDirectory("journal-read")
        defer { directory.remove() }
        let journal = try Journal(configuration: .init(
            directory: directory.path, logger: Logger(label: "bench", factory: { _ in SwiftLogNoOpLogHandler() })))
        defer { journal.close() }

        // Set-up: one entity with `eventCount` events of ~64 bytes, appended 100 per commit, and
        // `entityCount` entities with a 100-byte snapshot each.
        let replayed = try await journal.register(EntityName(type: "Account", id: "replayed"))
        var sequence: UInt64 = 0
        while sequence < UInt64(eventCount) {
            var batch = JournalBatch()
            for _ in 0..<min(100, eventCount - Int(sequence)) {
                sequence += 1
                batch.append(replayed, sequence: sequence, payload: Array("deposit \(sequence) ref r-\(sequence) amount 100 cents ......................".utf8.prefix(64)))
            }
            _ = try await journal.commit(batch)
        }
        let keys = try await journal.registerAccounts(entityCount, prefix: "snap-")
        var snapshots = JournalBatch()
        for key in keys { snapshots.saveSnapshot(key, sequence: 1, payload: [UInt8](repeating: 0x42, count: 100)) }
        _ = try await journal.commit(snapshots)

        // Measured: replays.
        var checksum = 0
        recorder.start()
        for _ in 0..<replays {
            let start = ContinuousClock.Instant.now
            var count = 0
            try journal.forEachEvent(of: replayed) { _, payload in
                count += 1
                checksum &+= payload.count
            }
            recorder.record(since: start)
            guard count == eventCount else { throw BenchmarkFailure(message: "replayed \(count) events, expected \(eventCount)") }
        }
        recorder.stop()

        // Measured separately: snapshot point reads.
        var local = recorder.makeLocal()
        var generator = SystemRandomNumberGenerator()
        let snapshotStart = ContinuousClock.Instant.now
        for _ in 0..<snapshotReads {
            let key = keys[Int(generator.next() % UInt64(keys.count))]
            let start = ContinuousClock.Instant.now
            guard let snapshot = try journal.snapshot(of: key) else { throw BenchmarkFailure(message: "missing snapshot") }
            local.record(ContinuousClock.Instant.now - start)
            checksum &+= snapshot.payload.count
        }
        let snapshotWall = ContinuousClock.Instant.now - snapshotStart
        let snapshotSeconds = Double(snapshotWall.components.seconds) + Double(snapshotWall.components.attoseconds) / 1e18
        let snapshotSummary = LatencySummary(local.histogram)
        precondition(checksum != 0)

        return ScenarioResult(
            operations: replays * eventCount,
            params: ["events": .int(eventCount), "replays": .int(replays), "entities": .int(entityCount),
                     "snapshot_reads": .int(snapshotReads)],
            extra: [
                "snapshot_reads_per_s": .double(Double(snapshotReads) / snapshotSeconds),
                "snapshot_read_p50_us": .double(Double(snapshotSummary.p50) / 1e3),
                "snapshot_read_p99_us": .double(Double(snapshotSummary.p99) / 1e3),
            ])
    }
}
