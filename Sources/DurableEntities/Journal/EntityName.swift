/// An entity's identity: its entity type's name and its id within that type.
public struct EntityName: Hashable, Sendable, CustomStringConvertible {
    /// The entity type's name, such as `"Account"`.
    public var type: String
    /// The entity id, such as `"alice"`.
    public var id: String

    public init(type: String, id: String) {
        self.type = type
        self.id = id
    }

    public var description: String { "\(type)/\(id)" }
}

/// The compact internal key the journal gives an entity at registration: 8 bytes, allocated in
/// increasing order, so entities created together sit together in the history B-tree.
public struct EntityKey: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static func < (lhs: EntityKey, rhs: EntityKey) -> Bool { lhs.rawValue < rhs.rawValue }
    public var description: String { "#\(rawValue)" }
}

/// One event of an entity's history.
public struct JournalEvent: Sendable, Hashable {
    /// The entity's sequence number of this event, from 1, consecutive.
    public var sequence: UInt64
    /// The event's bytes, as appended.
    public var payload: [UInt8]

    public init(sequence: UInt64, payload: [UInt8]) {
        self.sequence = sequence
        self.payload = payload
    }
}

/// The latest snapshot of an entity: its state as of an event sequence number.
public struct JournalSnapshot: Sendable, Hashable {
    /// The sequence number of the last event the snapshot includes.
    public var sequence: UInt64
    public var payload: [UInt8]

    public init(sequence: UInt64, payload: [UInt8]) {
        self.sequence = sequence
        self.payload = payload
    }
}

/// A durable timer row. Timers are ordered by ``dueNanoseconds``, then entity, then ``id``.
public struct JournalTimer: Sendable, Hashable {
    /// When it falls due, in nanoseconds on the runtime's clock epoch.
    public var dueNanoseconds: UInt64
    public var entity: EntityKey
    /// Distinguishes timers of one entity.
    public var id: UInt64
    public var payload: [UInt8]
    /// `false` for a timer read back whose row fails its check: its due time, entity, id or payload
    /// was damaged on disk, so none of them can be trusted (``Journal/timers(dueAtOrAfter:dueAtOrBefore:limit:where:)``
    /// returns it so that the caller can report it and set it aside).
    public internal(set) var isIntact = true

    public init(dueNanoseconds: UInt64, entity: EntityKey, id: UInt64, payload: [UInt8] = []) {
        self.dueNanoseconds = dueNanoseconds
        self.entity = entity
        self.id = id
        self.payload = payload
    }
}

/// What the journal keeps about an entity besides its events.
public struct EntityMetadata: Sendable, Hashable {
    public var name: EntityName
    /// A status code owned by the runtime (running, completed, failed, …); the journal stores it.
    public var status: UInt8
    /// The current run (continue-as-new starts a new one).
    public var run: UInt64
    /// The sequence number of the current run's first event (continue-as-new starts a run).
    public var runStartSequence: UInt64
    /// Events before this sequence number were deleted by retention.
    public internal(set) var prunedBefore: UInt64

    public init(name: EntityName, status: UInt8 = 0, run: UInt64 = 1, runStartSequence: UInt64 = 1) {
        self.name = name
        self.status = status
        self.run = run
        self.runStartSequence = runStartSequence
        self.prunedBefore = 0
    }
}

/// A pending task as read back: work the runtime owes (an activity to run, a message to deliver).
public struct JournalTask: Sendable, Hashable {
    public let key: [UInt8]
    /// The payload as stored (check removed).
    public let value: [UInt8]
    /// `false` when the row fails its check: its key or payload was damaged on disk, and `value`
    /// cannot be trusted. The journal leaves it in place; the runtime reports it and passes it over.
    public let isIntact: Bool
}
