/// Why the bank refused a request. Switch on ``code``; its ``Code/name`` is the HTTP API's `"error"`
/// field, ``message`` its `"message"`. Nothing changed when a request fails with one of these.
struct BankError: Error, Sendable, CustomStringConvertible {
    /// The kind of refusal. Extensible: new codes may be added.
    struct Code: Hashable, Sendable, CustomStringConvertible {
        fileprivate enum Base: String, Hashable, Sendable {
            case malformedJSON = "malformed_json"
            case invalidAmount = "invalid_amount"
            case invalidRequestID = "invalid_request_id"
            case invalidID = "invalid_id"
            case invalidRequest = "invalid_request"
            case bodyTooLarge = "body_too_large"
            case notFound = "not_found"
            case insufficientFunds = "insufficient_funds"
            case notAwaitingApproval = "not_awaiting_approval"
            case transferConflict = "transfer_conflict"
            case transferFinished = "transfer_finished"
            case unavailable = "unavailable"
        }
        fileprivate let base: Base

        /// The body is not JSON, or not a JSON object.
        static let malformedJSON = Code(base: .malformedJSON)
        /// An amount that is missing, not an integer number of cents, zero or negative.
        static let invalidAmount = Code(base: .invalidAmount)
        /// A `requestId` that is missing, empty or longer than ``BankLimits/maxRequestIDBytes``.
        static let invalidRequestID = Code(base: .invalidRequestID)
        /// An account or transfer id that is empty, too long or has characters outside `[A-Za-z0-9._:-]`.
        static let invalidID = Code(base: .invalidID)
        /// Another field is missing or of the wrong type, or the request makes no sense (a transfer to itself).
        static let invalidRequest = Code(base: .invalidRequest)
        /// The body is larger than ``BankLimits/maxBodyBytes``.
        static let bodyTooLarge = Code(base: .bodyTooLarge)
        /// No such transfer (or route).
        static let notFound = Code(base: .notFound)
        /// The account holds less than the withdrawal asks.
        static let insufficientFunds = Code(base: .insufficientFunds)
        /// An approval or rejection for a transfer that is not awaiting one.
        static let notAwaitingApproval = Code(base: .notAwaitingApproval)
        /// A `transferId` already used for a transfer with other accounts or another amount.
        static let transferConflict = Code(base: .transferConflict)
        /// A cancellation of a transfer that has already finished (its status says how).
        static let transferFinished = Code(base: .transferFinished)
        /// The runtime is closed or its storage failed; retry later with the same `requestId`.
        static let unavailable = Code(base: .unavailable)

        /// The name clients see, such as `insufficient_funds`.
        var name: String { base.rawValue }
        var description: String { name }
    }

    let code: Code
    /// What was wrong, for a person to read.
    let message: String
    /// The runtime's error behind it, if any.
    let underlying: (any Error)?

    init(_ code: Code, _ message: String, underlying: (any Error)? = nil) {
        self.code = code
        self.message = message
        self.underlying = underlying
    }

    var description: String { "BankError.\(code): \(message)" }
}

/// The bank's input limits.
enum BankLimits {
    /// The largest request body accepted (bigger ones get 413).
    static let maxBodyBytes = 16 * 1024
    /// The longest `requestId`, in UTF-8 bytes.
    static let maxRequestIDBytes = 200
    /// The longest account or transfer id, in UTF-8 bytes.
    static let maxIDBytes = 100
}
