import Logging

/// The non-generic face of a ``WorkflowRun``, so that the data of a turn (``EntityDurable``) carries no
/// type parameter. The cell, which knows the entity type, downcasts (``EntityCell/run(_:)``).
class AnyWorkflowRun: @unchecked Sendable {
    /// Ends the body without recording anything (see ``WorkflowRun/abandon()``).
    func abandon() {}
    /// Whether ``abandon()`` has anything to end. Read between turns only.
    var needsAbandoning: Bool { true }
}

/// One live execution of an entity's run body: its job on a ``TurnRunner``, the waits it is
/// suspended on, and the commands it issued that are not yet recorded.
///
/// Touched only on the entity's shard thread (and by the body's jobs, which that thread runs).
/// `@unchecked Sendable` for that reason.
final class WorkflowRun<W: EntityWorkflow>: AnyWorkflowRun, LocalAttemptOwner, @unchecked Sendable {
    typealias Waiter = WorkflowWaiter
    typealias ChildRecord = WorkflowChildRecord

    struct Abandoned: Error {}
    /// Thrown by ``WorkflowContext/continueAsNew(_:)`` to end the body; never recorded as a failure.
    struct ContinuedAsNew: Error, CustomStringConvertible {
        var description: String { "the run continued as new" }
    }

    /// Runs the body, from ``start(_:)`` until the body ended and its runner parked.
    private var runner: TurnRunner?
    /// Where the body's and the local attempts' runners park between jobs; set by the cell with
    /// `activityWorker` (`nil` when replaying an export: a runner then ends with its job).
    var runners: TurnRunners?
    let name: EntityName
    let run: UInt64
    let codec: any EntityCodec
    let logger: Logger
    /// The working state, shared with the turn.
    var state: W.State
    /// The time of the input being handled.
    var now: UInt64 = 0
    /// Commands issued and not yet recorded (live) or matched (replay).
    var issued: [WorkflowCommand] = []
    /// Whether history events remain to be replayed.
    var replaying = false
    var recordedSideEffects: [UInt64: [UInt8]] = [:]
    var recordedVersions: [String: Int] = [:]
    /// Change ids that a replay found without a marker: the run began before the change, so every
    /// later call in the run gets the default version too, and records nothing.
    var defaultedVersions: Set<String> = []
    /// Due time of every started, unfinished timer.
    var timerDue: [UInt64: UInt64] = [:]
    private var nextCommand: UInt64 = 1
    private var waiters: [Waiter] = []
    /// Activities the body awaits, by id, with their names.
    private var activities: [UInt64: AwaitedActivity] = [:]
    private var timers: [UInt64: Waiter] = [:]
    /// Children by the id of their `startChild` command.
    private(set) var children: [UInt64: ChildRecord] = [:]
    /// How many children have not reported their outcome.
    private(set) var openChildCount = 0
    /// The body's outcome once it finished: encoded output, or the failure's description.
    private(set) var outcome: Result<[UInt8], WorkflowFailure>?
    /// The next run's input once the body called ``WorkflowContext/continueAsNew(_:)``: the turn ends
    /// this run and starts the next one.
    private(set) var continuation: (input: W.Input, bytes: [UInt8])?
    private(set) var started = false

    // Local activities (see ``WorkflowContext/executeLocal(_:_:options:)``).
    /// Runs them; set by the cell before the body runs live (`nil` when replaying an export).
    var activityWorker: ActivityWorker?
    /// Local activities whose attempt runs inside this turn, in command order. An array: a body has a
    /// few at most, and a dictionary cost an allocation for each removal during ``settle()``'s walk.
    private(set) var locals: [LocalActivityEntry] = []
    /// Command ids of the `scheduleActivity` commands in `issued` that are local (not for the pool).
    /// Few, so an array (with room for several from the first one) rather than a set.
    private var localCommands: [UInt64] = []
    /// Outcomes of local activities that ended inside the turn, with their place among `issued`.
    var localOutcomes: [(position: Int, id: UInt64, outcome: Result<[UInt8], ActivityFailure>, attempt: ActivityAttempt)] = []
    /// Local activities whose attempt failed inside the turn and retry on the pool (next attempts).
    var localRetries: [ActivityTask] = []

    init(name: EntityName, run: UInt64, state: W.State, codec: any EntityCodec, logger: Logger) {
        self.name = name
        self.run = run
        self.state = state
        self.codec = codec
        self.logger = logger
    }

    /// The id of the next command: the run in the high bits keeps timer ids of different runs apart.
    func nextCommandID() -> UInt64 {
        defer { nextCommand += 1 }
        return run << 32 | nextCommand
    }

    /// The task the body itself runs in (not a child task it made), while it runs. Nothing cancels it
    /// (a run is cancelled through ``cancel()``), so its waits need no cancellation handler: see
    /// ``waitsAreCancellable``. Compared, never used to reach the task.
    private var bodyTask: UnsafeCurrentTask?

    /// Whether the current task may be cancelled by the body's own code: a child task (`async let`,
    /// a task group's) rather than the body's own. Its waits then register a cancellation handler
    /// (see ``cancelWait(_:)``); the body's own skip it, which costs a lock on every wait.
    var waitsAreCancellable: Bool {
        withUnsafeCurrentTask { $0 == nil || $0 != bodyTask }
    }

    /// Starts the body with `input`, and runs it until it waits.
    func start(_ input: W.Input) {
        let context = WorkflowContext<W>(run: self)
        // Room for a few commands at once (the turn empties the list and keeps its room): growing
        // from one by doubling was an allocation at each step.
        issued.reserveCapacity(4)
        started = true
        runner = TurnRunner.start(in: runners) { [self] runner in
            // Only the await here; the rest is out of line, which keeps the job's frame (allocated
            // on the runner's stack for every run) small.
            let ended: Result<W.Output, any Error>
            withUnsafeCurrentTask { bodyTask = $0 }
            do { ended = .success(try await W.run(input, context: context)) } catch { ended = .failure(error) }
            bodyEnded(ended)
            return runner.executor.finishInline()  // always inside a turn: a body's runner never leaves
        }
        settle()
    }

    /// The body returned or threw: records its outcome (unless it was abandoned or continued as new).
    @inline(never)
    private func bodyEnded(_ ended: Result<W.Output, any Error>) {
        switch ended {
        case .success(let output):
            guard continuation == nil else { return }  // the body swallowed the continue-as-new
            do {
                let bytes = try codec.encode(output)
                outcome = .success(bytes)
                issued.append(.complete(output: bytes))
            } catch {
                outcome = .failure(WorkflowFailure(message: "the run's output does not encode: \(error)"))
                issued.append(.fail(message: outcome!.failureMessage, cancelled: false))
            }
        case .failure(let error):
            if error is Abandoned { return }
            guard continuation == nil else { return }  // ended by continue-as-new, whatever it threw
            let cancelled = cancellationRequested && WorkflowFailure.isCancellation(error)
            outcome = .failure(WorkflowFailure(message: "\(error)", isCancellation: cancelled))
            issued.append(.fail(message: "\(error)", cancelled: cancelled))
        }
    }

    /// The body asked to continue as new with `input`: records the command; the turn does the rest.
    func continueAsNew(_ input: W.Input, bytes: [UInt8]) {
        guard continuation == nil, outcome == nil else { return }
        continuation = (input, bytes)
        issued.append(.continueAsNew(input: bytes))
    }

    /// On replay: the run's failure as its history recorded it. A history written before cancelled runs
    /// had their own event recorded a cancelled run as `failed`, and stays so.
    func replayedFailure(_ failure: WorkflowFailure) {
        if case .failure = outcome { outcome = .failure(failure) }
    }

    /// Ends the run with a failure instead of continuing it as new (the turn refused the switch).
    func refuseContinueAsNew(_ message: String) {
        continuation = nil
        outcome = .failure(WorkflowFailure(message: message))
        issued.append(.fail(message: message, cancelled: false))
    }

    /// Runs the body until every task waits, resuming conditions that became true on the way (and
    /// running the attempts of local activities, whose outcomes resume the body in turn).
    func settle() {
        repeat {
            var ran = true
            while ran {
                ran = drainBody()
                // By index, taking out one executor at a time: an attempt that ends removes itself
                // from `locals` during `drain()`. One skipped by that shift is drained on the next
                // pass (a drain that ran something asks for one).
                var index = 0
                while index < locals.count {
                    if locals[index].runner.drain().ran { ran = true }
                    index += 1
                }
            }
        } while resumeSatisfiedConditions()
    }

    /// Runs the body's queued work; returns whether any ran. Once the body ended, its runner parks and
    /// the run forgets it.
    private func drainBody() -> Bool {
        guard let runner else { return false }
        let drained = runner.drain()
        if drained.parked { self.runner = nil }
        return drained.ran
    }

    /// Starts local activity `id` (the command was just issued); returns `false` if it cannot run
    /// locally (not registered, or no worker): the command then goes to the pool.
    func startLocal(_ id: UInt64, name activity: String, input: [UInt8], options: ActivityOptions) -> Bool {
        guard let worker = activityWorker else { return false }
        let task = ActivityTask(entityType: name.type, entityID: name.id, entityKey: 0, run: run, activityID: id, name: activity,
                                input: input, options: options, attempt: 1, scheduledAt: now, notBefore: now)
        guard let runner = worker.startLocal(task, owner: self, id: id) else { return false }
        if locals.capacity == 0 {
            // The run's first local activity: room for two at once (they keep it from then on). Not
            // more: an entry holds its task (~300 bytes), and an allocation of 1 KiB or more takes
            // glibc's slow path, which first consolidates every freed small block.
            locals.reserveCapacity(2)
            localCommands.reserveCapacity(2)
            localOutcomes.reserveCapacity(2)
        }
        locals.append(LocalActivityEntry(id: id, task: task, runner: runner))
        localCommands.append(id)
        return true
    }

    /// Whether `id` is a local activity's command, which the turn then does not schedule on the pool;
    /// forgets it (each command is taken once).
    func takeLocalCommand(_ id: UInt64) -> Bool {
        guard let index = localCommands.firstIndex(of: id) else { return false }
        localCommands.remove(at: index)
        return true
    }

    /// A local activity's attempt ended inside the turn (on the shard's thread, within ``settle()``).
    func localAttemptEnded(_ id: UInt64, _ decision: ActivityWorker.Decision) {
        if let index = locals.firstIndex(where: { $0.id == id }) { locals.remove(at: index) }
        guard activities[id] != nil else { return }  // the body stopped waiting (cancelled)
        switch decision {
        case .succeeded(let output, let attempt):
            localOutcomes.append((issued.count, id, .success(output), attempt))
            completeActivityInTurn(id, .success(output))
        case .failed(let failure, let attempt):
            localOutcomes.append((issued.count, id, .failure(failure), attempt))
            completeActivityInTurn(id, .failure(failure))
        case .retry(let next):
            localRetries.append(next)
        case .dropped:
            break
        }
    }

    /// The turn ends: local attempts still running leave it (see ``TurnExecutor``). Returns
    /// the tasks to store for those that still run, with their attempts.
    func detachLocals() -> [(ActivityTask, TurnRunner)] {
        guard !locals.isEmpty, let worker = activityWorker else { return [] }
        var detached: [(ActivityTask, TurnRunner)] = []
        for local in locals where worker.detach(local.runner) {
            detached.append((local.task, local.runner))
        }
        locals.removeAll()
        return detached
    }

    private func resumeSatisfiedConditions() -> Bool {
        guard !waiters.isEmpty else { return false }
        var resumed = false
        for waiter in waiters where !waiter.done {
            guard let condition = waiter.condition, condition() else { continue }
            finish(waiter, with: .success(true))
            resumed = true
        }
        waiters.removeAll { $0.done }
        return resumed
    }

    private func finish(_ waiter: Waiter, with result: Result<Bool, any Error>) {
        waiter.done = true
        if let timer = waiter.timer, waiter.condition != nil, (try? result.get()) == true {
            // The condition won the race with its timeout: cancel the timer.
            cancelTimer(timer)
        }
        waiter.continuation.resume(with: result)
    }

    /// Cancels timer `id`: it no longer resumes a wait, and `cancelTimer` is recorded (the turn deletes
    /// its row) unless it already fired or was cancelled.
    private func cancelTimer(_ id: UInt64) {
        timers[id] = nil
        if let due = timerDue.removeValue(forKey: id) { issued.append(.cancelTimer(id: id, due: due)) }
    }

    /// Registers the body's wait for an activity's outcome; `cancellation` says what cancelling the
    /// wait does (see ``cancelActivityWait(_:)``).
    func awaitActivity(_ id: UInt64, name: String, cancellation: ActivityCancellationType,
                       _ continuation: UnsafeContinuation<[UInt8], any Error>) {
        if abandoned { return refuse(continuation) }
        activities[id] = AwaitedActivity(name: name, continuation: continuation, cancellation: cancellation)
    }

    // MARK: After abandonment

    /// Set by ``abandon()``: the run was dropped from memory (its entity goes on from its history), and
    /// its body only unwinds. A wait it starts from then on fails at once with ``Abandoned``, and no
    /// local activity or side effect runs: a `catch` that compensates must not act for a run that is
    /// not over.
    private(set) var abandoned = false
    /// Waits refused since ``abandon()``.
    private var refusals = 0
    /// How many waits an abandoned body may start (each failing at once) before the next one is left
    /// suspended instead: a body that swallows the errors and waits again would otherwise spin its
    /// shard's thread for ever.
    static var maximumRefusals: Int { 1_000 }

    /// Fails a wait of an abandoned body with ``Abandoned``; past ``maximumRefusals`` leaves it
    /// suspended (the body's memory is then lost, which a log line reports once).
    private func refuse<T>(_ continuation: UnsafeContinuation<T, any Error>) {
        refusals += 1
        if refusals <= Self.maximumRefusals { return continuation.resume(throwing: Abandoned()) }
        if refusals == Self.maximumRefusals + 1 {
            logger.error("an abandoned run body keeps waiting after its waits failed; it is left suspended",
                         metadata: ["entity.type": "\(name.type)", "entity.id": "\(name.id)", "waits": "\(Self.maximumRefusals)"])
        }
    }

    /// Whether the body awaits activity `id`.
    func isAwaitingActivity(_ id: UInt64) -> Bool { activities[id] != nil }

    /// The activities the body awaits, in command order.
    var awaitedActivities: [UInt64] { activities.keys.sorted() }

    /// Activities whose waits ``cancel()`` ended: the turn deletes their stored tasks.
    var activitiesGivenUp: [UInt64] = []
    /// Activities whose cancellation the body requested while it goes on waiting for them
    /// (``ActivityCancellationType/waitCancellationCompleted``): the turn stores each request with
    /// the `activityCancelRequested` event and, once that is durable, has the activity stopped.
    var activityCancelRequests: [UInt64] = []
    /// Activities whose stored cancellation request goes with the turn: their outcome arrived.
    var activityCancelsDone: [UInt64] = []

    /// The awaited activities whose cancellation was requested, in command order.
    var cancelRequestedActivities: [UInt64] { activities.filter { $0.value.cancelRequested }.keys.sorted() }

    /// After a replay: the requests it made again were stored and carried out when first made.
    func forgetReplayedCancelRequests() {
        activityCancelRequests.removeAll()
        activityCancelsDone.removeAll()
    }

    /// An activity ended: resumes the body with its output or its ``ActivityFailure``.
    func completeActivity(_ id: UInt64, _ outcome: Result<[UInt8], ActivityFailure>) {
        completeActivityInTurn(id, outcome)
        settle()
    }

    private func completeActivityInTurn(_ id: UInt64, _ outcome: Result<[UInt8], ActivityFailure>) {
        guard let awaited = activities.removeValue(forKey: id) else { return }
        if awaited.cancelRequested {
            // Its cancellation request is stored (or, made in this turn, not stored after all).
            if let index = activityCancelRequests.firstIndex(of: id) {
                activityCancelRequests.remove(at: index)
            } else {
                activityCancelsDone.append(id)
            }
        }
        awaited.continuation.resume(with: outcome.mapError { $0 as any Error })
    }

    /// The task awaiting activity `id` was cancelled (by the body itself: a task group's
    /// `cancelAll()`, an `async let` left unawaited). Records `cancelActivity`, then by the call's
    /// ``ActivityCancellationType``:
    /// - `tryCancel`: gives the activity up (the turn deletes its task, and a running attempt is
    ///   cancelled once that is durable) and resumes the wait with an ``ActivityFailure`` whose
    ///   reason is `cancelled`;
    /// - `abandon`: resumes the wait the same way and leaves the activity alone;
    /// - `waitCancellationCompleted`: requests the activity's cancellation (see
    ///   ``activityCancelRequests``) and goes on waiting for its outcome.
    ///
    /// Nothing if the activity already ended, the body no longer awaits it, or its cancellation was
    /// requested already.
    ///
    /// Called from the cancellation handler, which runs where the cancelling code runs: the body's
    /// own job, inside the turn (see ``WorkflowContext/execute(_:_:options:)``).
    func cancelActivityWait(_ id: UInt64) {
        guard let awaited = activities[id], !awaited.cancelRequested else { return }
        if awaited.cancellation == .waitCancellationCompleted { return requestActivityCancel(id) }
        issued.append(.cancelActivity(id: id))
        activities[id] = nil
        let abandoning = awaited.cancellation == .abandon
        if !abandoning { activitiesGivenUp.append(id) }
        awaited.continuation.resume(throwing: abandoning ? ActivityFailure.waitAbandoned(awaited.name) : .waitCancelled(awaited.name))
    }

    /// Records `cancelActivity` for awaited activity `id` and requests its cancellation, its wait
    /// going on until its outcome (``ActivityCancellationType/waitCancellationCompleted``).
    private func requestActivityCancel(_ id: UInt64) {
        activities[id]!.cancelRequested = true
        issued.append(.cancelActivity(id: id))
        activityCancelRequests.append(id)
    }

    /// Records a child started by the body (live and on replay).
    func addChild(_ id: UInt64, name: EntityName, policy: ParentClosePolicy) {
        children[id] = ChildRecord(name: name, policy: policy)
        openChildCount += 1
    }

    /// Whether child `id` was started and has not reported its outcome.
    func isChildOpen(_ id: UInt64) -> Bool { children[id].map { $0.outcome == nil } ?? false }

    /// The children still running, with their parent-close policies, in start order.
    var openChildren: [(id: UInt64, child: ChildRecord)] {
        children.filter { $0.value.outcome == nil }.map { (id: $0.key, child: $0.value) }.sorted { $0.id < $1.id }
    }

    /// Waits for child `id`'s outcome (at once if it arrived). `handle` lets the wait be cancelled,
    /// and `cancellation` says what cancelling it does (see ``cancelChildWait(_:)``).
    func awaitChild(_ id: UInt64, handle: WorkflowWaitHandle? = nil, cancellation: ChildCancellationType,
                    _ continuation: UnsafeContinuation<[UInt8], any Error>) {
        if abandoned { return refuse(continuation) }
        guard var record = children[id] else {
            continuation.resume(throwing: EntityError(.rejected, entity: name, "no child was started with command id \(id)"))
            return
        }
        if let outcome = record.outcome {
            continuation.resume(with: outcome.mapError { $0 as any Error })
            return
        }
        let waiter = WorkflowChildWaiter(continuation, cancellation: cancellation)
        handle?.child = (id, waiter)
        record.waiters.append(waiter)
        children[id] = record
    }

    /// The task waiting for a child's outcome was cancelled (by the body itself). By the wait's
    /// ``ChildCancellationType``:
    /// - `tryCancel` (``WorkflowContext/executeChild(_:id:input:parentClosePolicy:cancellationType:)``,
    ///   ``WorkflowContext/fanOut(_:_:maxConcurrent:parentClosePolicy:cancellationType:)``): asks the
    ///   child to cancel (see ``requestChildCancel(_:)``) and throws `CancellationError`;
    /// - `abandon` (and every ``ChildEntity/result()``): throws `CancellationError`, the child goes on
    ///   and nothing is recorded;
    /// - `waitCancellationCompleted`: asks the child to cancel and goes on waiting for its outcome.
    func cancelChildWait(_ handle: WorkflowWaitHandle) {
        guard let (id, waiter) = handle.child, var record = children[id],
              let index = record.waiters.firstIndex(where: { $0 === waiter }) else { return }
        if waiter.cancellation == .waitCancellationCompleted { return requestChildCancel(id) }
        record.waiters.remove(at: index)
        children[id] = record
        if waiter.cancellation == .tryCancel { requestChildCancel(id) }
        waiter.continuation.resume(throwing: CancellationError())
    }

    /// Records `cancelChild` for child `id` unless it has ended (its outcome arrived) or a wait asked
    /// already: the request goes out once the turn is durable, as ``ChildEntity/cancel()``'s does.
    func requestChildCancel(_ id: UInt64) {
        guard let record = children[id], record.outcome == nil, !record.cancelRequested else { return }
        children[id]!.cancelRequested = true
        issued.append(.cancelChild(id: id))
    }

    /// A child reported its outcome: resumes the body's waits for it.
    func completeChild(_ id: UInt64, _ outcome: Result<[UInt8], ChildFailure>) {
        guard var record = children[id], record.outcome == nil else { return }
        let waiters = record.waiters
        record.outcome = outcome
        record.waiters = []
        children[id] = record
        openChildCount -= 1
        for waiter in waiters { waiter.continuation.resume(with: outcome.mapError { $0 as any Error }) }
        settle()
    }

    /// Resumes every wait for a child with `error`. `keepingCompletionWaits` (the run's cancellation):
    /// a ``ChildCancellationType/waitCancellationCompleted`` wait stays, and its child is asked to
    /// cancel instead.
    private func failChildWaits(_ error: any Error, keepingCompletionWaits: Bool = false) {
        let stays = { (waiter: WorkflowChildWaiter) in keepingCompletionWaits && waiter.cancellation == .waitCancellationCompleted }
        for (id, record) in children.sorted(by: { $0.key < $1.key }) where !record.waiters.isEmpty {
            let failed = record.waiters.filter { !stays($0) }
            if failed.count < record.waiters.count { requestChildCancel(id) }
            children[id]!.waiters.removeAll { !stays($0) }
            for waiter in failed { waiter.continuation.resume(throwing: error) }
        }
    }

    /// A durable timer fired; returns whether the run was waiting for it.
    func fire(timer id: UInt64) -> Bool {
        guard let waiter = timers.removeValue(forKey: id) else { return false }
        timerDue[id] = nil
        if !waiter.done {
            // A plain sleep resumes with true; a condition's timeout with false.
            finish(waiter, with: .success(waiter.condition == nil))
        }
        settle()
        return true
    }

    /// Registers a wait; resumes at once if its predicate already holds. `handle` lets the wait be
    /// cancelled (see ``cancelWait(_:)``).
    func wait(predicate: ((W.State) -> Bool)?, timer: UInt64?, handle: WorkflowWaitHandle? = nil,
              _ continuation: UnsafeContinuation<Bool, any Error>) {
        if abandoned { return refuse(continuation) }
        let condition: (() -> Bool)? = predicate.map { predicate in { [unowned self] in predicate(state) } }
        let waiter = Waiter(continuation: continuation, condition: condition, timer: timer)
        handle?.waiter = waiter
        if let timer { timers[timer] = waiter }
        if predicate != nil { waiters.append(waiter) }
    }

    /// The task suspended in a sleep or a condition was cancelled (by the body itself, see
    /// ``cancelActivityWait(_:)``): the wait throws `CancellationError`, and its timer, if it has one,
    /// is cancelled (`cancelTimer`: the turn deletes the timer's row). Nothing if the wait is over.
    func cancelWait(_ handle: WorkflowWaitHandle) {
        guard let waiter = handle.waiter, !waiter.done else { return }
        waiter.done = true
        if let timer = waiter.timer { cancelTimer(timer) }
        if waiter.condition != nil { waiters.removeAll { $0 === waiter } }
        waiter.continuation.resume(throwing: CancellationError())
    }

    /// Cooperative cancellation: every wait the body is suspended on throws once — an activity's an
    /// ``ActivityFailure`` whose reason is `cancelled` (by its call's cancellation type: its task is
    /// deleted and no further attempt starts, or it is abandoned, or — `waitCancellationCompleted` —
    /// it is asked to stop and its wait ends with its outcome instead), the others `CancellationError`.
    /// The body may catch it and clean up (waits after that work normally, a saga's compensations
    /// included), or let it end the run.
    ///
    /// Everything goes in command-id order (the order the body issued its waits), never in a
    /// dictionary's: the `cancelTimer` commands, and the order in which the resumed waits run (their
    /// catch blocks may issue commands), must be the same on every replay.
    /// Whether ``cancel()`` was called (see ``WorkflowContext/isCancellationRequested``).
    var cancellationRequested: Bool { cancellations > 0 }
    /// How many times ``cancel()`` was called (a run may survive a request and get another): a
    /// fan-out compares it before and after its waits.
    private(set) var cancellations = 0

    func cancel() {
        cancellations += 1
        for waiter in waiters where !waiter.done { finish(waiter, with: .failure(CancellationError())) }
        // A condition's timeout timer is cancelled too, although its waiter finished just above.
        for (id, waiter) in timers.sorted(by: { $0.key < $1.key }) {
            if !waiter.done { finish(waiter, with: .failure(CancellationError())) }
            cancelTimer(id)
        }
        waiters.removeAll()
        timers.removeAll()
        for (id, awaited) in activities.sorted(by: { $0.key < $1.key }) {
            let cause: String
            switch awaited.cancellation {
            case .waitCancellationCompleted:
                // Asked to stop; its wait ends with its outcome (see ``cancelActivityWait(_:)``).
                if !awaited.cancelRequested { requestActivityCancel(id) }
                continue
            case .tryCancel:
                activitiesGivenUp.append(id)
                cause = "the run was cancelled while it waited for the activity; no further attempt starts"
            case .abandon:
                cause = "the run was cancelled while it waited for the activity; the activity goes on (abandoned)"
            }
            activities[id] = nil
            awaited.continuation.resume(throwing: ActivityFailure(
                activity: awaited.name, reason: .cancelled, attempts: 0, causeType: "CancellationError", cause: cause))
        }
        failChildWaits(CancellationError(), keepingCompletionWaits: true)
        settle()
    }

    /// A body that finished and left nothing waiting (no wait, timer, activity, local attempt or
    /// child wait) has nothing to abandon: its memory goes without a trip through the shard.
    override var needsAbandoning: Bool {
        outcome == nil || !waiters.isEmpty || !timers.isEmpty || !activities.isEmpty || !locals.isEmpty
            || children.values.contains { !$0.waiters.isEmpty }
    }

    /// Ends the body without recording anything (the run is dropped from memory): every wait
    /// resumes with an error the body does not see as a failure, and so does every wait it starts
    /// while it unwinds (see ``abandoned``).
    override func abandon() {
        abandoned = true
        for waiter in waiters where !waiter.done { waiter.done = true; waiter.continuation.resume(throwing: Abandoned()) }
        for waiter in timers.values where !waiter.done { waiter.done = true; waiter.continuation.resume(throwing: Abandoned()) }
        waiters.removeAll()
        timers.removeAll()
        for awaited in activities.values { awaited.continuation.resume(throwing: Abandoned()) }
        activities.removeAll()
        failChildWaits(Abandoned())
        _ = drainBody()
        // Local attempts still inside the turn finish on their own; nothing records their outcomes.
        if let worker = activityWorker {
            for local in locals where worker.detach(local.runner) { local.runner.executor.scheduled(key: 0, ok: false) }
        }
        locals.removeAll()
    }
}

// The run's helper types are not nested in it: a type nested in a generic class is generic too, and
// every collection operation on it then looks up its metadata at run time.

/// A suspended wait of a run body: a timer, a condition, or both (a condition with a timeout).
final class WorkflowWaiter {
    let continuation: UnsafeContinuation<Bool, any Error>
    /// The condition on the run's current state (`nil` for a plain sleep).
    let condition: (() -> Bool)?
    let timer: UInt64?
    var done = false

    init(continuation: UnsafeContinuation<Bool, any Error>, condition: (() -> Bool)?, timer: UInt64?) {
        self.continuation = continuation
        self.condition = condition
        self.timer = timer
    }
}

extension ActivityFailure {
    /// What the wait for `activity` throws when the task awaiting it is cancelled (and what an
    /// exported history's `activityCancelRequested` stands for).
    static func waitCancelled(_ activity: String) -> ActivityFailure {
        ActivityFailure(activity: activity, reason: .cancelled, attempts: 0, causeType: "CancellationError",
                        cause: "the task awaiting the activity was cancelled; no further attempt starts")
    }

    /// What the wait for `activity` throws when the task awaiting it is cancelled and the call's
    /// cancellation type is ``ActivityCancellationType/abandon``.
    static func waitAbandoned(_ activity: String) -> ActivityFailure {
        ActivityFailure(activity: activity, reason: .cancelled, attempts: 0, causeType: "CancellationError",
                        cause: "the task awaiting the activity was cancelled; the activity goes on (abandoned)")
    }

    /// What ``WorkflowContext/execute(_:_:options:)`` throws when its task is cancelled already:
    /// nothing was scheduled.
    static func cancelledBeforeScheduling(_ activity: String) -> ActivityFailure {
        ActivityFailure(activity: activity, reason: .cancelled, attempts: 0, causeType: "CancellationError",
                        cause: "the task was cancelled before the activity was scheduled; nothing was scheduled")
    }
}

/// A child the body started: its outcome once reported, and the body's waits for it.
struct WorkflowChildRecord {
    let name: EntityName
    let policy: ParentClosePolicy
    var outcome: Result<[UInt8], ChildFailure>?
    var waiters: [WorkflowChildWaiter] = []
    /// A wait asked the child to cancel (``WorkflowRun/requestChildCancel(_:)``), once.
    var cancelRequested = false
}

/// A wait for a child's outcome; a class, so that a cancelled wait finds its own entry.
final class WorkflowChildWaiter {
    let continuation: UnsafeContinuation<[UInt8], any Error>
    /// What cancelling the wait does (the run's cancellation included).
    let cancellation: ChildCancellationType
    init(_ continuation: UnsafeContinuation<[UInt8], any Error>, cancellation: ChildCancellationType) {
        self.continuation = continuation
        self.cancellation = cancellation
    }
}

/// What a cancellation handler needs to find the wait it ends: the waiter once registered. Set and
/// read on the entity's shard thread only (the body's job registers the wait; a cancellation that
/// the body's own code makes runs its handler there too), hence `@unchecked Sendable`.
final class WorkflowWaitHandle: @unchecked Sendable {
    var waiter: WorkflowWaiter?
    var child: (id: UInt64, waiter: WorkflowChildWaiter)?
    init() {}
}

/// An activity the body awaits. Not nested in the generic run (see above).
struct AwaitedActivity {
    let name: String
    let continuation: UnsafeContinuation<[UInt8], any Error>
    let cancellation: ActivityCancellationType
    /// Its cancellation was requested and the wait goes on until its outcome
    /// (``ActivityCancellationType/waitCancellationCompleted``).
    var cancelRequested = false
}

/// A local activity whose attempt runs inside the turn (see ``WorkflowRun/locals``). Not nested in the
/// generic run (see above).
struct LocalActivityEntry {
    let id: UInt64
    let task: ActivityTask
    /// Where its attempt runs.
    let runner: TurnRunner
}

/// A run body's failure, as recorded.
public struct WorkflowFailure: Error, Sendable, Hashable, CustomStringConvertible {
    /// What the body threw, as text.
    public let message: String
    /// The run was cancelled: its cancellation was requested (``EntityRef/cancel()``, a parent's
    /// request or its parent-close policy) and the body ended by letting a cancellation out — a
    /// `CancellationError`, or an ``ActivityFailure`` or ``ChildFailure`` whose reason is `cancelled`.
    /// Recorded as a `cancelled` event instead of `failed`. Any other error, or a cancellation thrown
    /// while no cancellation was requested, is a failure.
    public let isCancellation: Bool

    init(message: String, isCancellation: Bool = false) {
        self.message = message
        self.isCancellation = isCancellation
    }

    public var description: String { isCancellation ? "cancelled: \(message)" : message }

    /// Whether `error`, thrown out of a run body whose cancellation was requested, ends the run as
    /// cancelled rather than failed.
    static func isCancellation(_ error: any Error) -> Bool {
        switch error {
        case is CancellationError: true
        case let failure as ActivityFailure: failure.reason == .cancelled
        case let failure as ChildFailure: failure.reason == .cancelled
        default: false
        }
    }
}

extension Result where Failure == WorkflowFailure {
    var failureMessage: String {
        if case .failure(let failure) = self { return failure.message }
        return ""
    }
}

