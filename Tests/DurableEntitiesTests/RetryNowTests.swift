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

    @Test("a retry changes nothing where an attempt is running or due, a pause lets the running attempt go on (which then succeeds), and what cannot be retried is refused: an activity whose outcome is recorded, an unknown activity or entity, one whose cancellation the run requested, a closed runtime")
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
        #expect(try await call.pauseActivity(running.id) == .pausedAfterAttempt(attempt: 1))
        #expect(try runtime.journal.tasks(prefix: [ActivityTask.pauseKeyPrefix]).count == 1)

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
        #expect(try runtime.journal.tasks(prefix: [ActivityTask.pauseKeyPrefix]).isEmpty, "the pause went with the activity that succeeded")
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

    // MARK: Pausing what runs or waits, and the deadline while paused

    /// A `Step` whose attempt 1 waits for `gate`, then fails with `Flake`; later ones return `ok:`
    /// and their label. Each attempt is logged, and its number yielded as it starts.
    func failsFirstAfter(_ gate: AsyncGate, _ log: AttemptLog, _ clock: TestClock) -> (ActivityStub<Step>, AsyncStream<Int>) {
        let (started, start) = AsyncStream.makeStream(of: Int.self)
        let stub = ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            start.yield(context.attempt)
            if context.attempt == 1 {
                await gate.wait()
                throw Flake()
            }
            return "ok:\(label)"
        }
        return (stub, started)
    }

    /// The pause rows stored.
    func pauseRows(_ runtime: EntityRuntime) throws -> Int {
        try runtime.journal.tasks(prefix: [ActivityTask.pauseKeyPrefix]).count
    }

    @Test("pausing an activity whose attempt runs: the attempt goes on; when it fails, its retry is stored paused (no timer, no attempt), and stays so across a crash; a retry now resumes it")
    func pauseRunningAttempt() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let gate = AsyncGate()
        defer { gate.open() }
        let log = AttemptLog()
        let (stub, started) = failsFirstAfter(gate, log, clock)
        let options = ActivityOptions(retry: .init(initialInterval: .seconds(10)))
        let id: UInt64
        do {
            let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
            defer { runtime.close() }
            let call = runtime.entity(CallStep.self, id: "running")
            try await call.start(.init(label: "x", options: options))
            var attempts = started.makeAsyncIterator()
            #expect(await attempts.next() == 1)
            let running = try call.onlyPendingActivity()
            id = running.id
            #expect(running.state == .running && !running.pausedAfterAttempt)
            #expect(try await call.pauseActivity(id) == .pausedAfterAttempt(attempt: 1))
            #expect(try await call.pauseActivity(id) == .pausedAfterAttempt(attempt: 1))
            let pausing = try call.onlyPendingActivity()
            #expect(pausing.state == .running && pausing.pausedAfterAttempt)
            #expect(try call.describe()?.description.contains("activity \(id) Step: running, attempt 1, paused after it") == true)
            #expect(try pauseRows(runtime) == 1)

            gate.open()  // attempt 1 fails: its retry is stored paused
            await runtime.untilIdle()
            let paused = try call.onlyPendingActivity()
            #expect(paused.state == .paused && paused.attempt == 2 && !paused.pausedAfterAttempt && paused.nextAttemptAt == nil)
            #expect(try retryTimers(runtime).isEmpty)
            await runtime.advance(clock, by: .seconds(3_600))
            #expect(log.all.count == 1)
            runtime.simulateCrash()
        }
        let reopened = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { reopened.close() }
        let call = reopened.entity(CallStep.self, id: "running")
        await reopened.advance(clock, by: .seconds(3_600))
        #expect(log.all.count == 1)
        #expect(try call.onlyPendingActivity().state == .paused)
        #expect(try await call.retryActivityNow(id) == .retrying(attempt: 2))
        #expect(try await withDeadline(seconds: 60) { try await call.result() } == "ok:x")
        #expect(log.all.map(\.number) == [1, 2])
        await reopened.untilIdle()
        #expect(try pauseRows(reopened) == 0)
    }

    /// A `Step` that notes what each attempt reads (its number, the last heartbeat's details, its
    /// pause) and gives a heartbeat `<attempt>:a`, then yields its number. Its first attempt then waits
    /// for `gate`, gives a heartbeat `1:b`, notes what it sees (paused, cancelled) and ends with
    /// `ended(cancelled)` (by default: it throws `CancellationError` when cancelled, as an activity
    /// that stops when interrupted); later attempts return `ok:` and their label.
    func heartbeatsAfter(_ gate: AsyncGate, _ notes: CallLog,
                         ended: @escaping @Sendable (_ cancelled: Bool) throws -> String = { cancelled in
                             if cancelled { throw CancellationError() }
                             return "not interrupted"
                         }) -> (ActivityStub<Step>, AsyncStream<Int>) {
        let (started, start) = AsyncStream.makeStream(of: Int.self)
        let first = Atomic<Bool>(true)
        let stub = ActivityStub<Step> { label, context in
            notes.add("attempt \(context.attempt) read \(context.lastHeartbeat(as: String.self) ?? "nothing"), paused \(context.isPaused)")
            context.heartbeat("\(context.attempt):a")
            start.yield(context.attempt)
            guard first.exchange(false, ordering: .relaxed) else { return "ok:\(label)" }
            await gate.wait()
            context.heartbeat("1:b")
            notes.add("paused \(context.isPaused), cancelled \(context.isCancelled)")
            return try ended(context.isCancelled)
        }
        return (stub, started)
    }

    @Test("a pause interrupts a heartbeating attempt at its next heartbeat (Temporal's pause): the attempt sees isPaused and isCancelled; its failure is not counted, even on its last allowed attempt: the activity is stored paused at the same attempt, with that heartbeat's details, and makes no attempt; a retry now runs it again at once, reading them")
    func pauseInterruptsHeartbeatingAttempt() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let gate = AsyncGate()
        defer { gate.open() }
        let notes = CallLog()
        let (stub, started) = heartbeatsAfter(gate, notes)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        let call = runtime.entity(CallStep.self, id: "beating")
        // One attempt allowed: a counted failure would end the activity.
        try await call.start(.init(label: "x", options: ActivityOptions(retry: .never)))
        var attempts = started.makeAsyncIterator()
        #expect(await attempts.next() == 1)  // its first heartbeat came before the pause: it runs on
        let id = try call.onlyPendingActivity().id
        #expect(try await call.pauseActivity(id) == .pausedAfterAttempt(attempt: 1))
        gate.open()  // the next heartbeat interrupts it
        await runtime.untilIdle()
        #expect(notes.all == ["attempt 1 read nothing, paused false", "paused true, cancelled true"])
        let paused = try call.onlyPendingActivity()
        #expect(paused.state == .paused && paused.attempt == 1 && paused.nextAttemptAt == nil)
        // Stored paused (not merely held by its pause row), with the details the throttle had kept
        // in memory only.
        let entity = try #require(try runtime.journal.key(for: call.name))
        let stored = try #require(try runtime.journal.task(forKey: ActivityTask.key(entity: entity.rawValue, activity: id).bytes))
        let task = try #require(ActivityTask.decode(stored))
        #expect(task.isPaused && task.attempt == 1 && task.runningAttempt == nil)
        #expect(try retryTimers(runtime).isEmpty)
        await runtime.advance(clock, by: .seconds(3_600))
        #expect(notes.all.count == 2)
        #expect(try await call.retryActivityNow(id) == .retrying(attempt: 1))
        #expect(try await withDeadline(seconds: 60) { try await call.result() } == "ok:x")
        #expect(notes.all.last == "attempt 1 read 1:b, paused false")
        await runtime.untilIdle()
        #expect(try pauseRows(runtime) == 0)
    }

    @Test("a local attempt that left its turn is paused as a pool attempt is: interrupted at its next heartbeat, stored paused at the same attempt, and run again on the pool by a retry now")
    func pauseInterruptsDetachedLocalAttempt() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let gate = AsyncGate()
        defer { gate.open() }
        let notes = CallLog()
        let (stub, started) = heartbeatsAfter(gate, notes)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        let (stored, store) = AsyncStream.makeStream(of: Void.self)
        runtime.core.activities.heartbeatStored.withLock { $0 = { _ in store.yield() } }
        let steps = runtime.entity(LocalSteps.self, id: "local")
        try await steps.start(.init(labels: ["x"], options: ActivityOptions(retry: .never)))
        var attempts = started.makeAsyncIterator()
        #expect(await attempts.next() == 1)
        // It waits for the gate, so it leaves its turn; the turn's commit stores its task, and then
        // the heartbeat it gave inside the turn.
        var storedHeartbeats = stored.makeAsyncIterator()
        await storedHeartbeats.next()
        let id = try steps.onlyPendingActivity().id
        #expect(try await steps.pauseActivity(id) == .pausedAfterAttempt(attempt: 1))
        gate.open()
        await runtime.untilIdle()
        #expect(notes.all == ["attempt 1 read nothing, paused false", "paused true, cancelled true"])
        let paused = try steps.onlyPendingActivity()
        #expect(paused.state == .paused && paused.attempt == 1)
        #expect(try await steps.retryActivityNow(id) == .retrying(attempt: 1))
        #expect(try await withDeadline(seconds: 60) { try await steps.result() } == "ok:x")
        #expect(notes.all.last == "attempt 1 read 1:b, paused false")
    }

    @Test("an attempt that a pause interrupted and that returns anyway succeeds: its output is the outcome, and its pause row goes")
    func interruptedAttemptReturns() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let gate = AsyncGate()
        defer { gate.open() }
        let notes = CallLog()
        let (stub, started) = heartbeatsAfter(gate, notes) { cancelled in "done, cancelled \(cancelled)" }
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        let call = runtime.entity(CallStep.self, id: "returns")
        try await call.start(.init(label: "x", options: ActivityOptions(retry: .never)))
        var attempts = started.makeAsyncIterator()
        #expect(await attempts.next() == 1)
        #expect(try await call.pauseActivity(call.onlyPendingActivity().id) == .pausedAfterAttempt(attempt: 1))
        gate.open()
        #expect(try await withDeadline(seconds: 60) { try await call.result() } == "done, cancelled true")
        #expect(notes.all == ["attempt 1 read nothing, paused false", "paused true, cancelled true"])
        await runtime.untilIdle()
        #expect(try pauseRows(runtime) == 0)
    }

    @Test("a pause made while an attempt runs holds across a crash that cuts the attempt off: the attempt counts as failed and the next one is stored paused at the open")
    func pauseHoldsAcrossCrashMidAttempt() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let silence = Silence()
        let (events, event) = AsyncStream.makeStream(of: String.self)
        var iterator = events.makeAsyncIterator()
        let options = ActivityOptions(retry: .init(initialInterval: .seconds(10)))
        let first = try EntityRuntime(configuration: .quiet(directory, clock), activities: [ActivityStub<Step> { _, context in
            context.heartbeat(1)  // stored at once, with the mark that the attempt runs
            try await silence.wait()  // until the process dies
        }])
        first.core.activities.heartbeatStored.withLock { $0 = { _ in event.yield("stored") } }
        let crashed = first.entity(CallStep.self, id: "cut-off")
        try await crashed.start(.init(label: "x", options: options))
        #expect(await iterator.next() == "stored")
        let id = try crashed.onlyPendingActivity().id
        #expect(try await crashed.pauseActivity(id) == .pausedAfterAttempt(attempt: 1))
        first.simulateCrash()

        let log = AttemptLog()
        let second = try EntityRuntime(configuration: .quiet(directory, clock), activities: [loggedStep(log, clock) { _ in false }])
        defer { second.close() }
        defer { silence.finish() }
        let call = second.entity(CallStep.self, id: "cut-off")
        await second.advance(clock, by: .seconds(3_600))
        let paused = try call.onlyPendingActivity()
        #expect(paused.state == .paused && paused.attempt == 2 && paused.lastFailure?.type == "interrupted")
        #expect(paused.heartbeatDetails != nil)
        #expect(log.all.isEmpty)
        #expect(try retryTimers(second).isEmpty)
        #expect(try await call.retryActivityNow(id) == .retrying(attempt: 2))
        #expect(try await withDeadline(seconds: 60) { try await call.result() } == "ok:x")
        #expect(log.all.map(\.number) == [2])
        withExtendedLifetime(first) {}
    }

    @Test("pausing an activity queued for a slot in the pool: it never starts, not when the slot frees; a retry now starts it")
    func pauseQueued() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let gate = AsyncGate()
        defer { gate.open() }
        let log = AttemptLog()
        let (started, start) = AsyncStream.makeStream(of: String.self)
        let stub = ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            start.yield(label)
            if label == "block" { await gate.wait() }
            return "ok:\(label)"
        }
        var configuration = EntityRuntime.Configuration.quiet(directory, clock)
        configuration.maxConcurrentActivities = 1
        let runtime = try EntityRuntime(configuration: configuration, activities: [stub])
        defer { runtime.close() }
        let blocker = runtime.entity(CallStep.self, id: "blocker")
        try await blocker.start(.init(label: "block", options: ActivityOptions()))
        var attempts = started.makeAsyncIterator()
        #expect(await attempts.next() == "block")
        let queued = runtime.entity(CallStep.self, id: "queued")
        try await queued.start(.init(label: "q", options: ActivityOptions()))  // its activity is stored: it waits for the slot
        let waiting = try queued.onlyPendingActivity()
        #expect(waiting.state == .scheduled && waiting.attempt == 1)
        #expect(try await queued.pauseActivity(waiting.id) == .paused(attempt: 1))
        #expect(try queued.onlyPendingActivity().state == .paused)

        gate.open()  // the slot frees
        #expect(try await withDeadline(seconds: 60) { try await blocker.result() } == "ok:block")
        await runtime.untilIdle()
        #expect(log.all.count == 1)
        #expect(try queued.onlyPendingActivity().state == .paused)
        #expect(try await queued.retryActivityNow(waiting.id) == .retrying(attempt: 1))
        #expect(try await withDeadline(seconds: 60) { try await queued.result() } == "ok:q")
        #expect(log.all.map(\.key) == ["CallStep/blocker/\(waiting.id)", "CallStep/queued/\(waiting.id)"])
    }

    @Test("a pause that comes while an attempt is taken from the pool but has not started yet answers paused truly: the attempt does not start, and is stored paused (test hook)")
    func pauseAsAttemptStarts() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let stub = loggedStep(log, clock) { _ in false }
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        // The first attempt to start holds its drain's thread at its start until released.
        let (reached, reach) = AsyncStream.makeStream(of: Void.self)
        let release = DispatchSemaphore(value: 0)
        defer { release.signal() }
        let first = Atomic<Bool>(true)
        runtime.core.activities.attemptStarting.withLock {
            $0 = { _ in
                guard first.exchange(false, ordering: .relaxed) else { return }
                reach.yield()
                _ = release.wait(timeout: .now() + 60)
            }
        }
        let call = runtime.entity(CallStep.self, id: "starting")
        try await call.start(.init(label: "s", options: ActivityOptions()))
        var held = reached.makeAsyncIterator()
        await held.next()
        let id = try call.onlyPendingActivity().id
        #expect(try await call.pauseActivity(id) == .paused(attempt: 1))
        release.signal()  // the attempt goes on to its start, and finds the pause
        await runtime.untilIdle()
        #expect(log.all.isEmpty)
        let paused = try call.onlyPendingActivity()
        #expect(paused.state == .paused && paused.attempt == 1)
        #expect(try await call.retryActivityNow(id) == .retrying(attempt: 1))
        #expect(try await withDeadline(seconds: 60) { try await call.result() } == "ok:s")
        #expect(log.all.map(\.number) == [1])
    }

    @Test("a paused activity's schedule-to-close timeout still ends it on time — at its deadline, not before — also after a reopen, which stores its deadline's timer again")
    func deadlineWhilePaused() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let stub = loggedStep(log, clock) { _ in true }
        let options = ActivityOptions(retry: .init(initialInterval: .seconds(10)), scheduleToCloseTimeout: .seconds(100))
        for (index, reopening) in [false, true].enumerated() {
            let id = "deadline-\(index)"
            let deadline = clock.nowNanoseconds() + 100_000_000_000
            let paused: UInt64
            do {
                let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
                defer { runtime.close() }
                let call = runtime.entity(CallStep.self, id: id)
                try await call.start(.init(label: "x", options: options))
                await runtime.untilIdle()
                paused = try call.onlyPendingActivity().id
                #expect(try await call.pauseActivity(paused) == .paused(attempt: 2))
                #expect(try call.onlyPendingActivity().scheduleToCloseDeadline == deadline)
                #expect(try retryTimers(runtime) == [deadline], "the deadline's timer, not the retry's")
                if !reopening {
                    await runtime.advance(clock, by: .seconds(99))
                    #expect(try call.onlyPendingActivity().state == .paused)
                    await runtime.advance(clock, by: .seconds(1))
                    #expect(try await withDeadline(seconds: 60) { try await call.result() } == "failed:scheduleToCloseTimeout:1:Flake")
                    #expect(clock.nowNanoseconds() == deadline)
                    continue
                }
                // Its timer lost: the open stores it again.
                var batch = JournalBatch()
                batch.cancelTimer(dueNanoseconds: deadline, entity: try #require(try runtime.journal.key(for: call.name)), id: paused | 1 << 63)
                _ = try await runtime.journal.commit(batch)
                #expect(try retryTimers(runtime).isEmpty)
            }
            let reopened = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
            defer { reopened.close() }
            let call = reopened.entity(CallStep.self, id: id)
            await reopened.untilIdle()
            #expect(try retryTimers(reopened) == [deadline])
            await reopened.advance(clock, by: .seconds(100))
            #expect(try await withDeadline(seconds: 60) { try await call.result() } == "failed:scheduleToCloseTimeout:1:Flake")
        }
        #expect(log.all.map(\.number) == [1, 1])
    }

    @Test("a retry now withdraws a pause made while the attempt ran: the attempt's failure is retried by its policy")
    func retryNowWithdrawsPause() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let gate = AsyncGate()
        defer { gate.open() }
        let log = AttemptLog()
        let (stub, started) = failsFirstAfter(gate, log, clock)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        let call = runtime.entity(CallStep.self, id: "withdrawn")
        let begun = clock.nowNanoseconds()
        try await call.start(.init(label: "x", options: ActivityOptions(retry: .init(initialInterval: .seconds(10)))))
        var attempts = started.makeAsyncIterator()
        #expect(await attempts.next() == 1)
        let id = try call.onlyPendingActivity().id
        #expect(try await call.pauseActivity(id) == .pausedAfterAttempt(attempt: 1))
        #expect(try await call.retryActivityNow(id) == .alreadyDue(attempt: 1))
        #expect(try pauseRows(runtime) == 0)
        #expect(try !call.onlyPendingActivity().pausedAfterAttempt)
        gate.open()
        await runtime.untilIdle()
        let backingOff = try call.onlyPendingActivity()
        #expect(backingOff.state == .backingOff && backingOff.nextAttemptAt == begun + 10_000_000_000)
        #expect(try retryTimers(runtime) == [begun + 10_000_000_000])
        await runtime.advance(clock, by: .seconds(10))
        #expect(try await withDeadline(seconds: 60) { try await call.result() } == "ok:x")
        #expect(log.all.map(\.number) == [1, 2])
    }

    @Test("a pause whose activity's retry timer rings between its read and its commit: the attempt is held back and stored paused, the pause's commit is refused, and it reads again and finds it paused")
    func pauseWhileTimerRings() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let stub = loggedStep(log, clock) { $0 == 1 }
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        let call = runtime.entity(CallStep.self, id: "rings")
        try await call.start(.init(label: "x", options: ActivityOptions(retry: .init(initialInterval: .seconds(10)))))
        await runtime.untilIdle()
        let id = try call.onlyPendingActivity().id
        let rang = Atomic(false)
        runtime.core.activities.rescheduleRead.withLock {
            $0 = {
                guard !rang.exchange(true, ordering: .acquiringAndReleasing) else { return }
                await runtime.advance(clock, by: .seconds(10))  // the retry timer rings: attempt 2 is due
            }
        }
        #expect(try await call.pauseActivity(id) == .paused(attempt: 2))
        let timerRang = rang.load(ordering: .acquiring)
        #expect(timerRang)
        await runtime.advance(clock, by: .seconds(60))
        #expect(log.all.map(\.number) == [1])
        #expect(try call.onlyPendingActivity().state == .paused)
        #expect(try await call.retryActivityNow(id) == .retrying(attempt: 2))
        #expect(try await withDeadline(seconds: 60) { try await call.result() } == "ok:x")
        #expect(log.all.map(\.number) == [1, 2])
    }

    @Test("racing the retry timers with pauses: while the clock reaches 40 activities' retries, each is paused; no attempt starts while its activity is paused, one held back runs only after a retry now, and every activity runs each attempt once")
    func pauseRacesRetryTimers() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let startedPaused = CallLog()
        let stub = ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            if context.isPaused { startedPaused.add(context.idempotencyKey) }
            if context.attempt == 1 { throw Flake() }
            return "ok:\(label)"
        }
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        let calls = (0..<40).map { runtime.entity(CallStep.self, id: "p\($0)") }
        for call in calls { try await call.start(.init(label: call.name.id, options: ActivityOptions(retry: .init(initialInterval: .seconds(10))))) }
        await runtime.untilIdle()
        let ids = try calls.map { try $0.onlyPendingActivity().id }
        let held = await withTaskGroup(of: String?.self) { group in
            group.addTask {
                clock.advance(by: .seconds(10))
                return nil
            }
            for (call, id) in zip(calls, ids) {
                group.addTask {
                    do {
                        let outcome = try await call.pauseActivity(id)
                        #expect(outcome == .paused(attempt: 2) || outcome == .pausedAfterAttempt(attempt: 2), "\(outcome)")
                        return outcome == .paused(attempt: 2) ? call.name.id : nil
                    } catch {
                        #expect((error as? EntityError)?.code == .rejected, "\(error)")  // its attempt 2 already completed
                        return nil
                    }
                }
            }
            var held: Set<String> = []
            for await id in group { if let id { held.insert(id) } }
            return held
        }
        await runtime.advance(clock, by: .seconds(60))
        // The property itself: no attempt started while its activity's pause was held. (A pause
        // answering `paused` may still see attempt 2 run: one that had ended before the pause came,
        // its outcome not yet recorded; that outcome then ends the activity, checked below.)
        #expect(startedPaused.all.isEmpty, "attempts started while their activity was paused: \(startedPaused.all)")
        let ranSecond = Set(log.all.filter { $0.number == 2 }.map(\.key))
        for (call, id) in zip(calls, ids) {
            let state = try call.describe()?.pendingActivities.first?.state
            if held.contains(call.name.id), !ranSecond.contains("CallStep/\(call.name.id)/\(id)") {
                #expect(state == .paused, "\(call.name): \(String(describing: state))")
            }
            if state == .paused { _ = try await call.retryActivityNow(id) } else { #expect(state == nil, "\(call.name): \(String(describing: state))") }
        }
        for call in calls { #expect(try await withDeadline(seconds: 60) { try await call.result() } == "ok:\(call.name.id)") }
        await runtime.untilIdle()
        let attempts = Dictionary(grouping: log.all, by: \.key).mapValues { $0.map(\.number) }
        #expect(attempts.count == calls.count && attempts.values.allSatisfy { $0 == [1, 2] }, "\(attempts)")
        #expect(try pauseRows(runtime) == 0)
    }
}
