import DequeModule
import Synchronization

/// The executor of a ``TurnRunner``: it runs nothing by itself. While its job runs inside turns
/// (`inline`), the job's work queues here and the turn drains it on the shard's thread, in the order
/// it was enqueued.
///
/// A run body's runner stays inline for the whole body: since the runtime resumes the body's waits
/// in history order, one history always gives one interleaving — child tasks (`async let`, task
/// groups) included, as they inherit the executor preference.
///
/// A local activity's attempt (see ``WorkflowContext/executeLocal(_:_:options:)``) runs between the
/// run body's own work: an attempt that never waits for anything outside finishes inside the turn,
/// and its outcome is recorded in the same commit as the command that scheduled it. When the turn
/// ends with the attempt still waiting (it awaited I/O, a timer, another actor), the attempt is
/// *detached*: its work goes to the global executor from then on, the turn stores the activity as a
/// task (as for a pool activity, so a crash runs it again at open), and its outcome reaches the
/// entity as a message once the turn's commit is durable.
///
/// A pool activity's attempt runs the same way on one of the activity pool's drain threads (see
/// ``ActivityWorker``): the drain is its "turn", and an attempt that waits is detached from it.
///
/// `@unchecked Sendable`: all mutable state is under `state`.
final class TurnExecutor: TaskExecutor, @unchecked Sendable {
    private enum Phase: Equatable {
        /// Jobs run inside the turn.
        case inline
        /// Jobs run on the global executor (an attempt that left its turn); the completion waits for
        /// the scheduling commit.
        case detached
        /// The runner's job ended inside a turn: whatever the task runs next (waiting for a job,
        /// ending) is not a turn's.
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
        var trackingID: UInt64?
        /// A local activity's attempt: its context, told when its task is stored (once it left its turn).
        var attemptContext: ActivityContext?
    }
    private let state = Mutex(State())

    /// Makes a runner's executor, whose job finished inside its turn, ready for the next job.
    func reset() {
        state.withLock { state in
            precondition(state.phase == .finished, "only an executor whose job finished inline runs another")
            state = State()
        }
    }

    /// Its handle among the worker's attempts that left their turn or drain, once detached.
    var trackingID: UInt64? {
        get { state.withLock { $0.trackingID } }
        set { state.withLock { $0.trackingID = newValue } }
    }

    /// The context of the local activity's attempt the job runs, if any (see ``ActivityWorker/trackDetachedLocal(_:task:entity:)``).
    var attemptContext: ActivityContext? {
        get { state.withLock { $0.attemptContext } }
        set { state.withLock { $0.attemptContext = newValue } }
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

    /// The job ended: returns `true` if it ended inside the turn (for an attempt, the caller records
    /// the outcome there); `false`, changing nothing, if it was detached (then call ``finish(_:)``).
    func finishInline() -> Bool {
        state.withLock { state in
            guard case .inline = state.phase else { return false }
            state.phase = .finished
            state.attemptContext = nil  // its task was never stored; the context goes with the attempt
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

/// A task whose jobs run inside turns, one job after another: a run body (its whole life), a local
/// activity's attempt, or a pool activity's attempt (whose "turn" is the activity pool's drain). Its ``TurnExecutor`` queues the job's work; the turn drains it.
///
/// A task per job cost its creation, the task allocator's first slab (a 1 KiB block, glibc's slow
/// path, which first consolidates every freed small block) and the task's destruction; a runner pays
/// them once. After a job that ended inside a turn, the runner parks in its ``TurnRunners`` until a
/// turn starts the next job on it (`saga-transfer` with local activities, where each transfer is a run
/// body and three attempts: −5% CPU a transfer side by side once bodies reused runners too). A job
/// that leaves its turn (an attempt, see ``TurnExecutor/detach()``) keeps the runner: it ends with
/// that job.
///
/// A runner is a detached task: a job does not see the task-local values of whoever started it.
///
/// `@unchecked Sendable`: `task` is set once, before its first job runs; `first`, `next` and `parking` are
/// touched by the runner's own jobs and, after the runner parked (under the pool's lock), by the turn
/// that takes it.
final class TurnRunner: @unchecked Sendable {
    /// A job: runs on the runner (whose executor it may use); returns what its executor's
    /// ``TurnExecutor/finishInline()`` said at its end: whether it ended inside its turn (`false`: it
    /// left the turn, and the runner ends with it).
    typealias Job = @Sendable (TurnRunner) async -> Bool

    let executor = TurnExecutor()
    /// The runner's task (set right after it is created).
    private(set) var task: Task<Void, Never>!
    /// The first job, until the task takes it.
    private var first: Job?
    /// Where the parked runner waits for its next job (`nil`: end).
    private var next: UnsafeContinuation<Job?, Never>?
    /// The runner just suspended for its next job: the drain that ran it parks it.
    private var parking = false
    private weak var pool: TurnRunners?

    private init(pool: TurnRunners?, first: @escaping Job) {
        self.pool = pool
        self.first = first
    }

    /// Starts `job` on a runner parked in `pool`, or on a new one (which parks in `pool` afterwards;
    /// with no pool, it ends with its job). The job's first work is queued: the caller's turn drains it.
    static func start(in pool: TurnRunners?, _ job: @escaping Job) -> TurnRunner {
        if let runner = pool?.take() {
            // Its continuation's work queues on its executor, which the turn drains.
            runner.next.take()!.resume(returning: job)
            return runner
        }
        let runner = TurnRunner(pool: pool, first: job)
        runner.task = Task.detached(executorPreference: runner.executor) { await runner.run() }
        return runner
    }

    /// The runner's task: jobs one after another, until one leaves its turn.
    private func run() async {
        var job = first.take()!
        while true {
            guard await Self.perform(consume job, on: self) else { return }
            guard let next = await nextJob() else { return }
            job = next
        }
    }

    /// One job. Out of line, so that the runner holds no job while parked (a job holds its run).
    @inline(never)
    private static func perform(_ job: consuming @escaping Job, on runner: TurnRunner) async -> Bool {
        await job(runner)
    }

    /// Runs the job's queued work on the turn's thread. Once the runner has suspended for its next
    /// job (its job returned), it goes back to the pool: `parked` says so, and the caller must then
    /// forget the runner (another turn may take it at once).
    func drain() -> (ran: Bool, parked: Bool) {
        let ran = executor.drain()
        guard parking else { return (ran, false) }
        parking = false
        if let pool { pool.park(self) } else { end() }
        return (ran, true)
    }

    /// Waits for the next job, parked (`nil`: the runner ends). Called by the runner's task after a
    /// job that ended inside its turn, so from a drain on the turn's thread.
    private func nextJob() async -> Job? {
        await withUnsafeContinuation { continuation in
            next = continuation
            parking = true
        }
    }

    /// Ends a runner waiting for its next job (its executor finished: the task ends on the global executor).
    fileprivate func end() {
        next.take()?.resume(returning: nil)
    }

    /// Makes a parked runner ready for its next job.
    fileprivate func reset() { executor.reset() }
}

/// The parked ``TurnRunner``s of a runtime.
final class TurnRunners: Sendable {
    private struct State {
        var idle: [TurnRunner] = []
        var closed = false
    }
    private let state = Mutex(State())
    /// Runners kept parked at most. Run bodies end in bursts (the runs a commit completes, often a
    /// hundred or more), and a runner not kept is one created again for the next run; a parked runner
    /// costs ~2 KiB.
    static let maximumIdle = 1_024

    /// How many runners are parked.
    var count: Int { state.withLock { $0.idle.count } }

    /// A parked runner, ready for a job (its executor reset), or `nil` if none is parked.
    fileprivate func take() -> TurnRunner? {
        guard let runner = state.withLock({ $0.idle.popLast() }) else { return nil }
        runner.reset()
        return runner
    }

    /// `runner` waits for its next job: kept, or ended if the pool is full or closed, or its task was cancelled.
    fileprivate func park(_ runner: TurnRunner) {
        // A cancelled task (an attempt given up) would cancel every later job: it ends.
        let cancelled = runner.task.isCancelled
        let kept = state.withLock { state -> Bool in
            guard !cancelled, !state.closed, state.idle.count < Self.maximumIdle else { return false }
            state.idle.append(runner)
            return true
        }
        if !kept { runner.end() }
    }

    /// The runtime closes: every parked runner ends, and runners that finish from now on end too.
    func close() {
        let idle = state.withLock { state -> [TurnRunner] in
            state.closed = true
            defer { state.idle.removeAll() }
            return state.idle
        }
        for runner in idle { runner.end() }
    }
}
