import DurableEntities

/// A money transfer as a durable entity whose run body is a **saga**: withdraw from `from`, wait for
/// an approval when the amount is large, deposit to `to`, and record the outcome — or, when a step
/// cannot go on, refund what was withdrawn.
///
/// The entity id is the client's `transferId`: starting it again is a no-op, so a retried
/// `POST /transfers` finds the same transfer. Its steps:
///
/// 1. **withdraw** `amount` from `from` (``WithdrawFromAccount``). Too little money ends the transfer
///    as `rejected` (reason `insufficient_funds`); nothing moved.
/// 2. from here on a **refund** of `from` is registered as the saga's compensation.
/// 3. amounts at or above `approvalThreshold` wait in `awaiting_approval` for an ``Update/approve`` or
///    ``Update/reject``, for at most ``approvalTimeout`` on a durable timer (it survives restarts, and
///    tests skip it with a test clock). A rejection refunds and ends `rejected`; the timeout refunds
///    and ends `compensated`.
/// 4. **deposit** `amount` to `to` (``DepositToAccount``), then **record**: the body sets `completed`
///    in the entity's state, which its history makes durable.
///
/// **Cancelling** (``Bank/cancelTransfer(_:)``, `EntityRef.cancel()`): a transfer cancelled before its
/// deposit refunds what it withdrew and ends `cancelled`; its run ends cancelled too (the body lets
/// the cancellation out after compensating, so `result()` throws `EntityError.cancelled`). A
/// cancellation cannot leave a money move in doubt: it stops a transfer between its moves and in
/// its approval wait, and a move under way always gets the account's answer (see ``move(_:_:_:)``).
/// A deposit that has begun finishes: the cancellation came too late, and the transfer completes.
///
/// Every money move is an activity calling an ``Account`` with an idempotency key derived from the
/// transfer id and the step (`transfer:<id>:withdraw`, `…:deposit`, `…:refund`): an activity retried
/// after a crash moves the money once. Money moves retry without limit (backoff up to 5 s): an
/// account update only fails transiently (the runtime closing), its refusals are outcomes.
///
/// ## Usage
/// ```swift
/// let transfer = runtime.entity(Transfer.self, id: "t-1")
/// try await transfer.start(.init(from: "alice", to: "bob", amount: 2_500, approvalThreshold: 1_000_000))
/// let status = try await transfer.query(\.status)          // .running, then .completed
/// ```
struct Transfer: EntityWorkflow {
    /// Where a transfer is. The raw values are what the HTTP API shows.
    enum Status: String, Codable, Sendable, Hashable, CaseIterable {
        /// Never started (the HTTP API answers 404).
        case new
        /// Moving money (or refunding it).
        case running
        /// Withdrawn from `from`, waiting for an approval.
        case awaitingApproval = "awaiting_approval"
        /// Deposited to `to`: done.
        case completed
        /// Withdrawn, then refunded: the approval timed out, or the deposit was refused.
        case compensated
        /// Nothing moved in the end: too little money, or an approver said no (after a refund).
        case rejected
        /// A compensation failed: money may be stuck in transit; see `reason`.
        case failed
        /// Cancelled before its deposit; what was withdrawn was refunded.
        case cancelled

        /// Whether the transfer has finished (nothing will change any more).
        var isTerminal: Bool { [.completed, .compensated, .rejected, .failed, .cancelled].contains(self) }
    }

    /// An approver's answer.
    enum Decision: String, Codable, Sendable, Equatable {
        case approved, rejected
    }

    struct State: Codable, Sendable, Equatable {
        var status: Status = .new
        var from = ""
        var to = ""
        var amount: Int64 = 0
        /// Why it ended as it did, when not `completed` (`insufficient_funds`, `approval_timed_out`, …).
        var reason: String?
        /// The approver's answer, once given.
        var decision: Decision?
        /// When the approvers were reminded (ns since the Unix epoch, the runtime's clock); `nil` if
        /// they were not (yet). Optional, as every field added after the first release: states
        /// stored before it decode with `nil`.
        var remindedAt: UInt64?
    }

    /// What starts a transfer. The threshold travels with it, so that replay after a restart with
    /// another `--approval-threshold` takes the same path.
    struct Input: Codable, Sendable, Equatable {
        var from: String
        var to: String
        /// Cents, positive.
        var amount: Int64
        /// Amounts at or above it (cents) wait for an approval.
        var approvalThreshold: Int64
    }

    /// An approver's request: accepted only while the transfer is `awaiting_approval`.
    enum Update: Codable, Sendable {
        case approve, reject
    }

    /// An approval or rejection returns the transfer's state right after it (recorded with the
    /// request's idempotency key: a retried approval returns the same state).
    typealias UpdateResult = State
    typealias Output = Status

    /// An approval or rejection sent to a transfer that is not awaiting one. Nothing was recorded.
    struct NotAwaitingApproval: Error, CustomStringConvertible {
        let status: Status
        var description: String { "NotAwaitingApproval(status: \(status.rawValue))" }
    }

    /// A refund the account refused (it would overflow `from`'s balance): the saga's compensation fails.
    struct RefundRefused: Error, CustomStringConvertible {
        let reason: String
        var description: String { "RefundRefused(\(reason))" }
    }

    /// How long a large transfer waits for an approver.
    static let approvalTimeout: Duration = .seconds(24 * 3_600)
    /// How long it waits before the approvers are reminded (once), counted from the same start.
    static let approvalReminderAfter: Duration = .seconds(4 * 3_600)

    /// A reminder is worth a few tries, not a stuck transfer: after 5 it is given up.
    static let reminderDelivery = ActivityOptions(retry: RetryPolicy(initialInterval: .seconds(1), backoffCoefficient: 2, maximumAttempts: 5))

    /// Money moves: retried until they get an answer (accepted or refused), never given up. Asked to
    /// stop (the transfer was cancelled), a move's wait lasts until its attempt has ended, so the body
    /// learns what the account did.
    static let moneyMove = ActivityOptions(
        retry: RetryPolicy(initialInterval: .milliseconds(50), backoffCoefficient: 2, maximumInterval: .seconds(5), maximumAttempts: 0),
        cancellationType: .waitCancellationCompleted)

    static var entityType: String { "Transfer" }

    static func initialState(id: String) -> State { State() }

    static func validate(_ update: Update, state: State) throws {
        guard state.status == .awaitingApproval, state.decision == nil else { throw NotAwaitingApproval(status: state.status) }
    }

    static func apply(_ update: Update, state: inout State, context: EntityContext) throws -> State {
        state.decision = update == .approve ? .approved : .rejected
        state.status = .running  // the body goes on: a deposit, or a refund
        return state
    }

    static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> Status {
        context.updateState { state in
            state.status = .running
            state.from = input.from
            state.to = input.to
            state.amount = input.amount
        }
        var saga = Saga()
        do {
            let debit = Posting(account: input.from, cents: input.amount, step: "withdraw")
            if case .refused(let reason) = try await move(WithdrawFromAccount.self, debit, context) {
                return finish(.rejected, reason: reason, context)
            }
            // Registered only now: refunding a withdrawal that never happened would create money.
            saga.addCompensation("refund \(input.from)") {
                let refund = Posting(account: input.from, cents: input.amount, step: "refund")
                if case .refused(let reason) = try await move(DepositToAccount.self, refund, context) {
                    throw RefundRefused(reason: reason)
                }
            }
            try stopIfCancelled(context)  // cancelled while withdrawing: the withdrawal's answer came all the same
            if input.amount >= input.approvalThreshold {
                context.updateState { $0.status = .awaitingApproval }
                guard try await awaitDecision(input, context) else {
                    try await saga.compensate()
                    return finish(.compensated, reason: "approval_timed_out", context)
                }
                if context.state.decision == .rejected {
                    try await saga.compensate()
                    return finish(.rejected, reason: "rejected_by_approver", context)
                }
            }
            try stopIfCancelled(context)
            let credit = Posting(account: input.to, cents: input.amount, step: "deposit")
            if case .refused(let reason) = try await move(DepositToAccount.self, credit, context) {
                try await saga.compensate()
                return finish(.compensated, reason: "deposit_refused: \(reason)", context)
            }
            return finish(.completed, reason: nil, context)
        } catch where context.isCancellationRequested && (error is CancellationError || (error as? ActivityFailure)?.isCancelled == true) {
            // Cancelled before the deposit: refund, record, then let the cancellation end the run.
            do {
                try await saga.compensate()
            } catch {
                return finish(.failed, reason: "cancelled; \(error)", context)
            }
            _ = finish(.cancelled, reason: "refunded", context)
            throw error
        } catch {
            // A refund that failed: say so rather than hide it. (Money moves retry until they get an
            // answer, and a cancellation is handled above, so nothing else ends up here.)
            return finish(.failed, reason: "\(error)", context)
        }
    }

    /// Waits for an approver's decision: reminds the approvers once after ``approvalReminderAfter``,
    /// and gives up ``approvalTimeout`` after the wait began. Returns whether a decision came.
    ///
    /// The reminder came in the sample's second version. A transfer that was already waiting when
    /// the new code was deployed has a history without the version marker, so `version` gives it
    /// 0 on replay and it keeps the single 24-hour wait it recorded; transfers that reach this point
    /// under the new code record version 1 and take the new path (see "Versioning" in the README).
    private static func awaitDecision(_ input: Input, _ context: WorkflowContext<Self>) async throws -> Bool {
        let decided: (State) -> Bool = { $0.decision != nil }
        guard try context.version("approval-reminder", minSupported: WorkflowContext<Self>.defaultVersion, maxSupported: 1) == 1 else {
            return try await context.condition(timeout: approvalTimeout, decided)
        }
        // Both deadlines count from now: a late reminder does not push the end back.
        let since = context.nowNanoseconds
        if try await context.condition(untilNanoseconds: since + nanoseconds(approvalReminderAfter), decided) { return true }
        let reminder = ApprovalReminder(transfer: context.id, from: input.from, to: input.to, amount: input.amount, waitingSince: since)
        do {
            _ = try await context.execute(RemindApprovers.self, reminder, options: reminderDelivery)
            context.updateState { $0.remindedAt = context.nowNanoseconds }
        } catch let failure as ActivityFailure where !failure.isCancelled {
            // Undelivered: the wait goes on to its deadline all the same.
        }
        return try await context.condition(untilNanoseconds: since + nanoseconds(approvalTimeout), decided)
    }

    /// One money move, which always gets the account's answer: a cancellation stops a transfer
    /// between its moves, never inside one. Asked to stop while an attempt runs, the wait lasts until
    /// the account answered (``moneyMove``). Cancelled with no attempt running (queued, or between two
    /// attempts, when an earlier one may have moved the money before it failed), the wait ends at
    /// once; the move is then asked again with the same idempotency key, and the account returns its
    /// first answer if the money moved, or moves it now. Either way the transfer knows what happened
    /// and compensates exactly that. (A body whose own task is cancelled — the runtime closing, or
    /// the entity leaving memory, unwinds it to be replayed later — is not asked again: each new wait
    /// would fail at once.)
    private static func move<A: Activity>(_ activity: A.Type, _ posting: Posting,
                                          _ context: WorkflowContext<Self>) async throws -> PostingOutcome
    where A.Input == Posting, A.Output == PostingOutcome {
        while true {
            do {
                return try await context.execute(activity, posting, options: moneyMove)
            } catch let failure as ActivityFailure where failure.isCancelled && !Task.isCancelled {
                continue  // asked again: the account's idempotency key makes it the same move
            }
        }
    }

    /// Ends the steps with `CancellationError` once the transfer's cancellation was requested.
    private static func stopIfCancelled(_ context: WorkflowContext<Self>) throws {
        if context.isCancellationRequested { throw CancellationError() }
    }

    private static func nanoseconds(_ duration: Duration) -> UInt64 {
        UInt64(duration.components.seconds) * 1_000_000_000 + UInt64(duration.components.attoseconds / 1_000_000_000)
    }

    /// Records the outcome in the state (the "record" step) and returns it.
    private static func finish(_ status: Status, reason: String?, _ context: WorkflowContext<Self>) -> Status {
        context.updateState { state in
            state.status = status
            state.reason = reason
        }
        return status
    }
}

extension Transfer.Input {
    /// Whether `state` is the transfer this input starts (a retried `POST /transfers` must match).
    func matches(_ state: Transfer.State) -> Bool {
        state.from == from && state.to == to && state.amount == amount
    }
}
