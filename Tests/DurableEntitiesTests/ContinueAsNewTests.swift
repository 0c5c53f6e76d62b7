@testable import DurableEntities
import Foundation
import Testing

@Suite("Continue-as-new")
struct ContinueAsNewTests {
    @Test("a storm of concurrent signals across many continue-as-new switches: none lost, none doubled")
    func stormAcrossRuns() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        var configuration = EntityRuntime.Configuration(directory: directory.path, snapshotEvery: 1_000, logger: quietLogger)
        configuration.continueAsNewAfterEvents = 50
        configuration.journal.logger = quietLogger
        let senders = 20
        let perSender = 150
        do {
            let runtime = try EntityRuntime(configuration: configuration)
            let hot = runtime.entity(Account.self, id: "hot")
            try await withThrowingTaskGroup(of: Void.self) { group in
                for sender in 0..<senders {
                    group.addTask {
                        for index in 0..<perSender {
                            try await hot.signal(.deposit(1), idempotencyKey: "s\(sender)-\(index)")
                        }
                    }
                }
                try await group.waitForAll()
            }
            #expect(try await hot.query { $0 } == Account.State(balance: Int64(senders * perSender), deposits: senders * perSender))
            let key = try #require(try runtime.journal.key(for: hot.name))
            let metadata = try #require(try runtime.journal.metadata(of: key))
            #expect(metadata.run > 1 + UInt64(senders * perSender / 50) / 2, "runs switched many times (run \(metadata.run))")
            // Retention keeps the previous run and the current one: far fewer events than were sent.
            let kept = try runtime.journal.events(of: key)
            #expect(kept.count < 2 * 50 + configuration.maxMessagesPerTurn * 2)
            #expect(kept.first.map { $0.sequence >= metadata.prunedBefore } ?? true)
            runtime.close()
        }
        // After a reopen the new run starts from its snapshot with the same exact counts.
        let runtime = try EntityRuntime(configuration: configuration)
        defer { runtime.close() }
        let hot = runtime.entity(Account.self, id: "hot")
        #expect(try await hot.query { $0 } == Account.State(balance: Int64(senders * perSender), deposits: senders * perSender))
        try await hot.signal(.deposit(1))
        #expect(try await hot.query(\.deposits) == senders * perSender + 1)
    }

    @Test("a handler can ask to continue as new; the state carries over")
    func explicitContinueAsNew() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        var configuration = EntityRuntime.Configuration(directory: directory.path, logger: quietLogger)
        configuration.journal.logger = quietLogger
        configuration.keepRuns = 0
        let runtime = try EntityRuntime(configuration: configuration)
        defer { runtime.close() }
        let ledger = runtime.entity(Ledger.self, id: "l-1")
        for amount in 1...5 { try await ledger.signal(.post(Int64(amount))) }
        try await ledger.signal(.close)
        try await ledger.signal(.post(100))
        #expect(try await ledger.query { $0 } == Ledger.State(total: 115, posts: 6, closedPeriods: 1))
        let key = try #require(try runtime.journal.key(for: ledger.name))
        let metadata = try #require(try runtime.journal.metadata(of: key))
        #expect(metadata.run == 2)
        #expect(metadata.runStartSequence == 7)
        // keepRuns 0: only the new run's history is left.
        #expect(try runtime.journal.events(of: key).map(\.sequence) == [7])
    }
}

/// A ledger that closes a period by continuing as new.
struct Ledger: EntityWorkflow {
    struct State: Codable, Sendable, Equatable {
        var total: Int64 = 0
        var posts = 0
        var closedPeriods = 0
    }
    enum Signal: Codable, Sendable {
        case post(Int64)
        case close
    }
    static func initialState(id: String) -> State { State() }
    static func handle(_ signal: Signal, state: inout State, context: EntityContext) throws {
        switch signal {
        case .post(let amount):
            state.total += amount
            state.posts += 1
        case .close:
            state.closedPeriods += 1
            context.continueAsNew()
        }
    }
}
