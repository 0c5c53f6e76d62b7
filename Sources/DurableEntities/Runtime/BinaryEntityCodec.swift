import Foundation
import Synchronization

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
        if let message = BinaryScalarMessage.encode(value) { return message }
        return try BinaryEncoderState.encodeMessage(value)
    }

    public func decode<Value: Decodable>(_ type: Value.Type, from bytes: UnsafeRawBufferPointer) throws -> Value {
        // No `Value?` here: for a generic `Value` its metadata is looked up at run time on every call.
        switch BinaryScalarMessage.decode(type, from: bytes) {
        case .none: return try BinaryDecoderState.decodeMessage(type, from: bytes)
        case .int64(let value): return unsafeBitCast(value, to: Value.self)
        case .int(let value): return unsafeBitCast(value, to: Value.self)
        case .uint64(let value): return unsafeBitCast(value, to: Value.self)
        case .int32(let value): return unsafeBitCast(value, to: Value.self)
        case .bool(let value): return unsafeBitCast(value, to: Value.self)
        case .string(let value): return unsafeBitCast(value, to: Value.self)
        }
    }
}

/// Messages that are one integer, `Bool` or `String` (activity outputs, run outputs and the like),
/// written and read without an encoder or decoder object: the same bytes the general path writes,
/// without its allocations. Reading takes only the exact form this writes; anything else (another
/// tag, an integer that does not fit, a truncated or longer message) goes to the general path,
/// which converts what it can and reports the rest.
enum BinaryScalarMessage {
    @inline(__always)
    static func encode<Value: Encodable>(_ value: Value) -> [UInt8]? {
        if Value.self == Int64.self { return tagged(BinaryFormat.signed, BinaryFormat.zigzag(unsafeBitCast(value, to: Int64.self))) }
        if Value.self == Int.self { return tagged(BinaryFormat.signed, BinaryFormat.zigzag(Int64(unsafeBitCast(value, to: Int.self)))) }
        if Value.self == UInt64.self { return tagged(BinaryFormat.unsigned, unsafeBitCast(value, to: UInt64.self)) }
        if Value.self == Int32.self { return tagged(BinaryFormat.signed, BinaryFormat.zigzag(Int64(unsafeBitCast(value, to: Int32.self)))) }
        if Value.self == Bool.self {
            return [BinaryFormat.marker, unsafeBitCast(value, to: Bool.self) ? BinaryFormat.trueValue : BinaryFormat.falseValue]
        }
        if Value.self == String.self {
            var string = unsafeBitCast(value, to: String.self)
            return string.withUTF8 { utf8 in
                var out = [UInt8]()
                out.reserveCapacity(12 + utf8.count)
                out.append(BinaryFormat.marker)
                out.append(BinaryFormat.string)
                BinaryFormat.appendVarint(UInt64(utf8.count), to: &out)
                out.append(contentsOf: utf8)
                return out
            }
        }
        return nil
    }

    @inline(__always)
    private static func tagged(_ tag: UInt8, _ value: UInt64) -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(12)
        out.append(BinaryFormat.marker)
        out.append(tag)
        BinaryFormat.appendVarint(value, to: &out)
        return out
    }

    /// A scalar read by the shortcut, of the type asked for (the caller casts it), or `none`.
    enum Decoded {
        case none
        case int64(Int64)
        case int(Int)
        case uint64(UInt64)
        case int32(Int32)
        case bool(Bool)
        case string(String)
    }

    @inline(__always)
    static func decode<Value: Decodable>(_ type: Value.Type, from bytes: UnsafeRawBufferPointer) -> Decoded {
        guard bytes.count >= 2, bytes[0] == BinaryFormat.marker else { return .none }
        let tag = bytes[1]
        if Value.self == Int64.self {
            guard tag == BinaryFormat.signed, let raw = varint(bytes, from: 2, toEnd: true) else { return .none }
            return .int64(BinaryFormat.unzigzag(raw))
        }
        if Value.self == Int.self {
            guard tag == BinaryFormat.signed, let raw = varint(bytes, from: 2, toEnd: true),
                  let value = Int(exactly: BinaryFormat.unzigzag(raw)) else { return .none }
            return .int(value)
        }
        if Value.self == UInt64.self {
            guard tag == BinaryFormat.unsigned, let raw = varint(bytes, from: 2, toEnd: true) else { return .none }
            return .uint64(raw)
        }
        if Value.self == Int32.self {
            guard tag == BinaryFormat.signed, let raw = varint(bytes, from: 2, toEnd: true),
                  let value = Int32(exactly: BinaryFormat.unzigzag(raw)) else { return .none }
            return .int32(value)
        }
        if Value.self == Bool.self {
            guard bytes.count == 2, tag == BinaryFormat.trueValue || tag == BinaryFormat.falseValue else { return .none }
            return .bool(tag == BinaryFormat.trueValue)
        }
        if Value.self == String.self {
            guard tag == BinaryFormat.string else { return .none }
            var end = 2
            guard let length = varint(bytes, from: 2, toEnd: false, end: &end), length == UInt64(bytes.count - end) else { return .none }
            return .string(String(decoding: UnsafeRawBufferPointer(rebasing: bytes[end...]), as: UTF8.self))
        }
        return .none
    }

    /// A varint of at most 9 bytes (63 bits) at `from`; with `toEnd`, only if it ends the message.
    @inline(__always)
    private static func varint(_ bytes: UnsafeRawBufferPointer, from start: Int, toEnd: Bool) -> UInt64? {
        var end = start
        guard let value = varint(bytes, from: start, toEnd: toEnd, end: &end) else { return nil }
        return value
    }

    @inline(__always)
    private static func varint(_ bytes: UnsafeRawBufferPointer, from start: Int, toEnd: Bool, end: inout Int) -> UInt64? {
        var value: UInt64 = 0
        var shift: UInt64 = 0
        var position = start
        while position < bytes.count, position - start < 9 {
            let byte = bytes[position]
            value |= UInt64(byte & 0x7F) << shift
            position += 1
            if byte < 0x80 {
                guard !toEnd || position == bytes.count else { return nil }
                end = position
                return value
            }
            shift += 7
        }
        return nil
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
    /// `[UInt8]`'s metadata, looked up once: naming a generic type's metadata in a type comparison
    /// asks the runtime for it every time (a hash-table lookup), and every value passes that test.
    static let byteArrayType = ObjectIdentifier([UInt8].self)

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

    /// Sorts the entries of a keyed container's body, `bytes[start..<end]`, by key bytes. Leaves
    /// the bytes as they are if they do not parse (they always do: the encoder wrote them).
    static func sortEntries(_ bytes: UnsafeMutablePointer<UInt8>, from start: Int, to end: Int) {
        typealias Entry = (keyStart: Int, keyLength: Int, entryStart: Int, entryEnd: Int)
        let reader = BinaryReader(base: UnsafeRawPointer(bytes))
        var entries: [Entry] = []
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
            return
        }
        func precedes(_ a: Entry, _ b: Entry) -> Bool {
            let common = min(a.keyLength, b.keyLength)
            let order = common == 0 ? 0 : memcmp(bytes + a.keyStart, bytes + b.keyStart, common)
            return order != 0 ? order < 0 : a.keyLength < b.keyLength
        }
        guard entries.count > 1, !zip(entries, entries.dropFirst()).allSatisfy({ !precedes($1, $0) }) else { return }
        var body: [UInt8] = []
        body.reserveCapacity(end - start)
        for entry in entries.sorted(by: precedes) {
            body.append(contentsOf: UnsafeBufferPointer(start: bytes + entry.entryStart, count: entry.entryEnd - entry.entryStart))
        }
        (bytes + start).update(from: body, count: body.count)
    }
}

/// `Optional`, recognizable from a generic context.
protocol BinaryOptionalMarker {}
extension Optional: BinaryOptionalMarker {}

// MARK: - Coding paths

// Neither side keeps coding paths while it works: the encoder derives one from its stack of open
// containers, and the decoder from the bytes themselves (the format is self-describing, so the
// path to any offset can be read off the message). Both do it only when asked: for an error, or
// when a `Codable` implementation reads `codingPath`.

/// A key read back from the data, for coding paths.
struct BinaryPathKey: CodingKey {
    let stringValue: String
    init(_ stringValue: String) { self.stringValue = stringValue }
    init?(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { nil }
    var intValue: Int? { nil }
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
///
/// Its hot mutable fields are `@exclusivity(unchecked)`: a state lives within one synchronous
/// `encode` call on one thread and never overlaps its own accesses, and the dynamic checks cost ~15%.
/// One streaming ``BinaryEncoderState`` per thread, kept between messages: a state is two
/// allocations (the object and its first buffers), and every message a turn, an attempt or a caller
/// encodes made both (eight a transfer in `saga-transfer`). ``BinaryEncoderState/encodeMessage(_:)``
/// is synchronous, so it gives the state back on the thread it took it from; a message encoded while
/// another is being encoded on the same thread (an `encode(to:)` that encodes a message itself) finds
/// none and makes its own.
enum EncoderStates {
    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        let status = pthread_key_create(&key) { kept in
            // The thread ends: its kept state goes with it.
            if let kept { Unmanaged<BinaryEncoderState>.fromOpaque(kept).release() }
        }
        precondition(status == 0, "pthread_key_create failed (\(status))")
        return key
    }()

    /// The thread's kept state, now the caller's; `nil` if it has none.
    static func take() -> BinaryEncoderState? {
        guard let kept = pthread_getspecific(key) else { return nil }
        pthread_setspecific(key, nil)
        return Unmanaged<BinaryEncoderState>.fromOpaque(kept).takeRetainedValue()
    }

    /// Keeps `state` for the thread's next message (unless it already keeps one).
    static func keep(_ state: BinaryEncoderState) {
        guard pthread_getspecific(key) == nil else { return }
        pthread_setspecific(key, Unmanaged.passRetained(state).toOpaque())
    }
}

final class BinaryEncoderState: Encoder {
    struct Frame {
        var start: Int
        var count: Int
        /// Keyed containers: where the last entry's key begins (for coding paths).
        var lastKeyStart: Int
        var generation: UInt32
        var sortsKeys: Bool
    }

    /// Where a value goes: at `start`, inside the container at `parentDepth` (-1: the state's root;
    /// -2: nowhere, a failed container).
    struct Slot {
        var parentDepth: Int32
        var parentGeneration: UInt32
        var start: Int

        static func root(at start: Int) -> Slot { Slot(parentDepth: -1, parentGeneration: 0, start: start) }
        static let dead = Slot(parentDepth: -2, parentGeneration: 0, start: -1)
    }

    // The output bytes and the stack of open containers, in one allocation to begin with (each
    // moves to its own when it outgrows it). Raw memory: `Array`'s uniqueness and capacity checks
    // on every small write cost more than the writes.
    static let initialFrames = 8
    static let initialBytes = 256
    private let storage: UnsafeMutableRawPointer
    @exclusivity(unchecked) private(set) var bytes: UnsafeMutablePointer<UInt8>
    @exclusivity(unchecked) private(set) var length = 0
    @exclusivity(unchecked) private var capacity = BinaryEncoderState.initialBytes
    @exclusivity(unchecked) private var frames: UnsafeMutablePointer<Frame>
    @exclusivity(unchecked) private(set) var depth = 0
    @exclusivity(unchecked) private var frameCapacity = BinaryEncoderState.initialFrames
    @exclusivity(unchecked) private var nextGeneration: UInt32 = 1
    @exclusivity(unchecked) var slot: Slot

    let isolated: Bool
    /// Isolated mode: nested values, to be spliced in at their offsets.
    var children: [(offset: Int, state: BinaryEncoderState)] = []
    /// Isolated mode: the coding path of this state's root value.
    var basePath: [any CodingKey] = []

    /// Streaming mode: containers were used out of order; encode again in isolated mode.
    @exclusivity(unchecked) var violated = false
    /// Isolated mode: the first misuse, thrown by ``finish(into:)`` even if the caller swallowed it.
    var pendingError: (any Error)?

    /// Set only to learn the key type `Dictionary` uses (see ``dictionaryKeyType``).
    var recordsKeyType = false
    var recordedKeyType: ObjectIdentifier?

    init(isolated: Bool, root: Int = 0) {
        self.isolated = isolated
        self.slot = .root(at: root)
        let framesSize = Self.initialFrames * MemoryLayout<Frame>.stride
        storage = UnsafeMutableRawPointer.allocate(byteCount: framesSize + Self.initialBytes, alignment: MemoryLayout<Frame>.alignment)
        frames = storage.bindMemory(to: Frame.self, capacity: Self.initialFrames)
        bytes = (storage + framesSize).bindMemory(to: UInt8.self, capacity: Self.initialBytes)
    }

    deinit {
        if UnsafeMutableRawPointer(frames) != storage { frames.deallocate() }
        if capacity != Self.initialBytes { bytes.deallocate() }
        storage.deallocate()
    }

    /// Encodes one message.
    static func encodeMessage<Value: Encodable>(_ value: Value) throws -> [UInt8] {
        var state = EncoderStates.take() ?? BinaryEncoderState(isolated: false, root: 1)
        defer {
            // Kept for the thread's next message unless something held on to it (an `encode(to:)`
            // that stored its encoder) or it grew large.
            if isKnownUniquelyReferenced(&state), state.prepareForReuse() { EncoderStates.keep(state) }
        }
        state.put(BinaryFormat.marker)
        do {
            try state.encodeValue(value, at: state.slot)
        } catch {
            if !state.violated { throw error }
        }
        if !state.violated {
            while state.depth > 0 { state.closeTop() }
            return Array(state.written)
        }
        // Containers were used out of nesting order: encode again, each nested value on its own.
        let isolated = BinaryEncoderState(isolated: true)
        try isolated.encodeValue(value, at: isolated.slot)
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

    /// The bytes written so far.
    var written: UnsafeBufferPointer<UInt8> { UnsafeBufferPointer(start: bytes, count: length) }

    // MARK: Encoder

    var codingPath: [any CodingKey] { codingPath(for: slot) }
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    func container<Key: CodingKey>(keyedBy type: Key.Type) -> KeyedEncodingContainer<Key> {
        KeyedEncodingContainer(keyedContainer(Key.self, at: slot))
    }

    func unkeyedContainer() -> any UnkeyedEncodingContainer {
        unkeyedContainer(at: slot)
    }

    func singleValueContainer() -> any SingleValueEncodingContainer {
        BinarySingleValueEncoder(state: self, slot: slot)
    }

    // MARK: Coding paths

    /// The coding path of the container open at `depth`.
    func codingPath(depth: Int) -> [any CodingKey] {
        var keys = basePath
        guard depth > 0 else { return keys }
        for index in 0..<min(depth, self.depth) { keys.append(lastKey(of: frames[index])) }
        return keys
    }

    /// The coding path of the value going to `slot`.
    func codingPath(for slot: Slot) -> [any CodingKey] {
        let parent = Int(slot.parentDepth)
        guard parent >= 0, parent < depth else { return basePath }
        return codingPath(depth: parent) + [lastKey(of: frames[parent])]
    }

    /// The key of the last entry of a container.
    func lastKey(of frame: Frame) -> any CodingKey {
        guard frame.start < length, bytes[frame.start] == BinaryFormat.keyed, frame.lastKeyStart >= 0 else {
            return BinaryIndexKey(max(0, frame.count - 1))
        }
        var position = frame.lastKeyStart
        guard let keyLength = try? BinaryReader(base: UnsafeRawPointer(bytes)).length(&position, limit: length, path: []) else {
            return BinaryPathKey("")
        }
        return BinaryPathKey(String(decoding: UnsafeBufferPointer(start: bytes + position, count: keyLength), as: UTF8.self))
    }

    // MARK: Containers

    func keyedContainer<Key: CodingKey>(_ type: Key.Type, at slot: Slot) -> BinaryKeyedEncoder<Key> {
        var sortsKeys = false
        if recordsKeyType {
            recordedKeyType = ObjectIdentifier(Key.self)
        } else {
            sortsKeys = ObjectIdentifier(Key.self) == Self.dictionaryKeyType
        }
        let (depth, generation) = openContainer(at: slot, tag: BinaryFormat.keyed, sortsKeys: sortsKeys)
        return BinaryKeyedEncoder(state: self, depth: depth, generation: generation)
    }

    func unkeyedContainer(at slot: Slot) -> BinaryUnkeyedEncoder {
        let (depth, generation) = openContainer(at: slot, tag: BinaryFormat.unkeyed, sortsKeys: false)
        return BinaryUnkeyedEncoder(state: self, depth: depth, generation: generation)
    }

    /// Opens a container at `slot`, or returns the one already open there (a class and its
    /// superclass both asking the same encoder for a keyed container). `(-1, 0)` when neither is
    /// possible: every use of that container then fails.
    func openContainer(at slot: Slot, tag: UInt8, sortsKeys: Bool) -> (Int32, UInt32) {
        if parentIsOpen(slot) {
            let index = Int(slot.parentDepth) + 1
            if length == slot.start && depth == index {
                nextGeneration = nextGeneration == .max ? 1 : nextGeneration + 1
                if depth == frameCapacity { growFrames() }
                frames[depth] = Frame(start: slot.start, count: 0, lastKeyStart: -1, generation: nextGeneration, sortsKeys: sortsKeys)
                depth += 1
                reserve(3)
                bytes[length] = tag
                bytes[length + 1] = 0  // length and count, fixed up when the container closes
                bytes[length + 2] = 0
                length += 3
                return (Int32(index), nextGeneration)
            }
            if index < depth, frames[index].start == slot.start, bytes[slot.start] == tag {
                while depth > index + 1 { closeTop() }
                return (Int32(index), frames[index].generation)
            }
        }
        _ = failure("a value was already encoded here, or its container was used out of order", path: codingPath(for: slot))
        return (-1, 0)
    }

    @inline(__always)
    func parentIsOpen(_ slot: Slot) -> Bool {
        if slot.parentDepth < 0 { return slot.parentDepth == -1 }
        let index = Int(slot.parentDepth)
        return index < depth && frames[index].generation == slot.parentGeneration
    }

    /// Makes the container at `index` the innermost open one, closing those inside it.
    @inline(__always)
    func prepare(_ index: Int32, _ generation: UInt32) throws {
        let index = Int(index)
        guard index >= 0, index < depth, frames[index].generation == generation else {
            throw failure("a container was used after a container outside it moved on", path: codingPath(depth: max(0, index)))
        }
        while depth > index + 1 { closeTop() }
    }

    /// Checks that nothing was encoded at `slot` yet, before writing a single value there.
    @inline(__always)
    func prepareScalar(at slot: Slot) throws {
        guard parentIsOpen(slot), length == slot.start else {
            throw failure("a single value container can encode only one value", path: codingPath(for: slot))
        }
    }

    func failure(_ message: String, path: @autoclosure () -> [any CodingKey]) -> any Error {
        if let pendingError { return pendingError }
        guard isolated else {
            violated = true
            return BinaryEncodingRestart()
        }
        let error = EncodingError.invalidValue(
            (), EncodingError.Context(codingPath: path(), debugDescription: "BinaryEntityCodec: \(message)."))
        pendingError = error
        return error
    }

    /// Closes the innermost open container (streaming mode): writes its length and count.
    func closeTop() {
        guard depth > 0 else { return }
        depth -= 1
        let frame = frames[depth]
        let bodyStart = frame.start + 3
        if frame.sortsKeys && frame.count > 1 {
            BinaryFormat.sortEntries(bytes, from: bodyStart, to: length)
        }
        let bodyLength = length - bodyStart
        let contentLength = BinaryFormat.varintSize(frame.count) + bodyLength
        if contentLength < 0x80 && frame.count < 0x80 {
            bytes[frame.start + 1] = UInt8(truncatingIfNeeded: contentLength)
            bytes[frame.start + 2] = UInt8(truncatingIfNeeded: frame.count)
            return
        }
        var header: [UInt8] = []
        BinaryFormat.appendVarint(UInt64(contentLength), to: &header)
        BinaryFormat.appendVarint(UInt64(frame.count), to: &header)
        let extra = header.count - 2
        reserve(extra)
        (bytes + bodyStart + extra).update(from: bytes + bodyStart, count: bodyLength)
        (bytes + frame.start + 1).update(from: header, count: header.count)
        length += extra
    }

    /// Isolated mode: appends this state's value, children spliced in, to `out`.
    func finish(into out: inout [UInt8]) throws {
        if let pendingError { throw pendingError }
        guard length > 0 else {
            out.append(contentsOf: [BinaryFormat.keyed, 1, 0])  // a value that encoded nothing
            return
        }
        guard depth > 0 else {
            out.append(contentsOf: written)
            return
        }
        let frame = frames[0]
        out.append(contentsOf: UnsafeBufferPointer(start: bytes, count: frame.start + 1))  // Optional wrappers, then the tag
        var body: [UInt8] = []
        var copied = frame.start + 3
        for (offset, child) in children {
            body.append(contentsOf: UnsafeBufferPointer(start: bytes + copied, count: offset - copied))
            try child.finish(into: &body)
            copied = offset
        }
        body.append(contentsOf: UnsafeBufferPointer(start: bytes + copied, count: length - copied))
        if frame.sortsKeys && frame.count > 1 {
            body.withUnsafeMutableBufferPointer { raw in
                if let base = raw.baseAddress { BinaryFormat.sortEntries(base, from: 0, to: raw.count) }
            }
        }
        BinaryFormat.appendVarint(UInt64(BinaryFormat.varintSize(frame.count) + body.count), to: &out)
        BinaryFormat.appendVarint(UInt64(frame.count), to: &out)
        out.append(contentsOf: body)
    }

    // MARK: Entries

    @inline(__always)
    func beginKeyedEntry(_ index: Int32, _ generation: UInt32, _ key: String) throws {
        try prepare(index, generation)
        let frame = frames + Int(index)
        frame.pointee.lastKeyStart = length
        frame.pointee.count += 1
        putKey(key)
    }

    @inline(__always)
    func beginUnkeyedEntry(_ index: Int32, _ generation: UInt32) throws {
        try prepare(index, generation)
        frames[Int(index)].count += 1
    }

    /// Where the value of the entry just begun goes: in place, or (isolated) in a new child state.
    @inline(__always)
    func entryTarget(_ index: Int32, _ generation: UInt32) -> (BinaryEncoderState, Slot) {
        let slot = Slot(parentDepth: index, parentGeneration: generation, start: length)
        guard isolated else { return (self, slot) }
        let child = BinaryEncoderState(isolated: true)
        child.basePath = codingPath(for: slot)
        children.append((length, child))
        return (child, child.slot)
    }

    func encodeEntry<T: Encodable>(_ value: T, _ index: Int32, _ generation: UInt32) throws {
        let (target, slot) = entryTarget(index, generation)
        try target.encodeValue(value, at: slot)
    }

    func nestedKeyed<NestedKey: CodingKey>(_ type: NestedKey.Type, _ index: Int32, _ generation: UInt32) -> KeyedEncodingContainer<NestedKey> {
        let (target, slot) = entryTarget(index, generation)
        return KeyedEncodingContainer(target.keyedContainer(NestedKey.self, at: slot))
    }

    func nestedUnkeyed(_ index: Int32, _ generation: UInt32) -> any UnkeyedEncodingContainer {
        let (target, slot) = entryTarget(index, generation)
        return target.unkeyedContainer(at: slot)
    }

    /// A failed container: every use throws.
    func deadKeyed<NestedKey: CodingKey>(_ type: NestedKey.Type) -> KeyedEncodingContainer<NestedKey> {
        KeyedEncodingContainer(BinaryKeyedEncoder<NestedKey>(state: self, depth: -1, generation: 0))
    }

    /// The encoder for a `superEncoder` entry just begun (isolated mode). Streaming mode cannot
    /// know when (or whether) it will be used, so there it asks for the isolated encoder instead.
    func superEncoder(_ index: Int32, _ generation: UInt32) -> any Encoder {
        guard isolated else {
            violated = true
            return deadEncoder()
        }
        return entryTarget(index, generation).0
    }

    func deadEncoder() -> BinaryEncoderState {
        let dead = BinaryEncoderState(isolated: isolated)
        dead.slot = .dead
        dead.violated = !isolated
        dead.pendingError = pendingError
        return dead
    }

    // MARK: Values

    /// Encodes `value` at `slot`: primitives directly, anything else through its `encode(to:)`.
    @inline(__always)
    func encodeValue<T: Encodable>(_ value: T, at slot: Slot) throws {
        if try encodePrimitive(value, at: slot) { return }
        try encodeComposite(value, at: slot)
    }

    func encodeComposite<T: Encodable>(_ value: T, at slot: Slot) throws {
        let saved = self.slot
        self.slot = slot
        defer { self.slot = saved }
        try value.encode(to: self)
        if length == slot.start && parentIsOpen(slot) && !violated {
            // It asked for no container: like JSONEncoder, encode an empty keyed container.
            reserve(3)
            bytes[length] = BinaryFormat.keyed
            bytes[length + 1] = 1
            bytes[length + 2] = 0
            length += 3
        }
    }

    /// Encodes the types with a direct representation; `false` for any other type.
    @inline(__always)
    func encodePrimitive<T: Encodable>(_ value: T, at slot: Slot) throws -> Bool {
        if T.self == String.self {
            try prepareScalar(at: slot)
            putString(unsafeBitCast(value, to: String.self))
        } else if T.self == Int.self {
            try prepareScalar(at: slot)
            putSigned(Int64(unsafeBitCast(value, to: Int.self)))
        } else if T.self == Int64.self {
            try prepareScalar(at: slot)
            putSigned(unsafeBitCast(value, to: Int64.self))
        } else if T.self == Double.self {
            try prepareScalar(at: slot)
            putDouble(unsafeBitCast(value, to: Double.self))
        } else if T.self == Bool.self {
            try prepareScalar(at: slot)
            putBool(unsafeBitCast(value, to: Bool.self))
        } else if ObjectIdentifier(T.self) == BinaryFormat.byteArrayType {
            try prepareScalar(at: slot)
            unsafeBitCast(value, to: [UInt8].self).withUnsafeBytes { putBytes($0) }
        } else if T.self == Data.self {
            try prepareScalar(at: slot)
            unsafeBitCast(value, to: Data.self).withUnsafeBytes { putBytes($0) }
        } else if T.self == Date.self {
            try prepareScalar(at: slot)
            putDouble(unsafeBitCast(value, to: Date.self).timeIntervalSinceReferenceDate)
        } else if T.self == UInt64.self {
            try prepareScalar(at: slot)
            putUnsigned(unsafeBitCast(value, to: UInt64.self))
        } else if T.self == Int32.self {
            try prepareScalar(at: slot)
            putSigned(Int64(unsafeBitCast(value, to: Int32.self)))
        } else if T.self == UInt.self {
            try prepareScalar(at: slot)
            putUnsigned(UInt64(unsafeBitCast(value, to: UInt.self)))
        } else if T.self == UInt32.self {
            try prepareScalar(at: slot)
            putUnsigned(UInt64(unsafeBitCast(value, to: UInt32.self)))
        } else if T.self == Float.self {
            try prepareScalar(at: slot)
            putFloat(unsafeBitCast(value, to: Float.self))
        } else if T.self == Int16.self {
            try prepareScalar(at: slot)
            putSigned(Int64(unsafeBitCast(value, to: Int16.self)))
        } else if T.self == Int8.self {
            try prepareScalar(at: slot)
            putSigned(Int64(unsafeBitCast(value, to: Int8.self)))
        } else if T.self == UInt16.self {
            try prepareScalar(at: slot)
            putUnsigned(UInt64(unsafeBitCast(value, to: UInt16.self)))
        } else if T.self == UInt8.self {
            try prepareScalar(at: slot)
            putUnsigned(UInt64(unsafeBitCast(value, to: UInt8.self)))
        } else {
            return false
        }
        return true
    }

    // MARK: Writing

    @inline(__always)
    func reserve(_ extra: Int) {
        if _slowPath(capacity - length < extra) { growBytes(length + extra) }
    }

    private func growBytes(_ needed: Int) {
        var newCapacity = capacity * 2
        while newCapacity < needed { newCapacity *= 2 }
        let grown = UnsafeMutablePointer<UInt8>.allocate(capacity: newCapacity)
        grown.initialize(from: bytes, count: length)
        if capacity != Self.initialBytes { bytes.deallocate() }
        bytes = grown
        capacity = newCapacity
    }

    /// Makes a streaming state whose message is done ready for the next one, as if new; `false`
    /// if it should not be kept (its buffers grew past ``reusableBytes``).
    func prepareForReuse() -> Bool {
        guard !isolated, capacity <= Self.reusableBytes else { return false }
        length = 0
        depth = 0
        nextGeneration = 1
        slot = .root(at: 1)
        violated = false
        pendingError = nil
        if !children.isEmpty { children = [] }
        if !basePath.isEmpty { basePath = [] }
        recordsKeyType = false
        recordedKeyType = nil
        return true
    }

    /// A kept state's output buffer at most: one large message does not pin its buffer to the thread.
    static let reusableBytes = 16_384

    private func growFrames() {
        let grown = UnsafeMutablePointer<Frame>.allocate(capacity: frameCapacity * 2)
        grown.initialize(from: frames, count: depth)
        if UnsafeMutableRawPointer(frames) != storage { frames.deallocate() }
        frames = grown
        frameCapacity *= 2
    }

    @inline(__always) func put(_ byte: UInt8) {
        reserve(1)
        bytes[length] = byte
        length += 1
    }

    /// A tag and a varint.
    @inline(__always) func putTagged(_ tag: UInt8, _ value: UInt64) {
        reserve(11)
        bytes[length] = tag
        putVarintUnchecked(value, at: length + 1)
    }

    /// Writes a varint at `position` (room reserved) and moves `length` past it.
    @inline(__always) private func putVarintUnchecked(_ value: UInt64, at position: Int) {
        var value = value
        var position = position
        while value >= 0x80 {
            bytes[position] = UInt8(truncatingIfNeeded: value) | 0x80
            value >>= 7
            position += 1
        }
        bytes[position] = UInt8(truncatingIfNeeded: value)
        length = position + 1
    }

    @inline(__always) func putNil() { put(BinaryFormat.null) }
    @inline(__always) func putBool(_ value: Bool) { put(value ? BinaryFormat.trueValue : BinaryFormat.falseValue) }
    @inline(__always) func putSigned(_ value: Int64) { putTagged(BinaryFormat.signed, BinaryFormat.zigzag(value)) }
    @inline(__always) func putUnsigned(_ value: UInt64) { putTagged(BinaryFormat.unsigned, value) }

    @inline(__always) func putDouble(_ value: Double) {
        reserve(9)
        bytes[length] = BinaryFormat.double
        UnsafeMutableRawPointer(bytes + length + 1).storeBytes(of: value.bitPattern.littleEndian, as: UInt64.self)
        length += 9
    }

    @inline(__always) func putFloat(_ value: Float) {
        reserve(5)
        bytes[length] = BinaryFormat.float
        UnsafeMutableRawPointer(bytes + length + 1).storeBytes(of: value.bitPattern.littleEndian, as: UInt32.self)
        length += 5
    }

    /// A varint length and then the bytes, optionally after a tag.
    @inline(__always) private func putLengthPrefixed(_ tag: UInt8?, _ source: UnsafeRawBufferPointer) {
        reserve(11 + source.count)
        if let tag {
            bytes[length] = tag
            length += 1
        }
        putVarintUnchecked(UInt64(source.count), at: length)
        guard let base = source.baseAddress else { return }
        let count = source.count
        let target = UnsafeMutableRawPointer(bytes + length)
        if count >= 8 && count <= 16 {
            // Most keys: two overlapping 8-byte moves beat a call to memmove (room is reserved).
            target.storeBytes(of: base.loadUnaligned(as: UInt64.self), as: UInt64.self)
            (target + count - 8).storeBytes(of: base.loadUnaligned(fromByteOffset: count - 8, as: UInt64.self), as: UInt64.self)
        } else if count < 8 {
            for index in 0..<count { target.storeBytes(of: base.load(fromByteOffset: index, as: UInt8.self), toByteOffset: index, as: UInt8.self) }
        } else {
            target.copyMemory(from: base, byteCount: count)
        }
        length += count
    }

    @inline(__always) func putString(_ value: String) {
        var value = value
        value.withUTF8 { putLengthPrefixed(BinaryFormat.string, UnsafeRawBufferPointer($0)) }
    }

    @inline(__always) func putBytes(_ source: UnsafeRawBufferPointer) {
        putLengthPrefixed(BinaryFormat.bytes, source)
    }

    @inline(__always) func putKey(_ key: String) {
        var key = key
        key.withUTF8 { putLengthPrefixed(nil, UnsafeRawBufferPointer($0)) }
    }
}

struct BinaryKeyedEncoder<Key: CodingKey>: KeyedEncodingContainerProtocol {
    let state: BinaryEncoderState
    let depth: Int32
    let generation: UInt32

    var codingPath: [any CodingKey] { state.codingPath(depth: Int(depth)) }

    @inline(__always) private func begin(_ key: Key) throws {
        try state.beginKeyedEntry(depth, generation, key.stringValue)
    }

    mutating func encodeNil(forKey key: Key) throws { try begin(key); state.putNil() }
    mutating func encode(_ value: Bool, forKey key: Key) throws { try begin(key); state.putBool(value) }
    mutating func encode(_ value: String, forKey key: Key) throws { try begin(key); state.putString(value) }
    mutating func encode(_ value: Double, forKey key: Key) throws { try begin(key); state.putDouble(value) }
    mutating func encode(_ value: Float, forKey key: Key) throws { try begin(key); state.putFloat(value) }
    mutating func encode(_ value: Int, forKey key: Key) throws { try begin(key); state.putSigned(Int64(value)) }
    mutating func encode(_ value: Int8, forKey key: Key) throws { try begin(key); state.putSigned(Int64(value)) }
    mutating func encode(_ value: Int16, forKey key: Key) throws { try begin(key); state.putSigned(Int64(value)) }
    mutating func encode(_ value: Int32, forKey key: Key) throws { try begin(key); state.putSigned(Int64(value)) }
    mutating func encode(_ value: Int64, forKey key: Key) throws { try begin(key); state.putSigned(value) }
    mutating func encode(_ value: UInt, forKey key: Key) throws { try begin(key); state.putUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt8, forKey key: Key) throws { try begin(key); state.putUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt16, forKey key: Key) throws { try begin(key); state.putUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt32, forKey key: Key) throws { try begin(key); state.putUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt64, forKey key: Key) throws { try begin(key); state.putUnsigned(value) }

    mutating func encode<T: Encodable>(_ value: T, forKey key: Key) throws {
        try begin(key)
        try state.encodeEntry(value, depth, generation)
    }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type, forKey key: Key) -> KeyedEncodingContainer<NestedKey> {
        do { try begin(key) } catch { return state.deadKeyed(NestedKey.self) }
        return state.nestedKeyed(NestedKey.self, depth, generation)
    }

    mutating func nestedUnkeyedContainer(forKey key: Key) -> any UnkeyedEncodingContainer {
        do { try begin(key) } catch { return BinaryUnkeyedEncoder(state: state, depth: -1, generation: 0) }
        return state.nestedUnkeyed(depth, generation)
    }

    mutating func superEncoder() -> any Encoder {
        guard state.isolated else { return state.superEncoder(depth, generation) }
        do { try state.beginKeyedEntry(depth, generation, "super") } catch { return state.deadEncoder() }
        return state.superEncoder(depth, generation)
    }

    mutating func superEncoder(forKey key: Key) -> any Encoder {
        guard state.isolated else { return state.superEncoder(depth, generation) }
        do { try begin(key) } catch { return state.deadEncoder() }
        return state.superEncoder(depth, generation)
    }
}

struct BinaryUnkeyedEncoder: UnkeyedEncodingContainer {
    let state: BinaryEncoderState
    let depth: Int32
    let generation: UInt32
    private(set) var count = 0

    init(state: BinaryEncoderState, depth: Int32, generation: UInt32) {
        self.state = state
        self.depth = depth
        self.generation = generation
    }

    var codingPath: [any CodingKey] { state.codingPath(depth: Int(depth)) }

    @inline(__always) private mutating func begin() throws {
        try state.beginUnkeyedEntry(depth, generation)
        count += 1
    }

    mutating func encodeNil() throws { try begin(); state.putNil() }
    mutating func encode(_ value: Bool) throws { try begin(); state.putBool(value) }
    mutating func encode(_ value: String) throws { try begin(); state.putString(value) }
    mutating func encode(_ value: Double) throws { try begin(); state.putDouble(value) }
    mutating func encode(_ value: Float) throws { try begin(); state.putFloat(value) }
    mutating func encode(_ value: Int) throws { try begin(); state.putSigned(Int64(value)) }
    mutating func encode(_ value: Int8) throws { try begin(); state.putSigned(Int64(value)) }
    mutating func encode(_ value: Int16) throws { try begin(); state.putSigned(Int64(value)) }
    mutating func encode(_ value: Int32) throws { try begin(); state.putSigned(Int64(value)) }
    mutating func encode(_ value: Int64) throws { try begin(); state.putSigned(value) }
    mutating func encode(_ value: UInt) throws { try begin(); state.putUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt8) throws { try begin(); state.putUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt16) throws { try begin(); state.putUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt32) throws { try begin(); state.putUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt64) throws { try begin(); state.putUnsigned(value) }

    mutating func encode<T: Encodable>(_ value: T) throws {
        try begin()
        try state.encodeEntry(value, depth, generation)
    }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type) -> KeyedEncodingContainer<NestedKey> {
        do { try begin() } catch { return state.deadKeyed(NestedKey.self) }
        return state.nestedKeyed(NestedKey.self, depth, generation)
    }

    mutating func nestedUnkeyedContainer() -> any UnkeyedEncodingContainer {
        do { try begin() } catch { return BinaryUnkeyedEncoder(state: state, depth: -1, generation: 0) }
        return state.nestedUnkeyed(depth, generation)
    }

    mutating func superEncoder() -> any Encoder {
        guard state.isolated else { return state.superEncoder(depth, generation) }
        do { try begin() } catch { return state.deadEncoder() }
        return state.superEncoder(depth, generation)
    }
}

/// Three words (state, slot), so it fits an existential inline: no allocation per `Optional`.
struct BinarySingleValueEncoder: SingleValueEncodingContainer {
    let state: BinaryEncoderState
    let slot: BinaryEncoderState.Slot

    var codingPath: [any CodingKey] { state.codingPath(for: slot) }

    @inline(__always) private func begin() throws { try state.prepareScalar(at: slot) }

    mutating func encodeNil() throws { try begin(); state.putNil() }
    mutating func encode(_ value: Bool) throws { try begin(); state.putBool(value) }
    mutating func encode(_ value: String) throws { try begin(); state.putString(value) }
    mutating func encode(_ value: Double) throws { try begin(); state.putDouble(value) }
    mutating func encode(_ value: Float) throws { try begin(); state.putFloat(value) }
    mutating func encode(_ value: Int) throws { try begin(); state.putSigned(Int64(value)) }
    mutating func encode(_ value: Int8) throws { try begin(); state.putSigned(Int64(value)) }
    mutating func encode(_ value: Int16) throws { try begin(); state.putSigned(Int64(value)) }
    mutating func encode(_ value: Int32) throws { try begin(); state.putSigned(Int64(value)) }
    mutating func encode(_ value: Int64) throws { try begin(); state.putSigned(value) }
    mutating func encode(_ value: UInt) throws { try begin(); state.putUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt8) throws { try begin(); state.putUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt16) throws { try begin(); state.putUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt32) throws { try begin(); state.putUnsigned(UInt64(value)) }
    mutating func encode(_ value: UInt64) throws { try begin(); state.putUnsigned(value) }

    mutating func encode<T: Encodable>(_ value: T) throws {
        if try state.encodePrimitive(value, at: slot) { return }
        var target = slot
        if T.self is any BinaryOptionalMarker.Type {
            // An Optional holding an Optional: mark the outer `.some`, so `.some(nil)` survives.
            try begin()
            state.put(BinaryFormat.some)
            target.start = state.length
        }
        try state.encodeComposite(value, at: target)
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
        return try varintTail(first, &position, limit: limit, path: path())
    }

    func varintTail(_ first: UInt8, _ position: inout Int, limit: Int, path: @autoclosure () -> [any CodingKey]) throws -> UInt64 {
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
    @inline(__always)
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
/// nested values; containers hold nothing but offsets. A keyed container finds a key by a linear
/// scan of its entries, starting after the entry found last (`cursor`), so fields read in the order
/// they were written cost one compare each.
final class BinaryDecoderState: Decoder {
    let reader: BinaryReader
    let count: Int

    @exclusivity(unchecked) var slotStart: Int
    @exclusivity(unchecked) var slotLimit: Int
    /// The body start of the keyed container `cursor` belongs to.
    @exclusivity(unchecked) var cursorOwner = -1
    @exclusivity(unchecked) var cursor = 0
    /// The last `allKeys` answer, for the container at body start `keysOwner` and the key type
    /// `keysType`: a synthesized enum `init(from:)` asks twice. Held as the array's storage object
    /// (an `Array` is one reference), so reading it back costs no dynamic cast.
    @exclusivity(unchecked) var keysOwner = -1
    @exclusivity(unchecked) var keysType: ObjectIdentifier?
    @exclusivity(unchecked) var keysCache: AnyObject?
    /// How many composite values enclose the one being decoded, against ``maximumNesting``.
    @exclusivity(unchecked) var nesting = 0

    /// Deeper input is rejected rather than risking the stack (JSON's parser stops at 512 too).
    static let maximumNesting = 512

    init(base: UnsafeRawPointer, count: Int, start: Int, limit: Int) {
        self.reader = BinaryReader(base: base)
        self.count = count
        self.slotStart = start
        self.slotLimit = limit
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
        let state = BinaryDecoderState(base: base, count: bytes.count, start: 1, limit: bytes.count)
        let end = try state.reader.skipValue(at: 1, limit: bytes.count, path: [])
        guard end == bytes.count else {
            throw BinaryReader.corrupted([], "\(bytes.count - end) unexpected bytes after the value")
        }
        return try state.decodeValue(type, at: 1, limit: bytes.count)
    }

    // MARK: Decoder

    var codingPath: [any CodingKey] { codingPath(to: slotStart) }
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    func container<Key: CodingKey>(keyedBy type: Key.Type) throws -> KeyedDecodingContainer<Key> {
        let (body, end, count) = try openContainer(at: slotStart, limit: slotLimit, tag: BinaryFormat.keyed,
                                                    type: KeyedDecodingContainer<Key>.self)
        return KeyedDecodingContainer(BinaryKeyedDecoder<Key>(state: self, start: slotStart, bodyStart: body, end: end, count: count))
    }

    func unkeyedContainer() throws -> any UnkeyedDecodingContainer {
        let (body, end, count) = try openContainer(at: slotStart, limit: slotLimit, tag: BinaryFormat.unkeyed,
                                                    type: (any UnkeyedDecodingContainer).self)
        return BinaryUnkeyedDecoder(state: self, start: slotStart, position: body, end: end, total: count)
    }

    func singleValueContainer() throws -> any SingleValueDecodingContainer {
        BinarySingleValueDecoder(state: self, position: slotStart, limit: slotLimit)
    }

    // MARK: Coding paths

    /// The coding path of the value at `offset`, read off the message: the keys (and indices) of the
    /// containers that hold it. Best effort on corrupted data; never throws.
    func codingPath(to offset: Int) -> [any CodingKey] {
        var keys: [any CodingKey] = []
        var position = 1  // the message's root value
        var limit = count
        while position < offset {
            guard var at = try? skipWrappers(position, limit: limit), at < offset,
                  let tag = try? reader.byte(at: at, limit: limit, path: []),
                  tag == BinaryFormat.keyed || tag == BinaryFormat.unkeyed
            else { break }
            at += 1
            guard let length = try? reader.length(&at, limit: limit, path: []) else { break }
            let end = at + length
            guard (try? reader.varint(&at, limit: end, path: [])) != nil else { break }
            var index = 0
            var found = false
            while at < end {
                var key: any CodingKey = BinaryIndexKey(index)
                if tag == BinaryFormat.keyed {
                    guard let keyLength = try? reader.length(&at, limit: end, path: []) else { return keys }
                    key = BinaryPathKey(String(decoding: UnsafeRawBufferPointer(start: reader.base + at, count: keyLength), as: UTF8.self))
                    at += keyLength
                }
                guard let next = try? reader.skipValue(at: at, limit: end, path: []) else { return keys }
                if at <= offset && offset < next {
                    keys.append(key)
                    position = at
                    limit = next
                    found = true
                    break
                }
                at = next
                index += 1
            }
            if !found { break }
        }
        return keys
    }

    private func skipWrappers(_ position: Int, limit: Int) throws -> Int {
        var position = position
        while try reader.byte(at: position, limit: limit, path: []) == BinaryFormat.some { position += 1 }
        return position
    }

    // MARK: Reading

    /// Opens the container at `position`: its body start, end and entry count.
    @inline(__always)
    func openContainer(at position: Int, limit: Int, tag expected: UInt8, type: @autoclosure () -> Any.Type) throws -> (Int, Int, Int) {
        var at = position
        let tag = try valueTag(&at, limit: limit)
        guard tag == expected else { throw mismatch(type(), tag, at: position) }
        let length = try reader.length(&at, limit: limit, path: self.codingPath(to: position))
        let end = at + length
        let count = try reader.varint(&at, limit: end, path: self.codingPath(to: position))
        guard count <= UInt64(end - at) else {
            throw BinaryReader.corrupted(codingPath(to: position), "a container claims \(count) entries in \(end - at) bytes")
        }
        return (at, end, Int(count))
    }

    /// Reads the tag at `position`, stepping over Optional wrappers (`T??` data read as `T?` or `T`).
    @inline(__always)
    func valueTag(_ position: inout Int, limit: Int) throws -> UInt8 {
        let start = position
        var tag = try reader.byte(at: position, limit: limit, path: self.codingPath(to: start))
        position += 1
        while tag == BinaryFormat.some {
            tag = try reader.byte(at: position, limit: limit, path: self.codingPath(to: start))
            position += 1
        }
        return tag
    }

    func mismatch(_ type: Any.Type, _ tag: UInt8, at position: Int) -> DecodingError {
        let path = codingPath(to: position)
        if tag == BinaryFormat.null {
            return .valueNotFound(type, DecodingError.Context(
                codingPath: path, debugDescription: "Expected \(type) value but found nil instead."))
        }
        return .typeMismatch(type, DecodingError.Context(
            codingPath: path, debugDescription: "Expected to decode \(type) but found \(BinaryFormat.describe(tag)) instead."))
    }

    func doesNotFit(_ number: String, _ type: Any.Type, at position: Int) -> DecodingError {
        BinaryReader.corrupted(codingPath(to: position), "the number \(number) does not fit in \(type)")
    }

    @inline(__always)
    func isNil(at position: Int, limit: Int) throws -> Bool {
        try reader.byte(at: position, limit: limit, path: self.codingPath(to: position)) == BinaryFormat.null
    }

    @inline(__always)
    func readSigned(_ position: inout Int, limit: Int, type: Any.Type) throws -> Int64 {
        // The common case inline: a signed integer, no Optional wrapper.
        if position < limit, reader.base.load(fromByteOffset: position, as: UInt8.self) == BinaryFormat.signed {
            let start = position
            var at = position + 1
            let raw = try reader.varint(&at, limit: limit, path: self.codingPath(to: start))
            position = at
            return BinaryFormat.unzigzag(raw)
        }
        return try readAnySigned(&position, limit: limit, type: type)
    }

    func readAnySigned(_ position: inout Int, limit: Int, type: Any.Type) throws -> Int64 {
        let start = position
        var at = position
        let tag = try valueTag(&at, limit: limit)
        let value: Int64
        switch tag {
        case BinaryFormat.signed:
            value = BinaryFormat.unzigzag(try reader.varint(&at, limit: limit, path: self.codingPath(to: start)))
        case BinaryFormat.unsigned:
            let raw = try reader.varint(&at, limit: limit, path: self.codingPath(to: start))
            guard let exact = Int64(exactly: raw) else { throw doesNotFit("\(raw)", type, at: start) }
            value = exact
        case BinaryFormat.double:
            let double = Double(bitPattern: try reader.fixed64(&at, limit: limit, path: self.codingPath(to: start)))
            guard let exact = Int64(exactly: double) else { throw doesNotFit("\(double)", type, at: start) }
            value = exact
        case BinaryFormat.float:
            let float = Float(bitPattern: try reader.fixed32(&at, limit: limit, path: self.codingPath(to: start)))
            guard let exact = Int64(exactly: float) else { throw doesNotFit("\(float)", type, at: start) }
            value = exact
        default:
            throw mismatch(type, tag, at: start)
        }
        position = at
        return value
    }

    func readUnsigned(_ position: inout Int, limit: Int, type: Any.Type) throws -> UInt64 {
        let start = position
        var at = position
        let tag = try valueTag(&at, limit: limit)
        let value: UInt64
        switch tag {
        case BinaryFormat.unsigned:
            value = try reader.varint(&at, limit: limit, path: self.codingPath(to: start))
        case BinaryFormat.signed:
            let signed = BinaryFormat.unzigzag(try reader.varint(&at, limit: limit, path: self.codingPath(to: start)))
            guard let exact = UInt64(exactly: signed) else { throw doesNotFit("\(signed)", type, at: start) }
            value = exact
        case BinaryFormat.double:
            let double = Double(bitPattern: try reader.fixed64(&at, limit: limit, path: self.codingPath(to: start)))
            guard let exact = UInt64(exactly: double) else { throw doesNotFit("\(double)", type, at: start) }
            value = exact
        case BinaryFormat.float:
            let float = Float(bitPattern: try reader.fixed32(&at, limit: limit, path: self.codingPath(to: start)))
            guard let exact = UInt64(exactly: float) else { throw doesNotFit("\(float)", type, at: start) }
            value = exact
        default:
            throw mismatch(type, tag, at: start)
        }
        position = at
        return value
    }

    @inline(__always)
    func readInteger<I: FixedWidthInteger>(_ type: I.Type, _ position: inout Int, limit: Int) throws -> I {
        let start = position
        if I.isSigned {
            let value = try readSigned(&position, limit: limit, type: I.self)
            guard let exact = I(exactly: value) else {
                position = start
                throw doesNotFit("\(value)", I.self, at: start)
            }
            return exact
        }
        let value = try readUnsigned(&position, limit: limit, type: I.self)
        guard let exact = I(exactly: value) else {
            position = start
            throw doesNotFit("\(value)", I.self, at: start)
        }
        return exact
    }

    func readDouble(_ position: inout Int, limit: Int) throws -> Double {
        let start = position
        var at = position
        let tag = try valueTag(&at, limit: limit)
        let value: Double
        switch tag {
        case BinaryFormat.double:
            value = Double(bitPattern: try reader.fixed64(&at, limit: limit, path: self.codingPath(to: start)))
        case BinaryFormat.float:
            value = Double(Float(bitPattern: try reader.fixed32(&at, limit: limit, path: self.codingPath(to: start))))
        case BinaryFormat.signed:
            value = Double(BinaryFormat.unzigzag(try reader.varint(&at, limit: limit, path: self.codingPath(to: start))))
        case BinaryFormat.unsigned:
            value = Double(try reader.varint(&at, limit: limit, path: self.codingPath(to: start)))
        default:
            throw mismatch(Double.self, tag, at: start)
        }
        position = at
        return value
    }

    func readFloat(_ position: inout Int, limit: Int) throws -> Float {
        let start = position
        var at = position
        let tag = try valueTag(&at, limit: limit)
        let value: Float
        switch tag {
        case BinaryFormat.float:
            value = Float(bitPattern: try reader.fixed32(&at, limit: limit, path: self.codingPath(to: start)))
        case BinaryFormat.double:
            let double = Double(bitPattern: try reader.fixed64(&at, limit: limit, path: self.codingPath(to: start)))
            guard !double.isFinite || abs(double) <= Double(Float.greatestFiniteMagnitude) else {
                throw doesNotFit("\(double)", Float.self, at: start)
            }
            value = Float(double)
        case BinaryFormat.signed:
            value = Float(BinaryFormat.unzigzag(try reader.varint(&at, limit: limit, path: self.codingPath(to: start))))
        case BinaryFormat.unsigned:
            value = Float(try reader.varint(&at, limit: limit, path: self.codingPath(to: start)))
        default:
            throw mismatch(Float.self, tag, at: start)
        }
        position = at
        return value
    }

    func readBool(_ position: inout Int, limit: Int) throws -> Bool {
        let start = position
        var at = position
        let tag = try valueTag(&at, limit: limit)
        guard tag == BinaryFormat.trueValue || tag == BinaryFormat.falseValue else { throw mismatch(Bool.self, tag, at: start) }
        position = at
        return tag == BinaryFormat.trueValue
    }

    func readString(_ position: inout Int, limit: Int) throws -> String {
        let start = position
        var at = position
        let tag = try valueTag(&at, limit: limit)
        guard tag == BinaryFormat.string else { throw mismatch(String.self, tag, at: start) }
        let length = try reader.length(&at, limit: limit, path: self.codingPath(to: start))
        let value = String(decoding: UnsafeRawBufferPointer(start: reader.base + at, count: length), as: UTF8.self)
        position = at + length
        return value
    }

    /// The bytes of a `bytes` value, or `nil` if the value at `position` is something else.
    func readBytes(_ position: inout Int, limit: Int) throws -> UnsafeRawBufferPointer? {
        let start = position
        var at = position
        guard try valueTag(&at, limit: limit) == BinaryFormat.bytes else { return nil }
        let length = try reader.length(&at, limit: limit, path: self.codingPath(to: start))
        position = at + length
        return UnsafeRawBufferPointer(start: reader.base + at, count: length)
    }

    // MARK: Values

    /// Decodes a `T` from the value at `position`: primitives directly, anything else through its
    /// `init(from:)` with this decoder positioned there.
    @inline(__always)
    func decodeValue<T: Decodable>(_ type: T.Type, at position: Int, limit: Int) throws -> T {
        // Asked first, then read: returning `T?` cost a metadata lookup for `Optional<T>` on every
        // call where `T` is not known at compile time (a message's root value).
        guard Self.isPrimitive(T.self) else { return try decodeComposite(T.self, at: position, limit: limit) }
        return try decodePrimitive(T.self, at: position, limit: limit)
    }

    func decodeComposite<T: Decodable>(_ type: T.Type, at position: Int, limit: Int) throws -> T {
        var start = position
        if try reader.byte(at: start, limit: limit, path: self.codingPath(to: position)) == BinaryFormat.some,
           !(T.self is any BinaryOptionalMarker.Type) {
            _ = try valueTag(&start, limit: limit)
            start -= 1
        }
        guard nesting < Self.maximumNesting else {
            throw BinaryReader.corrupted(codingPath(to: position), "values are nested more than \(Self.maximumNesting) deep")
        }
        let saved = (slotStart, slotLimit, cursorOwner, cursor)
        slotStart = start
        slotLimit = limit
        nesting += 1
        defer {
            (slotStart, slotLimit, cursorOwner, cursor) = saved
            nesting -= 1
        }
        return try T(from: self)
    }

    /// Whether ``decodePrimitive(_:at:limit:)`` reads `T` (a comparison of type identities, no lookup).
    @inline(__always)
    static func isPrimitive<T>(_ type: T.Type) -> Bool {
        ObjectIdentifier(T.self) == BinaryFormat.byteArrayType
            || T.self == String.self || T.self == Int.self || T.self == Int64.self || T.self == Double.self
            || T.self == Bool.self || T.self == Data.self || T.self == Date.self || T.self == UInt64.self
            || T.self == Int32.self || T.self == UInt.self || T.self == UInt32.self || T.self == Float.self
            || T.self == Int16.self || T.self == Int8.self || T.self == UInt16.self || T.self == UInt8.self
    }

    @inline(__always)
    func decodePrimitive<T: Decodable>(_ type: T.Type, at position: Int, limit: Int) throws -> T {
        var at = position
        if T.self == String.self {
            return unsafeBitCast(try readString(&at, limit: limit), to: T.self)
        } else if T.self == Int.self {
            return unsafeBitCast(try readInteger(Int.self, &at, limit: limit), to: T.self)
        } else if T.self == Int64.self {
            return unsafeBitCast(try readInteger(Int64.self, &at, limit: limit), to: T.self)
        } else if T.self == Double.self {
            return unsafeBitCast(try readDouble(&at, limit: limit), to: T.self)
        } else if T.self == Bool.self {
            return unsafeBitCast(try readBool(&at, limit: limit), to: T.self)
        } else if ObjectIdentifier(T.self) == BinaryFormat.byteArrayType {
            // Not in the bytes form: the general path.
            guard let bytes = try readBytes(&at, limit: limit) else { return try decodeComposite(T.self, at: position, limit: limit) }
            return unsafeBitCast([UInt8](bytes), to: T.self)
        } else if T.self == Data.self {
            guard let bytes = try readBytes(&at, limit: limit) else { return try decodeComposite(T.self, at: position, limit: limit) }
            return unsafeBitCast(Data(bytes), to: T.self)
        } else if T.self == Date.self {
            let seconds = try readDouble(&at, limit: limit)
            return unsafeBitCast(Date(timeIntervalSinceReferenceDate: seconds), to: T.self)
        } else if T.self == UInt64.self {
            return unsafeBitCast(try readInteger(UInt64.self, &at, limit: limit), to: T.self)
        } else if T.self == Int32.self {
            return unsafeBitCast(try readInteger(Int32.self, &at, limit: limit), to: T.self)
        } else if T.self == UInt.self {
            return unsafeBitCast(try readInteger(UInt.self, &at, limit: limit), to: T.self)
        } else if T.self == UInt32.self {
            return unsafeBitCast(try readInteger(UInt32.self, &at, limit: limit), to: T.self)
        } else if T.self == Float.self {
            return unsafeBitCast(try readFloat(&at, limit: limit), to: T.self)
        } else if T.self == Int16.self {
            return unsafeBitCast(try readInteger(Int16.self, &at, limit: limit), to: T.self)
        } else if T.self == Int8.self {
            return unsafeBitCast(try readInteger(Int8.self, &at, limit: limit), to: T.self)
        } else if T.self == UInt16.self {
            return unsafeBitCast(try readInteger(UInt16.self, &at, limit: limit), to: T.self)
        } else if T.self == UInt8.self {
            return unsafeBitCast(try readInteger(UInt8.self, &at, limit: limit), to: T.self)
        }
        preconditionFailure("decodePrimitive called for \(T.self), which isPrimitive rejects")
    }

    // MARK: Keyed lookup

    /// The position of the value stored under the key `name` in the keyed container whose entries
    /// are `bodyStart..<end`, or `nil`. Scans from the entry after the last one found.
    @inline(__always)
    func findEntry(_ name: UnsafeBufferPointer<UInt8>, container start: Int, bodyStart: Int, end: Int) throws -> Int? {
        let first = cursorOwner == bodyStart && cursor <= end ? cursor : bodyStart
        var position = first
        while position < end {
            if let found = try entry(at: &position, matching: name, end: end, container: start) {
                cursorOwner = bodyStart
                cursor = position
                return found
            }
        }
        position = bodyStart
        while position < first {
            if let found = try entry(at: &position, matching: name, end: end, container: start) {
                cursorOwner = bodyStart
                cursor = position
                return found
            }
        }
        return nil
    }

    /// Steps over the entry at `position`; returns its value's position if its key is `name`.
    @inline(__always)
    func entry(at position: inout Int, matching name: UnsafeBufferPointer<UInt8>, end: Int, container start: Int) throws -> Int? {
        let length = try reader.length(&position, limit: end, path: self.codingPath(to: start))
        let keyStart = position
        let valueStart = keyStart + length
        position = try reader.skipValue(at: valueStart, limit: end, path: self.codingPath(to: start))
        guard length == name.count else { return nil }
        guard length > 0, let target = name.baseAddress else { return valueStart }
        let stored = reader.base + keyStart
        if length >= 8 && length <= 16 {
            // Most keys: two overlapping 8-byte compares beat a call to memcmp.
            let head = stored.loadUnaligned(as: UInt64.self) == UnsafeRawPointer(target).loadUnaligned(as: UInt64.self)
            let tail = stored.loadUnaligned(fromByteOffset: length - 8, as: UInt64.self)
                == UnsafeRawPointer(target).loadUnaligned(fromByteOffset: length - 8, as: UInt64.self)
            return head && tail ? valueStart : nil
        }
        return memcmp(stored, target, length) == 0 ? valueStart : nil
    }

    /// The keys of the keyed container whose entries are `bodyStart..<end`, as far as they parse.
    func keys<Key: CodingKey>(_ type: Key.Type, bodyStart: Int, end: Int) -> [Key] {
        if keysOwner == bodyStart, keysType == ObjectIdentifier(Key.self), let cached = keysCache {
            return unsafeBitCast(cached, to: [Key].self)
        }
        var keys: [Key] = []
        defer {
            keysOwner = bodyStart
            keysType = ObjectIdentifier(Key.self)
            keysCache = unsafeBitCast(keys, to: AnyObject.self)
        }
        // One entry (an enum case, the common reason to ask): the answer for this key type and name is
        // always the same array, so it is built once and shared.
        var position = bodyStart
        if let length = try? reader.length(&position, limit: end, path: []), position + length <= end,
           let next = try? reader.skipValue(at: position + length, limit: end, path: []), next == end {
            let name = UnsafeRawBufferPointer(start: reader.base + position, count: length)
            if let shared = BinarySingleKeyCache.shared.lookup(ObjectIdentifier(Key.self), name) {
                keys = unsafeBitCast(shared, to: [Key].self)
                return keys
            }
            if let key = Key(stringValue: String(decoding: name, as: UTF8.self)) { keys = [key] }
            BinarySingleKeyCache.shared.store(ObjectIdentifier(Key.self), name, unsafeBitCast(keys, to: AnyObject.self))
            return keys
        }
        position = bodyStart
        while position < end {
            guard let length = try? reader.length(&position, limit: end, path: []) else { break }
            let name = String(decoding: UnsafeRawBufferPointer(start: reader.base + position, count: length), as: UTF8.self)
            if let key = Key(stringValue: name) { keys.append(key) }
            guard let next = try? reader.skipValue(at: position + length, limit: end, path: []) else { break }
            position = next
        }
        return keys
    }

    /// A separate decoder for the value at `position` (`superDecoder`).
    func subDecoder(at position: Int, limit: Int) -> BinaryDecoderState {
        BinaryDecoderState(base: reader.base, count: count, start: position, limit: limit)
    }
}

/// `allKeys` answers for keyed containers with one entry — what a synthesized enum `init(from:)` asks
/// for, twice per value — by (key type, key name): building the `[Key]` array costs a generic metadata
/// lookup and an allocation each time, a hit costs neither. Direct-mapped and fixed in size, so
/// arbitrary names (dictionary keys) can only evict entries, never grow it. Pure: a `CodingKey`'s
/// `init(stringValue:)` gives the same key for the same name.
final class BinarySingleKeyCache: Sendable {
    static let shared = BinarySingleKeyCache()
    private static let slots = 256
    private static let maximumNameLength = 48

    /// `@unchecked Sendable`: `keys` is an array's storage, never mutated once stored.
    private struct Entry: @unchecked Sendable {
        var type: ObjectIdentifier
        var name: [UInt8]
        var keys: AnyObject
    }
    private let entries = Mutex<[Entry?]>(Array(repeating: nil, count: BinarySingleKeyCache.slots))

    private static func slot(_ type: ObjectIdentifier, _ name: UnsafeRawBufferPointer) -> Int {
        var hash = UInt64(UInt(bitPattern: type.hashValue)) &* 0x9E37_79B9_7F4A_7C15
        for byte in name { hash = (hash ^ UInt64(byte)) &* 0x0000_0100_0000_01B3 }
        return Int(truncatingIfNeeded: hash >> 32) & (slots - 1)
    }

    func lookup(_ type: ObjectIdentifier, _ name: UnsafeRawBufferPointer) -> AnyObject? {
        guard name.count <= Self.maximumNameLength else { return nil }
        let slot = Self.slot(type, name)
        return entries.withLock { entries -> AnyObject? in
            guard let entry = entries[slot], entry.type == type, entry.name.count == name.count else { return nil }
            let same = entry.name.withUnsafeBytes { stored in
                name.isEmpty || memcmp(stored.baseAddress!, name.baseAddress!, name.count) == 0
            }
            return same ? entry.keys : nil
        }
    }

    func store(_ type: ObjectIdentifier, _ name: UnsafeRawBufferPointer, _ keys: AnyObject) {
        guard name.count <= Self.maximumNameLength else { return }
        let slot = Self.slot(type, name)
        let entry = Entry(type: type, name: Array(name), keys: keys)
        entries.withLock { $0[slot] = entry }
    }
}

struct BinaryKeyedDecoder<Key: CodingKey>: KeyedDecodingContainerProtocol {
    let state: BinaryDecoderState
    /// The container's own position (its tag), for coding paths.
    let start: Int
    let bodyStart: Int
    let end: Int
    let count: Int

    var codingPath: [any CodingKey] { state.codingPath(to: start) }

    var allKeys: [Key] { state.keys(Key.self, bodyStart: bodyStart, end: end) }

    func contains(_ key: Key) -> Bool {
        ((try? find(key)) ?? nil) != nil
    }

    @inline(__always)
    private func find(_ key: Key) throws -> Int? {
        var name = key.stringValue
        // Locals, so the closure does not capture (and copy) the generic container.
        let state = state, start = start, bodyStart = bodyStart, end = end
        return try name.withUTF8 { try state.findEntry($0, container: start, bodyStart: bodyStart, end: end) }
    }

    @inline(__always)
    private func require(_ key: Key) throws -> Int {
        guard let position = try find(key) else { throw keyNotFound(key) }
        return position
    }

    private func keyNotFound(_ key: any CodingKey) -> DecodingError {
        .keyNotFound(key, DecodingError.Context(
            codingPath: codingPath, debugDescription: "No value associated with key \(key) (\"\(key.stringValue)\")."))
    }

    func decodeNil(forKey key: Key) throws -> Bool {
        try state.isNil(at: try require(key), limit: end)
    }

    func decode(_ type: Bool.Type, forKey key: Key) throws -> Bool {
        var at = try require(key)
        return try state.readBool(&at, limit: end)
    }

    func decode(_ type: String.Type, forKey key: Key) throws -> String {
        var at = try require(key)
        return try state.readString(&at, limit: end)
    }

    func decode(_ type: Double.Type, forKey key: Key) throws -> Double {
        var at = try require(key)
        return try state.readDouble(&at, limit: end)
    }

    func decode(_ type: Float.Type, forKey key: Key) throws -> Float {
        var at = try require(key)
        return try state.readFloat(&at, limit: end)
    }

    @inline(__always)
    private func integer<I: FixedWidthInteger>(_ type: I.Type, _ key: Key) throws -> I {
        var at = try require(key)
        return try state.readInteger(I.self, &at, limit: end)
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
        try state.decodeValue(T.self, at: try require(key), limit: end)
    }

    /// The value's position, or `nil` when the key is absent or holds nil.
    @inline(__always)
    private func present(_ key: Key) throws -> Int? {
        guard let at = try find(key), try !state.isNil(at: at, limit: end) else { return nil }
        return at
    }

    func decodeIfPresent(_ type: Bool.Type, forKey key: Key) throws -> Bool? {
        guard var at = try present(key) else { return nil }
        return try state.readBool(&at, limit: end)
    }

    func decodeIfPresent(_ type: String.Type, forKey key: Key) throws -> String? {
        guard var at = try present(key) else { return nil }
        return try state.readString(&at, limit: end)
    }

    func decodeIfPresent(_ type: Double.Type, forKey key: Key) throws -> Double? {
        guard var at = try present(key) else { return nil }
        return try state.readDouble(&at, limit: end)
    }

    func decodeIfPresent(_ type: Float.Type, forKey key: Key) throws -> Float? {
        guard var at = try present(key) else { return nil }
        return try state.readFloat(&at, limit: end)
    }

    @inline(__always)
    private func integerIfPresent<I: FixedWidthInteger>(_ type: I.Type, _ key: Key) throws -> I? {
        guard var at = try present(key) else { return nil }
        return try state.readInteger(I.self, &at, limit: end)
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
        if try state.isNil(at: at, limit: end), !(T.self is any BinaryOptionalMarker.Type) { return nil }
        return try state.decodeValue(T.self, at: at, limit: end)
    }

    func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type, forKey key: Key) throws -> KeyedDecodingContainer<NestedKey> {
        let at = try require(key)
        let (body, nestedEnd, count) = try state.openContainer(
            at: at, limit: end, tag: BinaryFormat.keyed, type: KeyedDecodingContainer<NestedKey>.self)
        return KeyedDecodingContainer(BinaryKeyedDecoder<NestedKey>(state: state, start: at, bodyStart: body, end: nestedEnd, count: count))
    }

    func nestedUnkeyedContainer(forKey key: Key) throws -> any UnkeyedDecodingContainer {
        let at = try require(key)
        let (body, nestedEnd, count) = try state.openContainer(
            at: at, limit: end, tag: BinaryFormat.unkeyed, type: (any UnkeyedDecodingContainer).self)
        return BinaryUnkeyedDecoder(state: state, start: at, position: body, end: nestedEnd, total: count)
    }

    func superDecoder() throws -> any Decoder {
        var name = BinarySuperKey().stringValue
        guard let at = try name.withUTF8({ try state.findEntry($0, container: start, bodyStart: bodyStart, end: end) }) else {
            throw keyNotFound(BinarySuperKey())
        }
        return state.subDecoder(at: at, limit: end)
    }

    func superDecoder(forKey key: Key) throws -> any Decoder {
        state.subDecoder(at: try require(key), limit: end)
    }
}

struct BinaryUnkeyedDecoder: UnkeyedDecodingContainer {
    let state: BinaryDecoderState
    /// The container's own position (its tag), for coding paths.
    let start: Int
    var position: Int
    let end: Int
    let total: Int
    private(set) var currentIndex = 0

    init(state: BinaryDecoderState, start: Int, position: Int, end: Int, total: Int) {
        self.state = state
        self.start = start
        self.position = position
        self.end = end
        self.total = total
    }

    var codingPath: [any CodingKey] { state.codingPath(to: start) }
    var count: Int? { total }
    var isAtEnd: Bool { currentIndex >= total }

    @inline(__always)
    private func checkNotAtEnd(_ type: Any.Type) throws {
        guard !isAtEnd else {
            throw DecodingError.valueNotFound(type, DecodingError.Context(
                codingPath: codingPath + [BinaryIndexKey(currentIndex)], debugDescription: "Unkeyed container is at end."))
        }
    }

    mutating func decodeNil() throws -> Bool {
        try checkNotAtEnd(Optional<Any>.self)
        guard try state.isNil(at: position, limit: end) else { return false }
        position += 1
        currentIndex += 1
        return true
    }

    /// Reads the next element with `read` (which advances the offset it is given), then moves on.
    @inline(__always)
    private mutating func next<T>(_ type: T.Type, _ read: (BinaryDecoderState, inout Int, Int) throws -> T) throws -> T {
        try checkNotAtEnd(type)
        var at = position
        let value = try read(state, &at, end)
        position = at
        currentIndex += 1
        return value
    }

    mutating func decode(_ type: Bool.Type) throws -> Bool { try next(type) { try $0.readBool(&$1, limit: $2) } }
    mutating func decode(_ type: String.Type) throws -> String { try next(type) { try $0.readString(&$1, limit: $2) } }
    mutating func decode(_ type: Double.Type) throws -> Double { try next(type) { try $0.readDouble(&$1, limit: $2) } }
    mutating func decode(_ type: Float.Type) throws -> Float { try next(type) { try $0.readFloat(&$1, limit: $2) } }

    @inline(__always)
    private mutating func integer<I: FixedWidthInteger>(_ type: I.Type) throws -> I {
        try next(type) { try $0.readInteger(I.self, &$1, limit: $2) }
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
        let next = try state.reader.skipValue(at: position, limit: end, path: state.codingPath(to: start) + [BinaryIndexKey(currentIndex)])
        let value = try state.decodeValue(T.self, at: position, limit: next)
        position = next
        currentIndex += 1
        return value
    }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type) throws -> KeyedDecodingContainer<NestedKey> {
        try checkNotAtEnd(KeyedDecodingContainer<NestedKey>.self)
        let (body, nestedEnd, count) = try state.openContainer(
            at: position, limit: end, tag: BinaryFormat.keyed, type: KeyedDecodingContainer<NestedKey>.self)
        let container = BinaryKeyedDecoder<NestedKey>(state: state, start: position, bodyStart: body, end: nestedEnd, count: count)
        position = nestedEnd
        currentIndex += 1
        return KeyedDecodingContainer(container)
    }

    mutating func nestedUnkeyedContainer() throws -> any UnkeyedDecodingContainer {
        try checkNotAtEnd((any UnkeyedDecodingContainer).self)
        let (body, nestedEnd, count) = try state.openContainer(
            at: position, limit: end, tag: BinaryFormat.unkeyed, type: (any UnkeyedDecodingContainer).self)
        let container = BinaryUnkeyedDecoder(state: state, start: position, position: body, end: nestedEnd, total: count)
        position = nestedEnd
        currentIndex += 1
        return container
    }

    mutating func superDecoder() throws -> any Decoder {
        try checkNotAtEnd((any Decoder).self)
        let next = try state.reader.skipValue(at: position, limit: end, path: state.codingPath(to: start) + [BinaryIndexKey(currentIndex)])
        let decoder = state.subDecoder(at: position, limit: next)
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

    var codingPath: [any CodingKey] { state.codingPath(to: position) }

    func decodeNil() -> Bool {
        ((try? state.isNil(at: position, limit: limit)) ?? false)
    }

    func decode(_ type: Bool.Type) throws -> Bool {
        var at = position
        return try state.readBool(&at, limit: limit)
    }

    func decode(_ type: String.Type) throws -> String {
        var at = position
        return try state.readString(&at, limit: limit)
    }

    func decode(_ type: Double.Type) throws -> Double {
        var at = position
        return try state.readDouble(&at, limit: limit)
    }

    func decode(_ type: Float.Type) throws -> Float {
        var at = position
        return try state.readFloat(&at, limit: limit)
    }

    @inline(__always)
    private func integer<I: FixedWidthInteger>(_ type: I.Type) throws -> I {
        var at = position
        return try state.readInteger(I.self, &at, limit: limit)
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
        return try state.decodeValue(T.self, at: at, limit: limit)
    }
}
