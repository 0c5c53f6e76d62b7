@testable import DurableEntities
import DurableEntitiesTesting
import Foundation
import LMDB
import ServiceLifecycle
import Synchronization
import Testing
import TestSupport

extension JournalBatch {
    /// Whether the batch appends events to `entity`.
    func appends(to entity: EntityKey) -> Bool {
        operations.contains { if case .append(entity, _) = $0 { true } else { false } }
    }

    /// Whether the batch deletes a stored task (an activity's outcome commit does).
    var deletesTask: Bool {
        operations.contains { if case .deleteTask = $0 { true } else { false } }
    }
}

/// A commit or a read that fails once (real LMDB: the failing transaction runs and is aborted, see
/// `JournalFaults`) loses nothing acknowledged and wedges nothing: the senders of what failed get a
/// `storage` error; deliveries the runtime owns (activity outcomes, timers, entity-to-entity
/// messages) are delivered again a second later on the runtime's clock; an entity whose load failed
/// loads again at its next message.
@Suite("Storage failures that pass", .timeLimit(.minutes(10)))
struct StorageFaultTests {
    func runtime(_ directory: TemporaryDirectory, _ clock: TestClock, _ faults: JournalFaults,
                 entityTypes: [any EntityWorkflow.Type] = [], activities: [any Activity] = []) throws -> EntityRuntime {
        var configuration = EntityRuntime.Configuration.quiet(directory, clock)
        configuration.journal.faults = faults
        return try EntityRuntime(configuration: configuration, entityTypes: entityTypes, activities: activities)
    }

    func kinds(_ runtime: EntityRuntime, _ name: EntityName) throws -> [HistoryEvent.Kind] {
        let key = try #require(try runtime.journal.key(for: name))
        return try runtime.journal.events(of: key).compactMap { $0.payload.withUnsafeBytes { HistoryEvent.decode($0)?.kind } }
    }

    /// How sending `signal` to `account` ended.
    func signalled(_ account: EntityRef<Account>, _ signal: Account.Signal) async -> Result<Void, EntityError> {
        do throws(EntityError) {
            try await account.signal(signal)
            return .success(())
        } catch {
            return .failure(error)
        }
    }

    @Test("a signal whose commit fails is refused with storage and leaves no trace; the entity takes the next one, and a reopen sees only what was acknowledged")
    func signalCommitFails() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock()
        let faults = JournalFaults()
        var runtime = try runtime(directory, clock, faults, entityTypes: [Account.self])
        let account = runtime.entity(Account.self, id: "a")
        try await account.signal(.deposit(10))
        faults.failCommits(1)
        let refused = await signalled(account, .deposit(5))
        guard case .failure(let error) = refused else {
            Issue.record("the signal whose commit failed was acknowledged")
            return
        }
        #expect(error.code == .storage)
        #expect(faults.failed.commits == 1)
        // The state in memory is the committed one, and the entity goes on.
        #expect(try await account.query { $0 } == Account.State(balance: 10, deposits: 1))
        try await account.signal(.deposit(7))
        #expect(try await account.query { $0 } == Account.State(balance: 17, deposits: 2))
        runtime.close()
        runtime = try self.runtime(directory, clock, JournalFaults(), entityTypes: [Account.self])
        defer { runtime.close() }
        #expect(try await runtime.entity(Account.self, id: "a").query { $0 } == Account.State(balance: 17, deposits: 2))
        #expect(try kinds(runtime, account.name).filter { $0 == .signal }.count == 2)
    }

    @Test("a pool activity's outcome whose commit fails keeps its task and is delivered again a second later: the run finishes, the activity ran once")
    func activityOutcomeCommitFails() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let faults = JournalFaults()
        let log = AttemptLog()
        let stub = ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            return "ran:\(label)"
        }
        let runtime = try runtime(directory, clock, faults, activities: [stub])
        defer { runtime.close() }
        faults.failCommits(1) { $0.deletesTask }
        let call = runtime.entity(CallStep.self, id: "c")
        try await call.start(.init(label: "x", options: .init()))
        await runtime.untilIdle()
        #expect(faults.failed.commits == 1)
        // Nothing of the outcome is recorded, and the task is still stored (a crash now runs it again).
        #expect(try !kinds(runtime, call.name).contains(.activityCompleted))
        #expect(try runtime.journal.tasks(prefix: [ActivityTask.keyPrefix]).count == 1)
        clock.advance(by: .seconds(1))
        #expect(try await call.result() == "ran:x")
        #expect(log.all.count == 1, "the outcome was delivered again, not the attempt run again")
        await runtime.untilIdle()
        #expect(try runtime.journal.tasks(prefix: [ActivityTask.keyPrefix]).isEmpty)
    }

    @Test("a timer whose firing commit fails stays due and fires a second later")
    func timerCommitFails() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let faults = JournalFaults()
        let runtime = try runtime(directory, clock, faults, entityTypes: [Nap.self])
        defer { runtime.close() }
        let nap = runtime.entity(Nap.self, id: "n")
        try await nap.start(.seconds(3_600))
        await runtime.untilIdle()
        let key = try #require(try runtime.journal.key(for: nap.name))
        faults.failCommits(1) { $0.appends(to: key) }
        let handed = runtime.core.timers.deliveries
        clock.advance(by: .seconds(3_600))
        // The firing was handed over, its commit failed, and its retry waits on the clock.
        let parked = await Task.detached {
            runtime.core.timers.park(timeout: .seconds(60)) { _ in runtime.core.timers.deliveries > handed && faults.failed.commits == 1 }
        }.value
        #expect(parked != nil)
        await runtime.untilIdle()
        #expect(try !kinds(runtime, nap.name).contains(.timerFired))
        #expect(try runtime.journal.timers().count == 1, "the timer is still stored")
        clock.advance(by: .seconds(1))
        #expect(try await nap.result() == "woke")
        #expect(try runtime.journal.timers().isEmpty)
    }

    @Test("a child's outcome whose delivery commit fails at the parent stays in the outbox and is delivered again a second later")
    func messageCommitFails() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let faults = JournalFaults()
        let runtime = try runtime(directory, clock, faults, entityTypes: [Boss.self, Worker.self, Inbox.self])
        defer { runtime.close() }
        let boss = runtime.entity(Boss.self, id: "boss")
        try await boss.start(.init(children: ["w1"]))
        #expect(try await runtime.entity(Inbox.self, id: "boss-inbox").awaitState { !$0.received.isEmpty }.received == ["started 1"])
        await runtime.untilIdle()
        let key = try #require(try runtime.journal.key(for: boss.name))
        faults.failCommits(1) { $0.appends(to: key) }
        try await runtime.entity(Worker.self, id: "w1").signal(.finish)
        await runtime.untilIdle()
        #expect(faults.failed.commits == 1)
        #expect(try !kinds(runtime, boss.name).contains(.childCompleted))
        #expect(try runtime.journal.tasks(prefix: [EntityEnvelope.keyPrefix]).count == 1, "the outcome is still in the outbox")
        clock.advance(by: .seconds(1))
        #expect(try await boss.result() == ["w1=2"])
        await runtime.untilIdle()
        #expect(try runtime.journal.tasks(prefix: [EntityEnvelope.keyPrefix]).isEmpty)
    }

    @Test("a read that fails while an entity loads is a storage error that passes: the next message loads it again",
          arguments: ["reading metadata", "reading the snapshot", "reading the history"])
    func loadReadFails(_ read: String) async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let faults = JournalFaults()
        var runtime = try runtime(directory, clock, faults, entityTypes: [Account.self, Nap.self])
        try await runtime.entity(Account.self, id: "a").signal(.deposit(10))
        try await runtime.entity(Nap.self, id: "n").start(.seconds(3_600))
        await runtime.untilIdle()
        runtime.close()
        runtime = try self.runtime(directory, clock, faults, entityTypes: [Account.self, Nap.self])
        defer { runtime.close() }
        // An entity without a run body, loaded for a signal.
        let account = runtime.entity(Account.self, id: "a")
        faults.failReads(1) { $0.hasPrefix(read) }
        let refused = await signalled(account, .deposit(5))
        guard case .failure(let error) = refused else {
            Issue.record("the signal whose entity did not load was acknowledged")
            return
        }
        #expect(error.code == .storage, "\(error)")
        #expect(faults.failed.reads == 1)
        try await account.signal(.deposit(7))
        #expect(try await account.query { $0.balance } == 17)
        // An entity with a run body, loaded (replayed) for a query.
        let nap = runtime.entity(Nap.self, id: "n")
        faults.failReads(1) { $0.hasPrefix(read) }
        let queried: Result<Int, EntityError> = await { () async -> Result<Int, EntityError> in
            do throws(EntityError) { return .success(try await nap.query { _ in 1 }) } catch { return .failure(error) }
        }()
        if case .failure(let error) = queried { #expect(error.code == .storage, "\(error)") }
        #expect(faults.failed.reads == 2, "both loads read what failed")
        #expect(try await nap.query { _ in 1 } == 1)
        clock.advance(by: .seconds(3_600))
        #expect(try await nap.result() == "woke")
    }
}

/// MDB_PANIC ("the environment had a fatal error; it must be closed"), acted out by `JournalFaults`:
/// the journal stops rather than keep failing, says so, and the directory reopens with everything
/// acknowledged.
@Suite("A fatal storage failure", .timeLimit(.minutes(10)))
struct FatalStorageTests {
    static let panic = LMDBError(returnCode: -30_795 /* MDB_PANIC */, operation: "mdb_txn_commit", path: "(test)")

    func configuration(_ directory: TemporaryDirectory, _ faults: JournalFaults?) -> EntityRuntime.Configuration {
        var configuration = EntityRuntime.Configuration.quiet(directory, TestClock())
        configuration.journal.faults = faults
        return configuration
    }

    @Test("after MDB_PANIC every later message is refused at once with storage, the runtime reports why, and a reopen has everything acknowledged")
    func panicStopsTheJournal() async throws {
        #expect(Self.panic.code == .panic)
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let faults = JournalFaults()
        let runtime = try EntityRuntime(configuration: configuration(directory, faults), entityTypes: [Account.self])
        let account = runtime.entity(Account.self, id: "a")
        try await account.signal(.deposit(5))
        #expect(runtime.failure == nil)
        faults.failCommits(1, with: Self.panic)
        let first = await #expect(throws: EntityError.self) { try await account.signal(.deposit(7)) }
        #expect(first?.code == .storage)
        // Stopped: the next messages fail without another commit being tried (one fault was injected).
        let later = await #expect(throws: EntityError.self) { try await runtime.entity(Account.self, id: "b").signal(.deposit(1)) }
        #expect(later?.code == .storage)
        #expect(later.map { "\($0)".contains("stopped") } == true, "the error says the journal stopped: \(later.map { "\($0)" } ?? "-")")
        #expect(faults.failed.commits == 1)
        #expect(runtime.failure?.code == .storage)
        #expect((runtime.failure?.underlying as? JournalError)?.underlying is LMDBError)
        runtime.close()

        let reopened = try EntityRuntime(configuration: configuration(directory, nil), entityTypes: [Account.self])
        defer { reopened.close() }
        #expect(reopened.failure == nil)
        #expect(try await reopened.entity(Account.self, id: "a").query { $0 } == Account.State(balance: 5, deposits: 1))
        try await reopened.entity(Account.self, id: "b").signal(.deposit(2))
        #expect(try await reopened.entity(Account.self, id: "b").query(\.balance) == 2)
    }

    @Test("as a Service, the runtime ends its ServiceGroup with the failure once its journal stops")
    func serviceEndsWithTheFailure() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let faults = JournalFaults()
        let runtime = try EntityRuntime(configuration: configuration(directory, faults), entityTypes: [Account.self])
        let group = ServiceGroup(services: [runtime], logger: quietLogger)
        let running = Task { try await group.run() }
        try await runtime.entity(Account.self, id: "a").signal(.deposit(5))
        faults.failCommits(1, with: Self.panic)
        _ = await #expect(throws: EntityError.self) { try await runtime.entity(Account.self, id: "a").signal(.deposit(7)) }
        let ended = await running.result
        guard case .failure(let error) = ended else {
            Issue.record("the service group went on after the journal stopped")
            return
        }
        #expect((error as? EntityError)?.code == .storage, "the group ended with \(error)")
        // The runtime closed on its way out: messages are refused as closed.
        let refused = await #expect(throws: EntityError.self) { try await runtime.entity(Account.self, id: "a").signal(.deposit(1)) }
        #expect(refused?.code == .closed)
    }
}

/// Damage on disk stays with its entity: the entity whose history is damaged fails with a typed
/// error at each message, and every other entity goes on.
@Suite("Damage on disk", .timeLimit(.minutes(10)))
struct DamagedEntityTests {
    @Test("an account whose log lost an event refuses its messages with failedOnReplay naming the damaged event; other accounts go on, before and after a reopen")
    func damagedEntityIsIsolated() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock()
        let configuration = EntityRuntime.Configuration.quiet(directory, clock)
        let position: UInt64
        do {
            let runtime = try EntityRuntime(configuration: configuration, entityTypes: [Account.self])
            let damaged = runtime.entity(Account.self, id: "damaged")
            for amount in 1...4 { try await damaged.signal(.deposit(Int64(amount))) }
            try await runtime.entity(Account.self, id: "healthy").signal(.deposit(10))
            let key = try #require(try runtime.journal.key(for: EntityName(type: "Account", id: "damaged")))
            let tail = try #require(runtime.journal.tails.run(of: key.rawValue), "later signals wait in the log")
            position = try #require(tail.positions.first)
            runtime.close()
        }
        try damageLog(at: position, "missing", directory: directory.path)

        for round in 1...2 {
            let runtime = try EntityRuntime(configuration: configuration, entityTypes: [Account.self])
            defer { runtime.close() }
            let healthy = runtime.entity(Account.self, id: "healthy")
            try await healthy.signal(.deposit(1))
            #expect(try await healthy.query { $0.balance } == 10 + Int64(round))
            for _ in 1...2 {  // refused each time: the load fails again, nothing is written
                do {
                    try await runtime.entity(Account.self, id: "damaged").signal(.deposit(100))
                    Issue.record("round \(round): a signal to the damaged account was acknowledged")
                } catch {
                    #expect(error.code == .failedOnReplay, "round \(round): \(error)")
                    #expect("\(error)".contains("corruptedRecord entity Account/damaged sequence 2"), "round \(round): \(error)")
                }
            }
        }
    }
}
