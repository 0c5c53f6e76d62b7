@_spi(Testing) @testable import DurableEntities
import DurableEntitiesTesting
import Foundation
import Synchronization
import TestSupport
import Testing

@Suite("Retrying and pausing an activity", .timeLimit(.minutes(10)))
struct RetryNowTests {
    /// A `Step` that logs each attempt in `log` (time on `clock`, number, idempotency key) and fails
    /// with `Flake` while `fails(attempt)` says so; otherwise it returns `ok:` and its label.
    func loggedStep(_ log: AttemptLog, _ clock: TestClock, failsWhile fails: @escaping @Sendable (_ attempt: Int) -> Bool) -> ActivityStub<Step> {
        ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            if fails(context.attempt) { throw Flake() }
            return "ok:\(label)"
        }
    }

    /// The retry timers stored, by due time.
    func retryTimers(_ runtime: EntityRuntime) throws -> [UInt64] {
        try runtime.journal.timers().filter { ActivityWorker.isRetryTimer(id: $0.id) }.map(\.dueNanoseconds)
    }

    @Test("an activity backing off runs its next attempt at once, with its idempotency key and last heartbeat; resetting the attempts gives it a fresh maximumAttempts and backoff; the old retry timers are gone and nothing is recorded in history")
    func retryNowAndReset() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let failing = Atomic(true)
        let stub = ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey,
                          heartbeat: context.lastHeartbeat(as: Int.self)))
            context.heartbeat(log.all.count)
            if failing.load(ordering: .acquiring) { throw Flake() }
            return "ok:\(label)"
        }
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        let call = runtime.entity(CallStep.self, id: "gateway")
        let options = ActivityOptions(retry: .init(initialInterval: .seconds(10), backoffCoefficient: 2, maximumAttempts: 3),
                                      scheduleToCloseTimeout: .seconds(3_600))
        let begun = clock.nowNanoseconds()
        try await call.start(.init(label: "x", options: options))
        await runtime.untilIdle()
        var activity = try call.onlyPendingActivity()
        #expect(activity.state == .backingOff && activity.attempt == 2 && activity.nextAttemptAt == begun + 10_000_000_000)
        #expect(try retryTimers(runtime) == [begun + 10_000_000_000])

        // Now, not in 10 s: attempt 2 runs with the clock where it was, fails, and backs off 20 s.
        #expect(try await call.retryActivityNow(activity.id) == .retrying(attempt: 2))
        await runtime.untilIdle()
        activity = try call.onlyPendingActivity()
        #expect(activity.state == .backingOff && activity.attempt == 3 && activity.nextAttemptAt == begun + 20_000_000_000)
        #expect(try retryTimers(runtime) == [begun + 20_000_000_000])  // the 10 s timer went with the retry

        // Attempt 3 would be the last; reset, it is attempt 1 again, and the backoff starts at 10 s.
        #expect(try await call.retryActivityNow(activity.id, resettingAttempts: true) == .retrying(attempt: 1))
        await runtime.untilIdle()
        activity = try call.onlyPendingActivity()
        #expect(activity.state == .backingOff && activity.attempt == 2 && activity.nextAttemptAt == begun + 10_000_000_000)
        #expect(activity.scheduleToCloseDeadline == begun + 3_600_000_000_000)
        #expect(try retryTimers(runtime) == [begun + 10_000_000_000])

        failing.store(false, ordering: .releasing)
        await runtime.advance(clock, by: .seconds(10))
        #expect(try await withDeadline(seconds: 60) { try await call.result() } == "ok:x")
        let attempts = log.all
        #expect(attempts.map(\.number) == [1, 2, 1, 2])
        #expect(attempts.map(\.time) == [begun, begun, begun, begun + 10_000_000_000])
        #expect(attempts.map(\.heartbeat) == [nil, 1, 2, 3])  // each attempt reads the one before's details
        #expect(Set(attempts.map(\.key)) == ["CallStep/gateway/\(activity.id)"])
        #expect(try runtime.historyKinds(of: call.name) == [.started, .activityScheduled, .activityCompleted, .completed])
        await runtime.advance(clock, by: .seconds(60))
        #expect(log.all.count == 4)
        #expect(try retryTimers(runtime).isEmpty)
    }

    @Test("pausing an activity backing off: no attempt when its backoff ends, nor after a restart, and no retry timer; describe shows it paused; pausing again changes nothing; a retry now resumes it")
    func pauseAndResume() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let failing = Atomic(true)
        let stub = loggedStep(log, clock) { _ in failing.load(ordering: .acquiring) }
        let options = ActivityOptions(retry: .init(initialInterval: .seconds(10)))
        let id: UInt64
        do {
            let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
            defer { runtime.close() }
            let call = runtime.entity(CallStep.self, id: "paused")
            try await call.start(.init(label: "x", options: options))
            await runtime.untilIdle()
            id = try call.onlyPendingActivity().id
            #expect(try await call.pauseActivity(id) == .paused(attempt: 2))
            let paused = try call.onlyPendingActivity()
            #expect(paused.state == .paused && paused.attempt == 2 && paused.nextAttemptAt == nil)
            #expect(paused.lastFailure?.type.hasSuffix("Flake") == true)
            #expect(try call.describe()?.description.contains("activity \(id) Step: paused, attempt 2") == true)
            #expect(try retryTimers(runtime).isEmpty)
            #expect(try await call.pauseActivity(id) == .paused(attempt: 2))
            await runtime.advance(clock, by: .seconds(3_600))
            #expect(log.all.count == 1)
        }
        failing.store(false, ordering: .releasing)
        let reopened = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { reopened.close() }
        let call = reopened.entity(CallStep.self, id: "paused")
        await reopened.advance(clock, by: .seconds(3_600))
        #expect(log.all.count == 1)
        #expect(try call.onlyPendingActivity().state == .paused)
        #expect(try retryTimers(reopened).isEmpty, "the open stores no timer for a paused activity")
        #expect(try await call.retryActivityNow(id) == .retrying(attempt: 2))
        #expect(try await withDeadline(seconds: 60) { try await call.result() } == "ok:x")
        #expect(log.all.map(\.number) == [1, 2])
        #expect(log.all.last?.time == clock.nowNanoseconds(), "resumed at once")
    }

    @Test("racing the retry timers: while the clock reaches every activity's retry, operators retry them all now; each attempt still runs exactly once")
    func raceWithRetryTimers() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let stub = loggedStep(log, clock) { $0 == 1 }
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        let calls = (0..<40).map { runtime.entity(CallStep.self, id: "c\($0)") }
        for call in calls { try await call.start(.init(label: call.name.id, options: ActivityOptions(retry: .init(initialInterval: .seconds(10))))) }
        await runtime.untilIdle()
        let ids = try calls.map { try $0.onlyPendingActivity().id }
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { clock.advance(by: .seconds(10)) }
            for (call, id) in zip(calls, ids) {
                group.addTask {
                    do {
                        let outcome = try await call.retryActivityNow(id)
                        #expect(outcome == .retrying(attempt: 2) || outcome == .alreadyDue(attempt: 2), "\(outcome)")
                    } catch {
                        #expect((error as? EntityError)?.code == .rejected, "\(error)")  // its attempt 2 already completed
                    }
                }
            }
            try await group.waitForAll()
        }
        for call in calls { #expect(try await withDeadline(seconds: 60) { try await call.result() } == "ok:\(call.name.id)") }
        await runtime.untilIdle()
        let attempts = Dictionary(grouping: log.all, by: \.key).mapValues { $0.map(\.number) }
        #expect(attempts.count == calls.count && attempts.values.allSatisfy { $0 == [1, 2] }, "\(attempts)")
    }

    @Test("a retry whose activity's own retry timer rings between its read and its commit: the commit is refused, it reads again, finds the attempt running and changes nothing")
    func timerRingsMeanwhile() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let gate = AsyncGate()
        defer { gate.open() }
        let log = AttemptLog()
        let (started, start) = AsyncStream.makeStream(of: Int.self)
        let stub = ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            if context.attempt == 1 { throw Flake() }
            start.yield(context.attempt)
            await gate.wait()
            return "ok:\(label)"
        }
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        let call = runtime.entity(CallStep.self, id: "meanwhile")
        try await call.start(.init(label: "x", options: ActivityOptions(retry: .init(initialInterval: .seconds(10)))))
        await runtime.untilIdle()
        let activity = try call.onlyPendingActivity()
        #expect(activity.state == .backingOff && activity.attempt == 2)
        let rang = Atomic(false)
        runtime.core.activities.rescheduleRead.withLock {
            $0 = {
                guard !rang.exchange(true, ordering: .acquiringAndReleasing) else { return }
                clock.advance(by: .seconds(10))  // the retry timer rings: attempt 2 starts
                var attempts = started.makeAsyncIterator()
                _ = await attempts.next()
            }
        }
        #expect(try await call.retryActivityNow(activity.id) == .alreadyDue(attempt: 2))
        #expect(try call.onlyPendingActivity().state == .running)
        gate.open()
        #expect(try await withDeadline(seconds: 60) { try await call.result() } == "ok:x")
        #expect(log.all.map(\.number) == [1, 2])
    }

    @Test("a retry whose entity is terminated between its read and its commit: the commit is refused, so the task the run gave up stays deleted and no attempt runs; the retry is refused")
    func givenUpMeanwhile() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let stub = loggedStep(log, clock) { _ in true }
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        let call = runtime.entity(CallStep.self, id: "given-up")
        try await call.start(.init(label: "x", options: ActivityOptions(retry: .init(initialInterval: .seconds(10)))))
        await runtime.untilIdle()
        let activity = try call.onlyPendingActivity()
        #expect(activity.state == .backingOff)
        runtime.core.activities.rescheduleRead.withLock {
            $0 = { try? await call.terminate(reason: "closed meanwhile") }
        }
        let error = await #expect(throws: EntityError.self) { try await call.retryActivityNow(activity.id) }
        #expect(error?.code == .rejected, "\(String(describing: error))")
        #expect(try runtime.journal.tasks(prefix: [ActivityTask.keyPrefix]).isEmpty)
        await runtime.advance(clock, by: .seconds(60))
        #expect(log.all.map(\.number) == [1])
        #expect(try call.describe()?.status == .terminated(reason: "closed meanwhile"))
    }

    @Test("nothing changes where an attempt is running or due, and what cannot be retried is refused: an activity whose outcome is recorded, an unknown activity or entity, one whose cancellation the run requested, a closed runtime")
    func refusals() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let gate = AsyncGate()
        defer { gate.open() }
        let (stub, events) = SlowToStopStep.make(log: AttemptLog(), clock: clock, gate: gate)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }

        // Running: the call changes nothing.
        let call = runtime.entity(CallStep.self, id: "running")
        try await call.start(.init(label: "x", options: ActivityOptions(retry: .init(initialInterval: .seconds(10)))))
        var iterator = events.makeAsyncIterator()
        #expect(await iterator.next() == "started")
        let running = try call.onlyPendingActivity()
        #expect(running.state == .running)
        #expect(try await call.retryActivityNow(running.id) == .alreadyDue(attempt: 1))
        #expect(try await call.retryActivityNow(running.id, resettingAttempts: true) == .alreadyDue(attempt: 1))
        #expect(try await call.pauseActivity(running.id) == .notBackingOff(attempt: 1))

        // Its cancellation requested (waitCancellationCompleted), while the attempt still runs: refused.
        let race = runtime.entity(RaceTypedStep.self, id: "race")
        try await race.start(.init(label: "y", type: .waitCancellationCompleted))
        #expect(await iterator.next() == "started")
        clock.advance(by: .seconds(60))  // the race's deadline: the activity is asked to stop
        #expect(await iterator.next() == "cancelled")
        let stopping = try race.onlyPendingActivity()
        #expect(stopping.state == .cancelRequested)
        let cancelled = await #expect(throws: EntityError.self) { try await race.retryActivityNow(stopping.id) }
        #expect(cancelled?.code == .rejected && cancelled?.message.contains("cancellation") == true, "\(String(describing: cancelled))")
        let notPaused = await #expect(throws: EntityError.self) { try await race.pauseActivity(stopping.id) }
        #expect(notPaused?.code == .rejected)

        gate.open()
        #expect(try await withDeadline(seconds: 60) { try await call.result() } == "late:x")
        #expect(try await withDeadline(seconds: 60) { try await race.result() } == "deadline,step:late:y")
        await runtime.untilIdle()
        // Recorded: nothing to retry.
        for (entity, id) in [(call.name, running.id), (call.name, 999), (EntityName(type: CallStep.entityType, id: "nobody"), 1)] {
            let error = await #expect(throws: EntityError.self) { try await runtime.retryActivityNow(of: entity, activity: id) }
            #expect(error?.code == .rejected, "\(String(describing: error))")
        }
        runtime.close()
        let closed = await #expect(throws: EntityError.self) { try await call.retryActivityNow(running.id) }
        #expect(closed?.code == .closed)
        let closedPause = await #expect(throws: EntityError.self) { try await call.pauseActivity(running.id) }
        #expect(closedPause?.code == .closed)
    }

    @Test("a retry made due is durable: a runtime that has not registered the activity makes it due (then reports it due), crashes, and the next open runs the attempt at once, not at the end of its backoff")
    func durableAcrossCrash() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let options = ActivityOptions(retry: .init(initialInterval: .seconds(10)))
        let begun = clock.nowNanoseconds()
        do {
            let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [ActivityStub<Step> { _, _ in throw Flake() }])
            defer { runtime.close() }
            try await runtime.entity(CallStep.self, id: "later").start(.init(label: "x", options: options))
            await runtime.untilIdle()
        }
        do {
            let unregistered = try EntityRuntime(configuration: .quiet(directory, clock))
            let call = unregistered.entity(CallStep.self, id: "later")
            let activity = try call.onlyPendingActivity()
            #expect(activity.state == .backingOff && activity.attempt == 2)
            #expect(try await call.retryActivityNow(activity.id) == .retrying(attempt: 2))
            await unregistered.untilIdle()  // its attempt parked, waiting for the registration (a crash keeps no thread)
            let due = try call.onlyPendingActivity()
            #expect(due.state == .scheduled && due.attempt == 2 && due.nextAttemptAt == nil)
            #expect(try await call.retryActivityNow(activity.id) == .alreadyDue(attempt: 2))
            unregistered.simulateCrash()
        }
        let log = AttemptLog()
        let stub = loggedStep(log, clock) { _ in false }
        let reopened = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { reopened.close() }
        let call = reopened.entity(CallStep.self, id: "later")
        #expect(try await withDeadline(seconds: 60) { try await call.result() } == "ok:x")
        #expect(log.all.map(\.number) == [2])
        #expect(log.all.map(\.time) == [begun])  // the clock never moved: not the backoff's 10 s
        #expect(clock.nowNanoseconds() == begun)
    }
}
