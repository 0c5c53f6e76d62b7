/// Writes that commit together, atomically: all of a batch's operations become durable in one
/// transaction, or none do.
///
/// A batch is what one caller hands to ``Journal/commit(_:)``. The journal's writer packs many batches
/// from many callers into each LMDB transaction (group commit), but checks each batch on its own: a
/// batch with a wrong sequence number is refused alone and the others still commit.
///
/// ## Usage
/// ```swift
/// var batch = JournalBatch()
/// batch.append(key, sequence: 42, payload: bytes)
/// batch.saveSnapshot(key, sequence: 42, payload: state)
/// try await journal.commit(batch)
/// ```
public struct JournalBatch: Sendable {
    enum Operation: Sendable {
        case register(EntityName)
        case registerAs(EntityName, EntityKey)
        /// Consecutive events of one entity; their checksums are computed by the caller's thread, off
        /// the writer's critical path.
        case append(EntityKey, JournalEvents)
        case snapshot(EntityKey, sequence: UInt64, payload: [UInt8])
        case prune(EntityKey, before: UInt64)
        case metadata(EntityKey, EntityMetadata)
        case scheduleTimer(JournalTimer)
        case cancelTimer(dueNanoseconds: UInt64, entity: EntityKey, id: UInt64)
        case recordResult(key: [UInt8], payload: [UInt8], recordedAt: UInt64)
        case expireResults(recordedBefore: UInt64, limit: Int)
        case putTask(key: TaskKey, value: [UInt8])
        case replaceTask(key: TaskKey, value: [UInt8])
        case deleteTask(key: TaskKey)
        /// A condition, not a write: see ``JournalBatch/expectTask(_:value:)``.
        case expectTask(key: TaskKey, value: [UInt8]?)
        /// A condition, not a write: see ``JournalBatch/expectTimer(dueNanoseconds:entity:id:)``.
        case expectTimer(dueNanoseconds: UInt64, entity: EntityKey, id: UInt64)
    }

    var operations: [Operation] = []

    public init() {}

    /// Whether the batch has no operations.
    public var isEmpty: Bool { operations.isEmpty }

    /// Makes room for `count` operations in one allocation (appending one by one grows it step by step).
    public mutating func reserveCapacity(_ count: Int) {
        operations.reserveCapacity(count)
    }

    /// Registers an entity (idempotent); its key comes back in ``CommitReceipt/registered``.
    public mutating func register(_ name: EntityName) {
        operations.append(.register(name))
    }

    /// Registers `name` under a key from ``Journal/reserveKey(for:)``, so that the same batch can
    /// already append to it: a new entity's first events need no commit of their own. Refused if the
    /// name is registered under another key.
    public mutating func register(_ name: EntityName, as key: EntityKey) {
        operations.append(.registerAs(name, key))
    }

    /// Appends an event. `sequence` must be the entity's latest sequence (counting earlier appends in
    /// this batch) plus one, or the batch is refused with ``JournalError/Code/nonConsecutiveSequence``.
    public mutating func append(_ entity: EntityKey, sequence: UInt64, payload: [UInt8]) {
        // Joins the previous operation when it appends the events just before this one (one buffer
        // and one operation for a run of appends).
        if case .append(let previous, let events)? = operations.last, previous == entity, events.nextSequence == sequence,
           case .append(_, var joined) = operations.removeLast() {
            joined.append(payload)
            operations.append(.append(entity, joined))
            return
        }
        var events = JournalEvents(firstSequence: sequence, reservingBytes: JournalEvents.overhead + payload.count)
        events.append(payload)
        operations.append(.append(entity, events))
    }

    /// Appends consecutive events, from `events.firstSequence`, which must be the entity's latest
    /// sequence (counting earlier appends in this batch) plus one.
    public mutating func append(_ entity: EntityKey, events: JournalEvents) {
        guard !events.isEmpty else { return }
        operations.append(.append(entity, events))
    }

    /// Replaces the entity's snapshot.
    public mutating func saveSnapshot(_ entity: EntityKey, sequence: UInt64, payload: [UInt8]) {
        operations.append(.snapshot(entity, sequence: sequence, payload: payload))
    }

    /// Deletes the entity's events before `sequence` (retention). The latest sequence is kept.
    public mutating func deleteHistory(of entity: EntityKey, before sequence: UInt64) {
        operations.append(.prune(entity, before: sequence))
    }

    /// Replaces the entity's metadata (status, run).
    public mutating func setMetadata(_ entity: EntityKey, _ metadata: EntityMetadata) {
        operations.append(.metadata(entity, metadata))
    }

    /// Adds a durable timer row.
    public mutating func scheduleTimer(_ timer: JournalTimer) {
        operations.append(.scheduleTimer(timer))
    }

    /// Removes a durable timer row (no effect when absent).
    public mutating func cancelTimer(dueNanoseconds: UInt64, entity: EntityKey, id: UInt64) {
        operations.append(.cancelTimer(dueNanoseconds: dueNanoseconds, entity: entity, id: id))
    }

    /// Stores a pending task (work owed: an activity to run, a message to deliver), replacing any.
    public mutating func putTask(key: [UInt8], value: [UInt8]) {
        putTask(TaskKey(key), value: value)
    }

    /// Stores a pending task under a key built without an allocation, replacing any.
    public mutating func putTask(_ key: TaskKey, value: [UInt8]) {
        operations.append(.putTask(key: key, value: value))
    }

    /// Replaces a pending task only if it is still stored: a task deleted by an earlier commit (its
    /// owner gave it up) stays deleted.
    public mutating func replaceTask(_ key: TaskKey, value: [UInt8]) {
        operations.append(.replaceTask(key: key, value: value))
    }

    /// Removes a pending task (no effect when absent).
    public mutating func deleteTask(key: [UInt8]) {
        deleteTask(TaskKey(key))
    }

    /// Removes a pending task (no effect when absent).
    public mutating func deleteTask(_ key: TaskKey) {
        operations.append(.deleteTask(key: key))
    }

    /// Makes the batch conditional on a task row: it commits only if, when the writer comes to it (after
    /// the batches before it in the same transaction), the row under `key` holds exactly `value` —
    /// `nil`: no row. Otherwise the batch alone is refused with ``JournalError/Code/conflict`` and
    /// nothing of it is written. A compare-and-set for rows that other writers may change meanwhile:
    /// read, decide, then write with the row read as the expectation.
    public mutating func expectTask(_ key: TaskKey, value: [UInt8]?) {
        operations.append(.expectTask(key: key, value: value))
    }

    /// Makes the batch conditional on a timer row: it commits only if the timer is still stored when
    /// the writer comes to it (not fired and deleted by another batch); otherwise the batch alone is
    /// refused with ``JournalError/Code/conflict``. See ``expectTask(_:value:)``.
    public mutating func expectTimer(dueNanoseconds: UInt64, entity: EntityKey, id: UInt64) {
        operations.append(.expectTimer(dueNanoseconds: dueNanoseconds, entity: entity, id: id))
    }

    /// Deletes `timer`, and makes the batch conditional on its being stored still (see
    /// ``expectTimer(dueNanoseconds:entity:id:)``): whoever deletes a timer's row acts on it, once.
    public mutating func claimTimer(_ timer: JournalTimer) {
        expectTimer(dueNanoseconds: timer.dueNanoseconds, entity: timer.entity, id: timer.id)
        cancelTimer(dueNanoseconds: timer.dueNanoseconds, entity: timer.entity, id: timer.id)
    }

    /// Records the result for an idempotency key (1...503 bytes). The first recorded result wins, and
    /// its `recordedAt` (ns, the caller's clock) is what ``expireResults(recordedBefore:limit:)`` goes by.
    public mutating func recordResult(forKey key: [UInt8], payload: [UInt8], recordedAt: UInt64) {
        operations.append(.recordResult(key: key, payload: payload, recordedAt: recordedAt))
    }

    /// Deletes recorded results older than `recordedBefore`, oldest first, at most `limit` of them
    /// (at least 1), so one sweep never makes a long commit. How many went comes back in
    /// ``CommitReceipt/expiredResults``; fewer than `limit` means none older is left.
    public mutating func expireResults(recordedBefore: UInt64, limit: Int) {
        operations.append(.expireResults(recordedBefore: recordedBefore, limit: max(1, limit)))
    }
}

/// The key of a row in the journal's `tasks` table. Keys of up to ``inlineCapacity`` bytes (the
/// runtime's own: an activity task's is 17, an outbox message's 21) are held in the value itself, so
/// that writing and deleting a task row costs no allocation for its key; longer ones (up to 511
/// bytes) in an array.
public struct TaskKey: Sendable, Hashable {
    /// The longest key held inline.
    public static let inlineCapacity = 24

    private enum Storage: Sendable, Hashable {
        case inline(UInt64, UInt64, UInt64, count: UInt8)
        case bytes([UInt8])
    }

    private var storage: Storage

    /// The key `bytes`.
    public init(_ bytes: [UInt8]) {
        if bytes.count <= Self.inlineCapacity {
            self.init(inlineCount: bytes.count) { $0.copyBytes(from: bytes) }
        } else {
            self.init(storage: .bytes(bytes))
        }
    }

    /// A key of `count` bytes (at most ``inlineCapacity``) that `write` writes in place: a caller
    /// with its own fixed layout builds its keys without an allocation.
    public init(inlineCount count: Int, _ write: (UnsafeMutableRawBufferPointer) -> Void) {
        precondition((0...Self.inlineCapacity).contains(count), "an inline task key has at most \(Self.inlineCapacity) bytes")
        var words: (UInt64, UInt64, UInt64) = (0, 0, 0)
        withUnsafeMutableBytes(of: &words) { write(UnsafeMutableRawBufferPointer(rebasing: $0[..<count])) }
        self.init(storage: .inline(words.0, words.1, words.2, count: UInt8(count)))
    }

    private init(storage: Storage) {
        self.storage = storage
    }

    /// The key's length in bytes.
    public var count: Int {
        switch storage {
        case .inline(_, _, _, let count): Int(count)
        case .bytes(let bytes): bytes.count
        }
    }

    /// Calls `body` with the key's bytes.
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        switch storage {
        case .inline(let a, let b, let c, let count):
            try Swift.withUnsafeBytes(of: (a, b, c)) { raw in try body(UnsafeRawBufferPointer(rebasing: raw[..<Int(count)])) }
        case .bytes(let bytes):
            try bytes.withUnsafeBytes { raw in try body(raw) }
        }
    }

    /// The key's bytes, in an array.
    public var bytes: [UInt8] { withUnsafeBytes { Array($0) } }
}

/// What a durable commit returns.
public struct CommitReceipt: Sendable {
    /// The keys of the entities the batch registered, in the order of its `register` calls.
    public var registered: [EntityKey] = []
    /// How many recorded results the batch's ``JournalBatch/expireResults(recordedBefore:limit:)`` deleted.
    public var expiredResults = 0
}

/// Consecutive events of one entity in one buffer, each with its CRC-32C: what a turn records, built
/// without an allocation per event. The buffer has a history chunk's layout (count, then per event
/// length, checksum, payload), so a new entity's events can be stored as they are.
///
/// ```swift
/// var events = JournalEvents(firstSequence: 8)
/// events.append(Array("deposited 100".utf8))
/// events.append { $0.append(contentsOf: header); $0.append(contentsOf: body) }  // written in place
/// batch.append(key, events: events)
/// ```
public struct JournalEvents: Sendable {
    /// Bytes an event takes besides its payload (its length and checksum); the buffer's header is 4.
    public static var overhead: Int { JournalLayout.chunkEventHeader }

    /// The first event's sequence.
    public let firstSequence: UInt64
    /// How many events there are.
    public private(set) var count = 0
    /// The buffer: count (4), then per event length (4), CRC-32C (4), payload.
    private(set) var bytes: [UInt8]

    /// No events yet; the first appended gets `firstSequence`. `reservingBytes` sizes the buffer for
    /// what is expected (each event takes ``overhead`` bytes besides its payload).
    public init(firstSequence: UInt64, reservingBytes: Int = 0) {
        self.firstSequence = firstSequence
        bytes = []
        bytes.reserveCapacity(JournalLayout.chunkHeader + reservingBytes)
        bytes.append(contentsOf: [0, 0, 0, 0])
    }

    public var isEmpty: Bool { count == 0 }
    /// The sequence the next appended event gets.
    public var nextSequence: UInt64 { firstSequence + UInt64(count) }
    /// Bytes of the buffer.
    public var byteCount: Int { bytes.count }

    /// Appends an event.
    public mutating func append(_ payload: [UInt8]) {
        append { $0.append(contentsOf: payload) }
    }

    /// Appends an event whose payload `write` appends to the buffer it is handed (it must only
    /// append). Returns the payload's size.
    @discardableResult
    public mutating func append(_ write: (inout [UInt8]) throws -> Void) rethrows -> Int {
        let start = bytes.count
        bytes.append(contentsOf: [0, 0, 0, 0, 0, 0, 0, 0])
        do {
            try write(&bytes)
        } catch {
            bytes.removeSubrange(start...)
            throw error
        }
        count += 1
        let length = bytes.count - start - JournalLayout.chunkEventHeader
        bytes.withUnsafeMutableBytes { raw in
            let payload = UnsafeRawBufferPointer(rebasing: raw[(start + JournalLayout.chunkEventHeader)...])
            raw.storeLittleEndian(UInt32(length), at: start)
            raw.storeLittleEndian(CRC32C.checksum(payload), at: start + 4)
            raw.storeLittleEndian(UInt32(count), at: 0)
        }
        return length
    }

    /// Calls `body` with each event's sequence and `CRC-32C (4) + payload` record.
    func forEach(_ body: (UInt64, UnsafeRawBufferPointer) throws -> Void) rethrows {
        try bytes.withUnsafeBytes { raw in
            _ = try HistoryChunk(firstSequence: firstSequence, bytes: raw).forEach { sequence, record in
                try body(sequence, record)
                return true
            }
        }
    }
}
