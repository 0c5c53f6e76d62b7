import Foundation

/// A compact, self-describing binary codec: several times faster than ``JSONEntityCodec`` and
/// tolerant of schema changes the way JSON is.
///
/// Every value carries a one-byte type tag and every keyed container stores its keys, so a later
/// version of the code can read what an earlier one wrote: fields added later as `Optional` decode
/// as `nil` when absent, keys the reader does not know are skipped, and field order does not matter.
/// Integers of any width and signedness read into any integer type they fit; integral floating
/// point values read into integers and integers into floating point. Malformed or truncated input
/// throws `DecodingError`; it never traps.
///
/// It also decodes the JSON ``JSONEntityCodec`` writes (recognized by its first byte), so a runtime
/// can switch codecs and still replay the histories it already has.
///
/// ## Format
///
/// A message is the byte `0xB1` (format version 1) followed by one value. A value is a tag byte and
/// its payload; "varint" is unsigned LEB128:
///
/// | tag    | value                | payload                                                     |
/// |--------|----------------------|-------------------------------------------------------------|
/// | `0x00` | nil                  | none                                                        |
/// | `0x01` | false                | none                                                        |
/// | `0x02` | true                 | none                                                        |
/// | `0x03` | signed integer       | zigzag varint                                               |
/// | `0x04` | unsigned integer     | varint                                                      |
/// | `0x05` | Float                | 4 bytes, IEEE 754 bits, little-endian                       |
/// | `0x06` | Double (and Date)    | 8 bytes, IEEE 754 bits, little-endian                       |
/// | `0x07` | String               | varint n, n bytes of UTF-8                                  |
/// | `0x08` | bytes (`[UInt8]`, `Data`) | varint n, n bytes                                      |
/// | `0x09` | keyed container      | varint L, then L bytes: varint count, count × (key, value)  |
/// | `0x0A` | unkeyed container    | varint L, then L bytes: varint count, count × value         |
/// | `0x0B` | Optional wrapper     | a value (only where an `Optional` holds an `Optional`)      |
///
/// A key is a varint n and n bytes of UTF-8 (the coding key's `stringValue`). The byte length `L`
/// lets a reader skip a container it does not need without parsing it. The keys of a dictionary are
/// sorted (by their UTF-8 bytes), so equal dictionaries encode to equal bytes; a struct's keys stay
/// in the order its `encode(to:)` writes them.
public struct BinaryEntityCodec: EntityCodec {
    public init() {}

    public func encode<Value: Encodable>(_ value: Value) throws -> [UInt8] {
        try BinaryEncoderState.encodeMessage(value)
    }

    public func decode<Value: Decodable>(_ type: Value.Type, from bytes: UnsafeRawBufferPointer) throws -> Value {
        try BinaryDecoderState.decodeMessage(type, from: bytes)
    }
}

// MARK: - Format constants

enum BinaryFormat {
    /// The first byte of every message: the format, version 1. Never the first byte of JSON text.
    static let marker: UInt8 = 0xB1

    static let null: UInt8 = 0x00
    static let falseValue: UInt8 = 0x01
    static let trueValue: UInt8 = 0x02
    static let signed: UInt8 = 0x03
    static let unsigned: UInt8 = 0x04
    static let float: UInt8 = 0x05
    static let double: UInt8 = 0x06
    static let string: UInt8 = 0x07
    static let bytes: UInt8 = 0x08
    static let keyed: UInt8 = 0x09
    static let unkeyed: UInt8 = 0x0A
    static let some: UInt8 = 0x0B

    /// What a tag holds, for error messages.
    static func describe(_ tag: UInt8) -> String {
        switch tag {
        case null: "nil"
        case falseValue, trueValue: "a Bool"
        case signed: "a signed integer"
        case unsigned: "an unsigned integer"
        case float: "a Float"
        case double: "a Double"
        case string: "a String"
        case bytes: "bytes"
        case keyed: "a keyed container"
        case unkeyed: "an unkeyed container"
        case some: "an Optional"
        default: "unknown tag 0x\(String(tag, radix: 16))"
        }
    }

    /// Whether `byte` can begin the JSON text ``JSONEntityCodec`` writes (or JSON text in general).
    static func beginsJSON(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "{"), UInt8(ascii: "["), UInt8(ascii: "\""), UInt8(ascii: "-"),
             UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "t"), UInt8(ascii: "f"), UInt8(ascii: "n"),
             0x20, 0x09, 0x0A, 0x0D, 0xEF:
            true
        default:
            false
        }
    }

    @inline(__always)
    static func appendVarint(_ value: UInt64, to out: inout [UInt8]) {
        var value = value
        while value >= 0x80 {
            out.append(UInt8(truncatingIfNeeded: value) | 0x80)
            value >>= 7
        }
        out.append(UInt8(truncatingIfNeeded: value))
    }

    @inline(__always)
    static func varintSize(_ value: Int) -> Int {
        var value = UInt64(value)
        var size = 1
        while value >= 0x80 {
            value >>= 7
            size += 1
        }
        return size
    }

    @inline(__always)
    static func zigzag(_ value: Int64) -> UInt64 {
        UInt64(bitPattern: (value << 1) ^ (value >> 63))
    }

    @inline(__always)
    static func unzigzag(_ raw: UInt64) -> Int64 {
        Int64(bitPattern: (raw >> 1) ^ (0 &- (raw & 1)))
    }

    /// Sorts the entries of a keyed container's body, `out[start..<end]`, by key bytes. Leaves the
    /// bytes as they are if they do not parse (they always do: the encoder wrote them).
    static func sortEntries(_ out: inout [UInt8], from start: Int, to end: Int) {
        typealias Entry = (keyStart: Int, keyLength: Int, entryStart: Int, entryEnd: Int)
        var entries: [Entry] = []
        let parsed: Bool = out.withUnsafeBytes { raw in
            guard let base = raw.baseAddress else { return false }
            let reader = BinaryReader(base: base)
            var position = start
            do {
                while position < end {
                    let entryStart = position
                    let keyLength = try reader.length(&position, limit: end, path: [])
                    let keyStart = position
                    position = try reader.skipValue(at: keyStart + keyLength, limit: end, path: [])
                    entries.append((keyStart, keyLength, entryStart, position))
                }
            } catch {
                return false
            }
            return true
        }
        guard parsed, entries.count > 1 else { return }
        var sorted = entries
        out.withUnsafeBytes { raw in
            guard let base = raw.baseAddress else { return }
            func precedes(_ a: Entry, _ b: Entry) -> Bool {
                let common = min(a.keyLength, b.keyLength)
                let order = common == 0 ? 0 : memcmp(base + a.keyStart, base + b.keyStart, common)
                return order != 0 ? order < 0 : a.keyLength < b.keyLength
            }
            if zip(entries, entries.dropFirst()).allSatisfy({ !precedes($1, $0) }) { return }
            sorted.sort(by: precedes)
        }
        guard sorted.map(\.entryStart) != entries.map(\.entryStart) else { return }
        var body: [UInt8] = []
        body.reserveCapacity(end - start)
        for entry in sorted { body.append(contentsOf: out[entry.entryStart..<entry.entryEnd]) }
        out.replaceSubrange(start..<end, with: body)
    }
}

/// `Optional`, recognizable from a generic context.
protocol BinaryOptionalMarker {}
extension Optional: BinaryOptionalMarker {}

// MARK: - Coding paths

/// A coding key of a path, linked to its parent; allocated only for paths two or more keys deep.
final class BinaryPathNode {
    let key: any CodingKey
    let parent: BinaryPathNode?

    init(key: any CodingKey, parent: BinaryPathNode?) {
        self.key = key
        self.parent = parent
    }
}

/// A coding path, built into an array only when asked for (errors, `codingPath`).
struct BinaryCodingPath {
    var parent: BinaryPathNode?
    var key: (any CodingKey)?

    static var root: BinaryCodingPath { BinaryCodingPath(parent: nil, key: nil) }

    func appending(_ next: (any CodingKey)?) -> BinaryCodingPath {
        guard let next else { return self }
        guard let key else { return BinaryCodingPath(parent: parent, key: next) }
        return BinaryCodingPath(parent: BinaryPathNode(key: key, parent: parent), key: next)
    }

    var keys: [any CodingKey] {
        var keys: [any CodingKey] = []
        var node = parent
        while let current = node {
            keys.append(current.key)
            node = current.parent
        }
        keys.reverse()
        if let key { keys.append(key) }
        return keys
    }
}

struct BinaryIndexKey: CodingKey {
    let index: Int
    init(_ index: Int) { self.index = index }
    init?(stringValue: String) { nil }
    init?(intValue: Int) { self.index = intValue }
    var stringValue: String { "Index \(index)" }
    var intValue: Int? { index }
}

struct BinarySuperKey: CodingKey {
    init() {}
    init?(stringValue: String) { guard stringValue == "super" else { return nil } }
    init?(intValue: Int) { nil }
    var stringValue: String { "super" }
    var intValue: Int? { nil }
}

// MARK: - Encoding

/// Thrown inside the streaming encoder when containers are used out of nesting order; the message
/// is then encoded again by the general (isolated) encoder. Never escapes ``BinaryEntityCodec``.
struct BinaryEncodingRestart: Error {}

/// The encoder, and the state of one message being encoded.
///
/// The fast ("streaming") mode writes every container in place in one buffer and keeps the open
/// containers on a stack: a write into an outer container closes the inner ones (fixing up their
/// length and count). That covers every synthesized `Codable` and nearly all hand-written ones. When
/// code uses containers out of that order (writes into a container after a sibling was opened, uses
/// `superEncoder`), the message is encoded again in isolated mode: each nested value gets its own
/// state and buffer, spliced into its parent at the end.
///
/// It is its own `Encoder`: `slot` says where the value being encoded goes. Nested values save and
/// restore it, so encoding a nested value allocates nothing but its containers.
final class BinaryEncoderState: Encoder {
    struct Frame {
        var start: Int
        var count: Int
        var generation: UInt32
        var sortsKeys: Bool
    }

    /// Where a value goes: at `start`, inside the container at `parentDepth` (-1: the message root;
    /// -2: nowhere, a failed container).
    struct Slot {
        var parentDepth: Int32
        var parentGeneration: UInt32
        var start: Int

        static func root(at start: Int) -> Slot { Slot(parentDepth: -1, parentGeneration: 0, start: start) }
        static let dead = Slot(parentDepth: -2, parentGeneration: 0, start: -1)
    }

    var buffer: [UInt8] = []
    /// Open containers, outermost first. In isolated mode at most one: the state's own root.
    var frames: [Frame] = []
    var nextGeneration: UInt32 = 1
    let isolated: Bool
    /// Isolated mode: nested values, to be spliced in at their offsets in `buffer`.
    var children: [(offset: Int, state: BinaryEncoderState)] = []

    var slot: Slot
    var slotBase: BinaryCodingPath
    var slotKey: (any CodingKey)?

    /// Streaming mode: containers were used out of order; encode again in isolated mode.
    var violated = false
    /// Isolated mode: the first misuse, thrown by ``finish(into:)`` even if the caller swallowed it.
    var pendingError: (any Error)?

    /// Set only to learn the key type `Dictionary` uses (see ``dictionaryKeyType``).
    var recordsKeyType = false
    var recordedKeyType: ObjectIdentifier?

    init(isolated: Bool, root: Int = 0, base: BinaryCodingPath = .root, key: (any CodingKey)? = nil) {
        self.isolated = isolated
        self.slot = .root(at: root)
        self.slotBase = base
        self.slotKey = key
    }

    /// Encodes one message.
    static func encodeMessage<Value: Encodable>(_ value: Value) throws -> [UInt8] {
        let state = BinaryEncoderState(isolated: false, root: 1)
        state.buffer.reserveCapacity(32)
        state.buffer.append(BinaryFormat.marker)
        do {
            try state.encodeValue(value, at: state.slot, base: .root, key: nil)
        } catch {
            if !state.violated { throw error }
        }
        if !state.violated {
            while !state.frames.isEmpty { state.closeTop() }
            return state.buffer
        }
        // Containers were used out of nesting order: encode again, each nested value on its own.
        let isolated = BinaryEncoderState(isolated: true)
        try isolated.encodeValue(value, at: isolated.slot, base: .root, key: nil)
        var out: [UInt8] = [BinaryFormat.marker]
        try isolated.finish(into: &out)
        return out
    }

    /// The type of the coding keys of `[String: V]` and `[Int: V]`, whose keys are sorted.
    static let dictionaryKeyType: ObjectIdentifier? = {
        let probe = BinaryEncoderState(isolated: false)
        probe.recordsKeyType = true
        try? ["": 0].encode(to: probe)
        return probe.recordedKeyType
    }()

    // MARK: Encoder

    var codingPath: [any CodingKey] { slotBase.appending(slotKey).keys }
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    func container<Key: CodingKey>(keyedBy type: Key.Type) -> KeyedEncodingContainer<Key> {
        KeyedEncodingContainer(keyedContainer(Key.self, at: slot, path: slotBase.appending(slotKey)))
    }

    func unkeyedContainer() -> any UnkeyedEncodingContainer {
        unkeyedContainer(at: slot, path: slotBase.appending(slotKey))
    }

    func singleValueContainer() -> any SingleValueEncodingContainer {
        BinarySingleValueEncoder(state: self, slot: slot)
    }

    // MARK: Containers

    func keyedContainer<Key: CodingKey>(_ type: Key.Type, at slot: Slot, path: BinaryCodingPath) -> BinaryKeyedEncoder<Key> {
        var sortsKeys = false
        if recordsKeyType {
            recordedKeyType = ObjectIdentifier(Key.self)
        } else {
            sortsKeys = ObjectIdentifier(Key.self) == Self.dictionaryKeyType
        }
        let (depth, generation) = openContainer(at: slot, tag: BinaryFormat.keyed, sortsKeys: sortsKeys, path: path)
        return BinaryKeyedEncoder(state: self, depth: depth, generation: generation, path: path)
    }

    func unkeyedContainer(at slot: Slot, path: BinaryCodingPath) -> BinaryUnkeyedEncoder {
        let (depth, generation) = openContainer(at: slot, tag: BinaryFormat.unkeyed, sortsKeys: false, path: path)
        return BinaryUnkeyedEncoder(state: self, depth: depth, generation: generation, path: path)
    }

    /// Opens a container at `slot`, or returns the one already open there (a class and its
    /// superclass both asking the same encoder for a keyed container). `(-1, 0)` when neither is
    /// possible: every use of that container then fails.
    func openContainer(at slot: Slot, tag: UInt8, sortsKeys: Bool, path: BinaryCodingPath) -> (Int32, UInt32) {
        if parentIsOpen(slot) {
            let depth = Int(slot.parentDepth) + 1
            if buffer.count == slot.start && frames.count == depth {
                nextGeneration = nextGeneration == .max ? 1 : nextGeneration + 1
                frames.append(Frame(start: slot.start, count: 0, generation: nextGeneration, sortsKeys: sortsKeys))
                buffer.append(tag)
                buffer.append(0)  // length and count, fixed up when the container closes
                buffer.append(0)
                return (Int32(depth), nextGeneration)
            }
            if depth < frames.count, frames[depth].start == slot.start, buffer[slot.start] == tag {
                while frames.count > depth + 1 { closeTop() }
                return (Int32(depth), frames[depth].generation)
            }
        }
        _ = failure("a value was already encoded here, or its container was used out of order", path: path)
        return (-1, 0)
    }

    @inline(__always)
    func parentIsOpen(_ slot: Slot) -> Bool {
        if slot.parentDepth < 0 { return slot.parentDepth == -1 }
        let depth = Int(slot.parentDepth)
        return depth < frames.count && frames[depth].generation == slot.parentGeneration
    }

    /// Makes the container at `depth` the innermost open one, closing those inside it.
    @inline(__always)
    func prepare(_ depth: Int32, _ generation: UInt32, path: BinaryCodingPath) throws {
        let index = Int(depth)
        guard index >= 0, index < frames.count, frames[index].generation == generation else {
            throw failure("the container was used after a container outside it moved on", path: path)
        }
        while frames.count > index + 1 { closeTop() }
    }

    /// Checks that nothing was encoded at `slot` yet, before writing a single value there.
    @inline(__always)
    func prepareScalar(at slot: Slot) throws {
        guard parentIsOpen(slot), buffer.count == slot.start else {
            throw failure("a single value container can encode only one value", path: slotBase.appending(slotKey))
        }
    }

    func failure(_ message: String, path: BinaryCodingPath) -> any Error {
        if let pendingError { return pendingError }
        guard isolated else {
            violated = true
            return BinaryEncodingRestart()
        }
        let error = EncodingError.invalidValue(
            (), EncodingError.Context(codingPath: path.keys, debugDescription: "BinaryEntityCodec: \(message)."))
        pendingError = error
        return error
    }

    /// Closes the innermost open container (streaming mode): writes its length and count.
    func closeTop() {
        guard let frame = frames.popLast() else { return }
        let bodyStart = frame.start + 3
        if frame.sortsKeys && frame.count > 1 {
            BinaryFormat.sortEntries(&buffer, from: bodyStart, to: buffer.count)
        }
        let length = BinaryFormat.varintSize(frame.count) + buffer.count - bodyStart
        if length < 0x80 && frame.count < 0x80 {
            buffer[frame.start + 1] = UInt8(truncatingIfNeeded: length)
            buffer[frame.start + 2] = UInt8(truncatingIfNeeded: frame.count)
            return
        }
        var header: [UInt8] = []
        BinaryFormat.appendVarint(UInt64(length), to: &header)
        BinaryFormat.appendVarint(UInt64(frame.count), to: &header)
        buffer.replaceSubrange((frame.start + 1)..<(frame.start + 3), with: header)
    }

    /// Isolated mode: appends this state's value, children spliced in, to `out`.
    func finish(into out: inout [UInt8]) throws {
        if let pendingError { throw pendingError }
        guard !buffer.isEmpty else {
            out.append(contentsOf: [BinaryFormat.keyed, 1, 0])  // a value that encoded nothing
            return
        }
        guard let frame = frames.first else {
            out.append(contentsOf: buffer)
            return
        }
        out.append(contentsOf: buffer[0...frame.start])  // Optional wrappers, then the tag
        var body: [UInt8] = []
        var copied = frame.start + 3
        for (offset, child) in children {
            body.append(contentsOf: buffer[copied..<offset])
            try child.finish(into: &body)
            copied = offset
        }
        body.append(contentsOf: buffer[copied...])
        if frame.sortsKeys && frame.count > 1 {
            BinaryFormat.sortEntries(&body, from: 0, to: body.count)
        }
        BinaryFormat.appendVarint(UInt64(BinaryFormat.varintSize(frame.count) + body.count), to: &out)
        BinaryFormat.appendVarint(UInt64(frame.count), to: &out)
        out.append(contentsOf: body)
    }

    // MARK: Entries

    @inline(__always)
    func beginKeyedEntry<Key: CodingKey>(_ depth: Int32, _ generation: UInt32, _ key: Key, path: BinaryCodingPath) throws {
        try prepare(depth, generation, path: path)
        appendKey(key.stringValue)
        frames[Int(depth)].count += 1
    }

    @inline(__always)
    func beginUnkeyedEntry(_ depth: Int32, _ generation: UInt32, path: BinaryCodingPath) throws {
        try prepare(depth, generation, path: path)
        frames[Int(depth)].count += 1
    }

    /// Where the value of the entry just begun goes: in place, or (isolated) in a new child state.
    @inline(__always)
    func entryTarget(_ depth: Int32, _ generation: UInt32, base: BinaryCodingPath, key: any CodingKey) -> (BinaryEncoderState, Slot) {
        guard isolated else {
            return (self, Slot(parentDepth: depth, parentGeneration: generation, start: buffer.count))
        }
        let child = BinaryEncoderState(isolated: true, base: base, key: key)
        children.append((buffer.count, child))
        return (child, child.slot)
    }

    func encodeEntry<T: Encodable>(_ value: T, _ depth: Int32, _ generation: UInt32, base: BinaryCodingPath, key: any CodingKey) throws {
        let (target, slot) = entryTarget(depth, generation, base: base, key: key)
        try target.encodeValue(value, at: slot, base: base, key: key)
    }

    func nestedKeyed<NestedKey: CodingKey>(_ type: NestedKey.Type, _ depth: Int32, _ generation: UInt32,
                                           base: BinaryCodingPath, key: any CodingKey) -> KeyedEncodingContainer<NestedKey> {
        let (target, slot) = entryTarget(depth, generation, base: base, key: key)
        return KeyedEncodingContainer(target.keyedContainer(NestedKey.self, at: slot, path: base.appending(key)))
    }

    func nestedUnkeyed(_ depth: Int32, _ generation: UInt32, base: BinaryCodingPath, key: any CodingKey) -> any UnkeyedEncodingContainer {
        let (target, slot) = entryTarget(depth, generation, base: base, key: key)
        return target.unkeyedContainer(at: slot, path: base.appending(key))
    }

    /// A failed container: every use throws.
    func deadKeyed<NestedKey: CodingKey>(_ type: NestedKey.Type, path: BinaryCodingPath) -> KeyedEncodingContainer<NestedKey> {
        KeyedEncodingContainer(BinaryKeyedEncoder<NestedKey>(state: self, depth: -1, generation: 0, path: path))
    }

    /// The encoder for a `superEncoder` entry just begun. Streaming mode cannot know when (or
    /// whether) it will be used, so it asks for the isolated encoder instead.
    func superEncoder(_ depth: Int32, _ generation: UInt32, base: BinaryCodingPath, key: any CodingKey) -> any Encoder {
        guard isolated else {
            violated = true
            return deadEncoder()
        }
        let (target, _) = entryTarget(depth, generation, base: base, key: key)
        return target
    }

    func deadEncoder() -> BinaryEncoderState {
        let dead = BinaryEncoderState(isolated: isolated)
        dead.slot = .dead
        dead.pendingError = pendingError
        return dead
    }

    // MARK: Values

    /// Encodes `value` at `slot`: primitives directly, anything else through its `encode(to:)`.
    func encodeValue<T: Encodable>(_ value: T, at slot: Slot, base: BinaryCodingPath, key: (any CodingKey)?) throws {
        if try encodePrimitive(value, at: slot) { return }
        try encodeComposite(value, at: slot, base: base, key: key)
    }

    func encodeComposite<T: Encodable>(_ value: T, at slot: Slot, base: BinaryCodingPath, key: (any CodingKey)?) throws {
        let savedSlot = self.slot
        let savedBase = slotBase
        let savedKey = slotKey
        self.slot = slot
        slotBase = base
        slotKey = key
        defer {
            self.slot = savedSlot
            slotBase = savedBase
            slotKey = savedKey
        }
        try value.encode(to: self)
        if buffer.count == slot.start && parentIsOpen(slot) && !violated {
            // It asked for no container: like JSONEncoder, encode an empty keyed container.
            buffer.append(contentsOf: [BinaryFormat.keyed, 1, 0])
        }
    }

    /// Encodes the types with a direct representation; `false` for any other type.
    @inline(__always)
    func encodePrimitive<T: Encodable>(_ value: T, at slot: Slot) throws -> Bool {
        if T.self == String.self {
            try prepareScalar(at: slot)
            appendString(unsafeBitCast(value, to: String.self))
        } else if T.self == Int.self {
            try prepareScalar(at: slot)
            appendSigned(Int64(unsafeBitCast(value, to: Int.self)))
        } else if T.self == Int64.self {
            try prepareScalar(at: slot)
            appendSigned(unsafeBitCast(value, to: Int64.self))
        } else if T.self == Double.self {
            try prepareScalar(at: slot)
            appendDouble(unsafeBitCast(value, to: Double.self))
        } else if T.self == Bool.self {
            try prepareScalar(at: slot)
            buffer.append(unsafeBitCast(value, to: Bool.self) ? BinaryFormat.trueValue : BinaryFormat.falseValue)
        } else if T.self == [UInt8].self {
            try prepareScalar(at: slot)
            unsafeBitCast(value, to: [UInt8].self).withUnsafeBytes { appendBytes($0) }
        } else if T.self == Data.self {
            try prepareScalar(at: slot)
            unsafeBitCast(value, to: Data.self).withUnsafeBytes { appendBytes($0) }
        } else if T.self == Date.self {
            try prepareScalar(at: slot)
            appendDouble(unsafeBitCast(value, to: Date.self).timeIntervalSinceReferenceDate)
        } else if T.self == UInt64.self {
            try prepareScalar(at: slot)
            appendUnsigned(unsafeBitCast(value, to: UInt64.self))
        } else if T.self == Int32.self {
            try prepareScalar(at: slot)
            appendSigned(Int64(unsafeBitCast(value, to: Int32.self)))
        } else if T.self == UInt.self {
            try prepareScalar(at: slot)
            appendUnsigned(UInt64(unsafeBitCast(value, to: UInt.self)))
        } else if T.self == UInt32.self {
            try prepareScalar(at: slot)
            appendUnsigned(UInt64(unsafeBitCast(value, to: UInt32.self)))
        } else if T.self == Float.self {
            try prepareScalar(at: slot)
            appendFloat(unsafeBitCast(value, to: Float.self))
        } else if T.self == Int16.self {
            try prepareScalar(at: slot)
            appendSigned(Int64(unsafeBitCast(value, to: Int16.self)))
        } else if T.self == Int8.self {
            try prepareScalar(at: slot)
            appendSigned(Int64(unsafeBitCast(value, to: Int8.self)))
        } else if T.self == UInt16.self {
            try prepareScalar(at: slot)
            appendUnsigned(UInt64(unsafeBitCast(value, to: UInt16.self)))
        } else if T.self == UInt8.self {
            try prepareScalar(at: slot)
            appendUnsigned(UInt64(unsafeBitCast(value, to: UInt8.self)))
        } else {
            return false
        }
        return true
    }

    // MARK: Writing

    @inline(__always) func appendNil() { buffer.append(BinaryFormat.null) }

    @inline(__always) func appendBool(_ value: Bool) {
        buffer.append(value ? BinaryFormat.trueValue : BinaryFormat.falseValue)
    }

    @inline(__always) func appendSigned(_ value: Int64) {
        buffer.append(BinaryFormat.signed)
        BinaryFormat.appendVarint(BinaryFormat.zigzag(value), to: &buffer)
    }

    @inline(__always) func appendUnsigned(_ value: UInt64) {
        buffer.append(BinaryFormat.unsigned)
        BinaryFormat.appendVarint(value, to: &buffer)
    }

    @inline(__always) func appendDouble(_ value: Double) {
        buffer.append(BinaryFormat.double)
        withUnsafeBytes(of: value.bitPattern.littleEndian) { buffer.append(contentsOf: $0) }
    }

    @inline(__always) func appendFloat(_ value: Float) {
        buffer.append(BinaryFormat.float)
        withUnsafeBytes(of: value.bitPattern.littleEndian) { buffer.append(contentsOf: $0) }
    }

    @inline(__always) func appendString(_ value: String) {
        var value = value
        value.withUTF8 { utf8 in
            buffer.append(BinaryFormat.string)
            BinaryFormat.appendVarint(UInt64(utf8.count), to: &buffer)
            buffer.append(contentsOf: utf8)
        }
    }

    @inline(__always) func appendBytes(_ bytes: UnsafeRawBufferPointer) {
        buffer.append(BinaryFormat.bytes)
        BinaryFormat.appendVarint(UInt64(bytes.count), to: &buffer)
        buffer.append(contentsOf: bytes)
    }

    @inline(__always) func appendKey(_ key: String) {
        var key = key
        key.withUTF8 { utf8 in
            BinaryFormat.appendVarint(UInt64(utf8.count), to: &buffer)
            buffer.append(contentsOf: utf8)
        }
    }
}

struct BinaryKeyedEncoder<Key: CodingKey>: KeyedEncodingContainerProtocol {
    let state: BinaryEncoderState
    let depth: Int32
    let generation: UInt32
    let path: BinaryCodingPath

    var codingPath: [any CodingKey] { path.keys }

    @inline(__always) private func begin(_ key: Key) throws {
        try state.beginKeyedEntry(depth, generation, key, path: path)
    }

    mutating func encodeNil(forKey key: Key) throws { try begin(key); state.appendNil() }
    mutating func encode(_ value: Bool, forKey key: Key) throws { try begin(key); state.appendBool(value) }
    mutating func encode(_ value: String, forKey key: Key) throws { try begin(key); state.appendString(value) }
    mutating func encode(_ value: Double, forKey key: Key) throws { try begin(key); state.appendDouble(value) }
    mutating func encode(_ value: Float, forKey key: Key) throws { try begin(key); state.appendFloat(value) }
    mutating func encode(_ value: Int, forKey key: Key) throws { try begin(key); state.appendSigned(Int64(value)) }
    mutating func encode(_ value: Int8, forKey key: Key) throws { try begin(key); state.appendSigned(Int64(value)) }
    mutating func encode(_ value: Int16, forKey key: Key) throws { try begin(key); state.appendSigned(Int64(value)) }
    mutating func encode(_ value: Int32, forKey key: Key) throws { try begin(key); state.appendSigned(Int64(value)) }
    mutating func encode(_ value: Int64, forKey key: Key) throws { try begin(key); state.appendSigned(value) }
    mutating func encode(_ value: UInt, forKey key: Key) throws { try begin(key); state.appendUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt8, forKey key: Key) throws { try begin(key); state.appendUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt16, forKey key: Key) throws { try begin(key); state.appendUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt32, forKey key: Key) throws { try begin(key); state.appendUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt64, forKey key: Key) throws { try begin(key); state.appendUnsigned(value) }

    mutating func encode<T: Encodable>(_ value: T, forKey key: Key) throws {
        try begin(key)
        try state.encodeEntry(value, depth, generation, base: path, key: key)
    }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type, forKey key: Key) -> KeyedEncodingContainer<NestedKey> {
        do { try begin(key) } catch { return state.deadKeyed(NestedKey.self, path: path.appending(key)) }
        return state.nestedKeyed(NestedKey.self, depth, generation, base: path, key: key)
    }

    mutating func nestedUnkeyedContainer(forKey key: Key) -> any UnkeyedEncodingContainer {
        do { try begin(key) } catch {
            return BinaryUnkeyedEncoder(state: state, depth: -1, generation: 0, path: path.appending(key))
        }
        return state.nestedUnkeyed(depth, generation, base: path, key: key)
    }

    mutating func superEncoder() -> any Encoder {
        guard state.isolated else { return state.superEncoder(depth, generation, base: path, key: BinarySuperKey()) }
        do { try state.beginKeyedEntry(depth, generation, BinarySuperKey(), path: path) } catch { return state.deadEncoder() }
        return state.superEncoder(depth, generation, base: path, key: BinarySuperKey())
    }

    mutating func superEncoder(forKey key: Key) -> any Encoder {
        guard state.isolated else { return state.superEncoder(depth, generation, base: path, key: key) }
        do { try begin(key) } catch { return state.deadEncoder() }
        return state.superEncoder(depth, generation, base: path, key: key)
    }
}

struct BinaryUnkeyedEncoder: UnkeyedEncodingContainer {
    let state: BinaryEncoderState
    let depth: Int32
    let generation: UInt32
    let path: BinaryCodingPath
    private(set) var count = 0

    init(state: BinaryEncoderState, depth: Int32, generation: UInt32, path: BinaryCodingPath) {
        self.state = state
        self.depth = depth
        self.generation = generation
        self.path = path
    }

    var codingPath: [any CodingKey] { path.keys }

    @inline(__always) private mutating func begin() throws {
        try state.beginUnkeyedEntry(depth, generation, path: path)
        count += 1
    }

    mutating func encodeNil() throws { try begin(); state.appendNil() }
    mutating func encode(_ value: Bool) throws { try begin(); state.appendBool(value) }
    mutating func encode(_ value: String) throws { try begin(); state.appendString(value) }
    mutating func encode(_ value: Double) throws { try begin(); state.appendDouble(value) }
    mutating func encode(_ value: Float) throws { try begin(); state.appendFloat(value) }
    mutating func encode(_ value: Int) throws { try begin(); state.appendSigned(Int64(value)) }
    mutating func encode(_ value: Int8) throws { try begin(); state.appendSigned(Int64(value)) }
    mutating func encode(_ value: Int16) throws { try begin(); state.appendSigned(Int64(value)) }
    mutating func encode(_ value: Int32) throws { try begin(); state.appendSigned(Int64(value)) }
    mutating func encode(_ value: Int64) throws { try begin(); state.appendSigned(value) }
    mutating func encode(_ value: UInt) throws { try begin(); state.appendUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt8) throws { try begin(); state.appendUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt16) throws { try begin(); state.appendUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt32) throws { try begin(); state.appendUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt64) throws { try begin(); state.appendUnsigned(value) }

    mutating func encode<T: Encodable>(_ value: T) throws {
        try begin()
        try state.encodeEntry(value, depth, generation, base: path, key: BinaryIndexKey(count - 1))
    }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type) -> KeyedEncodingContainer<NestedKey> {
        let key = BinaryIndexKey(count)
        do { try begin() } catch { return state.deadKeyed(NestedKey.self, path: path.appending(key)) }
        return state.nestedKeyed(NestedKey.self, depth, generation, base: path, key: key)
    }

    mutating func nestedUnkeyedContainer() -> any UnkeyedEncodingContainer {
        let key = BinaryIndexKey(count)
        do { try begin() } catch {
            return BinaryUnkeyedEncoder(state: state, depth: -1, generation: 0, path: path.appending(key))
        }
        return state.nestedUnkeyed(depth, generation, base: path, key: key)
    }

    mutating func superEncoder() -> any Encoder {
        let key = BinaryIndexKey(count)
        guard state.isolated else { return state.superEncoder(depth, generation, base: path, key: key) }
        do { try begin() } catch { return state.deadEncoder() }
        return state.superEncoder(depth, generation, base: path, key: key)
    }
}

/// Three words (state, slot), so it fits an existential inline: no allocation per `Optional`.
struct BinarySingleValueEncoder: SingleValueEncodingContainer {
    let state: BinaryEncoderState
    let slot: BinaryEncoderState.Slot

    var codingPath: [any CodingKey] { state.slotBase.appending(state.slotKey).keys }

    @inline(__always) private func begin() throws { try state.prepareScalar(at: slot) }

    mutating func encodeNil() throws { try begin(); state.appendNil() }
    mutating func encode(_ value: Bool) throws { try begin(); state.appendBool(value) }
    mutating func encode(_ value: String) throws { try begin(); state.appendString(value) }
    mutating func encode(_ value: Double) throws { try begin(); state.appendDouble(value) }
    mutating func encode(_ value: Float) throws { try begin(); state.appendFloat(value) }
    mutating func encode(_ value: Int) throws { try begin(); state.appendSigned(Int64(value)) }
    mutating func encode(_ value: Int8) throws { try begin(); state.appendSigned(Int64(value)) }
    mutating func encode(_ value: Int16) throws { try begin(); state.appendSigned(Int64(value)) }
    mutating func encode(_ value: Int32) throws { try begin(); state.appendSigned(Int64(value)) }
    mutating func encode(_ value: Int64) throws { try begin(); state.appendSigned(value) }
    mutating func encode(_ value: UInt) throws { try begin(); state.appendUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt8) throws { try begin(); state.appendUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt16) throws { try begin(); state.appendUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt32) throws { try begin(); state.appendUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt64) throws { try begin(); state.appendUnsigned(value) }

    mutating func encode<T: Encodable>(_ value: T) throws {
        if try state.encodePrimitive(value, at: slot) { return }
        var target = slot
        if T.self is any BinaryOptionalMarker.Type {
            // An Optional holding an Optional: mark the outer `.some`, so `.some(nil)` survives.
            try begin()
            state.buffer.append(BinaryFormat.some)
            target.start = state.buffer.count
        }
        try state.encodeComposite(value, at: target, base: state.slotBase, key: state.slotKey)
    }
}

// MARK: - Decoding

/// Bounds-checked reads of the format. Every read checks against `limit`, which never exceeds the
/// input's length.
struct BinaryReader {
    let base: UnsafeRawPointer

    static func truncated(_ path: [any CodingKey]) -> DecodingError {
        .dataCorrupted(DecodingError.Context(codingPath: path, debugDescription: "BinaryEntityCodec: unexpected end of data."))
    }

    static func corrupted(_ path: [any CodingKey], _ message: String) -> DecodingError {
        .dataCorrupted(DecodingError.Context(codingPath: path, debugDescription: "BinaryEntityCodec: \(message)."))
    }

    @inline(__always)
    func byte(at position: Int, limit: Int, path: @autoclosure () -> [any CodingKey]) throws -> UInt8 {
        guard position < limit else { throw Self.truncated(path()) }
        return base.load(fromByteOffset: position, as: UInt8.self)
    }

    @inline(__always)
    func varint(_ position: inout Int, limit: Int, path: @autoclosure () -> [any CodingKey]) throws -> UInt64 {
        guard position < limit else { throw Self.truncated(path()) }
        let first = base.load(fromByteOffset: position, as: UInt8.self)
        position += 1
        if first < 0x80 { return UInt64(first) }
        var result = UInt64(first & 0x7F)
        var shift: UInt64 = 7
        while true {
            guard position < limit else { throw Self.truncated(path()) }
            let byte = base.load(fromByteOffset: position, as: UInt8.self)
            position += 1
            if shift == 63 && byte > 1 { throw Self.corrupted(path(), "a varint overflows 64 bits") }
            result |= UInt64(byte & 0x7F) << shift
            if byte < 0x80 { return result }
            shift += 7
        }
    }

    /// A varint length, checked to fit in the bytes left before `limit`.
    @inline(__always)
    func length(_ position: inout Int, limit: Int, path: @autoclosure () -> [any CodingKey]) throws -> Int {
        let raw = try varint(&position, limit: limit, path: path())
        guard raw <= UInt64(limit - position) else { throw Self.truncated(path()) }
        return Int(raw)
    }

    @inline(__always)
    func fixed64(_ position: inout Int, limit: Int, path: @autoclosure () -> [any CodingKey]) throws -> UInt64 {
        guard limit - position >= 8 else { throw Self.truncated(path()) }
        let value = UInt64(littleEndian: base.loadUnaligned(fromByteOffset: position, as: UInt64.self))
        position += 8
        return value
    }

    @inline(__always)
    func fixed32(_ position: inout Int, limit: Int, path: @autoclosure () -> [any CodingKey]) throws -> UInt32 {
        guard limit - position >= 4 else { throw Self.truncated(path()) }
        let value = UInt32(littleEndian: base.loadUnaligned(fromByteOffset: position, as: UInt32.self))
        position += 4
        return value
    }

    /// The position just past the value at `position`. Constant time for containers.
    func skipValue(at position: Int, limit: Int, path: @autoclosure () -> [any CodingKey]) throws -> Int {
        var position = position
        var tag = try byte(at: position, limit: limit, path: path())
        while tag == BinaryFormat.some {
            position += 1
            tag = try byte(at: position, limit: limit, path: path())
        }
        position += 1
        switch tag {
        case BinaryFormat.null, BinaryFormat.falseValue, BinaryFormat.trueValue:
            return position
        case BinaryFormat.signed, BinaryFormat.unsigned:
            _ = try varint(&position, limit: limit, path: path())
            return position
        case BinaryFormat.float:
            guard limit - position >= 4 else { throw Self.truncated(path()) }
            return position + 4
        case BinaryFormat.double:
            guard limit - position >= 8 else { throw Self.truncated(path()) }
            return position + 8
        case BinaryFormat.string, BinaryFormat.bytes, BinaryFormat.keyed, BinaryFormat.unkeyed:
            let length = try length(&position, limit: limit, path: path())
            return position + length
        default:
            throw Self.corrupted(path(), "unknown type tag 0x\(String(tag, radix: 16))")
        }
    }
}

/// The decoder, and the state of one message being decoded.
///
/// Like the encoder it is its own `Decoder`, positioned by `slotStart`, saved and restored around
/// nested values. A keyed container finds a key by a linear scan of its entries, starting after
/// the entry found last (`cursor`), so fields read in the order they were written cost one compare.
final class BinaryDecoderState: Decoder {
    let reader: BinaryReader
    let count: Int

    var slotStart: Int
    var slotLimit: Int
    var slotBase: BinaryCodingPath
    var slotKey: (any CodingKey)?

    /// The body start of the keyed container `cursor` belongs to.
    var cursorOwner = -1
    var cursor = 0

    init(base: UnsafeRawPointer, count: Int, start: Int, limit: Int, path: BinaryCodingPath, key: (any CodingKey)?) {
        self.reader = BinaryReader(base: base)
        self.count = count
        self.slotStart = start
        self.slotLimit = limit
        self.slotBase = path
        self.slotKey = key
    }

    /// Decodes one message (or, if it is JSON, hands it to ``JSONEntityCodec``).
    static func decodeMessage<Value: Decodable>(_ type: Value.Type, from bytes: UnsafeRawBufferPointer) throws -> Value {
        guard let base = bytes.baseAddress, let first = bytes.first else {
            throw BinaryReader.corrupted([], "the data is empty")
        }
        guard first == BinaryFormat.marker else {
            if BinaryFormat.beginsJSON(first) { return try JSONEntityCodec().decode(type, from: bytes) }
            throw BinaryReader.corrupted([], "the data does not begin with the format byte 0xB1 (found 0x\(String(first, radix: 16)))")
        }
        let state = BinaryDecoderState(base: base, count: bytes.count, start: 1, limit: bytes.count, path: .root, key: nil)
        let end = try state.reader.skipValue(at: 1, limit: bytes.count, path: [])
        guard end == bytes.count else {
            throw BinaryReader.corrupted([], "\(bytes.count - end) unexpected bytes after the value")
        }
        return try state.decodeValue(type, at: 1, limit: bytes.count, base: .root, key: nil)
    }

    // MARK: Decoder

    var codingPath: [any CodingKey] { slotBase.appending(slotKey).keys }
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    func container<Key: CodingKey>(keyedBy type: Key.Type) throws -> KeyedDecodingContainer<Key> {
        let path = slotBase.appending(slotKey)
        let (body, end, count) = try openContainer(at: slotStart, limit: slotLimit, tag: BinaryFormat.keyed,
                                                    type: KeyedDecodingContainer<Key>.self, path: path.keys)
        return KeyedDecodingContainer(BinaryKeyedDecoder<Key>(state: self, bodyStart: body, end: end, count: count, path: path))
    }

    func unkeyedContainer() throws -> any UnkeyedDecodingContainer {
        let path = slotBase.appending(slotKey)
        let (body, end, count) = try openContainer(at: slotStart, limit: slotLimit, tag: BinaryFormat.unkeyed,
                                                    type: (any UnkeyedDecodingContainer).self, path: path.keys)
        return BinaryUnkeyedDecoder(state: self, position: body, end: end, total: count, path: path)
    }

    func singleValueContainer() throws -> any SingleValueDecodingContainer {
        BinarySingleValueDecoder(state: self, position: slotStart, limit: slotLimit)
    }

    // MARK: Reading

    /// Opens the container at `position`: its body start, end and entry count.
    func openContainer(at position: Int, limit: Int, tag expected: UInt8, type: Any.Type,
                       path: @autoclosure () -> [any CodingKey]) throws -> (Int, Int, Int) {
        var position = position
        let tag = try valueTag(&position, limit: limit, path: path())
        guard tag == expected else { throw mismatch(type, tag, path()) }
        let length = try reader.length(&position, limit: limit, path: path())
        let end = position + length
        let count = try reader.varint(&position, limit: end, path: path())
        guard count <= UInt64(end - position) else {
            throw BinaryReader.corrupted(path(), "a container claims \(count) entries in \(end - position) bytes")
        }
        return (position, end, Int(count))
    }

    /// Reads the tag at `position`, stepping over Optional wrappers (`T??` data read as `T?` or `T`).
    @inline(__always)
    func valueTag(_ position: inout Int, limit: Int, path: @autoclosure () -> [any CodingKey]) throws -> UInt8 {
        var tag = try reader.byte(at: position, limit: limit, path: path())
        position += 1
        while tag == BinaryFormat.some {
            tag = try reader.byte(at: position, limit: limit, path: path())
            position += 1
        }
        return tag
    }

    func mismatch(_ type: Any.Type, _ tag: UInt8, _ path: [any CodingKey]) -> DecodingError {
        if tag == BinaryFormat.null {
            return .valueNotFound(type, DecodingError.Context(
                codingPath: path, debugDescription: "Expected \(type) value but found nil instead."))
        }
        return .typeMismatch(type, DecodingError.Context(
            codingPath: path, debugDescription: "Expected to decode \(type) but found \(BinaryFormat.describe(tag)) instead."))
    }

    @inline(__always)
    func isNil(at position: Int, limit: Int, path: @autoclosure () -> [any CodingKey]) throws -> Bool {
        try reader.byte(at: position, limit: limit, path: path()) == BinaryFormat.null
    }

    func readSigned(_ position: inout Int, limit: Int, type: Any.Type, path: @autoclosure () -> [any CodingKey]) throws -> Int64 {
        var at = position
        let tag = try valueTag(&at, limit: limit, path: path())
        let value: Int64
        switch tag {
        case BinaryFormat.signed:
            value = BinaryFormat.unzigzag(try reader.varint(&at, limit: limit, path: path()))
        case BinaryFormat.unsigned:
            let raw = try reader.varint(&at, limit: limit, path: path())
            guard let exact = Int64(exactly: raw) else { throw doesNotFit("\(raw)", type, path()) }
            value = exact
        case BinaryFormat.double:
            let double = Double(bitPattern: try reader.fixed64(&at, limit: limit, path: path()))
            guard let exact = Int64(exactly: double) else { throw doesNotFit("\(double)", type, path()) }
            value = exact
        case BinaryFormat.float:
            let float = Float(bitPattern: try reader.fixed32(&at, limit: limit, path: path()))
            guard let exact = Int64(exactly: float) else { throw doesNotFit("\(float)", type, path()) }
            value = exact
        default:
            throw mismatch(type, tag, path())
        }
        position = at
        return value
    }

    func readUnsigned(_ position: inout Int, limit: Int, type: Any.Type, path: @autoclosure () -> [any CodingKey]) throws -> UInt64 {
        var at = position
        let tag = try valueTag(&at, limit: limit, path: path())
        let value: UInt64
        switch tag {
        case BinaryFormat.unsigned:
            value = try reader.varint(&at, limit: limit, path: path())
        case BinaryFormat.signed:
            let signed = BinaryFormat.unzigzag(try reader.varint(&at, limit: limit, path: path()))
            guard let exact = UInt64(exactly: signed) else { throw doesNotFit("\(signed)", type, path()) }
            value = exact
        case BinaryFormat.double:
            let double = Double(bitPattern: try reader.fixed64(&at, limit: limit, path: path()))
            guard let exact = UInt64(exactly: double) else { throw doesNotFit("\(double)", type, path()) }
            value = exact
        case BinaryFormat.float:
            let float = Float(bitPattern: try reader.fixed32(&at, limit: limit, path: path()))
            guard let exact = UInt64(exactly: float) else { throw doesNotFit("\(float)", type, path()) }
            value = exact
        default:
            throw mismatch(type, tag, path())
        }
        position = at
        return value
    }

    @inline(__always)
    func readInteger<I: FixedWidthInteger>(_ type: I.Type, _ position: inout Int, limit: Int,
                                          path: @autoclosure () -> [any CodingKey]) throws -> I {
        if I.isSigned {
            let value = try readSigned(&position, limit: limit, type: I.self, path: path())
            guard let exact = I(exactly: value) else { throw doesNotFit("\(value)", I.self, path()) }
            return exact
        }
        let value = try readUnsigned(&position, limit: limit, type: I.self, path: path())
        guard let exact = I(exactly: value) else { throw doesNotFit("\(value)", I.self, path()) }
        return exact
    }

    func doesNotFit(_ number: String, _ type: Any.Type, _ path: [any CodingKey]) -> DecodingError {
        BinaryReader.corrupted(path, "the number \(number) does not fit in \(type)")
    }

    func readDouble(_ position: inout Int, limit: Int, path: @autoclosure () -> [any CodingKey]) throws -> Double {
        var at = position
        let tag = try valueTag(&at, limit: limit, path: path())
        let value: Double
        switch tag {
        case BinaryFormat.double: value = Double(bitPattern: try reader.fixed64(&at, limit: limit, path: path()))
        case BinaryFormat.float: value = Double(Float(bitPattern: try reader.fixed32(&at, limit: limit, path: path())))
        case BinaryFormat.signed: value = Double(BinaryFormat.unzigzag(try reader.varint(&at, limit: limit, path: path())))
        case BinaryFormat.unsigned: value = Double(try reader.varint(&at, limit: limit, path: path()))
        default: throw mismatch(Double.self, tag, path())
        }
        position = at
        return value
    }

    func readFloat(_ position: inout Int, limit: Int, path: @autoclosure () -> [any CodingKey]) throws -> Float {
        var at = position
        let tag = try valueTag(&at, limit: limit, path: path())
        let value: Float
        switch tag {
        case BinaryFormat.float:
            value = Float(bitPattern: try reader.fixed32(&at, limit: limit, path: path()))
        case BinaryFormat.double:
            let double = Double(bitPattern: try reader.fixed64(&at, limit: limit, path: path()))
            guard !double.isFinite || abs(double) <= Double(Float.greatestFiniteMagnitude) else {
                throw doesNotFit("\(double)", Float.self, path())
            }
            value = Float(double)
        case BinaryFormat.signed: value = Float(BinaryFormat.unzigzag(try reader.varint(&at, limit: limit, path: path())))
        case BinaryFormat.unsigned: value = Float(try reader.varint(&at, limit: limit, path: path()))
        default: throw mismatch(Float.self, tag, path())
        }
        position = at
        return value
    }

    func readBool(_ position: inout Int, limit: Int, path: @autoclosure () -> [any CodingKey]) throws -> Bool {
        var at = position
        let tag = try valueTag(&at, limit: limit, path: path())
        guard tag == BinaryFormat.trueValue || tag == BinaryFormat.falseValue else { throw mismatch(Bool.self, tag, path()) }
        position = at
        return tag == BinaryFormat.trueValue
    }

    func readString(_ position: inout Int, limit: Int, path: @autoclosure () -> [any CodingKey]) throws -> String {
        var at = position
        let tag = try valueTag(&at, limit: limit, path: path())
        guard tag == BinaryFormat.string else { throw mismatch(String.self, tag, path()) }
        let length = try reader.length(&at, limit: limit, path: path())
        let value = String(decoding: UnsafeRawBufferPointer(start: reader.base + at, count: length), as: UTF8.self)
        position = at + length
        return value
    }

    /// The bytes of a `bytes` value, or `nil` if the value at `position` is something else.
    func readBytes(_ position: inout Int, limit: Int, path: @autoclosure () -> [any CodingKey]) throws -> UnsafeRawBufferPointer? {
        var at = position
        guard try valueTag(&at, limit: limit, path: path()) == BinaryFormat.bytes else { return nil }
        let length = try reader.length(&at, limit: limit, path: path())
        position = at + length
        return UnsafeRawBufferPointer(start: reader.base + at, count: length)
    }

    // MARK: Values

    /// Decodes a `T` from the value at `position`: primitives directly, anything else through its
    /// `init(from:)` with this decoder positioned there.
    func decodeValue<T: Decodable>(_ type: T.Type, at position: Int, limit: Int, base: BinaryCodingPath, key: (any CodingKey)?) throws -> T {
        if let value = try decodePrimitive(T.self, at: position, limit: limit, path: base.appending(key).keys) { return value }
        var start = position
        if try reader.byte(at: start, limit: limit, path: base.appending(key).keys) == BinaryFormat.some,
           !(T.self is any BinaryOptionalMarker.Type) {
            _ = try valueTag(&start, limit: limit, path: base.appending(key).keys)
            start -= 1
        }
        let saved = (slotStart, slotLimit, slotBase, slotKey, cursorOwner, cursor)
        slotStart = start
        slotLimit = limit
        slotBase = base
        slotKey = key
        defer { (slotStart, slotLimit, slotBase, slotKey, cursorOwner, cursor) = saved }
        return try T(from: self)
    }

    @inline(__always)
    func decodePrimitive<T: Decodable>(_ type: T.Type, at position: Int, limit: Int,
                                       path: @autoclosure () -> [any CodingKey]) throws -> T? {
        var at = position
        if T.self == String.self {
            return unsafeBitCast(try readString(&at, limit: limit, path: path()), to: T.self)
        } else if T.self == Int.self {
            return unsafeBitCast(try readInteger(Int.self, &at, limit: limit, path: path()), to: T.self)
        } else if T.self == Int64.self {
            return unsafeBitCast(try readInteger(Int64.self, &at, limit: limit, path: path()), to: T.self)
        } else if T.self == Double.self {
            return unsafeBitCast(try readDouble(&at, limit: limit, path: path()), to: T.self)
        } else if T.self == Bool.self {
            return unsafeBitCast(try readBool(&at, limit: limit, path: path()), to: T.self)
        } else if T.self == [UInt8].self {
            guard let bytes = try readBytes(&at, limit: limit, path: path()) else { return nil }
            return unsafeBitCast([UInt8](bytes), to: T.self)
        } else if T.self == Data.self {
            guard let bytes = try readBytes(&at, limit: limit, path: path()) else { return nil }
            return unsafeBitCast(Data(bytes), to: T.self)
        } else if T.self == Date.self {
            let seconds = try readDouble(&at, limit: limit, path: path())
            return unsafeBitCast(Date(timeIntervalSinceReferenceDate: seconds), to: T.self)
        } else if T.self == UInt64.self {
            return unsafeBitCast(try readInteger(UInt64.self, &at, limit: limit, path: path()), to: T.self)
        } else if T.self == Int32.self {
            return unsafeBitCast(try readInteger(Int32.self, &at, limit: limit, path: path()), to: T.self)
        } else if T.self == UInt.self {
            return unsafeBitCast(try readInteger(UInt.self, &at, limit: limit, path: path()), to: T.self)
        } else if T.self == UInt32.self {
            return unsafeBitCast(try readInteger(UInt32.self, &at, limit: limit, path: path()), to: T.self)
        } else if T.self == Float.self {
            return unsafeBitCast(try readFloat(&at, limit: limit, path: path()), to: T.self)
        } else if T.self == Int16.self {
            return unsafeBitCast(try readInteger(Int16.self, &at, limit: limit, path: path()), to: T.self)
        } else if T.self == Int8.self {
            return unsafeBitCast(try readInteger(Int8.self, &at, limit: limit, path: path()), to: T.self)
        } else if T.self == UInt16.self {
            return unsafeBitCast(try readInteger(UInt16.self, &at, limit: limit, path: path()), to: T.self)
        } else if T.self == UInt8.self {
            return unsafeBitCast(try readInteger(UInt8.self, &at, limit: limit, path: path()), to: T.self)
        }
        return nil
    }

    // MARK: Keyed lookup

    /// The position of the value stored under the key `name` in the keyed container whose entries
    /// are `bodyStart..<end`, or `nil`.
    func findEntry(_ name: UnsafeBufferPointer<UInt8>, bodyStart: Int, end: Int,
                   path: @autoclosure () -> [any CodingKey]) throws -> Int? {
        let first = cursorOwner == bodyStart && cursor <= end ? cursor : bodyStart
        var position = first
        while position < end {
            if let found = try entry(at: &position, matching: name, end: end, path: path()) {
                cursorOwner = bodyStart
                cursor = position
                return found
            }
        }
        position = bodyStart
        while position < first {
            if let found = try entry(at: &position, matching: name, end: end, path: path()) {
                cursorOwner = bodyStart
                cursor = position
                return found
            }
        }
        return nil
    }

    /// Steps over the entry at `position`; returns its value's position if its key is `name`.
    @inline(__always)
    func entry(at position: inout Int, matching name: UnsafeBufferPointer<UInt8>, end: Int,
               path: @autoclosure () -> [any CodingKey]) throws -> Int? {
        let length = try reader.length(&position, limit: end, path: path())
        let keyStart = position
        let valueStart = keyStart + length
        position = try reader.skipValue(at: valueStart, limit: end, path: path())
        guard length == name.count else { return nil }
        if length == 0 { return valueStart }
        guard let target = name.baseAddress, memcmp(reader.base + keyStart, target, length) == 0 else { return nil }
        return valueStart
    }

    /// The keys of the keyed container whose entries are `bodyStart..<end`, as far as they parse.
    func keys(bodyStart: Int, end: Int) -> [String] {
        var keys: [String] = []
        var position = bodyStart
        while position < end {
            guard let length = try? reader.length(&position, limit: end, path: []) else { break }
            keys.append(String(decoding: UnsafeRawBufferPointer(start: reader.base + position, count: length), as: UTF8.self))
            guard let next = try? reader.skipValue(at: position + length, limit: end, path: []) else { break }
            position = next
        }
        return keys
    }

    /// A separate decoder for the value at `position` (`superDecoder`).
    func subDecoder(at position: Int, limit: Int, base: BinaryCodingPath, key: any CodingKey) -> BinaryDecoderState {
        BinaryDecoderState(base: reader.base, count: count, start: position, limit: limit, path: base, key: key)
    }
}

struct BinaryKeyedDecoder<Key: CodingKey>: KeyedDecodingContainerProtocol {
    let state: BinaryDecoderState
    let bodyStart: Int
    let end: Int
    let count: Int
    let path: BinaryCodingPath

    var codingPath: [any CodingKey] { path.keys }

    var allKeys: [Key] {
        state.keys(bodyStart: bodyStart, end: end).compactMap { Key(stringValue: $0) }
    }

    func contains(_ key: Key) -> Bool {
        ((try? find(key)) ?? nil) != nil
    }

    @inline(__always)
    private func find(_ key: Key) throws -> Int? {
        var name = key.stringValue
        return try name.withUTF8 { try state.findEntry($0, bodyStart: bodyStart, end: end, path: path.keys) }
    }

    @inline(__always)
    private func require(_ key: Key) throws -> Int {
        guard let position = try find(key) else {
            throw DecodingError.keyNotFound(key, DecodingError.Context(
                codingPath: path.keys, debugDescription: "No value associated with key \(key) (\"\(key.stringValue)\")."))
        }
        return position
    }

    private func keyPath(_ key: Key) -> [any CodingKey] { path.keys + [key] }

    func decodeNil(forKey key: Key) throws -> Bool {
        try state.isNil(at: try require(key), limit: end, path: keyPath(key))
    }

    func decode(_ type: Bool.Type, forKey key: Key) throws -> Bool {
        var at = try require(key)
        return try state.readBool(&at, limit: end, path: keyPath(key))
    }

    func decode(_ type: String.Type, forKey key: Key) throws -> String {
        var at = try require(key)
        return try state.readString(&at, limit: end, path: keyPath(key))
    }

    func decode(_ type: Double.Type, forKey key: Key) throws -> Double {
        var at = try require(key)
        return try state.readDouble(&at, limit: end, path: keyPath(key))
    }

    func decode(_ type: Float.Type, forKey key: Key) throws -> Float {
        var at = try require(key)
        return try state.readFloat(&at, limit: end, path: keyPath(key))
    }

    @inline(__always)
    private func integer<I: FixedWidthInteger>(_ type: I.Type, _ key: Key) throws -> I {
        var at = try require(key)
        return try state.readInteger(I.self, &at, limit: end, path: keyPath(key))
    }

    func decode(_ type: Int.Type, forKey key: Key) throws -> Int { try integer(type, key) }
    func decode(_ type: Int8.Type, forKey key: Key) throws -> Int8 { try integer(type, key) }
    func decode(_ type: Int16.Type, forKey key: Key) throws -> Int16 { try integer(type, key) }
    func decode(_ type: Int32.Type, forKey key: Key) throws -> Int32 { try integer(type, key) }
    func decode(_ type: Int64.Type, forKey key: Key) throws -> Int64 { try integer(type, key) }
    func decode(_ type: UInt.Type, forKey key: Key) throws -> UInt { try integer(type, key) }
    func decode(_ type: UInt8.Type, forKey key: Key) throws -> UInt8 { try integer(type, key) }
    func decode(_ type: UInt16.Type, forKey key: Key) throws -> UInt16 { try integer(type, key) }
    func decode(_ type: UInt32.Type, forKey key: Key) throws -> UInt32 { try integer(type, key) }
    func decode(_ type: UInt64.Type, forKey key: Key) throws -> UInt64 { try integer(type, key) }

    func decode<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T {
        try state.decodeValue(T.self, at: try require(key), limit: end, base: path, key: key)
    }

    /// The value's position, or `nil` when the key is absent or holds nil.
    @inline(__always)
    private func present(_ key: Key) throws -> Int? {
        guard let at = try find(key), try !state.isNil(at: at, limit: end, path: keyPath(key)) else { return nil }
        return at
    }

    func decodeIfPresent(_ type: Bool.Type, forKey key: Key) throws -> Bool? {
        guard var at = try present(key) else { return nil }
        return try state.readBool(&at, limit: end, path: keyPath(key))
    }

    func decodeIfPresent(_ type: String.Type, forKey key: Key) throws -> String? {
        guard var at = try present(key) else { return nil }
        return try state.readString(&at, limit: end, path: keyPath(key))
    }

    func decodeIfPresent(_ type: Double.Type, forKey key: Key) throws -> Double? {
        guard var at = try present(key) else { return nil }
        return try state.readDouble(&at, limit: end, path: keyPath(key))
    }

    func decodeIfPresent(_ type: Float.Type, forKey key: Key) throws -> Float? {
        guard var at = try present(key) else { return nil }
        return try state.readFloat(&at, limit: end, path: keyPath(key))
    }

    @inline(__always)
    private func integerIfPresent<I: FixedWidthInteger>(_ type: I.Type, _ key: Key) throws -> I? {
        guard var at = try present(key) else { return nil }
        return try state.readInteger(I.self, &at, limit: end, path: keyPath(key))
    }

    func decodeIfPresent(_ type: Int.Type, forKey key: Key) throws -> Int? { try integerIfPresent(type, key) }
    func decodeIfPresent(_ type: Int8.Type, forKey key: Key) throws -> Int8? { try integerIfPresent(type, key) }
    func decodeIfPresent(_ type: Int16.Type, forKey key: Key) throws -> Int16? { try integerIfPresent(type, key) }
    func decodeIfPresent(_ type: Int32.Type, forKey key: Key) throws -> Int32? { try integerIfPresent(type, key) }
    func decodeIfPresent(_ type: Int64.Type, forKey key: Key) throws -> Int64? { try integerIfPresent(type, key) }
    func decodeIfPresent(_ type: UInt.Type, forKey key: Key) throws -> UInt? { try integerIfPresent(type, key) }
    func decodeIfPresent(_ type: UInt8.Type, forKey key: Key) throws -> UInt8? { try integerIfPresent(type, key) }
    func decodeIfPresent(_ type: UInt16.Type, forKey key: Key) throws -> UInt16? { try integerIfPresent(type, key) }
    func decodeIfPresent(_ type: UInt32.Type, forKey key: Key) throws -> UInt32? { try integerIfPresent(type, key) }
    func decodeIfPresent(_ type: UInt64.Type, forKey key: Key) throws -> UInt64? { try integerIfPresent(type, key) }

    func decodeIfPresent<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T? {
        guard let at = try find(key) else { return nil }
        // A stored nil is an absent value, unless T is itself Optional: then it is `.some(nil)`.
        if try state.isNil(at: at, limit: end, path: keyPath(key)), !(T.self is any BinaryOptionalMarker.Type) { return nil }
        return try state.decodeValue(T.self, at: at, limit: end, base: path, key: key)
    }

    func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type, forKey key: Key) throws -> KeyedDecodingContainer<NestedKey> {
        let (body, nestedEnd, count) = try state.openContainer(
            at: try require(key), limit: end, tag: BinaryFormat.keyed, type: KeyedDecodingContainer<NestedKey>.self, path: keyPath(key))
        return KeyedDecodingContainer(BinaryKeyedDecoder<NestedKey>(
            state: state, bodyStart: body, end: nestedEnd, count: count, path: path.appending(key)))
    }

    func nestedUnkeyedContainer(forKey key: Key) throws -> any UnkeyedDecodingContainer {
        let (body, nestedEnd, count) = try state.openContainer(
            at: try require(key), limit: end, tag: BinaryFormat.unkeyed, type: (any UnkeyedDecodingContainer).self, path: keyPath(key))
        return BinaryUnkeyedDecoder(state: state, position: body, end: nestedEnd, total: count, path: path.appending(key))
    }

    func superDecoder() throws -> any Decoder {
        let key = BinarySuperKey()
        var name = key.stringValue
        guard let at = try name.withUTF8({ try state.findEntry($0, bodyStart: bodyStart, end: end, path: path.keys) }) else {
            throw DecodingError.keyNotFound(key, DecodingError.Context(
                codingPath: path.keys, debugDescription: "No value associated with key \"super\"."))
        }
        return state.subDecoder(at: at, limit: end, base: path, key: key)
    }

    func superDecoder(forKey key: Key) throws -> any Decoder {
        state.subDecoder(at: try require(key), limit: end, base: path, key: key)
    }
}

struct BinaryUnkeyedDecoder: UnkeyedDecodingContainer {
    let state: BinaryDecoderState
    var position: Int
    let end: Int
    let total: Int
    let path: BinaryCodingPath
    private(set) var currentIndex = 0

    init(state: BinaryDecoderState, position: Int, end: Int, total: Int, path: BinaryCodingPath) {
        self.state = state
        self.position = position
        self.end = end
        self.total = total
        self.path = path
    }

    var codingPath: [any CodingKey] { path.keys }
    var count: Int? { total }
    var isAtEnd: Bool { currentIndex >= total }

    private func elementPath() -> [any CodingKey] { path.keys + [BinaryIndexKey(currentIndex)] }

    @inline(__always)
    private func checkNotAtEnd(_ type: Any.Type) throws {
        guard !isAtEnd else {
            throw DecodingError.valueNotFound(type, DecodingError.Context(
                codingPath: elementPath(), debugDescription: "Unkeyed container is at end."))
        }
    }

    mutating func decodeNil() throws -> Bool {
        try checkNotAtEnd(Optional<Any>.self)
        guard try state.isNil(at: position, limit: end, path: elementPath()) else { return false }
        position += 1
        currentIndex += 1
        return true
    }

    mutating func decode(_ type: Bool.Type) throws -> Bool {
        try checkNotAtEnd(type)
        var at = position
        let value = try state.readBool(&at, limit: end, path: elementPath())
        position = at
        currentIndex += 1
        return value
    }

    mutating func decode(_ type: String.Type) throws -> String {
        try checkNotAtEnd(type)
        var at = position
        let value = try state.readString(&at, limit: end, path: elementPath())
        position = at
        currentIndex += 1
        return value
    }

    mutating func decode(_ type: Double.Type) throws -> Double {
        try checkNotAtEnd(type)
        var at = position
        let value = try state.readDouble(&at, limit: end, path: elementPath())
        position = at
        currentIndex += 1
        return value
    }

    mutating func decode(_ type: Float.Type) throws -> Float {
        try checkNotAtEnd(type)
        var at = position
        let value = try state.readFloat(&at, limit: end, path: elementPath())
        position = at
        currentIndex += 1
        return value
    }

    @inline(__always)
    private mutating func integer<I: FixedWidthInteger>(_ type: I.Type) throws -> I {
        try checkNotAtEnd(type)
        var at = position
        let value = try state.readInteger(I.self, &at, limit: end, path: elementPath())
        position = at
        currentIndex += 1
        return value
    }

    mutating func decode(_ type: Int.Type) throws -> Int { try integer(type) }
    mutating func decode(_ type: Int8.Type) throws -> Int8 { try integer(type) }
    mutating func decode(_ type: Int16.Type) throws -> Int16 { try integer(type) }
    mutating func decode(_ type: Int32.Type) throws -> Int32 { try integer(type) }
    mutating func decode(_ type: Int64.Type) throws -> Int64 { try integer(type) }
    mutating func decode(_ type: UInt.Type) throws -> UInt { try integer(type) }
    mutating func decode(_ type: UInt8.Type) throws -> UInt8 { try integer(type) }
    mutating func decode(_ type: UInt16.Type) throws -> UInt16 { try integer(type) }
    mutating func decode(_ type: UInt32.Type) throws -> UInt32 { try integer(type) }
    mutating func decode(_ type: UInt64.Type) throws -> UInt64 { try integer(type) }

    mutating func decode<T: Decodable>(_ type: T.Type) throws -> T {
        try checkNotAtEnd(type)
        let next = try state.reader.skipValue(at: position, limit: end, path: elementPath())
        let value = try state.decodeValue(T.self, at: position, limit: next, base: path, key: BinaryIndexKey(currentIndex))
        position = next
        currentIndex += 1
        return value
    }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type) throws -> KeyedDecodingContainer<NestedKey> {
        try checkNotAtEnd(KeyedDecodingContainer<NestedKey>.self)
        let (body, nestedEnd, count) = try state.openContainer(
            at: position, limit: end, tag: BinaryFormat.keyed, type: KeyedDecodingContainer<NestedKey>.self, path: elementPath())
        let container = BinaryKeyedDecoder<NestedKey>(
            state: state, bodyStart: body, end: nestedEnd, count: count, path: path.appending(BinaryIndexKey(currentIndex)))
        position = nestedEnd
        currentIndex += 1
        return KeyedDecodingContainer(container)
    }

    mutating func nestedUnkeyedContainer() throws -> any UnkeyedDecodingContainer {
        try checkNotAtEnd((any UnkeyedDecodingContainer).self)
        let (body, nestedEnd, count) = try state.openContainer(
            at: position, limit: end, tag: BinaryFormat.unkeyed, type: (any UnkeyedDecodingContainer).self, path: elementPath())
        let container = BinaryUnkeyedDecoder(
            state: state, position: body, end: nestedEnd, total: count, path: path.appending(BinaryIndexKey(currentIndex)))
        position = nestedEnd
        currentIndex += 1
        return container
    }

    mutating func superDecoder() throws -> any Decoder {
        try checkNotAtEnd((any Decoder).self)
        let next = try state.reader.skipValue(at: position, limit: end, path: elementPath())
        let decoder = state.subDecoder(at: position, limit: next, base: path, key: BinaryIndexKey(currentIndex))
        position = next
        currentIndex += 1
        return decoder
    }
}

/// Three words (state, position, limit), so it fits an existential inline.
struct BinarySingleValueDecoder: SingleValueDecodingContainer {
    let state: BinaryDecoderState
    let position: Int
    let limit: Int

    var codingPath: [any CodingKey] { state.slotBase.appending(state.slotKey).keys }

    func decodeNil() -> Bool {
        ((try? state.isNil(at: position, limit: limit, path: [])) ?? false)
    }

    func decode(_ type: Bool.Type) throws -> Bool {
        var at = position
        return try state.readBool(&at, limit: limit, path: codingPath)
    }

    func decode(_ type: String.Type) throws -> String {
        var at = position
        return try state.readString(&at, limit: limit, path: codingPath)
    }

    func decode(_ type: Double.Type) throws -> Double {
        var at = position
        return try state.readDouble(&at, limit: limit, path: codingPath)
    }

    func decode(_ type: Float.Type) throws -> Float {
        var at = position
        return try state.readFloat(&at, limit: limit, path: codingPath)
    }

    @inline(__always)
    private func integer<I: FixedWidthInteger>(_ type: I.Type) throws -> I {
        var at = position
        return try state.readInteger(I.self, &at, limit: limit, path: codingPath)
    }

    func decode(_ type: Int.Type) throws -> Int { try integer(type) }
    func decode(_ type: Int8.Type) throws -> Int8 { try integer(type) }
    func decode(_ type: Int16.Type) throws -> Int16 { try integer(type) }
    func decode(_ type: Int32.Type) throws -> Int32 { try integer(type) }
    func decode(_ type: Int64.Type) throws -> Int64 { try integer(type) }
    func decode(_ type: UInt.Type) throws -> UInt { try integer(type) }
    func decode(_ type: UInt8.Type) throws -> UInt8 { try integer(type) }
    func decode(_ type: UInt16.Type) throws -> UInt16 { try integer(type) }
    func decode(_ type: UInt32.Type) throws -> UInt32 { try integer(type) }
    func decode(_ type: UInt64.Type) throws -> UInt64 { try integer(type) }

    func decode<T: Decodable>(_ type: T.Type) throws -> T {
        var at = position
        // The encoder marks an Optional that holds an Optional; step over one mark per level.
        if try state.reader.byte(at: at, limit: limit, path: codingPath) == BinaryFormat.some { at += 1 }
        return try state.decodeValue(T.self, at: at, limit: limit, base: state.slotBase, key: state.slotKey)
    }
}
