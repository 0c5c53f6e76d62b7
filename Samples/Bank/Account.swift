import DurableEntities

/// A bank account as a durable entity: a balance in integer cents, changed by deposits (signals) and
/// withdrawals (updates), and rebuilt after a restart or a crash by replaying its history.
///
/// - Money is `Int64` **cents**, never `Double`: $1.10 is `110`, and no rounding ever happens.
/// - A **deposit** is a *signal*: one-way, nothing to decide against the balance. It returns once it
///   is durable.
/// - A **withdrawal** is an *update*: it is first *validated* against the balance (too little money
///   refuses it, and nothing is recorded), then applied and recorded, and the new balance comes back.
///   A deposit can be sent as an update too, when the caller wants the resulting balance recorded
///   with its idempotency key (the HTTP service and the transfers do).
/// - Every operation carries a `ref`: the caller's name for it (a payment id, a request id). The
///   ``DurableEntities/EntityRef`` helpers below send it as the **idempotency key** too, so a client
///   that resends an operation after a timeout or a crash moves the money at most once.
///
/// Handlers must be deterministic: they see only the state, the message and the ``EntityContext``.
/// The runtime calls them again, with the same messages, when it replays the history after a restart.
///
/// ## Usage
/// ```swift
/// let alice = runtime.entity(Account.self, id: "alice")
/// try await alice.deposit(cents: 10_000, ref: "dep-1")                // $100.00, returns once durable
/// let balance = try await alice.withdraw(cents: 2_500, ref: "wd-1")   // 7_500
/// do {
///     _ = try await alice.withdraw(cents: 1_000_000, ref: "wd-2")
/// } catch {
///     // error.code == .rejected, error.underlying is Account.InsufficientFunds; nothing was recorded
/// }
/// ```
struct Account: EntityWorkflow {
    /// What is durable about an account. Snapshots store it; queries read it.
    struct State: Codable, Sendable, Equatable {
        /// The balance in cents. Never negative: withdrawals that would overdraw are refused.
        var balance: Int64 = 0
        /// How many deposits and withdrawals were recorded.
        var operations: Int = 0
        /// The refs of the last ``Account/recentRefsKept`` operations, oldest first (for display and
        /// audit; the runtime's idempotency keys are what deduplicate).
        var recentRefs: [String] = []
    }

    /// The one-way messages an account accepts.
    enum Signal: Codable, Sendable {
        /// Adds `cents` (> 0) to the balance. `ref` names the operation.
        case deposit(cents: Int64, ref: String)
    }

    /// The request/response messages an account answers.
    enum Update: Codable, Sendable {
        /// Takes `cents` (> 0, at most the balance) from the balance; returns the new balance.
        case withdraw(cents: Int64, ref: String)
        /// Adds `cents` (> 0), like the deposit signal, but returns the new balance. The runtime records
        /// that result with the idempotency key, so a retry gets the first answer back, not today's
        /// balance: what the HTTP service needs to give a retried request its original response.
        case deposit(cents: Int64, ref: String)
    }

    /// What an accepted update returns: the new balance in cents.
    typealias UpdateResult = Int64

    /// How many operation refs ``State/recentRefs`` keeps.
    static let recentRefsKept = 5

    /// Pinned rather than derived from the Swift type's name: renaming the type must not orphan the
    /// accounts already stored.
    static var entityType: String { "Account" }

    /// A withdrawal asked for more than the balance. The sender gets it as the
    /// ``EntityError/underlying`` of an ``EntityError`` with code `rejected`; nothing was recorded.
    struct InsufficientFunds: Error, CustomStringConvertible {
        /// The balance when the withdrawal was refused, in cents.
        let balance: Int64
        /// The amount asked for, in cents.
        let requested: Int64

        var description: String {
            "InsufficientFunds(balance: \(Money.format(balance)), requested: \(Money.format(requested)))"
        }
    }

    /// An amount that no operation accepts: zero, negative, or one that would overflow the balance.
    /// Delivered like ``InsufficientFunds``; nothing was recorded.
    struct InvalidAmount: Error, CustomStringConvertible {
        /// The amount given, in cents.
        let cents: Int64
        /// Why it was refused.
        let reason: String

        var description: String { "InvalidAmount(\(Money.format(cents)): \(reason))" }
    }

    static func initialState(id: String) -> State { State() }

    /// Applies a deposit.
    /// - Throws: ``InvalidAmount`` for a non-positive amount or one that would overflow the balance
    ///   (the deposit is refused and nothing is recorded).
    static func handle(_ signal: Signal, state: inout State, context: EntityContext) throws {
        switch signal {
        case .deposit(let cents, let ref):
            guard cents > 0 else { throw InvalidAmount(cents: cents, reason: "a deposit must be positive") }
            let (balance, overflow) = state.balance.addingReportingOverflow(cents)
            guard !overflow else { throw InvalidAmount(cents: cents, reason: "the balance would overflow") }
            state.balance = balance
            state.record(ref)
        }
    }

    /// Checks an update against the balance, without changing anything.
    /// - Throws: ``InvalidAmount`` for a non-positive amount (or a deposit that would overflow),
    ///   ``InsufficientFunds`` when the balance is lower than a withdrawal.
    static func validate(_ update: Update, state: State) throws {
        switch update {
        case .withdraw(let cents, _):
            guard cents > 0 else { throw InvalidAmount(cents: cents, reason: "a withdrawal must be positive") }
            guard cents <= state.balance else { throw InsufficientFunds(balance: state.balance, requested: cents) }
        case .deposit(let cents, _):
            guard cents > 0 else { throw InvalidAmount(cents: cents, reason: "a deposit must be positive") }
            guard !state.balance.addingReportingOverflow(cents).overflow else {
                throw InvalidAmount(cents: cents, reason: "the balance would overflow")
            }
        }
    }

    /// Applies a validated update. Also runs on replay, where validation is not repeated: it
    /// succeeded when the update was first recorded, against the same state.
    /// - Returns: the new balance in cents.
    static func apply(_ update: Update, state: inout State, context: EntityContext) throws -> Int64 {
        switch update {
        case .withdraw(let cents, let ref):
            state.balance -= cents
            state.record(ref)
            return state.balance
        case .deposit(let cents, let ref):
            state.balance += cents
            state.record(ref)
            return state.balance
        }
    }
}

extension Account.State {
    /// Counts an operation and remembers its ref among the last few.
    fileprivate mutating func record(_ ref: String) {
        operations += 1
        recentRefs.append(ref)
        if recentRefs.count > Account.recentRefsKept { recentRefs.removeFirst(recentRefs.count - Account.recentRefsKept) }
    }
}

extension EntityRef where W == Account {
    /// Deposits `cents` into the account; returns once the deposit is durable.
    ///
    /// `ref` is sent as the idempotency key: depositing again with the same `ref` (a retry after an
    /// unclear outcome) records nothing new.
    /// - Parameters:
    ///   - cents: the amount, in cents; must be positive.
    ///   - ref: the caller's unique name for this deposit.
    /// - Throws: ``EntityError``; code `rejected` with ``Account/InvalidAmount`` as its `underlying`
    ///   for a bad amount. Nothing is recorded when it throws.
    func deposit(cents: Int64, ref: String) async throws(EntityError) {
        try await signal(.deposit(cents: cents, ref: ref), idempotencyKey: ref)
    }

    /// Withdraws `cents` from the account; returns the new balance once the withdrawal is durable.
    ///
    /// `ref` is sent as the idempotency key (unless `idempotencyKey` is given): withdrawing again with
    /// the same key returns the first withdrawal's result and takes nothing more.
    /// - Parameters:
    ///   - cents: the amount, in cents; must be positive and at most the balance.
    ///   - ref: the caller's unique name for this withdrawal.
    ///   - idempotencyKey: the key that deduplicates retries; `nil` uses `ref`.
    /// - Returns: the balance after the withdrawal, in cents.
    /// - Throws: ``EntityError``; code `rejected` with ``Account/InsufficientFunds`` or
    ///   ``Account/InvalidAmount`` as its `underlying`. Nothing is recorded when it throws.
    func withdraw(cents: Int64, ref: String, idempotencyKey: String? = nil) async throws(EntityError) -> Int64 {
        try await update(.withdraw(cents: cents, ref: ref), idempotencyKey: idempotencyKey ?? ref)
    }

    /// Deposits `cents` as an update; returns the balance right after it, once durable.
    ///
    /// Resending with the same `idempotencyKey` returns that same balance and adds nothing.
    /// - Parameters:
    ///   - cents: the amount, in cents; must be positive.
    ///   - ref: the caller's name for this deposit (kept in ``Account/State/recentRefs``).
    ///   - idempotencyKey: the key that deduplicates retries.
    /// - Throws: ``EntityError``; code `rejected` with ``Account/InvalidAmount`` as its `underlying`.
    func depositReturningBalance(cents: Int64, ref: String, idempotencyKey: String) async throws(EntityError) -> Int64 {
        try await update(.deposit(cents: cents, ref: ref), idempotencyKey: idempotencyKey)
    }

    /// The account's committed state: every acknowledged operation is in it.
    func state() async throws(EntityError) -> Account.State {
        try await query { $0 }
    }
}
