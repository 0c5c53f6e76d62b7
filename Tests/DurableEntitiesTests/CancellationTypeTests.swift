@_spi(Testing) @testable import DurableEntities
import DurableEntitiesTesting
import Foundation
import Synchronization
import TestSupport
import Testing

/// Races `Step` — called with the input's cancellation type, retried every 10 minutes — against a
/// 60-second durable timer and cancels the loser (see ``RaceStep/race(_:_:)``). The step's part of
/// the result says how its wait ended: `step:<output>` or `step-failed:<reason>:<attempts>`.
struct RaceTypedStep: EntityWorkflow {
    struct State: Codable, Sendable {}
    struct Input: Codable, Sendable {
        var label: String
        var type: ActivityCancellationType
        /// Called with `executeLocal` instead of `execute`.
        var local = false
    }
    static func initialState(id: String) -> State { State() }
    static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> String {
        try await RaceStep.race(context) { try await step(input, context) }
    }

    static func step(_ input: Input, _ context: WorkflowContext<some EntityWorkflow>) async throws -> String {
        let options = ActivityOptions(retry: RetryPolicy(initialInterval: .seconds(600)), cancellationType: input.type)
        do {
            let output = input.local ? try await context.executeLocal(Step.self, input.label, options: options)
                : try await context.execute(Step.self, input.label, options: options)
            return "step:" + output
        } catch let failure as ActivityFailure {
            return "step-failed:\(failure.reason):\(failure.attempts)"
        }
    }
}

/// Calls `Step` with the input's cancellation type and nothing else: cancelling the entity's run
/// cancels that wait. The result adds `|run-cancelled` when the body learns that the run was.
struct TypedStep: EntityWorkflow {
    struct State: Codable, Sendable {}
    typealias Input = RaceTypedStep.Input
    static func initialState(id: String) -> State { State() }
    static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> String {
        let step = try await RaceTypedStep.step(input, context)
        return context.isCancellationRequested ? step + "|run-cancelled" : step
    }
}

/// A `Step` stub whose attempt says "started", waits for `gate` (which ignores cancellation; a
/// cancellation meanwhile says "cancelled"), says "ended" and returns `late:<label>`, or throws
/// ``Flake`` when `fails`: an activity that takes its time to stop, or that finishes its work anyway.
enum SlowToStopStep {
    static func make(log: AttemptLog, clock: TestClock, gate: AsyncGate, fails: Bool = false) -> (ActivityStub<Step>, AsyncStream<String>) {
        let (events, event) = AsyncStream.makeStream(of: String.self)
        let stub = ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            event.yield("started")
            await withTaskCancellationHandler {
                await gate.wait()
            } onCancel: {
                event.yield("cancelled")
            }
            event.yield("ended")
            if fails { throw Flake() }
            return "late:\(label)"
        }
        return (stub, events)
    }
}

@Suite("Activity cancellation types", .timeLimit(.minutes(10)))
struct CancellationTypeTests {
    /// The activity rows left: tasks and cancellation requests.
    func activityRows(_ runtime: EntityRuntime) throws -> Int {
        try runtime.journal.tasks(prefix: [ActivityTask.keyPrefix]).count
            + runtime.journal.tasks(prefix: [ActivityTask.cancelKeyPrefix]).count
    }

    @Test("waitCancellationCompleted: the race's losing activity is asked to stop, but its wait lasts until the attempt has ended; an attempt that returns anyway gives the wait its output (activityCompleted after activityCancelRequested), and the history replays")
    func waitReturnsLateOutput() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let gate = AsyncGate()
        defer { gate.open() }
        let log = AttemptLog()
        let (stub, events) = SlowToStopStep.make(log: log, clock: clock, gate: gate)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        let name = EntityName(type: RaceTypedStep.entityType, id: "late")
        let race = runtime.entity(RaceTypedStep.self, id: "late")
        try await race.start(.init(label: "x", type: .waitCancellationCompleted))
        var iterator = events.makeAsyncIterator()
        #expect(await iterator.next() == "started")
        clock.advance(by: .seconds(60))
        // The attempt is cancelled only once the request is durable: by now it is, and the run still waits.
        #expect(await iterator.next() == "cancelled")
        #expect(try runtime.historyKinds(of: name) == [.started, .activityScheduled, .timerStarted, .timerFired, .activityCancelRequested])
        #expect(try runtime.journal.tasks(prefix: [ActivityTask.cancelKeyPrefix]).count == 1)
        gate.open()
        #expect(try await race.result() == "deadline,step:late:x")
        await runtime.untilIdle()
        #expect(try runtime.historyKinds(of: name) == [.started, .activityScheduled, .timerStarted, .timerFired, .activityCancelRequested,
                                             .activityCompleted, .completed])
        #expect(try activityRows(runtime) == 0)
        let history = try runtime.exportHistory(of: name)
        let activities = try history.activities()
        #expect(activities.count == 1)
        #expect(activities.first?.options.cancellationType == .waitCancellationCompleted)
        #expect(activities.first?.cancelRequested == true)
        #expect(try activities.first?.output(as: String.self) == "late:x")
        #expect(activities.first?.attempt?.number == 1)
        _ = try history.replay(as: RaceTypedStep.self)
        #expect(log.all.map(\.number) == [1])
    }

    @Test("waitCancellationCompleted: an attempt that throws once cancelled ends the wait with ActivityFailure(cancelled) counting that attempt, and is not retried")
    func waitFailsAsCancelled() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let silence = Silence()
        defer { silence.finish() }
        let (stub, events) = StallingStep.make(clock: clock, log: log, silence: silence)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        let name = EntityName(type: RaceTypedStep.entityType, id: "stops")
        let race = runtime.entity(RaceTypedStep.self, id: "stops")
        try await race.start(.init(label: "y", type: .waitCancellationCompleted))
        var iterator = events.makeAsyncIterator()
        #expect(await iterator.next() == "started")
        clock.advance(by: .seconds(60))
        #expect(try await race.result() == "deadline,step-failed:cancelled:1")
        #expect(await iterator.next() == "cancelled")
        #expect(try runtime.historyKinds(of: name) == [.started, .activityScheduled, .timerStarted, .timerFired, .activityCancelRequested,
                                             .activityFailed, .completed])
        guard case .failure(let failure)? = try runtime.exportHistory(of: name).activities().first?.outcome else {
            Issue.record("the activity has no recorded failure")
            return
        }
        #expect(failure.reason == .cancelled)
        #expect(failure.attempts == 1)
        #expect(failure.causeType == "CancellationError")
        // Past its retry interval: no second attempt, nothing left behind.
        clock.advance(by: .seconds(3_600))
        await runtime.untilIdle()
        #expect(log.all.map(\.number) == [1])
        #expect(try activityRows(runtime) == 0)
        #expect(try runtime.journal.timers().isEmpty)
    }

    @Test("waitCancellationCompleted: an activity waiting for its next retry ends at once as cancelled (1 attempt made, the last error in the cause); the retry never runs and its timer finds nothing")
    func waitingRetryEndsAtOnce() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let stub = ActivityStub<Step> { _, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            throw Flake()
        }
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        let name = EntityName(type: RaceTypedStep.entityType, id: "retrying")
        let race = runtime.entity(RaceTypedStep.self, id: "retrying")
        try await race.start(.init(label: "z", type: .waitCancellationCompleted))
        await runtime.untilIdle()  // the first attempt failed; the second is stored, due in 10 minutes
        #expect(log.all.map(\.number) == [1])
        clock.advance(by: .seconds(60))
        #expect(try await race.result() == "deadline,step-failed:cancelled:1")
        guard case .failure(let failure)? = try runtime.exportHistory(of: name).activities().first?.outcome else {
            Issue.record("the activity has no recorded failure")
            return
        }
        #expect(failure.cause.contains("Flake"), "\(failure.cause)")
        // The retry timer falls due and finds nothing to run.
        let handed = runtime.core.timers.deliveries
        clock.advance(by: .seconds(3_600))
        let parked = await Task.detached {
            runtime.core.timers.park(timeout: .seconds(60)) { $0.inFlight == 0 && runtime.core.timers.deliveries > handed }
        }.value
        #expect(parked != nil, "the retry timer was handed over")
        await runtime.untilIdle()
        #expect(log.all.map(\.number) == [1])
        #expect(try activityRows(runtime) == 0)
        #expect(try runtime.journal.timers().isEmpty)
    }

    @Test("waitCancellationCompleted: an activity that never started (it waits for its registration) ends at once as cancelled with 0 attempts, and a later registration runs nothing")
    func unstartedEndsAtOnce() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock))
        defer { runtime.close() }
        let race = runtime.entity(RaceTypedStep.self, id: "unregistered")
        try await race.start(.init(label: "w", type: .waitCancellationCompleted))
        await runtime.untilIdle()
        clock.advance(by: .seconds(60))
        #expect(try await race.result() == "deadline,step-failed:cancelled:0")
        let log = AttemptLog()
        runtime.register(activity: ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            return label
        })
        await runtime.untilIdle()
        #expect(log.all.isEmpty)
        #expect(try activityRows(runtime) == 0)
        // A run nobody cancelled: its body is not told otherwise.
        #expect(try await runtime.entity(TypedStep.self, id: "plain").execute(.init(label: "ok", type: .waitCancellationCompleted))
                == "step:ok")
    }

    @Test("waitCancellationCompleted: a local activity whose attempt left its turn is cancelled once the request is durable, and its wait ends with how the attempt ended")
    func localAttemptWaits() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let silence = Silence()
        defer { silence.finish() }
        let (stub, events) = StallingStep.make(clock: clock, log: log, silence: silence)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        let name = EntityName(type: RaceTypedStep.entityType, id: "local")
        let race = runtime.entity(RaceTypedStep.self, id: "local")
        try await race.start(.init(label: "s", type: .waitCancellationCompleted, local: true))
        var iterator = events.makeAsyncIterator()
        #expect(await iterator.next() == "started")
        clock.advance(by: .seconds(60))
        #expect(try await race.result() == "deadline,step-failed:cancelled:1")
        #expect(await iterator.next() == "cancelled")
        await runtime.untilIdle()
        #expect(try runtime.historyKinds(of: name) == [.started, .activityScheduled, .timerStarted, .timerFired, .activityCancelRequested,
                                             .activityFailed, .completed])
        #expect(try activityRows(runtime) == 0)
        #expect(log.all.map(\.number) == [1])
    }

    @Test("waitCancellationCompleted: an activity queued for a pool slot (the only one held by an abandoned attempt) ends at once as cancelled with 0 attempts, and never runs")
    func queuedEndsAtOnce() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let silence = Silence()
        let (stub, events) = StallingStep.make(clock: clock, log: log, silence: silence)
        var configuration = EntityRuntime.Configuration.quiet(directory, clock)
        configuration.maxConcurrentActivities = 1
        let runtime = try EntityRuntime(configuration: configuration, activities: [stub])
        defer { runtime.close() }
        defer { silence.finish() }  // before the close, which would wait for the holder's attempt
        let holder = runtime.entity(RaceTypedStep.self, id: "holder")
        try await holder.start(.init(label: "h", type: .abandon))
        var iterator = events.makeAsyncIterator()
        #expect(await iterator.next() == "started")
        // (Not `waitUntilIdle`: the holder's attempt runs until the test's end.)
        let queued = runtime.entity(RaceTypedStep.self, id: "queued")
        try await queued.start(.init(label: "q", type: .waitCancellationCompleted))
        clock.advance(by: .seconds(60))
        #expect(try await holder.result() == "deadline,step-failed:cancelled:0")
        #expect(try await queued.result() == "deadline,step-failed:cancelled:0")
        // Taken out of the queue before its outcome went to its entity.
        #expect(runtime.core.activities.poolCounts.queued == 0)
        #expect(runtime.core.activities.poolCounts.running == 1)
        // Only the holder's attempt ever ran; the queued activity's rows are gone, the holder's task stays.
        #expect(log.all.count == 1 && log.all.allSatisfy { $0.key.contains("/holder/") }, "\(log.all)")
        #expect(try runtime.journal.tasks(prefix: [ActivityTask.keyPrefix]).count == 1)
        #expect(try runtime.journal.tasks(prefix: [ActivityTask.cancelKeyPrefix]).isEmpty)
    }

    @Test("waitCancellationCompleted: cancelling the entity's run asks its running activity to stop and the run's catch sees how it ended (cancelRequested, activityCancelRequested, activityFailed)")
    func runCancelWaits() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let silence = Silence()
        defer { silence.finish() }
        let (stub, events) = StallingStep.make(clock: clock, log: AttemptLog(), silence: silence)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        let job = runtime.entity(TypedStep.self, id: "run")
        try await job.start(.init(label: "v", type: .waitCancellationCompleted))
        var iterator = events.makeAsyncIterator()
        #expect(await iterator.next() == "started")
        try await job.cancel()
        #expect(try await job.result() == "step-failed:cancelled:1|run-cancelled")
        #expect(await iterator.next() == "cancelled")
        await runtime.untilIdle()
        #expect(try runtime.historyKinds(of: EntityName(type: TypedStep.entityType, id: "run"))
                == [.started, .activityScheduled, .cancelRequested, .activityCancelRequested, .activityFailed, .completed])
        #expect(try activityRows(runtime) == 0)
    }

    @Test("waitCancellationCompleted: when the run is cancelled and its activity's attempt finishes anyway, the wait returns the output and the body learns of the cancellation from isCancellationRequested")
    func runCancelLateOutput() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let gate = AsyncGate()
        defer { gate.open() }
        let (stub, events) = SlowToStopStep.make(log: AttemptLog(), clock: clock, gate: gate)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        let job = runtime.entity(TypedStep.self, id: "finishes")
        try await job.start(.init(label: "p", type: .waitCancellationCompleted))
        var iterator = events.makeAsyncIterator()
        #expect(await iterator.next() == "started")
        try await job.cancel()
        #expect(await iterator.next() == "cancelled")
        gate.open()
        #expect(try await job.result() == "step:late:p|run-cancelled")
        await runtime.untilIdle()
        #expect(try runtime.historyKinds(of: EntityName(type: TypedStep.entityType, id: "finishes"))
                == [.started, .activityScheduled, .cancelRequested, .activityCancelRequested, .activityCompleted, .completed])
        #expect(try activityRows(runtime) == 0)
    }

    @Test("waitCancellationCompleted survives a crash: the request is durable, the attempt ignores it, the process dies; reopened, the activity ends as cancelled without running again")
    func requestSurvivesCrash() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let gate = AsyncGate()
        defer { gate.open() }
        let (stub, events) = SlowToStopStep.make(log: AttemptLog(), clock: clock, gate: gate)
        let configuration = EntityRuntime.Configuration.quiet(directory, clock)
        let runtime = try EntityRuntime(configuration: configuration, activities: [stub])
        try await runtime.entity(RaceTypedStep.self, id: "crash").start(.init(label: "u", type: .waitCancellationCompleted))
        var iterator = events.makeAsyncIterator()
        #expect(await iterator.next() == "started")
        clock.advance(by: .seconds(60))
        #expect(await iterator.next() == "cancelled")  // the request is durable; the attempt goes on
        runtime.simulateCrash()

        let log = AttemptLog()
        let reopened = try EntityRuntime(configuration: configuration, activities: [ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            return label
        }])
        defer { reopened.close() }
        #expect(try await reopened.entity(RaceTypedStep.self, id: "crash").result() == "deadline,step-failed:cancelled:0")
        await reopened.untilIdle()
        #expect(log.all.isEmpty)
        #expect(try activityRows(reopened) == 0)
        #expect(try reopened.historyKinds(of: EntityName(type: RaceTypedStep.entityType, id: "crash"))
                == [.started, .activityScheduled, .timerStarted, .timerFired, .activityCancelRequested, .activityFailed, .completed])
    }

    @Test("a cancellation row lost on disk while its task survived is stored again when the entity loads: the attempt that the next open ran again is cancelled, and the activity ends as cancelled")
    func lostCancellationRowIsStoredAgain() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let gate = AsyncGate()
        defer { gate.open() }
        let (stub, events) = SlowToStopStep.make(log: AttemptLog(), clock: clock, gate: gate)
        let configuration = EntityRuntime.Configuration.quiet(directory, clock)
        let runtime = try EntityRuntime(configuration: configuration, activities: [stub])
        let job = runtime.entity(TypedStep.self, id: "lost")
        try await job.start(.init(label: "l", type: .waitCancellationCompleted))
        var iterator = events.makeAsyncIterator()
        #expect(await iterator.next() == "started")
        try await job.cancel()
        #expect(await iterator.next() == "cancelled")  // the request is durable; the attempt goes on
        runtime.simulateCrash()
        // The cancellation row is lost; the task row stays.
        let cancelRows = try tableRows("tasks", directory: directory.path).filter { $0.key.first == ActivityTask.cancelKeyPrefix }
        try #require(cancelRows.count == 1)
        try editTable("tasks", directory: directory.path) { txn, tasks in _ = try txn.delete(cancelRows[0].key, in: tasks) }

        // Reopened: the open runs the task again (it sees no request); the entity's load stores the
        // request again and carries it out, so the new attempt is cancelled.
        let log = AttemptLog()
        let silence = Silence()
        let (stalling, _) = StallingStep.make(clock: clock, log: log, silence: silence)
        let reopened = try EntityRuntime(configuration: configuration, activities: [stalling])
        defer { reopened.close() }
        defer { silence.finish() }
        let result = try await withDeadline(seconds: 60) { try await reopened.entity(TypedStep.self, id: "lost").result() }
        #expect(result.hasPrefix("step-failed:cancelled:") && result.hasSuffix("|run-cancelled"), "\(result)")
        // Cancelled while it ran, or before it began; never twice.
        #expect(log.all.count <= 1)
        await reopened.untilIdle()
        #expect(try activityRows(reopened) == 0)
        #expect(try reopened.historyKinds(of: EntityName(type: TypedStep.entityType, id: "lost"))
                == [.started, .activityScheduled, .cancelRequested, .activityCancelRequested, .activityFailed, .completed])
    }

    @Test("abandon: the wait ends at once, the activity is not cancelled and goes on; its outcome, when it comes, is dropped and its task goes")
    func abandonLeavesActivity() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let gate = AsyncGate()
        defer { gate.open() }
        let log = AttemptLog()
        let (stub, events) = SlowToStopStep.make(log: log, clock: clock, gate: gate)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        let name = EntityName(type: RaceTypedStep.entityType, id: "abandoned")
        let race = runtime.entity(RaceTypedStep.self, id: "abandoned")
        try await race.start(.init(label: "t", type: .abandon))
        var iterator = events.makeAsyncIterator()
        #expect(await iterator.next() == "started")
        clock.advance(by: .seconds(60))
        #expect(try await race.result() == "deadline,step-failed:cancelled:0")
        // The attempt was not cancelled: its task is still stored while it runs.
        #expect(try runtime.journal.tasks(prefix: [ActivityTask.keyPrefix]).count == 1)
        gate.open()
        await runtime.untilIdle()
        #expect(try activityRows(runtime) == 0)
        #expect(log.all.map(\.number) == [1])
        let recorded = try runtime.historyKinds(of: name)
        #expect(recorded == [.started, .activityScheduled, .timerStarted, .timerFired, .activityCancelRequested, .completed])
        let activity = try runtime.exportHistory(of: name).activities().first
        #expect(activity?.cancelRequested == true)
        guard case .failure(let failure)? = activity?.outcome else {
            Issue.record("the abandoned activity has no outcome in the history's view")
            return
        }
        #expect(failure.cause.contains("abandoned"))
        // The attempt ran to its end without being cancelled.
        #expect(await iterator.next() == "ended")
    }
}
