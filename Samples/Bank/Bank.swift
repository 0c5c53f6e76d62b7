import DurableEntities

/// The bank's operations over one ``EntityRuntime``: what the HTTP routes, the demo and the load
/// generator call. It checks input, turns the runtime's errors into ``BankError``s, and makes every
/// mutating call idempotent by the client's `requestId` (sent to the entity as the idempotency key
/// `request:<requestId>`; transfers use `transfer:<id>:<step>`, so the two never collide).
///
/// ## Usage
/// ```swift
/// let bank = try Bank(configuration: .init(directory: "./bank-data"))
/// _ = try await bank.deposit(account: "alice", cents: 10_000, requestId: "r-1")
/// let transfer = try await bank.startTransfer(id: "t-1", from: "alice", to: "bob", cents: 2_500)
/// let done = try await bank.awaitTransfer("t-1")          // .completed
/// bank.close()
/// ```
final class Bank: Sendable {
    /// $10,000.00: transfers of this much or more wait for an approval.
    static let defaultApprovalThreshold: Int64 = 1_000_000

    /// The runtime underneath (a swift-service-lifecycle `Service`).
    let runtime: EntityRuntime
    /// Transfers of this many cents or more wait for an approval.
    let approvalThreshold: Int64

    /// Opens the runtime on `configuration.directory` with ``Account``, ``Transfer`` and the transfers'
    /// activities registered. Transfers that were in flight when the process stopped carry on.
    /// - Throws: ``EntityError`` `storage` when the directory cannot be opened.
    /// - Parameter onReminder: called when a transfer's approvers are reminded (after 4 hours
    ///   without a decision); the reminder is also logged. What it throws fails the reminder's
    ///   attempt, which is retried (see ``Transfer/reminderDelivery``).
    init(configuration: EntityRuntime.Configuration, approvalThreshold: Int64 = Bank.defaultApprovalThreshold,
         onReminder: @escaping @Sendable (ApprovalReminder) throws -> Void = { _ in }) throws(EntityError) {
        runtime = try EntityRuntime(configuration: configuration, entityTypes: [Account.self, Transfer.self])
        self.approvalThreshold = approvalThreshold
        // The activities call accounts through the runtime, so they are registered once it exists;
        // activity tasks recovered at open wait for their registration.
        let link = RuntimeLink(runtime)
        runtime.register(activity: WithdrawFromAccount(link: link))
        runtime.register(activity: DepositToAccount(link: link))
        runtime.register(activity: RemindApprovers(deliver: onReminder))
    }

    /// Closes the runtime (finishing what is in flight). See ``EntityRuntime/close()``.
    func close() { runtime.close() }

    // MARK: Accounts

    /// An account's balance, as a client sees it.
    struct AccountView: Codable, Sendable, Equatable {
        var accountId: String
        var balance: Int64
    }

    /// Deposits `cents` into `account`; a retry with the same `requestId` returns the first answer.
    /// - Throws: ``BankError``: `invalidID`, `invalidAmount`, `invalidRequestID`, `unavailable`.
    func deposit(account: String, cents: Int64, requestId: String) async throws(BankError) -> AccountView {
        try Self.check(id: account, "account id")
        try Self.check(cents: cents)
        try Self.check(requestID: requestId)
        let balance = try await mapped {
            try await runtime.entity(Account.self, id: account)
                .depositReturningBalance(cents: cents, ref: requestId, idempotencyKey: Self.key(requestId))
        }
        return AccountView(accountId: account, balance: balance)
    }

    /// Withdraws `cents` from `account`; a retry with the same `requestId` returns the first answer. A
    /// refused withdrawal records nothing, so retrying it later is a new attempt.
    /// - Throws: ``BankError``: `insufficientFunds`, `invalidID`, `invalidAmount`, `invalidRequestID`, `unavailable`.
    func withdraw(account: String, cents: Int64, requestId: String) async throws(BankError) -> AccountView {
        try Self.check(id: account, "account id")
        try Self.check(cents: cents)
        try Self.check(requestID: requestId)
        let balance = try await mapped {
            try await runtime.entity(Account.self, id: account).withdraw(cents: cents, ref: requestId, idempotencyKey: Self.key(requestId))
        }
        return AccountView(accountId: account, balance: balance)
    }

    /// An account's committed balance; 0 for an account that never received money.
    /// - Throws: ``BankError``: `invalidID`, `unavailable`.
    func account(_ id: String) async throws(BankError) -> AccountView {
        try Self.check(id: id, "account id")
        let balance = try await mapped { try await runtime.entity(Account.self, id: id).query(\.balance) }
        return AccountView(accountId: id, balance: balance)
    }

    // MARK: Transfers

    /// A transfer, as a client sees it.
    struct TransferView: Codable, Sendable, Equatable {
        var transferId: String
        /// `running`, `awaiting_approval`, `completed`, `compensated`, `rejected` or `failed`.
        var status: String
        var from: String
        var to: String
        var amount: Int64
        /// Why it ended as it did, when it did not complete (`insufficient_funds`, `approval_timed_out`, …).
        var reason: String?
        /// When the approvers were reminded (ns since the Unix epoch), if they were.
        var remindedAt: UInt64?

        init(id: String, _ state: Transfer.State) {
            transferId = id
            status = state.status.rawValue
            from = state.from
            to = state.to
            amount = state.amount
            reason = state.reason
            remindedAt = state.remindedAt
        }
    }

    /// Starts the transfer `id`, or returns it if it exists with the same accounts and amount.
    /// - Returns: the transfer just after it started (usually `running`).
    /// - Throws: ``BankError``: `transferConflict` when `id` names another transfer, `invalidID`,
    ///   `invalidAmount`, `invalidRequest` (`from` == `to`), `unavailable`.
    func startTransfer(id: String, from: String, to: String, cents: Int64) async throws(BankError) -> TransferView {
        try Self.check(id: id, "transfer id")
        try Self.check(id: from, "from")
        try Self.check(id: to, "to")
        try Self.check(cents: cents)
        guard from != to else { throw BankError(.invalidRequest, "a transfer needs two different accounts") }
        let transfer = runtime.entity(Transfer.self, id: id)
        let input = Transfer.Input(from: from, to: to, amount: cents, approvalThreshold: approvalThreshold)
        var state = try await mapped { try await transfer.query { $0 } }
        if state.status == .new {
            // Starting is idempotent: of two concurrent first posts, one starts it and the other finds it.
            try await mapped { try await transfer.start(input) }
            state = try await mapped { try await transfer.query { $0 } }
        }
        guard input.matches(state) else {
            throw BankError(.transferConflict, "transfer '\(id)' exists: \(state.amount) cents from '\(state.from)' to '\(state.to)'")
        }
        return TransferView(id: id, state)
    }

    /// The transfer `id`.
    /// - Throws: ``BankError``: `notFound`, `invalidID`, `unavailable`.
    func transfer(_ id: String) async throws(BankError) -> TransferView {
        try Self.check(id: id, "transfer id")
        let state = try await mapped { try await runtime.entity(Transfer.self, id: id).query { $0 } }
        guard state.status != .new else { throw BankError(.notFound, "no transfer '\(id)'") }
        return TransferView(id: id, state)
    }

    /// Approves (`approve: true`) or rejects a transfer awaiting approval; a retry with the same
    /// `requestId` returns the first answer.
    /// - Returns: the transfer right after the decision (`running`: it goes on with the deposit or the refund).
    /// - Throws: ``BankError``: `notFound`, `notAwaitingApproval`, `invalidID`, `invalidRequestID`, `unavailable`.
    func decide(_ id: String, approve: Bool, requestId: String) async throws(BankError) -> TransferView {
        try Self.check(requestID: requestId)
        _ = try await transfer(id)  // 404 before any message reaches a transfer that does not exist
        let state = try await mapped {
            try await runtime.entity(Transfer.self, id: id).update(approve ? .approve : .reject, idempotencyKey: Self.key(requestId))
        }
        return TransferView(id: id, state)
    }

    /// Cancels a transfer that has not finished: recorded, then the transfer stops before its next
    /// money move (or its approval wait ends), refunds what it withdrew and ends `cancelled`. A transfer
    /// whose deposit has begun completes all the same. Cancelling again changes nothing.
    /// - Returns: the transfer as it was when the cancellation was recorded (poll it, or wait for
    ///   `cancelled` or `completed`, for the end).
    /// - Throws: ``BankError``: `notFound`, `transferFinished`, `invalidID`, `unavailable`.
    func cancelTransfer(_ id: String) async throws(BankError) -> TransferView {
        let current = try await transfer(id)
        if let status = Transfer.Status(rawValue: current.status), status.isTerminal {
            throw BankError(.transferFinished, "the transfer is \(current.status); there is nothing to cancel")
        }
        try await mapped { try await runtime.entity(Transfer.self, id: id).cancel() }
        return current
    }

    /// A transfer's run as the runtime describes it (``EntityRuntime/describe(_:)``): what an operator
    /// asks when a transfer has not finished — is it waiting for an approval's timer, or retrying a
    /// money move that keeps failing (which attempt, the last error, when the next one starts)?
    /// Times are nanoseconds since the Unix epoch.
    struct TransferRunView: Codable, Sendable, Equatable {
        struct ActivityView: Codable, Sendable, Equatable {
            var name: String
            /// `scheduled`, `running`, `backing_off`, `paused` or `cancel_requested`.
            var state: String
            var scheduledAt: UInt64
            var attempt: Int?
            var nextAttemptAt: UInt64?
            var lastFailure: String?
            /// `true` for a step paused while its attempt runs: if that attempt fails, the step waits
            /// for a retry (absent otherwise).
            var pausedAfterAttempt: Bool?
        }
        struct TimerView: Codable, Sendable, Equatable {
            var dueAt: UInt64
        }
        var transferId: String
        /// `running`, `completed`, `failed`, `cancelled` or `terminated`.
        var run: String
        /// The failure's or termination's text.
        var message: String?
        var startedAt: UInt64?
        var closedAt: UInt64?
        /// How many events the run has recorded.
        var events: Int
        /// What the run waits for: the money moves in flight, and its timers (an approval's reminder
        /// and deadline).
        var activities: [ActivityView]
        var timers: [TimerView]

        init(id: String, _ description: EntityDescription) {
            transferId = id
            switch description.status {
            case .idle, .running: run = "running"
            case .completed: run = "completed"
            case .failed(let text): run = "failed"; message = text
            case .cancelled(let text): run = "cancelled"; message = text
            case .terminated(let reason): run = "terminated"; message = reason
            }
            startedAt = description.startedAt
            closedAt = description.closedAt
            events = description.historyLength
            activities = description.pendingActivities.map { activity in
                let state = switch activity.state {
                case .scheduled: "scheduled"
                case .running: "running"
                case .backingOff: "backing_off"
                case .paused: "paused"
                case .cancelRequested: "cancel_requested"
                }
                return ActivityView(name: activity.name, state: state, scheduledAt: activity.scheduledAt, attempt: activity.attempt,
                                    nextAttemptAt: activity.nextAttemptAt,
                                    lastFailure: activity.lastFailure.map { "\($0.type): \($0.message)" },
                                    pausedAfterAttempt: activity.pausedAfterAttempt ? true : nil)
            }
            timers = description.pendingTimers.map { TimerView(dueAt: $0.dueAt) }
        }
    }

    /// The transfer `id`'s run: its status and what it waits for (see ``TransferRunView``). Reads
    /// what is committed; sends the transfer nothing.
    /// - Throws: ``BankError``: `notFound`, `invalidID`, `unavailable`.
    func transferRun(_ id: String) throws(BankError) -> TransferRunView {
        TransferRunView(id: id, try describeTransfer(id))
    }

    /// The transfer `id`'s run as ``EntityRuntime/describe(_:)`` tells it.
    /// - Throws: ``BankError``: `notFound` (no transfer was started under that id), `invalidID`, `unavailable`.
    private func describeTransfer(_ id: String) throws(BankError) -> EntityDescription {
        try Self.check(id: id, "transfer id")
        let description: EntityDescription?
        do {
            description = try runtime.describe(EntityName(type: Transfer.entityType, id: id))
        } catch {
            throw Self.bankError(error)
        }
        guard let description, description.status != .idle else { throw BankError(.notFound, "no transfer '\(id)'") }
        return description
    }

    /// What ``retryTransfer(_:)`` made due.
    struct TransferRetryView: Codable, Sendable, Equatable {
        struct Step: Codable, Sendable, Equatable {
            var name: String
            /// The attempt that starts now.
            var attempt: Int
        }
        var transferId: String
        /// The steps that were waiting for their next attempt and start it now (none when nothing
        /// was backing off: a step running, or none in flight).
        var retried: [Step]
    }

    /// Starts now every step of the transfer that waits for its next attempt after a failure,
    /// instead of at the end of its backoff, and resumes the paused ones: what an operator does once
    /// whatever made it fail (the approvers' chat down) is fixed
    /// (``EntityRuntime/retryActivityNow(of:activity:resettingAttempts:)``). A pause made while a
    /// step's attempt runs is withdrawn.
    /// - Throws: ``BankError``: `notFound`, `invalidID`, `unavailable`.
    func retryTransfer(_ id: String) async throws(BankError) -> TransferRetryView {
        let description = try describeTransfer(id)
        let retried = try await changeSteps(of: description) { activity in
            activity.state == .backingOff || activity.state == .paused || activity.pausedAfterAttempt
        } _: { activity throws(EntityError) -> TransferRetryView.Step? in
            // `alreadyDue`: it started on its own meanwhile.
            guard case .retrying(let attempt) = try await runtime.retryActivityNow(of: description.name, activity: activity.id) else { return nil }
            return .init(name: activity.name, attempt: attempt)
        }
        return TransferRetryView(transferId: id, retried: retried)
    }

    /// Applies an operator's `change` to each step of the transfer in flight that `selected` picks,
    /// and collects what it reports; a step that ended meanwhile (`rejected`: nothing is owed to it
    /// any more) is left out.
    private func changeSteps<Step>(of description: EntityDescription,
                                   where selected: (EntityDescription.PendingActivity) -> Bool,
                                   _ change: (EntityDescription.PendingActivity) async throws(EntityError) -> Step?)
        async throws(BankError) -> [Step] {
        var changed: [Step] = []
        for activity in description.pendingActivities where selected(activity) {
            do {
                if let step = try await change(activity) { changed.append(step) }
            } catch {
                if error.code == .rejected { continue }
                throw Self.bankError(error)
            }
        }
        return changed
    }

    /// What ``pauseTransfer(_:)`` paused.
    struct TransferPauseView: Codable, Sendable, Equatable {
        struct Step: Codable, Sendable, Equatable {
            var name: String
            /// The attempt that waits for a retry (or, `afterRunningAttempt`, the one that runs on).
            var attempt: Int
            /// The step's attempt runs: it goes on, and if it fails the step waits for a retry.
            var afterRunningAttempt: Bool
        }
        var transferId: String
        /// The steps in flight, paused (none when nothing is in flight).
        var paused: [Step]
    }

    /// Pauses every step of the transfer in flight: none starts another attempt until
    /// ``retryTransfer(_:)`` (``EntityRuntime/pauseActivity(of:activity:)``). What an operator does
    /// while whatever makes a step fail (the approvers' chat down) is being fixed, so that its
    /// retries stop. A step whose attempt runs is paused after that attempt.
    /// - Throws: ``BankError``: `notFound`, `invalidID`, `unavailable`.
    func pauseTransfer(_ id: String) async throws(BankError) -> TransferPauseView {
        let description = try describeTransfer(id)
        let paused = try await changeSteps(of: description) { $0.state != .cancelRequested } _: { activity throws(EntityError) -> TransferPauseView.Step? in
            switch try await runtime.pauseActivity(of: description.name, activity: activity.id) {
            case .paused(let attempt): .init(name: activity.name, attempt: attempt, afterRunningAttempt: false)
            case .pausedAfterAttempt(let attempt): .init(name: activity.name, attempt: attempt, afterRunningAttempt: true)
            }
        }
        return TransferPauseView(transferId: id, paused: paused)
    }

    /// Waits for the transfer's run body to finish (in-process callers: the demo; HTTP clients poll).
    /// - Returns: its final status (`cancelled` for a run that ended cancelled).
    func awaitTransfer(_ id: String) async throws(BankError) -> Transfer.Status {
        do {
            return try await runtime.entity(Transfer.self, id: id).result()
        } catch where error.code == .cancelled {
            return .cancelled
        } catch {
            throw Self.bankError(error)
        }
    }

    /// Waits until the transfer is no longer `running`: awaiting an approval, or finished.
    /// - Throws: ``BankError`` `notFound`, or `unavailable` when `timeout` passes first.
    func awaitTransferSettled(_ id: String, timeout: Duration = .seconds(30)) async throws(BankError) -> TransferView {
        let settled = Set(Transfer.Status.allCases).subtracting([.new, .running])
        let view = try await transfer(id, waitingFor: settled, timeout: timeout)
        guard view.status != Transfer.Status.running.rawValue else {
            throw BankError(.unavailable, "transfer '\(id)' is still running after \(timeout)")
        }
        return view
    }

    /// The transfer `id` once its status is one of `statuses`, or as it is when `timeout` passes (a
    /// long poll: the runtime resumes the wait when a turn commits the status; nothing polls).
    /// - Throws: ``BankError``: `notFound` (checked first: an unknown transfer is not waited for),
    ///   `invalidID`, `unavailable`.
    func transfer(_ id: String, waitingFor statuses: Set<Transfer.Status>, timeout: Duration) async throws(BankError) -> TransferView {
        let current = try await transfer(id)
        guard let status = Transfer.Status(rawValue: current.status), !statuses.contains(status) else { return current }
        let waited: Result<Transfer.State, EntityError>
        do {
            waited = .success(try await runtime.entity(Transfer.self, id: id).awaitState(timeout: timeout) { statuses.contains($0.status) })
        } catch {
            waited = .failure(error)
        }
        switch waited {
        case .success(let state): return TransferView(id: id, state)
        case .failure(let error) where error.code == EntityError.Code.timedOut: return try await transfer(id)
        case .failure(let error): throw BankError(.unavailable, "waiting for transfer '\(id)' failed: \(error.message)", underlying: error)
        }
    }

    // MARK: Checks and errors

    private static func key(_ requestID: String) -> String { "request:\(requestID)" }

    static func check(id: String, _ what: String) throws(BankError) {
        let allowed = id.utf8.allSatisfy { byte in
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) || ".-_:".utf8.contains(byte)
        }
        guard !id.isEmpty, id.utf8.count <= BankLimits.maxIDBytes, allowed else {
            throw BankError(.invalidID, "\(what) must be 1...\(BankLimits.maxIDBytes) characters of A-Z a-z 0-9 . - _ :")
        }
    }

    static func check(cents: Int64) throws(BankError) {
        guard cents > 0 else { throw BankError(.invalidAmount, "amount must be a positive integer number of cents (got \(cents))") }
    }

    static func check(requestID: String) throws(BankError) {
        guard !requestID.isEmpty, requestID.utf8.count <= BankLimits.maxRequestIDBytes else {
            throw BankError(.invalidRequestID, "requestId must be 1...\(BankLimits.maxRequestIDBytes) bytes")
        }
    }

    /// Runs `body`, turning the runtime's errors into ``BankError``s.
    private func mapped<Value>(_ body: () async throws -> Value) async throws(BankError) -> Value {
        do {
            return try await body()
        } catch let error as EntityError {
            throw Self.bankError(error)
        } catch {
            throw BankError(.unavailable, "the bank cannot answer now; retry with the same requestId", underlying: error)
        }
    }

    private static func bankError(_ error: EntityError) -> BankError {
        switch (error.code, error.underlying) {
        case (.rejected, let refusal as Account.InsufficientFunds):
            return BankError(.insufficientFunds, "the balance is \(refusal.balance) cents, less than \(refusal.requested)", underlying: error)
        case (.rejected, let refusal as Account.InvalidAmount):
            return BankError(.invalidAmount, refusal.reason, underlying: error)
        case (.rejected, let refusal as Transfer.NotAwaitingApproval):
            return BankError(.notAwaitingApproval, "the transfer is \(refusal.status.rawValue), not awaiting approval", underlying: error)
        case (.payloadTooLarge, _), (.unencodablePayload, _):
            return BankError(.invalidRequest, error.message, underlying: error)
        default:
            return BankError(.unavailable, "the bank cannot answer now (\(error.code)); retry with the same requestId", underlying: error)
        }
    }
}
