/// An error from the entity runtime, naming the entity and, where there is one, the history event.
/// Switch on ``code``.
public struct EntityError: Error, Sendable, CustomStringConvertible {
    /// The error's kind. Extensible: new codes may be added.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        fileprivate enum Base: Hashable, Sendable {
            case unknownEntityType, undecodablePayload, unencodablePayload, payloadTooLarge, rejected
            case terminated, failedOnReplay, nondeterminism, storage, closed, timedOut, invalidArgument, cancelled
        }
        fileprivate let base: Base
        fileprivate init(_ base: Base) { self.base = base }

        /// No entity type of that name is registered with the runtime.
        public static let unknownEntityType = Code(.unknownEntityType)
        /// A payload (sent, or read from history) does not decode as the entity type's message or state.
        public static let undecodablePayload = Code(.undecodablePayload)
        /// A message could not be encoded.
        public static let unencodablePayload = Code(.unencodablePayload)
        /// A payload exceeds the runtime's limit.
        public static let payloadTooLarge = Code(.payloadTooLarge)
        /// The entity's handler or validator refused the message; nothing was recorded.
        public static let rejected = Code(.rejected)
        /// The entity was terminated; it accepts no more messages.
        public static let terminated = Code(.terminated)
        /// Replaying the entity's history failed; the entity is marked failed and its history kept.
        public static let failedOnReplay = Code(.failedOnReplay)
        /// Workflow code issued other commands than its history recorded.
        public static let nondeterminism = Code(.nondeterminism)
        /// The journal failed; see ``EntityError/underlying``.
        public static let storage = Code(.storage)
        /// The runtime is closed.
        public static let closed = Code(.closed)
        /// A wait (``EntityRef/awaitState(timeout:where:)``) ran out of time; nothing was recorded.
        public static let timedOut = Code(.timedOut)
        /// An argument is outside its valid range (an activity's retry policy or timeouts, …); the call
        /// did nothing and recorded nothing.
        public static let invalidArgument = Code(.invalidArgument)

        /// The run was cancelled: its cancellation was requested and its body let the cancellation
        /// end it (``WorkflowFailure/isCancellation``; the ``WorkflowFailure`` is the ``EntityError/underlying``).
        public static let cancelled = Code(.cancelled)

        public var description: String { "\(base)" }
    }

    public let code: Code
    /// The entity concerned.
    public let entity: EntityName?
    /// The history event concerned, when there is one.
    public let sequence: UInt64?
    /// What happened and what to do.
    public let message: String
    /// The cause: the handler's error for `rejected`, a `DecodingError`, a ``JournalError``, …
    public let underlying: (any Error)?

    init(_ code: Code, entity: EntityName?, sequence: UInt64? = nil, _ message: String, underlying: (any Error)? = nil) {
        self.code = code
        self.entity = entity
        self.sequence = sequence
        self.message = message
        self.underlying = underlying
    }

    public var description: String {
        var text = "EntityError.\(code)"
        if let entity { text += " entity \(entity)" }
        if let sequence { text += " event \(sequence)" }
        text += ": \(message)"
        if let underlying { text += " (\(underlying))" }
        return text
    }
}
