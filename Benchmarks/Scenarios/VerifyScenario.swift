import DurableEntities
import Foundation
import Logging

/// `verify`: ``Journal/verify(batchSize:reportLimit:acrossTables:)``, the directory's integrity check, over a
/// journal of `--entities E` entities (default 10,000) with `--events N` events each (default 100,
/// ~64 bytes), plus a snapshot, a timer and an idempotency result per entity.
///
/// The set-up appends the events 10 per entity per commit, with a coalesce threshold of 32, so that
/// most of them move from the log to history chunks, as a long-running service's do (with the
/// default threshold of 256, 100 events an entity would all still be in the log). Measured: `--param runs=R` verifications (default 5) of the whole
/// directory, one latency sample each; the headline throughput is events checked a second (each
/// event's checksum, in its chunk or in the log). Extra fields: rows read a second, the directory's
/// size, and its rows per table from the last run. Every run must find the directory intact.
/// `--param rows-only=true` skips the check across tables (the row checks alone).
struct VerifyScenario: BenchmarkScenario {
    static let name = "verify"
    static let summary = "the integrity check over E entities × N events, timers, results, snapshots"

    func run(_ options: ScenarioOptions, _ recorder: LatencyRecorder) async throws -> ScenarioResult {
        let entityCount = max(1, options.value(\.entities, full: 10_000, quick: 1_000))
        let eventsEach = max(1, options.value(\.events, full: 100, quick: 20))
        let runs = max(1, try options.extra("runs", full: 5, quick: 2))
        let rowsOnly = try EntityBench.flag(options.extra("rows-only"), name: "rows-only")

        let directory = try options.makeScratchDirectory("verify")
        defer { directory.remove() }
        let journal = try Journal(configuration: .init(
            directory: directory.path, coalesceThreshold: 32,
            logger: Logger(label: "bench", factory: { _ in SwiftLogNoOpLogHandler() })))
        defer { journal.close() }

        let keys = try await journal.registerAccounts(entityCount, prefix: "acc-")
        let payload = Array("deposit ref r-000000 amount 100 cents ..........................".utf8.prefix(64))
        var next: UInt64 = 1
        while next <= UInt64(eventsEach) {
            let last = min(UInt64(eventsEach), next + 9)
            for start in stride(from: 0, to: keys.count, by: 1_000) {
                var batch = JournalBatch()
                for key in keys[start..<min(keys.count, start + 1_000)] {
                    for sequence in next...last { batch.append(key, sequence: sequence, payload: payload) }
                }
                _ = try await journal.commit(batch)
            }
            next = last + 1
        }
        for start in stride(from: 0, to: keys.count, by: 1_000) {
            var batch = JournalBatch()
            for (offset, key) in keys[start..<min(keys.count, start + 1_000)].enumerated() {
                let n = start + offset
                batch.saveSnapshot(key, sequence: UInt64(eventsEach), payload: [UInt8](repeating: 0x42, count: 100))
                batch.scheduleTimer(JournalTimer(dueNanoseconds: UInt64(n) * 1_000_000, entity: key, id: 1, payload: payload))
                batch.recordResult(forKey: Array("dep-\(n)".utf8), payload: payload, recordedAt: UInt64(n))
            }
            _ = try await journal.commit(batch)
        }

        var last: JournalVerification?
        var measured = Duration.zero
        recorder.start()
        for _ in 0..<runs {
            let start = ContinuousClock.Instant.now
            let verification = try journal.verify(acrossTables: !rowsOnly)
            recorder.record(since: start)
            measured += ContinuousClock.Instant.now - start
            guard verification.isIntact else { throw BenchmarkFailure(message: "the directory is not intact: \(verification)") }
            last = verification
        }
        recorder.stop()
        guard let report = last else { throw BenchmarkFailure(message: "no verification ran") }
        let events = entityCount * eventsEach
        let seconds = Double(measured.components.seconds) + Double(measured.components.attoseconds) / 1e18
        let dataBytes = (try? FileManager.default.attributesOfItem(atPath: directory.path + "/data.mdb")[.size] as? Int) ?? 0
        var extra: [String: JSONValue] = [
            "rows": .int(report.rows),
            "rows_per_s": .double(Double(runs * report.rows) / seconds),
            "data_mb": .double(Double(dataBytes) / 1_048_576),
        ]
        for table in report.tables { extra["rows_\(table.name.replacingOccurrences(of: "-", with: "_"))"] = .int(table.rows) }
        return ScenarioResult(
            operations: runs * events,
            params: ["entities": .int(entityCount), "events": .int(eventsEach), "runs": .int(runs), "rows_only": .bool(rowsOnly)],
            extra: extra)
    }
}
