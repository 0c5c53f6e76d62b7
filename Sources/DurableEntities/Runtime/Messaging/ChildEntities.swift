/// Entity-to-entity messages and child entities, from a run body.
///
/// Everything here is a *command*: recorded in the entity's history in the turn that issues it, and
/// acted on (the message delivered, the child started) only once that turn's commit is durable. On
/// replay the same calls are matched against the recorded commands and nothing is sent again.
///
/// ## Usage
/// ```swift
/// static func run(_ order: Order, context: WorkflowContext<Self>) async throws -> Receipt {
///     try context.signal(Inventory.self, id: order.sku, .reserve(order.quantity, for: order.id))
///     let payment = try context.startChild(Payment.self, id: "pay-\(order.id)", input: order.payment)
///     let charged = try await payment.result()            // or throws ChildFailure
///     let parcels = try await context.fanOut(Parcel.self, order.parcels.map { ($0.id, $0) }, maxConcurrent: 10)
///     return Receipt(charged: charged, shipped: parcels.count { (try? $0.get()) != nil })
/// }
/// ```
extension WorkflowContext {
    /// Sends `signal` to the entity `id` of type `T`: delivered once this turn is durable, exactly once
    /// in effect (a crash between the two commits redelivers it; the receiver records it once), and in
    /// order with this entity's other messages to the same receiver.
    /// - Throws: an encoding error (nothing is recorded).
    public func signal<T: EntityWorkflow>(_ type: T.Type, id: String, _ signal: T.Signal) throws {
        let bytes = try run.codec.encode(signal)
        let commandID = run.nextCommandID()
        run.issued.append(.signalEntity(id: commandID, target: EntityName(type: T.entityType, id: id), signal: bytes))
    }

    /// Starts the entity `id` of type `C` as a child of this one, with `input`; returns a handle to
    /// await or cancel it. Starting the same child id again (from this or another parent) does not run
    /// it twice: the second parent is linked to the same run and gets the same outcome.
    /// - Parameter parentClosePolicy: what happens to the child if this run ends first.
    /// - Throws: an encoding error (nothing is recorded).
    public func startChild<C: EntityWorkflow>(_ type: C.Type, id: String, input: C.Input,
                                              parentClosePolicy: ParentClosePolicy = .terminate) throws -> ChildEntity<C> {
        let bytes = try run.codec.encode(input)
        let commandID = run.nextCommandID()
        let name = EntityName(type: C.entityType, id: id)
        run.addChild(commandID, name: name, policy: parentClosePolicy)
        run.issued.append(.startChild(id: commandID, child: name, input: bytes, policy: parentClosePolicy))
        return ChildEntity(context: self, commandID: commandID, name: name)
    }

    /// Starts a child and waits for its output.
    ///
    /// The child belongs to this wait. When the task that waits is cancelled (a task group's
    /// `cancelAll()`, an `async let` left unawaited; see ``WorkflowContext`` "Cancelling a wait"),
    /// `cancellationType` says what happens:
    /// - ``ChildCancellationType/tryCancel`` (the default): the child is asked to cancel — a
    ///   recorded `childCancelRequested`, as ``ChildEntity/cancel()`` records — and the wait throws
    ///   `CancellationError` at once, without waiting for the child to end;
    /// - ``ChildCancellationType/waitCancellationCompleted``: the child is asked to cancel, and the
    ///   wait lasts until it has ended. It returns the child's output if the child finished anyway,
    ///   and throws its ``ChildFailure`` otherwise. The run's own cancellation does the same;
    /// - ``ChildCancellationType/abandon``: the wait throws `CancellationError` at once and the
    ///   child goes on (until `parentClosePolicy` applies).
    ///
    /// A task already cancelled starts no child. (With ``startChild(_:id:input:parentClosePolicy:)``
    /// and ``ChildEntity/result()`` the handle outlives the wait, and a cancelled wait leaves the
    /// child running.)
    /// - Throws: ``ChildFailure`` when the child fails or is terminated; `CancellationError` when this
    ///   run, or the task that waits, is cancelled meanwhile (not with `waitCancellationCompleted`).
    public func executeChild<C: EntityWorkflow>(_ type: C.Type, id: String, input: C.Input,
                                                parentClosePolicy: ParentClosePolicy = .terminate,
                                                cancellationType: ChildCancellationType = .tryCancel) async throws -> C.Output {
        try Task.checkCancellation()
        return try await startChild(type, id: id, input: input, parentClosePolicy: parentClosePolicy).result(cancellationType: cancellationType)
    }

    /// Starts one child per element of `children`, at most `maxConcurrent` running at once (the next
    /// starts as soon as one finishes), and collects every outcome in the order given. A failed child
    /// does not stop the others: its slot holds its ``ChildFailure``, for the caller to decide.
    ///
    /// The children belong to the fan-out, as an
    /// ``executeChild(_:id:input:parentClosePolicy:cancellationType:)``'s child does. If the task that
    /// runs it is cancelled, no further child starts, and each child still running is handled as
    /// `cancellationType` says: asked to cancel (`childCancelRequested`) by default, or left running
    /// with ``ChildCancellationType/abandon``; the fan-out throws `CancellationError` at once. With
    /// ``ChildCancellationType/waitCancellationCompleted`` the children are asked to cancel and it
    /// throws `CancellationError` only once every one of them has ended; the run's own cancellation
    /// does the same.
    /// - Throws: `CancellationError` if this run, or the task that runs the fan-out, is cancelled
    ///   meanwhile, or an encoding error.
    public func fanOut<C: EntityWorkflow>(_ type: C.Type, _ children: [(id: String, input: C.Input)], maxConcurrent: Int = 100,
                                          parentClosePolicy: ParentClosePolicy = .terminate,
                                          cancellationType: ChildCancellationType = .tryCancel) async throws -> [Result<C.Output, ChildFailure>] {
        var results = [Result<C.Output, ChildFailure>?](repeating: nil, count: children.count)
        let window = max(1, maxConcurrent)
        // Whether the fan-out was cancelled while its waits lasted (`waitCancellationCompleted`:
        // they do not throw, so the run's cancellation is seen here).
        let runCancellations = run.cancellations
        func checkCancellation() throws {
            try Task.checkCancellation()
            if cancellationType == .waitCancellationCompleted && run.cancellations != runCancellations { throw CancellationError() }
        }
        try await withThrowingTaskGroup(of: (Int, Result<C.Output, ChildFailure>).self) { group in
            var next = 0
            func launch() throws {
                // A cancelled fan-out starts nothing more (its running children are asked to cancel).
                try checkCancellation()
                let index = next
                next += 1
                let child = try startChild(type, id: children[index].id, input: children[index].input, parentClosePolicy: parentClosePolicy)
                group.addTask { (index, try await child.outcome(cancellation: cancellationType)) }
            }
            while next < min(window, children.count) { try launch() }
            while let (index, result) = try await group.next() {
                results[index] = result
                if next < children.count { try launch() }
            }
        }
        // Cancelled while it waited for its last children to end: it was cancelled all the same.
        if cancellationType == .waitCancellationCompleted { try checkCancellation() }
        return results.map { $0! }
    }
}

/// What cancelling a wait for a child does: the run's cancellation, or the cancellation of the task
/// that waits (see ``WorkflowContext/executeChild(_:id:input:parentClosePolicy:cancellationType:)``
/// and ``WorkflowContext/fanOut(_:_:maxConcurrent:parentClosePolicy:cancellationType:)``). The
/// counterpart of Temporal's child-workflow cancellation types, and of ``ActivityCancellationType``
/// for activities.
///
/// Not stored in the history: the body says it again on every replay, and the requests it leads to
/// (`childCancelRequested`) are recorded and matched as usual. Temporal's fourth type, which waits
/// until the child has *received* the request, has no counterpart: here the request is durable in
/// the parent's own commit and delivered exactly once in effect, so the wait would end at the same
/// point as ``tryCancel``'s, one delivery later.
public enum ChildCancellationType: Sendable, Hashable {
    /// Ask the child to cancel and end the wait at once with `CancellationError`. The default, and
    /// what the runtime always did. The run's own cancellation ends the wait at once too, without
    /// asking: the child is left to its ``ParentClosePolicy`` when the run ends.
    case tryCancel
    /// Ask the child to cancel and wait until it has ended: its output if it finished anyway, its
    /// ``ChildFailure`` otherwise (a body that rethrew `CancellationError` ends `failed`). A saga
    /// that compensates afterwards then knows whether the child's work happened.
    case waitCancellationCompleted
    /// End the wait at once with `CancellationError` and leave the child alone. It still ends with
    /// the parent if its ``ParentClosePolicy`` says so.
    case abandon
}

/// A child entity started by a run body. Await its ``result()`` or ``cancel()`` it, from the same body.
public struct ChildEntity<C: EntityWorkflow>: @unchecked Sendable {
    /// The id of the command that started the child (unique within the parent's run).
    public let commandID: UInt64
    /// The child's name.
    public let name: EntityName

    init<W: EntityWorkflow>(context: WorkflowContext<W>, commandID: UInt64, name: EntityName) {
        self.commandID = commandID
        self.name = name
        let run = context.run
        self.wait = { id, cancellation in
            /// A wait no task cancellation reaches (the run's own still does).
            func uncancellableWait() async throws -> [UInt8] {
                try await withUnsafeThrowingContinuation { continuation in run.awaitChild(id, cancellation: cancellation, continuation) }
            }
            guard run.waitsAreCancellable else {
                try Task.checkCancellation()
                return try await uncancellableWait()
            }
            if Task.isCancelled {
                // Cancelled before it waited: a fan-out's child started, then its task cancelled.
                if cancellation != .abandon { run.requestChildCancel(id) }
                guard cancellation == .waitCancellationCompleted else { throw CancellationError() }
                return try await uncancellableWait()
            }
            let handle = WorkflowWaitHandle()
            return try await withTaskCancellationHandler {
                try await withUnsafeThrowingContinuation { continuation in
                    run.awaitChild(id, handle: handle, cancellation: cancellation, continuation)
                }
            } onCancel: {
                run.cancelChildWait(handle)
            }
        }
        self.issue = { command in context.run.issued.append(command) }
        self.decode = { bytes in try bytes.withUnsafeBytes { try context.run.codec.decode(C.Output.self, from: $0) } }
    }

    /// Waits for child `id`'s outcome, cancelled as the type says.
    private let wait: (UInt64, ChildCancellationType) async throws -> [UInt8]
    private let issue: (WorkflowCommand) -> Void
    private let decode: ([UInt8]) throws -> C.Output

    /// The child's output, once it completed.
    /// - Throws: ``ChildFailure`` when it failed or was terminated; `CancellationError` if the parent's
    ///   run is cancelled while it waits, or the task that waits (at once if it already is; the
    ///   child goes on, see ``cancel()``).
    public func result() async throws -> C.Output {
        try await result(cancellationType: .abandon)
    }

    /// The child's output, once it completed; a cancelled wait does what `cancellationType` says
    /// (see ``ChildCancellationType``), whether the task was cancelled before or during the wait.
    /// ``result()`` is this with ``ChildCancellationType/abandon``: the handle, not the wait, owns
    /// the child. A race between a child started earlier and a deadline that must stop the child
    /// and learn how it ended passes ``ChildCancellationType/waitCancellationCompleted``.
    /// - Throws: ``ChildFailure`` when it failed or was terminated; `CancellationError` when the
    ///   wait is cancelled (not with `waitCancellationCompleted`).
    public func result(cancellationType: ChildCancellationType) async throws -> C.Output {
        try decode(try await wait(commandID, cancellationType))
    }

    /// The child's outcome as a `Result` (throws only for cancellation: the parent's run's, or the
    /// waiting task's).
    func outcome(cancellation: ChildCancellationType) async throws -> Result<C.Output, ChildFailure> {
        do {
            return .success(try await result(cancellationType: cancellation))
        } catch let failure as ChildFailure {
            return .failure(failure)
        }
    }

    /// Asks the child's run body to cancel (recorded now, delivered once this turn is durable). The
    /// child decides what to do; ``result()`` then reports how it ended.
    public func cancel() {
        let id = commandID
        issue(.cancelChild(id: id))
    }
}
