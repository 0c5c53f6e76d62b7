@testable import DurableEntities
import Testing

/// The hand-written stored forms of activity tasks and `activityScheduled` specs.
@Suite("Activity records")
struct ActivityRecordTests {
    static let options = ActivityOptions(
        retry: RetryPolicy(initialInterval: .milliseconds(250), backoffCoefficient: 1.5, maximumInterval: .seconds(90),
                           maximumAttempts: 7, nonRetryableErrorTypes: ["InsufficientFunds", "Fraud"]),
        startToCloseTimeout: .seconds(3), scheduleToCloseTimeout: .nanoseconds(1_234_567_891), heartbeatTimeout: nil)

    static func task(heartbeat: [UInt8]?, error: String?) -> ActivityTask {
        ActivityTask(entityType: "Transfer", entityID: "tr-é-1", entityKey: 42, run: 3, activityID: 3 << 32 | 9, name: "withdraw",
                     input: [0xB1, 0, 1, 2], options: options, attempt: 4, scheduledAt: 1_000, notBefore: 2_000,
                     heartbeat: heartbeat, lastErrorType: error.map { _ in "Timeout" }, lastError: error)
    }

    static func same(_ a: ActivityTask, _ b: ActivityTask) -> Bool {
        a.entityType == b.entityType && a.entityID == b.entityID && a.entityKey == b.entityKey && a.run == b.run
            && a.activityID == b.activityID && a.name == b.name && a.input == b.input && a.options == b.options
            && a.attempt == b.attempt && a.scheduledAt == b.scheduledAt && a.notBefore == b.notBefore
            && a.heartbeat == b.heartbeat && a.lastErrorType == b.lastErrorType && a.lastError == b.lastError
    }

    @Test("a task round-trips, with and without its optional fields", arguments: [
        (heartbeat: [UInt8]?.none, error: String?.none), (heartbeat: [UInt8](), error: ""), (heartbeat: [9, 8, 7], error: "gateway down"),
    ])
    func taskRoundTrip(heartbeat: [UInt8]?, error: String?) throws {
        let task = Self.task(heartbeat: heartbeat, error: error)
        let bytes = task.encoded()
        #expect(bytes.first == ActivityRecordFormat.marker)
        let decoded = try #require(ActivityTask.decode(bytes))
        #expect(Self.same(decoded, task))
    }

    @Test("records are sized exactly before they are written (one allocation each)")
    func exactSizes() {
        for (heartbeat, error) in [([UInt8]?.none, String?.none), ([], ""), ([9, 8, 7], "gateway down")] {
            for options in [Self.options, .default] {
                var task = Self.task(heartbeat: heartbeat, error: error)
                task.options = options
                #expect(task.encoded().count == task.encodedSize)
                let spec = ScheduledActivity(name: "déposit", input: [1, 2], options: options)
                #expect(spec.encoded().count == spec.encodedSize)
            }
        }
    }

    @Test("a task stored by an earlier version (binary codec) still decodes")
    func legacyTask() throws {
        let task = Self.task(heartbeat: [1], error: "x")
        let legacy = try BinaryEntityCodec().encode(task)
        #expect(legacy.first != ActivityRecordFormat.marker)
        #expect(Self.same(try #require(ActivityTask.decode(legacy)), task))
    }

    @Test("truncated or padded records are refused, never misread")
    func malformed() {
        let bytes = Self.task(heartbeat: [1, 2], error: "e").encoded()
        for length in [1, 2, 10, bytes.count / 2, bytes.count - 1] {
            #expect(ActivityTask.decode(Array(bytes.prefix(length))) == nil, "prefix \(length)")
        }
        #expect(ActivityTask.decode(bytes + [0]) == nil)
        var badOptional = ScheduledActivity(name: "n", input: [], options: .default).encoded()
        badOptional[badOptional.count - 1] = 7  // heartbeat timeout's presence byte
        #expect(ScheduledActivity.decode(badOptional[...]) == nil)
    }

    @Test("an activityScheduled spec round-trips, and the earlier form still decodes")
    func scheduledSpec() throws {
        let spec = ScheduledActivity(name: "deposit", input: Array("{}".utf8), options: Self.options)
        let decoded = try #require(ScheduledActivity.decode(spec.encoded()[...]))
        #expect(decoded.name == spec.name && decoded.input == spec.input && decoded.options == spec.options)
        let legacy = try #require(ScheduledActivity.decode(try BinaryEntityCodec().encode(spec)[...]))
        #expect(legacy.options == spec.options && legacy.input == spec.input)
        // Through the history event, as replay reads it.
        let event = HistoryEvent.command(.scheduleActivity(id: 5, name: "deposit", input: [1], options: Self.options), time: 1)
        guard case .scheduleActivity(5, "deposit", [1], let options)? = event.command else {
            Issue.record("the event does not read back: \(String(describing: event.command))")
            return
        }
        #expect(options == Self.options)
    }

    /// `ActivityOptions` as versions before `cancellationType` encoded them through `Codable`.
    struct OptionsBeforeCancellationType: Codable {
        var retry: RetryPolicy
        var startToCloseTimeout: Duration?
        var scheduleToCloseTimeout: Duration?
        var heartbeatTimeout: Duration?
    }

    @Test("a call's cancellation type is stored in its activityScheduled spec only when it is not the default (one byte after the options, sized exactly); a spec without it, and options encoded before it existed, read as tryCancel; an unknown value is refused")
    func cancellationTypeInSpec() throws {
        let plain = ScheduledActivity(name: "charge", input: [7], options: Self.options).encoded()
        for type in [ActivityCancellationType.tryCancel, .waitCancellationCompleted, .abandon] {
            var options = Self.options
            options.cancellationType = type
            let spec = ScheduledActivity(name: "charge", input: [7], options: options)
            let bytes = spec.encoded()
            #expect(bytes.count == spec.encodedSize)
            #expect(bytes == (type == .tryCancel ? plain : plain + [type.rawValue]))
            #expect(try #require(ScheduledActivity.decode(bytes[...])).options == options)
            let event = HistoryEvent.command(.scheduleActivity(id: 5, name: "charge", input: [7], options: options), time: 1)
            #expect(HistoryEvent.encodedCommand(.scheduleActivity(id: 5, name: "charge", input: [7], options: options), time: 1) == event.encoded())
            guard case .scheduleActivity(_, _, _, let read)? = event.command else {
                Issue.record("the event does not read back")
                continue
            }
            #expect(read.cancellationType == type)
        }
        #expect(try #require(ScheduledActivity.decode(plain[...])).options.cancellationType == .tryCancel)
        #expect(ScheduledActivity.decode((plain + [9])[...]) == nil)
        #expect(ScheduledActivity.decode((plain + [1, 1])[...]) == nil)
        let old = OptionsBeforeCancellationType(retry: Self.options.retry, startToCloseTimeout: .seconds(3),
                                                scheduleToCloseTimeout: nil, heartbeatTimeout: .seconds(1))
        let decoded = try BinaryEntityCodec().encode(old).withUnsafeBytes { try BinaryEntityCodec().decode(ActivityOptions.self, from: $0) }
        #expect(decoded == ActivityOptions(retry: Self.options.retry, startToCloseTimeout: .seconds(3), heartbeatTimeout: .seconds(1)))
    }

    @Test("the one-buffer encodings of activityScheduled and activityCompleted events equal the general ones")
    func oneBufferEvents() throws {
        let time: UInt64 = 1_700_000_000_123_456_789
        for options in [Self.options, .default] {
            let command = WorkflowCommand.scheduleActivity(id: 7 << 32 | 3, name: "déposit", input: Array(repeating: 0xAB, count: 300),
                                                           options: options)
            #expect(HistoryEvent.encodedCommand(command, time: time) == HistoryEvent.command(command, time: time).encoded())
        }
        for command in [WorkflowCommand.startTimer(id: 9, due: 99), .complete(output: [1, 2, 3]), .fail(message: "no", cancelled: false),
                            .fail(message: "stop", cancelled: true)] {
            #expect(HistoryEvent.encodedCommand(command, time: time) == HistoryEvent.command(command, time: time).encoded())
        }
        let failure = ActivityFailure(activity: "withdraw", reason: .nonRetryable, attempts: 2, causeType: "Fraud", cause: "stop")
        let attempts = [ActivityAttempt(number: 2, startedAt: time - 5), ActivityAttempt(number: 0, startedAt: nil),
                        ActivityAttempt(number: 70_000, startedAt: 1)]
        for outcome: Result<[UInt8], ActivityFailure> in [.success([]), .success(Array(0...200)), .failure(failure)] {
            for attempt in attempts {
                let encoded = HistoryEvent.encodedActivityOutcome(id: 12, outcome, attempt: attempt, time: time)
                #expect(encoded == HistoryEvent.activityOutcome(id: 12, outcome, attempt: attempt, time: time).encoded())
                // Read back: the outcome, and the attempt that ended it.
                let event = try #require(encoded.withUnsafeBytes { HistoryEvent.decode($0) })
                #expect(event.kind == (outcome.isSuccess ? .activityCompleted : .activityFailed))
                #expect(event.activityAttempt == attempt)
                let read = try #require(event.activityOutcome)
                #expect(read.id == 12 && read.outcome == outcome)
            }
        }
    }

    @Test("an activity outcome written before attempts were recorded (kinds 14 and 15) still reads, without an attempt")
    func outcomeWithoutAttempt() throws {
        let id: UInt64 = 7 << 32 | 3
        var body = withUnsafeBytes(of: id.bigEndian) { Array($0) }
        let completed = HistoryEvent(kind: .activityCompletedWithoutAttempt, timeNanoseconds: 5, body: body + [9, 8, 7])
        #expect(HistoryEvent.Kind(rawValue: 14) == .activityCompletedWithoutAttempt)
        #expect(completed.activityAttempt == nil)
        #expect(completed.activityOutcome?.id == id && completed.activityOutcome?.outcome == .success([9, 8, 7]))
        let failure = ActivityFailure(activity: "deposit", reason: .retriesExhausted, attempts: 3, causeType: "Flake", cause: "again")
        body += try BinaryEntityCodec().encode(failure)
        let failed = try #require(HistoryEvent(kind: .activityFailedWithoutAttempt, timeNanoseconds: 5, body: body).encoded()
            .withUnsafeBytes { HistoryEvent.decode($0) })
        #expect(HistoryEvent.Kind(rawValue: 15) == .activityFailedWithoutAttempt)
        #expect(failed.activityAttempt == nil)
        #expect(failed.activityOutcome?.id == id && failed.activityOutcome?.outcome == .failure(failure))
        // Too short for the id: refused, never misread.
        #expect(HistoryEvent(kind: .activityCompletedWithoutAttempt, timeNanoseconds: 5, body: [1, 2]).activityOutcome == nil)
        #expect(HistoryEvent(kind: .activityCompleted, timeNanoseconds: 5, body: Array(body.prefix(19))).activityOutcome == nil)
    }
}

extension Result {
    var isSuccess: Bool { if case .success = self { true } else { false } }
}

extension HistoryEvent {
    /// An event written by the appending encoder the turns use, on its own.
    static func encodedCommand(_ command: WorkflowCommand, time: UInt64) -> [UInt8] {
        var bytes = [UInt8]()
        appendCommand(command, time: time, to: &bytes)
        return bytes
    }

    static func encodedActivityOutcome(id: UInt64, _ outcome: Result<[UInt8], ActivityFailure>, attempt: ActivityAttempt,
                                       time: UInt64) -> [UInt8] {
        var bytes = [UInt8]()
        appendActivityOutcome(id: id, outcome, attempt: attempt, time: time, to: &bytes)
        return bytes
    }
}
