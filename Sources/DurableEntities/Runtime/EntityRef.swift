import Synchronization

/// A typed reference to one entity. Cheap to make and to copy; every call goes to the entity's
/// mailbox and returns once the outcome is durable.
public struct EntityRef<W: EntityWorkflow>: Sendable {
    /// The entity's full name.
    public let name: EntityName
    let runtime: EntityRuntime
    /// The entity's resident cell, as last seen: saves the lookup on every message. A passivated cell
    /// refuses messages, and the ref then looks the entity up again.
    private let cache: CellCache<W>

    /// The entity's id.
    public var id: String { name.id }

    init(id: String, runtime: EntityRuntime) {
        self.name = EntityName(type: W.entityType, id: id)
        self.runtime = runtime
        self.cache = CellCache()
    }

    /// Sends a signal; returns once it is recorded durably (or refused).
    /// - Parameter idempotencyKey: a sender's id for this signal: resending it after an unclear outcome
    ///   (a crash, a timeout) records it at most once.
    /// - Throws: ``EntityError``: `rejected` (the handler threw), `terminated`, `payloadTooLarge`,
    ///   `unencodablePayload`, `storage`, `closed`. Nothing is recorded when it throws.
    public func signal(_ signal: W.Signal, idempotencyKey: String? = nil) async throws(EntityError) {
        let bytes: [UInt8]
        do { bytes = try runtime.core.codec.encode(signal) } catch {
            throw EntityError(.unencodablePayload, entity: name, "the signal does not encode; nothing was recorded", underlying: error)
        }
        try await send(signal, bytes: bytes, idempotencyKey: idempotencyKey)
    }

    func send(_ signal: W.Signal, bytes: [UInt8], idempotencyKey: String?) async throws(EntityError) {
        try await deliver(bounded: true) { reply in .signal(signal, bytes: bytes, key: idempotencyKey, reply: reply) }
    }

    /// Sends an update: validated, applied, recorded, and its result returned once durable. A refused
    /// update records nothing.
    /// - Parameter idempotencyKey: resending an update with the same key returns the first result
    ///   without applying it again.
    public func update(_ update: W.Update, idempotencyKey: String? = nil) async throws(EntityError) -> W.UpdateResult {
        let bytes: [UInt8]
        do { bytes = try runtime.core.codec.encode(update) } catch {
            throw EntityError(.unencodablePayload, entity: name, "the update does not encode; nothing was recorded", underlying: error)
        }
        return try await deliverValue(bounded: true) { reply in .update(update, bytes: bytes, key: idempotencyKey, reply: reply) }
            as! W.UpdateResult
    }

    /// What the entity is doing now, from what is committed: its run's status and what the run waits
    /// for (see ``EntityDescription``); `nil` for an entity with no acknowledged message.
    /// - Throws: ``EntityError`` `storage`, `failedOnReplay`, `undecodablePayload` (see
    ///   ``EntityRuntime/describe(_:)``).
    public func describe() throws(EntityError) -> EntityDescription? {
        try runtime.describe(name)
    }

    /// Reads the entity's committed state: every acknowledged signal and update is in it, nothing
    /// uncommitted is. Never recorded. A resident entity answers on the calling task; a passivated
    /// entity without a run body is activated there too (snapshot plus the events after it), and one
    /// with a run body, or one busy with a turn, is activated by its shard.
    public func query<Result: Sendable>(_ read: @Sendable (W.State) -> Result) async throws(EntityError) -> Result {
        let cell = cache.cell ?? runtime.core.cell(W.self, name)
        if let state = cell.committedState() ?? cell.activateForRead() { return read(state) }
        let state = try await deliverValue { reply in .read(reply) } as! W.State
        return read(state)
    }

    /// Waits until `predicate` holds for the entity's committed state — checked now and after every
    /// turn — and returns that state. Costs no thread and no polling; nothing is recorded.
    ///
    /// ```swift
    /// let settled = try await transfer.awaitState(timeout: .seconds(10)) { $0.status != .running }
    /// ```
    /// - Parameters:
    ///   - timeout: on the runtime's clock (a `TestClock` must be advanced for it to pass).
    ///   - predicate: quick and side-effect free: it runs under the entity's lock, on the shard's thread.
    /// - Throws: ``EntityError``: `timedOut`, `terminated` (the entity was, or became, terminated),
    ///   `closed`, or the entity's load failure (`failedOnReplay`, `nondeterminism`, `storage`).
    public func awaitState(timeout: Duration = .seconds(30),
                           where predicate: @escaping @Sendable (W.State) -> Bool) async throws(EntityError) -> W.State {
        let core = runtime.core
        let name = self.name
        let cache = self.cache
        guard !core.closed.load(ordering: .acquiring) else {
            throw EntityError(.closed, entity: name, "the runtime is closed")
        }
        let id = core.watchIDs.add(1, ordering: .relaxed).newValue
        let result = await withUnsafeContinuation { (continuation: UnsafeContinuation<Result<any Sendable, EntityError>, Never>) in
            let registration = WatchRegistration<W>()
            let timedOut = EntityError(.timedOut, entity: name, "the entity's state did not satisfy the condition within \(timeout)")
            let alarm = core.timers.alarm(at: core.clock.nowNanoseconds().saturatingAdd(timeout.nanoseconds)) {
                if let cell = registration.fire(), cell.unwatch(id) { continuation.resume(returning: .failure(timedOut)) }
            }
            let watch = CellStateWatch(id: id, predicate: { predicate($0 as! W.State) }) { result in
                core.timers.cancelAlarm(alarm)
                continuation.resume(returning: result)
            }
            var cell = cache.cell ?? core.cell(W.self, name)
            while !cell.watch(watch) { cell = core.cell(W.self, name) }
            // The alarm may have fired before the cell was known: it then ends the watch here.
            if registration.register(cell), cell.unwatch(id) { continuation.resume(returning: .failure(timedOut)) }
        }
        return try result.get() as! W.State
    }

    /// Starts the entity's run body with `input`; returns once the start is durable. Starting a body
    /// that already started in the current run does nothing (so a retried start is safe).
    /// - Throws: ``EntityError``: `rejected` if the type has no run body, `terminated`, `storage`, …
    public func start(_ input: W.Input) async throws(EntityError) {
        let bytes: [UInt8]
        do { bytes = try runtime.core.codec.encode(input) } catch {
            throw EntityError(.unencodablePayload, entity: name, "the input does not encode; nothing was recorded", underlying: error)
        }
        try await deliver(bounded: true) { reply in .start(input, bytes: bytes, reply: reply) }
    }

    /// Starts the run body with `input` (unless it started before: starting is idempotent) and waits
    /// for its outcome: `start` then `result`, in one message. The output, or
    /// ``EntityError/Code/rejected`` carrying the body's ``WorkflowFailure`` (``EntityError/Code/cancelled``
    /// for a run that was cancelled and let the cancellation end it); the start's own errors
    /// as for ``start(_:)``. A body that finishes in its first turn (local activities only) answers
    /// after that one commit.
    public func execute(_ input: W.Input) async throws(EntityError) -> W.Output {
        // No journal read here: the turn looks the entity up anyway, and a run that finished and left
        // memory answers there from its last event, without a replay.
        let bytes: [UInt8]
        do { bytes = try runtime.core.codec.encode(input) } catch {
            throw EntityError(.unencodablePayload, entity: name, "the input does not encode; nothing was recorded", underlying: error)
        }
        return try await deliverValue(bounded: true) { reply in .execute(input, bytes: bytes, reply: reply) } as! W.Output
    }

    /// Sends a signal, starting the run body first if it has not started (both durable at return).
    public func signalWithStart(_ signal: W.Signal, input: W.Input, idempotencyKey: String? = nil) async throws(EntityError) {
        try await start(input)
        try await self.signal(signal, idempotencyKey: idempotencyKey)
    }

    /// Waits for the run body's outcome: its output, or ``EntityError/Code/rejected`` carrying the
    /// body's ``WorkflowFailure`` — ``EntityError/Code/cancelled`` if the run was cancelled and its
    /// body let the cancellation end it. Waiting costs no thread; the body may take months.
    public func result() async throws(EntityError) -> W.Output {
        // A finished run that left memory answers from its last event, without a replay.
        let core = runtime.core
        let finished = if let cell = cache.cell ?? core.residentCell(W.self, name) {
            cell.finishedOutcome()
        } else {
            EntityCell<W>.finishedOutcome(of: name, core: core)
        }
        switch finished {
        case .success(let output)?: return output as! W.Output
        case .failure(let error)?: throw error
        case nil: break
        }
        return try await deliverValue { reply in .result(reply) } as! W.Output
    }

    /// Asks the run body to stop, cooperatively: recorded, then the wait the body is suspended on
    /// throws — `CancellationError`, or for an activity an ``ActivityFailure`` with reason `cancelled`
    /// (the activity's task is deleted). The body decides what to do (compensate, then finish or rethrow).
    /// A body that lets the cancellation out ends the run as cancelled (a `cancelled` event;
    /// ``result()`` throws ``EntityError/Code/cancelled``, a parent gets ``ChildFailure`` with reason
    /// `cancelled`); one that returns completes it. Cancelling when no body runs does nothing.
    public func cancel() async throws(EntityError) {
        try await deliver { reply in .cancel(reply: reply) }
    }

    /// Terminates the entity: recorded, after which it refuses every message with `terminated`.
    public func terminate(reason: String) async throws(EntityError) {
        try await deliver { reply in .terminate(reason: reason, reply: reply) }
    }

    /// Sends a message whose reply carries no value.
    /// - Parameter bounded: a sender's message, which waits for room in a full mailbox (reads and result
    ///   waits never do).
    private func deliver(bounded: Bool = false, _ message: (@escaping VoidReply) -> CellMessage) async throws(EntityError) {
        let failure = await withUnsafeContinuation { (continuation: UnsafeContinuation<EntityError?, Never>) in
            guard let message = openMailbox(message({ result in
                switch result {
                case .success: continuation.resume(returning: nil)
                case .failure(let error): continuation.resume(returning: error)
                }
            })) else {
                return continuation.resume(returning: closedError)
            }
            enqueue(message, bounded: bounded)
        }
        if let failure { throw failure }
    }

    /// Sends a message whose reply carries a value of the entity type (the caller casts it).
    private func deliverValue(bounded: Bool = false, _ message: (@escaping ValueReply) -> CellMessage) async throws(EntityError) -> any Sendable {
        let result = await withUnsafeContinuation { (continuation: UnsafeContinuation<Result<any Sendable, EntityError>, Never>) in
            guard let message = openMailbox(message({ continuation.resume(returning: $0) })) else {
                return continuation.resume(returning: .failure(closedError))
            }
            enqueue(message, bounded: bounded)
        }
        return try result.get()
    }

    private var closedError: EntityError { EntityError(.closed, entity: name, "the runtime is closed; nothing was recorded") }

    /// `message`, unless the runtime is closed.
    private func openMailbox(_ message: @autoclosure () -> CellMessage) -> CellMessage? {
        runtime.core.closed.load(ordering: .acquiring) ? nil : message()
    }

    private func enqueue(_ message: CellMessage, bounded: Bool) {
        if let cell = cache.cell, cell.enqueue(message, bounded: bounded) { return }
        // The cached cell was passivated (or none was cached): look the entity up again.
        cache.cell = runtime.core.enqueue(message, to: W.self, name, bounded: bounded)
    }
}

/// Where a state watch's timeout and its registration meet: whichever comes second ends the watch.
final class WatchRegistration<W: EntityWorkflow>: Sendable {
    private let state = Mutex<(cell: EntityCell<W>?, fired: Bool)>((nil, false))

    /// The timeout fired: returns the cell to unwatch, if registered yet.
    func fire() -> EntityCell<W>? { state.withLock { $0.fired = true; return $0.cell } }

    /// The watch is registered in `cell`: returns whether the timeout already fired.
    func register(_ cell: EntityCell<W>) -> Bool { state.withLock { $0.cell = cell; return $0.fired } }
}

/// The last resident cell an ``EntityRef`` used.
final class CellCache<W: EntityWorkflow>: Sendable {
    /// Not `Mutex<EntityCell<W>?>`: a type with `W` in it costs a metadata lookup on every access.
    private let stored = Mutex<AnyObject?>(nil)
    var cell: EntityCell<W>? {
        get { stored.withLock { $0 }.map { unsafeDowncast($0, to: EntityCell<W>.self) } }
        set { stored.withLock { $0 = newValue } }
    }
}
