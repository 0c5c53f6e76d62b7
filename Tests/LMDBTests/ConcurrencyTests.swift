import Foundation
import LMDB
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Shared progress between the writer thread and the reader threads.
final class ReadWriteProgress: Sendable {
    /// Set by the writer when it has committed its last round (or failed).
    let writerDone = Atomic<Bool>(false)
    /// Readers that have completed at least one read.
    let readersStarted = Atomic<Int>(0)
    /// Readers that have returned (normally or by throwing).
    let readersStopped = Atomic<Int>(0)
    /// The highest round any reader has seen.
    let highestSeen = Atomic<Int>(-1)

    func saw(_ round: Int) {
        var current = highestSeen.load(ordering: .relaxed)
        while round > current {
            let (exchanged, original) = highestSeen.compareExchange(
                expected: current, desired: round, successOrdering: .releasing, failureOrdering: .relaxed)
            if exchanged { return }
            current = original
        }
    }

    /// Spins (yielding the CPU) until `condition` holds or a reader has stopped; no sleeping.
    func spin(until condition: () -> Bool) {
        while !condition() && readersStopped.load(ordering: .acquiring) == 0 { sched_yield() }
    }
}

@Suite("Concurrent readers and a writer")
struct ConcurrencyTests {
    /// Key layout: `[0] + "a"` / `[0] + "b"` hold the latest round; `[1] + n` / `[2] + n` are the pair of round n.
    static let latestA: [UInt8] = [0, 0x61]
    static let latestB: [UInt8] = [0, 0x62]
    static func pairA(_ n: UInt32) -> [UInt8] { [1] + bigEndian(n) }
    static func pairB(_ n: UInt32) -> [UInt8] { [2] + bigEndian(n) }
    static func pairValue(_ n: UInt32) -> [UInt8] { bigEndian(n) + pattern(n, count: 600) }

    static let readers = 4
    static let rounds: UInt32 = 400
    /// Every `checkpoint` rounds the writer waits until a reader has seen the round it just committed.
    static let checkpoint: UInt32 = 25

    /// Writes round `n`: both keys of the pair and both "latest" keys, in one transaction.
    static func writeRound(_ environment: Environment, _ data: Database, _ n: UInt32) throws {
        try environment.write { txn throws in
            try txn.put(pairValue(n), forKey: pairA(n), in: data)
            try txn.put(bigEndian(n), forKey: latestA, in: data)
            try txn.put(pairValue(n), forKey: pairB(n), in: data)
            try txn.put(bigEndian(n), forKey: latestB, in: data)
        }
    }

    /// The writer: waits for every reader to be reading, then commits the rounds, pausing at each
    /// checkpoint until a reader has seen that round, so that reads provably interleave with commits.
    static func writeAll(_ progress: ReadWriteProgress, _ environment: Environment, _ data: Database) throws {
        defer { progress.writerDone.store(true, ordering: .releasing) }
        progress.spin { progress.readersStarted.load(ordering: .acquiring) == readers }
        for n in 0..<rounds {
            try writeRound(environment, data, n)
            if n % checkpoint == checkpoint - 1 {
                progress.spin { progress.highestSeen.load(ordering: .acquiring) >= Int(n) }
            }
        }
    }

    /// What one reader saw.
    struct ReaderReport: Sendable {
        var reads = 0
        var roundsSeen = Set<Int>()
        var violations: [String] = []
    }

    /// One read transaction: checks that it sees whole rounds only. Returns the latest round seen (-1 for none).
    static func readSnapshot(_ environment: Environment, _ data: Database) throws -> (round: Int, violations: [String]) {
        try environment.read { txn throws in
            var violations: [String] = []
            let a = try txn.value(forKey: latestA, in: data)
            let b = try txn.value(forKey: latestB, in: data)
            guard a == b else { return (-1, ["latest a \(String(describing: a)) != latest b \(String(describing: b))"]) }
            guard let a else {
                let count = try txn.count(data)
                return (-1, count == 0 ? [] : ["no round yet but \(count) entries"])
            }
            let n = decodeBigEndian(a)
            let count = try txn.count(data)
            if count != 2 * (Int(n) + 1) + 2 { violations.append("round \(n): \(count) entries") }
            let pair = (try txn.value(forKey: pairA(n), in: data), try txn.value(forKey: pairB(n), in: data))
            if pair.0 != pairValue(n) || pair.1 != pairValue(n) { violations.append("round \(n): pair differs") }
            // Nothing of a later round is visible: the last a-key and the last b-key are round n's.
            let (lastA, lastB) = try txn.withCursor(data) { cursor in
                (try cursor.seek(below: [2]).map { Array($0.key) }, try cursor.seek(below: [3]).map { Array($0.key) })
            }
            if lastA != pairA(n) || lastB != pairB(n) {
                violations.append("round \(n): last keys \(String(describing: lastA)), \(String(describing: lastB))")
            }
            return (Int(n), violations)
        }
    }

    /// A reader: reads until the writer is done, then once more. Its rounds never go backwards.
    static func readUntilDone(_ progress: ReadWriteProgress, _ environment: Environment, _ data: Database) throws -> ReaderReport {
        defer { progress.readersStopped.add(1, ordering: .releasing) }
        var report = ReaderReport()
        var previous = -1
        while true {
            let finishing = progress.writerDone.load(ordering: .acquiring)
            let (round, violations) = try readSnapshot(environment, data)
            if report.reads == 0 { progress.readersStarted.add(1, ordering: .releasing) }
            report.reads += 1
            report.roundsSeen.insert(round)
            report.violations += violations.prefix(3)
            if round < previous { report.violations.append("round went back from \(previous) to \(round)") }
            previous = round
            progress.saw(round)
            if finishing || report.violations.count > 20 { return report }
        }
    }

    static func count(_ environment: Environment, _ data: Database) throws -> Int {
        try environment.read { try $0.count(data) }
    }

    /// Runs `body` on a thread of its own, outside the cooperative pool (which may have only two threads).
    static func onThread<R: Sendable>(_ body: @escaping @Sendable () throws -> R) async throws -> R {
        try await withCheckedThrowingContinuation { continuation in
            Thread { continuation.resume(with: Result { try body() }) }.start()
        }
    }

    @Test("readers on several threads see only whole write transactions, while the map grows",
          .timeLimit(.minutes(10)))
    func readersSeeWholeTransactions() async throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        // A 64 KiB map so that the writer grows it while readers run.
        let environment = try Environment.open(scratch.configuration(mapSize: 64 << 10))
        defer { environment.close() }
        let data = try environment.database("data")
        let progress = ReadWriteProgress()

        let reports = try await withThrowingTaskGroup(of: ReaderReport?.self) { group in
            for _ in 0..<Self.readers {
                group.addTask { try await Self.onThread { try Self.readUntilDone(progress, environment, data) } }
            }
            group.addTask {
                try await Self.onThread { try Self.writeAll(progress, environment, data) }
                return nil
            }
            var reports: [ReaderReport] = []
            for try await report in group { if let report { reports.append(report) } }
            return reports
        }

        #expect(reports.count == Self.readers)
        for (index, report) in reports.enumerated() {
            #expect(report.violations.isEmpty, "reader \(index): \(report.violations.prefix(5))")
            #expect(report.roundsSeen.contains(Int(Self.rounds) - 1), "reader \(index) never saw the last round")
        }
        // Readers saw rounds while the writer was still writing: at least one per checkpoint.
        let distinct = reports.reduce(into: Set<Int>()) { $0.formUnion($1.roundsSeen) }
        for checkpoint in stride(from: Int(Self.checkpoint) - 1, to: Int(Self.rounds), by: Int(Self.checkpoint)) {
            let window = (checkpoint...(checkpoint + Int(Self.checkpoint) - 1))
            #expect(distinct.contains { window.contains($0) }, "no reader saw a round in \(window)")
        }
        #expect(environment.mapGrowthCount > 0)
        #expect(try Self.count(environment, data) == 2 * Int(Self.rounds) + 2)
    }
}
