import DequeModule
import Synchronization

/// What a local activity's attempt reports to when it ends inside the turn that started it: the run
/// that scheduled it (on the shard's thread, within the turn).
protocol LocalAttemptOwner: AnyObject, Sendable {
    /// Attempt of command `id` ended with `decision`.
    func localAttemptEnded(_ id: UInt64, _ decision: ActivityWorker.Decision)
}

/// Where a local activity's attempt runs (see ``WorkflowContext/executeLocal(_:_:options:)``).
///
/// While the turn that started it is running, the attempt's jobs queue here and the turn runs them on
/// the shard's thread, between the run body's own jobs: an attempt that never waits for anything
/// outside finishes inside the turn, and its outcome is recorded in the same commit as the command
/// that scheduled it. When the turn ends with the attempt still waiting (it awaited I/O, a timer,
/// another actor), the attempt is *detached*: its jobs go to the global executor from then on, the
/// turn stores the activity as a task (as for a pool activity, so a crash runs it again at open),
/// and its outcome reaches the entity as a message once the turn's commit is durable.
///
/// `@unchecked Sendable`: all mutable state is under `state`.
final class LocalActivityExecutor: TaskExecutor, @unchecked Sendable {
    private enum Phase {
        /// Jobs run inside the turn.
        case inline
        /// Jobs run on the global executor; the completion waits for the scheduling commit.
        case detached
        /// The attempt finished inside the turn.
        case finished
    }
    private struct State {
        var phase = Phase.inline
        /// The queued jobs, oldest first: the first in place (there is seldom more than one, and a
        /// deque would be an allocation for every attempt), the rest after it.
        var firstJob: UnownedJob?
        var moreJobs = Deque<UnownedJob>()

        mutating func push(_ job: UnownedJob) {
            if firstJob == nil, moreJobs.isEmpty { firstJob = job } else { moreJobs.append(job) }
        }

        mutating func pop() -> UnownedJob? {
            if let job = firstJob {
                firstJob = nil
                return job
            }
            return moreJobs.popFirst()
        }
        /// The scheduling turn's commit is done (with the entity's key), or the completion that waits for it.
        var scheduled: (key: UInt64, ok: Bool)?
        var pending: (@Sendable (_ key: UInt64, _ ok: Bool) -> Void)?
        var drainID: UInt64?
    }
    private let state = Mutex(State())

    /// Its handle among the worker's running attempts, once detached.
    var drainID: UInt64? {
        get { state.withLock { $0.drainID } }
        set { state.withLock { $0.drainID = newValue } }
    }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        let queued = state.withLock { state -> Bool in
            guard case .inline = state.phase else { return false }
            state.push(job)
            return true
        }
        if !queued { globalConcurrentExecutor.enqueue(ExecutorJob(job)) }
    }

    /// Runs the queued jobs (on the shard's thread, inside the turn); returns whether any ran.
    func drain() -> Bool {
        var ran = false
        while let job = state.withLock({ state -> UnownedJob? in
            guard case .inline = state.phase else { return nil }
            return state.pop()
        }) {
            job.runSynchronously(on: asUnownedTaskExecutor())
            ran = true
        }
        return ran
    }

    /// The turn ends: an attempt still running continues on the global executor. Returns whether it
    /// was still running (the turn then stores its task).
    func detach() -> Bool {
        let moved = state.withLock { state -> [UnownedJob]? in
            guard case .inline = state.phase else { return nil }
            state.phase = .detached
            var moved: [UnownedJob] = []
            while let job = state.pop() { moved.append(job) }
            return moved
        }
        guard let moved else { return false }
        for job in moved { globalConcurrentExecutor.enqueue(ExecutorJob(job)) }
        return true
    }

    /// The attempt ended: returns `true` if it ended inside the turn (the caller records the outcome
    /// there); `false`, changing nothing, if it was detached (then call ``finish(_:)``).
    func finishInline() -> Bool {
        state.withLock { state in
            guard case .inline = state.phase else { return false }
            state.phase = .finished
            return true
        }
    }

    /// A detached attempt ended (``finishInline()`` said `false`): `completion` runs once the
    /// scheduling turn's commit is done, with the entity's key and whether that commit succeeded.
    func finish(_ completion: @escaping @Sendable (_ key: UInt64, _ ok: Bool) -> Void) {
        let scheduled = state.withLock { state -> (key: UInt64, ok: Bool)? in
            if state.scheduled == nil { state.pending = completion }
            return state.scheduled
        }
        if let scheduled { completion(scheduled.key, scheduled.ok) }
    }

    /// The turn that detached the attempt committed (or failed to): releases the completion.
    func scheduled(key: UInt64, ok: Bool) {
        let pending = state.withLock { state -> (@Sendable (UInt64, Bool) -> Void)? in
            state.scheduled = (key, ok)
            defer { state.pending = nil }
            return state.pending
        }
        pending?(key, ok)
    }
}
