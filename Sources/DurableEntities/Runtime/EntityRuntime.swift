import Foundation
import LMDB
import Logging

/// The runtime a service embeds: one LMDB directory, its entity types, and the sharded scheduler that
/// runs their turns.
///
/// ## Usage
/// ```swift
/// let runtime = try EntityRuntime(configuration: .init(directory: "./data"))
/// let alice = runtime.entity(Account.self, id: "alice")
/// try await alice.signal(.deposit(100))                   // returns once durable
/// let balance = try await alice.query { $0.balance }       // reads committed state
/// runtime.close()
/// ```
public final class EntityRuntime: Sendable {
    /// Options for a runtime.
    public struct Configuration: Sendable {
        /// The LMDB directory.
        public var directory: String
        /// `durable` (fsync per commit) or `relaxed` (acknowledges before fsync, survives a process crash only).
        public var durability: Environment.Durability
        /// How many shards (threads running turns). Default: one per core.
        public var shards: Int
        /// The most messages one turn takes from an entity's mailbox.
        public var maxMessagesPerTurn: Int
        /// The most senders' messages an entity's mailbox holds; further senders wait (suspended, their
        /// message neither dropped nor queued) until a turn makes room.
        public var mailboxCapacity: Int
        /// Entities whose run body finished leave memory right after the commit that records it (their
        /// outcome and state stay on disk, and queries and `result` activate them again).
        public var passivateFinishedRuns: Bool
        /// A snapshot is written after this many events since the last one.
        public var snapshotEvery: Int
        /// Past this many resident entities, idle ones are passivated (oldest first).
        public var maxResidentEntities: Int
        /// Entities idle this long leave memory (checked every quarter of it); `nil`: only the bound.
        public var passivateAfterIdle: Duration?
        /// How long the result of a signal or update sent with an idempotency key is kept: a resend
        /// with the same key within this time is recognised (a signal is not applied twice, an update
        /// returns its first result); after it, the key is forgotten and a resend is a new message.
        /// Results are swept every 24th of it (at least every second, at most every hour), so one
        /// lives at most that much longer. `nil` keeps them for ever. Default: 7 days.
        public var idempotencyRetention: Duration?
        /// The largest encoded message accepted.
        public var maxPayloadBytes: Int
        /// An entity continues as new (snapshot into a new run) once its current run has this many events.
        public var continueAsNewAfterEvents: Int
        /// … or this many bytes of events since it was activated.
        public var continueAsNewAfterBytes: Int
        /// How many finished runs keep their history after continue-as-new: 1 (the default) keeps the
        /// previous run's, 0 keeps none.
        public var keepRuns: Int
        /// The most activity attempts running at once, counting those that await I/O; more wait in
        /// the pool's queue. Attempts that compute run on at most one thread per processor whatever
        /// this is, so it bounds how many calls can be outstanding at once (to a gateway, a database).
        public var maxConcurrentActivities: Int
        /// How long ``EntityRuntime/close()`` lets running activity attempts finish before it cancels
        /// them (an attempt that ignores cancellation is abandoned a second later; its task runs again
        /// at the next open).
        public var activityGracePeriod: Duration
        /// The least time between two stores of a pool attempt's heartbeat details (the first is
        /// stored at once): what a crash may lose of an attempt's progress. See
        /// ``ActivityContext/heartbeat(_:)``. Default 1 s.
        public var activityHeartbeatStoreInterval: Duration = .seconds(1)
        /// How long a close waits for cancelled activity attempts to end before it abandons them
        /// (1 s; tests on a loaded machine lengthen it).
        var activityCancellationWait: Duration = .seconds(1)
        /// Added to every metric the runtime records (after the metric's own dimensions), e.g.
        /// `[("runtime", "orders")]` when a process runs more than one runtime, so that their figures
        /// stay apart. Empty by default. The journal takes them too unless its own are set
        /// (``Journal/Configuration/metricsDimensions``).
        public var metricsDimensions: [(String, String)] = []
        /// How states and messages become bytes. The default, ``BinaryEntityCodec``, is a compact keyed
        /// binary format (3–11× faster than JSON here) that also reads JSON-encoded histories.
        public var codec: any EntityCodec
        /// The time recorded in history events.
        public var clock: any EntityClock
        /// Options passed to the journal (its directory and durability are taken from above).
        public var journal: Journal.Configuration
        public var logger: Logger

        public init(
            directory: String,
            durability: Environment.Durability = .durable,
            shards: Int = ProcessInfo.processInfo.activeProcessorCount,
            maxMessagesPerTurn: Int = 256,
            mailboxCapacity: Int = 1_024,
            passivateFinishedRuns: Bool = true,
            snapshotEvery: Int = 100,
            maxResidentEntities: Int = 100_000,
            passivateAfterIdle: Duration? = .seconds(300),
            idempotencyRetention: Duration? = .seconds(7 * 24 * 3_600),
            maxPayloadBytes: Int = 1 << 20,
            continueAsNewAfterEvents: Int = 1_000,
            continueAsNewAfterBytes: Int = 4 << 20,
            keepRuns: Int = 1,
            maxConcurrentActivities: Int = 64,
            activityGracePeriod: Duration = .seconds(5),
            codec: any EntityCodec = BinaryEntityCodec(),
            clock: any EntityClock = SystemEntityClock(),
            logger: Logger = Logger(label: "DurableEntities")
        ) {
            self.directory = directory
            self.durability = durability
            self.shards = shards
            self.maxMessagesPerTurn = maxMessagesPerTurn
            self.mailboxCapacity = max(1, mailboxCapacity)
            self.passivateFinishedRuns = passivateFinishedRuns
            self.snapshotEvery = snapshotEvery
            self.maxResidentEntities = maxResidentEntities
            self.passivateAfterIdle = passivateAfterIdle
            self.idempotencyRetention = idempotencyRetention
            self.maxPayloadBytes = maxPayloadBytes
            self.continueAsNewAfterEvents = continueAsNewAfterEvents
            self.continueAsNewAfterBytes = continueAsNewAfterBytes
            self.keepRuns = keepRuns
            self.maxConcurrentActivities = maxConcurrentActivities
            self.activityGracePeriod = activityGracePeriod
            self.codec = codec
            self.clock = clock
            self.journal = Journal.Configuration(directory: directory, durability: durability, logger: logger)
            self.logger = logger
        }
    }

    let core: RuntimeCore

    /// Opens the runtime on `configuration.directory`.
    /// - Parameter entityTypes: types to register now (``entity(_:id:)`` registers others on first use).
    /// - Throws: ``EntityError`` with code `storage` when the journal cannot open.
    /// - Parameter activities: activities to register now (``register(activity:)`` registers others).
    public init(configuration: Configuration, entityTypes: [any EntityWorkflow.Type] = [],
                activities: [any Activity] = []) throws(EntityError) {
        var journalConfiguration = configuration.journal
        journalConfiguration.directory = configuration.directory
        journalConfiguration.durability = configuration.durability
        if journalConfiguration.taskOwner == nil { journalConfiguration.taskOwner = Self.taskOwner }
        if journalConfiguration.metricsDimensions.isEmpty { journalConfiguration.metricsDimensions = configuration.metricsDimensions }
        let journal: Journal
        do {
            journal = try Journal(configuration: journalConfiguration)
        } catch {
            throw EntityError(.storage, entity: nil, "the journal in '\(configuration.directory)' did not open", underlying: error)
        }
        core = RuntimeCore(journal: journal, configuration: configuration)
        for type in entityTypes { register(type) }
        for activity in activities { register(activity: activity) }
        // Recovery: the timer service fires what fell due while the process was down, and stored
        // activity tasks run again; that activates just those entities, idle ones stay on disk.
        core.timers.start(core: core)
        core.activities.recover()
        core.recoverOutbox()
        if let idle = configuration.passivateAfterIdle { core.schedulePassivation(after: idle) }
        if let retention = configuration.idempotencyRetention { core.scheduleResultExpiry(after: retention) }
    }

    /// The ids of the entities of type `W` in this directory, in the order of their UTF-8 bytes: at
    /// most `limit`, those after `after` (all when `nil`). An entity is listed from its first
    /// acknowledged message on, terminated ones included; one only queried is not. Page through by
    /// passing a page's last id as the next `after`:
    ///
    /// ```swift
    /// var after: String?
    /// repeat {
    ///     let page = try runtime.entityIDs(of: Account.self, after: after, limit: 500)
    ///     for id in page { audit(try await runtime.entity(Account.self, id: id).query { $0 }) }
    ///     after = page.last
    /// } while after != nil
    /// ```
    /// - Throws: ``EntityError`` `invalidArgument` for a `limit` under 1; `storage` if the read fails.
    public func entityIDs<W: EntityWorkflow>(of type: W.Type, after: String? = nil, limit: Int = 1_000) throws(EntityError) -> [String] {
        guard limit >= 1 else { throw EntityError(.invalidArgument, entity: nil, "the limit must be 1 or more (got \(limit))") }
        do {
            return try core.journal.names(ofType: W.entityType, after: after, limit: limit).map(\.id)
        } catch {
            switch error.code {
            case .nameTooLong: throw EntityError(.invalidArgument, entity: nil, error.message, underlying: error)
            default: throw EntityError(.storage, entity: nil, "listing the entities of \(W.entityType) failed", underlying: error)
            }
        }
    }

    /// Why the runtime can no longer record anything, or `nil` while it can: its journal stopped
    /// after a fatal storage failure (LMDB's MDB_PANIC, see ``Journal/stopReason``). Every message is
    /// then refused with `storage` at once; what was acknowledged stays. Close the runtime and open it
    /// again, or restart the process: the open recovers. As a `Service`, the runtime's `run()`
    /// throws this failure, so its `ServiceGroup` ends.
    public var failure: EntityError? { core.journal.stopReason.map(Self.failure) }

    static func failure(_ stopped: JournalError) -> EntityError {
        EntityError(.storage, entity: nil, stopped.message, underlying: stopped)
    }

    /// Deletes now the idempotency results recorded more than `age` ago (default: the configured
    /// ``Configuration/idempotencyRetention``; with neither, nothing). The runtime also does this on
    /// its own. A signal or update resent later with one of those keys is applied as a new message.
    /// - Returns: how many results were deleted.
    /// - Throws: ``EntityError`` `storage` when a commit fails (results deleted before it stay deleted).
    @discardableResult
    public func expireIdempotencyResults(olderThan age: Duration? = nil) async throws(EntityError) -> Int {
        guard let age = age ?? core.configuration.idempotencyRetention else { return 0 }
        let cutoff = core.time(ago: age)
        let result = await withUnsafeContinuation { (continuation: UnsafeContinuation<Result<Int, JournalError>, Never>) in
            core.expireResults(recordedBefore: cutoff) { continuation.resume(returning: $0) }
        }
        switch result {
        case .success(let count): return count
        case .failure(let error):
            throw EntityError(.storage, entity: nil, "expiring idempotency results failed", underlying: error)
        }
    }

    /// Passivates now every entity idle for at least `idle` (the runtime also does it on its own,
    /// per ``Configuration/passivateAfterIdle``). Returns how many left memory.
    @discardableResult
    public func passivateIdleEntities(idleFor idle: Duration = .zero) -> Int {
        let now = core.clock.nowNanoseconds()
        return core.passivateIdle(activeBefore: now > idle.nanoseconds ? now - idle.nanoseconds + 1 : 0)
    }

    /// Registers an activity under its type's ``Activity/name``; replaces one of the same name.
    /// Register activities before (or when) opening, so that recovered tasks find them.
    public func register(activity: some Activity) {
        core.activities.register(activity)
    }

    /// Registers an entity type (idempotent).
    public func register(_ type: any EntityWorkflow.Type) {
        func open<W: EntityWorkflow>(_ type: W.Type) -> String? {
            core.types.withLock { types in
                guard types[W.entityType] == nil else { return nil }
                types[W.entityType] = Registered<W>()
                return W.entityType
            }
        }
        // Work that fell due for this type before it was registered (after a restart) proceeds now.
        if let added = open(type) {
            core.activities.entityTypeRegistered(added)
            core.deliverParkedMessages(to: added)
            core.deliverParkedRepairs(to: added)
            core.timers.retryUndelivered()
        }
    }

    /// A reference to the entity `id` of type `W`; registers `W` if needed. Cheap: no I/O.
    public func entity<W: EntityWorkflow>(_ type: W.Type, id: String) -> EntityRef<W> {
        register(type)
        return EntityRef(id: id, runtime: self)
    }

    /// Signals an entity from an encoded payload (for gateways that receive bytes).
    /// - Throws: ``EntityError`` `unknownEntityType`, `undecodablePayload`, `payloadTooLarge`,
    ///   `rejected`, `terminated`; nothing is recorded for any of them.
    public func signal(entityType: String, id: String, payload: [UInt8], idempotencyKey: String? = nil) async throws(EntityError) {
        guard let registered = core.types.withLock({ $0[entityType] }) else {
            throw EntityError(.unknownEntityType, entity: EntityName(type: entityType, id: id),
                              "no entity type '\(entityType)' is registered; nothing was recorded")
        }
        try await registered.signal(id: id, payload: payload, idempotencyKey: idempotencyKey, runtime: self)
    }

    /// Exports an entity's current run (its start state and events) for ``ExportedHistory/replay(as:codec:logger:)``.
    /// - Throws: ``EntityError`` `storage` when the journal cannot be read; `rejected` when the entity
    ///   has no history.
    public func exportHistory(of name: EntityName) throws(EntityError) -> ExportedHistory {
        let journal = core.journal
        do {
            guard let key = try journal.key(for: name), let metadata = try journal.metadata(of: key) else {
                throw EntityError(.rejected, entity: name, "the entity has no history")
            }
            var startState: String?
            if metadata.runStartSequence > 1, let snapshot = try journal.snapshot(of: key), snapshot.sequence == metadata.runStartSequence - 1 {
                startState = Base64.encode(snapshot.payload)
            }
            var events: [ExportedHistory.Event] = []
            try journal.forEachEvent(of: key, from: metadata.runStartSequence) { sequence, payload in
                guard let event = HistoryEvent.decode(payload) else {
                    throw EntityError(.failedOnReplay, entity: name, sequence: sequence, "the event is not a history event this runtime knows")
                }
                events.append(.init(sequence: sequence, kind: event.kind, timeNanoseconds: event.timeNanoseconds,
                                    idempotencyKey: event.idempotencyKey, body: Base64.encode(event.body)))
            }
            return ExportedHistory(entityType: name.type, entityID: name.id, run: metadata.run, startState: startState, events: events)
        } catch let error as EntityError {
            throw error
        } catch {
            throw EntityError(.storage, entity: name, "reading the entity's history failed", underlying: error)
        }
    }

    /// What the entity `name` is doing now, read from what is committed: its run's status and what the
    /// run waits for — activities with their retry state (attempt, last failure, next attempt, last
    /// heartbeat), timers, child entities. See ``EntityDescription``. Reads the journal on the calling
    /// thread (like ``exportHistory(of:)``); the entity is neither activated nor sent anything.
    /// - Returns: `nil` for an entity that has no acknowledged message.
    /// - Throws: ``EntityError`` `storage` when the journal cannot be read; `failedOnReplay` for an
    ///   event this runtime does not know; `undecodablePayload` for one that does not parse.
    public func describe(_ name: EntityName) throws(EntityError) -> EntityDescription? {
        let journal = core.journal
        let key: EntityKey
        var tasks: [UInt64: ActivityTask] = [:]
        let cancelRequested: Set<UInt64>
        let paused: Set<UInt64>
        do {
            guard let found = try journal.key(for: name) else { return nil }
            key = found
            // The stored tasks before the events (see EntityDescription): an outcome committed between
            // the two reads shows as an activity no longer pending, never as one without its task.
            for row in try journal.tasks(prefix: ActivityTask.keyPrefix(entity: key.rawValue)) where row.isIntact {
                guard let task = ActivityTask.decode(row.value) else { continue }
                tasks[task.activityID] = task
            }
            /// The activities that the entity's intact rows under `keys` (of the shape `prefix`) name.
            func activities(_ keys: [UInt8], _ prefix: UInt8) throws(JournalError) -> Set<UInt64> {
                Set(ActivityTask.ids(in: try journal.tasks(prefix: keys).filter(\.isIntact), prefix: prefix).map(\.activityID))
            }
            cancelRequested = try activities(ActivityTask.cancelKeyPrefix(entity: key.rawValue), ActivityTask.cancelKeyPrefix)
            paused = try activities(ActivityTask.pauseKeyPrefix(entity: key.rawValue), ActivityTask.pauseKeyPrefix)
        } catch {
            throw EntityError(.storage, entity: name, "reading the entity's tasks failed", underlying: error)
        }
        let history: ExportedHistory
        do {
            history = try exportHistory(of: name)
        } catch {
            if error.code == .rejected { return nil }  // registered, nothing committed with it
            throw error
        }
        let worker = core.activities
        return try EntityDescription(
            history: history, tasks: tasks.filter { $0.value.run == history.run }, cancelRequested: cancelRequested, paused: paused,
            live: { ids in worker.progress(entity: key.rawValue, activities: ids) }, now: core.clock.nowNanoseconds())
    }

    /// How many entities are in memory now.
    public var residentEntities: Int { core.residentCount }

    /// The journal underneath (for inspection and tools).
    public var journal: Journal { core.journal }

    /// Waits until the runtime has nothing in flight — turns, commits, activity attempts and their
    /// retries being stored, outcomes on their way — without holding a thread of the cooperative pool.
    /// For tests: once something a test awaits has happened (an activity's attempt was seen to
    /// fail), what follows from it (its retry stored) is done when this returns. A timer that fell
    /// due on a ``TestClock`` move may not have been handed over yet: await what it causes instead.
    @_spi(Testing)
    public func waitUntilIdle() async {
        _ = await Task.detached { [core] in core.waitUntilIdle() }.value
    }

    /// Drops the runtime as a crash would: messages not yet committed are lost (their senders get an
    /// error, never an acknowledgement), nothing acknowledged is. The directory can then be opened
    /// again in the same process. Activity attempts still running go on in this process (their code
    /// cannot be stopped from outside), but their outcomes are dropped: their tasks run again at the
    /// next open, as after a real crash, and the runtime may be released at once. For recovery
    /// tests (see `DurableEntitiesTesting`).
    @_spi(Testing)
    public func simulateCrash() {
        guard !core.closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        core.journal.abandon()
        core.failAllWatches()
        core.timers.stop()
        core.activities.abandon()  // attempts still running go on in this process: their outcomes are dropped
        for shard in core.shards { shard.stop() }
    }

    /// Stops accepting messages, finishes every turn already queued or in flight (their senders get
    /// their answers), and closes the journal. Blocks until then.
    ///
    /// Activity attempts: none starts from now on (queued ones stay stored for the next open).
    /// Running ones get ``Configuration/activityGracePeriod`` to finish — their outcomes are recorded
    /// as usual — and are then cancelled; an attempt still running a second after that is abandoned:
    /// its outcome is dropped, and its task runs again, with the same idempotency key, at the next
    /// open. So a payment call that never answers delays a close by the grace period, not forever.
    ///
    /// It blocks the calling thread: from async code, prefer ``shutdown()``, which waits without
    /// holding a thread of the cooperative pool (activities need one to finish or to see their
    /// cancellation).
    public func close() {
        guard !core.closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        core.timers.stop()
        core.runners.close()
        core.activities.close(gracePeriod: core.configuration.activityGracePeriod) { [core] deadline in
            core.waitUntilIdle(deadline: deadline)
        }
        // Turns still queued or in flight finish; abandoned attempts are not waited for.
        core.waitUntilIdle(excluding: { [core] in core.activities.runningAttempts })
        core.failAllWatches()
        let busy = core.releaseResidentCells()
        if busy > 0 { core.logger.warning("entities still busy left memory at close", metadata: ["entities": "\(busy)"]) }
        for shard in core.shards { shard.stop() }
        core.journal.close()
    }
}
