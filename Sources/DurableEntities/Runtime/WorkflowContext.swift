/// What a run body uses to wait, to remember and to read the state — all deterministic: during a
/// replay every call returns what it returned the first time.
///
/// ## Usage
/// ```swift
/// static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> Output {
///     guard try await context.condition(timeout: .seconds(86_400), { $0.approved }) else {
///         return .expired                                   // 24 hours passed without approval
///     }
///     let reference = try context.sideEffect { UUID().uuidString }   // recorded once
///     try await context.sleep(for: .seconds(60))                     // a durable timer
///     return .done(reference)
/// }
/// ```
///
/// ## Cancelling a wait
/// A body may run waits side by side (`async let`, a task group) and cancel the tasks it no longer
/// needs — a race between an activity and a deadline, say. Cancelling a task that waits is a
/// command like any other, made by the body's own code at the same point on every replay:
/// - an activity's wait (``execute(_:_:options:)``, ``executeLocal(_:_:options:)``) records
///   `activityCancelRequested`, then does what the call's ``ActivityOptions/cancellationType`` says.
///   By default (``ActivityCancellationType/tryCancel``) it throws an ``ActivityFailure`` with
///   reason `cancelled` at once; the activity's stored task goes in the same commit, an attempt
///   still running is cancelled once that is durable (``ActivityContext/isCancelled``), and an
///   outcome it returns anyway is not recorded. With ``ActivityCancellationType/waitCancellationCompleted``
///   the wait lasts until the activity has really ended — its output if an attempt returns it
///   anyway, else a failure with reason `cancelled` and the attempts made — so code that
///   compensates afterwards knows whether the step happened. With ``ActivityCancellationType/abandon``
///   it throws at once and the activity goes on unobserved;
/// - a sleep or a condition throws `CancellationError`, and its timer is cancelled
///   (`timerCancelled`: the timer's row goes, it never fires);
/// - a wait for a child's ``ChildEntity/result()`` throws `CancellationError`; the child goes on
///   (``ChildEntity/cancel()`` asks it to stop, and ``ChildEntity/result(cancellationType:)`` waits
///   as the type says, like the two below);
/// - ``executeChild(_:id:input:parentClosePolicy:cancellationType:)`` and
///   ``fanOut(_:_:maxConcurrent:parentClosePolicy:cancellationType:)`` own the children they start,
///   and a cancelled fan-out starts no further child. By default
///   (``ChildCancellationType/tryCancel``) their cancelled waits throw `CancellationError` and ask
///   those children to cancel (`childCancelRequested`, delivered once the turn is durable), without
///   waiting for them to end. With ``ChildCancellationType/waitCancellationCompleted`` they ask
///   and wait until the children have ended (the run's cancellation does the same); with
///   ``ChildCancellationType/abandon`` they throw at once and the children go on.
/// A wait started by a task already cancelled fails at once, with nothing recorded (an
/// `executeChild` then starts no child; a child a fan-out started but had not awaited yet is asked
/// to cancel). A task group
/// that returns while its other tasks still wait cancels them this way too, and an `async let` left
/// unawaited is cancelled when its scope ends.
///
/// ```swift
/// // Charge, unless the gateway takes more than a minute: then give up on it and refund.
/// let charged = try await withThrowingTaskGroup(of: Bool.self) { group in
///     group.addTask { _ = try await context.execute(Charge.self, order); return true }
///     group.addTask { try await context.sleep(for: .seconds(60)); return false }
///     defer { group.cancelAll() }   // the loser: its timer or its activity is cancelled
///     return try await group.next()!
/// }
/// ```
public final class WorkflowContext<W: EntityWorkflow>: @unchecked Sendable {
    let run: WorkflowRun<W>

    init(run: WorkflowRun<W>) { self.run = run }

    /// The entity's id.
    public var id: String { run.name.id }

    /// The time of the event the body is handling, in nanoseconds since the Unix epoch.
    public var nowNanoseconds: UInt64 { run.now }

    /// The entity's current state (signals and updates change it between the body's steps).
    public var state: W.State { run.state }

    /// Whether the run's cancellation was requested (``EntityRef/cancel()``, a parent's request or
    /// its parent-close policy). The request ends the waits the body was suspended in at that moment,
    /// once (see "Cancelling a wait"); waits after that work normally. So a body that must not go on
    /// checks this — notably after an activity called with
    /// ``ActivityCancellationType/waitCancellationCompleted``, whose wait may return the output of an
    /// attempt that finished anyway, or a child awaited with
    /// ``ChildCancellationType/waitCancellationCompleted``. Deterministic: replay sets it at the same
    /// point.
    ///
    /// How the run ends is the body's choice: returning completes it; letting a cancellation out
    /// (`CancellationError`, or an ``ActivityFailure`` or ``ChildFailure`` with reason `cancelled`)
    /// once this is `true` ends it **cancelled** (``WorkflowFailure/isCancellation``: a `cancelled`
    /// event, ``EntityError/Code/cancelled`` for ``EntityRef/result()``, a parent's
    /// ``ChildFailure/Reason/cancelled``); any other error fails it.
    public var isCancellationRequested: Bool { run.cancellationRequested }

    /// Changes the state from the body. Deterministic, like everything the body does: replay repeats it.
    public func updateState(_ change: (inout W.State) -> Void) {
        change(&run.state)
    }

    /// Ends this run and starts the next run of the body with `input`, from the current state — the
    /// way a body that loops forever (an account's monthly cycle, a subscription) keeps its history
    /// bounded. In the same commit: the run's last event (`continuedAsNew`), a snapshot of the state,
    /// and the new run's `started` event; signals and updates that arrive after it belong to the new
    /// run, and history before it is pruned by ``EntityRuntime/Configuration/keepRuns``.
    ///
    /// The run's timers are dropped, activities it still awaits are abandoned (their outcomes are
    /// ignored), children still open get their parent-close policy, and parents that started this
    /// entity — and callers of ``EntityRef/result()`` — get the outcome of the last run in the chain.
    ///
    /// ```swift
    /// static func run(_ month: Int, context: WorkflowContext<Self>) async throws -> Statement {
    ///     try await context.sleep(for: .seconds(30 * 86_400))
    ///     context.updateState { $0.balance += $0.balance * $0.monthlyRate / 10_000 }
    ///     guard context.state.isOpen else { return Statement(months: month) }
    ///     try context.continueAsNew(month + 1)     // a fresh history every month
    /// }
    /// ```
    /// - Throws: always — an error that ends the body; do not catch it (if the body does, whatever it
    ///   does afterwards is dropped with the run).
    public func continueAsNew(_ input: W.Input) throws -> Never {
        let bytes: [UInt8]
        do { bytes = try run.codec.encode(input) } catch {
            throw EntityError(.unencodablePayload, entity: run.name, "the next run's input does not encode", underlying: error)
        }
        run.continueAsNew(input, bytes: bytes)
        throw WorkflowRun<W>.ContinuedAsNew()
    }

    /// Sleeps on a durable timer: survives restarts; a timer due while the process was down fires
    /// right after it opens again.
    ///
    /// Cancelling the task that sleeps cancels the timer (see "Cancelling a wait" in the type's
    /// documentation).
    /// - Throws: `CancellationError` if the run is cancelled, or the task that sleeps (at once, with no
    ///   timer started, if it already is).
    public func sleep(for duration: Duration) async throws {
        try Task.checkCancellation()
        let id = run.nextCommandID()
        let due = run.now.saturatingAdd(duration.nanoseconds)
        run.timerDue[id] = due
        run.issued.append(.startTimer(id: id, due: due))
        _ = try await suspend(predicate: nil, timer: id)
    }

    /// Suspends the body on a wait (a timer, a predicate, or both) until it ends, or until the task
    /// is cancelled (see ``WorkflowRun/cancelWait(_:)``).
    private func suspend(predicate: ((W.State) -> Bool)?, timer: UInt64?) async throws -> Bool {
        let run = run
        guard run.waitsAreCancellable else {
            return try await withUnsafeThrowingContinuation { continuation in
                run.wait(predicate: predicate, timer: timer, continuation)
            }
        }
        let handle = WorkflowWaitHandle()
        return try await withTaskCancellationHandler {
            try await withUnsafeThrowingContinuation { continuation in
                run.wait(predicate: predicate, timer: timer, handle: handle, continuation)
            }
        } onCancel: {
            run.cancelWait(handle)
        }
    }

    /// Sleeps on a durable timer until `deadline` (nanoseconds since the Unix epoch on the runtime's
    /// clock); returns at once if it has passed.
    public func sleep(untilNanoseconds deadline: UInt64) async throws {
        guard deadline > run.now else { return }
        try await sleep(for: .nanoseconds(Int64(min(deadline - run.now, UInt64(Int64.max)))))
    }

    /// Waits until `predicate` holds for the state (checked after every event the entity handles).
    /// - Throws: `CancellationError` if the run is cancelled, or the task that waits.
    public func condition(_ predicate: @escaping (W.State) -> Bool) async throws {
        if predicate(run.state) { return }
        try Task.checkCancellation()
        _ = try await suspend(predicate: predicate, timer: nil)
    }

    /// Waits until `predicate` holds, or `timeout` passes on a durable timer.
    /// - Returns: `true` if the predicate held, `false` on timeout.
    /// - Throws: `CancellationError` if the run is cancelled, or the task that waits (its timer is
    ///   cancelled; none is started if the task already is).
    public func condition(timeout: Duration, _ predicate: @escaping (W.State) -> Bool) async throws -> Bool {
        if predicate(run.state) { return true }
        try Task.checkCancellation()
        // A timer even for a timeout of zero: runs recorded that way replay the same.
        return try await conditionOrTimer(due: run.now.saturatingAdd(timeout.nanoseconds), predicate)
    }

    /// Waits until `predicate` holds, or until `deadline` (nanoseconds since the Unix epoch on the
    /// runtime's clock) on a durable timer: the way to keep one deadline across several waits (an
    /// approval that escalates after 4 hours and ends after 24 counts both from when it began).
    /// - Returns: `true` if the predicate held, `false` once the deadline passed (at once, without a
    ///   timer, if it already has and the predicate does not hold).
    /// - Throws: `CancellationError` if the run is cancelled, or the task that waits.
    public func condition(untilNanoseconds deadline: UInt64, _ predicate: @escaping (W.State) -> Bool) async throws -> Bool {
        if predicate(run.state) { return true }
        guard deadline > run.now else { return false }
        try Task.checkCancellation()
        return try await conditionOrTimer(due: deadline, predicate)
    }

    /// Waits for `predicate` or a durable timer due at `due`, whichever comes first.
    private func conditionOrTimer(due: UInt64, _ predicate: @escaping (W.State) -> Bool) async throws -> Bool {
        let id = run.nextCommandID()
        run.timerDue[id] = due
        run.issued.append(.startTimer(id: id, due: due))
        return try await suspend(predicate: predicate, timer: id)
    }

    /// Runs an activity — on the runtime's activity pool, retried by `options` — and returns its
    /// output once it is recorded. A restart neither loses nor repeats a recorded outcome.
    /// - Throws: ``ActivityFailure`` when the activity ends for good (retries exhausted, a
    ///   non-retryable error, a timeout) or when the run, or the task that awaits it, is cancelled
    ///   meanwhile (reason `cancelled`, when ``ActivityOptions/cancellationType`` says; see
    ///   "Cancelling a wait" above);
    ///   ``EntityError/Code/invalidArgument`` for invalid `options` (nothing is scheduled).
    public func execute<A: Activity>(_ activity: A.Type, _ input: A.Input, options: ActivityOptions = .default) async throws -> A.Output {
        try check(options)
        try checkCancellation(A.self)
        let id = run.nextCommandID()
        let bytes = try run.codec.encode(input)
        run.issued.append(.scheduleActivity(id: id, name: A.name, input: bytes, options: options))
        // The wait is written out here (and in `executeLocal`), not in a shared async helper: each
        // async call is one more frame and executor check a step, on every activity.
        let run = run
        let output = if run.waitsAreCancellable {
            try await withTaskCancellationHandler {
                try await withUnsafeThrowingContinuation { continuation in run.awaitActivity(id, name: A.name, cancellation: options.cancellationType, continuation) }
            } onCancel: {
                run.cancelActivityWait(id)  // see WorkflowRun.cancelActivityWait
            }
        } else {
            try await withUnsafeThrowingContinuation { continuation in run.awaitActivity(id, name: A.name, cancellation: options.cancellationType, continuation) }
        }
        return try output.withUnsafeBytes { try run.codec.decode(A.Output.self, from: $0) }
    }

    /// A cancelled task schedules no activity: it fails at once, with nothing recorded.
    private func checkCancellation<A: Activity>(_ activity: A.Type) throws(ActivityFailure) {
        if Task.isCancelled { throw .cancelledBeforeScheduling(A.name) }
    }

    /// Runs a *local activity*: a short call in this process (an in-memory ledger, a local file or
    /// cache, a quick call to a nearby service) that skips the activity pool.
    ///
    /// Its first attempt starts at once, inside the turn, on the entity's shard: when it ends without
    /// waiting for anything outside (no I/O suspension), its outcome is recorded in the same commit as
    /// the command — a run body of three local activities is one commit instead of four. An attempt
    /// that does wait (I/O, a timer, another actor) leaves the turn when the turn ends and goes on
    /// outside the shard; the turn then stores it as a task, like ``execute(_:_:options:)``, and its
    /// outcome is recorded when it arrives. A failed attempt that the policy retries becomes a stored
    /// task with its retry timer, and the next attempts run on the pool, exactly as for `execute`.
    ///
    /// The history is the same as `execute`'s (a `scheduleActivity` command, then the outcome), so code
    /// may switch between the two for a step without breaking replay.
    ///
    /// What differs, and what to keep in mind:
    /// - the attempt may run **before** anything of the turn is durable: if the process dies before
    ///   the commit, the entity's history has no trace of it, and the replay after restart schedules
    ///   it again (same command id, same ``ActivityContext/idempotencyKey`` if the body takes the same
    ///   path). Activities must be idempotent anyway; local ones rely on it a little more.
    /// - an activity whose type records each attempt's start (``Activity/recordsAttemptStart``) runs
    ///   on the pool instead, exactly as with `execute`: its start must be durable before it runs.
    /// - while it runs inside the turn it holds the shard's thread: keep it short (microseconds to a
    ///   few milliseconds). Anything slow belongs in `execute`.
    /// - its timeouts (start-to-close, schedule-to-close, heartbeat) cancel it as they cancel a pool
    ///   attempt, and a timed-out attempt is retried on the pool by the policy, reading its last
    ///   heartbeat. Cancellation is cooperative: an attempt computing inside the turn without
    ///   suspending sees it only at its next check or suspension.
    /// - its heartbeats stay in memory while it runs inside the turn; once it has left the turn and
    ///   its task is stored, they are stored as a pool attempt's are (see
    ///   ``ActivityContext/heartbeat(_:)``), so a crash after that counts the attempt and the next
    ///   one reads them.
    /// - Throws: ``ActivityFailure`` when the activity ends for good, or with reason `cancelled` when
    ///   the run, or the task that awaits it, is cancelled meanwhile; ``EntityError/Code/invalidArgument``
    ///   for invalid `options`.
    public func executeLocal<A: Activity>(_ activity: A.Type, _ input: A.Input, options: ActivityOptions = .default) async throws -> A.Output {
        try check(options)
        try checkCancellation(A.self)
        let id = run.nextCommandID()
        let bytes = try run.codec.encode(input)
        run.issued.append(.scheduleActivity(id: id, name: A.name, input: bytes, options: options))
        if !run.replaying, !run.abandoned { _ = run.startLocal(id, name: A.name, input: bytes, options: options) }
        let run = run
        let output = if run.waitsAreCancellable {
            try await withTaskCancellationHandler {
                try await withUnsafeThrowingContinuation { continuation in run.awaitActivity(id, name: A.name, cancellation: options.cancellationType, continuation) }
            } onCancel: {
                run.cancelActivityWait(id)
            }
        } else {
            try await withUnsafeThrowingContinuation { continuation in run.awaitActivity(id, name: A.name, cancellation: options.cancellationType, continuation) }
        }
        return try output.withUnsafeBytes { try run.codec.decode(A.Output.self, from: $0) }
    }

    /// Refuses invalid activity options before anything is issued (the same on every replay).
    private func check(_ options: ActivityOptions) throws(EntityError) {
        if let problem = options.invalidity { throw EntityError(.invalidArgument, entity: run.name, problem) }
    }

    /// Runs `body` once and records its result; a replay returns the recorded result without running it.
    /// Use it for small non-deterministic values (a generated id, a reading of the wall clock).
    public func sideEffect<Value: Codable & Sendable>(_ body: () throws -> Value) throws -> Value {
        let id = run.nextCommandID()
        if let recorded = run.recordedSideEffects[id] {
            run.issued.append(.sideEffect(id: id, value: recorded))
            return try recorded.withUnsafeBytes { try run.codec.decode(Value.self, from: $0) }
        }
        // An abandoned body only unwinds (see ``WorkflowRun/abandoned``): nothing new runs.
        if run.abandoned { throw WorkflowRun<W>.Abandoned() }
        let value = try body()
        let bytes = try run.codec.encode(value)
        run.recordedSideEffects[id] = bytes
        run.issued.append(.sideEffect(id: id, value: bytes))
        return value
    }

    /// Guards a code change so that runs already in flight keep their old path.
    ///
    /// A run that first reaches this call records `maxSupported` and gets it back, then and on every
    /// replay. A run whose history was recorded before the call existed gets
    /// ``WorkflowContext/defaultVersion`` (0), and keeps getting it from every later call with the same
    /// change id in that run, live ones included.
    /// - Throws: ``EntityError/Code/nondeterminism`` when the recorded version is outside the range.
    public func version(_ changeID: String, minSupported: Int, maxSupported: Int) throws -> Int {
        let version: Int
        if run.defaultedVersions.contains(changeID) {
            version = Self.defaultVersion
        } else if let recorded = run.recordedVersions[changeID] {
            version = recorded
            run.issued.append(.marker(changeID: changeID, version: recorded))
        } else if run.replaying {
            // The history has no marker where this call is: the run began before the change. It keeps
            // the old path for the rest of the run, live calls included (a marker recorded later would
            // make the next replay take the new path at this first call).
            version = Self.defaultVersion
            run.defaultedVersions.insert(changeID)
        } else {
            version = maxSupported
            run.recordedVersions[changeID] = maxSupported
            run.issued.append(.marker(changeID: changeID, version: maxSupported))
        }
        guard (minSupported...maxSupported).contains(version) else {
            throw EntityError(.nondeterminism, entity: run.name,
                              "the history recorded version \(version) of change '\(changeID)', outside \(minSupported)...\(maxSupported)")
        }
        return version
    }

    /// The version a run recorded before a change guarded by ``version(_:minSupported:maxSupported:)`` existed.
    public static var defaultVersion: Int { 0 }

    /// A UUID-shaped id (version 4 layout), the same on every replay.
    public func uuid() -> String {
        let seed = run.nextCommandID()
        return EntityContext(id: run.name.id, sequence: seed, nowNanoseconds: run.now, logger: run.logger,
                             requests: TurnRequests()).uuid()
    }

    /// A random number, the same on every replay.
    public func random() -> UInt64 {
        var generator = DeterministicRandom(seed: run.nextCommandID() ^ run.name.id.hashValueStable)
        return generator.next()
    }
}

extension Duration {
    /// Whole nanoseconds, 0 for a negative duration, saturating at `UInt64.max` (a "never" such as
    /// `.seconds(Int64.max)` stays in the far future instead of wrapping into the past).
    var nanoseconds: UInt64 {
        let (seconds, attoseconds) = components
        guard seconds >= 0 else { return 0 }
        let (whole, overflow) = UInt64(seconds).multipliedReportingOverflow(by: 1_000_000_000)
        guard !overflow else { return .max }
        let (sum, carry) = whole.addingReportingOverflow(UInt64(max(0, attoseconds) / 1_000_000_000))
        return carry ? .max : sum
    }
}

extension UInt64 {
    /// `self + other`, at most `UInt64.max`: a due time far in the future, never one in the past.
    func saturatingAdd(_ other: UInt64) -> UInt64 {
        let (sum, overflow) = addingReportingOverflow(other)
        return overflow ? .max : sum
    }
}
