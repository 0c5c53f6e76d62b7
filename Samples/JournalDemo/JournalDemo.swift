import ArgumentParser
import DurableEntities
import Foundation
import Logging

/// A short tour of the journal: durable appends, group commit under concurrency, and everything
/// still there after the journal is closed and opened again.
@main
struct JournalDemo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Appends account events to an LMDB journal, reopens it, and folds the events into balances.")

    @Option(name: .long, help: "The LMDB directory (created when missing; emptied first unless --keep).")
    var data: String = "./demo-data"

    @Flag(name: .long, help: "Keep what the directory already holds instead of starting fresh.")
    var keep = false

    @Option(name: .long, help: "How many concurrent writers the group-commit burst has.")
    var writers: Int = 1_000

    @Option(name: .long, help: "How many deposits each writer of the burst makes, one after another.")
    var rounds: Int = 20

    func run() async throws {
        if !keep { try? FileManager.default.removeItem(atPath: data) }
        let quiet = Logger(label: "demo", factory: { _ in SwiftLogNoOpLogHandler() })
        let accounts = ["alice", "bob", "carol"]

        print("1. Open the journal in \(data) and register \(accounts.count) accounts.")
        var journal = try Journal(configuration: .init(directory: data, logger: quiet))
        var keys: [String: EntityKey] = [:]
        for id in accounts { keys[id] = try await journal.register(EntityName(type: "Account", id: id)) }

        print("2. Deposit: each commit returns only once the event is durable (fsync).")
        for (id, amount) in [("alice", 100), ("bob", 250), ("alice", 40), ("carol", 75)] {
            let key = keys[id]!
            var batch = JournalBatch()
            batch.append(key, sequence: try journal.latestSequence(of: key) + 1, payload: Array("deposit \(amount)".utf8))
            _ = try await journal.commit(batch)
            print("   \(id) +\(amount)  (durable)")
        }

        print("3. A burst: \(writers) savers deposit 1 each, \(rounds) times, all at once.")
        var savers: [EntityKey] = []
        var registration = JournalBatch()
        for index in 0..<writers { registration.register(EntityName(type: "Account", id: "saver-\(index)")) }
        savers = try await journal.commit(registration).registered
        let before = journal.statistics
        let started = ContinuousClock.now
        let current = journal
        try await withThrowingTaskGroup(of: Void.self) { group in
            for key in savers {
                group.addTask {
                    for sequence in 1...UInt64(rounds) {
                        var batch = JournalBatch()
                        batch.append(key, sequence: sequence, payload: Array("deposit 1".utf8))
                        _ = try await current.commit(batch)
                    }
                }
            }
            try await group.waitForAll()
        }
        let elapsed = ContinuousClock.now - started
        let after = journal.statistics
        let commits = after.commits - before.commits
        let events = after.operations - before.operations
        print("   \(events) durable events in \(commits) LMDB commits (\(events / max(1, commits)) per commit: group commit), \(elapsed)")

        print("4. Close the journal and open it again: nothing acknowledged is lost.")
        journal.close()
        journal = try Journal(configuration: .init(directory: data, logger: quiet))
        for id in accounts {
            let key = keys[id]!
            var balance = 0
            try journal.forEachEvent(of: key) { _, payload in
                let text = String(decoding: payload, as: UTF8.self)
                if text.hasPrefix("deposit "), let amount = Int(text.dropFirst(8)) { balance += amount }
            }
            print("   \(id): \(try journal.latestSequence(of: key)) events, balance \(balance)")
        }
        journal.close()
        print("Done. Run `swift run -c release Benchmarks` for throughput figures.")
    }
}
