/// The stored forms of the runtime's own activity records — an ``ActivityTask`` in the `tasks` table
/// and the body of an `activityScheduled` event — written field by field. They are written for every
/// activity scheduled and every retry; through the generic ``BinaryEntityCodec`` (keys, tags,
/// nested containers, Codable's witness calls) they cost ~10% of all CPU in `saga-transfer`.
///
/// A record starts with the byte ``ActivityRecordFormat/marker`` (`0xA1`). Records written by earlier
/// versions through the binary codec start with its own marker (`0xB1`) and still decode that way.
enum ActivityRecordFormat {
    static let marker: UInt8 = 0xA1
}

/// Exact sizes of the stored forms, so that a record is written into one allocation (a buffer
/// reserved short grows once: a second allocation, a copy and a free).
enum ActivityRecordSize {
    static func of(_ value: String) -> Int { 4 + value.utf8.count }
    static func of(_ value: [UInt8]) -> Int { 4 + value.count }
    static func of(optional value: Duration?) -> Int { value == nil ? 1 : 17 }
    static func of(optional value: String?) -> Int { value.map { 1 + of($0) } ?? 1 }
    static func of(optional value: [UInt8]?) -> Int { value.map { 1 + of($0) } ?? 1 }

    /// `ByteWriter.append(_: ActivityOptions)`'s bytes.
    static func of(_ options: ActivityOptions) -> Int {
        let retry = options.retry
        var size = 16 + 8 + of(optional: retry.maximumInterval) + 8 + 8
        for type in retry.nonRetryableErrorTypes { size += of(type) }
        return size + of(optional: options.startToCloseTimeout) + of(optional: options.scheduleToCloseTimeout)
            + of(optional: options.heartbeatTimeout)
    }
}

extension ByteWriter {
    mutating func append(signed value: Int64) { append(UInt64(bitPattern: value)) }

    mutating func append(_ value: Duration) {
        let (seconds, attoseconds) = value.components
        append(signed: seconds)
        append(signed: attoseconds)
    }

    mutating func append(optional value: Duration?) {
        guard let value else { return append(UInt8(0)) }
        append(UInt8(1))
        append(value)
    }

    mutating func append(optional value: String?) {
        guard let value else { return append(UInt8(0)) }
        append(UInt8(1))
        append(value)
    }

    mutating func append(optional value: [UInt8]?) {
        guard let value else { return append(UInt8(0)) }
        append(UInt8(1))
        append(value)
    }

    mutating func append(_ options: ActivityOptions) {
        let retry = options.retry
        append(retry.initialInterval)
        append(retry.backoffCoefficient.bitPattern)
        append(optional: retry.maximumInterval)
        append(signed: Int64(retry.maximumAttempts))
        append(UInt64(retry.nonRetryableErrorTypes.count))
        for type in retry.nonRetryableErrorTypes { append(type) }
        append(optional: options.startToCloseTimeout)
        append(optional: options.scheduleToCloseTimeout)
        append(optional: options.heartbeatTimeout)
    }
}

extension ByteReader {
    mutating func int64() -> Int64? { uint64().map { Int64(bitPattern: $0) } }

    mutating func duration() -> Duration? {
        guard let seconds = int64(), let attoseconds = int64() else { return nil }
        return Duration(secondsComponent: seconds, attosecondsComponent: attoseconds)
    }

    /// A value written by one of `ByteWriter`'s `append(optional:)`: `.some(nil)` for an absent one,
    /// `nil` when the bytes are malformed.
    private mutating func optional<Value>(_ read: (inout ByteReader) -> Value?) -> Value?? {
        switch byte() {
        case 0: return .some(nil)
        case 1: return read(&self).map { .some($0) }
        default: return nil
        }
    }

    mutating func optionalDuration() -> Duration?? { optional { $0.duration() } }
    mutating func optionalString() -> String?? { optional { $0.string() } }
    mutating func optionalData() -> [UInt8]?? { optional { $0.data() } }

    mutating func activityOptions() -> ActivityOptions? {
        guard let initial = duration(), let coefficient = uint64(), let maximumInterval = optionalDuration(),
              let maximumAttempts = int64(), let count = uint64(), count <= UInt64(bytes.count) else { return nil }
        var nonRetryable: [String] = []
        for _ in 0..<count {
            guard let type = string() else { return nil }
            nonRetryable.append(type)
        }
        guard let startToClose = optionalDuration(), let scheduleToClose = optionalDuration(), let heartbeat = optionalDuration()
        else { return nil }
        let retry = RetryPolicy(initialInterval: initial, backoffCoefficient: Double(bitPattern: coefficient),
                                maximumInterval: maximumInterval, maximumAttempts: Int(maximumAttempts),
                                nonRetryableErrorTypes: nonRetryable)
        return ActivityOptions(retry: retry, startToCloseTimeout: startToClose, scheduleToCloseTimeout: scheduleToClose,
                               heartbeatTimeout: heartbeat)
    }
}

extension ActivityTask {
    /// The stored form (see ``ActivityRecordFormat``).
    func encoded() -> [UInt8] {
        var writer = ByteWriter()
        writer.bytes.reserveCapacity(encodedSize)
        writer.append(ActivityRecordFormat.marker)
        writer.append(entityType)
        writer.append(entityID)
        writer.append(entityKey)
        writer.append(run)
        writer.append(activityID)
        writer.append(name)
        writer.append(input)
        writer.append(options)
        writer.append(signed: Int64(attempt))
        writer.append(scheduledAt)
        writer.append(notBefore)
        writer.append(optional: heartbeat)
        writer.append(optional: lastErrorType)
        writer.append(optional: lastError)
        // Last and only when set: a row without it reads as before.
        if let runningAttempt { writer.append(signed: Int64(runningAttempt)) }
        return writer.bytes
    }

    /// The stored form's bytes.
    var encodedSize: Int {
        typealias Size = ActivityRecordSize
        return 1 + Size.of(entityType) + Size.of(entityID) + 3 * 8 + Size.of(name) + Size.of(input) + Size.of(options) + 3 * 8
            + Size.of(optional: heartbeat) + Size.of(optional: lastErrorType) + Size.of(optional: lastError)
            + (runningAttempt == nil ? 0 : 8)
    }

    /// Decodes a stored task, in this form or the binary codec's of earlier versions; `nil` if malformed.
    static func decode(_ bytes: [UInt8]) -> ActivityTask? {
        guard bytes.first == ActivityRecordFormat.marker else {
            return try? bytes.withUnsafeBytes { try BinaryEntityCodec().decode(ActivityTask.self, from: $0) }
        }
        var reader = ByteReader(bytes: bytes[1...])
        guard let entityType = reader.string(), let entityID = reader.string(), let entityKey = reader.uint64(),
              let run = reader.uint64(), let activityID = reader.uint64(), let name = reader.string(), let input = reader.data(),
              let options = reader.activityOptions(), let attempt = reader.int64(), let scheduledAt = reader.uint64(),
              let notBefore = reader.uint64(), let heartbeat = reader.optionalData(), let lastErrorType = reader.optionalString(),
              let lastError = reader.optionalString()
        else { return nil }
        var runningAttempt: Int?
        if !reader.bytes.isEmpty {
            guard let running = reader.int64() else { return nil }
            runningAttempt = Int(running)
        }
        guard reader.bytes.isEmpty else { return nil }
        return ActivityTask(entityType: entityType, entityID: entityID, entityKey: entityKey, run: run, activityID: activityID,
                            name: name, input: input, options: options, attempt: Int(attempt), scheduledAt: scheduledAt,
                            notBefore: notBefore, heartbeat: heartbeat, lastErrorType: lastErrorType, lastError: lastError,
                            runningAttempt: runningAttempt)
    }
}

extension ScheduledActivity {
    /// The stored form (see ``ActivityRecordFormat``).
    func encoded() -> [UInt8] {
        var writer = ByteWriter()
        writer.bytes.reserveCapacity(encodedSize)
        write(to: &writer)
        return writer.bytes
    }

    /// Appends the stored form to `writer`.
    func write(to writer: inout ByteWriter) {
        writer.append(ActivityRecordFormat.marker)
        writer.append(name)
        writer.append(input)
        writer.append(options)
        // Last and only when not the default: an event without it reads as before (and as before,
        // an earlier version refuses one with it).
        if options.cancellationType != .tryCancel { writer.append(options.cancellationType.rawValue) }
    }

    /// The stored form's bytes.
    var encodedSize: Int {
        1 + ActivityRecordSize.of(name) + ActivityRecordSize.of(input) + ActivityRecordSize.of(options)
            + (options.cancellationType == .tryCancel ? 0 : 1)
    }

    /// Decodes an `activityScheduled` event's spec, in this form or the binary codec's of earlier versions.
    static func decode(_ bytes: ArraySlice<UInt8>) -> ScheduledActivity? {
        guard bytes.first == ActivityRecordFormat.marker else {
            return try? bytes.withUnsafeBytes { try BinaryEntityCodec().decode(ScheduledActivity.self, from: $0) }
        }
        var reader = ByteReader(bytes: bytes.dropFirst())
        guard let name = reader.string(), let input = reader.data(), var options = reader.activityOptions() else { return nil }
        if !reader.bytes.isEmpty {
            guard let raw = reader.byte(), let type = ActivityCancellationType(rawValue: raw) else { return nil }
            options.cancellationType = type
        }
        guard reader.bytes.isEmpty else { return nil }
        return ScheduledActivity(name: name, input: input, options: options)
    }
}
