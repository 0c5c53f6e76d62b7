import DequeModule
import Logging
import Synchronization

/// A reply that carries no value (signals, starts, timers, …).
typealias VoidReply = @Sendable (Result<Void, EntityError>) -> Void
/// A reply that carries a value of the entity type (an update's result, the state, the run's output),
/// as `any Sendable`: the typed caller (``EntityRef``) casts it back.
typealias ValueReply = @Sendable (Result<any Sendable, EntityError>) -> Void

/// A message in an entity's mailbox.
///
/// Not generic, like every type the turn loop handles: the entity type's own values (signal, update,
/// input) travel as `any Sendable` and only the cell, which knows the type, casts them. In a generic
/// class every nested or parameterised type costs a metadata lookup in a global hash table each time
/// a function touches it (the cell's code is not specialised: entity types live in user modules);
/// those lookups were 28–31% of all CPU in `entity-signals` before the turn loop's types lost `W`.
enum CellMessage: Sendable {
    case signal(any Sendable, bytes: [UInt8], key: String?, reply: VoidReply)
    case update(any Sendable, bytes: [UInt8], key: String?, reply: ValueReply)
    case read(ValueReply)
    case terminate(reason: String, reply: VoidReply)
    case start(any Sendable, bytes: [UInt8], reply: VoidReply)
    case result(ValueReply)
    /// `start`, then `result`: the reply gets the run's outcome.
    case execute(any Sendable, bytes: [UInt8], reply: ValueReply)
    case timerFired(id: UInt64, due: UInt64, reply: VoidReply)
    case cancel(reply: VoidReply)
    case activityOutcome(id: UInt64, Result<[UInt8], ActivityFailure>, ActivityAttempt, reply: VoidReply)
    /// A message from another entity, with its outbox row (consumed in this entity's commit).
    case envelope(EntityEnvelope, key: TaskKey, reply: VoidReply)
    /// A row whose key names this entity failed its check: the turn stores again every row the
    /// entity's run is owed (see ``OwedRows``), and the reply says (`Bool`) whether the damaged row
    /// was one of them — then it is replaced, or deleted when its key was damaged too.
    case repair(DamagedRow, reply: ValueReply)

    /// `result` or `execute`: answered by a finished run's outcome alone.
    var asksForOutcome: Bool {
        switch self {
        case .result, .execute: true
        default: false
        }
    }
}

/// A stored row that failed its check (damaged on disk), as its key names it: the key may be
/// damaged too, so only the entity it names can say whether the row is one it is owed.
enum DamagedRow: Sendable, Equatable {
    /// A timer of the entity's run body (a retry timer is its activity task's, see ``ActivityWorker``).
    case timer(id: UInt64, due: UInt64)
    /// The stored task of an activity the run awaits.
    case task(activity: UInt64)
}

/// Rows that an entity's run is owed — a timer row for every timer its history started and did not
/// end, a stored task for every pool activity it awaits (with its cancellation request, if the run
/// made one) — and that the journal lacks or holds damaged.
/// Found when the entity loads (and on a ``CellMessage/repair(_:reply:)``); its next commit stores
/// them again, so a row lost or damaged on disk costs a log line, not a run that never wakes.
struct OwedRows {
    var timers: [(id: UInt64, due: UInt64)] = []
    /// Rebuilt from the `activityScheduled` events: the first attempt again (the attempts made are
    /// lost with the row), scheduled when the history says (schedule-to-close still holds).
    var tasks: [ActivityTask] = []
    /// Those of `tasks`, and of the stored tasks, whose cancellation the run requested and whose
    /// cancellation row is missing: stored again (with the task), and carried out.
    var cancelRequests: [UInt64] = []
}

/// Whether an entity accepts messages.
enum EntityStatus: UInt8, Sendable {
    case active = 0
    case terminated = 1
}

/// What is durable about an entity, as of its last committed turn.
struct EntityDurable: Sendable {
    /// The entity type's `State`.
    var state: any Sendable
    var key: EntityKey?
    var lastSequence: UInt64
    var snapshotSequence: UInt64
    var status: EntityStatus
    /// The current run and the sequence of its first event.
    var run: UInt64 = 1
    var runStartSequence: UInt64 = 1
    /// Bytes of events in the current run since activation (for the automatic continue-as-new).
    var runBytes = 0
    /// The run body's live execution (a ``WorkflowRun`` of the entity type), once started in this run.
    var workflow: AnyWorkflowRun?
    /// The parents that started this run as their child: each gets the run's outcome.
    var parents: [ParentLink] = []
}

/// A caller waiting for the committed state to satisfy a predicate (``EntityRef/awaitState``).
struct CellStateWatch: Sendable {
    let id: UInt64
    /// Called with the entity type's `State`.
    let predicate: @Sendable (any Sendable) -> Bool
    let resume: ValueReply
}

/// A reply held back until the turn's outcome is known.
enum TurnReply: Sendable {
    case signal(VoidReply)
    case update(ValueReply, any Sendable)
    case failed(@Sendable () -> Void)
    case done(@Sendable () -> Void)
    /// An `execute` whose start the turn made (or found made): once the commit is durable it waits
    /// for the run's outcome like a `result` (answered at once if the run has finished); a failed
    /// commit fails it.
    case execute(ValueReply)

    var isExecute: Bool {
        if case .execute = self { true } else { false }
    }

    static func fail(_ message: CellMessage, _ error: EntityError) -> TurnReply {
        switch message {
        case .signal(_, _, _, let reply), .terminate(_, let reply), .start(_, _, let reply), .timerFired(_, _, let reply),
             .cancel(let reply), .activityOutcome(_, _, _, let reply), .envelope(_, _, let reply):
            .failed { reply(.failure(error)) }
        case .update(_, _, _, let reply), .read(let reply), .result(let reply), .execute(_, _, let reply), .repair(_, let reply):
            .failed { reply(.failure(error)) }
        }
    }
}

/// An idempotency key with its kind.
struct IdempotencyKeyName: Hashable {
    let key: String
    let kind: RuntimeCore.KeyKind
}

/// The cell's mutable side, under its lock.
struct CellState {
    /// Callers waiting for the committed state to satisfy their predicates.
    var watches: [CellStateWatch] = []
    /// The mailbox: at most `mailboxCapacity` messages from senders (system messages — timers,
    /// activity outcomes, reads — are never held back).
    var messages = Deque<CellMessage>()
    /// Senders' messages waiting for room in the mailbox, in arrival order: the sender awaits (its
    /// message is neither dropped nor queued for a turn) until a turn takes messages out.
    var waiting = Deque<CellMessage>()
    var scheduled = false
    var inFlight = false
    var evicted = false
    /// `nil` until the entity is loaded, and again after a failed commit.
    var durable: EntityDurable?
    var failure: EntityError?
    /// Callers awaiting the run body's result.
    var resultWaiters: [ValueReply] = []
    /// When a turn last finished (ns on the runtime's clock), for passivation by idle time.
    var lastActive: UInt64 = 0
    /// Whether the run has children that have not reported (as of the last committed turn).
    var awaitsChildren = false
    /// How many turns have started: a load done off the shard is installed only if none started
    /// meanwhile (``EntityCell/activateForRead()``).
    var turnsStarted: UInt64 = 0
}

/// What a turn produced besides events.
struct TurnOutput {
    /// The turn's events, in one buffer.
    var events: JournalEvents
    var keys: [IdempotencyKeyName: [UInt8]] = [:]
    var timersStarted: [(id: UInt64, due: UInt64)] = []
    var timersDone: [(id: UInt64, due: UInt64)] = []
    var resultWaiters: [ValueReply] = []
    var activitiesScheduled: [(id: UInt64, name: String, input: [UInt8], options: ActivityOptions)] = []
    var now: UInt64 = 0
    var tasksDone: [TaskKey] = []
    /// Activities the run stopped awaiting without their outcome (its wait was cancelled, the entity
    /// terminated, the run continued as new): their stored tasks are deleted, so no attempt of them
    /// starts again (a retry stored later does not bring them back, see ``JournalBatch/replaceTask(_:value:)``).
    var activitiesGivenUp: [UInt64] = []
    /// Activities whose cancellation the run requested while it goes on waiting for their outcome
    /// (``ActivityCancellationType/waitCancellationCompleted``): a cancellation row is stored for each
    /// (``ActivityTask/cancelKey(entity:activity:)``), and once the commit is durable the worker stops
    /// them (``ActivityWorker/requestCancel(entity:_:)``).
    var activityCancelRequests: [UInt64] = []
    /// Messages to other entities, sent once the turn is durable.
    var outgoing: [EntityEnvelope] = []
    /// The run body continued as new in this turn: the last run ended at `boundary` with `state`
    /// (the new run's snapshot, the entity type's `State`); `previousRunStart` is where that ended run began.
    var runSwitch: (boundary: UInt64, state: any Sendable, previousRunStart: UInt64)?
    /// Local activities whose attempt failed inside the turn: their next attempts (stored with a retry timer).
    var localRetries: [ActivityTask] = []
    /// Local activities still running when the turn ended: stored as tasks; their outcomes are
    /// carried out once the commit is done.
    var localDetached: [(ActivityTask, TurnRunner)] = []
    /// Tasks of awaited activities stored again (see ``OwedRows``): stored and dispatched like new ones.
    var tasksRestored: [ActivityTask] = []
}

/// The runtime's in-memory side of one entity: its mailbox, its committed state and, for an entity
/// type with a run body, the body's live execution.
///
/// Messages queue in the mailbox; the shards run *turns* (whichever shard thread is free takes the
/// oldest queued entity, see ``ReadyQueue``). A turn works on a copy of the committed state, applies up to `maxMessagesPerTurn`
/// messages — recording each input, then letting the run body go as far as it can and recording the
/// commands it issued — and hands the events to the journal's group commit. Only when that commit is
/// durable does the copy become the committed state and are the senders acknowledged. If it fails,
/// the senders get the error and the entity reloads from its history (the run body is abandoned and
/// replayed). One turn per entity is in flight at a time, so history order is mailbox order; other
/// entities keep running meanwhile.
///
/// `@unchecked Sendable`: all mutable state is inside `cell` (a `Mutex`); turns run on a shard's
/// thread, one at a time, and so does the run body (its executor is drained there).
final class EntityCell<W: EntityWorkflow>: ShardWork, @unchecked Sendable {
    typealias Message = CellMessage
    typealias Durable = EntityDurable
    typealias Status = EntityStatus
    typealias StateWatch = CellStateWatch
    typealias State = CellState
    typealias Reply = TurnReply
    typealias KeyName = IdempotencyKeyName

    /// The entity's run body, typed (``EntityDurable`` holds it as its non-generic base).
    @inline(__always)
    static func run(_ durable: EntityDurable) -> WorkflowRun<W>? {
        guard let run = durable.workflow else { return nil }
        return unsafeDowncast(run, to: WorkflowRun<W>.self)
    }

    let name: EntityName
    let core: RuntimeCore
    /// The entity's home shard: the one its name hashes to, whose table holds it while resident.
    /// Its turns go to the queue all shards share and run on whichever shard thread is free.
    let shard: Shard
    let cell = Mutex(State())

    init(name: EntityName, core: RuntimeCore, shard: Shard) {
        self.name = name
        self.core = core
        self.shard = shard
    }

    // MARK: Any thread

    /// Queues a message. Returns `false` if the cell was passivated meanwhile (ask the runtime for the
    /// entity again).
    /// - Parameter bounded: a sender's message: when the mailbox is full it waits for room (the sender
    ///   stays suspended) instead of joining the mailbox.
    func enqueue(_ message: Message, bounded: Bool = false) -> Bool {
        let capacity = core.configuration.mailboxCapacity
        let schedule = cell.withLock { state -> Bool? in
            guard !state.evicted else { return nil }
            if bounded, state.messages.count >= capacity || !state.waiting.isEmpty {
                state.waiting.append(message)
                return false
            }
            state.messages.append(message)
            guard !state.scheduled, !state.inFlight else { return false }
            state.scheduled = true
            return true
        }
        guard let schedule else { return false }
        if schedule {
            core.becameBusy()
            shard.schedule(self)
        }
        return true
    }

    // MARK: State watches

    /// Registers `watch`, or resolves it at once when the committed state already decides it. Returns
    /// `false` if the cell was passivated meanwhile (ask the runtime for the entity again).
    func watch(_ watch: StateWatch) -> Bool {
        let registered = cell.withLock { state -> (decided: [(StateWatch, Result<any Sendable, EntityError>)], load: Bool)? in
            guard !state.evicted else { return nil }
            state.watches.append(watch)
            return (Self.takeDecidedWatches(&state, name: name), state.durable == nil && state.failure == nil)
        }
        guard let registered else { return false }
        for (decided, result) in registered.decided { decided.resume(result) }
        // Not loaded: a read activates the entity, and its turn checks the watch.
        if registered.load { _ = enqueue(.read { _ in }) }
        return true
    }

    /// How many state watches wait (for tests and tools).
    var watchCount: Int { cell.withLock { $0.watches.count } }

    /// Removes a watch that is still waiting; returns whether it was.
    func unwatch(_ id: UInt64) -> Bool {
        cell.withLock { state in
            guard let index = state.watches.firstIndex(where: { $0.id == id }) else { return false }
            state.watches.remove(at: index)
            return true
        }
    }

    /// Ends every waiting watch with `error`, and every caller waiting for the run's result with
    /// `closed` (the runtime is closing: the run goes on at the next open, not in this runtime).
    func failWatches(_ error: EntityError) {
        let (watches, waiters) = cell.withLock { state in
            defer { state.watches = []; state.resultWaiters = [] }
            return (state.watches, state.resultWaiters)
        }
        for watch in watches { watch.resume(.failure(error)) }
        let closed = EntityError(.closed, entity: name, "the runtime closed before the run body finished; it goes on at the next open")
        for waiter in waiters { waiter(.failure(closed)) }
    }

    /// The watches the state now decides, removed from the cell: satisfied ones with the state, all of
    /// them with an error once the entity is terminated or failed to load. Called under the cell's lock.
    private static func takeDecidedWatches(_ state: inout State, name: EntityName) -> [(StateWatch, Result<any Sendable, EntityError>)] {
        guard !state.watches.isEmpty else { return [] }
        let error: EntityError?
        if let failure = state.failure {
            error = failure
        } else if let durable = state.durable {
            error = durable.status == .terminated ? EntityError(.terminated, entity: name, "the entity was terminated") : nil
        } else {
            return []
        }
        var decided: [(StateWatch, Result<any Sendable, EntityError>)] = []
        state.watches.removeAll { watch in
            if let error {
                decided.append((watch, .failure(error)))
                return true
            }
            guard let current = state.durable?.state, watch.predicate(current) else { return false }
            decided.append((watch, .success(current)))
            return true
        }
        return decided
    }

    /// How many messages the mailbox holds, and how many senders wait for room (for tests and tools).
    func mailboxCounts() -> (queued: Int, waiting: Int) {
        cell.withLock { ($0.messages.count, $0.waiting.count) }
    }

    /// The committed state, if the entity is loaded and active (the fast path for queries).
    func committedState() -> W.State? {
        let committed = cell.withLock { state -> (any Sendable)? in
            guard let durable = state.durable, durable.status == .active, state.failure == nil else { return nil }
            return durable.state
        }
        return committed.map { $0 as! W.State }
    }

    /// Activates an entity without a run body on the calling thread, for a query: loads its snapshot
    /// and the events after it, and installs the result as the committed state — unless a turn started
    /// meanwhile or the entity is busy, failed or not idle, in which case it returns `nil` and the
    /// caller takes the mailbox (the shard's turn loads the entity and reports any failure).
    ///
    /// Reading is all an activation does for such an entity (no run body to restart), and the journal
    /// changes only through the entity's own turns, so a load that no turn overlapped is exactly what
    /// the shard would have loaded — without two thread hand-offs on the way.
    func activateForRead() -> W.State? {
        guard !W.hasRunBody else { return nil }
        let generation = cell.withLock { state -> UInt64? in
            guard !state.evicted, state.durable == nil, state.failure == nil, !state.inFlight, !state.scheduled,
                  state.messages.isEmpty else { return nil }
            return state.turnsStarted
        }
        guard let generation, let loaded = try? load(key: lookUpKey()).durable else { return nil }
        let now = core.clock.nowNanoseconds()
        var decided: [(StateWatch, Result<any Sendable, EntityError>)] = []
        let installed = cell.withLock { state -> Bool in
            guard state.turnsStarted == generation, !state.evicted, state.durable == nil, state.failure == nil,
                  !state.inFlight else { return false }
            state.durable = loaded
            state.lastActive = now
            decided = Self.takeDecidedWatches(&state, name: name)
            return true
        }
        for (watch, result) in decided { watch.resume(result) }
        guard installed else { return committedState() }
        return loaded.status == .active ? (loaded.state as! W.State) : nil
    }

    /// The outcome of a finished run read from the journal, without activating the entity: the answer
    /// to `result()` when the entity is not in memory (finished runs leave it at once, see
    /// ``EntityRuntime/Configuration/passivateFinishedRuns``) and its history's last event is the
    /// run's `completed`, `failed` or `cancelled`. A finished run's outcome is final — nothing a later turn does
    /// changes it — so this read cannot be stale. `nil`: ask the entity (anything else, or a read error).
    func finishedOutcome() -> Result<any Sendable, EntityError>? {
        let idle = cell.withLock { $0.durable == nil && $0.failure == nil && !$0.inFlight && $0.messages.isEmpty }
        return idle ? Self.finishedOutcome(of: name, core: core) : nil
    }

    /// ``finishedOutcome()`` of an entity that has no cell in memory.
    static func finishedOutcome(of name: EntityName, core: RuntimeCore) -> Result<any Sendable, EntityError>? {
        guard W.hasRunBody, let found = try? core.journal.key(for: name) as EntityKey??, let key = found else { return nil }
        return finishedOutcome(of: key, name: name, core: core)
    }

    /// ``finishedOutcome(of:core:)`` of the entity registered under `key`.
    static func finishedOutcome(of key: EntityKey, name: EntityName, core: RuntimeCore) -> Result<any Sendable, EntityError>? {
        var outcome: Result<[UInt8], WorkflowFailure>?
        do {
            let last = try core.journal.latestSequence(of: key)
            guard last > 0 else { return nil }
            try core.journal.forEachEvent(of: key, from: last, through: last) { _, payload in
                guard let header = HistoryEvent.Header(payload) else { return }
                let body = UnsafeRawBufferPointer(rebasing: payload[header.bodyOffset...])
                switch header.kind {
                case .completed: outcome = .success(Array(body))
                case .failed, .cancelled:
                    outcome = .failure(WorkflowFailure(message: String(decoding: body, as: UTF8.self), isCancellation: header.kind == .cancelled))
                default: break
                }
            }
        } catch {
            return nil
        }
        return outcome.map { decodeOutcome($0, name: name, codec: core.codec) }
    }

    /// Marks the cell evicted if it is idle; returns whether it was. A run body in memory is abandoned
    /// (it is replayed from history when the entity is next activated).
    func evictIfIdle() -> Bool {
        evictIfIdle(lastActiveBefore: .max)
    }

    /// Evicts the cell if it is idle and no turn finished since `cutoff`.
    /// - Parameter sparingParents: keep it if its run awaits children (the resident bound's sweep: a
    ///   parent would be replayed, whole, for each child outcome that arrives).
    func evictIfIdle(lastActiveBefore cutoff: UInt64, sparingParents: Bool = false) -> Bool {
        let workflow = cell.withLock { state -> AnyWorkflowRun?? in
            guard state.messages.isEmpty, !state.inFlight, !state.scheduled, state.resultWaiters.isEmpty, state.watches.isEmpty,
                  state.lastActive < cutoff, !(sparingParents && state.awaitsChildren) else { return nil }
            state.evicted = true
            defer { state.durable = nil }
            return .some(state.durable?.workflow)
        }
        guard let workflow else { return false }
        if let run = workflow, run.needsAbandoning { shard.schedule(AbandonRun(run)) }
        return true
    }

    // MARK: The shard's thread

    func runTurn() {
        let (messages, durable, failure, idle) = cell.withLock { state -> ([Message], Durable?, EntityError?, Bool) in
            state.scheduled = false
            guard !state.inFlight, !state.messages.isEmpty else { return ([], nil, nil, !state.inFlight) }
            let count = min(state.messages.count, core.configuration.maxMessagesPerTurn)
            var taken: [Message] = []
            taken.reserveCapacity(count)
            for _ in 0..<count { taken.append(state.messages.removeFirst()) }
            // Room was made: waiting senders' messages move in, oldest first.
            let capacity = core.configuration.mailboxCapacity
            while state.messages.count < capacity, let waiting = state.waiting.popFirst() { state.messages.append(waiting) }
            shard.mailboxDepth.record(state.messages.count)
            state.inFlight = true
            state.turnsStarted &+= 1
            return (taken, state.durable, state.failure, false)
        }
        guard !messages.isEmpty else {
            if idle { core.becameIdle() }
            return
        }
        shard.turnMessages.record(messages.count)
        if let failure {
            finishWithoutCommit(messages.map { Reply.fail($0, failure) })
            return
        }
        let current: Durable
        // Looked up by a load; for a resident entity, by the turn if a repair asks for it.
        var owed: OwedRows? = nil
        if let durable {
            current = durable
        } else {
            do {
                let key = try lookUpKey()
                // A finished run asked only for its outcome answers from its last event: no replay.
                if let key, W.hasRunBody, messages.allSatisfy(\.asksForOutcome),
                   let outcome = Self.finishedOutcome(of: key, name: name, core: core) {
                    finishWithoutCommit(messages.map { message in
                        switch message {
                        case .result(let reply), .execute(_, _, let reply): .done { reply(outcome) }
                        default: preconditionFailure("only outcome requests take this path")
                        }
                    })
                    if core.configuration.passivateFinishedRuns { core.passivate(self) }
                    return
                }
                (current, owed) = try load(key: key)
            } catch {
                // A failed read may pass: the next message loads again. History that this code cannot
                // replay (nondeterminism, an event that does not decode) fails the same way every time:
                // the entity stays failed, and callers already waiting for its result get the error.
                let stranded = cell.withLock { state -> [ValueReply] in
                    guard error.code != .storage else { return [] }
                    state.failure = error
                    defer { state.resultWaiters = [] }
                    return state.resultWaiters
                }
                core.logger.error("entity failed to load", metadata: ["entity.type": "\(name.type)", "entity.id": "\(name.id)", "error": "\(error)"])
                finishWithoutCommit(messages.map { Reply.fail($0, error) })
                for waiter in stranded { waiter(.failure(error)) }
                return
            }
            cell.withLock { $0.durable = current }
        }
        process(messages, from: current, owed: owed)
    }

    private func keyName(_ key: String, _ kind: RuntimeCore.KeyKind) -> KeyName { KeyName(key: key, kind: kind) }

    /// A key that cannot be stored whole is refused (truncating it could make two keys collide).
    private func invalidKey(_ key: String) -> EntityError? {
        let count = key.utf8.count
        guard count == 0 || count > RuntimeCore.maxIdempotencyKeyBytes else { return nil }
        return EntityError(.payloadTooLarge, entity: name,
                           "an idempotency key must have 1...\(RuntimeCore.maxIdempotencyKeyBytes) UTF-8 bytes (got \(count)); nothing was recorded")
    }

    /// How many times a run body may continue as new within one turn before its run is failed (a body
    /// that continues as new without waiting for anything would otherwise loop forever).
    static var maximumRunSwitchesPerTurn: Int { 64 }

    /// `owed`: the rows the entity's run is owed that the journal lacks, if its load looked them up.
    private func process(_ messages: [Message], from start: Durable, owed: OwedRows?) {
        var next = start
        // The turn's working state, typed; `next.state` gets it back once the turn is over.
        var working = start.state as! W.State
        // Room for a typical run turn's events at once (several small ones). Not in proportion to
        // the messages: an allocation of 1 KiB or more takes glibc's slow path.
        var output = TurnOutput(events: JournalEvents(firstSequence: start.lastSequence + 1, reservingBytes: 600))
        output.now = core.clock.nowNanoseconds()
        var replies: [Reply] = []
        replies.reserveCapacity(messages.count)
        let now = output.now
        let limit = core.configuration.maxPayloadBytes
        // Made by the first handler context only: a run body's turns need none.
        var madeRequests: TurnRequests?
        var requests: TurnRequests {
            if let madeRequests { return madeRequests }
            let made = TurnRequests(codec: core.codec)
            madeRequests = made
            return made
        }
        /// Rows the history says are owed and the journal lacks: stored again by this turn's commit.
        /// (Timers the turn started itself are not stored yet: they are in the output already.)
        func storeAgain(_ owed: OwedRows) {
            let timers = owed.timers.filter { owedTimer in !output.timersStarted.contains { $0.id == owedTimer.id } }
            guard !timers.isEmpty || !owed.tasks.isEmpty || !owed.cancelRequests.isEmpty else { return }
            output.timersStarted += timers
            output.tasksRestored += owed.tasks
            output.activityCancelRequests += owed.cancelRequests.filter { !output.activityCancelRequests.contains($0) }
            core.logger.error("rows the entity's history is owed are missing or damaged on disk; they are stored again",
                              metadata: ["entity.type": "\(name.type)", "entity.id": "\(name.id)",
                                         "timers": "\(timers.map(\.id))", "activities": "\(owed.tasks.map(\.activityID))",
                                         "cancellations": "\(owed.cancelRequests)"])
        }
        var owedLookedUp = owed != nil
        if let owed { storeAgain(owed) }
        let hadOutcome = Self.run(start)?.outcome != nil
        // `start` and `next` share the run object, so what was durable before the turn is noted now.
        let startedBefore = Self.run(start)?.started == true
        let wasActive = start.status == .active
        var runSwitches = 0

        func record(_ event: HistoryEvent) {
            record { event.encode(into: &$0) }
        }
        /// Records the event that `write` appends to the turn's event buffer.
        func record(_ write: (inout [UInt8]) -> Void) {
            next.lastSequence += 1
            next.runBytes += output.events.append(write)
        }
        func context(_ sequence: UInt64) -> EntityContext {
            EntityContext(id: name.id, sequence: sequence, nowNanoseconds: now, logger: core.logger, requests: requests)
        }
        /// Lets the run body react to the input just recorded, and records what it issued.
        func settle(_ body: (WorkflowRun<W>) -> Void = { $0.settle() }) {
            guard let run = Self.run(next) else { return }
            run.state = working
            run.now = now
            if run.activityWorker == nil {
                run.activityWorker = core.activities
                run.runners = core.runners
            }
            body(run)
            working = run.state
            // Outcomes of local activities that ended in the turn go between the commands, where the
            // body saw them.
            var localOutcome = 0
            func recordLocalOutcomes(upTo position: Int) {
                while localOutcome < run.localOutcomes.count, run.localOutcomes[localOutcome].position <= position {
                    let ended = run.localOutcomes[localOutcome]
                    record { HistoryEvent.appendActivityOutcome(id: ended.id, ended.outcome, attempt: ended.attempt, time: now, to: &$0) }
                    localOutcome += 1
                }
            }
            for (position, command) in run.issued.enumerated() {
                if !run.localOutcomes.isEmpty { recordLocalOutcomes(upTo: position) }
                record { HistoryEvent.appendCommand(command, time: now, to: &$0) }
                switch command {
                case .startTimer(let id, let due): output.timersStarted.append((id, due))
                case .cancelTimer(let id, let due): output.timersDone.append((id, due))
                case .scheduleActivity(let id, let name, let input, let options):
                    // A local activity runs in the turn (or was detached from it, see below).
                    if !run.takeLocalCommand(id) {
                        output.activitiesScheduled.append((id, name, input, options))
                    }
                case .startChild(let id, let child, let input, _):
                    output.outgoing.append(EntityEnvelope(kind: .startChild, target: child, sender: name, commandID: id, payload: input))
                case .signalEntity(let id, let target, let signal):
                    output.outgoing.append(EntityEnvelope(kind: .signal, target: target, sender: name, commandID: id, payload: signal))
                case .cancelChild(let id):
                    if let child = run.children[id], child.outcome == nil {
                        output.outgoing.append(EntityEnvelope(kind: .cancel, target: child.name, sender: name, commandID: id, payload: []))
                    }
                default: break
                }
            }
            if !run.localOutcomes.isEmpty {
                recordLocalOutcomes(upTo: Int.max)
                run.localOutcomes.removeAll(keepingCapacity: true)
            }
            if !run.localRetries.isEmpty {
                output.localRetries += run.localRetries
                run.localRetries.removeAll()
            }
            if !run.activitiesGivenUp.isEmpty {
                output.activitiesGivenUp += run.activitiesGivenUp
                run.activitiesGivenUp.removeAll()
            }
            if !run.activityCancelRequests.isEmpty {
                output.activityCancelRequests += run.activityCancelRequests
                run.activityCancelRequests.removeAll()
            }
            if !run.activityCancelsDone.isEmpty {
                for id in run.activityCancelsDone {
                    if let index = output.activityCancelRequests.firstIndex(of: id) {
                        output.activityCancelRequests.remove(at: index)  // requested in this turn: nothing to store
                    } else if let key = next.key {
                        output.tasksDone.append(ActivityTask.cancelKey(entity: key.rawValue, activity: id))
                    }
                }
                run.activityCancelsDone.removeAll()
            }
            run.issued.removeAll(keepingCapacity: true)
            if let continuation = run.continuation { switchRun(from: run, to: continuation) }
        }
        /// The run body continued as new: the run ends here and the next one starts, in this turn.
        func switchRun(from ended: WorkflowRun<W>, to continuation: (input: W.Input, bytes: [UInt8])) {
            runSwitches += 1
            guard runSwitches <= Self.maximumRunSwitchesPerTurn else {
                ended.refuseContinueAsNew("the run body continued as new \(Self.maximumRunSwitchesPerTurn) times in one turn without waiting for anything")
                settle { _ in }
                return
            }
            for (id, due) in ended.timerDue { output.timersDone.append((id, due)) }
            closeOpenChildren(of: ended)
            output.activitiesGivenUp += ended.awaitedActivities
            ended.abandon()
            output.runSwitch = (next.lastSequence, working, next.runStartSequence)
            next.run += 1
            next.runStartSequence = next.lastSequence + 1
            next.runBytes = 0
            let run = WorkflowRun<W>(name: name, run: next.run, state: working, codec: core.codec, logger: core.logger)
            next.workflow = run
            // The new run's history opens like a first one: started, then the parents it reports to.
            record(HistoryEvent(kind: .started, timeNanoseconds: now, body: continuation.bytes))
            for link in next.parents { record(HistoryEvent(kind: .parentLinked, timeNanoseconds: now, body: link.encoded())) }
            settle { $0.start(continuation.input) }
        }
        /// A run ended: its children still running get what their parent-close policy says.
        func closeOpenChildren(of run: WorkflowRun<W>) {
            guard run.openChildCount > 0 else { return }
            for (id, child) in run.openChildren {
                switch child.policy {
                case .terminate:
                    output.outgoing.append(EntityEnvelope(kind: .terminate, target: child.name, sender: name, commandID: id,
                                                          payload: Array("its parent \(name)'s run ended (parent-close policy: terminate)".utf8)))
                case .requestCancel:
                    output.outgoing.append(EntityEnvelope(kind: .cancel, target: child.name, sender: name, commandID: id, payload: []))
                case .abandon:
                    break
                }
            }
        }
        /// Signals the handler just sent join the turn's outgoing messages.
        func takeSentSignals() {
            guard let madeRequests else { return }
            for (target, signal) in madeRequests.outgoing {
                output.outgoing.append(EntityEnvelope(kind: .signal, target: target, sender: name, commandID: 0, payload: signal))
            }
            madeRequests.outgoing.removeAll()
        }
        func terminate(reason: String) {
            next.status = .terminated
            record(HistoryEvent(kind: .terminated, timeNanoseconds: now, body: Array(reason.utf8)))
            if let run = Self.run(next) {
                for (id, due) in run.timerDue { output.timersDone.append((id, due)) }
                output.activitiesGivenUp += run.awaitedActivities
            }
        }
        func outcome(to link: ParentLink, _ result: Result<[UInt8], ChildFailure>) -> EntityEnvelope {
            switch result {
            case .success(let output):
                EntityEnvelope(kind: .childOutcome, target: link.parent, sender: name, commandID: link.commandID, payload: output)
            case .failure(let failure):
                EntityEnvelope(kind: .childOutcome, target: link.parent, sender: name, commandID: link.commandID, payload: [], failure: failure)
            }
        }
        func childResult(_ outcome: Result<[UInt8], WorkflowFailure>) -> Result<[UInt8], ChildFailure> {
            outcome.mapError { ChildFailure(child: name, reason: $0.isCancellation ? .cancelled : .failed, message: $0.message) }
        }
        /// Starts the run body with `input` (it has not started); the error refuses the start.
        func startRun(_ input: any Sendable, _ bytes: [UInt8]) -> EntityError? {
            guard W.hasRunBody else { return EntityError(.rejected, entity: name, "\(W.entityType) has no run body to start") }
            if bytes.count > limit { return tooLarge("input", bytes.count) }
            let run = Self.run(next) ?? WorkflowRun<W>(name: name, run: next.run, state: working, codec: core.codec, logger: core.logger)
            next.workflow = run
            record(HistoryEvent(kind: .started, timeNanoseconds: now, body: bytes))
            settle { $0.start(input as! W.Input) }
            return nil
        }
        /// Answers with the run's outcome if it was durable before this turn; otherwise waits for it.
        func awaitResult(_ reply: @escaping ValueReply) {
            if let outcome = Self.run(next)?.outcome, hadOutcome {
                let result = decodeOutcome(outcome)
                replies.append(.done { reply(result) })
            } else if startedBefore {
                output.resultWaiters.append(reply)
            } else if Self.run(next)?.started == true {
                // Started in this very turn: waits once the commit is durable, and fails with it.
                replies.append(.execute(reply))
            } else {
                replies.append(.failed { reply(.failure(EntityError(.rejected, entity: self.name, "the entity's run body was not started"))) })
            }
        }
        /// A message from another entity. Its outbox row is consumed whatever happens to it; what
        /// cannot apply is dropped with a log line (a sender learns of it only for a child start,
        /// which reports a ``ChildFailure``).
        func handle(_ envelope: EntityEnvelope) {
            let terminated = next.status == .terminated
            func dropped(_ why: String) {
                core.logger.warning("a message from another entity was dropped", metadata: [
                    "entity.type": "\(name.type)", "entity.id": "\(name.id)", "sender": "\(envelope.sender)", "reason": "\(why)"])
            }
            switch envelope.kind {
            case .signal:
                guard !terminated else { return dropped("the entity was terminated") }
                let signal: W.Signal
                do { signal = try envelope.payload.withUnsafeBytes { try core.codec.decode(W.Signal.self, from: $0) } } catch {
                    return dropped("the payload is not a \(W.entityType) signal: \(error)")
                }
                var state = working
                do {
                    try W.handle(signal, state: &state, context: context(next.lastSequence + 1))
                } catch {
                    madeRequests?.outgoing.removeAll()
                    return dropped("the signal handler refused it: \(error)")
                }
                working = state
                record(HistoryEvent(kind: .signal, timeNanoseconds: now, body: envelope.payload))
                takeSentSignals()
                settle()
            case .startChild:
                let link = ParentLink(parent: envelope.sender, commandID: envelope.commandID)
                func refuse(_ reason: ChildFailure.Reason, _ message: String) {
                    output.outgoing.append(outcome(to: link, .failure(ChildFailure(child: name, reason: reason, message: message))))
                }
                guard !next.parents.contains(link) else { return }  // delivered twice: linked already
                // Recorded even when refused: the refusal's outbox row is keyed by this event.
                next.parents.append(link)
                record(HistoryEvent(kind: .parentLinked, timeNanoseconds: now, body: link.encoded()))
                guard !terminated else { return refuse(.terminated, "the entity was terminated") }
                guard W.hasRunBody else { return refuse(.rejected, "\(W.entityType) has no run body") }
                let input: W.Input
                do { input = try envelope.payload.withUnsafeBytes { try core.codec.decode(W.Input.self, from: $0) } } catch {
                    return refuse(.rejected, "the input is not a \(W.entityType) input: \(error)")
                }
                if Self.run(next)?.started == true {
                    // Started already (by another parent, or directly): this parent shares the run.
                    if hadOutcome, let result = Self.run(next)?.outcome { output.outgoing.append(outcome(to: link, childResult(result))) }
                } else {
                    let run = Self.run(next) ?? WorkflowRun<W>(name: name, run: next.run, state: working, codec: core.codec, logger: core.logger)
                    next.workflow = run
                    record(HistoryEvent(kind: .started, timeNanoseconds: now, body: envelope.payload))
                    settle { $0.start(input) }
                }
            case .cancel:
                guard !terminated, let run = Self.run(next), run.started, run.outcome == nil else { return }
                record(HistoryEvent(kind: .cancelRequested, timeNanoseconds: now, body: []))
                settle { $0.cancel() }
            case .terminate:
                guard !terminated else { return }
                terminate(reason: String(decoding: envelope.payload, as: UTF8.self))
            case .childOutcome:
                guard !terminated, let run = Self.run(next), run.isChildOpen(envelope.commandID) else { return }
                let id = envelope.commandID
                let result: Result<[UInt8], ChildFailure> = envelope.failure.map { .failure($0) } ?? .success(envelope.payload)
                record(.childOutcome(id: id, result, time: now))
                settle { $0.completeChild(id, result) }
            }
        }
        /// The result recorded for an idempotency key — in this turn or in history — or `nil`.
        func previousResult(of key: String, _ kind: RuntimeCore.KeyKind) throws(EntityError) -> [UInt8]? {
            if let error = invalidKey(key) { throw error }
            if let result = output.keys[keyName(key, kind)] { return result }
            return try core.recorded(key, kind, for: next.key, name: name)
        }
        func tooLarge(_ what: String, _ count: Int) -> EntityError {
            EntityError(.payloadTooLarge, entity: name, "the \(what) has \(count) bytes, more than the limit of \(limit)")
        }

        for message in messages {
            if case .envelope(let envelope, let key, let reply) = message {
                output.tasksDone.append(key)
                handle(envelope)
                replies.append(.signal(reply))
                continue
            }
            if next.status == .terminated {
                if case .timerFired(let id, let due, let reply) = message {
                    output.timersDone.append((id, due))  // a terminated entity's timers are dropped
                    replies.append(.done { reply(.success(())) })
                    continue
                }
                if case .activityOutcome(let id, _, _, let reply) = message {
                    // So are its activities' outcomes; their tasks go (or they would run again at every open),
                    // with their cancellation requests if they had any.
                    if let key = next.key {
                        output.tasksDone.append(ActivityTask.key(entity: key.rawValue, activity: id))
                        output.tasksDone.append(ActivityTask.cancelKey(entity: key.rawValue, activity: id))
                    }
                    replies.append(.signal(reply))
                    continue
                }
                if case .repair(_, let reply) = message {
                    replies.append(.done { reply(.success(false)) })  // it is owed nothing
                    continue
                }
                replies.append(.fail(message, EntityError(.terminated, entity: name, "the entity was terminated; it accepts no more messages")))
                continue
            }
            switch message {
            case .read(let reply):
                let state = start.state
                replies.append(.done { reply(.success(state)) })
            case .signal(let signal, let bytes, let key, let reply):
                if bytes.count > limit {
                    let error = tooLarge("signal", bytes.count)
                    replies.append(.failed { reply(.failure(error)) })
                    continue
                }
                if let key {
                    do throws(EntityError) {
                        if try previousResult(of: key, .signal) != nil {
                            // A retry of a delivered signal; delivered in this very turn, it is answered
                            // with the commit (a failed one fails both).
                            replies.append(output.keys[keyName(key, .signal)] != nil ? .signal(reply) : .done { reply(.success(())) })
                            continue
                        }
                    } catch {
                        replies.append(.failed { reply(.failure(error)) })
                        continue
                    }
                }
                var state = working
                do {
                    try W.handle(signal as! W.Signal, state: &state, context: context(next.lastSequence + 1))
                } catch {
                    madeRequests?.outgoing.removeAll()
                    replies.append(.failed { reply(.failure(EntityError(.rejected, entity: self.name, "the signal handler refused the signal; nothing was recorded", underlying: error))) })
                    continue
                }
                working = state
                record(HistoryEvent(kind: .signal, timeNanoseconds: now, idempotencyKey: key, body: bytes))
                takeSentSignals()
                if let key { output.keys[keyName(key, .signal)] = [] }
                settle()
                replies.append(.signal(reply))
            case .update(let update, let bytes, let key, let reply):
                if bytes.count > limit {
                    let error = tooLarge("update", bytes.count)
                    replies.append(.failed { reply(.failure(error)) })
                    continue
                }
                if let key {
                    do throws(EntityError) {
                        if let recorded = try previousResult(of: key, .update) {
                            let decoded = Result { try recorded.withUnsafeBytes { try core.codec.decode(W.UpdateResult.self, from: $0) as any Sendable } }
                                .mapError { EntityError(.undecodablePayload, entity: self.name, "the recorded result of update '\(key)' does not decode", underlying: $0) }
                            // A retry: the first result, not applied again; answered with the commit if the
                            // first was applied in this very turn.
                            if output.keys[keyName(key, .update)] != nil, case .success(let value) = decoded {
                                replies.append(.update(reply, value))
                            } else {
                                replies.append(.done { reply(decoded) })
                            }
                            continue
                        }
                    } catch {
                        replies.append(.failed { reply(.failure(error)) })
                        continue
                    }
                }
                var state = working
                let result: W.UpdateResult
                let resultBytes: [UInt8]
                do {
                    let update = update as! W.Update
                    try W.validate(update, state: state)
                    result = try W.apply(update, state: &state, context: context(next.lastSequence + 1))
                    resultBytes = try core.codec.encode(result)
                } catch {
                    madeRequests?.outgoing.removeAll()
                    replies.append(.failed { reply(.failure(EntityError(.rejected, entity: self.name, "the update was refused; nothing was recorded", underlying: error))) })
                    continue
                }
                working = state
                record(.update(time: now, key: key, update: bytes, result: resultBytes))
                takeSentSignals()
                if let key { output.keys[keyName(key, .update)] = resultBytes }
                settle()
                replies.append(.update(reply, result))
            case .terminate(let reason, let reply):
                terminate(reason: reason)
                replies.append(.signal(reply))
            case .start(let input, let bytes, let reply):
                if Self.run(next)?.started == true {
                    // Starting twice is idempotent; started in this very turn, answered with the commit.
                    replies.append(startedBefore ? .done { reply(.success(())) } : .signal(reply))
                } else if let error = startRun(input, bytes) {
                    replies.append(.failed { reply(.failure(error)) })
                } else {
                    replies.append(.signal(reply))
                }
            case .execute(let input, let bytes, let reply):
                if Self.run(next)?.started == true {
                    awaitResult(reply)  // started before: as `result`
                } else if let error = startRun(input, bytes) {
                    replies.append(.failed { reply(.failure(error)) })
                } else {
                    replies.append(.execute(reply))
                }
            case .result(let reply):
                awaitResult(reply)
            case .cancel(let reply):
                guard let run = Self.run(next), run.started, run.outcome == nil else {
                    replies.append(.done { reply(.success(())) })  // nothing running: nothing to cancel
                    continue
                }
                record(HistoryEvent(kind: .cancelRequested, timeNanoseconds: now, body: []))
                settle { $0.cancel() }
                replies.append(.signal(reply))
            case .activityOutcome(let id, let outcome, let attempt, let reply):
                if let key = next.key { output.tasksDone.append(ActivityTask.key(entity: key.rawValue, activity: id)) }
                if let run = Self.run(next), run.isAwaitingActivity(id) {
                    record { HistoryEvent.appendActivityOutcome(id: id, outcome, attempt: attempt, time: now, to: &$0) }
                    settle { $0.completeActivity(id, outcome) }
                }
                replies.append(.signal(reply))
            case .timerFired(let id, let due, let reply):
                output.timersDone.append((id, due))
                if let run = Self.run(next), run.timerDue[id] != nil {
                    var body = [UInt8]()
                    withUnsafeBytes(of: id.bigEndian) { body.append(contentsOf: $0) }
                    record(HistoryEvent(kind: .timerFired, timeNanoseconds: now, body: body))
                    settle { _ = $0.fire(timer: id) }
                }
                replies.append(.signal(reply))
            case .repair(let damage, let reply):
                // A row of this resident entity failed its check: what its run is owed is looked up now.
                if !owedLookedUp {
                    do {
                        storeAgain(try owedRows(of: next, events: nil))
                        owedLookedUp = true
                    } catch {
                        replies.append(.fail(message, error))
                        continue
                    }
                }
                var owned = false
                if let run = Self.run(next), run.outcome == nil {
                    switch damage {
                    case .timer(let id, let due):
                        if let correct = run.timerDue[id] {
                            owned = true
                            // Its key was damaged too: the row goes (the owed row, at its own key, is
                            // among those stored again). At its own key it is simply replaced.
                            if correct != due { output.timersDone.append((id, due)) }
                        }
                    case .task(let activity):
                        owned = run.isAwaitingActivity(activity)
                    }
                }
                replies.append(.update(reply, owned))
            case .envelope:
                break  // handled above
            }
        }

        // The run ended in this turn (finished, or the entity was terminated): its parents get the
        // outcome, and its children still running get what their parent-close policy says.
        let finishedNow = !hadOutcome && Self.run(next)?.outcome != nil
        let terminatedNow = wasActive && next.status == .terminated && !hadOutcome && !finishedNow
        if finishedNow || terminatedNow {
            let result: Result<[UInt8], ChildFailure> = finishedNow
                ? childResult(Self.run(next)!.outcome!)
                : .failure(ChildFailure(child: name, reason: .terminated, message: "the entity was terminated before its run body finished"))
            for link in next.parents { output.outgoing.append(outcome(to: link, result)) }
            if let run = Self.run(next) { closeOpenChildren(of: run) }
        }

        // Local activities still running leave the turn; the commit stores them.
        if let run = Self.run(next), !run.locals.isEmpty { output.localDetached = run.detachLocals() }
        next.state = working
        guard !output.events.isEmpty || !output.timersDone.isEmpty || !output.tasksDone.isEmpty || !output.localDetached.isEmpty
            || !output.activitiesGivenUp.isEmpty || !output.timersStarted.isEmpty || !output.tasksRestored.isEmpty
            || !output.localRetries.isEmpty || !output.activityCancelRequests.isEmpty else {
            // Nothing to write: a turn that only read, refused, or registered result waiters.
            if output.resultWaiters.isEmpty && !replies.contains(where: \.isExecute) {
                finishWithoutCommit(replies)
            } else {
                complete(.success(()), next: next, waiters: output.resultWaiters, replies: replies)
            }
            return
        }
        // Not `let configuration = core.configuration`: that copies the whole configuration (its
        // strings, logger and codec retained and released) on every turn.
        let afterEvents = core.configuration.continueAsNewAfterEvents
        let afterBytes = core.configuration.continueAsNewAfterBytes
        // A run body's history is its run: no continue-as-new once the body started (a finished run
        // keeps its outcome for `result` and for the parents it reports to).
        let bodyStarted = Self.run(next)?.started ?? false
        let continueAsNew = !bodyStarted && next.status == .active && (madeRequests?.continueAsNew == true
            || next.lastSequence + 1 - next.runStartSequence >= UInt64(afterEvents)
            || next.runBytes >= afterBytes)
        commit(output, next: next, continueAsNew: continueAsNew, replies: replies)
    }

    private func decodeOutcome(_ outcome: Result<[UInt8], WorkflowFailure>) -> Result<any Sendable, EntityError> {
        Self.decodeOutcome(outcome, name: name, codec: core.codec)
    }

    private static func decodeOutcome(_ outcome: Result<[UInt8], WorkflowFailure>, name: EntityName,
                                      codec: any EntityCodec) -> Result<any Sendable, EntityError> {
        switch outcome {
        case .success(let bytes):
            Result { try bytes.withUnsafeBytes { try codec.decode(W.Output.self, from: $0) as any Sendable } }
                .mapError { EntityError(.undecodablePayload, entity: name, "the run's recorded output does not decode", underlying: $0) }
        case .failure(let failure) where failure.isCancellation:
            .failure(EntityError(.cancelled, entity: name, "the run was cancelled: \(failure.message)", underlying: failure))
        case .failure(let failure):
            .failure(EntityError(.rejected, entity: name, "the run body failed: \(failure.message)", underlying: failure))
        }
    }

    /// Writes the turn's events (registering the entity first if it is new), then completes the turn.
    private func commit(_ output: TurnOutput, next: Durable, continueAsNew: Bool, replies: [Reply]) {
        var batch = JournalBatch()
        // One operation each, plus a registration, a snapshot, a prune and the metadata at most.
        batch.reserveCapacity(1 + output.keys.count + output.timersStarted.count + output.timersDone.count + output.tasksRestored.count
            + output.tasksDone.count + output.outgoing.count + output.activitiesScheduled.count + output.localDetached.count
            + output.localRetries.count + 2 * output.activitiesGivenUp.count + output.activityCancelRequests.count + 4)
        var next = next
        let key: EntityKey
        if let known = next.key {
            key = known
        } else {
            // A new entity: its name is registered under a reserved key in this same commit, so its
            // first turn costs one commit, not two. `lookUpKey()` found the name unregistered, and only
            // this entity's turns register it, so there is nothing to look up again.
            key = core.journal.reserveNewKey()
            batch.register(name, as: key)
            next.key = key
        }
        batch.append(key, events: output.events)
        for (name, result) in output.keys { batch.recordResult(forKey: RuntimeCore.resultKey(name.key, name.kind, key), payload: result, recordedAt: output.now) }
        for timer in output.timersStarted { batch.scheduleTimer(JournalTimer(dueNanoseconds: timer.due, entity: key, id: timer.id)) }
        for timer in output.timersDone { batch.cancelTimer(dueNanoseconds: timer.due, entity: key, id: timer.id) }
        var outbox: [(TaskKey, EntityEnvelope)] = []
        outbox.reserveCapacity(output.outgoing.count)
        for (index, envelope) in output.outgoing.enumerated() {
            let row = EntityEnvelope.key(sender: key, sequence: next.lastSequence, index: index)
            batch.putTask(row, value: envelope.encoded())
            outbox.append((row, envelope))
        }
        var tasks: [ActivityTask] = []
        for activity in output.activitiesScheduled {
            let task = ActivityTask(entityType: name.type, entityID: name.id, entityKey: key.rawValue, run: next.run,
                                    activityID: activity.id, name: activity.name, input: activity.input, options: activity.options,
                                    attempt: 1, scheduledAt: output.now, notBefore: output.now, receiver: self)
            batch.putTask(task.key, value: task.encoded())
            tasks.append(task)
        }
        for var task in output.tasksRestored {
            task.notBefore = output.now
            batch.putTask(task.key, value: task.encoded())
            tasks.append(task)
        }
        for var retry in output.localRetries {
            retry.entityKey = key.rawValue
            ActivityWorker.addRetry(retry, to: &batch, replacing: false)
        }
        for (var task, _) in output.localDetached {
            task.entityKey = key.rawValue
            batch.putTask(task.key, value: task.encoded())
        }
        for id in output.activityCancelRequests {
            batch.putTask(ActivityTask.cancelKey(entity: key.rawValue, activity: id), value: ActivityTask.cancelRequestValue)
        }
        // After the puts: an activity given up in the turn that scheduled it (or detached it) stays
        // deleted, and so does the cancellation request of one whose outcome the turn recorded.
        for task in output.tasksDone { batch.deleteTask(task) }
        for id in output.activitiesGivenUp {
            batch.deleteTask(ActivityTask.key(entity: key.rawValue, activity: id))
            // A run that ends while an activity's cancellation was requested gives the activity up.
            batch.deleteTask(ActivityTask.cancelKey(entity: key.rawValue, activity: id))
        }
        var committed = next
        if let runSwitch = output.runSwitch {
            // The run body continued as new: the ended run's state is the new run's starting point.
            guard let snapshot = try? core.codec.encode(runSwitch.state as! W.State) else {
                for (_, runner) in output.localDetached { runner.executor.scheduled(key: 0, ok: false) }
                complete(.failure(EntityError(.unencodablePayload, entity: name,
                                              "the state does not encode, so the run cannot continue as new; nothing of the turn was recorded")),
                         next: next, waiters: output.resultWaiters, replies: replies)
                return
            }
            batch.saveSnapshot(key, sequence: runSwitch.boundary, payload: snapshot)
            committed.snapshotSequence = runSwitch.boundary
            switch core.configuration.keepRuns {
            case 0: batch.deleteHistory(of: key, before: next.runStartSequence)
            case 1: batch.deleteHistory(of: key, before: runSwitch.previousRunStart)
            default: break
            }
        }
        // A run body cannot be rebuilt from a snapshot (only replayed), so its entities snapshot at
        // run boundaries only.
        let snapshotDue = !W.hasRunBody && next.lastSequence - next.snapshotSequence >= UInt64(core.configuration.snapshotEvery)
        if snapshotDue || continueAsNew, let snapshot = try? core.codec.encode(next.state as! W.State) {
            batch.saveSnapshot(key, sequence: next.lastSequence, payload: snapshot)
            committed.snapshotSequence = next.lastSequence
            if continueAsNew {
                // The new run starts from this snapshot, in the same commit as the turn: nothing that
                // arrives later can land in the old run, and nothing of the turn can be lost.
                let retention = core.configuration.keepRuns
                committed.run += 1
                committed.runBytes = 0
                committed.runStartSequence = next.lastSequence + 1
                committed.workflow = nil
                committed.parents = []
                if retention == 0 {
                    batch.deleteHistory(of: key, before: committed.runStartSequence)
                } else if retention == 1 {
                    batch.deleteHistory(of: key, before: next.runStartSequence)
                }
            }
        }
        if next.status == .terminated || committed.run != next.run || output.runSwitch != nil {
            batch.setMetadata(key, EntityMetadata(name: name, status: committed.status.rawValue, run: committed.run,
                                                  runStartSequence: committed.runStartSequence))
        }
        let published = committed
        let waiters = output.resultWaiters
        let dispatched = tasks
        let sent = outbox
        // The completion captures only what it uses: the rest of the output is freed here, on the
        // thread that allocated it (freeing on the completion queue's thread costs more).
        let wakesTimers = !output.timersStarted.isEmpty || !output.localRetries.isEmpty
        let detached = output.localDetached
        let givenUp = output.activitiesGivenUp
        let cancelRequests = output.activityCancelRequests
        let handsOver = !dispatched.isEmpty || !sent.isEmpty || !cancelRequests.isEmpty
        core.journal.submit(batch) { result in
            // Busy until what the commit hands over (activity attempts, messages) is queued where it
            // goes: the runtime is never idle with work between the turn and its next holder.
            if handsOver { self.core.becameBusy() }
            self.complete(result.map { _ in () }.mapError {
                EntityError(.storage, entity: self.name, "committing the turn failed; nothing of it was recorded", underlying: $0)
            }, next: published, waiters: waiters, replies: replies)
            if wakesTimers { self.core.timers.wake() }
            // Local attempts that left the turn carry out their outcomes from now on.
            let committed = if case .success = result { true } else { false }
            for (task, runner) in detached {
                // Stored now, it can be given up like a pool attempt (before its outcome is carried out).
                if committed { self.core.activities.trackDetachedLocal(runner, task: task, entity: key.rawValue) }
                runner.executor.scheduled(key: key.rawValue, ok: committed)
            }
            // Activities run, and messages leave, only once the commit that made them is durable.
            if case .success = result {
                for task in dispatched { self.core.activities.dispatch(task) }
                for (row, envelope) in sent { self.core.deliver(envelope, row: row) }
                // Attempts of the activities the run stopped awaiting are cancelled (their tasks are gone).
                if !givenUp.isEmpty { self.core.activities.giveUp(entity: key.rawValue, givenUp) }
                // Activities whose cancellation the run requested are stopped; their outcomes follow.
                if !cancelRequests.isEmpty { self.core.activities.requestCancel(entity: key.rawValue, cancelRequests) }
            }
            if handsOver { self.core.becameIdle() }
        }
    }

    /// Publishes a committed turn (or drops the entity's state after a failed one), then replies.
    private func complete(_ outcome: Result<Void, EntityError>, next: Durable, waiters: [ValueReply],
                          replies: [Reply]) {
        var abandoned: AnyWorkflowRun?
        let now = core.clock.nowNanoseconds()
        let awaitsChildren = (Self.run(next)?.openChildCount ?? 0) > 0
        let runFinished = Self.run(next)?.outcome != nil
        // The run has an outcome (or can never have one): every result waiter is answered now.
        let runEnded = runFinished || next.status == .terminated
        var decided: [(StateWatch, Result<any Sendable, EntityError>)] = []
        let (reschedule, finished, resolved) = cell.withLock { state -> (Bool, Bool, [ValueReply]) in
            defer { decided = Self.takeDecidedWatches(&state, name: name) }
            state.resultWaiters += waiters
            state.lastActive = now
            var resolved: [ValueReply] = []
            switch outcome {
            case .success:
                state.durable = next
                state.awaitsChildren = awaitsChildren
                if runEnded {
                    // The turn's executes are answered below, with the replies.
                    resolved = state.resultWaiters
                    state.resultWaiters = []
                } else {
                    // Registered under the lock: the entity's next turn may run as soon as it is released.
                    for case .execute(let reply) in replies { state.resultWaiters.append(reply) }
                }
            case .failure:
                abandoned = next.workflow
                state.durable = nil  // reload from history on the next turn
            }
            state.inFlight = false
            guard !state.messages.isEmpty, !state.scheduled else { return (false, true, resolved) }
            state.scheduled = true
            return (true, false, resolved)
        }
        if let abandoned { shard.schedule(AbandonRun(abandoned)) }
        for (watch, result) in decided { watch.resume(result) }
        if reschedule { shard.schedule(self) } else if finished { core.becameIdle() }
        /// The run's outcome for its waiters, decoded once.
        var ended: Result<any Sendable, EntityError>?
        func runOutcome() -> Result<any Sendable, EntityError> {
            if let ended { return ended }
            let result: Result<any Sendable, EntityError> = Self.run(next)?.outcome.map(decodeOutcome)
                ?? .failure(EntityError(.terminated, entity: name, "the entity was terminated before its run body finished"))
            ended = result
            return result
        }
        for reply in replies {
            switch (reply, outcome) {
            case (.signal(let reply), .success): reply(.success(()))
            case (.signal(let reply), .failure(let error)): reply(.failure(error))
            case (.update(let reply, let result), .success): reply(.success(result))
            case (.update(let reply, _), .failure(let error)): reply(.failure(error))
            case (.failed(let reply), _), (.done(let reply), _): reply()
            case (.execute(let reply), .success): if runEnded { reply(runOutcome()) }  // else a result waiter now
            case (.execute(let reply), .failure(let error)): reply(.failure(error))
            }
        }
        for waiter in resolved { waiter(runOutcome()) }
        // Last: the callers above are answered first (a commit completes many turns in a row).
        if finished, case .success = outcome, runFinished, core.configuration.passivateFinishedRuns {
            core.passivate(self)  // a finished run leaves memory; its outcome stays on disk
            if let run = next.workflow { shard.queue.retire(run) }  // freed on a shard thread
        }
    }

    private func finishWithoutCommit(_ replies: [Reply]) {
        let now = core.clock.nowNanoseconds()
        var decided: [(StateWatch, Result<any Sendable, EntityError>)] = []
        let reschedule = cell.withLock { state -> Bool in
            decided = Self.takeDecidedWatches(&state, name: name)
            state.inFlight = false
            state.lastActive = now
            guard !state.messages.isEmpty, !state.scheduled else { return false }
            state.scheduled = true
            return true
        }
        for (watch, result) in decided { watch.resume(result) }
        if reschedule { shard.schedule(self) } else { core.becameIdle() }
        for reply in replies {
            switch reply {
            case .failed(let reply), .done(let reply): reply()
            case .signal(let reply): reply(.success(()))
            case .update(let reply, let result): reply(.success(result))
            case .execute: preconditionFailure("an execute reply goes through complete()")
            }
        }
    }

    // MARK: Activation

    /// The entity's journal key, `nil` if it was never registered.
    private func lookUpKey() throws(EntityError) -> EntityKey? {
        do { return try core.journal.key(for: name) } catch {
            throw EntityError(.storage, entity: name, "looking up the entity failed", underlying: error)
        }
    }

    /// A load that failed on `error`: a journal read that failed is a `storage` error, which may pass
    /// (the next message loads again); anything else — a damaged record, a state or event that does
    /// not decode — fails the same way every time (`failedOnReplay`).
    private func loadFailure(_ error: any Error, sequence: UInt64? = nil, _ what: String) -> EntityError {
        if let error = error as? JournalError, error.code == .storage {
            return EntityError(.storage, entity: name, sequence: sequence, what, underlying: error)
        }
        return EntityError(.failedOnReplay, entity: name, sequence: sequence, what, underlying: error)
    }

    /// Rebuilds the entity: an entity type without a run body from its latest snapshot and the events
    /// after it; one with a run body by replaying its current run from the start, matching the
    /// commands the code issues against the recorded ones.
    /// - Parameter key: ``lookUpKey()``'s answer.
    /// Loads the entity from its snapshot and history, and finds the rows its run is owed that the
    /// journal lacks (see ``OwedRows``; none for an entity without a run body).
    private func load(key: EntityKey?) throws(EntityError) -> (durable: Durable, owed: OwedRows) {
        let journal = core.journal
        guard let key else {
            return (Durable(state: W.initialState(id: name.id), key: nil, lastSequence: 0, snapshotSequence: 0, status: .active), OwedRows())
        }
        var state = W.initialState(id: name.id)
        var durable = Durable(state: (), key: key, lastSequence: 0, snapshotSequence: 0, status: .active)
        do {
            if let metadata = try journal.metadata(of: key) {
                if metadata.status == Status.terminated.rawValue { durable.status = .terminated }
                durable.run = metadata.run
                durable.runStartSequence = metadata.runStartSequence
            }
            if let snapshot = try journal.snapshot(of: key), !W.hasRunBody || snapshot.sequence < durable.runStartSequence {
                state = try snapshot.payload.withUnsafeBytes { try core.codec.decode(W.State.self, from: $0) }
                durable.lastSequence = snapshot.sequence
                durable.snapshotSequence = snapshot.sequence
            }
            durable.lastSequence = max(durable.lastSequence, durable.runStartSequence - 1)
        } catch let error as EntityError {
            throw error
        } catch {
            throw loadFailure(error, sequence: durable.snapshotSequence, "the entity's snapshot or metadata cannot be read")
        }
        if !W.hasRunBody {
            // No run body: stream the events straight from the journal's pages, no copies.
            let replayer = HistoryReplayer<W>(name: name, codec: core.codec, logger: core.logger)
            var failure: EntityError?
            do {
                try journal.forEachEvent(of: key, from: durable.lastSequence + 1) { sequence, payload in
                    do throws(EntityError) {
                        try replayer.replayInPlace(sequence, payload, state: &state, into: &durable)
                    } catch {
                        failure = error
                        throw error
                    }
                }
            } catch {
                throw failure ?? loadFailure(error, "reading the entity's history failed")
            }
            durable.state = state
            return (durable, OwedRows())
        }
        var events: [(UInt64, HistoryEvent)] = []
        do {
            try journal.forEachEvent(of: key, from: durable.lastSequence + 1) { sequence, payload in
                guard let event = HistoryEvent.decode(payload) else {
                    throw EntityError(.failedOnReplay, entity: name, sequence: sequence, "the event is not a history event this runtime knows")
                }
                events.append((sequence, event))
            }
        } catch let error as EntityError {
            throw error
        } catch {
            throw loadFailure(error, "reading the entity's history failed")
        }
        durable.state = state
        try HistoryReplayer<W>(name: name, codec: core.codec, logger: core.logger).replay(events, into: &durable)
        return (durable, try owedRows(of: durable, events: events))
    }

    /// The rows `durable`'s run is owed (its pending timers' rows, its awaited pool activities'
    /// tasks) that the journal does not hold intact. `events`: the run's history from its first event,
    /// if at hand (read from the journal when needed otherwise). A point read per pending timer and
    /// awaited activity: only a run that waits on them pays it, once per load.
    private func owedRows(of durable: Durable, events: [(UInt64, HistoryEvent)]?) throws(EntityError) -> OwedRows {
        guard durable.status == .active, let key = durable.key, let run = Self.run(durable), run.outcome == nil else { return OwedRows() }
        var owed = OwedRows()
        let journal = core.journal
        do {
            if !run.timerDue.isEmpty {
                let expected = run.timerDue.map { JournalTimer(dueNanoseconds: $0.value, entity: key, id: $0.key) }
                owed.timers = try journal.unstoredTimers(expected).map { (id: $0.id, due: $0.dueNanoseconds) }
            }
            let awaited = run.awaitedActivities
            guard !awaited.isEmpty else { return owed }
            /// Whether the row `taskKey` is missing or fails its check.
            func lacks(_ taskKey: TaskKey) throws(JournalError) -> Bool {
                switch Result(catching: { () throws(JournalError) in try journal.task(forKey: taskKey.bytes) }) {
                case .success(.some): false
                case .success(.none): true
                case .failure(let error) where error.code == .corruptedRecord: true
                case .failure(let error): throw error
                }
            }
            var missing: Set<UInt64> = []
            for id in awaited where try lacks(ActivityTask.key(entity: key.rawValue, activity: id)) { missing.insert(id) }
            // A requested cancellation goes with a task stored again, and is stored again on its own
            // if only its row was lost (the task's next move would not see it after a restart).
            for id in run.cancelRequestedActivities
            where try missing.contains(id) || lacks(ActivityTask.cancelKey(entity: key.rawValue, activity: id)) {
                owed.cancelRequests.append(id)
            }
            guard !missing.isEmpty else { return owed }
            var history = events ?? []
            if events == nil {
                try journal.forEachEvent(of: key, from: durable.runStartSequence) { sequence, payload in
                    if let event = HistoryEvent.decode(payload) { history.append((sequence, event)) }
                }
            }
            for (_, event) in history where event.kind == .activityScheduled {
                guard case .scheduleActivity(let id, let activity, let input, let options)? = event.command,
                      missing.contains(id) else { continue }
                owed.tasks.append(ActivityTask(entityType: name.type, entityID: name.id, entityKey: key.rawValue, run: durable.run,
                                               activityID: id, name: activity, input: input, options: options, attempt: 1,
                                               scheduledAt: event.timeNanoseconds, notBefore: 0, receiver: self))
            }
        } catch {
            throw loadFailure(error, "checking the rows the entity's run is owed failed")
        }
        return owed
    }
}

/// Abandons a run body that left memory, on a shard thread (where run executors are drained; it
/// goes to the entity's home shard). No turn drains it any more: the entity holds another run or none.
final class AbandonRun: ShardWork, @unchecked Sendable {
    let run: AnyWorkflowRun
    init(_ run: AnyWorkflowRun) { self.run = run }
    func runTurn() { run.abandon() }
}

enum HistoryEventError: Error {
    case malformed
}

extension EntityCell: ActivityOutcomeReceiver {
    func receive(activity id: UInt64, _ outcome: Result<[UInt8], ActivityFailure>, _ attempt: ActivityAttempt,
                 reply: @escaping VoidReply) -> Bool {
        enqueue(.activityOutcome(id: id, outcome, attempt, reply: reply))
    }
}
