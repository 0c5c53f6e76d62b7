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
        /// The checksum is computed by the caller's thread, off the writer's critical path.
        case append(EntityKey, sequence: UInt64, payload: [UInt8], checksum: UInt32)
        case snapshot(EntityKey, sequence: UInt64, payload: [UInt8])
        case prune(EntityKey, before: UInt64)
        case metadata(EntityKey, EntityMetadata)
        case scheduleTimer(JournalTimer)
        case cancelTimer(dueNanoseconds: UInt64, entity: EntityKey, id: UInt64)
        case recordResult(key: [UInt8], payload: [UInt8])
        case putTask(key: [UInt8], value: [UInt8])
        case deleteTask(key: [UInt8])
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
        operations.append(.append(entity, sequence: sequence, payload: payload, checksum: CRC32C.checksum(payload)))
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
        operations.append(.putTask(key: key, value: value))
    }

    /// Removes a pending task (no effect when absent).
    public mutating func deleteTask(key: [UInt8]) {
        operations.append(.deleteTask(key: key))
    }

    /// Records the result for an idempotency key. The first recorded result wins.
    public mutating func recordResult(forKey key: [UInt8], payload: [UInt8]) {
        operations.append(.recordResult(key: key, payload: payload))
    }
}

/// What a durable commit returns.
public struct CommitReceipt: Sendable {
    /// The keys of the entities the batch registered, in the order of its `register` calls.
    public var registered: [EntityKey]
}
