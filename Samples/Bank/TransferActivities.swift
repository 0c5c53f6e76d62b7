import DurableEntities
import Synchronization

/// One money move of a transfer: `cents` into or out of `account`, as the transfer's step `step`
/// (`withdraw`, `deposit` or `refund`), which names its idempotency key.
struct Posting: Codable, Sendable {
    var account: String
    var cents: Int64
    var step: String
}

/// What a money move came to. A refusal is an answer, not a failure: it is recorded and never retried.
enum PostingOutcome: Codable, Sendable {
    /// Done; the account's balance right after it.
    case posted(balance: Int64)
    /// The account refused it (`insufficient_funds`, `invalid_amount`); nothing moved.
    case refused(reason: String)
}

/// The runtime that the activities call, set once it has opened. Weak: the runtime holds the
/// activities, which must not keep it alive.
final class RuntimeLink: Sendable {
    private weak let runtime: EntityRuntime?

    init(_ runtime: EntityRuntime) { self.runtime = runtime }

    /// The account `id`.
    /// - Throws: ``BankError`` `unavailable` once the runtime is gone (the attempt is retried after a restart).
    func account(_ id: String) throws(BankError) -> EntityRef<Account> {
        guard let runtime else { throw BankError(.unavailable, "the runtime is closed") }
        return runtime.entity(Account.self, id: id)
    }
}

extension Posting {
    /// The idempotency key of this move at the account: the same on every attempt of the activity,
    /// after any crash, so the money moves at most once.
    func idempotencyKey(transfer: String) -> String { "transfer:\(transfer):\(step)" }
}

/// Takes a transfer's amount from its `from` account: an ``Account`` withdrawal update keyed by the
/// transfer id. Refused (insufficient funds) is an outcome; only transient errors throw (and retry).
struct WithdrawFromAccount: Activity {
    let link: RuntimeLink

    static var name: String { "bank.withdraw" }

    func run(_ input: Posting, context: ActivityContext) async throws -> PostingOutcome {
        let key = input.idempotencyKey(transfer: context.entity.id)
        do {
            return .posted(balance: try await link.account(input.account).withdraw(cents: input.cents, ref: key, idempotencyKey: key))
        } catch let error as EntityError where error.code == .rejected {
            return .refused(reason: error.underlying is Account.InsufficientFunds ? "insufficient_funds" : "invalid_amount")
        }
    }
}

/// Puts a transfer's amount into an account (`to`, or `from` for a refund): an ``Account`` deposit
/// update keyed by the transfer id and the step.
struct DepositToAccount: Activity {
    let link: RuntimeLink

    static var name: String { "bank.deposit" }

    func run(_ input: Posting, context: ActivityContext) async throws -> PostingOutcome {
        let key = input.idempotencyKey(transfer: context.entity.id)
        do {
            return .posted(balance: try await link.account(input.account).depositReturningBalance(cents: input.cents, ref: key, idempotencyKey: key))
        } catch let error as EntityError where error.code == .rejected {
            return .refused(reason: "invalid_amount")
        }
    }
}

/// What the approvers are reminded of: a transfer still waiting for their decision.
struct ApprovalReminder: Codable, Sendable, Equatable {
    var transfer: String
    var from: String
    var to: String
    /// Cents.
    var amount: Int64
    /// When the transfer began waiting (ns since the Unix epoch, the runtime's clock).
    var waitingSince: UInt64
}

/// Reminds the approvers that a transfer still waits for them. The sample logs it and hands it to
/// `deliver` (the bank's `onReminder`; a real bank would send an email or a chat message here, with
/// `context.idempotencyKey` so that a retried attempt does not send it twice).
struct RemindApprovers: Activity {
    /// Throws when the reminder cannot be delivered now (the approvers' chat is down): the attempt
    /// fails and the retry policy tries again.
    let deliver: @Sendable (ApprovalReminder) throws -> Void

    static var name: String { "bank.remindApprovers" }

    func run(_ input: ApprovalReminder, context: ActivityContext) async throws -> Bool {
        context.logger.notice("transfer \(input.transfer) still waits for an approval", metadata: [
            "from": "\(input.from)", "to": "\(input.to)", "amount": "\(Money.format(input.amount))",
            "idempotencyKey": "\(context.idempotencyKey)",
        ])
        try deliver(input)
        return true
    }
}
