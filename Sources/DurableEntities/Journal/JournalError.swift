import LMDB

/// An error from the journal. Switch on ``code``; the description names the entity, the sequence
/// number and what to do.
public struct JournalError: Error, Sendable, CustomStringConvertible {
    /// The error's kind. Extensible: new codes may be added.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        fileprivate enum Base: Hashable, Sendable {
            case nonConsecutiveSequence, corruptedRecord, unknownEntity, payloadTooLarge
            case nameTooLong, alreadyOpen, closed, storage, unsupportedFormat, conflict
        }
        fileprivate let base: Base
        fileprivate init(_ base: Base) { self.base = base }

        /// An append's sequence number is not the entity's latest plus one. Nothing was written.
        public static let nonConsecutiveSequence = Code(.nonConsecutiveSequence)
        /// A stored record fails its checksum or cannot be parsed.
        public static let corruptedRecord = Code(.corruptedRecord)
        /// The entity key was never registered.
        public static let unknownEntity = Code(.unknownEntity)
        /// A payload is larger than `maxPayloadBytes`.
        public static let payloadTooLarge = Code(.payloadTooLarge)
        /// Entity type plus id exceed 510 UTF-8 bytes.
        public static let nameTooLong = Code(.nameTooLong)
        /// The directory is already open by another journal (this process or another).
        public static let alreadyOpen = Code(.alreadyOpen)
        /// The journal is closed.
        public static let closed = Code(.closed)
        /// LMDB failed (see ``JournalError/underlying``); the whole commit was rolled back.
        public static let storage = Code(.storage)
        /// The directory was written in a format this version cannot read (by a newer version of the
        /// library). The open changed nothing.
        public static let unsupportedFormat = Code(.unsupportedFormat)
        /// A batch's expectation (``JournalBatch/expectTask(_:value:)``,
        /// ``JournalBatch/expectTimer(dueNanoseconds:entity:id:)``) did not hold: the row changed
        /// since it was read. Nothing of the batch was written; read again and decide again.
        public static let conflict = Code(.conflict)

        public var description: String { "\(base)" }
    }

    public let code: Code
    /// The entity concerned, when there is one.
    public let entity: EntityName?
    /// Its internal key, when known.
    public let entityKey: EntityKey?
    /// The event's sequence number, when there is one.
    public let sequence: UInt64?
    /// What happened and what to do.
    public let message: String
    /// The cause, such as an ``LMDBError``.
    public let underlying: (any Error)?

    init(_ code: Code, entity: EntityName? = nil, key: EntityKey? = nil, sequence: UInt64? = nil,
         _ message: String, underlying: (any Error)? = nil) {
        self.code = code
        self.entity = entity
        self.entityKey = key
        self.sequence = sequence
        self.message = message
        self.underlying = underlying
    }

    static func storage(_ error: any Error, _ doing: String) -> JournalError {
        if let error = error as? JournalError { return error }
        return JournalError(.storage, "storage failed while \(doing): \(error)", underlying: error)
    }

    public var description: String {
        var parts = ["JournalError.\(code)"]
        if let entity { parts.append("entity \(entity)") } else if let entityKey { parts.append("entity \(entityKey)") }
        if let sequence { parts.append("sequence \(sequence)") }
        return parts.joined(separator: " ") + ": " + message
    }
}
