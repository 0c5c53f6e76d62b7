import DequeModule
import Foundation
import Logging
import Metrics
import Synchronization

/// An activity, whatever its types: decodes its input, runs it, encodes its output.
protocol AnyActivity: Sendable {
    /// ``Activity/recordsAttemptStart`` of the registered type.
    var recordsAttemptStart: Bool { get }
    /// The metrics its attempts record into.
    var metrics: ActivityMetrics { get }
    func run(_ input: [UInt8], context: ActivityContext, codec: any EntityCodec) async throws -> [UInt8]
}

struct RegisteredActivity<A: Activity>: AnyActivity {
    let activity: A
    let metrics: ActivityMetrics

    init(activity: A, metricsDimensions: [(String, String)] = []) {
        self.activity = activity
        metrics = ActivityMetrics(activity: A.name, dimensions: metricsDimensions)
    }
    var recordsAttemptStart: Bool { A.recordsAttemptStart }
    func run(_ input: [UInt8], context: ActivityContext, codec: any EntityCodec) async throws -> [UInt8] {
        let decoded = try input.withUnsafeBytes { try codec.decode(A.Input.self, from: $0) }
        return try codec.encode(try await activity.run(decoded, context: context))
    }
}

/// Runs activity attempts outside the shards, at most `maxConcurrentActivities` at once (the rest
/// wait in a queue: backpressure on the pool, not on the shards). Applies the retry policy and the
/// timeouts, persists the attempt count between attempts, and hands each final outcome to the entity
/// as a message, which records it.
///
/// ## How attempts run
/// A few *drains* (one per processor at most) take attempts from the queue, one after another, on
/// threads of their own (Dispatch's global pool). Each attempt runs on a parked ``TurnRunner``, the
/// way a local activity's does inside a turn: the drain runs the attempt's work on its own thread
/// until the attempt ends or waits for something outside (I/O, a timer, another actor). An attempt
/// that waits leaves the drain: it goes on by itself on the global executor, still counted among the
/// running attempts, and the drain takes the next one. So an activity that computes and returns costs
/// neither a task of its own nor a thread wake-up, and one that waits for a network answer does not
/// hold a drain while it waits.
///
/// `@unchecked Sendable`: `core` is set once before use; everything else is in `Mutex`es.
final class ActivityWorker: @unchecked Sendable {
    private unowned(unsafe) var core: RuntimeCore!
    private let activities = Mutex<[String: any AnyActivity]>([:])
    /// The pool's bookkeeping (internal for its tests).
    struct Pool {
        /// Attempts running, on a drain or waiting on their own (at most the limit).
        var attempts = 0
        /// Drains taking attempts from the queue.
        var drains = 0
        var queue = Deque<ActivityTask>()
        /// Tasks queued or running, by key, with the attempt's number: a task is never run twice at once.
        var active: [ActivityTask.ID: Int] = [:]
        /// A task's next attempt, dispatched (by its retry timer) while the attempt before it still
        /// held its slot: it is queued as that slot ends.
        var following: [ActivityTask.ID: ActivityTask] = [:]
        /// The runtime is closing: no attempt starts, outcomes of running ones are dropped once the
        /// grace period ended (their tasks stay stored and run again at the next open).
        var closing = false

        /// Queues `task`, unless it is queued or running already; a later attempt of a task whose
        /// previous attempt still holds its slot waits for that slot to end. Returns whether it was queued.
        mutating func enqueue(_ task: ActivityTask) -> Bool {
            guard !closing else { return false }  // the task is stored, the next open runs it
            if let running = active[task.id] {
                if task.attempt > running { following[task.id] = task }
                return false
            }
            active[task.id] = task.attempt
            queue.append(task)
            return true
        }

        /// An attempt of task `id` ended its slot: a following attempt, if one came, is queued.
        mutating func endSlot(_ id: ActivityTask.ID) {
            attempts -= 1
            active.removeValue(forKey: id)
            if !following.isEmpty, let next = following.removeValue(forKey: id) { _ = enqueue(next) }
        }

        /// Takes task `id`'s attempt that has not started — queued, or following the attempt before
        /// it — out of the pool; `nil` if there is none.
        mutating func take(_ id: ActivityTask.ID) -> ActivityTask? {
            if let next = following.removeValue(forKey: id) { return next }
            guard let index = queue.firstIndex(where: { $0.id == id }) else { return nil }
            active.removeValue(forKey: id)
            return queue.remove(at: index)
        }

        /// Task `id` was given up: its queued attempt (if any) and the attempt that would follow the
        /// running one are dropped.
        mutating func forget(_ id: ActivityTask.ID) {
            following.removeValue(forKey: id)
            if let index = queue.firstIndex(where: { $0.id == id }) {
                queue.remove(at: index)
                active.removeValue(forKey: id)
            }
        }

        /// Whether a new drain is needed: attempts wait, a slot is free and fewer than `maxDrains`
        /// drains run. If so, it is counted.
        mutating func startsDrain(limit: Int, maxDrains: Int) -> Bool {
            guard !closing, !queue.isEmpty, attempts < limit, drains < maxDrains else { return false }
            drains += 1
            return true
        }
    }
    /// The pool's queue, under one lock taken about twice per attempt (queue, then end-and-take-next):
    /// every activity of every entity goes through it, so it is kept short and apart from the rest.
    /// Changed only through ``withPool(_:)``, which reports its counts.
    private let pool = Mutex(Pool())
    /// The pool's occupancy as gauges, recorded under its lock after each change, so the last value
    /// recorded is the current one: `durable_entities_activity_pool_queued` (attempts due and waiting
    /// for a slot) and `durable_entities_activity_pool_running` (attempts holding a slot, out of
    /// `maxConcurrentActivities`: running on a drain or waiting on their own).
    private let queuedGauge: Gauge
    private let runningGauge: Gauge
    /// The runtime's metric dimensions, for the activities registered later.
    private let metricsDimensions: [(String, String)]

    /// Changes the pool under its lock and records its counts.
    private func withPool<R: Sendable>(_ change: (inout Pool) -> R) -> R {
        pool.withLock { pool in
            let result = change(&pool)
            queuedGauge.record(pool.queue.count)
            runningGauge.record(pool.attempts)
            return result
        }
    }
    /// The attempts that left their drain (or their turn, for local ones), by id: close cancels them
    /// when the grace period ends.
    private struct Detached {
        var tasks: [UInt64: Task<Void, Never>] = [:]
        var next: UInt64 = 0
    }
    private let detached = Mutex(Detached())
    /// Attempts running, by task, with the runner that runs each — pool attempts, and local ones that
    /// left their turn once stored: a run that stops awaiting its activity (cancelled, terminated,
    /// continued as new) cancels the attempt once that is committed.
    /// An entry goes as its attempt's work returns, under this lock, so a cancellation never reaches
    /// the runner's next job (and a runner whose task was cancelled is not reused).
    private let running = Mutex(RunningAttempts())
    /// How many requests ``RunningAttempts/pendingCancels`` holds, read without its lock where every
    /// outcome would otherwise take it for nothing.
    private let pendingCancelCount = Atomic<Int>(0)
    /// How many tasks ``RunningAttempts/paused`` holds, read without its lock where every attempt
    /// would otherwise take it for nothing.
    private let pausedCount = Atomic<Int>(0)

    /// See ``running``.
    private struct RunningAttempts {
        struct Entry {
            let runner: TurnRunner
            /// Its run requested the activity's cancellation and waits for how the attempt ends
            /// (``ActivityCancellationType/waitCancellationCompleted``): see ``decide(_:_:_:)``.
            var cancelRequested = false
            /// An operator's pause interrupted it at a heartbeat (see ``heartbeatGiven(by:)``).
            var pauseInterrupted = false

            /// What was done to the attempt while it ran, for the decision on its end.
            var interruption: Interruption {
                cancelRequested ? .cancelRequested : pauseInterrupted ? .paused : .none
            }
        }
        var entries: [ActivityTask.ID: Entry] = [:]
        /// Cancellation requests (see ``requestCancel(entity:_:)``) for tasks that were neither
        /// queued nor running when they came, nor waiting for a retry: between two states (an attempt
        /// just taken from the queue, one whose end is being carried out, a retry due whose timer has
        /// not rung). Whoever moves the task next takes the request: an attempt starting
        /// (``insert(_:for:)``), a retry stored (``storeRetry(_:)``), a retry timer
        /// (``retryDue(_:done:)``), or the outcome's commit (``finish(_:_:_:)``).
        var pendingCancels: Set<ActivityTask.ID> = []
        /// Activities an operator paused (``reschedule(entity:activity:_:)``) whose pause row is
        /// stored or being stored (see ``ActivityTask/pauseKey(entity:activity:)``), loaded from those
        /// rows at open: no attempt of them starts (one taken from the queue is stored paused instead,
        /// see ``storePaused(_:rounds:)``), and a running attempt's failure stores the next one paused.
        /// Under this lock, so a pause either finds an attempt's entry (which then runs on) or comes
        /// before it.
        var paused: Set<ActivityTask.ID> = []

        /// Adds `runner`'s entry for task `id`; a request pending for the task cancels it. Returns
        /// whether it did (the caller cancels the runner's task).
        mutating func insert(_ runner: TurnRunner, for id: ActivityTask.ID) -> Bool {
            let cancelled = !pendingCancels.isEmpty && pendingCancels.remove(id) != nil
            entries[id] = Entry(runner: runner, cancelRequested: cancelled)
            return cancelled
        }
    }

    /// Adds the entry of `runner`, which runs an attempt of task `id`, unless `unlessPaused` and an
    /// operator's pause holds the task; returns whether it did. Under the lock a pause takes to hold
    /// the task, so a pause either finds the entry (the attempt runs on, ``Rescheduled/pausedAfter(attempt:)``)
    /// or comes before it (the attempt does not start, and the pause answers ``Rescheduled/paused(attempt:)``
    /// truly). A cancellation request pending for the task cancels it at once.
    @discardableResult
    private func trackRunning(_ runner: TurnRunner, for id: ActivityTask.ID, unlessPaused: Bool = false) -> Bool {
        let (runs, cancelled) = running.withLock { running -> (Bool, Bool) in
            if unlessPaused, !running.paused.isEmpty, running.paused.contains(id) { return (false, false) }
            return (true, running.insert(runner, for: id))
        }
        if cancelled {
            pendingCancelCount.subtract(1, ordering: .relaxed)
            runner.task.cancel()
        }
        return runs
    }

    /// Whether an operator's pause holds task `id` (see ``RunningAttempts/paused``).
    func isPauseHeld(_ id: ActivityTask.ID) -> Bool {
        guard pausedCount.load(ordering: .relaxed) > 0 else { return false }
        return running.withLock { $0.paused.contains(id) }
    }

    /// A running attempt of task `id` gave a heartbeat: if an operator's pause holds the task, the
    /// attempt is interrupted — its task is cancelled, once — and a failure it ends with is not
    /// counted (see ``decide(_:_:_:)``). One whose run requested its cancellation is left to that.
    /// Without a pause held, one relaxed atomic load.
    func heartbeatGiven(by id: ActivityTask.ID) {
        guard pausedCount.load(ordering: .relaxed) > 0 else { return }
        let runner = running.withLock { running -> TurnRunner? in
            guard running.paused.contains(id), let entry = running.entries[id], entry.interruption == .none else { return nil }
            running.entries[id]!.pauseInterrupted = true
            return entry.runner
        }
        runner?.task.cancel()
    }

    /// Holds task `id` paused from now on (see ``RunningAttempts/paused``). Returns whether an attempt
    /// of it runs now: that one goes on.
    private func holdPaused(_ id: ActivityTask.ID) -> Bool {
        running.withLock { running in
            if running.paused.insert(id).inserted { pausedCount.add(1, ordering: .relaxed) }
            return running.entries[id] != nil
        }
    }

    /// Task `id` is no longer held paused; whether it was.
    @discardableResult
    private func releasePause(_ id: ActivityTask.ID) -> Bool {
        guard pausedCount.load(ordering: .relaxed) > 0 else { return false }
        return running.withLock { running in
            guard running.paused.remove(id) != nil else { return false }
            pausedCount.subtract(1, ordering: .relaxed)
            return true
        }
    }

    /// Task `id` ended (its outcome recorded) or was given up: its pause, if it had one (or `stored`:
    /// its row is known to be there), goes with its row (not waited for; a row left by a crash goes at
    /// the next open).
    private func dropPause(_ id: ActivityTask.ID, stored: Bool = false) {
        guard releasePause(id) || stored else { return }
        deletePauseRows([id])
    }

    /// Deletes the pause rows of tasks `ids` (not waited for; counted busy until committed).
    private func deletePauseRows(_ ids: some Collection<ActivityTask.ID>) {
        guard !ids.isEmpty else { return }
        var batch = JournalBatch()
        for id in ids { batch.deleteTask(ActivityTask.pauseKey(entity: id.entityKey, activity: id.activityID)) }
        core.becameBusy()
        core.journal.submit(batch) { [core] _ in core!.becameIdle() }
    }

    /// Takes a pending cancellation request for `id`; whether there was one.
    private func takePendingCancel(_ id: ActivityTask.ID) -> Bool {
        guard pendingCancelCount.load(ordering: .relaxed) > 0 else { return false }
        return running.withLock { running in
            guard running.pendingCancels.remove(id) != nil else { return false }
            pendingCancelCount.subtract(1, ordering: .relaxed)
            return true
        }
    }
    /// Outcomes are dropped (the grace period ended; the journal may be closed).
    private let abandonedFlag = Atomic<Bool>(false)
    /// Set when a close abandons attempts: the core, held until the last of them ended, and how many
    /// drains and detached attempts are left.
    private let keepAlive = Mutex<(core: RuntimeCore?, left: Int)>((nil, 0))
    /// Called once the last abandoned attempt let the core go (tests await it).
    let coreReleased = Mutex<(@Sendable () -> Void)?>(nil)
    /// Called once a heartbeat's details are stored (tests await it).
    let heartbeatStored = Mutex<(@Sendable (ActivityTask.ID) -> Void)?>(nil)
    /// Called by ``reschedule(entity:activity:_:)`` between its read and its commit
    /// (tests make the task move on there).
    let rescheduleRead = Mutex<(@Sendable () async -> Void)?>(nil)
    /// Called on the drain's thread as a pool attempt of a task is about to start, before anything is
    /// checked (tests hold it there). Debug builds only: it would cost a lock on every attempt.
    let attemptStarting = Mutex<(@Sendable (ActivityTask.ID) -> Void)?>(nil)
    /// How long a close waits for cancelled attempts to end before it abandons them.
    private let cancellationWait: Duration
    /// The least time between two stores of one attempt's heartbeats, ns.
    let heartbeatStoreInterval: UInt64
    private let limit: Int
    /// The most drains at once: more threads than processors would not run attempts that compute any
    /// faster, and attempts that wait do not hold a drain.
    private let maxDrains: Int
    /// Work that waits for a registration: tasks whose activity is not registered yet, and final
    /// outcomes whose entity type is not registered yet. Registering delivers them.
    private struct Waiting {
        var tasks: [String: [ActivityTask]] = [:]
        var outcomes: [String: [(ActivityTask, Result<[UInt8], ActivityFailure>, ActivityAttempt)]] = [:]
    }
    private let waiting = Mutex(Waiting())

    init(limit: Int, drains: Int = ProcessInfo.processInfo.activeProcessorCount, heartbeatStoreInterval: Duration = .seconds(1),
         cancellationWait: Duration = .seconds(1), metricsDimensions: [(String, String)] = []) {
        self.limit = max(1, limit)
        self.metricsDimensions = metricsDimensions
        queuedGauge = Gauge(label: "durable_entities_activity_pool_queued", dimensions: metricsDimensions)
        runningGauge = Gauge(label: "durable_entities_activity_pool_running", dimensions: metricsDimensions)
        self.cancellationWait = cancellationWait
        self.maxDrains = max(1, min(self.limit, drains))
        self.heartbeatStoreInterval = heartbeatStoreInterval < .zero ? 0 : UInt64(clamping: heartbeatStoreInterval.nanoseconds)
    }

    /// The runtime clock's time, ns.
    var now: UInt64 { core.clock.nowNanoseconds() }

    func attach(_ core: RuntimeCore) { self.core = core }

    func register<A: Activity>(_ activity: A) {
        activities.withLock { $0[A.name] = RegisteredActivity(activity: activity, metricsDimensions: metricsDimensions) }
        let parked = waiting.withLock { $0.tasks.removeValue(forKey: A.name) } ?? []
        for task in parked { dispatch(task) }
    }

    /// An entity type was registered: delivers the outcomes that waited for it.
    func entityTypeRegistered(_ type: String) {
        let parked = waiting.withLock { $0.outcomes.removeValue(forKey: type) } ?? []
        for (task, outcome, attempt) in parked { finish(task, outcome, attempt) }
    }

    /// Where an activity's attempt is in this process (for ``EntityDescription``).
    enum Progress: Sendable, Hashable {
        /// Queued for a slot in the pool, as this attempt.
        case queued(attempt: Int)
        /// Running now: a pool attempt (its number) or a local one that left its turn (`nil`: the
        /// stored task has its number).
        case running(attempt: Int?)
    }

    /// What the pool is doing now with the activities `ids` of entity `entityKey`: those queued or
    /// running, looked up one by one (two lock holds, no scan of the pool).
    func progress(entity entityKey: UInt64, activities ids: [UInt64]) -> [UInt64: Progress] {
        guard !ids.isEmpty else { return [:] }
        let queued = pool.withLock { pool in
            ids.compactMap { id in pool.active[ActivityTask.ID(entityKey: entityKey, activityID: id)].map { (id, $0) } }
        }
        let runningIDs = running.withLock { running in
            ids.filter { running.entries[ActivityTask.ID(entityKey: entityKey, activityID: $0)] != nil }
        }
        var progress: [UInt64: Progress] = [:]
        for (id, attempt) in queued { progress[id] = .queued(attempt: attempt) }
        for id in runningIDs {
            if case .queued(let attempt)? = progress[id] { progress[id] = .running(attempt: attempt) } else { progress[id] = .running(attempt: nil) }
        }
        return progress
    }

    /// Queues an attempt of `task`, once: a task already queued or running at that attempt is left
    /// alone, and a later attempt waits for the slot of the one before (see ``Pool/enqueue(_:)``).
    func dispatch(_ task: ActivityTask) {
        let start = withPool { pool -> Bool in
            pool.enqueue(task) && pool.startsDrain(limit: limit, maxDrains: maxDrains)
        }
        if start { startDrain() }
    }

    /// What an operator asks of an activity: its next attempt now (as attempt 1 again when
    /// resetting), or none until asked again (paused).
    enum Reschedule: Sendable, Hashable {
        case now(resettingAttempts: Bool)
        case pause
    }

    /// What ``reschedule(entity:activity:_:)`` found or did.
    enum Rescheduled: Sendable, Hashable {
        /// The task was backing off or paused: its next attempt (this one) was made due now and dispatched.
        case retrying(attempt: Int)
        /// The task is paused before this attempt (now, or it was already).
        case paused(attempt: Int)
        /// An attempt (this one) runs: it goes on, and if it fails the next one is stored paused.
        case pausedAfter(attempt: Int)
        /// An attempt is queued or running in this process, or its stored row says one runs.
        case running(attempt: Int)
        /// Its next attempt is due already (waiting for a slot, or for its activity's registration).
        case due(attempt: Int)
        /// No such task is stored: it ended, or it never existed.
        case notPending
        /// Its run requested its cancellation and waits for its end: no further attempt.
        case cancelRequested
    }

    /// An operator's "pause" (while whatever makes an activity's attempts fail is being fixed) or
    /// "retry now" (once it is), for a stored task.
    ///
    /// Pause: no attempt starts until a "retry now". A task backing off, due or queued is stored
    /// paused (``ActivityTask/isPaused``): its retry timer goes, and its only timer is its
    /// schedule-to-close deadline's. A running attempt goes on; if it fails, its next attempt is
    /// stored paused. The pause row (``ActivityTask/pauseKey(entity:activity:)``) is stored first: it
    /// holds the pause across a crash while the task row cannot say it (an attempt runs).
    ///
    /// Now: the pause row goes, and a task backing off or paused gets its next attempt at once
    /// instead of at the end of its backoff, optionally as attempt 1 again (a fresh budget of
    /// `maximumAttempts`, backoff intervals from the initial one). A running attempt is left alone.
    /// The idempotency key, input, last heartbeat and schedule-to-close deadline stay.
    ///
    /// Each change of the task row is a compare-and-set: the commit holds only if the task row, its
    /// timer and the absence of a cancellation request are as read. Anything that moved meanwhile —
    /// the retry timer rang and started the attempt, the attempt ended, the run gave the activity up —
    /// and it reads again and decides again, so it never overwrites a newer attempt's row or starts an
    /// attempt twice. A crash after a "retry now" commit runs the attempt at the next open (its row is due).
    func reschedule(entity: UInt64, activity: UInt64, _ change: Reschedule) async throws(JournalError) -> Rescheduled {
        let id = ActivityTask.ID(entityKey: entity, activityID: activity)
        let key = ActivityTask.key(entity: entity, activity: activity)
        let cancelKey = ActivityTask.cancelKey(entity: entity, activity: activity)
        let pauseKey = ActivityTask.pauseKey(entity: entity, activity: activity)
        // A "retry now" withdrew a pause: a task due then was held back by it, and resumes.
        var withdrew = false
        // Each round that conflicts saw the task move on (an attempt started or ended): a handful
        // settles it; the bound only keeps a row that never holds still from looping for good.
        for _ in 0..<16 {
            let rows = try core.journal.tasks(forKeys: [key.bytes, cancelKey.bytes, pauseKey.bytes])
            guard let stored = rows[0], var task = ActivityTask.decode(stored) else {
                // A pause row left without its task (stored as the activity ended) goes.
                if rows[2] != nil || isPauseHeld(id) { dropPause(id, stored: true) }
                return .notPending
            }
            if rows[1] != nil { return .cancelRequested }
            let pauseStored = rows[2] != nil
            var batch = JournalBatch()
            switch change {
            case .pause:
                if task.isPaused { return .paused(attempt: task.attempt) }
                // Held here before the row is stored, so that no attempt starts in between; a
                // running attempt's entry says it runs on.
                let runs = holdPaused(id)
                if !pauseStored {
                    batch.putTask(pauseKey, value: ActivityTask.pauseRequestValue)
                    if case .failure(let error) = await commit(batch) {
                        releasePause(id)
                        throw error
                    }
                    continue  // stored: decide on what the task is now
                }
                if runs || task.runningAttempt == task.attempt { return .pausedAfter(attempt: task.attempt) }
                // Not running. An attempt of it queued in the pool is skipped when its turn comes
                // (see `attempt(_:)`, which may store it paused first: this commit then conflicts).
                if let timer = Self.timer(of: task), task.notBefore > core.clock.nowNanoseconds() {
                    // Its retry timer goes (a due one has rung, or rings and finds the task paused).
                    batch.claimTimer(timer)
                }
                task.notBefore = ActivityTask.pausedNotBefore
                if let deadline = Self.timer(of: task) { batch.scheduleTimer(deadline) }
            case .now(let resettingAttempts):
                if pauseStored || isPauseHeld(id) {
                    // The pause goes first (no attempt starts while it is held), then the task is decided
                    // on again: an attempt that failed meanwhile may have been stored paused. A task
                    // held back as it would have started is dispatched by its `storePaused` once that
                    // finds the pause gone.
                    releasePause(id)
                    batch.deleteTask(pauseKey)
                    if case .failure(let error) = await commit(batch) {
                        if pauseStored { _ = holdPaused(id) }
                        throw error
                    }
                    withdrew = true
                    continue
                }
                let now = core.clock.nowNanoseconds()
                // A paused row is always made due again, even with an attempt of it queued (dispatched
                // after it was paused; dispatching again leaves that one alone): else a crash before
                // that attempt ended would leave it paused.
                if !task.isPaused {
                    switch progress(entity: entity, activities: [activity])[activity] {
                    case .running(let attempt)?: return .running(attempt: attempt ?? task.attempt)
                    case .queued(let attempt)?: return withdrew ? .retrying(attempt: attempt) : .due(attempt: attempt)
                    case nil: break
                    }
                    if task.runningAttempt == task.attempt { return .running(attempt: task.attempt) }
                    guard task.notBefore > now else { return withdrew ? .retrying(attempt: task.attempt) : .due(attempt: task.attempt) }
                }
                if let timer = Self.timer(of: task) {
                    batch.claimTimer(timer)
                }
                if resettingAttempts { task.attempt = 1 }
                task.notBefore = now
            }
            if let hook = rescheduleRead.withLock({ $0 }) { await hook() }
            batch.expectTask(key, value: stored)
            batch.expectTask(cancelKey, value: nil)
            batch.putTask(key, value: task.encoded())
            switch await commit(batch) {
            case .success:
                if task.isPaused { return .paused(attempt: task.attempt) }
                dispatch(task)
                return .retrying(attempt: task.attempt)
            case .failure(let error):
                guard error.code == .conflict else { throw error }
                continue  // changed meanwhile: read again
            }
        }
        throw JournalError(.conflict, key: EntityKey(rawValue: entity),
                           "activity \(activity)'s task kept changing while it was rescheduled; nothing was changed, try again")
    }

    /// Commits `batch` and waits until it is durable.
    private func commit(_ batch: JournalBatch) async -> Result<CommitReceipt, JournalError> {
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Result<CommitReceipt, JournalError>, Never>) in
            core.journal.submit(batch) { continuation.resume(returning: $0) }
        }
    }

    /// Task `id` was due, but a pause held its attempt back (see ``RunningAttempts/paused``): its row
    /// is stored paused, with its schedule-to-close deadline's timer. A compare-and-set against the
    /// rows as read, so a "retry now" that withdrew the pause meanwhile (and dispatched the task) or
    /// an end of the activity wins; whatever moved, it reads again.
    private func storePaused(_ id: ActivityTask.ID, rounds: Int = 16) {
        let key = ActivityTask.key(entity: id.entityKey, activity: id.activityID)
        let pauseKey = ActivityTask.pauseKey(entity: id.entityKey, activity: id.activityID)
        guard rounds > 0,
              case .success(let rows) = Result(catching: { () throws(JournalError) in try core.journal.tasks(forKeys: [key.bytes, pauseKey.bytes]) }),
              let stored = rows[0], var task = ActivityTask.decode(stored), !task.isPaused
        else { return }  // ended, or paused already
        guard rows[1] != nil || isPauseHeld(id) else {
            // A "retry now" withdrew the pause: the attempt held back starts after all.
            if task.notBefore <= now, task.runningAttempt != task.attempt { dispatch(task) }
            return
        }
        guard rows[1] != nil else { return }  // its pause row is being stored: the pause that holds it stores the task paused
        var batch = JournalBatch()
        batch.expectTask(key, value: stored)
        batch.expectTask(pauseKey, value: ActivityTask.pauseRequestValue)
        task.notBefore = ActivityTask.pausedNotBefore
        batch.putTask(key, value: task.encoded())
        if let deadline = Self.timer(of: task) { batch.scheduleTimer(deadline) }
        core.becameBusy()
        core.journal.submit(batch) { [self] result in
            if case .failure(let error) = result {
                if error.code == .conflict {
                    storePaused(id, rounds: rounds - 1)
                } else if !journalEnded(error) {
                    core.logger.warning("storing a paused activity failed; its pause row holds it until a retry now",
                                        metadata: ["task.key": "\(key)", "error": "\(error)"])
                }
            } else {
                core.timers.wake()
            }
            core.becameIdle()
        }
    }

    /// A paused task's schedule-to-close deadline passed (its timer rang): the activity fails with
    /// reason `scheduleToCloseTimeout`, counting the attempts made.
    private func expirePaused(_ task: ActivityTask) {
        let made = task.attempt - 1
        let last = task.lastError.map { "; the last attempt failed with: \($0)" } ?? ""
        finish(task, .failure(ActivityFailure(activity: task.name, reason: .scheduleToCloseTimeout, attempts: made,
                                              causeType: task.lastErrorType ?? "scheduleToCloseTimeout",
                                              cause: "the activity was paused when its schedule-to-close timeout ended\(last)")),
               ActivityAttempt(number: made, startedAt: nil))
    }

    /// Starts a drain (already counted) on a thread of Dispatch's global pool: not a task, since it
    /// runs the attempts' work itself, as a shard runs a turn's.
    private func startDrain() {
        core.becameBusy()
        DispatchQueue.global().async { [self] in
            drain()
            runningEnded()
        }
    }

    /// The runtime closes: no attempt starts from now on (queued ones stay stored for the next
    /// open), running ones get `gracePeriod` to end on their own and are then cancelled; those still
    /// running a second later are abandoned. Their outcomes, if any, are then dropped: the tasks stay
    /// stored and run again, with the same idempotency key, at the next open.
    /// - Parameter waitUntilIdle: waits until the runtime is idle or the deadline passes; returns
    ///   whether it became idle.
    func close(gracePeriod: Duration, waitUntilIdle: (ContinuousClock.Instant) -> Bool) {
        stopStarting()
        if waitUntilIdle(.now + gracePeriod) { return }
        let running = detached.withLock { Array($0.tasks.values) }
        let count = runningAttempts
        if count > 0 {
            core.logger.warning("closing: activity attempts still running after the grace period are cancelled",
                                metadata: ["attempts": "\(count)", "gracePeriod": "\(gracePeriod)"])
        }
        for attempt in running { attempt.cancel() }
        if waitUntilIdle(.now + cancellationWait) { return }
        core.logger.warning("closing: activity attempts that ignore cancellation are abandoned; they run again at the next open",
                            metadata: ["attempts": "\(runningAttempts)"])
        abandonRunning()
    }

    /// The runtime is dropped as a crash would drop it (``EntityRuntime/simulateCrash()``): no
    /// attempt starts from now on, and running ones are abandoned at once — their outcomes dropped,
    /// their tasks left stored for the next open, as after a real crash. Their code goes on in this
    /// process, so the core stays until the last of them has ended (see ``abandonRunning()``).
    func abandon() {
        stopStarting()
        abandonRunning()
    }

    /// No attempt starts from now on; queued ones stay stored for the next open.
    private func stopStarting() {
        withPool { pool in
            pool.closing = true
            for task in pool.queue { pool.active.removeValue(forKey: task.id) }
            pool.queue.removeAll()
            pool.following.removeAll()  // stored: the next open runs them
        }
    }

    /// Drops the outcomes of the attempts still running. `core` is unowned: the runtime may be gone
    /// when an abandoned attempt ends, and its code still reaches the core, so the core is held
    /// until the last of them ended. (One that ends between this count and the flag below is not
    /// counted: the core is then kept for good.)
    private func abandonRunning() {
        keepAlive.withLock { kept in
            let left = runningAttempts
            kept = (left > 0 ? core : nil, left)
        }
        abandonedFlag.store(true, ordering: .releasing)
    }

    /// Whether an attempt's outcome must be dropped (the runtime closed without it).
    private var abandoned: Bool { abandonedFlag.load(ordering: .acquiring) }

    /// What may still be running attempts, for the close's idleness check: the attempts that left
    /// their drain or turn, and the drains (one may be inside an attempt that blocks its thread).
    var runningAttempts: Int {
        detached.withLock { $0.tasks.count } + pool.withLock { $0.drains }
    }

    /// The pool's counts: attempts queued, attempts running (on a drain or waiting on their own), drains.
    var poolCounts: (queued: Int, running: Int, drains: Int) {
        pool.withLock { ($0.queue.count, $0.attempts, $0.drains) }
    }

    /// Takes attempts from the queue and runs them, until the queue is empty or every slot is taken;
    /// then the drain ends. Ending an attempt, taking the next and ending the drain happen under one
    /// lock, so a task queued meanwhile either is taken here or starts a drain in ``dispatch(_:)``.
    private func drain() {
        var ended: ActivityTask?
        while true {
            let next = withPool { pool -> ActivityTask? in
                if let ended { pool.endSlot(ended.id) }
                if !pool.closing, pool.attempts < limit, let task = pool.queue.popFirst() {
                    pool.attempts += 1
                    return task
                }
                pool.drains -= 1
                return nil
            }
            guard let task = next else { return }
            // An attempt that left the drain ends its slot itself.
            ended = attempt(task) ? task : nil
        }
    }

    /// At open: every stored task whose next attempt is due runs again (same idempotency key); the
    /// others wait for their retry timers.
    func recover() {
        let now = core.clock.nowNanoseconds()
        let stored: [JournalTask]
        let cancelled: Set<ActivityTask.ID>
        let pauses: Set<ActivityTask.ID>
        do {
            cancelled = ActivityTask.ids(in: try core.journal.tasks(prefix: [ActivityTask.cancelKeyPrefix]), prefix: ActivityTask.cancelKeyPrefix)
            pauses = ActivityTask.ids(in: try core.journal.tasks(prefix: [ActivityTask.pauseKeyPrefix]), prefix: ActivityTask.pauseKeyPrefix)
            stored = try core.journal.tasks(prefix: [ActivityTask.keyPrefix])
        } catch {
            core.logger.error("reading stored activity tasks failed; they run at the next open", metadata: ["error": "\(error)"])
            return
        }
        // Held before any attempt can start or fail (see `RunningAttempts.paused`).
        for id in pauses { _ = holdPaused(id) }
        var waiting: [JournalTimer] = []
        var owned: Set<ActivityTask.ID> = []
        for row in stored {
            if let id = row.key.withUnsafeBytes({ ActivityTask.id(ofKey: $0) }) { owned.insert(id) }
            guard row.isIntact else {
                repairTask(key: row.key)
                continue
            }
            guard let task = ActivityTask.decode(row.value) else {
                core.logger.error("a stored activity task does not decode; it is left in place", metadata: ["task.key": "\(row.key)"])
                continue
            }
            if cancelled.contains(task.id) {
                // Its run requested its cancellation and waits for its end: it ends here, as cancelled
                // (an attempt cut off by the crash counts as made).
                cancelUnstarted(task, atOpen: true)
            } else if task.runningAttempt == task.attempt {
                resumeInterrupted(task)  // paused, the next attempt is stored paused
            } else if task.isPaused {
                if let deadline = Self.timer(of: task) { waiting.append(deadline) }  // a "retry now" resumes it
            } else if pauses.contains(task.id) {
                storePaused(task.id)  // paused while its attempt ran or was due
            } else if task.notBefore <= now {
                dispatch(task)
            } else {
                waiting.append(Self.timer(of: task)!)
            }
        }
        restoreRetryTimers(waiting)
        dropStalePauses(pauses.subtracting(owned))
    }

    /// Pause rows whose task is gone (it ended before its pause row was deleted, by a crash in
    /// between) are deleted.
    private func dropStalePauses(_ ids: Set<ActivityTask.ID>) {
        for id in ids { releasePause(id) }
        deletePauseRows(ids)
    }

    /// Tasks that wait for a retry: their timers are stored again where missing or damaged (a task
    /// without its timer would wait until an open after its retry fell due).
    private func restoreRetryTimers(_ timers: [JournalTimer]) {
        let missing: [JournalTimer]
        do {
            missing = try core.journal.unstoredTimers(timers)
        } catch {
            return core.logger.error("checking the retry timers of stored activity tasks failed", metadata: ["error": "\(error)"])
        }
        guard !missing.isEmpty else { return }
        var batch = JournalBatch()
        for timer in missing { batch.scheduleTimer(timer) }
        core.becameBusy()
        core.journal.submit(batch) { [core] result in
            defer { core!.becameIdle() }
            switch result {
            case .success:
                core!.logger.warning("retry timers of stored activity tasks were missing or damaged; they were stored again",
                                     metadata: ["timers": "\(missing.count)"])
                core!.timers.wake()
            case .failure(let error):
                core!.logger.error("storing retry timers again failed; their tasks run at the next open",
                                   metadata: ["timers": "\(missing.count)", "error": "\(error)"])
            }
        }
    }

    /// Whether `error` says the journal takes nothing more: it closed, or it stopped (logged once).
    private func journalEnded(_ error: JournalError) -> Bool {
        error.code == .closed || core.journal.stopReason != nil
    }

    /// A stored task still marked as running its attempt (a heartbeat's or its start's store): that
    /// attempt was cut off by a crash. It counts as a failed attempt — the retry policy decides what
    /// comes next — so an activity that keeps crashing the process ends after `maximumAttempts`.
    private func resumeInterrupted(_ task: ActivityTask) {
        var task = task
        task.runningAttempt = nil
        let decision = retryOrFail(task, errorType: "interrupted", error: "the process stopped during attempt \(task.attempt)",
                                   timeout: nil, nonRetryable: false, startedAt: nil)
        apply(decision, to: task)
    }

    /// Stores `details` as the last heartbeat of `task`'s running attempt, with the mark that the
    /// attempt runs (see ``ActivityTask/runningAttempt``). Not waited for.
    func storeHeartbeat(_ details: [UInt8], of task: ActivityTask) {
        guard !abandoned, task.entityKey != 0 else { return }
        let id = task.id
        rewrite(task, heartbeat: details, running: true) { [self] result in
            switch result {
            case .success: heartbeatStored.withLock { $0 }?(id)
            case .failure(let error) where !journalEnded(error):  // a stop is logged once
                core.logger.warning("storing an activity's heartbeat failed", metadata: ["activity": "\(task.name)", "error": "\(error)"])
            case .failure: break
            }
        }
    }

    /// An attempt whose task is marked as running it (a heartbeat or its start was stored) was
    /// cancelled by a closing runtime: its task is stored again without the running mark (a
    /// cancelled attempt is not a failed one; the next open runs the same attempt again), with the
    /// attempt's last details. A close waits for it.
    private func unmark(_ task: ActivityTask, heartbeat: [UInt8]?) {
        guard !abandoned else { return }  // the journal may be closed: the next open counts the attempt
        core.becameBusy()
        rewrite(task, heartbeat: heartbeat, running: false) { [core] _ in core!.becameIdle() }
    }

    /// Rewrites `task`'s stored row with `heartbeat` as its last details, marked as running its
    /// attempt or not — only while the row is stored (a task its entity gave up stays deleted).
    private func rewrite(_ task: ActivityTask, heartbeat: [UInt8]?, running: Bool,
                         completion: @escaping @Sendable (Result<CommitReceipt, JournalError>) -> Void) {
        var stored = task
        stored.heartbeat = heartbeat
        stored.runningAttempt = running ? task.attempt : nil
        var batch = JournalBatch()
        batch.replaceTask(stored.key, value: stored.encoded())
        core.journal.submit(batch, completion: completion)
    }

    /// A retry timer fell due: run the task's next attempt (if it is still owed), or fail a paused one
    /// whose schedule-to-close deadline it was.
    func retryDue(_ timer: JournalTimer, done: @escaping @Sendable () -> Void) {
        let key = Array(timer.payload.dropFirst())
        // The timer's row is the right to act on it: whoever deletes it acts. A "retry now" or a pause
        // that took it between the service's read and this commit (see `reschedule`) has dispatched
        // or paused the task itself, and a timer handed over twice acts once.
        var batch = JournalBatch()
        batch.claimTimer(timer)
        core.journal.submit(batch) { [self] result in
            if case .failure(let error) = result, error.code == .conflict { return done() }
            // The stored task may be a later attempt than the timer's (a stale timer, left from before
            // a restart that ran its attempt at open): it then waits for its own timer, so the backoff holds.
            // With its cancellation row, read in the same snapshot: the commit that records the
            // activity's outcome deletes both.
            let cancelKey = ActivityTask.cancelKey(entity: timer.entity.rawValue, activity: timer.id & ~Self.retryTimerBit)
            switch Result(catching: { () throws(JournalError) in try core.journal.tasks(forKeys: [key, cancelKey.bytes]) }) {
            case .success(let rows):
                guard let value = rows[0], let task = ActivityTask.decode(value) else { break }  // nil: it ended before its retry fell due
                if rows[1] != nil {
                    _ = takePendingCancel(task.id)
                    cancelUnstarted(task)  // its cancellation was requested: no further attempt
                } else if task.isPaused {
                    // Its schedule-to-close deadline's timer: it fails on time, paused or not.
                    if let deadline = task.scheduleToCloseDeadline, deadline <= core.clock.nowNanoseconds() { expirePaused(task) }
                } else if task.notBefore <= core.clock.nowNanoseconds() {
                    dispatch(task)
                }
            case .failure(let error) where error.code == .corruptedRecord:
                repairTask(key: key)
            case .failure(let error):
                core.logger.warning("reading an activity task for its retry failed; it runs at the next open",
                                    metadata: ["task.key": "\(key)", "error": "\(error)"])
            }
            done()
        }
    }

    // MARK: One attempt

    enum Timeout: Sendable { case startToClose, heartbeat, scheduleToClose }

    /// What the watchdogs of one attempt share with it.
    private final class Attempt: Sendable {
        struct State {
            var timedOut: Timeout?
            var work: Task<[UInt8], any Error>?
            var heartbeatAlarm: UInt64?
        }
        let state = Mutex(State())

        /// A watchdog's action: records why the attempt ended and cancels it.
        func expire(_ reason: Timeout) -> @Sendable () -> Void {
            { [self] in
                let work = state.withLock { state -> Task<[UInt8], any Error>? in
                    if state.timedOut == nil { state.timedOut = reason }
                    return state.work
                }
                work?.cancel()
            }
        }
    }

    /// Runs an attempt of `task` on a runner, on the drain's thread. Returns `true` if it ended here,
    /// for the drain to end its pool slot; `false` if its slot is ended otherwise: it waits for
    /// something outside and goes on by itself (it then ends its slot itself), or it waits for its
    /// activity's registration (its slot ended before it was parked).
    private func attempt(_ task: ActivityTask) -> Bool {
        #if DEBUG
        if let hook = attemptStarting.withLock({ $0 }) { hook(task.id) }
        #endif
        // An activity not registered (yet) waits for its registration: after a restart, tasks are
        // recovered before the application has registered everything. The task leaves the pool
        // before a registration can see it parked: a registration dispatches what it finds parked,
        // and a dispatch leaves a task alone while it is still marked active. (The pool's lock is
        // taken inside this one, never the other way round.)
        let found = activities.withLock { registered -> (any AnyActivity)? in
            if let activity = registered[task.name] { return activity }
            withPool { $0.endSlot(task.id) }
            waiting.withLock { $0.tasks[task.name, default: []].append(task) }
            return nil
        }
        guard let activity = found else {
            core.logger.debug("an activity waits for its registration", metadata: ["activity": "\(task.name)"])
            if let limit = task.options.scheduleToCloseTimeout { failUnregistered(task, at: task.scheduledAt.saturatingAdd(limit.nanoseconds)) }
            return false
        }
        let runner = TurnRunner.start(in: core.runners) { [self] runner in
            // Paused by an operator while it waited: it does not start, and is stored paused.
            guard trackRunning(runner, for: task.id, unlessPaused: true) else {
                storePaused(task.id)
                return runner.executor.finishInline()
            }
            let decision: Decision
            if activity.recordsAttemptStart, let instead = await storeStart(of: task) {
                decision = instead
                running.withLock { _ = $0.entries.removeValue(forKey: task.id) }
            } else {
                let ended = await perform(task, activity, on: runner.executor, storingHeartbeats: true,
                                          startStored: activity.recordsAttemptStart)
                // Removed before the decision: a cancellation request either reached the entry (and
                // counts) or finds it gone (and waits for what comes next, see `pendingCancels`).
                let interruption = running.withLock { $0.entries.removeValue(forKey: task.id)?.interruption ?? .none }
                decision = decide(task, ended, interruption)
                activity.metrics.attemptEnded(decision, timedOut: ended.timedOut, due: max(task.scheduledAt, task.notBefore),
                                              startedAt: ended.startedAt, endedAt: now)
                if case .dropped = decision, ended.marked { unmark(task, heartbeat: ended.heartbeat) }
            }
            apply(decision, to: task)
            if runner.executor.finishInline() { return true }
            detachedAttemptEnded(task, id: runner.executor.trackingID)
            return false
        }
        // Its job adds its entry first thing (in the drain below); the entry goes when that job's work returns.
        if runner.drain().parked { return true }
        // It waits for something outside: it goes on by itself.
        let left = detach(runner)
        assert(left, "an attempt that did not end is still inline")
        return false
    }

    /// Before an attempt of an activity that records its start (``Activity/recordsAttemptStart``):
    /// stores `task` marked as running its attempt and waits until that is durable. Returns `nil`
    /// once it is (the attempt runs), else what comes instead of the attempt: nothing when the
    /// runtime closes or the journal stopped (the next open runs it), or, after another storage
    /// error, the same attempt again after the retry policy's delay (an attempt that never ran is
    /// not counted).
    private func storeStart(of task: ActivityTask) async -> Decision? {
        let result = await withCheckedContinuation { continuation in
            rewrite(task, heartbeat: task.heartbeat, running: true) { continuation.resume(returning: $0) }
        }
        guard case .failure(let error) = result else { return nil }
        if journalEnded(error) { return .dropped }
        var again = task
        again.notBefore = now.saturatingAdd(task.options.retry.delay(after: task.attempt).nanoseconds)
        core.logger.warning("storing an activity attempt's start failed; the attempt runs later", metadata: [
            "activity": "\(task.name)", "attempt": "\(task.attempt)", "error": "\(error)"])
        return .retry(again)
    }

    /// A task waiting for its activity's registration is failed (``ActivityFailure/Reason/notRegistered``)
    /// once its schedule-to-close deadline passes, unless a registration took it first.
    private func failUnregistered(_ task: ActivityTask, at deadline: UInt64) {
        _ = core.timers.alarm(at: deadline) { [self] in
            let waited = waiting.withLock { waiting -> Bool in
                guard let index = waiting.tasks[task.name]?.firstIndex(where: { $0.id == task.id }) else { return false }
                waiting.tasks[task.name]!.remove(at: index)
                if waiting.tasks[task.name]!.isEmpty { waiting.tasks[task.name] = nil }
                return true
            }
            guard waited else { return }
            finish(task, .failure(ActivityFailure(
                activity: task.name, reason: .notRegistered, attempts: task.attempt - 1, causeType: "notRegistered",
                cause: "no activity named '\(task.name)' was registered before the schedule-to-close timeout")),
                   ActivityAttempt(number: 0, startedAt: nil))
        }
    }

    /// An attempt that left its drain ended (its outcome carried out): its slot is free, which may
    /// let a queued attempt start.
    private func detachedAttemptEnded(_ task: ActivityTask, id: UInt64?) {
        let start = withPool { pool -> Bool in
            pool.endSlot(task.id)
            return pool.startsDrain(limit: limit, maxDrains: maxDrains)
        }
        if start { startDrain() }
        untrack(id)
    }

    /// Counts an attempt leaving its drain or turn as busy and keeps its task, for a close to cancel.
    private func track(_ runner: TurnRunner) {
        core.becameBusy()
        let id = detached.withLock { detached -> UInt64 in
            let id = detached.next
            detached.next += 1
            detached.tasks[id] = runner.task
            return id
        }
        runner.executor.trackingID = id
    }

    /// A tracked attempt ended (or did not leave after all): undoes ``track(_:)``.
    private func untrack(_ id: UInt64?) {
        if let id { detached.withLock { _ = $0.tasks.removeValue(forKey: id) } }
        runningEnded()
    }

    /// A drain, or an attempt that left its drain or turn, ended (one of ``runningAttempts``): the
    /// last thing it does with the core. After a close that abandoned attempts, the last of them
    /// lets the core go (see ``keepAlive``).
    private func runningEnded() {
        core.becameIdle()
        guard abandoned else { return }
        var released = keepAlive.withLock { kept -> RuntimeCore? in
            kept.left -= 1
            guard kept.left == 0 else { return nil }
            defer { kept.core = nil }
            return kept.core
        }
        guard released != nil else { return }
        released = nil  // the core may be freed here, outside the lock
        coreReleased.withLock { $0 }?()
    }

    /// How an attempt ended: its result, the timeout that ended it, its last heartbeat details.
    private struct Ended: Sendable {
        var result: Result<[UInt8], any Error>
        var timedOut: Timeout?
        var heartbeat: [UInt8]?
        /// The attempt's task was cancelled (the runtime closes).
        var cancelled: Bool
        /// The attempt's stored task is marked as running it (it stored a heartbeat, or its start).
        var marked = false
        /// When the attempt started, ns on the runtime's clock.
        var startedAt: UInt64

        /// An attempt's end with `result`: ends `context`'s heartbeats and takes their last details.
        init(result: Result<[UInt8], any Error>, timedOut: Timeout?, startedAt: UInt64, ending context: ActivityContext) {
            let heartbeats = context.end()
            self.result = result
            self.startedAt = startedAt
            self.timedOut = timedOut
            self.heartbeat = heartbeats.details
            self.cancelled = Task.isCancelled
            self.marked = heartbeats.marked
        }
    }

    /// Runs one attempt of `task` under its timeouts, on `executor` (its runner's): the attempt's own
    /// task, when a timeout needs one, prefers it too (a local activity's attempt runs inside the turn).
    ///
    /// Two paths, neither inlined here: an async function's frame is allocated on its task's stack by
    /// its caller, and one holding both paths took ~4 KiB for each local attempt (several slab
    /// allocations of the task allocator, each over 1 KiB, which makes glibc consolidate its free
    /// lists) where the untimed path needs a fraction of that.
    /// - Parameters:
    ///   - storingHeartbeats: heartbeats are stored with the task from the start (a pool attempt,
    ///     whose task is stored before it starts; see ``makeContext(_:on:storingHeartbeats:startStored:onHeartbeat:)``).
    ///   - startStored: the task is already stored marked as running this attempt.
    private func perform(_ task: ActivityTask, _ activity: any AnyActivity, on executor: TurnExecutor,
                         storingHeartbeats: Bool = false, startStored: Bool = false) async -> Ended {
        let options = task.options
        if options.startToCloseTimeout == nil, options.scheduleToCloseTimeout == nil, options.heartbeatTimeout == nil {
            return await performUntimed(task, activity, on: executor, storingHeartbeats: storingHeartbeats, startStored: startStored)
        }
        return await performTimed(task, activity, on: executor, storingHeartbeats: storingHeartbeats, startStored: startStored)
    }

    /// An attempt that nothing can time out: the activity runs right here, in the caller's task.
    @inline(never)
    private func performUntimed(_ task: ActivityTask, _ activity: any AnyActivity, on executor: TurnExecutor,
                                storingHeartbeats: Bool, startStored: Bool) async -> Ended {
        let codec = core.codec
        let context = makeContext(task, on: executor, storingHeartbeats: storingHeartbeats, startStored: startStored, onHeartbeat: nil)
        let started = core.clock.nowNanoseconds()
        let result: Result<[UInt8], any Error>
        do { result = .success(try await activity.run(task.input, context: context, codec: codec)) } catch { result = .failure(error) }
        return Ended(result: result, timedOut: nil, startedAt: started, ending: context)
    }

    /// An attempt under at least one timeout: watchdog alarms, and a task of its own they can cancel.
    @inline(never)
    private func performTimed(_ task: ActivityTask, _ activity: any AnyActivity, on executor: TurnExecutor,
                              storingHeartbeats: Bool, startStored: Bool) async -> Ended {
        let clock = core.clock
        let codec = core.codec
        let attempt = Attempt()
        let alarms = core.timers
        let started = clock.nowNanoseconds()
        var scheduled: [UInt64] = []
        if let limit = task.options.startToCloseTimeout {
            scheduled.append(alarms.alarm(at: started.saturatingAdd(limit.nanoseconds), attempt.expire(.startToClose)))
        }
        if let limit = task.options.scheduleToCloseTimeout {
            scheduled.append(alarms.alarm(at: task.scheduledAt.saturatingAdd(limit.nanoseconds), attempt.expire(.scheduleToClose)))
        }
        if let limit = task.options.heartbeatTimeout {
            let alarm = alarms.alarm(at: started.saturatingAdd(limit.nanoseconds), attempt.expire(.heartbeat))
            attempt.state.withLock { $0.heartbeatAlarm = alarm }
        }
        let context = makeContext(task, on: executor, storingHeartbeats: storingHeartbeats, startStored: startStored) {
            // A heartbeat (its details stay in the context) rearms the heartbeat watchdog.
            var next: UInt64?
            if let limit = task.options.heartbeatTimeout {
                next = alarms.alarm(at: clock.nowNanoseconds().saturatingAdd(limit.nanoseconds), attempt.expire(.heartbeat))
            }
            let previous = attempt.state.withLock { state -> UInt64? in
                defer { if next != nil { state.heartbeatAlarm = next } }
                return next == nil ? nil : state.heartbeatAlarm
            }
            if let previous { alarms.cancelAlarm(previous) }
        }
        // A timeout cancels the attempt, so it runs as a task the watchdogs can reach.
        let running = Task(executorPreference: executor) { try await activity.run(task.input, context: context, codec: codec) }
        // A watchdog that rang before the attempt was reachable cancels it here.
        let expired = attempt.state.withLock { state -> Bool in
            state.work = running
            return state.timedOut != nil
        }
        if expired { running.cancel() }
        // A cancelled drain (the runtime closes) cancels the attempt.
        let result = await withTaskCancellationHandler { await running.result } onCancel: { running.cancel() }
        for alarm in scheduled { alarms.cancelAlarm(alarm) }
        let (timedOut, heartbeatAlarm) = attempt.state.withLock { ($0.timedOut, $0.heartbeatAlarm) }
        if let heartbeatAlarm { alarms.cancelAlarm(heartbeatAlarm) }
        return Ended(result: result, timedOut: timedOut, startedAt: started, ending: context)
    }

    /// The context of an attempt of `task`. With `storingHeartbeats` (a pool attempt, whose task is
    /// stored) its heartbeats are stored from the start; else (a local attempt) it waits on
    /// `executor` to learn that its task is stored (see ``trackDetachedLocal(_:task:entity:)``).
    private func makeContext(_ task: ActivityTask, on executor: TurnExecutor, storingHeartbeats: Bool, startStored: Bool,
                             onHeartbeat: (@Sendable () -> Void)?) -> ActivityContext {
        let context = ActivityContext(
            idempotencyKey: task.idempotencyKey, attempt: task.attempt, entity: task.entityName,
            logger: core.logger, lastHeartbeat: task.heartbeat, codec: core.codec,
            store: storingHeartbeats ? (self, task) : nil, startStored: startStored, onHeartbeat: onHeartbeat)
        if !storingHeartbeats { executor.attemptContext = context }
        return context
    }

    /// What comes after an attempt.
    enum Decision: Sendable {
        /// The activity succeeded with this output, in this attempt.
        case succeeded([UInt8], ActivityAttempt)
        /// The activity ended for good; the attempt that ended it.
        case failed(ActivityFailure, ActivityAttempt)
        /// Attempt `next.attempt` runs at `next.notBefore`.
        case retry(ActivityTask)
        /// Nothing is recorded: the runtime closed during the attempt (its task runs again at the next open).
        case dropped
    }

    /// What the worker did to a running attempt.
    enum Interruption: Sendable, Hashable {
        case none
        /// Its run requested the activity's cancellation and waits for its end
        /// (``ActivityCancellationType/waitCancellationCompleted``).
        case cancelRequested
        /// An operator's pause interrupted it at a heartbeat (``heartbeatGiven(by:)``).
        case paused
    }

    /// Applies the retry policy to an attempt's end, after `interruption`:
    /// - `cancelRequested`: output returned anyway is the outcome, and any failure ends the activity
    ///   as cancelled (no retry);
    /// - `paused`: output returned anyway is the outcome; a failure is not counted (the pause, not
    ///   the activity, ended it): the same attempt is stored again, with the heartbeat's details, and
    ///   paused if the pause still holds (else due at once), even where the policy would have ended
    ///   the activity — a pause never uses up `maximumAttempts` nor fails the activity.
    private func decide(_ task: ActivityTask, _ ended: Ended, _ interruption: Interruption = .none) -> Decision {
        // Cancelled by a closing runtime: a failure is not recorded (nor is anything once the attempt
        // was abandoned); the stored task runs again at the next open.
        if abandoned { return .dropped }
        if interruption == .paused, case .failure(let error) = ended.result {
            var again = task
            again.heartbeat = ended.heartbeat
            again.notBefore = now
            again.lastErrorType = String(describing: Swift.type(of: error))
            again.lastError = "attempt \(task.attempt) was interrupted by a pause at a heartbeat, and ended with: \(error)"
            return .retry(again)
        }
        if interruption == .cancelRequested {
            let attempt = ActivityAttempt(number: task.attempt, startedAt: ended.startedAt)
            switch ended.result {
            case .success(let output):
                return .succeeded(output, attempt)
            case .failure(let error):
                let type = ended.timedOut.map { "\($0)Timeout" } ?? String(describing: Swift.type(of: error))
                return .failed(ActivityFailure(activity: task.name, reason: .cancelled, attempts: task.attempt, causeType: type,
                                               cause: "the activity's cancellation was requested during attempt \(task.attempt), which ended with: \(error)"),
                               attempt)
            }
        }
        if ended.cancelled, case .failure = ended.result { return .dropped }
        var next = task
        next.heartbeat = ended.heartbeat
        // An attempt that returned its output succeeded, even if a watchdog rang meanwhile (it fires
        // on the timer thread, and cannot be taken back once picked): the effect happened and its
        // result is in hand, so a retry would only repeat it.
        if let reason = ended.timedOut, case .failure = ended.result {
            return retryOrFail(next, errorType: "\(reason)Timeout", error: "the attempt timed out (\(reason))", timeout: reason,
                               nonRetryable: false, startedAt: ended.startedAt)
        }
        switch ended.result {
        case .success(let output):
            return .succeeded(output, ActivityAttempt(number: task.attempt, startedAt: ended.startedAt))
        case .failure(let error):
            let type = String(describing: Swift.type(of: error))
            let nonRetryable = error is NonRetryableError || task.options.retry.nonRetryableErrorTypes.contains(type)
            return retryOrFail(next, errorType: type, error: "\(error)", timeout: nil, nonRetryable: nonRetryable, startedAt: ended.startedAt)
        }
    }

    /// After a failed attempt (which started at `startedAt`, when known): the next attempt, or the
    /// final failure.
    private func retryOrFail(_ task: ActivityTask, errorType: String, error: String, timeout: Timeout?, nonRetryable: Bool,
                             startedAt: UInt64?) -> Decision {
        let policy = task.options.retry
        let attempts = task.attempt
        func fail(_ reason: ActivityFailure.Reason) -> Decision {
            .failed(ActivityFailure(activity: task.name, reason: reason, attempts: attempts, causeType: errorType, cause: error),
                    ActivityAttempt(number: attempts, startedAt: startedAt))
        }
        if nonRetryable { return fail(.nonRetryable) }
        if timeout == .scheduleToClose { return fail(.scheduleToCloseTimeout) }
        let timeoutReason: ActivityFailure.Reason? = switch timeout {
        case .startToClose: .startToCloseTimeout
        case .heartbeat: .heartbeatTimeout
        default: nil
        }
        if policy.maximumAttempts > 0, attempts >= policy.maximumAttempts { return fail(timeoutReason ?? .retriesExhausted) }
        let now = core.clock.nowNanoseconds()
        let due = now.saturatingAdd(policy.delay(after: attempts).nanoseconds)
        if let limit = task.options.scheduleToCloseTimeout, due >= task.scheduledAt.saturatingAdd(limit.nanoseconds) {
            return fail(.scheduleToCloseTimeout)
        }
        var next = task
        next.attempt += 1
        next.notBefore = due
        next.lastErrorType = errorType
        next.lastError = error
        return .retry(next)
    }

    /// Carries a decision out for a stored task: the outcome to its entity, or the next attempt stored
    /// with its retry timer.
    private func apply(_ decision: Decision, to task: ActivityTask) {
        switch decision {
        case .succeeded(let output, let attempt): finish(task, .success(output), attempt)
        case .failed(let failure, let attempt): finish(task, .failure(failure), attempt)
        case .retry(var next):
            next.entityKey = task.entityKey  // a local attempt's task learns its entity key at the commit
            storeRetry(next)
        case .dropped: break
        }
    }

    /// Stores the next attempt and its retry timer (the timer runs it, see ``retryDue(_:done:)``), or
    /// it paused when an operator paused the activity meanwhile.
    private func storeRetry(_ retry: ActivityTask) {
        var retry = retry
        // Paused while the attempt ran: the next one waits for a "retry now".
        if isPauseHeld(retry.id) { retry.notBefore = ActivityTask.pausedNotBefore }
        let next = retry
        var batch = JournalBatch()
        // Only while the task is stored: its entity may have given it up meanwhile (terminated, or
        // its run cancelled), and a retry must not bring it back.
        Self.addRetry(next, to: &batch, replacing: true)
        core.becameBusy()
        core.journal.submit(batch) { [self] result in
            if case .failure(let error) = result, error.code != .closed {
                // The stored task keeps the attempt before: it runs again at the next open.
                core.logger.error("storing an activity's next attempt failed; it runs at the next open",
                                  metadata: ["activity": "\(next.name)", "attempt": "\(next.attempt)", "error": "\(error)"])
            }
            // Its cancellation was requested while this attempt's end was carried out: no next attempt.
            if takePendingCancel(next.id) { cancelUnstarted(next) }
            core.timers.wake()
            core.becameIdle()
        }
    }

    /// The rows of a retry: the task with its next attempt, and the timer that runs it. `replacing`:
    /// the task is written only if it is still stored (the timer then finds nothing to run).
    static func addRetry(_ next: ActivityTask, to batch: inout JournalBatch, replacing: Bool) {
        if replacing { batch.replaceTask(next.key, value: next.encoded()) } else { batch.putTask(next.key, value: next.encoded()) }
        if let timer = timer(of: next) { batch.scheduleTimer(timer) }
    }

    /// The timer a stored task waits for: the one that runs its next attempt at its `notBefore`, or
    /// while it is paused its schedule-to-close deadline's (`nil` without one). Its activity id with
    /// the top bit set (apart from a run body's timers), and a payload of `1` and the task's key.
    static func timer(of task: ActivityTask) -> JournalTimer? {
        let due = task.isPaused ? task.scheduleToCloseDeadline : task.notBefore
        return due.map {
            JournalTimer(dueNanoseconds: $0, entity: EntityKey(rawValue: task.entityKey),
                         id: task.activityID | retryTimerBit, payload: [1] + task.key.bytes)
        }
    }

    private static let retryTimerBit: UInt64 = 1 << 63

    /// Whether a timer's id is a retry timer's (see ``timer(of:)``).
    static func isRetryTimer(id: UInt64) -> Bool { id & retryTimerBit != 0 }

    // MARK: Damaged rows

    /// A retry timer whose row failed its check (damaged on disk): rebuilt from the task its key
    /// names, if that task is stored intact and is that timer's; the damaged row goes in the same
    /// commit. `done(false)` otherwise (the timer service sets the row aside).
    func repairRetryTimer(_ timer: JournalTimer, done: @escaping @Sendable (Bool) -> Void) {
        let activity = timer.id & ~Self.retryTimerBit
        let key = ActivityTask.key(entity: timer.entity.rawValue, activity: activity)
        guard case .success(let value?) = Result(catching: { () throws(JournalError) in try core.journal.task(forKey: key.bytes) }),
              let task = ActivityTask.decode(value), task.entityKey == timer.entity.rawValue, task.activityID == activity,
              let rebuilt = Self.timer(of: task)
        else { return done(false) }
        var batch = JournalBatch()
        batch.cancelTimer(dueNanoseconds: timer.dueNanoseconds, entity: timer.entity, id: timer.id)
        batch.scheduleTimer(rebuilt)  // after the delete: the same key when only the payload was damaged
        core.journal.submit(batch) { [core] result in
            guard case .success = result else { return done(false) }
            core!.logger.warning("an activity's retry timer failed its check (damaged on disk); it was rebuilt from the activity's task",
                                 metadata: ["activity": "\(task.name)", "entity.type": "\(task.entityType)", "entity.id": "\(task.entityID)"])
            done(true)
        }
    }

    /// A stored task whose row failed its check: the entity its key names is asked to store again
    /// the tasks its run is owed (see ``OwedRows``), which replaces the row if it was one of them.
    /// Otherwise it is left in place and never run.
    private func repairTask(key: [UInt8]) {
        let leftInPlace = "a stored activity task fails its check (damaged on disk); it is left in place and not run"
        guard let id = key.withUnsafeBytes({ ActivityTask.id(ofKey: $0) }) else {
            return core.logger.error("\(leftInPlace)", metadata: ["task.key": "\(key)"])
        }
        core.repair(.task(activity: id.activityID), of: EntityKey(rawValue: id.entityKey)) { [core] result in
            switch result {
            case .success(let owned):
                // Not claimed by this repair, the row may still have been its entity's: a load for
                // another message stored it again first (and the activity may have ended since).
                let now = owned ? nil : Result(catching: { () throws(JournalError) in try core!.journal.task(forKey: key) })
                switch now {
                case nil, .success?:
                    core!.logger.warning("a stored activity task failed its check (damaged on disk); its entity's history stored it again",
                                         metadata: ["task.key": "\(key)"])
                case .failure(let error)? where error.code == .corruptedRecord:
                    core!.logger.error("\(leftInPlace): no entity claims it", metadata: ["task.key": "\(key)"])
                case .failure(let error)?:
                    core!.logger.error("\(leftInPlace) until the next open", metadata: ["task.key": "\(key)", "error": "\(error)"])
                }
            case .failure(let error):
                core!.logger.error("\(leftInPlace) until the next open", metadata: ["task.key": "\(key)", "error": "\(error)"])
            }
        }
    }

    // MARK: Local activities

    /// Starts the first attempt of a local activity (`task`, whose entity key may not be known yet) on
    /// a ``TurnRunner``; the turn that scheduled it runs its work. If the attempt ends inside the
    /// turn, `owner` gets the decision there (with the command's `id`); otherwise (see ``detach(_:)``)
    /// the decision is carried out like a pool attempt's once the turn's commit is durable.
    /// - Returns: the runner the attempt runs on, or `nil` if the activity is not registered (the
    ///   caller schedules it on the pool, where it waits for its registration) or records each
    ///   attempt's start (see ``Activity/recordsAttemptStart``; the pool runs it).
    func startLocal(_ task: ActivityTask, owner: any LocalAttemptOwner, id: UInt64) -> TurnRunner? {
        // One that records its start runs on the pool, once its task is stored.
        guard let activity = activities.withLock({ $0[task.name] }), !activity.recordsAttemptStart else { return nil }
        return TurnRunner.start(in: core.runners) { [self] runner in
            let ended = await perform(task, activity, on: runner.executor)
            return endLocal(task, activity, ended, executor: runner.executor, owner: owner, id: id)
        }
    }

    /// A local attempt ended: inside the turn, `owner` gets the decision (returns `true`); detached,
    /// the decision waits for the scheduling turn's commit and then goes the way a pool attempt's goes.
    @inline(never)
    private func endLocal(_ task: ActivityTask, _ activity: any AnyActivity, _ ended: Ended, executor: TurnExecutor,
                          owner: any LocalAttemptOwner, id: UInt64) -> Bool {
        let decision = decide(task, ended)
        activity.metrics.attemptEnded(decision, timedOut: ended.timedOut, due: nil, startedAt: ended.startedAt, endedAt: now)
        if executor.finishInline() {
            owner.localAttemptEnded(id, decision)
            return true
        }
        executor.finish { [self] key, committed in
            // If that commit failed, the entity reloads without the command and schedules again.
            if committed {
                var stored = task
                stored.entityKey = key
                let interruption = running.withLock { $0.entries.removeValue(forKey: stored.id)?.interruption ?? .none }
                // A cancellation its run requested once it was stored (and waits for), or a pause that
                // interrupted it at a heartbeat, decides its end.
                let decision = interruption == .none ? decision : decide(stored, ended, interruption)
                if case .dropped = decision, ended.marked { unmark(stored, heartbeat: ended.heartbeat) }
                apply(decision, to: stored)
            }
            untrack(executor.trackingID)
        }
        return false
    }

    /// The turn (or drain) that started the attempt on `runner` is done with it: if the attempt still
    /// runs, it continues on its own (counted as running, cancelled by a closing runtime). Returns
    /// whether it still runs (a turn then stores its task). Tracked before it leaves, since it may
    /// end on another thread at once.
    func detach(_ runner: TurnRunner) -> Bool {
        track(runner)
        guard runner.executor.detach() else {
            untrack(runner.executor.trackingID)
            return false
        }
        return true
    }

    /// A local attempt that left its turn is stored as `task` (its scheduling commit, which gave its
    /// entity `entity`, is durable): from now on a give-up reaches it, and its heartbeats are stored,
    /// as a pool attempt's. Called before the attempt hears of that commit, so before its entry can
    /// go (in ``endLocal``); a detached runner is never reused, so cancelling one whose attempt just
    /// ended does nothing.
    func trackDetachedLocal(_ runner: TurnRunner, task: ActivityTask, entity: UInt64) {
        var stored = task
        stored.entityKey = entity
        trackRunning(runner, for: stored.id)
        runner.executor.attemptContext?.taskStored(stored, by: self)
    }

    /// The run of entity `entity` stopped awaiting activities `ids` (its commit, which deleted their
    /// tasks, is durable): a queued attempt of one of them is dropped, and a running one is cancelled
    /// (``ActivityContext/isCancelled``; cancellation-aware waits throw). A cancelled attempt that
    /// fails is not retried; one that returns anyway hands its outcome to the entity, which drops it.
    func giveUp(entity: UInt64, _ ids: [UInt64]) {
        let keys = ids.map { ActivityTask.ID(entityKey: entity, activityID: $0) }
        withPool { pool in
            for key in keys { pool.forget(key) }
        }
        running.withLock { running in
            for key in keys {
                running.entries[key]?.runner.task.cancel()
                if !running.pendingCancels.isEmpty, running.pendingCancels.remove(key) != nil {
                    pendingCancelCount.subtract(1, ordering: .relaxed)
                }
            }
        }
        for key in keys { dropPause(key) }
    }

    /// The run of entity `entity` requested the cancellation of activities `ids` and waits for how
    /// each ends (``ActivityCancellationType/waitCancellationCompleted``; the commit that stored the
    /// requests is durable). Called on the journal's completion queue, as the retry timers' reads are
    /// (``retryDue(_:done:)``), so the two never interleave. For each activity:
    /// - an attempt not started (queued, following a running one, waiting for the activity's
    ///   registration or for its retry) ends at once as cancelled, without running;
    /// - a running attempt is cancelled (``ActivityContext/isCancelled``); how it ends is the outcome
    ///   (see ``decide(_:_:_:)``);
    /// - one between those states gets the request from whoever moves it next (see
    ///   ``RunningAttempts/pendingCancels``).
    func requestCancel(entity: UInt64, _ ids: [UInt64]) {
        for activity in ids {
            let id = ActivityTask.ID(entityKey: entity, activityID: activity)
            if let task = withPool({ $0.take(id) }) ?? takeWaitingForRegistration(id) {
                cancelUnstarted(task)
                continue
            }
            let runner = running.withLock { running -> TurnRunner? in
                if let entry = running.entries[id] {
                    running.entries[id]!.cancelRequested = true
                    return entry.runner
                }
                if running.pendingCancels.insert(id).inserted { pendingCancelCount.add(1, ordering: .relaxed) }
                return nil
            }
            if let runner {
                runner.task.cancel()
            } else {
                cancelIfWaitingForRetry(id)
            }
        }
    }

    /// A task parked until its activity is registered, taken out (`nil` if it is not there).
    private func takeWaitingForRegistration(_ id: ActivityTask.ID) -> ActivityTask? {
        waiting.withLock { waiting -> ActivityTask? in
            for (name, tasks) in waiting.tasks {
                guard let index = tasks.firstIndex(where: { $0.id == id }) else { continue }
                let task = waiting.tasks[name]!.remove(at: index)
                if waiting.tasks[name]!.isEmpty { waiting.tasks[name] = nil }
                return task
            }
            return nil
        }
    }

    /// A cancellation request that found task `id` neither queued nor running (see
    /// ``requestCancel(entity:_:)``): if its stored row waits for a retry, the activity ends now as
    /// cancelled (its retry timer then finds the task gone, or reads the request); if the row is gone,
    /// the activity ended and its outcome is on its way. Otherwise the request stays pending.
    private func cancelIfWaitingForRetry(_ id: ActivityTask.ID) {
        let key = ActivityTask.key(entity: id.entityKey, activity: id.activityID)
        switch Result(catching: { () throws(JournalError) in try core.journal.task(forKey: key.bytes) }) {
        case .success(let value?):
            guard let task = ActivityTask.decode(value), task.notBefore > now, task.runningAttempt != task.attempt else { return }
            if takePendingCancel(id) { cancelUnstarted(task) }
        case .success(nil):
            _ = takePendingCancel(id)
        case .failure(let error):
            // Left pending: the retry timer, or the next open, reads the request's row.
            core.logger.warning("reading an activity task for its cancellation failed; it ends when its retry falls due",
                                metadata: ["task.key": "\(key)", "error": "\(error)"])
        }
    }

    /// Ends an activity whose cancellation was requested before its next attempt started, or (`atOpen`)
    /// before the process stopped: the outcome is a failure with reason `cancelled`, counting the
    /// attempts known to have been made (at open, one marked as running counts; one that was not
    /// marked may have started too: the stored task cannot tell).
    private func cancelUnstarted(_ task: ActivityTask, atOpen: Bool = false) {
        let interrupted = atOpen && task.runningAttempt == task.attempt
        let made = interrupted ? task.attempt : task.attempt - 1
        let why = if interrupted {
            "attempt \(task.attempt) was cut off by a stop of the process"
        } else if atOpen {
            "the process stopped before attempt \(task.attempt) ended, if it had started"
        } else {
            "no attempt was running (attempt \(task.attempt) had not started)"
        }
        let last = task.lastError.map { "; the last attempt failed with: \($0)" } ?? ""
        finish(task, .failure(ActivityFailure(activity: task.name, reason: .cancelled, attempts: made, causeType: "CancellationError",
                                              cause: "the activity's cancellation was requested; \(why)\(last)")),
               ActivityAttempt(number: made, startedAt: nil))
    }

    /// Hands the final outcome, and the attempt that ended the activity, to the entity, whose turn
    /// records them and deletes the task.
    private func finish(_ task: ActivityTask, _ outcome: Result<[UInt8], ActivityFailure>, _ attempt: ActivityAttempt) {
        if abandoned { return }
        // Counted busy before it is queued, as the outcome's message says it was.
        core.becameBusy()
        // A failed commit leaves the task stored: the outcome is delivered again a second later (else
        // the run would wait until the next open).
        let reply: VoidReply = { [self] result in
            if case .failure(let error) = result, error.code == .storage, !core.closed.load(ordering: .acquiring) {
                core.retryShortly { [self] in finish(task, outcome, attempt) }
            } else {
                // The outcome is recorded: a cancellation request still pending for it has nothing left
                // to do, and a pause goes with its row.
                _ = takePendingCancel(task.id)
                if case .success = result { dropPause(task.id) }
            }
            core.becameIdle()
        }
        if let receiver = task.receiver, receiver.receive(activity: task.activityID, outcome, attempt, reply: reply) { return }
        let found = core.types.withLock { types -> (any RegisteredEntityType)? in
            if let type = types[task.entityType] { return type }
            waiting.withLock { $0.outcomes[task.entityType, default: []].append((task, outcome, attempt)) }
            return nil
        }
        guard let type = found else {
            core.becameIdle()
            core.logger.debug("an activity's outcome waits for its entity type's registration", metadata: ["entity.type": "\(task.entityType)"])
            return
        }
        type.deliverActivityOutcome(id: task.activityID, outcome, attempt, entityID: task.entityID, core: core, reply: reply)
    }
}

/// Where a pool activity's outcome is delivered without a lookup: the entity's cell, while it is in memory.
protocol ActivityOutcomeReceiver: AnyObject, Sendable {
    /// Queues the outcome of activity `id`; `false` once the receiver has left memory (the entity is
    /// then looked up by name, which loads it again).
    func receive(activity id: UInt64, _ outcome: Result<[UInt8], ActivityFailure>, _ attempt: ActivityAttempt,
                 reply: @escaping VoidReply) -> Bool
}

/// What a local activity's attempt reports to when it ends inside the turn that started it: the run
/// that scheduled it (on the shard's thread, within the turn).
protocol LocalAttemptOwner: AnyObject, Sendable {
    /// Attempt of command `id` ended with `decision`.
    func localAttemptEnded(_ id: UInt64, _ decision: ActivityWorker.Decision)
}
