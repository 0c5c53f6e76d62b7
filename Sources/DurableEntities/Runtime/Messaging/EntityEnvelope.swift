/// A message from one entity to another: recorded in the sender's commit (a row of the journal's
/// `tasks` table, the *outbox*), delivered to the receiver's mailbox once that commit is durable, and
/// consumed — its row deleted — in the same commit as the receiver's turn that handles it.
///
/// That gives exactly-once in effect without a separate deduplication table: a message is delivered
/// again only while its row exists (at the next open, after a crash between the two commits), and the
/// row disappears atomically with the message's effect. Per sender, rows are keyed by the sender's
/// history sequence, and a sender's turns commit one after another, so deliveries from one sender to
/// one receiver arrive in the order they were sent, live and after a recovery.
struct EntityEnvelope: Sendable, Equatable {
    enum Kind: UInt8, Sendable {
        /// A signal (`payload` = the encoded signal).
        case signal = 1
        /// Start the receiver's run body as a child of the sender (`payload` = the encoded input).
        case startChild = 2
        /// Ask the receiver's run body to cancel (the parent-close policy `requestCancel`, or a parent
        /// cancelling its child).
        case cancel = 3
        /// Terminate the receiver (the parent-close policy `terminate`; `payload` = the reason, UTF-8).
        case terminate = 4
        /// A child's outcome for its parent (`payload` = the encoded output, or `failure`).
        case childOutcome = 5
    }

    var kind: Kind
    var target: EntityName
    var sender: EntityName
    /// The sender's command id: names the child for `startChild` / `cancel` / `childOutcome`.
    var commandID: UInt64
    var payload: [UInt8]
    /// For `childOutcome`: the child's failure; `nil` when it completed.
    var failure: ChildFailure?

    /// The prefix of outbox rows in the journal's `tasks` table.
    static let keyPrefix: UInt8 = 0x6D  // "m"

    /// The outbox row key: the prefix, the sender's key, the sequence of the turn's last event, and the
    /// message's index in that turn — so rows sort by sender, then in sending order.
    static func key(sender: EntityKey, sequence: UInt64, index: Int) -> TaskKey {
        TaskKey(inlineCount: 21) { raw in
            raw[0] = keyPrefix
            raw.storeBytes(of: sender.rawValue.bigEndian, toByteOffset: 1, as: UInt64.self)
            raw.storeBytes(of: sequence.bigEndian, toByteOffset: 9, as: UInt64.self)
            raw.storeBytes(of: UInt32(truncatingIfNeeded: index).bigEndian, toByteOffset: 17, as: UInt32.self)
        }
    }

    /// The sender an outbox row's key names; `nil` for a key of another shape.
    static func sender(ofKey key: UnsafeRawBufferPointer) -> EntityKey? {
        guard key.count == 21, key[0] == keyPrefix else { return nil }
        return EntityKey(rawValue: key.bigEndianUInt64(at: 1))
    }

    // MARK: Encoding (compact and hand-written: the fan-out writes millions of these)

    func encoded() -> [UInt8] {
        var writer = ByteWriter()
        writer.bytes.reserveCapacity(32 + target.type.utf8.count + target.id.utf8.count + sender.type.utf8.count
                                     + sender.id.utf8.count + payload.count)
        writer.append(UInt8(1))  // format version
        writer.append(kind.rawValue)
        writer.append(target.type)
        writer.append(target.id)
        writer.append(sender.type)
        writer.append(sender.id)
        writer.append(commandID)
        writer.append(payload)
        if let failure {
            writer.append(UInt8(1))
            writer.append(failure.encoded())
        } else {
            writer.append(UInt8(0))
        }
        return writer.bytes
    }

    static func decode(_ bytes: [UInt8]) -> EntityEnvelope? {
        var reader = ByteReader(bytes: bytes[...])
        guard reader.byte() == 1, let raw = reader.byte(), let kind = Kind(rawValue: raw),
              let targetType = reader.string(), let targetID = reader.string(),
              let senderType = reader.string(), let senderID = reader.string(),
              let commandID = reader.uint64(), let payload = reader.data(), let hasFailure = reader.byte()
        else { return nil }
        var failure: ChildFailure?
        if hasFailure == 1 {
            guard let data = reader.data(), let decoded = ChildFailure.decode(data) else { return nil }
            failure = decoded
        }
        return EntityEnvelope(kind: kind, target: EntityName(type: targetType, id: targetID),
                              sender: EntityName(type: senderType, id: senderID), commandID: commandID,
                              payload: payload, failure: failure)
    }
}

/// Who started a child: the parent's name and the id of its `startChild` command. A child reports its
/// outcome to every parent linked to its run.
struct ParentLink: Sendable, Hashable {
    var parent: EntityName
    var commandID: UInt64

    func encoded() -> [UInt8] {
        var writer = ByteWriter()
        writer.append(parent.type)
        writer.append(parent.id)
        writer.append(commandID)
        return writer.bytes
    }

    static func decode(_ bytes: some Collection<UInt8>) -> ParentLink? {
        var reader = ByteReader(bytes: ArraySlice(bytes))
        guard let type = reader.string(), let id = reader.string(), let commandID = reader.uint64() else { return nil }
        return ParentLink(parent: EntityName(type: type, id: id), commandID: commandID)
    }
}

/// What happens to a parent's children that are still running when the parent's run ends (completes,
/// fails, is cancelled or terminated).
public enum ParentClosePolicy: UInt8, Sendable, Hashable, Codable {
    /// The child is terminated: it records why and refuses further messages (the default).
    case terminate = 1
    /// The child's run body is asked to cancel (as ``EntityRef/cancel()`` does): its current wait
    /// throws, and it decides what to do (compensate, then finish).
    case requestCancel = 2
    /// The child runs on, on its own.
    case abandon = 3
}

/// A child entity's run ended without an output. Thrown by ``ChildEntity/result()`` and reported by
/// ``WorkflowContext/fanOut(_:_:maxConcurrent:parentClosePolicy:cancellationType:)``.
public struct ChildFailure: Error, Sendable, Hashable, CustomStringConvertible {
    public enum Reason: UInt8, Sendable, Hashable {
        /// The child's run body threw (its message says what).
        case failed = 1
        /// The child was terminated before its run body finished.
        case terminated = 2
        /// The child cannot run as one: its type has no run body, or the input does not decode.
        case rejected = 3
        /// The child was cancelled: its cancellation was requested (by this parent, another caller or
        /// a parent-close policy) and its body let the cancellation end it
        /// (``WorkflowFailure/isCancellation``). A child that caught the request and returned completed.
        case cancelled = 4
    }

    /// The child's name.
    public var child: EntityName
    public var reason: Reason
    public var message: String

    public init(child: EntityName, reason: Reason, message: String) {
        self.child = child
        self.reason = reason
        self.message = message
    }

    public var description: String { "ChildFailure(\(child), \(reason): \(message))" }

    func encoded() -> [UInt8] {
        var writer = ByteWriter()
        writer.append(child.type)
        writer.append(child.id)
        writer.append(reason.rawValue)
        writer.append(message)
        return writer.bytes
    }

    static func decode(_ bytes: some Collection<UInt8>) -> ChildFailure? {
        var reader = ByteReader(bytes: ArraySlice(bytes))
        guard let type = reader.string(), let id = reader.string(), let raw = reader.byte(),
              let reason = Reason(rawValue: raw), let message = reader.string() else { return nil }
        return ChildFailure(child: EntityName(type: type, id: id), reason: reason, message: message)
    }
}

/// Length-prefixed fields, big-endian: the runtime's own small records.
struct ByteWriter {
    var bytes: [UInt8] = []

    mutating func append(_ value: UInt8) { bytes.append(value) }
    mutating func append(_ value: UInt64) { withUnsafeBytes(of: value.bigEndian) { bytes.append(contentsOf: $0) } }
    mutating func append(_ value: [UInt8]) {
        withUnsafeBytes(of: UInt32(value.count).bigEndian) { bytes.append(contentsOf: $0) }
        bytes.append(contentsOf: value)
    }
    mutating func append(_ value: String) {
        let utf8 = value.utf8
        withUnsafeBytes(of: UInt32(utf8.count).bigEndian) { bytes.append(contentsOf: $0) }
        bytes.append(contentsOf: utf8)
    }
}

struct ByteReader {
    var bytes: ArraySlice<UInt8>

    mutating func byte() -> UInt8? { bytes.popFirst() }

    mutating func uint64() -> UInt64? {
        guard bytes.count >= 8 else { return nil }
        var value: UInt64 = 0
        for byte in bytes.prefix(8) { value = value << 8 | UInt64(byte) }
        bytes = bytes.dropFirst(8)
        return value
    }

    private mutating func length() -> Int? {
        guard bytes.count >= 4 else { return nil }
        var value = 0
        for byte in bytes.prefix(4) { value = value << 8 | Int(byte) }
        bytes = bytes.dropFirst(4)
        return value <= bytes.count ? value : nil
    }

    mutating func data() -> [UInt8]? {
        guard let count = length() else { return nil }
        defer { bytes = bytes.dropFirst(count) }
        return Array(bytes.prefix(count))
    }

    mutating func string() -> String? {
        guard let count = length() else { return nil }
        defer { bytes = bytes.dropFirst(count) }
        return String(decoding: bytes.prefix(count), as: UTF8.self)
    }
}
