import LMDB

/// How the journal lays bytes out in LMDB. All integers in keys are big-endian, so LMDB's byte order
/// is numeric order.
///
/// | database | key | value |
/// | --- | --- | --- |
/// | `log` | position (8) | entity key (8), sequence (8), check (4): CRC-32C of the payload XOR CRC-32C of the 16 header bytes, payload |
/// | `history` | entity key (8), first sequence (8) | a chunk: count (4), then per event length (4), CRC-32C (4), payload |
/// | `names` | type UTF-8, 0x00, id UTF-8 | entity key (8) |
/// | `pending-names` | row (8): registrations not yet in `names` (``PendingNames``) | entity key (8), then the `names` key |
/// | `pending-names` | 0 (8) | merge watermark (8): rows below it are in `names` already |
/// | `entities` | entity key (8) | metadata record |
/// | `snapshots` | entity key (8) | sequence (8) with its top bit set, check (4): CRC-32C of the payload XOR that of entity key and sequence, payload |
/// | `timers` | due (8), entity key (8), timer id (8) | keyed check (4), payload |
/// | `tasks` | the runtime's task key (an activity's, an outbox message's) | keyed check (4), payload |
/// | `idempotency` | caller's key | keyed check (4), payload |
/// | `idempotency-times` | recorded at (8), caller's key | empty: what expiry reads, oldest first |
/// | `format` | a table's name: `log`, `timers`, `tasks`, `idempotency` | that table's format (8): ``JournalLayout/StoredFormat`` |
/// | `format` | the table's name, then `-upgrade` | while an open upgrades an older table: the key to go on from |
///
/// A keyed check is the `CRC-32C` of the payload XOR the `CRC-32C` of the row's key
/// (``JournalLayout/keyedCheck(key:payload:)``): a damaged due time, entity, timer id or task key
/// fails it as a damaged payload does, instead of firing another timer or running another task.
///
/// A history chunk's events keep the checksum of their payload alone: a chunk's key names the
/// entity and its first sequence, and an event's place in it gives its sequence. A log record
/// carries its own entity and sequence, so its check covers them too: a record whose header was
/// damaged fails its check instead of counting as another entity's event (or as another sequence
/// of its own). Moving a record to history XORs the header's checksum out again, in O(1).
enum JournalLayout {
    static let logHeader = 20

    /// A table whose values changed format over the library's versions, and how an open brings
    /// an older one up to date (see `Journal.upgrade(_:environment:logger:batchSize:batches:)`).
    /// The table's row in the `format` database holds its format; a directory without the row was
    /// written in format 1.
    struct StoredFormat: Sendable {
        /// The table's name, and its row's key in the `format` database.
        let table: String
        /// The format this version writes.
        let current: UInt64
        /// The value in the current format of a row stored in format `from`, or `nil` to leave the
        /// row as it is. `nil` when rows of format `from` need no rewriting at all (the format row
        /// alone changes).
        let rewrite: @Sendable (_ from: UInt64) -> (@Sendable (_ key: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer) -> [UInt8]?)?

        var formatKey: [UInt8] { Array(table.utf8) }
        /// While an open upgrades the table: the key of the next row to upgrade.
        var progressKey: [UInt8] { Array((table + "-upgrade").utf8) }
    }

    /// The log's record format.
    /// - 1: the check covered the payload alone (directories written before the `format` database).
    /// - 2: the check covers the header as well (``headerCheck(entity:sequence:)``).
    /// - 3: records as in 2. Raised when timers, tasks and results got keyed checks, so that a
    ///   version that reads only the log's row refuses such a directory instead of misreading them.
    ///   The log is upgraded last, so its row says 3 only once every other table is up to date.
    static let log = StoredFormat(table: "log", current: 3) { from in
        guard from < 2 else { return nil }
        return { _, value in
            guard value.count >= logHeader else { return nil }
            var record = Array(value)
            record.withUnsafeMutableBytes { $0.storeLittleEndian(flippedCheck(ofLogRecord: UnsafeRawBufferPointer($0)), at: 16) }
            return record
        }
    }
    /// Timers and tasks: format 1 stored the payload alone; 2 puts a keyed check before it.
    static let timers = StoredFormat(table: "timers", current: 2) { _ in prependingKeyedCheck }
    static let tasks = StoredFormat(table: "tasks", current: 2) { _ in prependingKeyedCheck }
    /// Results: format 1's check covered the payload alone; 2's covers the key too.
    static let idempotency = StoredFormat(table: "idempotency", current: 2) { _ in
        { key, value in
            guard value.count >= checksumBytes else { return nil }
            var record = Array(value)
            let check = value.littleEndianUInt32(at: 0) ^ CRC32C.checksum(key)
            record.withUnsafeMutableBytes { $0.storeLittleEndian(check, at: 0) }
            return record
        }
    }
    /// Every table with a format, in the order an open upgrades them: the log last (see ``log``).
    static let storedFormats = [timers, tasks, idempotency, log]

    private static let prependingKeyedCheck: @Sendable (UnsafeRawBufferPointer, UnsafeRawBufferPointer) -> [UInt8]? = { key, value in
        var record = [UInt8](repeating: 0, count: checksumBytes)
        record.withUnsafeMutableBytes { $0.storeLittleEndian(keyedCheck(key: key, payload: value), at: 0) }
        record.append(contentsOf: value)
        return record
    }

    /// The check stored before the payload of a timer, a task or a result: the payload's `CRC-32C`
    /// XOR the key's, so that damage to either fails it.
    @inline(__always)
    static func keyedCheck(key: UnsafeRawBufferPointer, payload: UnsafeRawBufferPointer) -> UInt32 {
        CRC32C.checksum(payload) ^ CRC32C.checksum(key)
    }

    /// The payload of a `keyed check (4) + payload` value, or `nil` when the value fails its check
    /// (or is too short to hold one).
    static func keyedPayload(key: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer) -> UnsafeRawBufferPointer? {
        guard value.count >= checksumBytes else { return nil }
        let payload = UnsafeRawBufferPointer(rebasing: value[checksumBytes...])
        return keyedCheck(key: key, payload: payload) == value.littleEndianUInt32(at: 0) ? payload : nil
    }

    /// The top bit of a snapshot's stored sequence: its check covers the entity key and the
    /// sequence as well as the payload, as a log record's does. Snapshots written before it have
    /// the bit clear and a check of the payload alone; they are read as they are, and replaced by
    /// the entity's next snapshot. A bit flipped either way makes the check fail.
    static let snapshotHeaderChecked: UInt64 = 1 << 63

    /// What a log record's check adds to its event's `CRC-32C` (XOR): the `CRC-32C` of its header.
    @inline(__always)
    static func headerCheck(entity: UInt64, sequence: UInt64) -> UInt32 {
        Key16(entity, sequence).withBytes { CRC32C.checksum($0) }
    }

    /// The check of a log record (a `log` value, at least ``logHeader`` bytes) with its own header's
    /// checksum XORed in or out: from a format-2 record, its payload's `CRC-32C` (what history keeps,
    /// and what an intact record's payload hashes to); from a format-1 record, its format-2 check.
    @inline(__always)
    static func flippedCheck(ofLogRecord value: UnsafeRawBufferPointer) -> UInt32 {
        value.littleEndianUInt32(at: 16) ^ headerCheck(entity: value.bigEndianUInt64(at: 0), sequence: value.bigEndianUInt64(at: 8))
    }
    /// A history chunk stays under this many bytes, so it fits in a 4 KiB leaf page with its key and
    /// never needs LMDB overflow pages (a single larger event gets a chunk of its own).
    static let chunkBytes = 2_000
    static let checksumBytes = 4
    static let chunkHeader = 4
    static let chunkEventHeader = 8

    /// The longest idempotency key: its `idempotency-times` key is the time (8) then it, and LMDB
    /// keys hold 511 bytes.
    static let maxResultKeyBytes = 503

    /// What a tail move writes in place of an event without an intact log record (damage: none at
    /// its position, or one whose header names another entity or sequence): a `CRC-32C +
    /// payload` record whose checksum is wrong on purpose, so that every read of the event fails
    /// with ``JournalError/Code/corruptedRecord`` at its sequence.
    static let missingRecord: [UInt8] = {
        let payload = missingRecordPayload
        let checksum = ~CRC32C.checksum(payload)
        return withUnsafeBytes(of: checksum.littleEndian) { Array($0) } + payload
    }()
    static let missingRecordPayload = Array("DurableEntities: the journal's log had no intact record of this event".utf8)

    /// The `idempotency-times` key of a result recorded at `time` under `key`.
    static func resultTimeKey(_ time: UInt64, _ key: [UInt8]) -> [UInt8] {
        var bytes = [UInt8]()
        bytes.reserveCapacity(8 + key.count)
        Swift.withUnsafeBytes(of: time.bigEndian) { bytes.append(contentsOf: $0) }
        bytes.append(contentsOf: key)
        return bytes
    }
}

/// Reads the events of one history chunk: consecutive sequence numbers from the key's.
struct HistoryChunk {
    let firstSequence: UInt64
    let bytes: UnsafeRawBufferPointer

    /// How many events the chunk holds, or `nil` when its header is damaged.
    var count: Int? {
        guard bytes.count >= JournalLayout.chunkHeader else { return nil }
        return Int(bytes.littleEndianUInt32(at: 0))
    }

    var lastSequence: UInt64? { count.map { firstSequence + UInt64($0) - 1 } }

    /// Whether the chunk holds at least one event and its events' lengths add up to its bytes
    /// exactly (a damaged count or length that ``forEach(_:)`` alone could read past shows here).
    var isWellFormed: Bool {
        var end = 0
        guard let count, count > 0,
              forEach({ _, record in end = record.baseAddress! - bytes.baseAddress! + record.count; return true }) == nil else { return false }
        return end == bytes.count
    }

    /// Calls `body` with each event's sequence and `CRC-32C (4) + payload` record; stops when it returns false.
    /// - Returns: `nil` when the chunk is well-formed, else the sequence where it breaks.
    func forEach(_ body: (UInt64, UnsafeRawBufferPointer) throws -> Bool) rethrows -> UInt64? {
        guard let count else { return firstSequence }
        var offset = JournalLayout.chunkHeader
        for index in 0..<count {
            let sequence = firstSequence + UInt64(index)
            guard offset + JournalLayout.chunkEventHeader <= bytes.count else { return sequence }
            let length = Int(bytes.littleEndianUInt32(at: offset))
            let end = offset + JournalLayout.chunkEventHeader + length
            guard end <= bytes.count else { return sequence }
            let record = UnsafeRawBufferPointer(rebasing: bytes[(offset + 4)..<end])
            guard try body(sequence, record) else { return nil }
            offset = end
        }
        return nil
    }
}

/// Builds a history chunk in a reusable buffer.
struct ChunkBuilder {
    private(set) var bytes: [UInt8] = []
    private(set) var count = 0
    private(set) var firstSequence: UInt64 = 0

    var isEmpty: Bool { count == 0 }

    mutating func start(at sequence: UInt64) {
        bytes.removeAll(keepingCapacity: true)
        bytes.append(contentsOf: [0, 0, 0, 0])
        count = 0
        firstSequence = sequence
    }

    /// Whether an event of `recordBytes` (checksum + payload) fits without passing the chunk size.
    func fits(_ recordBytes: Int) -> Bool {
        count == 0 || bytes.count + 4 + recordBytes <= JournalLayout.chunkBytes
    }

    /// Adds one event from its `CRC-32C (4) + payload` record.
    mutating func add(record: UnsafeRawBufferPointer) {
        var length = UInt32(record.count - 4).littleEndian
        withUnsafeBytes(of: &length) { bytes.append(contentsOf: $0) }
        bytes.append(contentsOf: record)
        count += 1
        var total = UInt32(count).littleEndian
        withUnsafeBytes(of: &total) { header in
            bytes.withUnsafeMutableBytes { $0.copyMemory(from: header) }
        }
    }
}

/// Two big-endian integers as one 16-byte key.
struct Key16 {
    var bytes: [UInt8] { withBytes { Array($0) } }

    private var high: UInt64
    private var low: UInt64
    init(_ high: UInt64, _ low: UInt64) {
        self.high = high.bigEndian
        self.low = low.bigEndian
    }
    @inline(__always)
    func withBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        var copy = self
        return try withUnsafeBytes(of: &copy, body)
    }
}

/// One big-endian integer as an 8-byte key.
struct Key8 {
    private var value: UInt64
    init(_ value: UInt64) { self.value = value.bigEndian }
    @inline(__always)
    func withBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        var copy = self
        return try withUnsafeBytes(of: &copy, body)
    }
}

/// Three big-endian integers as one 24-byte key (timers).
struct Key24 {
    private var a: UInt64, b: UInt64, c: UInt64
    init(_ a: UInt64, _ b: UInt64, _ c: UInt64) {
        self.a = a.bigEndian
        self.b = b.bigEndian
        self.c = c.bigEndian
    }
    @inline(__always)
    func withBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        var copy = self
        return try withUnsafeBytes(of: &copy, body)
    }
}

extension UnsafeRawBufferPointer {
    @inline(__always)
    func bigEndianUInt64(at offset: Int) -> UInt64 {
        loadUnaligned(fromByteOffset: offset, as: UInt64.self).bigEndian
    }
    @inline(__always)
    func littleEndianUInt32(at offset: Int) -> UInt32 {
        loadUnaligned(fromByteOffset: offset, as: UInt32.self).littleEndian
    }
}

extension UnsafeMutableRawBufferPointer {
    @inline(__always)
    func storeBigEndian(_ value: UInt64, at offset: Int) {
        storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt64.self)
    }
    @inline(__always)
    func storeLittleEndian(_ value: UInt32, at offset: Int) {
        storeBytes(of: value.littleEndian, toByteOffset: offset, as: UInt32.self)
    }
}

extension EntityName {
    /// The length of the `names` key (type, a zero byte, id), checked: LMDB keys hold at most 511
    /// bytes, and the type must be non-empty and free of zero bytes.
    func nameKeyCount() throws(JournalError) -> Int {
        let count = type.utf8.count + 1 + id.utf8.count
        guard count <= 511, !type.isEmpty, !type.utf8.contains(0) else {
            throw JournalError(.nameTooLong, entity: self,
                               "an entity type plus id must be 1...510 UTF-8 bytes and the type must not contain a zero byte (got \(count - 1))")
        }
        return count
    }

    /// Calls `body` with the `names` key, built on the stack (a lookup allocates nothing); `count` is
    /// ``nameKeyCount()``.
    func withNameKey<R>(count: Int, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try withUnsafeTemporaryAllocation(of: UInt8.self, capacity: count) { buffer in
            var end = buffer.initialize(fromContentsOf: type.utf8)
            buffer[end] = 0
            end += 1
            end = buffer[end...].initialize(fromContentsOf: id.utf8)
            assert(end == count)
            return try body(UnsafeRawBufferPointer(buffer))
        }
    }

    /// The name a `names` key spells, or `nil` when it has no zero byte after a non-empty type.
    init?(nameKey key: UnsafeRawBufferPointer) {
        guard let zero = key.firstIndex(of: 0), zero > 0 else { return nil }
        self.init(type: String(decoding: key[..<zero], as: UTF8.self), id: String(decoding: key[(zero + 1)...], as: UTF8.self))
    }
}

extension EntityMetadata {
    private static let version: UInt8 = 2
    private static let header = 28

    func encoded() -> [UInt8] {
        let typeCount = name.type.utf8.count
        let count = Self.header + typeCount + name.id.utf8.count
        return [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            let out = UnsafeMutableRawBufferPointer(buffer)
            out[0] = Self.version
            out[1] = status
            out.storeBigEndian(run, at: 2)
            out.storeBigEndian(prunedBefore, at: 10)
            out.storeBigEndian(runStartSequence, at: 18)
            out.storeBytes(of: UInt16(typeCount).bigEndian, toByteOffset: 26, as: UInt16.self)
            let end = buffer[Self.header...].initialize(fromContentsOf: name.type.utf8)
            _ = buffer[end...].initialize(fromContentsOf: name.id.utf8)
            initialized = count
        }
    }

    static func decode(_ bytes: UnsafeRawBufferPointer, key: EntityKey) throws(JournalError) -> EntityMetadata {
        guard bytes.count >= header, bytes[0] == version else {
            throw JournalError(.corruptedRecord, key: key, "the entity's metadata record is damaged (\(bytes.count) bytes)")
        }
        let typeCount = Int(bytes.loadUnaligned(fromByteOffset: 26, as: UInt16.self).bigEndian)
        guard header + typeCount <= bytes.count else {
            throw JournalError(.corruptedRecord, key: key, "the entity's metadata record is damaged (type length \(typeCount))")
        }
        let type = String(decoding: bytes[header..<(header + typeCount)], as: UTF8.self)
        let id = String(decoding: bytes[(header + typeCount)...], as: UTF8.self)
        var metadata = EntityMetadata(name: EntityName(type: type, id: id), status: bytes[1], run: bytes.bigEndianUInt64(at: 2),
                                      runStartSequence: bytes.bigEndianUInt64(at: 18))
        metadata.prunedBefore = bytes.bigEndianUInt64(at: 10)
        return metadata
    }
}
