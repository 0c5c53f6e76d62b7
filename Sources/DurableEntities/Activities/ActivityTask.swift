/// An activity the runtime owes: stored in the journal's `tasks` table from the commit that
/// scheduled it until the commit that records its outcome. Its attempt count and last heartbeat
/// survive a crash; at open, every stored task whose next attempt is due runs again.
struct ActivityTask: Codable, Sendable {
    /// What stays the same over the activity's life, in one box: a task is copied at every hand-over
    /// (the commit that schedules it, the pool's queue, the attempt, its retries), and a copy retains
    /// the box once instead of each of its strings, its input and its options (the copies were ~2% of
    /// the CPU of `saga-transfer` with pool activities).
    private final class Fixed: Sendable {
        let entityType: String
        let entityID: String
        let name: String
        let input: [UInt8]
        let options: ActivityOptions

        init(entityType: String, entityID: String, name: String, input: [UInt8], options: ActivityOptions) {
            self.entityType = entityType
            self.entityID = entityID
            self.name = name
            self.input = input
            self.options = options
        }

    }
    private var fixed: Fixed

    var entityType: String { fixed.entityType }
    var entityID: String { fixed.entityID }
    var entityKey: UInt64
    var run: UInt64
    var activityID: UInt64
    var name: String { fixed.name }
    var input: [UInt8] { fixed.input }
    var options: ActivityOptions {
        get { fixed.options }
        set { fixed = Fixed(entityType: entityType, entityID: entityID, name: name, input: input, options: newValue) }
    }
    /// The next attempt's number (1 for the first).
    var attempt: Int
    /// When it was first scheduled (for the schedule-to-close timeout), ns on the runtime's clock.
    var scheduledAt: UInt64
    /// No attempt before this time (a retry's backoff).
    var notBefore: UInt64
    var heartbeat: [UInt8]?
    /// The last failed attempt's error, for the final ``ActivityFailure``.
    var lastErrorType: String?
    var lastError: String?
    /// Set in a row stored while attempt `attempt` ran (a heartbeat's, see
    /// ``ActivityContext/heartbeat(_:)``, or its start's, see ``Activity/recordsAttemptStart``): if
    /// it is still there at open, that attempt was cut off by a crash and counts as a failed attempt.
    var runningAttempt: Int? = nil
    /// The cell that dispatched the task: its outcome goes straight there while the cell is in
    /// memory, without looking the entity up. Not stored: a task read back from the journal (at open,
    /// for a retry) has none and is delivered by name.
    var receiver: (any ActivityOutcomeReceiver)? = nil

    init(entityType: String, entityID: String, entityKey: UInt64, run: UInt64, activityID: UInt64, name: String,
         input: [UInt8], options: ActivityOptions, attempt: Int, scheduledAt: UInt64, notBefore: UInt64,
         heartbeat: [UInt8]? = nil, lastErrorType: String? = nil, lastError: String? = nil, runningAttempt: Int? = nil,
         receiver: (any ActivityOutcomeReceiver)? = nil) {
        self.fixed = Fixed(entityType: entityType, entityID: entityID, name: name, input: input, options: options)
        self.entityKey = entityKey
        self.run = run
        self.activityID = activityID
        self.attempt = attempt
        self.scheduledAt = scheduledAt
        self.notBefore = notBefore
        self.heartbeat = heartbeat
        self.lastErrorType = lastErrorType
        self.lastError = lastError
        self.runningAttempt = runningAttempt
        self.receiver = receiver
    }

    private enum CodingKeys: String, CodingKey {
        case entityType, entityID, entityKey, run, activityID, name, input, options, attempt, scheduledAt, notBefore
        case heartbeat, lastErrorType, lastError
    }

    /// The format of rows stored before activity tasks had their own (see ``encoded()``), still read at open.
    init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        self.init(entityType: try container.decode(String.self, forKey: .entityType),
                  entityID: try container.decode(String.self, forKey: .entityID),
                  entityKey: try container.decode(UInt64.self, forKey: .entityKey),
                  run: try container.decode(UInt64.self, forKey: .run),
                  activityID: try container.decode(UInt64.self, forKey: .activityID),
                  name: try container.decode(String.self, forKey: .name),
                  input: try container.decode([UInt8].self, forKey: .input),
                  options: try container.decode(ActivityOptions.self, forKey: .options),
                  attempt: try container.decode(Int.self, forKey: .attempt),
                  scheduledAt: try container.decode(UInt64.self, forKey: .scheduledAt),
                  notBefore: try container.decode(UInt64.self, forKey: .notBefore),
                  heartbeat: try container.decodeIfPresent([UInt8].self, forKey: .heartbeat),
                  lastErrorType: try container.decodeIfPresent(String.self, forKey: .lastErrorType),
                  lastError: try container.decodeIfPresent(String.self, forKey: .lastError))
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(entityType, forKey: .entityType)
        try container.encode(entityID, forKey: .entityID)
        try container.encode(entityKey, forKey: .entityKey)
        try container.encode(run, forKey: .run)
        try container.encode(activityID, forKey: .activityID)
        try container.encode(name, forKey: .name)
        try container.encode(input, forKey: .input)
        try container.encode(options, forKey: .options)
        try container.encode(attempt, forKey: .attempt)
        try container.encode(scheduledAt, forKey: .scheduledAt)
        try container.encode(notBefore, forKey: .notBefore)
        try container.encodeIfPresent(heartbeat, forKey: .heartbeat)
        try container.encodeIfPresent(lastErrorType, forKey: .lastErrorType)
        try container.encodeIfPresent(lastError, forKey: .lastError)
    }

    static let keyPrefix: UInt8 = 0x61  // "a"

    /// `a`, the entity key, the activity id: an entity's tasks sort together.
    var key: TaskKey { Self.key(entity: entityKey, activity: activityID) }

    static func key(entity: UInt64, activity: UInt64) -> TaskKey { key(keyPrefix, entity: entity, activity: activity) }

    /// `prefix`, the entity key, the activity id: the shape of a task's key and of its cancellation row's.
    private static func key(_ prefix: UInt8, entity: UInt64, activity: UInt64) -> TaskKey {
        TaskKey(inlineCount: 17) { raw in
            raw[0] = prefix
            raw.storeBytes(of: entity.bigEndian, toByteOffset: 1, as: UInt64.self)
            raw.storeBytes(of: activity.bigEndian, toByteOffset: 9, as: UInt64.self)
        }
    }

    /// The first bytes of every key of that shape with `prefix` for `entity`: a scan of one entity's rows.
    private static func entityPrefix(_ prefix: UInt8, entity: UInt64) -> [UInt8] {
        [prefix] + withUnsafeBytes(of: entity.bigEndian) { Array($0) }
    }

    /// The first bytes of every task key of `entity`.
    static func keyPrefix(entity: UInt64) -> [UInt8] { entityPrefix(keyPrefix, entity: entity) }

    /// The first bytes of every cancellation row key of `entity`.
    static func cancelKeyPrefix(entity: UInt64) -> [UInt8] { entityPrefix(cancelKeyPrefix, entity: entity) }

    /// The identity a key of that shape with `prefix` holds; `nil` for a key of another shape.
    private static func id(ofKey key: UnsafeRawBufferPointer, prefix: UInt8) -> ID? {
        guard key.count == 17, key[0] == prefix else { return nil }
        return ID(entityKey: key.bigEndianUInt64(at: 1), activityID: key.bigEndianUInt64(at: 9))
    }

    /// `c`, the entity key, the activity id: the row that says the run requested the activity's
    /// cancellation and waits for its outcome (``ActivityCancellationType/waitCancellationCompleted``).
    /// Stored by the turn that made the request, deleted by the one that records the outcome; the
    /// worker reads it where an attempt would start (a retry falling due, the next open), so an
    /// activity whose cancellation was requested never starts again. A row of its own, not a field of
    /// the task: the worker rewrites the task (heartbeats, retries) from its own copy.
    static func cancelKey(entity: UInt64, activity: UInt64) -> TaskKey { key(cancelKeyPrefix, entity: entity, activity: activity) }

    static let cancelKeyPrefix: UInt8 = 0x63  // "c"
    /// A cancellation row's value: its key says it all.
    static let cancelRequestValue: [UInt8] = [1]

    /// The identity a cancellation row's key holds; `nil` for a key of another shape.
    static func id(ofCancelKey key: UnsafeRawBufferPointer) -> ID? { id(ofKey: key, prefix: cancelKeyPrefix) }

    /// `p`, the entity key, the activity id: the row that says an operator paused the activity
    /// (``EntityRuntime/pauseActivity(of:activity:)``) while an attempt of it ran or was due. No
    /// attempt of it starts while the row is stored; an attempt running when it came goes on, and if
    /// it fails the next one is stored paused (see ``isPaused``). Stored by the pause, deleted by a
    /// "retry now" and once the activity ended. A row of its own, like the cancellation row, since the
    /// worker rewrites a running attempt's task from its own copy.
    static func pauseKey(entity: UInt64, activity: UInt64) -> TaskKey { key(pauseKeyPrefix, entity: entity, activity: activity) }

    static let pauseKeyPrefix: UInt8 = 0x70  // "p"
    /// A pause row's value: its key says it all.
    static let pauseRequestValue: [UInt8] = [1]

    /// The first bytes of every pause row key of `entity`.
    static func pauseKeyPrefix(entity: UInt64) -> [UInt8] { entityPrefix(pauseKeyPrefix, entity: entity) }

    /// The identity a pause row's key holds; `nil` for a key of another shape.
    static func id(ofPauseKey key: UnsafeRawBufferPointer) -> ID? { id(ofKey: key, prefix: pauseKeyPrefix) }

    /// A paused task's `notBefore`: never due by itself. Its only timer is its schedule-to-close
    /// deadline's, if it has one (a timer that far would be the next one a skipping test clock jumps to).
    static let pausedNotBefore = UInt64.max

    /// Paused by an operator after a failed attempt: no attempt starts until a "retry now".
    var isPaused: Bool { notBefore == Self.pausedNotBefore }

    /// When its schedule-to-close timeout ends it, ns on the runtime's clock; `nil` without one.
    var scheduleToCloseDeadline: UInt64? {
        options.scheduleToCloseTimeout.map { scheduledAt.saturatingAdd($0.nanoseconds) }
    }

    /// The task's identity in memory (its ``key``'s content, without building the bytes).
    struct ID: Hashable, Sendable {
        var entityKey: UInt64
        var activityID: UInt64
    }

    /// The identities that `rows` keyed `prefix` · entity · activity id hold (``cancelKeyPrefix``,
    /// ``pauseKeyPrefix``); rows with keys of another shape are skipped.
    static func ids(in rows: [JournalTask], prefix: UInt8) -> Set<ID> {
        var ids: Set<ID> = []
        for row in rows {
            if let id = row.key.withUnsafeBytes({ id(ofKey: $0, prefix: prefix) }) { ids.insert(id) }
        }
        return ids
    }

    /// The identity a task row's key holds; `nil` for a key of another shape (not an activity task's).
    static func id(ofKey key: UnsafeRawBufferPointer) -> ID? { id(ofKey: key, prefix: keyPrefix) }

    var id: ID { ID(entityKey: entityKey, activityID: activityID) }

    /// The same for every attempt and across restarts.
    var idempotencyKey: String {
        // Built in one allocation (interpolation grows its buffer step by step).
        var key = String()
        key.reserveCapacity(entityType.utf8.count + entityID.utf8.count + 22)
        key += entityType
        key += "/"
        key += entityID
        key += "/"
        key += String(activityID)
        return key
    }

    var entityName: EntityName { EntityName(type: entityType, id: entityID) }
}
