import DequeModule
import Foundation
import Logging
import Synchronization

/// An activity, whatever its types: decodes its input, runs it, encodes its output.
protocol AnyActivity: Sendable {
    func run(_ input: [UInt8], context: ActivityContext, codec: any EntityCodec) async throws -> [UInt8]
}

struct RegisteredActivity<A: Activity>: AnyActivity {
    let activity: A
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
/// `@unchecked Sendable`: `core` is set once before use; everything else is in `Mutex`es.
final class ActivityWorker: @unchecked Sendable {
    private unowned(unsafe) var core: RuntimeCore!
    private let activities = Mutex<[String: any AnyActivity]>([:])
    private struct Pool {
        var running = 0
        var queue = Deque<ActivityTask>()
        /// Tasks queued or running, by key: a task is never run twice at once.
        var active: Set<[UInt8]> = []
        /// The runtime is closing: no attempt starts, outcomes of running ones are dropped once the
        /// grace period ended (their tasks stay stored and run again at the next open).
        var closing = false
    }
    /// The pool's queue, under one lock taken about three times per attempt (queue, pop, pop-or-exit):
    /// every activity of every entity goes through it, so it is kept short and apart from the rest.
    private let pool = Mutex(Pool())
    /// The draining tasks, to cancel them when the grace period ends.
    private struct Drains {
        var tasks: [UInt64: Task<Void, Never>] = [:]
        var next: UInt64 = 0
    }
    private let drains = Mutex(Drains())
    /// Outcomes are dropped (the grace period ended; the journal may be closed).
    private let abandonedFlag = Atomic<Bool>(false)
    private let limit: Int
    /// Work that waits for a registration: tasks whose activity is not registered yet, and final
    /// outcomes whose entity type is not registered yet. Registering delivers them.
    private struct Waiting {
        var tasks: [String: [ActivityTask]] = [:]
        var outcomes: [String: [(ActivityTask, Result<[UInt8], ActivityFailure>)]] = [:]
    }
    private let waiting = Mutex(Waiting())

    init(limit: Int) { self.limit = max(1, limit) }

    func attach(_ core: RuntimeCore) { self.core = core }

    func register<A: Activity>(_ activity: A) {
        activities.withLock { $0[A.name] = RegisteredActivity(activity: activity) }
        let parked = waiting.withLock { $0.tasks.removeValue(forKey: A.name) } ?? []
        for task in parked { dispatch(task) }
    }

    /// An entity type was registered: delivers the outcomes that waited for it.
    func entityTypeRegistered(_ type: String) {
        let parked = waiting.withLock { $0.outcomes.removeValue(forKey: type) } ?? []
        for (task, outcome) in parked { finish(task, outcome) }
    }

    /// Queues an attempt of `task` (once: a task already queued or running is left alone).
    func dispatch(_ task: ActivityTask) {
        let start = pool.withLock { pool -> Bool in
            // Closing: the task is stored, the next open runs it.
            guard !pool.closing, pool.active.insert(task.key).inserted else { return false }
            pool.queue.append(task)
            guard pool.running < limit else { return false }
            pool.running += 1
            return true
        }
        guard start else { return }
        startDrain()
    }

    /// Starts a task that runs queued attempts (a pool slot is taken). It keeps the core alive: an
    /// attempt abandoned by ``close(gracePeriod:)`` may return after the runtime is gone.
    private func startDrain() {
        core.becameBusy()
        let core: RuntimeCore = core
        drains.withLock { drains in
            let id = drains.next
            drains.next += 1
            drains.tasks[id] = Task {
                await self.drain()
                self.drains.withLock { _ = $0.tasks.removeValue(forKey: id) }
                core.becameIdle()
            }
        }
    }

    /// The runtime closes: no attempt starts from now on (queued ones stay stored for the next
    /// open), running ones get `gracePeriod` to end on their own and are then cancelled; those still
    /// running a second later are abandoned. Their outcomes, if any, are then dropped: the tasks stay
    /// stored and run again, with the same idempotency key, at the next open.
    /// - Parameter waitUntilIdle: waits until the runtime is idle or the deadline passes; returns
    ///   whether it became idle.
    func close(gracePeriod: Duration, waitUntilIdle: (ContinuousClock.Instant) -> Bool) {
        pool.withLock { pool in
            pool.closing = true
            for task in pool.queue { pool.active.remove(task.key) }
            pool.queue.removeAll()
        }
        if waitUntilIdle(.now + gracePeriod) { return }
        let running = drains.withLock { Array($0.tasks.values) }
        if !running.isEmpty {
            core.logger.warning("closing: activity attempts still running after the grace period are cancelled",
                                metadata: ["attempts": "\(running.count)", "gracePeriod": "\(gracePeriod)"])
        }
        for drain in running { drain.cancel() }
        if waitUntilIdle(.now + .seconds(1)) { return }
        abandonedFlag.store(true, ordering: .releasing)
        let stuck = drains.withLock { $0.tasks.count }
        core.logger.warning("closing: activity attempts that ignore cancellation are abandoned; they run again at the next open",
                            metadata: ["attempts": "\(stuck)"])
    }

    /// Whether an attempt's outcome must be dropped (the runtime closed without it).
    private var abandoned: Bool { abandonedFlag.load(ordering: .acquiring) }

    /// Running attempts (drains), for the close's idleness check.
    var runningAttempts: Int { drains.withLock { $0.tasks.count } }

    /// Runs queued attempts until the queue is empty, then gives its slot back. Taking the next task
    /// and giving the slot back happen under one lock, so a task queued meanwhile either is taken
    /// here or finds a free slot in ``dispatch(_:)``.
    private func drain() async {
        var next = pool.withLock { pool -> ActivityTask? in
            if !pool.closing, let task = pool.queue.popFirst() { return task }
            pool.running -= 1
            return nil
        }
        while let task = next {
            await attempt(task)
            next = pool.withLock { pool -> ActivityTask? in
                pool.active.remove(task.key)
                if !pool.closing, let task = pool.queue.popFirst() { return task }
                pool.running -= 1
                return nil
            }
        }
    }

    /// At open: every stored task whose next attempt is due runs again (same idempotency key); the
    /// others wait for their retry timers.
    func recover() {
        let now = core.clock.nowNanoseconds()
        let stored: [(key: [UInt8], value: [UInt8])]
        do {
            stored = try core.journal.tasks(prefix: [ActivityTask.keyPrefix])
        } catch {
            core.logger.error("reading stored activity tasks failed; they run at the next open", metadata: ["error": "\(error)"])
            return
        }
        for (key, value) in stored {
            guard let task = ActivityTask.decode(value) else {
                core.logger.error("a stored activity task does not decode; it is left in place", metadata: ["task.key": "\(key)"])
                continue
            }
            if task.notBefore <= now { dispatch(task) }
        }
    }

    /// A retry timer fell due: run the task's next attempt (if it is still owed).
    func retryDue(_ timer: JournalTimer, done: @escaping @Sendable () -> Void) {
        let key = Array(timer.payload.dropFirst())
        var batch = JournalBatch()
        batch.cancelTimer(dueNanoseconds: timer.dueNanoseconds, entity: timer.entity, id: timer.id)
        core.journal.submit(batch) { [self] _ in
            if let value = try? core.journal.task(forKey: key),
               let task = ActivityTask.decode(value) {
                dispatch(task)
            }
            done()
        }
    }

    // MARK: One attempt

    fileprivate enum Timeout: Sendable { case startToClose, heartbeat, scheduleToClose }

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

    private func attempt(_ task: ActivityTask) async {
        // An activity not registered (yet) waits for its registration: after a restart, tasks are
        // recovered before the application has registered everything.
        let found = activities.withLock { registered -> (any AnyActivity)? in
            if let activity = registered[task.name] { return activity }
            waiting.withLock { $0.tasks[task.name, default: []].append(task) }
            return nil
        }
        guard let activity = found else {
            core.logger.debug("an activity waits for its registration", metadata: ["activity": "\(task.name)"])
            return
        }
        let ended = await perform(task, activity, on: nil)
        apply(decide(task, ended), to: task)
    }

    /// How an attempt ended: its result, the timeout that ended it, its last heartbeat details.
    private struct Ended: Sendable {
        var result: Result<[UInt8], any Error>
        var timedOut: Timeout?
        var heartbeat: [UInt8]?
        /// The attempt's task was cancelled (the runtime closes).
        var cancelled: Bool
    }

    /// Runs one attempt of `task` under its timeouts. With an `executor`, the attempt's own task
    /// (when a timeout needs one) prefers it too (a local activity's attempt runs inside the turn).
    ///
    /// Two paths, neither inlined here: an async function's frame is allocated on its task's stack by
    /// its caller, and one holding both paths took ~4 KiB for each local attempt (several slab
    /// allocations of the task allocator, each over 1 KiB, which makes glibc consolidate its free
    /// lists) where the untimed path needs a fraction of that.
    private func perform(_ task: ActivityTask, _ activity: any AnyActivity, on executor: (any TaskExecutor)?) async -> Ended {
        let options = task.options
        if options.startToCloseTimeout == nil, options.scheduleToCloseTimeout == nil, options.heartbeatTimeout == nil {
            return await performUntimed(task, activity)
        }
        return await performTimed(task, activity, on: executor)
    }

    /// An attempt that nothing can time out: the activity runs right here, in the caller's task.
    @inline(never)
    private func performUntimed(_ task: ActivityTask, _ activity: any AnyActivity) async -> Ended {
        let codec = core.codec
        let context = ActivityContext(
            idempotencyKey: task.idempotencyKey, attempt: task.attempt, entity: task.entityName,
            logger: core.logger, lastHeartbeat: task.heartbeat, codec: codec, onHeartbeat: nil)
        let result: Result<[UInt8], any Error>
        do { result = .success(try await activity.run(task.input, context: context, codec: codec)) } catch { result = .failure(error) }
        return Ended(result: result, timedOut: nil, heartbeat: context.heartbeatDetails, cancelled: Task.isCancelled)
    }

    /// An attempt under at least one timeout: watchdog alarms, and a task of its own they can cancel.
    @inline(never)
    private func performTimed(_ task: ActivityTask, _ activity: any AnyActivity, on executor: (any TaskExecutor)?) async -> Ended {
        let clock = core.clock
        let codec = core.codec
        let attempt = Attempt()
        let alarms = core.timers
        let started = clock.nowNanoseconds()
        var scheduled: [UInt64] = []
        if let limit = task.options.startToCloseTimeout {
            scheduled.append(alarms.alarm(at: started &+ limit.nanoseconds, attempt.expire(.startToClose)))
        }
        if let limit = task.options.scheduleToCloseTimeout {
            scheduled.append(alarms.alarm(at: task.scheduledAt &+ limit.nanoseconds, attempt.expire(.scheduleToClose)))
        }
        if let limit = task.options.heartbeatTimeout {
            let alarm = alarms.alarm(at: started &+ limit.nanoseconds, attempt.expire(.heartbeat))
            attempt.state.withLock { $0.heartbeatAlarm = alarm }
        }
        let context = ActivityContext(
            idempotencyKey: task.idempotencyKey, attempt: task.attempt, entity: task.entityName,
            logger: core.logger, lastHeartbeat: task.heartbeat, codec: codec
        ) {
            // A heartbeat (its details stay in the context) rearms the heartbeat watchdog.
            var next: UInt64?
            if let limit = task.options.heartbeatTimeout {
                next = alarms.alarm(at: clock.nowNanoseconds() &+ limit.nanoseconds, attempt.expire(.heartbeat))
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
        return Ended(result: result, timedOut: timedOut, heartbeat: context.heartbeatDetails, cancelled: Task.isCancelled)
    }

    /// What comes after an attempt.
    enum Decision: Sendable {
        case succeeded([UInt8])
        /// The activity ended for good.
        case failed(ActivityFailure)
        /// Attempt `next.attempt` runs at `next.notBefore`.
        case retry(ActivityTask)
        /// Nothing is recorded: the runtime closed during the attempt (its task runs again at the next open).
        case dropped
    }

    /// Applies the retry policy to an attempt's end.
    private func decide(_ task: ActivityTask, _ ended: Ended) -> Decision {
        // Cancelled by a closing runtime: a failure is not recorded (nor is anything once the attempt
        // was abandoned); the stored task runs again at the next open.
        if abandoned { return .dropped }
        if ended.cancelled, case .failure = ended.result { return .dropped }
        var next = task
        next.heartbeat = ended.heartbeat
        if let reason = ended.timedOut {
            return retryOrFail(next, errorType: "\(reason)Timeout", error: "the attempt timed out (\(reason))", timeout: reason, nonRetryable: false)
        }
        switch ended.result {
        case .success(let output):
            return .succeeded(output)
        case .failure(let error):
            let type = String(describing: Swift.type(of: error))
            let nonRetryable = error is NonRetryableError || task.options.retry.nonRetryableErrorTypes.contains(type)
            return retryOrFail(next, errorType: type, error: "\(error)", timeout: nil, nonRetryable: nonRetryable)
        }
    }

    /// After a failed attempt: the next attempt, or the final failure.
    private func retryOrFail(_ task: ActivityTask, errorType: String, error: String, timeout: Timeout?, nonRetryable: Bool) -> Decision {
        let policy = task.options.retry
        let attempts = task.attempt
        func fail(_ reason: ActivityFailure.Reason) -> Decision {
            .failed(ActivityFailure(activity: task.name, reason: reason, attempts: attempts, causeType: errorType, cause: error))
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
        let due = now &+ policy.delay(after: attempts).nanoseconds
        if let limit = task.options.scheduleToCloseTimeout, due >= task.scheduledAt &+ limit.nanoseconds {
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
        case .succeeded(let output): finish(task, .success(output))
        case .failed(let failure): finish(task, .failure(failure))
        case .retry(var next):
            next.entityKey = task.entityKey  // a local attempt's task learns its entity key at the commit
            storeRetry(next)
        case .dropped: break
        }
    }

    /// Stores the next attempt and its retry timer (the timer runs it, see ``retryDue(_:done:)``).
    private func storeRetry(_ next: ActivityTask) {
        var batch = JournalBatch()
        Self.addRetry(next, to: &batch)
        core.becameBusy()
        core.journal.submit(batch) { [core] _ in
            core!.timers.wake()
            core!.becameIdle()
        }
    }

    /// The rows of a retry: the task with its next attempt, and the timer that runs it.
    static func addRetry(_ next: ActivityTask, to batch: inout JournalBatch) {
        batch.putTask(key: next.key, value: next.encoded())
        batch.scheduleTimer(JournalTimer(dueNanoseconds: next.notBefore, entity: EntityKey(rawValue: next.entityKey),
                                         id: next.activityID | (1 << 63), payload: [1] + next.key))
    }

    // MARK: Local activities

    /// Starts the first attempt of a local activity (`task`, whose entity key may not be known yet) on
    /// a ``TurnRunner``; the turn that scheduled it runs its work. If the attempt ends inside the
    /// turn, `owner` gets the decision there (with the command's `id`); otherwise (see ``detach(_:)``)
    /// the decision is carried out like a pool attempt's once the turn's commit is durable.
    /// - Returns: the runner the attempt runs on, or `nil` if the activity is not registered (the
    ///   caller schedules it on the pool, where it waits for its registration).
    func startLocal(_ task: ActivityTask, owner: any LocalAttemptOwner, id: UInt64) -> TurnRunner? {
        guard let activity = activities.withLock({ $0[task.name] }) else { return nil }
        return TurnRunner.start(in: core.runners) { [self] runner in
            let ended = await perform(task, activity, on: runner.executor)
            return endLocal(task, ended, executor: runner.executor, owner: owner, id: id)
        }
    }

    /// A local attempt ended: inside the turn, `owner` gets the decision (returns `true`); detached,
    /// the decision waits for the scheduling turn's commit and then goes the way a pool attempt's goes.
    @inline(never)
    private func endLocal(_ task: ActivityTask, _ ended: Ended, executor: TurnExecutor,
                          owner: any LocalAttemptOwner, id: UInt64) -> Bool {
        let decision = decide(task, ended)
        if executor.finishInline() {
            owner.localAttemptEnded(id, decision)
            return true
        }
        executor.finish { [self] key, committed in
            // If that commit failed, the entity reloads without the command and schedules again.
            if committed {
                var stored = task
                stored.entityKey = key
                apply(decision, to: stored)
            }
            if let id = executor.drainID { drains.withLock { _ = $0.tasks.removeValue(forKey: id) } }
            core.becameIdle()
        }
        return false
    }

    /// The turn that started the attempt on `runner` ends: if the attempt still runs, it continues
    /// outside the turn (counted as running, cancelled by a closing runtime like the pool's attempts).
    /// Returns whether it still runs (the turn then stores its task).
    func detach(_ runner: TurnRunner) -> Bool {
        guard runner.executor.detach() else { return false }
        core.becameBusy()
        let id = drains.withLock { drains -> UInt64 in
            let id = drains.next
            drains.next += 1
            drains.tasks[id] = runner.task
            return id
        }
        runner.executor.drainID = id
        return true
    }

    /// Hands the final outcome to the entity, whose turn records it and deletes the task.
    private func finish(_ task: ActivityTask, _ outcome: Result<[UInt8], ActivityFailure>) {
        if abandoned { return }
        let found = core.types.withLock { types -> (any RegisteredEntityType)? in
            if let type = types[task.entityType] { return type }
            waiting.withLock { $0.outcomes[task.entityType, default: []].append((task, outcome)) }
            return nil
        }
        guard let type = found else {
            core.logger.debug("an activity's outcome waits for its entity type's registration", metadata: ["entity.type": "\(task.entityType)"])
            return
        }
        core.becameBusy()
        type.deliverActivityOutcome(id: task.activityID, outcome, entityID: task.entityID, core: core) { [core] in core!.becameIdle() }
    }
}

/// What a local activity's attempt reports to when it ends inside the turn that started it: the run
/// that scheduled it (on the shard's thread, within the turn).
protocol LocalAttemptOwner: AnyObject, Sendable {
    /// Attempt of command `id` ended with `decision`.
    func localAttemptEnded(_ id: UInt64, _ decision: ActivityWorker.Decision)
}
