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
    private enum Phase: Equatable {
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

    /// Makes a runner's executor, whose attempt finished inside its turn, ready for the next attempt.
    func reset() {
        state.withLock { state in
            precondition(state.phase == .finished, "only an executor whose attempt finished inline runs another")
            state = State()
        }
    }

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

/// A task that runs local activities' attempts one after another, each inside the turn that starts
/// it (on its ``LocalActivityExecutor``, drained by that turn).
///
/// A task per attempt cost its creation, an executor, the task allocator's first slab (a 1 KiB block,
/// glibc's slow path) and the task's destruction; a runner pays them once. After an attempt that ended
/// inside its turn, the runner parks in its ``LocalRunners`` until a turn starts the next attempt on
/// it. An attempt that leaves its turn (see ``LocalActivityExecutor/detach()``) keeps the runner: it
/// ends with that attempt.
///
/// A runner is a detached task: an attempt does not see the run body's task-local values (nor does a
/// pool attempt).
///
/// `@unchecked Sendable`: `task` is set once, before its first job runs; `first`, `next` and `parking` are
/// touched by the runner's own jobs and, after the runner parked (under the pool's lock), by the turn
/// that takes it.
final class LocalRunner: @unchecked Sendable {
    /// An attempt to run: the activity, its task, and whom to tell how it ended inside the turn.
    struct Job {
        let task: ActivityTask
        let activity: any AnyActivity
        let owner: any LocalAttemptOwner
        let id: UInt64
    }

    let executor = LocalActivityExecutor()
    /// The runner's task (set right after it is created).
    var task: Task<Void, Never>!
    /// The first job, until the task takes it.
    var first: Job?
    /// Where the parked runner waits for its next job (`nil`: end).
    var next: UnsafeContinuation<Job?, Never>?
    /// The runner just suspended for its next job: the drain that ran it parks it.
    private var parking = false
    private weak var pool: LocalRunners?

    init(pool: LocalRunners, first: Job) {
        self.pool = pool
        self.first = first
    }

    /// Runs the attempt's queued jobs on the turn's thread; returns whether any ran. Once the runner
    /// has suspended for its next job (its job returned), it goes back to the pool.
    func drain() -> Bool {
        let ran = executor.drain()
        if parking {
            parking = false
            if let pool { pool.park(self) } else { next.take()?.resume(returning: nil) }
        }
        return ran
    }

    /// Waits for the next job, parked (`nil`: the runner ends). Called by the runner's task after an
    /// attempt that ended inside its turn, so from a drain on the turn's thread.
    func nextJob() async -> Job? {
        await withUnsafeContinuation { continuation in
            next = continuation
            parking = true
        }
    }
}

/// The parked ``LocalRunner``s of a runtime.
final class LocalRunners: Sendable {
    private struct State {
        var idle: [LocalRunner] = []
        var closed = false
    }
    private let state = Mutex(State())
    /// Runners kept parked at most: as many local attempts as run inside turns at once, with room.
    static let maximumIdle = 64

    /// How many runners are parked.
    var count: Int { state.withLock { $0.idle.count } }

    /// A parked runner, ready for `job` (its executor reset), or `nil` if none is parked.
    func take() -> LocalRunner? {
        guard let runner = state.withLock({ $0.idle.popLast() }) else { return nil }
        runner.executor.reset()
        return runner
    }

    /// `runner` waits for its next job: kept, or ended if the pool is full or closed.
    fileprivate func park(_ runner: LocalRunner) {
        let kept = state.withLock { state -> Bool in
            guard !state.closed, state.idle.count < Self.maximumIdle else { return false }
            state.idle.append(runner)
            return true
        }
        if !kept { runner.next.take()?.resume(returning: nil) }
    }

    /// The runtime closes: every parked runner ends, and runners that finish from now on end too.
    func close() {
        let idle = state.withLock { state -> [LocalRunner] in
            state.closed = true
            defer { state.idle.removeAll() }
            return state.idle
        }
        for runner in idle { runner.next.take()?.resume(returning: nil) }
    }
}
