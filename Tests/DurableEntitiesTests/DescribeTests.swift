@_spi(Testing) @testable import DurableEntities
import DurableEntitiesTesting
import Foundation
import TestSupport
import Testing

@Suite("Describing an entity", .timeLimit(.minutes(10)))
struct DescribeTests {
    /// The activity's last heartbeat details, decoded.
    func heartbeat(_ activity: EntityDescription.PendingActivity) -> Int? {
        activity.heartbeatDetails.flatMap { bytes in bytes.withUnsafeBytes { try? BinaryEntityCodec().decode(Int.self, from: $0) } }
    }

    @Test("an activity's retry state, which history does not hold: backing off with the next attempt's number and time, the last failure and the last heartbeat; then running; nothing pending once the run completed")
    func retryState() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let gate = AsyncGate()
        defer { gate.open() }
        let (started, start) = AsyncStream.makeStream(of: Int.self)
        let stub = ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            context.heartbeat(context.attempt * 10)
            if context.attempt < 3 { throw Flake() }
            start.yield(context.attempt)
            await gate.wait()
            return "ok:\(label)"
        }
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        let call = runtime.entity(CallStep.self, id: "retry")
        let options = ActivityOptions(retry: .init(initialInterval: .seconds(10), backoffCoefficient: 2),
                                      scheduleToCloseTimeout: .seconds(3_600))
        try await call.start(.init(label: "x", options: options))
        await runtime.untilIdle()

        let description = try #require(try call.describe())
        #expect(description.name == call.name && description.run == 1)
        #expect(description.status == .running && !description.status.isFinished)
        #expect(description.historyLength == 2 && description.closedAt == nil)
        let first = try #require(log.all.first)
        #expect(description.startedAt == first.time && description.lastEventAt == first.time)
        #expect(description.pendingTimers.isEmpty && description.pendingChildren.isEmpty)
        var activity = try call.onlyPendingActivity()
        #expect(activity.name == "Step" && activity.options == options && activity.scheduledAt == first.time)
        #expect(activity.state == .backingOff)
        #expect(activity.attempt == 2)
        #expect(activity.nextAttemptAt == first.time + 10_000_000_000)
        #expect(activity.lastFailure?.type.hasSuffix("Flake") == true, "\(String(describing: activity.lastFailure))")
        #expect(heartbeat(activity) == 10)
        #expect(activity.scheduleToCloseDeadline == first.time + 3_600_000_000_000)

        await runtime.advance(clock, by: .seconds(10))
        activity = try call.onlyPendingActivity()
        #expect(activity.state == .backingOff && activity.attempt == 3)
        #expect(activity.nextAttemptAt == first.time + 30_000_000_000)
        #expect(heartbeat(activity) == 20)

        // For people: one line for the run, one for what it waits for.
        #expect(try #require(try call.describe()).description.split(separator: "\n") == [
            "CallStep/retry, run 1: running, started at \(first.time), 2 events, the last at \(first.time)",
            "  activity \(activity.id) Step: backingOff, attempt 3, next at \(first.time + 30_000_000_000), last failure \(activity.lastFailure!.type): \(activity.lastFailure!.message)",
        ])

        clock.advance(by: .seconds(20))
        var attempts = started.makeAsyncIterator()
        #expect(await attempts.next() == 3)
        activity = try call.onlyPendingActivity()
        #expect(activity.state == .running && activity.attempt == 3 && activity.nextAttemptAt == nil)
        #expect(activity.lastFailure?.type.hasSuffix("Flake") == true)

        gate.open()
        #expect(try await withDeadline(seconds: 60) { try await call.result() } == "ok:x")
        await runtime.untilIdle()
        let finished = try #require(try call.describe())
        #expect(finished.status == .completed && finished.status.isFinished)
        #expect(finished.closedAt == log.all.last?.time && finished.lastEventAt == finished.closedAt)
        #expect(finished.pendingActivities.isEmpty && finished.historyLength == 4)
        #expect(finished.description == "CallStep/retry, run 1: completed, started at \(first.time), ended at \(finished.closedAt!), 4 events")
        #expect(log.all.map(\.number) == [1, 2, 3])
    }

    @Test("the retry state survives a restart: reopened by a runtime that has not registered the activity, the activity is backing off, then scheduled (waiting for its registration) once due, with its attempt number and last failure")
    func retryStateAfterReopen() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let options = ActivityOptions(retry: .init(initialInterval: .seconds(10)))
        do {
            let runtime = try EntityRuntime(configuration: .quiet(directory, clock),
                                            activities: [ActivityStub<Step> { _, _ in throw Flake() }])
            defer { runtime.close() }
            try await runtime.entity(CallStep.self, id: "later").start(.init(label: "x", options: options))
            await runtime.untilIdle()
        }
        let reopened = try EntityRuntime(configuration: .quiet(directory, clock))
        defer { reopened.close() }
        let call = reopened.entity(CallStep.self, id: "later")
        var activity = try call.onlyPendingActivity()
        #expect(activity.state == .backingOff && activity.attempt == 2)
        #expect(activity.lastFailure?.type.hasSuffix("Flake") == true)
        await reopened.advance(clock, by: .seconds(10))
        activity = try call.onlyPendingActivity()
        #expect(activity.state == .scheduled && activity.attempt == 2 && activity.nextAttemptAt == nil)
        #expect(activity.lastFailure?.type.hasSuffix("Flake") == true)
        #expect(try call.describe()?.status == .running)
    }

    @Test("an activity whose cancellation the run requested and awaits (waitCancellationCompleted) shows as cancelRequested until its attempt ends; the run's timer shows with its due time beside a running activity")
    func cancelRequestedAndTimer() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let gate = AsyncGate()
        defer { gate.open() }
        let (stub, events) = SlowToStopStep.make(log: AttemptLog(), clock: clock, gate: gate)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        let race = runtime.entity(RaceTypedStep.self, id: "race")
        let begun = clock.nowNanoseconds()
        try await race.start(.init(label: "x", type: .waitCancellationCompleted))
        var iterator = events.makeAsyncIterator()
        #expect(await iterator.next() == "started")
        var description = try #require(try race.describe())
        #expect(description.pendingActivities.map(\.state) == [.running])
        #expect(description.pendingActivities.first?.attempt == 1 && description.pendingActivities.first?.lastFailure == nil)
        #expect(description.pendingTimers.map(\.dueAt) == [begun + 60_000_000_000])
        #expect(description.pendingTimers.first?.startedAt == begun)

        clock.advance(by: .seconds(60))  // the deadline fires: the activity is asked to stop
        #expect(await iterator.next() == "cancelled")
        description = try #require(try race.describe())
        #expect(description.pendingTimers.isEmpty)
        #expect(description.pendingActivities.map(\.state) == [.cancelRequested])
        gate.open()
        #expect(try await withDeadline(seconds: 60) { try await race.result() } == "deadline,step:late:x")
        await runtime.untilIdle()
        description = try #require(try race.describe())
        #expect(description.status == .completed && description.pendingActivities.isEmpty && description.pendingTimers.isEmpty)
    }

    @Test("every status: idle (an entity of handlers), running with a pending timer, a parent with its pending child, cancelled, failed, completed, terminated; an unknown entity has no description")
    func statuses() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock))
        defer { runtime.close() }
        #expect(try runtime.describe(EntityName(type: Account.entityType, id: "nobody")) == nil)

        let account = runtime.entity(Account.self, id: "a")
        try await account.signal(.deposit(5))
        let idle = try #require(try account.describe())
        #expect(idle.status == .idle && idle.startedAt == nil && idle.historyLength == 1 && idle.pendingActivities.isEmpty)

        let parent = runtime.entity(AwaitsCancellableRun.self, id: "p")
        let sleeper = runtime.entity(CancellableRun.self, id: "s")
        let unasked = runtime.entity(CancellableRun.self, id: "u")
        let begun = clock.nowNanoseconds()
        try await parent.start("return")
        try await sleeper.start("rethrow")
        try await unasked.start("unasked")
        await runtime.untilIdle()
        let waiting = try #require(try parent.describe())
        #expect(waiting.status == .running && waiting.startedAt == begun)
        #expect(waiting.pendingChildren.map(\.name) == [EntityName(type: CancellableRun.entityType, id: "child-of-p")])
        let child = try #require(try runtime.describe(EntityName(type: CancellableRun.entityType, id: "child-of-p")))
        #expect(child.status == .running && child.pendingTimers.map(\.dueAt) == [begun + 3_600_000_000_000])
        guard case .failed(let failure)? = try unasked.describe()?.status else { Issue.record("not failed"); return }
        #expect(failure.contains("CancellationError"))

        try await sleeper.cancel()
        await #expect(throws: EntityError.self) { try await withDeadline(seconds: 60) { try await sleeper.result() } }
        await runtime.untilIdle()
        let cancelled = try #require(try sleeper.describe())
        guard case .cancelled(let message) = cancelled.status else { Issue.record("\(cancelled.status)"); return }
        #expect(message.contains("CancellationError"))
        #expect(cancelled.pendingTimers.isEmpty && cancelled.closedAt == cancelled.lastEventAt && cancelled.closedAt != nil)

        try await runtime.entity(CancellableRun.self, id: "child-of-p").cancel()
        #expect(try await withDeadline(seconds: 60) { try await parent.result() } == "stopped:true")
        await runtime.untilIdle()
        let done = try #require(try parent.describe())
        #expect(done.status == .completed && done.pendingChildren.isEmpty)

        try await account.terminate(reason: "closed by the bank")
        let terminated = try account.describe()
        #expect(terminated?.status == .terminated(reason: "closed by the bank"), "\(String(describing: terminated))")
    }
}
