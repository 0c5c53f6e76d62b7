import Logging

/// What a handler may use besides the state: the entity's identity, and deterministic time,
/// randomness and ids. During replay every value is the same as when the message was first handled.
public struct EntityContext: Sendable {
    /// The entity's id.
    public let id: String
    /// The sequence number the message being handled gets in the entity's history.
    public let sequence: UInt64
    /// The time at which the message was first handled, in nanoseconds since the Unix epoch, from the
    /// runtime's clock. Recorded in the history: a replay sees the same value.
    public let nowNanoseconds: UInt64
    /// Logs with the entity's type and id as metadata.
    public let logger: Logger
    let requests: TurnRequests

    /// Asks the runtime to continue the entity as new at the end of this turn: its state is
    /// snapshotted into a new run, atomically with the turn, and older runs' history is pruned by
    /// the retention policy. Messages that arrive meanwhile go to the new run. (The runtime also does
    /// this on its own past `continueAsNewAfterEvents` events or `continueAsNewAfterBytes` bytes.)
    public func continueAsNew() {
        requests.continueAsNew = true
    }

    /// Sends `signal` to the entity `id` of type `T` once this turn is durable: recorded in the same
    /// commit as the message being handled, delivered after it, exactly once in effect (a crash in
    /// between redelivers it; the receiver records it once), in order per sender and receiver. If the
    /// handler then throws, nothing is sent. A replay does not send again.
    /// - Throws: an encoding error.
    public func signal<T: EntityWorkflow>(_ type: T.Type, id: String, _ signal: T.Signal) throws {
        guard let codec = requests.codec else { return }  // replaying: the message was sent the first time
        requests.outgoing.append((EntityName(type: T.entityType, id: id), try codec.encode(signal)))
    }

    /// A generator seeded by the entity and the sequence: the same numbers on every replay.
    public func randomNumberGenerator() -> DeterministicRandom {
        DeterministicRandom(seed: sequence &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(truncatingIfNeeded: id.hashValueStable))
    }

    /// A UUID-shaped id (version 4 layout) from the deterministic generator, distinct per `index`.
    public func uuid(_ index: UInt64 = 0) -> String {
        var random = DeterministicRandom(seed: (sequence &+ index &* 0x1000_0000_01B3) ^ UInt64(truncatingIfNeeded: id.hashValueStable))
        let high = random.next()
        let low = random.next()
        let bytes = withUnsafeBytes(of: (high.bigEndian, low.bigEndian)) { Array($0) }
        var b = bytes
        b[6] = (b[6] & 0x0F) | 0x40
        b[8] = (b[8] & 0x3F) | 0x80
        let hex = b.map { String($0, radix: 16).leftPadded(to: 2) }
        return "\(hex[0..<4].joined())-\(hex[4..<6].joined())-\(hex[6..<8].joined())-\(hex[8..<10].joined())-\(hex[10..<16].joined())"
    }
}

/// SplitMix64: small, fast, and the same on every platform — what replay needs.
public struct DeterministicRandom: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

extension String {
    /// FNV-1a over the UTF-8 bytes: unlike `hashValue`, the same in every process.
    var hashValueStable: UInt64 {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in utf8 {
            hash ^= UInt64(byte)
            hash &*= 0x100_0000_01B3
        }
        return hash
    }

    func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}

/// What handlers asked of the runtime during one turn. Only touched on the entity's shard thread.
final class TurnRequests: @unchecked Sendable {
    var continueAsNew = false
    /// Signals the handlers sent: (receiver, encoded signal).
    var outgoing: [(EntityName, [UInt8])] = []
    /// The codec for outgoing signals; `nil` while replaying (nothing is sent again).
    let codec: (any EntityCodec)?

    init(codec: (any EntityCodec)? = nil) { self.codec = codec }
}
