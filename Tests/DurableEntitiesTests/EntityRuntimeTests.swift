@testable import DurableEntities
import DurableEntitiesTesting
import Foundation
import Logging
import Testing
import TestSupport

@Suite("Entity runtime")
struct EntityRuntimeTests {
    func configuration(_ directory: TemporaryDirectory, snapshotEvery: Int = 100) -> EntityRuntime.Configuration {
        var configuration = EntityRuntime.Configuration(directory: directory.path, snapshotEvery: snapshotEvery, logger: quietLogger)
        configuration.journal.logger = quietLogger
        return configuration
    }

    @Test("signals, updates and queries; state survives close and reopen from snapshot plus tail")
    func signalsUpdatesQueries() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        do {
            let runtime = try EntityRuntime(configuration: configuration(directory, snapshotEvery: 7))
            let alice = runtime.entity(Account.self, id: "alice")
            for _ in 0..<25 { try await alice.signal(.deposit(10)) }
            #expect(try await alice.query(\.balance) == 250)
            #expect(try await alice.update(.withdraw(40)) == 210)
            // A refused update records nothing.
            let refused = await #expect(throws: EntityError.self) { try await alice.update(.withdraw(1_000)) }
            #expect(refused?.code == .rejected)
            #expect(refused?.underlying is Account.InsufficientFunds)
            // A refused signal changes nothing, even though its handler touched the state.
            let failed = await #expect(throws: EntityError.self) { try await alice.signal(.fail) }
            #expect(failed?.code == .rejected)
            #expect(try await alice.query { $0 } == Account.State(balance: 210, deposits: 25))
            #expect(try runtime.journal.latestSequence(of: try #require(try runtime.journal.key(for: alice.name))) == 26)
            runtime.close()
        }
        let runtime = try EntityRuntime(configuration: configuration(directory, snapshotEvery: 7))
        defer { runtime.close() }
        let alice = runtime.entity(Account.self, id: "alice")
        #expect(try await alice.query { $0 } == Account.State(balance: 210, deposits: 25))
        try await alice.signal(.deposit(1))
        #expect(try await alice.query(\.balance) == 211)
        // A never-touched entity has its initial state, and querying it records nothing.
        #expect(try await runtime.entity(Account.self, id: "nobody").query(\.balance) == 0)
        #expect(try runtime.journal.key(for: EntityName(type: "Account", id: "nobody")) == nil)
    }

    @Test("an idempotency key makes a resent signal or update count once")
    func idempotencyKeys() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let runtime = try EntityRuntime(configuration: configuration(directory))
        defer { runtime.close() }
        let bob = runtime.entity(Account.self, id: "bob")
        try await bob.signal(.deposit(100), idempotencyKey: "d-1")
        try await bob.signal(.deposit(100), idempotencyKey: "d-1")
        try await bob.signal(.deposit(100), idempotencyKey: "d-2")
        #expect(try await bob.query(\.balance) == 200)
        #expect(try await bob.update(.withdraw(50), idempotencyKey: "w-1") == 150)
        #expect(try await bob.update(.withdraw(50), idempotencyKey: "w-1") == 150)
        #expect(try await bob.query(\.balance) == 150)
    }

    @Test("concurrent senders: every acknowledged deposit is counted exactly once")
    func concurrentSenders() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let runtime = try EntityRuntime(configuration: configuration(directory, snapshotEvery: 50))
        defer { runtime.close() }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for sender in 0..<50 {
                group.addTask {
                    for round in 0..<40 {
                        try await runtime.entity(Account.self, id: "acc-\((sender + round) % 10)").signal(.deposit(1))
                    }
                }
            }
            try await group.waitForAll()
        }
        var total: Int64 = 0
        for index in 0..<10 { total += try await runtime.entity(Account.self, id: "acc-\(index)").query(\.balance) }
        #expect(total == 2_000)
    }

    @Test("unknown types, undecodable or oversized payloads and terminated entities give typed errors and record nothing")
    func typedErrors() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        var configuration = configuration(directory)
        configuration.maxPayloadBytes = 64
        let runtime = try EntityRuntime(configuration: configuration, entityTypes: [Account.self])
        defer { runtime.close() }

        let unknown = await #expect(throws: EntityError.self) {
            try await runtime.signal(entityType: "Nope", id: "x", payload: Array(#"{"deposit":{"_0":1}}"#.utf8))
        }
        #expect(unknown?.code == .unknownEntityType)
        #expect(unknown?.entity == EntityName(type: "Nope", id: "x"))

        let undecodable = await #expect(throws: EntityError.self) {
            try await runtime.signal(entityType: "Account", id: "carol", payload: Array("not json".utf8))
        }
        #expect(undecodable?.code == .undecodablePayload)
        #expect(undecodable?.entity == EntityName(type: "Account", id: "carol"))

        let oversized = await #expect(throws: EntityError.self) {
            try await runtime.signal(entityType: "Account", id: "carol",
                                     payload: Array(#"{"deposit":{"_0":1}}"#.utf8) + Array(repeating: 0x20, count: 100))
        }
        #expect(oversized?.code == .payloadTooLarge)
        #expect(try runtime.journal.key(for: EntityName(type: "Account", id: "carol")) == nil, "nothing recorded")

        // A raw payload that decodes is accepted.
        try await runtime.signal(entityType: "Account", id: "carol", payload: Array(#"{"deposit":{"_0":5}}"#.utf8))
        let carol = runtime.entity(Account.self, id: "carol")
        #expect(try await carol.query(\.balance) == 5)

        try await carol.terminate(reason: "closed by the customer")
        let terminated = await #expect(throws: EntityError.self) { try await carol.signal(.deposit(1)) }
        #expect(terminated?.code == .terminated)
        let key = try #require(try runtime.journal.key(for: carol.name))
        #expect(try runtime.journal.latestSequence(of: key) == 2)
    }

    @Test("a terminated entity stays terminated after reopen")
    func terminatedAfterReopen() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        do {
            let runtime = try EntityRuntime(configuration: configuration(directory))
            try await runtime.entity(Account.self, id: "dave").signal(.deposit(3))
            try await runtime.entity(Account.self, id: "dave").terminate(reason: "fraud")
            runtime.close()
        }
        let runtime = try EntityRuntime(configuration: configuration(directory))
        defer { runtime.close() }
        let error = await #expect(throws: EntityError.self) { try await runtime.entity(Account.self, id: "dave").signal(.deposit(1)) }
        #expect(error?.code == .terminated)
    }

    @Test("the entities of a type are listed by id, a page at a time, while names wait for the sorted index and after a reopen")
    func listsEntities() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        var configuration = configuration(directory)
        configuration.journal.deferredNameLimit = 8  // names merge into the sorted index while later ones wait
        // Registered out of order; one id outside ASCII (ids sort by their UTF-8 bytes).
        let ids = (0..<40).map { "acc-\(($0 * 17) % 40)" } + ["é-last", "0-first"]
        let expected = ids.sorted { $0.utf8.lexicographicallyPrecedes($1.utf8) }
        func pages(_ runtime: EntityRuntime, limit: Int) throws -> [[String]] {
            var pages: [[String]] = []
            var after: String?
            while true {
                let page = try runtime.entityIDs(of: Account.self, after: after, limit: limit)
                if page.isEmpty { return pages }
                pages.append(page)
                after = page.last
            }
        }
        do {
            let runtime = try EntityRuntime(configuration: configuration)
            for id in ids { try await runtime.entity(Account.self, id: id).signal(.deposit(1)) }
            try await runtime.entity(Account.self, id: "acc-3").terminate(reason: "closed")  // still listed
            _ = try await runtime.entity(Account.self, id: "only-queried").query(\.balance)  // never recorded
            try await runtime.entity(Approval.self, id: "acc-other-type").start(.init(amount: 1))  // another type
            let paged = try pages(runtime, limit: 7)
            #expect(paged.flatMap { $0 } == expected)
            #expect(paged.dropLast().allSatisfy { $0.count == 7 })
            #expect(try runtime.entityIDs(of: Account.self, after: "acc-38", limit: 3) == ["acc-39", "acc-4", "acc-5"])
            #expect(try runtime.entityIDs(of: Approval.self) == ["acc-other-type"])
            #expect(try runtime.entityIDs(of: Account.self, after: "é-last").isEmpty)
            let refused = #expect(throws: EntityError.self) { try runtime.entityIDs(of: Account.self, limit: 0) }
            #expect(refused?.code == .invalidArgument)
            let tooLong = #expect(throws: EntityError.self) { try runtime.entityIDs(of: Account.self, after: String(repeating: "x", count: 600)) }
            #expect(tooLong?.code == .invalidArgument)
            runtime.close()
        }
        let reopened = try EntityRuntime(configuration: configuration)
        defer { reopened.close() }
        #expect(try pages(reopened, limit: 5).flatMap { $0 } == expected)
        #expect(try reopened.entityIDs(of: Account.self, limit: 100) == expected)
    }

    @Test("a closed runtime leaves memory with its resident entities, run bodies suspended in waits included; they go on at the next open")
    func closedRuntimeIsReleased() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        var configuration = configuration(directory)
        configuration.clock = clock
        weak var core: RuntimeCore?
        weak var waiting: EntityCell<Approval>?
        weak var sleeping: EntityCell<Reminder>?
        weak var account: EntityCell<Account>?
        do {
            let runtime = try EntityRuntime(configuration: configuration)
            let approval = runtime.entity(Approval.self, id: "a")
            let reminder = runtime.entity(Reminder.self, id: "r")
            let alice = runtime.entity(Account.self, id: "alice")
            try await approval.start(.init(amount: 5))  // suspended in a condition with a timeout
            try await reminder.start(.init(after: .seconds(60)))  // suspended in a durable timer
            try await alice.signal(.deposit(4))  // no run body
            // Registers the types the boss starts and reports to (messages to an unknown type are parked).
            _ = (runtime.entity(Inbox.self, id: "boss-inbox"), runtime.entity(Worker.self, id: "w"))
            try await runtime.entity(Boss.self, id: "boss").start(.init(children: ["w"]))  // awaits its child
            _ = await Task.detached { runtime.core.waitUntilIdle() }.value  // the child started and waits
            #expect(runtime.core.residentCell(Worker.self, EntityName(type: "Worker", id: "w")) != nil)
            core = runtime.core
            waiting = runtime.core.residentCell(Approval.self, approval.name)
            sleeping = runtime.core.residentCell(Reminder.self, reminder.name)
            account = runtime.core.residentCell(Account.self, alice.name)
            #expect(waiting != nil && sleeping != nil && account != nil, "the entities are resident before the close")
            runtime.close()  // not shutdown(): its dispatch block may hold the runtime a moment after it returned
        }
        #expect(waiting == nil, "the approval's cell (and its suspended run body) left memory")
        #expect(sleeping == nil, "the sleeper's cell (and its suspended run body) left memory")
        #expect(account == nil, "the account's cell left memory")
        #expect(core == nil, "the runtime's core left memory")
        // Nothing was recorded by leaving memory: the runs go on where they were.
        let runtime = try EntityRuntime(configuration: configuration)
        defer { runtime.close() }
        try await runtime.entity(Approval.self, id: "a").signal(.approve)
        guard case .approved = try await runtime.entity(Approval.self, id: "a").result() else {
            Issue.record("expected an approval")
            return
        }
        clock.advance(by: .seconds(60))
        #expect(try await runtime.entity(Reminder.self, id: "r").result() == "reminded")
        #expect(try await runtime.entity(Account.self, id: "alice").query(\.balance) == 4)
        try await runtime.entity(Worker.self, id: "w").signal(.finish)
        #expect(try await runtime.entity(Boss.self, id: "boss").result() == ["w=2"])
    }

    @Test("passivated entities come back with identical state; residents stay within the bound")
    func passivation() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        var configuration = configuration(directory, snapshotEvery: 3)
        configuration.maxResidentEntities = 20
        let runtime = try EntityRuntime(configuration: configuration)
        defer { runtime.close() }
        for index in 0..<200 {
            let account = runtime.entity(Account.self, id: "p-\(index)")
            for _ in 0..<(index % 5 + 1) { try await account.signal(.deposit(Int64(index))) }
        }
        #expect(runtime.residentEntities <= 20 + configuration.shards)
        for index in 0..<200 {
            let state = try await runtime.entity(Account.self, id: "p-\(index)").query { $0 }
            #expect(state == Account.State(balance: Int64(index * (index % 5 + 1)), deposits: index % 5 + 1))
        }
        #expect(runtime.residentEntities <= 20 + configuration.shards)
    }

    @Test("idempotency keys: too long is refused, never truncated; signals and updates have separate keys")
    func idempotencyKeyEdges() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let runtime = try EntityRuntime(configuration: configuration(directory))
        defer { runtime.close() }
        let erin = runtime.entity(Account.self, id: "erin")
        let long = String(repeating: "x", count: 500)
        let error = await #expect(throws: EntityError.self) { try await erin.signal(.deposit(1), idempotencyKey: long + "-a") }
        #expect(error?.code == .payloadTooLarge)
        try await erin.signal(.deposit(10), idempotencyKey: "same")
        #expect(try await erin.update(.withdraw(3), idempotencyKey: "same") == 7)
        #expect(try await erin.query(\.balance) == 7)
    }

    @Test("more busy entities than the resident bound: senders are served, nothing spins or is lost")
    func busyBeyondTheBound() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        var configuration = configuration(directory)
        configuration.maxResidentEntities = 2
        let runtime = try EntityRuntime(configuration: configuration)
        defer { runtime.close() }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for sender in 0..<64 {
                group.addTask {
                    for _ in 0..<5 { try await runtime.entity(Account.self, id: "busy-\(sender)").signal(.deposit(1)) }
                }
            }
            try await group.waitForAll()
        }
        for sender in 0..<64 {
            #expect(try await runtime.entity(Account.self, id: "busy-\(sender)").query(\.balance) == 5)
        }
    }

    @Test("entities idle past the configured time leave memory; recently active ones stay; both keep their state")
    func passivationByIdleTime() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        var configuration = configuration(directory)
        configuration.clock = clock
        configuration.passivateAfterIdle = .seconds(60)
        let runtime = try EntityRuntime(configuration: configuration)
        defer { runtime.close() }
        for index in 0..<10 { try await runtime.entity(Account.self, id: "idle-\(index)").signal(.deposit(Int64(index))) }
        #expect(runtime.residentEntities == 10)
        clock.advance(by: .seconds(30))
        try await runtime.entity(Account.self, id: "idle-0").signal(.deposit(100))
        clock.advance(by: .seconds(31))        // idle-1…9: 61 s idle; idle-0: 31 s
        runtime.passivateIdleEntities(idleFor: .seconds(60))
        #expect(runtime.residentEntities == 1)
        for index in 0..<10 {
            #expect(try await runtime.entity(Account.self, id: "idle-\(index)").query(\.balance) == Int64(index == 0 ? 100 : index))
        }
    }

    @Test("idempotency keys are kept for the retention time, then forgotten: a resend after it is a new message; a large backlog expires in bounded commits")
    func idempotencyRetention() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        var configuration = configuration(directory)
        configuration.clock = clock
        configuration.idempotencyRetention = .seconds(3_600)
        do {
            let runtime = try EntityRuntime(configuration: configuration)
            defer { runtime.close() }
            let carol = runtime.entity(Account.self, id: "carol")
            try await carol.signal(.deposit(100), idempotencyKey: "d-1")
            #expect(try await carol.update(.withdraw(30), idempotencyKey: "w-1") == 70)

            clock.advance(by: .seconds(3_599))
            #expect(try await runtime.expireIdempotencyResults() == 0)
            try await carol.signal(.deposit(100), idempotencyKey: "d-1")           // recognised: not applied
            #expect(try await carol.update(.withdraw(30), idempotencyKey: "w-1") == 70)  // the first result
            #expect(try await carol.query(\.balance) == 70)

            clock.advance(by: .seconds(2))
            #expect(try await runtime.expireIdempotencyResults() == 2)
            try await carol.signal(.deposit(100), idempotencyKey: "d-1")           // forgotten: applied again
            #expect(try await carol.update(.withdraw(30), idempotencyKey: "w-1") == 140)
            #expect(try await carol.query(\.balance) == 140)

            // More than one commit's worth, over 12 entities; an explicit age overrides the configuration.
            let count = RuntimeCore.resultsExpiredPerCommit + 200
            try await withThrowingTaskGroup(of: Void.self) { group in
                for entity in 0..<12 {
                    group.addTask {
                        let ref = runtime.entity(Account.self, id: "bulk-\(entity)")
                        for index in stride(from: entity, to: count, by: 12) {
                            try await ref.signal(.deposit(1), idempotencyKey: "k-\(index)")
                        }
                    }
                }
                try await group.waitForAll()
            }
            clock.advance(by: .seconds(10))
            #expect(try await runtime.expireIdempotencyResults(olderThan: .seconds(5)) == count + 2)
            #expect(try await runtime.expireIdempotencyResults(olderThan: .zero) == 0)
            try await runtime.entity(Account.self, id: "bulk-0").signal(.deposit(1), idempotencyKey: "k-0")
            #expect(try await runtime.entity(Account.self, id: "bulk-0").query(\.balance) == Int64((count + 11) / 12 + 1))
            try await carol.signal(.deposit(5), idempotencyKey: "d-2")
        }
        // Kept keys survive a reopen.
        let runtime = try EntityRuntime(configuration: configuration)
        defer { runtime.close() }
        let carol = runtime.entity(Account.self, id: "carol")
        try await carol.signal(.deposit(5), idempotencyKey: "d-2")
        #expect(try await carol.query(\.balance) == 145)
    }

    @Test("the runtime expires idempotency results on its own, on its clock")
    func idempotencyRetentionSweep() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let (sweeps, sweep) = AsyncStream.makeStream(of: String.self)
        var configuration = configuration(directory)
        configuration.clock = clock
        configuration.idempotencyRetention = .seconds(60)  // swept every 2.5 s
        configuration.logger = Logger(label: "test") { _ in
            MessageStream(level: .info, continuation: sweep) { $0 == "idempotency results expired" }
        }
        let runtime = try EntityRuntime(configuration: configuration)
        defer { runtime.close() }
        let dave = runtime.entity(Account.self, id: "dave")
        try await dave.signal(.deposit(10), idempotencyKey: "d-1")
        clock.advance(by: .seconds(61))
        var messages = sweeps.makeAsyncIterator()
        #expect(await messages.next() == "idempotency results expired")
        try await dave.signal(.deposit(10), idempotencyKey: "d-1")
        #expect(try await dave.query(\.balance) == 20)
    }
}

/// A log handler that passes the messages `keep` selects to a stream.
struct MessageStream: LogHandler {
    var logLevel: Logger.Level
    var metadata: Logger.Metadata = [:]
    let continuation: AsyncStream<String>.Continuation
    let keep: @Sendable (String) -> Bool
    /// A metadata key whose value, when a message has it, follows the message: `message [value]`.
    let tag: String?

    init(level: Logger.Level, continuation: AsyncStream<String>.Continuation, tag: String? = nil,
         keep: @escaping @Sendable (String) -> Bool) {
        self.logLevel = level
        self.continuation = continuation
        self.tag = tag
        self.keep = keep
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        let message = event.message.description
        guard keep(message) else { return }
        if let tag, let value = event.metadata?[tag] ?? metadata[tag] {
            continuation.yield("\(message) [\(value)]")
        } else {
            continuation.yield(message)
        }
    }
}
