/// One event of an entity's history, as the journal stores it: a kind, the time it was first handled,
/// an optional idempotency key, and the kind's body.
///
/// Layout: kind (1) · time in ns since the Unix epoch (8, big-endian) · key length (2) · key · body.
/// - `signal`: body = the encoded signal.
/// - `update`: body = update length (4) · the encoded update · the encoded result.
/// - `terminated`: body = the reason, UTF-8.
public struct HistoryEvent: Sendable, Hashable {
    public enum Kind: UInt8, Sendable, Hashable, Codable {
        // Inputs: what happened to the entity.
        case signal = 1
        case update = 2
        case terminated = 3
        case started = 4
        case timerFired = 6
        case cancelRequested = 12
        /// An activity ended with its output. Body: activity id (8) · the number of the attempt that
        /// ended it (4) · that attempt's start, ns (8; 0 when not known) · the output. The attempt is
        /// the activity's "started" record: retries before it are not events (see ``activityAttempt``).
        case activityCompleted = 23
        /// An activity failed for good. Body: activity id (8) · the attempt that ended it (4; 0 when
        /// none ran) · its start, ns (8; 0 when not known) · the encoded ``ActivityFailure``.
        case activityFailed = 24
        /// An activity's output as versions before the attempt was recorded wrote it (body: activity
        /// id (8) · output). Still read and replayed as ``activityCompleted``; no longer written.
        case activityCompletedWithoutAttempt = 14
        /// An activity's failure as versions before the attempt was recorded wrote it (body: activity
        /// id (8) · the encoded ``ActivityFailure``). Still read and replayed; no longer written.
        case activityFailedWithoutAttempt = 15
        case childCompleted = 19
        case childFailed = 20
        /// A parent started this entity as its child (body: the parent link); precedes `started`.
        case parentLinked = 21
        // Commands: what its run body did (matched on replay).
        case timerStarted = 5
        case timerCancelled = 7
        case sideEffect = 8
        case versionMarker = 9
        case completed = 10
        case failed = 11
        /// The run body ended a cancelled run (see ``WorkflowFailure/isCancellation``; body: the
        /// message, as for `failed`). Versions before it recorded such an end as `failed`.
        case cancelled = 26
        case activityScheduled = 13
        case childStarted = 16
        case entitySignalled = 17
        case childCancelRequested = 18
        /// The wait for an activity was cancelled (body: activity id (8)): the task that awaited it
        /// was, or (for ``ActivityCancellationType/waitCancellationCompleted`` only) the run. What
        /// follows depends on the call's cancellation type: with `tryCancel` its stored task went in the
        /// same commit, a running attempt is cancelled once that commit is durable, and an outcome it
        /// returns anyway is not recorded; with `abandon` the activity goes on and its outcome is not
        /// recorded; with `waitCancellationCompleted` its cancellation request was stored in the same
        /// commit and its outcome event follows.
        case activityCancelRequested = 25
        /// The run body ended its run with ``WorkflowContext/continueAsNew(_:)``; the body is the next
        /// run's input. The run's last event.
        case continuedAsNew = 22

        var isCommand: Bool {
            switch self {
            case .timerStarted, .timerCancelled, .sideEffect, .versionMarker, .completed, .failed, .cancelled, .activityScheduled,
                 .childStarted, .entitySignalled, .childCancelRequested, .activityCancelRequested, .continuedAsNew: true
            default: false
            }
        }
    }

    public var kind: Kind
    public var timeNanoseconds: UInt64
    /// The sender's idempotency key, when it gave one.
    public var idempotencyKey: String?
    public var body: [UInt8]

    public init(kind: Kind, timeNanoseconds: UInt64, idempotencyKey: String? = nil, body: [UInt8]) {
        self.kind = kind
        self.timeNanoseconds = timeNanoseconds
        self.idempotencyKey = idempotencyKey
        self.body = body
    }

    static func update(time: UInt64, key: String?, update: [UInt8], result: [UInt8]) -> HistoryEvent {
        var body = [UInt8]()
        body.reserveCapacity(4 + update.count + result.count)
        withUnsafeBytes(of: UInt32(update.count).bigEndian) { body.append(contentsOf: $0) }
        body.append(contentsOf: update)
        body.append(contentsOf: result)
        return HistoryEvent(kind: .update, timeNanoseconds: time, idempotencyKey: key, body: body)
    }

    /// The update and result parts of an `update` event's body.
    func updateParts() -> (update: ArraySlice<UInt8>, result: ArraySlice<UInt8>)? {
        guard kind == .update, body.count >= 4 else { return nil }
        let length = body.withUnsafeBytes { Int($0.loadUnaligned(as: UInt32.self).bigEndian) }
        guard 4 + length <= body.count else { return nil }
        return (body[4..<(4 + length)], body[(4 + length)...])
    }

    /// The event that records a run body's command.
    static func command(_ command: WorkflowCommand, time: UInt64) -> HistoryEvent {
        func ids(_ values: UInt64...) -> [UInt8] {
            var bytes: [UInt8] = []
            for value in values { withUnsafeBytes(of: value.bigEndian) { bytes.append(contentsOf: $0) } }
            return bytes
        }
        switch command {
        case .startTimer(let id, let due): return HistoryEvent(kind: .timerStarted, timeNanoseconds: time, body: ids(id, due))
        case .cancelTimer(let id, let due): return HistoryEvent(kind: .timerCancelled, timeNanoseconds: time, body: ids(id, due))
        case .sideEffect(let id, let value): return HistoryEvent(kind: .sideEffect, timeNanoseconds: time, body: ids(id) + value)
        case .marker(let changeID, let version):
            return HistoryEvent(kind: .versionMarker, timeNanoseconds: time, body: ids(UInt64(bitPattern: Int64(version))) + Array(changeID.utf8))
        case .scheduleActivity(let id, let name, let input, let options):
            let spec = ScheduledActivity(name: name, input: input, options: options).encoded()
            return HistoryEvent(kind: .activityScheduled, timeNanoseconds: time, body: ids(id) + spec)
        case .complete(let output): return HistoryEvent(kind: .completed, timeNanoseconds: time, body: output)
        case .fail(let message, let cancelled):
            return HistoryEvent(kind: cancelled ? .cancelled : .failed, timeNanoseconds: time, body: Array(message.utf8))
        case .startChild(let id, let child, let input, let policy):
            var writer = ByteWriter()
            writer.append(child.type)
            writer.append(child.id)
            writer.append(policy.rawValue)
            writer.append(input)
            return HistoryEvent(kind: .childStarted, timeNanoseconds: time, body: ids(id) + writer.bytes)
        case .signalEntity(let id, let target, let signal):
            var writer = ByteWriter()
            writer.append(target.type)
            writer.append(target.id)
            writer.append(signal)
            return HistoryEvent(kind: .entitySignalled, timeNanoseconds: time, body: ids(id) + writer.bytes)
        case .cancelChild(let id): return HistoryEvent(kind: .childCancelRequested, timeNanoseconds: time, body: ids(id))
        case .cancelActivity(let id): return HistoryEvent(kind: .activityCancelRequested, timeNanoseconds: time, body: ids(id))
        case .continueAsNew(let input): return HistoryEvent(kind: .continuedAsNew, timeNanoseconds: time, body: input)
        }
    }

    /// The command a command event records; `nil` for inputs or a malformed body.
    var command: WorkflowCommand? {
        func id(_ index: Int) -> UInt64? {
            guard body.count >= (index + 1) * 8 else { return nil }
            return body.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: index * 8, as: UInt64.self).bigEndian }
        }
        switch kind {
        case .timerStarted: guard let a = id(0), let b = id(1) else { return nil }; return .startTimer(id: a, due: b)
        case .timerCancelled: guard let a = id(0), let b = id(1) else { return nil }; return .cancelTimer(id: a, due: b)
        case .sideEffect: guard let a = id(0) else { return nil }; return .sideEffect(id: a, value: Array(body[8...]))
        case .versionMarker:
            guard let a = id(0) else { return nil }
            return .marker(changeID: String(decoding: body[8...], as: UTF8.self), version: Int(Int64(bitPattern: a)))
        case .activityScheduled:
            guard let a = id(0),
                  let spec = ScheduledActivity.decode(body[8...])
            else { return nil }
            return .scheduleActivity(id: a, name: spec.name, input: spec.input, options: spec.options)
        case .completed: return .complete(output: body)
        case .failed: return .fail(message: String(decoding: body, as: UTF8.self), cancelled: false)
        case .cancelled: return .fail(message: String(decoding: body, as: UTF8.self), cancelled: true)
        case .childStarted:
            guard let a = id(0) else { return nil }
            var reader = ByteReader(bytes: body[8...])
            guard let type = reader.string(), let child = reader.string(), let raw = reader.byte(),
                  let policy = ParentClosePolicy(rawValue: raw), let input = reader.data() else { return nil }
            return .startChild(id: a, child: EntityName(type: type, id: child), input: input, policy: policy)
        case .entitySignalled:
            guard let a = id(0) else { return nil }
            var reader = ByteReader(bytes: body[8...])
            guard let type = reader.string(), let target = reader.string(), let signal = reader.data() else { return nil }
            return .signalEntity(id: a, target: EntityName(type: type, id: target), signal: signal)
        case .childCancelRequested: guard let a = id(0) else { return nil }; return .cancelChild(id: a)
        case .activityCancelRequested: guard let a = id(0) else { return nil }; return .cancelActivity(id: a)
        case .continuedAsNew: return .continueAsNew(input: body)
        default: return nil
        }
    }

    /// The command id and outcome of a `childCompleted` or `childFailed` event.
    var childOutcome: (id: UInt64, outcome: Result<[UInt8], ChildFailure>)? {
        guard body.count >= 8 else { return nil }
        let id = body.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self).bigEndian }
        switch kind {
        case .childCompleted: return (id, .success(Array(body[8...])))
        case .childFailed:
            guard let failure = ChildFailure.decode(body[8...]) else { return nil }
            return (id, .failure(failure))
        default: return nil
        }
    }

    static func childOutcome(id: UInt64, _ outcome: Result<[UInt8], ChildFailure>, time: UInt64) -> HistoryEvent {
        var body = [UInt8]()
        withUnsafeBytes(of: id.bigEndian) { body.append(contentsOf: $0) }
        switch outcome {
        case .success(let output):
            body.append(contentsOf: output)
            return HistoryEvent(kind: .childCompleted, timeNanoseconds: time, body: body)
        case .failure(let failure):
            body.append(contentsOf: failure.encoded())
            return HistoryEvent(kind: .childFailed, timeNanoseconds: time, body: body)
        }
    }

    /// The bytes of an activity outcome's id and attempt, before its output or failure (see
    /// ``appendActivityPrefix(id:attempt:to:)``).
    private static let activityPrefixBytes = 20

    /// Where an activity outcome event's output or failure starts, after the id (and the attempt).
    private var activityPayloadOffset: Int? {
        switch kind {
        case .activityCompleted, .activityFailed: body.count >= Self.activityPrefixBytes ? Self.activityPrefixBytes : nil
        case .activityCompletedWithoutAttempt, .activityFailedWithoutAttempt: body.count >= 8 ? 8 : nil
        default: nil
        }
    }

    /// The activity id and outcome of an activity outcome event (`activityCompleted`,
    /// `activityFailed`, or their forms without the attempt).
    var activityOutcome: (id: UInt64, outcome: Result<[UInt8], ActivityFailure>)? {
        guard let offset = activityPayloadOffset else { return nil }
        let id = body.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self).bigEndian }
        switch kind {
        case .activityCompleted, .activityCompletedWithoutAttempt: return (id, .success(Array(body[offset...])))
        default:
            guard let failure = try? body[offset...].withUnsafeBytes({ try BinaryEntityCodec().decode(ActivityFailure.self, from: $0) }) else { return nil }
            return (id, .failure(failure))
        }
    }

    /// The attempt an `activityCompleted` or `activityFailed` event records: the one that ended the
    /// activity. `nil` for other events, and for outcomes written before attempts were recorded.
    public var activityAttempt: ActivityAttempt? {
        guard kind == .activityCompleted || kind == .activityFailed, body.count >= Self.activityPrefixBytes else { return nil }
        return body.withUnsafeBytes { raw in
            let started = raw.loadUnaligned(fromByteOffset: 12, as: UInt64.self).bigEndian
            return ActivityAttempt(number: Int(raw.loadUnaligned(fromByteOffset: 8, as: UInt32.self).bigEndian),
                                   startedAt: started == 0 ? nil : started)
        }
    }

    static func activityOutcome(id: UInt64, _ outcome: Result<[UInt8], ActivityFailure>, attempt: ActivityAttempt,
                                time: UInt64) -> HistoryEvent {
        var body = [UInt8]()
        appendActivityPrefix(id: id, attempt: attempt, to: &body)
        switch outcome {
        case .success(let output):
            body.append(contentsOf: output)
            return HistoryEvent(kind: .activityCompleted, timeNanoseconds: time, body: body)
        case .failure(let failure):
            body.append(contentsOf: (try? BinaryEntityCodec().encode(failure)) ?? [])
            return HistoryEvent(kind: .activityFailed, timeNanoseconds: time, body: body)
        }
    }

    /// An activity outcome's id and attempt, as its event's body starts.
    private static func appendActivityPrefix(id: UInt64, attempt: ActivityAttempt, to bytes: inout [UInt8]) {
        withUnsafeBytes(of: id.bigEndian) { bytes.append(contentsOf: $0) }
        withUnsafeBytes(of: UInt32(clamping: max(0, attempt.number)).bigEndian) { bytes.append(contentsOf: $0) }
        withUnsafeBytes(of: (attempt.startedAt ?? 0).bigEndian) { bytes.append(contentsOf: $0) }
    }

    /// The timer id of a `timerFired` event.
    var firedTimer: UInt64? {
        guard kind == .timerFired, body.count >= 8 else { return nil }
        return body.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self).bigEndian }
    }

    /// Appends `command(command, time:).encoded()` to `bytes`, building the commands every activity
    /// records in place (the general path makes the body, then copies it behind the header). The
    /// appending encoders reserve nothing: `bytes` is usually a turn's growing event buffer, and
    /// reserving exactly what one more event needs would reallocate it for each event.
    static func appendCommand(_ command: WorkflowCommand, time: UInt64, to bytes: inout [UInt8]) {
        guard case .scheduleActivity(let id, let name, let input, let options) = command else {
            return Self.command(command, time: time).encode(into: &bytes)
        }
        var writer = ByteWriter()
        swap(&writer.bytes, &bytes)
        appendHeader(.activityScheduled, time: time, to: &writer.bytes)
        writer.append(id)
        ScheduledActivity(name: name, input: input, options: options).write(to: &writer)
        swap(&writer.bytes, &bytes)
    }

    /// Appends `activityOutcome(id:_:attempt:time:).encoded()` to `bytes`; a success is written in place.
    static func appendActivityOutcome(id: UInt64, _ outcome: Result<[UInt8], ActivityFailure>, attempt: ActivityAttempt,
                                      time: UInt64, to bytes: inout [UInt8]) {
        guard case .success(let output) = outcome else {
            return activityOutcome(id: id, outcome, attempt: attempt, time: time).encode(into: &bytes)
        }
        appendHeader(.activityCompleted, time: time, to: &bytes)
        appendActivityPrefix(id: id, attempt: attempt, to: &bytes)
        bytes.append(contentsOf: output)
    }

    /// The fixed part of ``encoded()`` for an event without an idempotency key.
    private static func appendHeader(_ kind: Kind, time: UInt64, to bytes: inout [UInt8]) {
        bytes.append(kind.rawValue)
        withUnsafeBytes(of: time.bigEndian) { bytes.append(contentsOf: $0) }
        withUnsafeBytes(of: UInt16(0).bigEndian) { bytes.append(contentsOf: $0) }
    }

    func encoded() -> [UInt8] {
        var bytes = [UInt8]()
        bytes.reserveCapacity(11 + (idempotencyKey?.utf8.count ?? 0) + body.count)
        encode(into: &bytes)
        return bytes
    }

    /// Appends the stored form to `bytes`.
    func encode(into bytes: inout [UInt8]) {
        let key = idempotencyKey?.utf8
        let keyCount = key?.count ?? 0
        bytes.append(kind.rawValue)
        withUnsafeBytes(of: timeNanoseconds.bigEndian) { bytes.append(contentsOf: $0) }
        withUnsafeBytes(of: UInt16(keyCount).bigEndian) { bytes.append(contentsOf: $0) }
        if let key { bytes.append(contentsOf: key) }
        bytes.append(contentsOf: body)
    }

    /// The fixed part of a stored event, read in place.
    struct Header {
        let kind: Kind
        let timeNanoseconds: UInt64
        /// Where the body starts (after the idempotency key).
        let bodyOffset: Int

        init?(_ bytes: UnsafeRawBufferPointer) {
            guard bytes.count >= 11, let kind = Kind(rawValue: bytes[0]) else { return nil }
            let keyLength = Int(bytes.loadUnaligned(fromByteOffset: 9, as: UInt16.self).bigEndian)
            guard 11 + keyLength <= bytes.count else { return nil }
            self.kind = kind
            self.timeNanoseconds = bytes.loadUnaligned(fromByteOffset: 1, as: UInt64.self).bigEndian
            self.bodyOffset = 11 + keyLength
        }
    }

    /// Parses a stored event; `nil` when the bytes are not an event of a known kind.
    static func decode(_ bytes: UnsafeRawBufferPointer) -> HistoryEvent? {
        guard bytes.count >= 11, let kind = Kind(rawValue: bytes[0]) else { return nil }
        let time = bytes.loadUnaligned(fromByteOffset: 1, as: UInt64.self).bigEndian
        let keyLength = Int(bytes.loadUnaligned(fromByteOffset: 9, as: UInt16.self).bigEndian)
        guard 11 + keyLength <= bytes.count else { return nil }
        let key = keyLength == 0 ? nil : String(decoding: bytes[11..<(11 + keyLength)], as: UTF8.self)
        return HistoryEvent(kind: kind, timeNanoseconds: time, idempotencyKey: key, body: Array(bytes[(11 + keyLength)...]))
    }
}

/// What an `activityScheduled` event records besides the id.
struct ScheduledActivity: Codable {
    var name: String
    var input: [UInt8]
    var options: ActivityOptions
}
