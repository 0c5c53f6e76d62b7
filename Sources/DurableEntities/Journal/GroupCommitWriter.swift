import DequeModule
import Dispatch
import Foundation
import LMDB
import Metrics
import Synchronization

/// The journal's single writer: one dedicated thread owns every LMDB write transaction.
///
/// Callers on any thread ``enqueue(_:)`` a ``Submission``. The thread takes *whatever is queued* (up to
/// ``Journal/Configuration/maxOperationsPerCommit``), checks each submission on its own, writes the
/// valid ones into one transaction, commits, publishes the new tail index, and hands the completions
/// to a serial completion queue — so the next transaction starts while callers are being resumed. A
/// failed commit fails every submission in it; nothing of it is visible, because in-memory state
/// changes only after a successful commit.
///
/// A batch does not wait to fill, except when *paced*: while the journal's ``CommitProducers``
/// report work on its way (turns queued or running), a commit waits for their submissions until
/// ``Journal/Configuration/commitWindow`` has passed since the previous commit started, until they
/// go idle, or until a full batch waits; and a ``Journal/Configuration/commitLinger``, off by
/// default, holds every commit but the first until that long after the previous one started, work
/// on its way or not. Each commit costs a fixed share of CPU
/// (LMDB copies the touched tables' paths from root to leaf, writes them and the meta page, and
/// flushes twice, and each commit wakes the threads downstream), taken from the turns on a busy
/// machine: committing as often as possible, `saga-transfer` made ~2.7 times the commits it makes
/// paced, while its turns had work queued anyway.
///
/// `@unchecked Sendable`: the queue is guarded by `condition`; the `state` is touched only by the
/// writer thread (and read once by `shutdown` after that thread has ended).
final class GroupCommitWriter: @unchecked Sendable {
    struct Submission: Sendable {
        let batch: JournalBatch
        let completion: @Sendable (Result<CommitReceipt, JournalError>) -> Void
    }

    private let environment: Environment
    private let stores: Journal.Stores
    private let tails: TailIndex
    private let keys: KeyAllocator
    private let pendingNames: PendingNames
    /// The deferred name index's progress (see ``PendingNames``).
    private var merge = NameMerge()
    private let configuration: Journal.Configuration
    /// The newest appended records, so moves seldom read the log back.
    private let recent: RecentRecords
    /// The latest sequence of entities that recent commits left without a tail (see ``FreshHistories``).
    private let fresh = FreshHistories(capacity: 16_384)
    private var state: WriterCounters
    /// Entities whose tail reached the coalesce threshold and awaits a move (owed work).
    private var fullTails: Set<UInt64>
    /// Damaged tails found at open (``Journal/Recovered/damagedTails``), moved by the first commit.
    private var damagedTails: Set<UInt64>
    /// Names the last commit registered: the room its successor reserves for its own (writer thread only).
    private var lastRegistrationCount = 0

    /// Counters for benchmarks and metrics.
    let statistics = Mutex(Journal.Statistics())
    /// swift-metrics: commits, their sizes (operations) and durations (fsync included).
    private let commitsMetric: Counter
    private let batchSizeMetric: Recorder
    private let commitDurationMetric: Metrics.Timer
    private let condition = NSCondition()
    private var pending = Deque<Submission>()
    /// Operations in `pending`.
    private var pendingOperations = 0
    /// Submissions in the last batch taken (writer thread only).
    private var lastBatchCount = 0
    /// What paces commits (see the type's doc), `nil` before ``pace(with:)``.
    private var producers: (any CommitProducers)?
    /// The writer waits for producers (a signal ends the wait).
    private var pacing = false
    /// When the last commit started.
    private var lastStart = ContinuousClock.now
    /// Whether a commit started since opening (the first one does not linger).
    private var hasCommitted = false
    private var closing = false
    private var finished = false
    /// Set by a commit that failed with MDB_PANIC: LMDB cannot commit again until the environment
    /// is reopened, so every later submission fails at once with this (see ``stop(_:)``).
    private var stopped: JournalError?
    /// Told once, when the journal stops.
    private var onStop: [@Sendable (JournalError) -> Void] = []
    private let completions = DispatchQueue(label: "DurableEntities.Journal.completions")
    private var thread: Thread?

    init(environment: Environment, stores: Journal.Stores, tails: TailIndex, keys: KeyAllocator, pending: PendingNames,
         configuration: Journal.Configuration, recovered: Journal.Recovered) {
        self.environment = environment
        self.stores = stores
        self.tails = tails
        self.keys = keys
        self.pendingNames = pending
        if recovered.mergedRowsLeft { merge.phase = .deleting(upTo: recovered.mergedBefore) }
        self.configuration = configuration
        commitsMetric = Counter(label: "durable_entities_journal_commits", dimensions: configuration.metricsDimensions)
        batchSizeMetric = Recorder(label: "durable_entities_journal_commit_operations", dimensions: configuration.metricsDimensions)
        commitDurationMetric = Metrics.Timer(label: "durable_entities_journal_commit_duration", dimensions: configuration.metricsDimensions)
        self.recent = RecentRecords(capacity: configuration.recentRecordBytes)
        self.state = WriterCounters(nextPosition: recovered.nextPosition, liveHead: recovered.liveHead,
                                    nextNameSequence: recovered.nextNameSequence)
        self.fullTails = recovered.fullTails
        self.damagedTails = recovered.damagedTails
        completions.setSpecific(key: Self.onCompletions, value: true)
        let thread = Thread { [unowned self] in self.run() }
        thread.stackSize = 8 << 20
        self.thread = thread
        thread.start()
    }

    func enqueue(_ submission: Submission) {
        condition.lock()
        if closing {
            condition.unlock()
            submission.completion(.failure(JournalError(.closed, "the journal is closed; nothing was written")))
            return
        }
        if let stopped {
            condition.unlock()
            submission.completion(.failure(stopped))
            return
        }
        pending.append(submission)
        pendingOperations += submission.batch.operations.count
        if pending.count == 1 || (pacing && pendingOperations >= configuration.maxOperationsPerCommit) { condition.signal() }
        condition.unlock()
    }

    /// From now on, commits wait for `producers`' submissions (see the type's doc).
    func pace(with producers: any CommitProducers) {
        condition.lock()
        self.producers = producers
        condition.unlock()
    }

    /// The producers went idle: a commit waiting for them starts now.
    func producersIdle() {
        condition.lock()
        if pacing { condition.signal() }
        condition.unlock()
    }

    /// Stops taking submissions, commits everything already queued, and waits for the thread to end
    /// and for every completion to have run.
    func shutdown(abandoningQueued: Bool = false) {
        condition.lock()
        if abandoningQueued {
            // As if the process died now: what is queued was never committed, so its callers never
            // get an acknowledgement.
            let lost = pending
            pending.removeAll()
            pendingOperations = 0
            completions.async {
                for submission in lost {
                    submission.completion(.failure(JournalError(.closed, "the journal was abandoned (a simulated crash); nothing of this batch was written")))
                }
            }
        }
        closing = true
        condition.broadcast()
        while !finished { condition.wait() }
        condition.unlock()
        // From a completion itself (a caller closing the journal in its callback), the completions
        // queued after it run once it returns: waiting for them here would wait for itself.
        if DispatchQueue.getSpecific(key: Self.onCompletions) == nil { completions.sync {} }
    }

    /// Marks the completion queue, to tell a call made on it.
    private static let onCompletions = DispatchSpecificKey<Bool>()

    private func run() {
        Thread.current.name = "de-journal"  // shows in top -H, perf and gdb
        while let (batch, operations) = nextBatch() {
            process(batch, operations: operations)
        }
        condition.lock()
        finished = true
        condition.broadcast()
        condition.unlock()
    }

    /// Blocks until something is queued; returns `nil` when closing and drained, else the batch and
    /// its operation count.
    private func nextBatch() -> (batch: Deque<Submission>, operations: Int)? {
        // Allocated before the lock: swapped in below, it is the queue the callers append to next,
        // sized like the last batch so that they do not grow it under the lock.
        var batch = Deque<Submission>(minimumCapacity: lastBatchCount)
        condition.lock()
        defer { condition.unlock() }
        while pending.isEmpty {
            if closing { return nil }
            condition.wait()
        }
        pace()
        lastStart = .now
        hasCommitted = true
        // The callers (the shards) wait for this lock: when everything queued fits, take the whole
        // queue in O(1) instead of moving its ~300 submissions one by one while they wait.
        var operations = 0
        if pendingOperations <= configuration.maxOperationsPerCommit {
            swap(&batch, &pending)
            operations = pendingOperations
        } else {
            while let next = pending.first,
                  batch.isEmpty || operations + next.batch.operations.count <= configuration.maxOperationsPerCommit {
                operations += next.batch.operations.count
                batch.append(pending.removeFirst())
            }
        }
        pendingOperations -= operations
        lastBatchCount = batch.count
        return (batch, operations)
    }

    /// Pacing, with the lock held and something queued: the producers' submissions join this commit,
    /// up to the window after the previous commit started, and every commit waits out the linger.
    /// Ends early when closing or when a full batch waits.
    private func pace() {
        let window = producers == nil ? Duration.zero : configuration.commitWindow
        let linger = hasCommitted ? configuration.commitLinger : .zero
        guard window > .zero || linger > .zero else { return }
        pacing = true
        defer { pacing = false }
        while !closing, pendingOperations < configuration.maxOperationsPerCommit {
            let producing = window > .zero && producers?.areProducing == true
            let left = ContinuousClock.now.duration(to: lastStart + (producing ? max(window, linger) : linger))
            guard left > .zero else { break }
            let (seconds, attoseconds) = left.components
            _ = condition.wait(until: Date(timeIntervalSinceNow: Double(seconds) + Double(attoseconds) / 1e18))
        }
    }

    // MARK: One group commit

    /// What a transaction body produced, published only after the commit succeeds.
    private struct Outcome {
        var results: [Result<CommitReceipt, JournalError>]
        var deltas: [UInt64: TailDelta] = [:]
        var fullTails: Set<UInt64> = []
        var state: WriterCounters
        /// Names registered, and the deferred name index's phase after the commit.
        var registered: [PendingName] = []
        var mergePhase: NameMerge.Phase = .idle
    }

    private func process(_ batch: Deque<Submission>, operations: Int) {
        merge.advance(limit: configuration.deferredNameLimit, next: state.nextNameSequence, pending: pendingNames)
        let outcome: Outcome
        let started = ContinuousClock.now
        var built = started
        do {
            outcome = try environment.write { txn in
                let outcome = try write(batch, in: txn)
                built = ContinuousClock.now
                // A failure on purpose (tests): the transaction ran and is aborted, as on a real failure.
                if let faults = configuration.faults, let fault = faults.commitFault(batch.lazy.map(\.batch)) { throw fault }
                return outcome
            }
        } catch {
            let failure = JournalError.storage(error, "committing \(batch.count) batches; none of them was written")
            configuration.logger.error("journal commit failed", metadata: ["journal.error": "\(error)"])
            completions.async { for submission in batch { submission.completion(.failure(failure)) } }
            if let lmdb = error as? LMDBError, lmdb.code == .panic { stop(failure) }
            return
        }
        state = outcome.state
        fullTails = outcome.fullTails
        damagedTails.removeAll()  // moved
        lastRegistrationCount = outcome.registered.count
        // Before any caller is completed: a registered name is found from the moment its commit is acknowledged.
        pendingNames.add(outcome.registered)
        if case .merging = merge.phase, case .deleting = outcome.mergePhase {
            pendingNames.endMerge()  // only now, after the commit that put the batch's last names into `names`
        }
        merge.phase = outcome.mergePhase
        let committed = ContinuousClock.now
        statistics.withLock { stats in
            stats.commits += 1
            stats.submissions += batch.count
            stats.operations += operations
            stats.buildTime += built - started
            stats.commitTime += committed - built
        }
        commitsMetric.increment()
        batchSizeMetric.record(operations)
        commitDurationMetric.record(duration: committed - started)
        tails.publish(outcome.deltas)
        for (entity, delta) in outcome.deltas where delta.count == 0 { fresh.add(entity, latest: delta.latestSequence) }
        completions.async {
            for (submission, result) in zip(batch, outcome.results) { submission.completion(result) }
        }
    }

    /// After MDB_PANIC ("the environment had a fatal error; it must be closed"): no transaction can
    /// commit any more. Every submission from now on fails at once with `storage` (nothing written;
    /// nothing acknowledged is lost: what was committed stays, and the next open recovers), and the
    /// journal's stop handlers are told, so the application can restart rather than keep failing.
    private func stop(_ cause: JournalError) {
        let error = JournalError(.storage, "the journal stopped after a fatal storage failure (\(cause.message)); nothing was "
                                 + "written. Close the runtime and open it again, or restart the process: the open recovers "
                                 + "everything committed", underlying: cause.underlying ?? cause)
        configuration.logger.critical("the journal stopped: LMDB reported a fatal error; reopen the directory (restart the process)",
                                      metadata: ["journal.error": "\(cause)"])
        condition.lock()
        guard stopped == nil else {
            condition.unlock()
            return
        }
        stopped = error
        // Submissions already queued fail too.
        let queued = pending
        pending.removeAll()
        pendingOperations = 0
        let handlers = onStop
        onStop = []
        condition.unlock()
        completions.async {
            for submission in queued { submission.completion(.failure(error)) }
            for handler in handlers { handler(error) }
        }
    }

    /// Why the journal stopped (see ``stop(_:)``), or `nil` while it commits.
    var stopReason: JournalError? {
        condition.lock()
        defer { condition.unlock() }
        return stopped
    }

    /// Calls `handler` (on the completion queue) when the journal stops; at once if it has.
    func whenStopped(_ handler: @escaping @Sendable (JournalError) -> Void) {
        condition.lock()
        let stopped = self.stopped
        if stopped == nil { onStop.append(handler) }
        condition.unlock()
        if let stopped { completions.async { handler(stopped) } }
    }

    /// The transaction body. Re-runnable: it changes nothing outside the transaction (LMDB runs it
    /// again after growing a full map).
    private func write(_ batch: Deque<Submission>, in txn: borrowing WriteTransaction) throws -> Outcome {
        var context = CommitContext(stores: stores, tails: tails, keys: keys, configuration: configuration, counters: state, recent: recent,
                                    pending: pendingNames, fresh: fresh)
        context.fullTails = fullTails
        context.damagedTails = damagedTails
        context.mergePhase = merge.phase
        context.deltas.reserveCapacity(batch.count)
        // A busy commit registers tens of names (every new entity): sized like the last commit's and a
        // quarter more, the tables seldom grow (rehashing every name, several times a commit).
        context.reserveRegistrations(lastRegistrationCount + lastRegistrationCount / 4)
        var outcome = Outcome(results: [], state: state)
        outcome.results.reserveCapacity(batch.count)
        for index in batch.indices {
            do {
                try context.validate(batch[index].batch, in: txn)
            } catch let refusal as JournalError {
                outcome.results.append(.failure(refusal))
                continue
            }
            outcome.results.append(.success(try context.apply(batch[index].batch, in: txn)))
        }
        // Moves are owed work, paid a bounded amount per commit so no single commit stalls: what was
        // appended plus an eighth (so the backlog shrinks under load) plus a floor (so it drains when
        // load stops). A steady budget keeps commit times steady: with twice the appended count, waves
        // of tails filling together made one commit in ten take twice as long (build p90 4.2 ms against
        // a 2.2 ms median at 1,000 entities), and that spread was most of the append latency's p99.
        context.moveBudget = context.appendedCount + context.appendedCount / 8 + 128
        try context.moveDamagedTails(in: txn)
        try context.moveExpiredTails(in: txn)
        try context.moveFullTails(in: txn)
        try context.trimLog(in: txn)
        try context.mergeNames(in: txn)
        outcome.deltas = context.deltas
        outcome.registered = context.registered
        outcome.mergePhase = context.mergePhase
        outcome.fullTails = context.fullTails
        outcome.state = context.counters
        return outcome
    }
}

/// The writer's counters, changed only after a commit succeeds.
private struct WriterCounters {
    /// The log position the next appended event gets.
    var nextPosition: UInt64
    /// The oldest log position that may still be live (not yet moved to history).
    var liveHead: UInt64
    /// The `pending-names` row the next registration gets.
    var nextNameSequence: UInt64
}

/// The working state of one transaction body: the tails it touched, counters, scratch space.
private struct CommitContext {
    let stores: Journal.Stores
    let tails: TailIndex
    let configuration: Journal.Configuration
    var counters: WriterCounters
    var nextPosition: UInt64 {
        get { counters.nextPosition }
        set { counters.nextPosition = newValue }
    }
    var liveHead: UInt64 {
        get { counters.liveHead }
        set { counters.liveHead = newValue }
    }
    let keys: KeyAllocator
    /// What this transaction changes in the tails it touched.
    var deltas: [UInt64: TailDelta] = [:]
    /// Entities whose tail reached the coalesce threshold, waiting for a move.
    var fullTails: Set<UInt64> = []
    /// Damaged tails found at open, all moved by this transaction whatever the budget.
    var damagedTails: Set<UInt64> = []
    var appendedCount = 0
    /// How many events this transaction may still move.
    var moveBudget = 0
    var registeredHere: [EntityName: EntityKey] = [:]
    /// The keys of `registeredHere`, to check a reserved key in O(1).
    var keysRegisteredHere: Set<EntityKey> = []
    /// For each `registerAs` of the batch being validated, in order: whether its name had no key
    /// (`apply` then registers it without looking the name up again).
    var namesFound: [Bool] = []
    var namesApplied = 0
    var chunk = ChunkBuilder()
    let recent: RecentRecords
    let pending: PendingNames
    let fresh: FreshHistories
    /// Names this transaction registered, in order.
    var registered: [PendingName] = []
    /// The deferred name index's phase, as this transaction leaves it.
    var mergePhase = NameMerge.Phase.idle

    init(stores: Journal.Stores, tails: TailIndex, keys: KeyAllocator, configuration: Journal.Configuration, counters: WriterCounters,
         recent: RecentRecords, pending: PendingNames, fresh: FreshHistories) {
        self.recent = recent
        self.fresh = fresh
        self.pending = pending
        self.stores = stores
        self.tails = tails
        self.keys = keys
        self.configuration = configuration
        self.counters = counters
    }

    /// The entity's tail as this transaction sees it: a delta over the published run or, when the
    /// entity has no tail, an empty one after its latest committed sequence.
    private mutating func delta(of entity: UInt64, in txn: borrowing WriteTransaction) throws -> TailDelta {
        if let delta = deltas[entity] { return delta }
        let delta: TailDelta
        if let published = tails.shape(of: entity) {
            delta = TailDelta(baseCount: published.count, firstSequence: published.firstSequence)
        } else {
            let latest = try fresh.take(entity) ?? Journal.latestCommittedSequence(of: entity, in: txn, stores: stores)
            delta = TailDelta(baseCount: 0, firstSequence: latest + 1)
        }
        deltas[entity] = delta
        return delta
    }

    /// Every position of the entity's tail as this transaction sees it.
    private func positions(of entity: UInt64, _ delta: TailDelta) -> [UInt64] {
        guard !delta.moved, delta.baseCount > delta.dropped, let published = tails.run(of: entity) else { return delta.appended.array() }
        var positions = Array(published.positions[delta.dropped...])
        delta.appended.append(to: &positions)
        return positions
    }

    /// The oldest position of the entity's tail, without copying it.
    private func firstPosition(of entity: UInt64) -> UInt64? {
        if let delta = deltas[entity] {
            if !delta.moved, delta.baseCount > delta.dropped { return tails.run(of: entity)?.positions[delta.dropped] }
            return delta.appended.first
        }
        return tails.run(of: entity)?.positions.first
    }

    /// Room for `count` names registered in this transaction.
    mutating func reserveRegistrations(_ count: Int) {
        guard count > 0 else { return }
        registeredHere.reserveCapacity(count)
        keysRegisteredHere.reserveCapacity(count)
        registered.reserveCapacity(count)
    }

    /// Checks a batch without writing anything: sequence numbers, entity keys, sizes.
    mutating func validate(_ batch: JournalBatch, in txn: borrowing WriteTransaction) throws {
        namesFound.removeAll(keepingCapacity: true)
        namesApplied = 0
        // Latest sequence per entity within this batch. Most batches touch one entity: keep it inline
        // and only spill to an array for others.
        var first: (entity: UInt64, sequence: UInt64) = (0, 0)
        var others: [(entity: UInt64, sequence: UInt64)] = []
        let maxPayload = configuration.maxPayloadBytes
        func checkSize(_ count: Int, _ entity: EntityKey?, _ sequence: UInt64?, _ what: String) throws(JournalError) {
            guard count <= maxPayload else {
                throw JournalError(.payloadTooLarge, key: entity, sequence: sequence,
                                   "the \(what) has \(count) bytes, more than the limit of \(maxPayload); nothing was written")
            }
        }
        func checkKnown(_ entity: EntityKey, _ sequence: UInt64?) throws(JournalError) {
            guard entity.rawValue > 0, entity.rawValue < keys.bound else {
                throw JournalError(.unknownEntity, key: entity, sequence: sequence,
                                   "no entity is registered under this key; register it first. Nothing was written")
            }
        }
        // This batch's registrations so far (`nil`: a key the commit allocates, or the one the name has):
        // checked against each other, since the journal's tables do not show them until applied.
        var registering: [(name: EntityName, key: EntityKey?)] = []
        for operation in batch.operations {
            switch operation {
            case .register(let name):
                _ = try name.nameKeyCount()
                registering.append((name, nil))
            case .registerAs(let name, let key):
                try checkKnown(key, nil)
                for earlier in registering {
                    if earlier.name == name, earlier.key != key, try earlier.key != nil || existingKey(of: name, in: txn) != key {
                        throw JournalError(.unknownEntity, entity: name, key: key,
                                           "the batch registers the entity under two keys; nothing was written")
                    }
                    if earlier.key == key, earlier.name != name {
                        throw JournalError(.unknownEntity, entity: name, key: key,
                                           "the batch registers two entities (\(earlier.name) first) under one key; nothing was written")
                    }
                }
                namesFound.append(try validateRegistration(name, as: key, in: txn))
                registering.append((name, key))
            case .append(let entity, let events):
                let sequence = events.firstSequence
                try checkKnown(entity, sequence)
                try events.forEach { sequence, record throws(JournalError) in
                    try checkSize(record.count - JournalLayout.checksumBytes, entity, sequence, "event")
                }
                let latest = events.nextSequence - 1
                let slot = first.entity == entity.rawValue ? -1 : others.firstIndex { $0.entity == entity.rawValue }
                let previous: UInt64
                switch slot {
                case -1: previous = first.sequence
                case let index?: previous = others[index].sequence
                case nil: previous = try delta(of: entity.rawValue, in: txn).latestSequence
                }
                guard sequence == previous + 1 else {
                    let name = try? Key8(entity.rawValue).withBytes { k in
                        try txn.withValue(forKey: k, in: stores.entities) { v in
                            try v.map { v throws(JournalError) in try EntityMetadata.decode(v, key: entity).name }
                        }
                    }
                    throw JournalError(.nonConsecutiveSequence, entity: name ?? nil, key: entity, sequence: sequence,
                                       "the entity's latest sequence is \(previous), so the next append must be \(previous + 1); nothing was written")
                }
                switch slot {
                case -1: first.sequence = latest
                case let index?: others[index].sequence = latest
                case nil where first.entity == 0: first = (entity.rawValue, latest)
                case nil: others.append((entity.rawValue, latest))
                }
            case .snapshot(let entity, let sequence, let payload):
                try checkKnown(entity, sequence)
                guard sequence < JournalLayout.snapshotHeaderChecked else {
                    throw JournalError(.nonConsecutiveSequence, key: entity, sequence: sequence,
                                       "a snapshot's sequence must be below 2^63 (an entity's events never reach it); nothing was written")
                }
                try checkSize(payload.count, entity, sequence, "snapshot")
            case .prune(let entity, _), .metadata(let entity, _):
                try checkKnown(entity, nil)
            case .scheduleTimer(let timer):
                try checkKnown(timer.entity, nil)
                try checkSize(timer.payload.count, timer.entity, nil, "timer payload")
            case .cancelTimer:
                break
            case .putTask(let key, let value), .replaceTask(let key, let value):
                guard (1...511).contains(key.count) else {
                    throw JournalError(.nameTooLong, "a task key must have 1...511 bytes (got \(key.count)); nothing was written")
                }
                try checkSize(value.count, nil, nil, "task")
            case .deleteTask(let key):
                guard (1...511).contains(key.count) else {
                    throw JournalError(.nameTooLong, "a task key must have 1...511 bytes (got \(key.count)); nothing was written")
                }
            case .expectTask(let key, let expected):
                let holds = try key.withUnsafeBytes { key in
                    try txn.withValue(forKey: key, in: stores.tasks) { value -> Bool in
                        guard let value else { return expected == nil }
                        guard let expected, let payload = JournalLayout.keyedPayload(key: key, value: value) else { return false }
                        return payload.elementsEqual(expected)
                    }
                }
                guard holds else {
                    throw JournalError(.conflict, "the task row the batch expected changed since it was read; nothing was written")
                }
            case .expectTimer(let due, let entity, let id):
                let stored = try Key24(due, entity.rawValue, id).withBytes { key in
                    try txn.withValue(forKey: key, in: stores.timers) { $0 != nil }
                }
                guard stored else {
                    throw JournalError(.conflict, key: entity, "the timer the batch expected is no longer stored; nothing was written")
                }
            case .recordResult(let key, let payload, _):
                guard (1...JournalLayout.maxResultKeyBytes).contains(key.count) else {
                    throw JournalError(.nameTooLong,
                                       "an idempotency key must have 1...\(JournalLayout.maxResultKeyBytes) bytes (got \(key.count)); nothing was written")
                }
                try checkSize(payload.count, nil, nil, "recorded result")
            case .expireResults:
                break
            }
        }
    }

    /// The coalesce threshold of one entity: the configured one, spread by up to +50% by a hash of the
    /// key, so entities that receive events in lock-step (round-robin load) do not all fill at once
    /// and make one commit move everything.
    func threshold(of entity: UInt64) -> Int {
        let base = configuration.coalesceThreshold
        let spread = (entity &* 0x9E37_79B9_7F4A_7C15) >> 33
        return base + Int(spread % UInt64(base / 2 + 1))
    }

    /// Writes a validated batch. Returns its receipt: the keys of the entities it registered, and how
    /// many recorded results it expired.
    mutating func apply(_ batch: JournalBatch, in txn: borrowing WriteTransaction) throws -> CommitReceipt {
        var receipt = CommitReceipt()
        for operation in batch.operations {
            switch operation {
            case .register(let name):
                receipt.registered.append(try register(name, in: txn))
            case .registerAs(let name, let key):
                let found = namesFound[namesApplied]
                namesApplied += 1
                // Validated just now: only a name registered earlier in this batch needs looking at.
                receipt.registered.append(found ? key : try registeredHere[name] ?? insertName(name, as: key, in: txn))
            case .append(let entity, let events):
                if keysRegisteredHere.contains(entity), deltas[entity.rawValue]!.count == 0 {
                    try putNewHistory(of: entity.rawValue, events, in: txn)
                    continue
                }
                try events.forEach { sequence, record in
                    let position = nextPosition
                    nextPosition += 1
                    try Key8(position).withBytes { key in
                        // The log record: entity, sequence, then the event's `CRC-32C + payload` record
                        // with the header's checksum XORed into the CRC-32C.
                        try txn.put(reserving: JournalLayout.logHeader - JournalLayout.checksumBytes + record.count, forKey: key,
                                    in: stores.log, flags: .append) { out in
                            out.storeBigEndian(entity.rawValue, at: 0)
                            out.storeBigEndian(sequence, at: 8)
                            UnsafeMutableRawBufferPointer(rebasing: out[16...]).copyMemory(from: record)
                            out.storeLittleEndian(record.littleEndianUInt32(at: 0) ^ JournalLayout.headerCheck(entity: entity.rawValue, sequence: sequence),
                                                  at: 16)
                        }
                    }
                    recent.record(position: position, record: record)
                    if deltas[entity.rawValue]!.append(position) == threshold(of: entity.rawValue) { fullTails.insert(entity.rawValue) }
                }
                appendedCount += events.count
            case .snapshot(let entity, let sequence, let payload):
                // The check covers the entity and the sequence too; the flag says so (see `JournalLayout`).
                let checksum = CRC32C.checksum(payload) ^ JournalLayout.headerCheck(entity: entity.rawValue, sequence: sequence)
                try Key8(entity.rawValue).withBytes { key in
                    try txn.put(reserving: 12 + payload.count, forKey: key, in: stores.snapshots) { out in
                        out.storeBigEndian(sequence | JournalLayout.snapshotHeaderChecked, at: 0)
                        out.storeLittleEndian(checksum, at: 8)
                        payload.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: out[12...]).copyMemory(from: $0) }
                    }
                }
            case .prune(let entity, let before):
                try prune(entity, before: before, in: txn)
            case .metadata(let entity, var metadata):
                if let existing = try readMetadata(entity, in: txn) { metadata.prunedBefore = existing.prunedBefore }
                try Key8(entity.rawValue).withBytes { key in
                    try metadata.encoded().withUnsafeBytes { try txn.put($0, forKey: key, in: stores.entities) }
                }
            case .scheduleTimer(let timer):
                try Key24(timer.dueNanoseconds, timer.entity.rawValue, timer.id).withBytes { key in
                    try timer.payload.withUnsafeBytes { try putKeyed($0, forKey: key, in: stores.timers, txn) }
                }
            case .cancelTimer(let due, let entity, let id):
                try Key24(due, entity.rawValue, id).withBytes { key in _ = try txn.delete(key, in: stores.timers) }
            case .putTask(let key, let value):
                try key.withUnsafeBytes { key in
                    try value.withUnsafeBytes { value in try putKeyed(value, forKey: key, in: stores.tasks, txn) }
                }
            case .replaceTask(let key, let value):
                try key.withUnsafeBytes { key in
                    guard try txn.withValue(forKey: key, in: stores.tasks, { $0 != nil }) else { return }
                    try value.withUnsafeBytes { value in try putKeyed(value, forKey: key, in: stores.tasks, txn) }
                }
            case .deleteTask(let key):
                _ = try key.withUnsafeBytes { key in try txn.delete(key, in: stores.tasks) }
            case .expectTask, .expectTimer:
                break  // checked by `validate`
            case .recordResult(let key, let payload, let recordedAt):
                do {
                    try key.withUnsafeBytes { key in
                        try payload.withUnsafeBytes { try putKeyed($0, forKey: key, in: stores.idempotency, txn, flags: .noOverwrite) }
                    }
                } catch let error as LMDBError where error.code == .keyExists {
                    continue  // The first recorded result wins, and keeps its time.
                }
                try txn.put([], forKey: JournalLayout.resultTimeKey(recordedAt, key), in: stores.resultTimes)
            case .expireResults(let before, let limit):
                receipt.expiredResults += try expireResults(recordedBefore: before, limit: limit, in: txn)
            }
        }
        return receipt
    }

    /// Deletes up to `limit` recorded results older than `before`, oldest first, with their time rows.
    private func expireResults(recordedBefore before: UInt64, limit: Int, in txn: borrowing WriteTransaction) throws -> Int {
        var expired = 0
        try txn.withCursor(stores.resultTimes) { cursor in
            var entry = try cursor.first()
            while expired < limit, let current = entry, current.key.bigEndianUInt64(at: 0) < before {
                // Copied: a write may move the page the cursor's key points into.
                let key = Array(current.key[8...])
                try key.withUnsafeBytes { key in _ = try txn.delete(key, in: stores.idempotency) }
                try cursor.deleteCurrent()
                expired += 1
                entry = try cursor.next()  // after a delete: the entry that took its place
            }
        }
        return expired
    }

    /// The key `name` is registered under, in this transaction or before it.
    private func existingKey(of name: EntityName, in txn: borrowing WriteTransaction) throws -> EntityKey? {
        if let key = registeredHere[name] ?? pending.key(for: name) { return key }
        return try name.withNameKey(count: name.nameKeyCount()) { k in
            try txn.withValue(forKey: k, in: stores.names) { v in v.map { EntityKey(rawValue: $0.bigEndianUInt64(at: 0)) } }
        }
    }

    /// A reserved key may take a name that has no key, or confirm the one it has; never two keys for
    /// one name, nor two names for one key. Returns whether the name has that key already.
    private func validateRegistration(_ name: EntityName, as key: EntityKey, in txn: borrowing WriteTransaction) throws -> Bool {
        if let existing = try existingKey(of: name, in: txn) {
            guard existing == key else {
                throw JournalError(.unknownEntity, entity: name, key: key,
                                   "the entity is already registered under \(existing); nothing was written")
            }
            return true
        }
        let owner = try Key8(key.rawValue).withBytes { k in try txn.withValue(forKey: k, in: stores.entities) { $0 != nil } }
        guard !owner, !keysRegisteredHere.contains(key) else {
            throw JournalError(.unknownEntity, entity: name, key: key, "the key belongs to another entity; nothing was written")
        }
        return false
    }

    private mutating func register(_ name: EntityName, in txn: borrowing WriteTransaction) throws -> EntityKey {
        if let existing = try existingKey(of: name, in: txn) { return existing }
        return try insertName(name, as: EntityKey(rawValue: keys.allocate()), in: txn)
    }

    /// Registers `name`, which has no key, under `key`: its metadata, and a `pending-names` row at
    /// that table's end (the `names` index gets it in a later merge, see ``PendingNames``).
    private mutating func insertName(_ name: EntityName, as key: EntityKey, in txn: borrowing WriteTransaction) throws -> EntityKey {
        let count = try name.nameKeyCount()
        let sequence = counters.nextNameSequence
        counters.nextNameSequence += 1
        try Key8(key.rawValue).withBytes { k in
            try EntityMetadata(name: name).encoded().withUnsafeBytes { try txn.put($0, forKey: k, in: stores.entities) }
        }
        try Key8(sequence).withBytes { row in
            try txn.put(reserving: 8 + count, forKey: row, in: stores.pendingNames, flags: .append) { out in
                out.storeBigEndian(key.rawValue, at: 0)
                name.withNameKey(count: count) { UnsafeMutableRawBufferPointer(rebasing: out[8...]).copyMemory(from: $0) }
            }
        }
        registered.append(PendingName(name: name, key: key))
        registeredHere[name] = key
        keysRegisteredHere.insert(key)
        return key
    }

    private func readMetadata(_ entity: EntityKey, in txn: borrowing WriteTransaction) throws -> EntityMetadata? {
        try Key8(entity.rawValue).withBytes { k in
            try txn.withValue(forKey: k, in: stores.entities) { v in
                try v.map { v throws(JournalError) in try EntityMetadata.decode(v, key: entity) }
            }
        }
    }

    /// Writes the events of an entity registered in this transaction, which has no tail yet, straight
    /// into its history range: as they are when they fit in one chunk (their buffer has a chunk's
    /// layout), else split into chunks. Its key is among the newest, so its range is at the history's
    /// end, where the log's pages would be too; this saves the log records and their later move (one
    /// record an event, read back and deleted).
    private mutating func putNewHistory(of entity: UInt64, _ events: JournalEvents, in txn: borrowing WriteTransaction) throws {
        if events.byteCount <= JournalLayout.chunkBytes {
            try Key16(entity, events.firstSequence).withBytes { key in
                try events.bytes.withUnsafeBytes { try txn.put($0, forKey: key, in: stores.history) }
            }
        } else {
            chunk.start(at: events.firstSequence)
            try events.forEach { sequence, record in
                if !chunk.fits(record.count) {
                    try putChunk(of: entity, in: txn)
                    chunk.start(at: sequence)
                }
                chunk.add(record: record)
            }
            try putChunk(of: entity, in: txn)
        }
        deltas[entity]!.firstSequence += UInt64(events.count)
    }

    /// Puts the chunk being built under its entity and first sequence.
    private func putChunk(of entity: UInt64, in txn: borrowing WriteTransaction) throws {
        guard !chunk.isEmpty else { return }
        try Key16(entity, chunk.firstSequence).withBytes { key in
            try chunk.bytes.withUnsafeBytes { try txn.put($0, forKey: key, in: stores.history) }
        }
    }

    /// Puts `payload` under `key` with its keyed check before it (timers, tasks, results: see `JournalLayout`).
    private func putKeyed(_ payload: UnsafeRawBufferPointer, forKey key: UnsafeRawBufferPointer, in database: Database,
                          _ txn: borrowing WriteTransaction, flags: PutFlags = []) throws(LMDBError) {
        let check = JournalLayout.keyedCheck(key: key, payload: payload)
        try txn.put(reserving: JournalLayout.checksumBytes + payload.count, forKey: key, in: database, flags: flags) { out in
            out.storeLittleEndian(check, at: 0)
            UnsafeMutableRawBufferPointer(rebasing: out[JournalLayout.checksumBytes...]).copyMemory(from: payload)
        }
    }

    /// Deletes events before `before` from history and from the entity's tail, and records the floor
    /// so the latest sequence survives even when every event is gone.
    private mutating func prune(_ entity: EntityKey, before requested: UInt64, in txn: borrowing WriteTransaction) throws {
        var tail = try delta(of: entity.rawValue, in: txn)
        let before = min(requested, tail.latestSequence + 1)
        guard before > 1 else { return }
        // Delete whole chunks before `before`; the chunk that straddles it is rewritten from `before`.
        var straddling: ChunkBuilder?
        try txn.withCursor(stores.history) { cursor in
            var entry = try Key16(entity.rawValue, 0).withBytes { try cursor.seek(atLeast: $0) }
            while let current = entry, current.key.bigEndianUInt64(at: 0) == entity.rawValue,
                  current.key.bigEndianUInt64(at: 8) < before {
                let chunk = HistoryChunk(firstSequence: current.key.bigEndianUInt64(at: 8), bytes: current.value)
                if let last = chunk.lastSequence, last >= before {
                    var rest = ChunkBuilder()
                    rest.start(at: before)
                    _ = chunk.forEach { sequence, record in
                        if sequence >= before { rest.add(record: record) }
                        return true
                    }
                    straddling = rest
                }
                try cursor.deleteCurrent()
                entry = try cursor.next()
            }
        }
        if let straddling {
            chunk = straddling
            try putChunk(of: entity.rawValue, in: txn)
        }
        if tail.firstSequence < before {
            var drop = min(Int(before - tail.firstSequence), tail.count)
            let fromBase = min(drop, tail.baseCount - tail.dropped)
            tail.dropped += fromBase
            drop -= fromBase
            tail.appended.removeFirst(drop)
            tail.firstSequence += UInt64(fromBase + drop)
            deltas[entity.rawValue] = tail
        }
        guard var metadata = try readMetadata(entity, in: txn) else { return }
        metadata.prunedBefore = max(metadata.prunedBefore, before)
        try Key8(entity.rawValue).withBytes { key in
            try metadata.encoded().withUnsafeBytes { try txn.put($0, forKey: key, in: stores.entities) }
        }
    }

    /// Moves an entity's whole tail from the log into its history range: one page for many events.
    @discardableResult
    private mutating func moveTail(of entity: UInt64, in txn: borrowing WriteTransaction) throws -> Int {
        var tail = try delta(of: entity, in: txn)
        let positions = positions(of: entity, tail)
        guard !positions.isEmpty else { return 0 }
        chunk.start(at: tail.firstSequence)
        for (offset, position) in positions.enumerated() {
            let sequence = tail.firstSequence + UInt64(offset)
            func add(_ record: UnsafeRawBufferPointer) throws {
                if !chunk.fits(record.count) {
                    try putChunk(of: entity, in: txn)
                    chunk.start(at: sequence)
                }
                chunk.add(record: record)
            }
            if try recent.withRecord(position: position, add) { continue }
            // Copied out of the log before `add` may put a chunk: a value LMDB returns is valid only
            // until the transaction's next write.
            let record = try Key8(position).withBytes { key in
                try txn.withValue(forKey: key, in: stores.log) { value -> [UInt8]? in
                    guard let value, value.count >= JournalLayout.logHeader, value.bigEndianUInt64(at: 0) == entity,
                          value.bigEndianUInt64(at: 8) == sequence else { return nil }
                    // History keeps the payload's own CRC-32C: the header's checksum comes out of the check
                    // (a damaged record stays one that fails its check).
                    var record = [UInt8](UnsafeRawBufferPointer(rebasing: value[16...]))
                    record.withUnsafeMutableBytes { $0.storeLittleEndian(JournalLayout.flippedCheck(ofLogRecord: value), at: 0) }
                    return record
                }
            }
            guard let record else {
                // Damage (the log has no record there, or another's): the tail moves anyway, with a
                // record that fails its checksum in that event's place, so reads of this entity
                // report the damage at that sequence while every other entity's commits go on.
                configuration.logger.error("the journal's log has no intact record of an event; its entity's history records the damage", metadata: [
                    "entity.key": "\(entity)", "sequence": "\(sequence)", "log.position": "\(position)"])
                try JournalLayout.missingRecord.withUnsafeBytes { try add($0) }
                if position != 0 { try markMoved(at: position, entity: entity, sequence: sequence, in: txn) }
                continue
            }
            try record.withUnsafeBytes { try add($0) }
        }
        try putChunk(of: entity, in: txn)
        tail.firstSequence += UInt64(positions.count)
        tail.baseCount = 0
        tail.dropped = 0
        tail.appended = AppendedPositions()
        tail.moved = true
        deltas[entity] = tail
        fullTails.remove(entity)
        moveBudget -= positions.count
        return positions.count
    }

    /// A log record of `entity` whose header claims another sequence (damage) stood for `sequence`
    /// in a tail move: its header now says `sequence`, so later opens see it as moved, as they see
    /// the tail's other records (left as it was, a later open would take it for the next event and
    /// record the damage again, one event further each time).
    private func markMoved(at position: UInt64, entity: UInt64, sequence: UInt64, in txn: borrowing WriteTransaction) throws {
        try Key8(position).withBytes { key in
            let value = try txn.withValue(forKey: key, in: stores.log) { value -> [UInt8]? in
                guard let value, value.count >= JournalLayout.logHeader, value.bigEndianUInt64(at: 0) == entity else { return nil }
                return Array(value)
            }
            guard var value else { return }
            value.withUnsafeMutableBytes { $0.storeBytes(of: sequence.bigEndian, toByteOffset: 8, as: UInt64.self) }
            try value.withUnsafeBytes { try txn.put($0, forKey: key, in: stores.log) }
        }
    }

    /// Moves the damaged tails found at open (see ``Journal/Recovered/damagedTails``), before anything
    /// else looks at their positions: the damage is then recorded in their histories.
    mutating func moveDamagedTails(in txn: borrowing WriteTransaction) throws {
        for entity in damagedTails.sorted() { try moveTail(of: entity, in: txn) }
    }

    /// Moves full tails (at or past the coalesce threshold), largest first, while the budget lasts.
    mutating func moveFullTails(in txn: borrowing WriteTransaction) throws {
        guard moveBudget > 0, !fullTails.isEmpty else { return }
        var candidates: [(entity: UInt64, count: Int)] = []
        candidates.reserveCapacity(fullTails.count)
        for entity in fullTails {
            let count = deltas[entity]?.count ?? tails.run(of: entity)?.positions.count ?? 0
            candidates.append((entity, count))
        }
        candidates.sort { $0.count != $1.count ? $0.count > $1.count : $0.entity < $1.entity }
        for candidate in candidates {
            guard moveBudget > 0 else { break }
            if candidate.count == 0 { fullTails.remove(candidate.entity); continue }
            try moveTail(of: candidate.entity, in: txn)
        }
    }

    /// Walks the log from its oldest live entry and moves the tails of entities whose oldest event is
    /// out of the window, so the log stays bounded.
    mutating func moveExpiredTails(in txn: borrowing WriteTransaction) throws {
        let window = UInt64(configuration.logWindow)
        guard nextPosition - liveHead > window, moveBudget > 0 else { return }
        var expired: [(position: UInt64, entity: UInt64)] = []
        let budget = moveBudget
        try txn.withCursor(stores.log) { cursor in
            var entry = try Key8(liveHead).withBytes { try cursor.seek(atLeast: $0) }
            var head = liveHead
            while let current = entry, nextPosition - head > window, expired.count < budget {
                let position = current.key.bigEndianUInt64(at: 0)
                expired.append((position, current.value.bigEndianUInt64(at: 0)))
                head = position + 1
                entry = try cursor.next()
            }
        }
        for (position, entity) in expired {
            guard moveBudget > 0 else { break }
            liveHead = position + 1
            guard firstPosition(of: entity) == position else { continue }  // moved already
            try moveTail(of: entity, in: txn)
        }
    }

    /// One slice of the deferred name index's work (see ``PendingNames``): sorted names into `names`,
    /// or merged rows out of `pending-names`. A slice is twice what this transaction registered and
    /// 128 rows more, so merges keep ahead of registrations while each commit takes a small share
    /// (512 more had made the commits of a merge's first ~100 ms long enough to show in the slowest
    /// 1% of `saga-transfer`'s transfers).
    mutating func mergeNames(in txn: borrowing WriteTransaction) throws {
        let budget = 128 + 2 * registered.count
        switch mergePhase {
        case .idle, .sorting:
            return
        case .merging(let sorted, let next, let upTo):
            let end = min(sorted.count, next + budget)
            try txn.withCursor(stores.names) { cursor in
                for index in next..<end {
                    try sorted.withEntry(at: index) { nameKey, key in
                        try Key8(key.rawValue).withBytes { try cursor.put($0, forKey: nameKey) }
                    }
                }
            }
            guard end == sorted.count else {
                mergePhase = .merging(sorted: sorted, next: end, upTo: upTo)
                return
            }
            // All in `names`: the watermark lets a reopen skip the rows until they are deleted.
            try Key8(0).withBytes { row in try Key8(upTo).withBytes { try txn.put($0, forKey: row, in: stores.pendingNames) } }
            mergePhase = .deleting(upTo: upTo)
        case .deleting(let upTo):
            var deleted = 0
            let done = try txn.withCursor(stores.pendingNames) { cursor -> Bool in
                var entry = try Key8(1).withBytes { try cursor.seek(atLeast: $0) }
                while let current = entry, current.key.bigEndianUInt64(at: 0) < upTo {
                    guard deleted < budget else { return false }
                    try cursor.deleteCurrent()
                    deleted += 1
                    entry = try cursor.next()
                }
                return true
            }
            if done { mergePhase = .idle }
        }
    }

    /// Deletes log entries below the oldest live one: contiguous deletes at the log's start.
    mutating func trimLog(in txn: borrowing WriteTransaction) throws {
        let head = liveHead
        try txn.withCursor(stores.log) { cursor in
            var entry = try cursor.first()
            while let current = entry, current.key.bigEndianUInt64(at: 0) < head {
                try cursor.deleteCurrent()
                entry = try cursor.next()
            }
        }
    }
}

/// The latest sequence of entities that a recent commit left without a tail: a new entity whose first
/// events went straight into its history range (its first turn), or one whose whole tail moved there.
/// Their next append needs that sequence, which the commit's tail delta knew; without this it is
/// looked up in the `history` and `entities` tables (a cursor and two B-tree searches, for nearly
/// every new entity's second commit).
///
/// One-shot and bounded: the transaction that needs an entry takes it (if that commit leaves the
/// entity without a tail again, it keeps the entry again; if it fails, the next one looks it up), and
/// the oldest entries beyond `capacity` are dropped. A missing entry only means a lookup. Entries
/// are added after their commit succeeded, so one is never ahead of what is durable; taking one
/// inside a transaction body that LMDB runs again (after growing the map) only costs the second run a
/// lookup.
///
/// Used by the writer thread only.
final class FreshHistories {
    private var latest: [UInt64: UInt64] = [:]
    /// Entities in the order they were added (taken ones too), to drop the oldest.
    private var order = Deque<UInt64>()
    private let capacity: Int

    init(capacity: Int) {
        self.capacity = max(1, capacity)
    }

    var count: Int { latest.count }

    /// `entity`'s latest sequence, if kept; removes it.
    func take(_ entity: UInt64) -> UInt64? {
        latest.isEmpty ? nil : latest.removeValue(forKey: entity)
    }

    /// Keeps `entity`'s latest sequence, dropping the oldest entry when full.
    func add(_ entity: UInt64, latest sequence: UInt64) {
        if order.count == capacity, let oldest = order.popFirst() { latest[oldest] = nil }
        order.append(entity)
        latest[entity] = sequence
    }
}
