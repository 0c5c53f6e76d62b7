import Synchronization

/// A stand-in for a payment provider, in memory. Idempotent like a real one: charges are keyed by
/// order id, so a repeated charge returns the first receipt and takes no more money.
///
/// The payment token decides what happens:
///
/// | token | behaviour |
/// | --- | --- |
/// | `tok_decline` | declined: ``PaymentDeclined`` (the saga does not retry it) |
/// | `tok_timeout` | never answers: the attempt runs until its timeout cancels it |
/// | `tok_hold` | waits until ``releaseHeld()``, then approves (the demo crashes the runtime meanwhile) |
/// | anything else | approved |
final class PaymentGateway: Sendable {
    /// What an approved charge returns.
    struct Receipt: Codable, Sendable, Equatable {
        var paymentID: String
        var amountCents: Int64
    }

    /// One order's charge as the provider's books have it.
    struct Charge: Sendable, Equatable {
        var paymentID: String
        var amountCents: Int64
        var refunded = false
    }

    private struct Books {
        var charges: [String: Charge] = [:]
        var attempts = 0
        var released = false
        var held: [CheckedContinuation<Void, Never>] = []
        var heldCount = 0
        var heldWatchers: [(count: Int, continuation: CheckedContinuation<Void, Never>)] = []
        var attemptWatchers: [(count: Int, continuation: CheckedContinuation<Void, Never>)] = []
    }
    private let books = Mutex(Books())

    init() {}

    /// Charges `amountCents` for `orderID` (once per order, whatever the number of calls).
    /// - Throws: ``PaymentDeclined`` for `tok_decline`; `CancellationError` when a `tok_timeout`
    ///   attempt is cancelled.
    func charge(orderID: String, amountCents: Int64, token: String) async throws -> Receipt {
        let ready = books.withLock { books -> [CheckedContinuation<Void, Never>] in
            books.attempts += 1
            let count = books.attempts
            defer { books.attemptWatchers.removeAll { $0.count <= count } }
            return books.attemptWatchers.filter { $0.count <= count }.map(\.continuation)
        }
        for watcher in ready { watcher.resume() }
        switch token {
        case "tok_decline":
            throw PaymentDeclined(message: "card declined (token \(token))")
        case "tok_timeout":
            while true { try await Task.sleep(for: .seconds(3_600)) }  // until the timeout cancels it
        case "tok_hold":
            await waitForRelease()
        default:
            break
        }
        return books.withLock { books in
            if let charge = books.charges[orderID] { return Receipt(paymentID: charge.paymentID, amountCents: charge.amountCents) }
            let charge = Charge(paymentID: "pay-\(books.charges.count + 1)-\(orderID)", amountCents: amountCents)
            books.charges[orderID] = charge
            return Receipt(paymentID: charge.paymentID, amountCents: amountCents)
        }
    }

    /// Refunds the charge of `orderID`; returns the cents refunded (0 when there was no charge, or it
    /// was refunded already).
    func refund(orderID: String) -> Int64 {
        books.withLock { books in
            guard let charge = books.charges[orderID], !charge.refunded else { return 0 }
            books.charges[orderID]?.refunded = true
            return charge.amountCents
        }
    }

    /// The charge of `orderID`, if any.
    func charge(of orderID: String) -> Charge? { books.withLock { $0.charges[orderID] } }

    /// How many charge calls arrived (retries and repeats included).
    var attempts: Int { books.withLock { $0.attempts } }

    /// Lets every `tok_hold` charge, waiting or to come, proceed.
    func releaseHeld() {
        let held = books.withLock { books in
            books.released = true
            defer { books.held = [] }
            return books.held
        }
        for continuation in held { continuation.resume() }
    }

    /// Returns once `count` charge attempts in all have arrived (whatever their token).
    func waitUntilAttempts(_ count: Int) async {
        await withCheckedContinuation { continuation in
            let ready = books.withLock { books -> Bool in
                if books.attempts >= count { return true }
                books.attemptWatchers.append((count, continuation))
                return false
            }
            if ready { continuation.resume() }
        }
    }

    /// Returns once `count` `tok_hold` charges in all have arrived.
    func waitUntilHeld(count: Int = 1) async {
        await withCheckedContinuation { continuation in
            let ready = books.withLock { books -> Bool in
                if books.heldCount >= count { return true }
                books.heldWatchers.append((count, continuation))
                return false
            }
            if ready { continuation.resume() }
        }
    }

    private func waitForRelease() async {
        await withCheckedContinuation { continuation in
            let (proceed, watchers) = books.withLock { books -> (Bool, [CheckedContinuation<Void, Never>]) in
                books.heldCount += 1
                let count = books.heldCount
                let ready = books.heldWatchers.filter { $0.count <= count }.map(\.continuation)
                books.heldWatchers.removeAll { $0.count <= count }
                if !books.released { books.held.append(continuation) }
                return (books.released, ready)
            }
            for watcher in watchers { watcher.resume() }
            if proceed { continuation.resume() }
        }
    }
}

/// The payment provider declined the charge. Not retried.
struct PaymentDeclined: Error, Sendable, CustomStringConvertible {
    let message: String
    var description: String { message }
}
