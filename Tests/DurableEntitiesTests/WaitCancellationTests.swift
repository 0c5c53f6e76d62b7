@_spi(Testing) @testable import DurableEntities
import DurableEntitiesTesting
import Foundation
import Synchronization
import TestSupport
import Testing

/// Races `Step` (with the input as its label) against a 60-second durable timer in a task group, and
/// cancels the loser. Returns the winner's result, then the loser's, as its waits saw them.
struct RaceStep: EntityWorkflow {
    struct State: Codable, Sendable {}
    typealias Input = String
    static func initialState(id: String) -> State { State() }
    static func run(_ label: String, context: WorkflowContext<Self>) async throws -> String {
        try await race(context) { try await step(label, context) }
    }

    /// Races `contender` against a 60-second durable timer in a task group and cancels the loser;
    /// returns the winner's result, then the loser's.
    static func race(_ context: WorkflowContext<some EntityWorkflow>,
                     _ contender: @escaping @Sendable () async throws -> String) async throws -> String {
        try await withThrowingTaskGroup(of: String.self) { group in
            group.addTask { try await contender() }
            group.addTask { try await deadline(context) }
            let first = try await group.next()!
            group.cancelAll()
            let second = try await group.next()!
            return first + "," + second
        }
    }

    static func step(_ label: String, _ context: WorkflowContext<some EntityWorkflow>) async throws -> String {
        do {
            return "step:" + (try await context.execute(Step.self, label))
        } catch let failure as ActivityFailure {
            return "step-failed:\(failure.reason)"
        }
    }

    static func deadline(_ context: WorkflowContext<some EntityWorkflow>) async throws -> String {
        do {
            try await context.sleep(for: .seconds(60))
            return "deadline"
        } catch is CancellationError {
            return "sleep-cancelled"
        }
    }
}

/// `RaceStep` as a first version wrote it: it waits for the loser instead of cancelling it. Replayed
/// against a history where the loser was cancelled, it must fail as nondeterministic.
struct RaceStepWithoutCancel: EntityWorkflow {
    struct State: Codable, Sendable {}
    typealias Input = String
    static var entityType: String { RaceStep.entityType }
    static func initialState(id: String) -> State { State() }
    static func run(_ label: String, context: WorkflowContext<Self>) async throws -> String {
        try await withThrowingTaskGroup(of: String.self) { group in
            group.addTask { try await RaceStep.step(label, context) }
            group.addTask { try await RaceStep.deadline(context) }
            let first = try await group.next()!
            let second = try await group.next()!
            return first + "," + second
        }
    }
}

/// Waits started by tasks that are already cancelled (a cancelled group cancels the tasks added to
/// it): each fails at once, and nothing is scheduled. Then one activity, to show the run goes on.
struct CancelledBeforeWaiting: EntityWorkflow {
    struct State: Codable, Sendable { var approved = false }
    enum Signal: Codable, Sendable { case approve }
    typealias Input = String
    static func initialState(id: String) -> State { State() }
    static func handle(_ signal: Signal, state: inout State, context: EntityContext) throws { state.approved = true }
    static func run(_ label: String, context: WorkflowContext<Self>) async throws -> String {
        let refused = await withTaskGroup(of: String.self) { group in
            group.cancelAll()
            group.addTask { await describe { try await context.execute(Step.self, label) } }
            group.addTask { await describe { try await context.executeLocal(Step.self, label) } }
            group.addTask { await describe { try await context.sleep(for: .seconds(60)); return "slept" } }
            group.addTask { await describe { try await context.condition(timeout: .seconds(60)) { $0.approved } ? "approved" : "timed out" } }
            group.addTask { await describe { try await context.condition { $0.approved }; return "approved" } }
            group.addTask { await describe { try await context.executeChild(SleepyChild.self, id: "never-\(label)", input: label) } }
            group.addTask {
                await describe { try await context.fanOut(SleepyChild.self, [("never-fan-\(label)", label)]).map { try $0.get() }.joined() }
            }
            var all: [String] = []
            for await one in group { all.append(one) }
            return all.sorted().joined(separator: ",")
        }
        return refused + "|" + (try await context.execute(Step.self, label))
    }

    static func describe(_ wait: () async throws -> String) async -> String {
        do {
            return try await wait()
        } catch let failure as ActivityFailure {
            return "activity-\(failure.reason)"
        } catch is CancellationError {
            return "cancelled"
        } catch {
            return "other:\(error)"
        }
    }
}

/// Starts `Step` in an `async let` that it never awaits, sleeps a minute and returns: the scope's end
/// cancels the activity's task.
struct UnawaitedStep: EntityWorkflow {
    struct State: Codable, Sendable {}
    typealias Input = String
    static func initialState(id: String) -> State { State() }
    static func run(_ label: String, context: WorkflowContext<Self>) async throws -> String {
        async let _ = context.execute(Step.self, label)
        try await context.sleep(for: .seconds(60))
        return "slept"
    }
}

/// A child that sleeps an hour, then answers.
struct SleepyChild: EntityWorkflow {
    struct State: Codable, Sendable {}
    typealias Input = String
    static func initialState(id: String) -> State { State() }
    static func run(_ input: String, context: WorkflowContext<Self>) async throws -> String {
        try await context.sleep(for: .seconds(3_600))
        return "woke:\(input)"
    }
}

/// Waits for a child (left to run on its own) or 60 seconds, whichever comes first.
struct ChildOrDeadline: EntityWorkflow {
    struct State: Codable, Sendable {}
    typealias Input = String
    static func initialState(id: String) -> State { State() }
    static func run(_ input: String, context: WorkflowContext<Self>) async throws -> String {
        let child = try context.startChild(SleepyChild.self, id: "child-of-\(context.id)", input: input, parentClosePolicy: .abandon)
        return try await RaceStep.race(context) {
            do { return "child:" + (try await child.result()) } catch is CancellationError { return "child-wait-cancelled" }
        }
    }
}

/// Races `executeChild` of a ``SleepyChild`` (left alone by the parent-close policy) against 60
/// seconds: the deadline wins, and cancelling the wait asks the child to cancel.
struct ExecuteChildOrDeadline: EntityWorkflow {
    struct State: Codable, Sendable {}
    typealias Input = String
    static func initialState(id: String) -> State { State() }
    static func run(_ input: String, context: WorkflowContext<Self>) async throws -> String {
        try await RaceStep.race(context) {
            do {
                return "child:" + (try await context.executeChild(SleepyChild.self, id: "child-of-\(context.id)", input: input,
                                                                  parentClosePolicy: .abandon))
            } catch is CancellationError {
                return "child-cancelled"
            }
        }
    }
}

/// Races a fan-out of three ``SleepyChild``ren, two at a time, against 60 seconds: the deadline
/// wins, the two running children are asked to cancel, and the third never starts.
struct FanOutOrDeadline: EntityWorkflow {
    struct State: Codable, Sendable {}
    typealias Input = String
    static func initialState(id: String) -> State { State() }
    static func run(_ input: String, context: WorkflowContext<Self>) async throws -> String {
        try await RaceStep.race(context) {
            do {
                let children = (0..<3).map { (id: "fan-\($0)-of-\(context.id)", input: input) }
                let outcomes = try await context.fanOut(SleepyChild.self, children, maxConcurrent: 2, parentClosePolicy: .abandon)
                return "fan-out:\(outcomes.count)"
            } catch is CancellationError {
                return "fan-out-cancelled"
            }
        }
    }
}

/// A `Step` stub whose attempts never end by themselves: each is logged (time on `clock`, attempt
/// number, idempotency key), sends "started", waits on `silence`, and once that wait ends sends
/// "cancelled" (the attempt was cancelled) or "ended" and throws.
enum StallingStep {
    static func make(clock: TestClock, log: AttemptLog, silence: Silence) -> (ActivityStub<Step>, AsyncStream<String>) {
        let (events, event) = AsyncStream.makeStream(of: String.self)
        let stub = ActivityStub<Step> { _, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            event.yield("started")
            do {
                try await silence.wait()
            } catch {
                event.yield(context.isCancelled ? "cancelled" : "ended")
                throw error
            }
        }
        return (stub, events)
    }
}

@Suite("Cancelling a run body's waits", .timeLimit(.minutes(10)))
struct WaitCancellationTests {
    @Test("an activity raced against a durable timer that fires first is cancelled with the task that awaited it: the wait throws ActivityFailure(cancelled), the history records activityCancelRequested, the task row goes, the running attempt sees the cancellation, and nothing runs again after a reopen")
    func losingActivityIsCancelled() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let silence = Silence()
        defer { silence.finish() }
        let (stub, events) = StallingStep.make(clock: clock, log: log, silence: silence)
        let name = EntityName(type: RaceStep.entityType, id: "race")
        do {
            let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
            defer { runtime.close() }
            let race = runtime.entity(RaceStep.self, id: "race")
            try await race.start("x")
            var iterator = events.makeAsyncIterator()
            #expect(await iterator.next() == "started")
            #expect(try runtime.journal.tasks(prefix: [ActivityTask.keyPrefix]).count == 1)
            clock.advance(by: .seconds(60))
            #expect(try await race.result() == "deadline,step-failed:cancelled")
            // Without the cancellation the attempt would wait for ever (the suite's time limit ends it).
            #expect(await iterator.next() == "cancelled")
            await runtime.untilIdle()
            #expect(try runtime.journal.tasks(prefix: [ActivityTask.keyPrefix]).isEmpty)
            #expect(try runtime.historyKinds(of: name) == [.started, .activityScheduled, .timerStarted, .timerFired,
                                                 .activityCancelRequested, .completed])
            let activities = try runtime.exportHistory(of: name).activities()
            #expect(activities.count == 1)
            #expect(activities.first?.cancelRequested == true)
            guard case .failure(let failure)? = activities.first?.outcome else {
                Issue.record("the cancelled activity's outcome is \(String(describing: activities.first?.outcome))")
                return
            }
            #expect(failure.reason == .cancelled)
            // The code that cancels replays the history; the first version, which waited, does not.
            let history = try runtime.exportHistory(of: name)
            _ = try history.replay(as: RaceStep.self)
            let diverged = Result { () throws(EntityError) in _ = try history.replay(as: RaceStepWithoutCancel.self) }
            guard case .failure(let error) = diverged else {
                Issue.record("a run that no longer cancels the activity replayed the history without a complaint")
                return
            }
            #expect(error.code == .nondeterminism)
            #expect("\(error)".contains("CancelActivity"))
        }
        // Reopened later: the cancelled activity is not owed, so nothing runs again.
        clock.advance(by: .seconds(3_600))
        let reopened = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { reopened.close() }
        #expect(try await reopened.entity(RaceStep.self, id: "race").result() == "deadline,step-failed:cancelled")
        await reopened.untilIdle()
        #expect(try reopened.journal.tasks(prefix: [ActivityTask.keyPrefix]).isEmpty)
        #expect(log.all.map(\.number) == [1])
    }

    @Test("an activity started in an async let that is never awaited is cancelled when the body returns: activityCancelRequested before completed, the attempt cancelled, no task left")
    func unawaitedAsyncLetIsCancelled() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let silence = Silence()
        defer { silence.finish() }
        let (stub, events) = StallingStep.make(clock: clock, log: AttemptLog(), silence: silence)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { runtime.close() }
        let job = runtime.entity(UnawaitedStep.self, id: "u")
        try await job.start("w")
        var iterator = events.makeAsyncIterator()
        #expect(await iterator.next() == "started")
        clock.advance(by: .seconds(60))
        #expect(try await job.result() == "slept")
        #expect(await iterator.next() == "cancelled")
        await runtime.untilIdle()
        #expect(try runtime.journal.tasks(prefix: [ActivityTask.keyPrefix]).isEmpty)
        // The async let's task runs once the body suspends: its activity is scheduled after the timer.
        let recorded = try runtime.historyKinds(of: EntityName(type: UnawaitedStep.entityType, id: "u"))
        #expect(recorded == [.started, .timerStarted, .activityScheduled, .timerFired, .activityCancelRequested, .completed],
                "\(recorded)")
    }

    @Test("a durable timer raced against an activity that ends first is cancelled with the task that slept: the sleep throws CancellationError, timerCancelled is recorded, the timer's row goes in the same commit, and it never fires")
    func losingTimerIsCancelled() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock),
                                        activities: [ActivityStub<Step> { label, _ in "ran:\(label)" }])
        defer { runtime.close() }
        let name = EntityName(type: RaceStep.entityType, id: "quick")
        #expect(try await runtime.entity(RaceStep.self, id: "quick").execute("y") == "step:ran:y,sleep-cancelled")
        #expect(try runtime.journal.timers().isEmpty)
        let recorded = try runtime.historyKinds(of: name)
        #expect(recorded == [.started, .activityScheduled, .timerStarted, .activityCompleted, .timerCancelled, .completed])
        clock.advance(by: .seconds(7_200))
        await runtime.untilIdle()
        #expect(try runtime.historyKinds(of: name) == recorded)
    }

    @Test("waits started by a task already cancelled fail at once with nothing recorded: an activity (pool or local) with ActivityFailure(cancelled), a sleep, conditions, executeChild and a fan-out with CancellationError (no child starts); the run goes on")
    func cancelledTaskSchedulesNothing() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            return "ran:\(label)"
        }])
        defer { runtime.close() }
        // The children's type is registered, so a child start would not wait for it.
        _ = runtime.entity(SleepyChild.self, id: "never-z")
        let result = try await runtime.entity(CancelledBeforeWaiting.self, id: "early").execute("z")
        #expect(result == "activity-cancelled,activity-cancelled,cancelled,cancelled,cancelled,cancelled,cancelled|ran:z")
        #expect(try runtime.historyKinds(of: EntityName(type: CancelledBeforeWaiting.entityType, id: "early"))
                == [.started, .activityScheduled, .activityCompleted, .completed])
        #expect(log.all.count == 1)
        #expect(try runtime.journal.timers().isEmpty)
        // Neither the child nor the fan-out started one.
        await runtime.untilIdle()
        #expect(try runtime.entityIDs(of: SleepyChild.self).isEmpty)
    }

    @Test("a wait for a child's result raced against a durable timer is cancelled when the timer fires first; the child, left to run on its own, goes on and finishes")
    func childWaitIsCancelled() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock))
        defer { runtime.close() }
        let parent = runtime.entity(ChildOrDeadline.self, id: "p")
        try await parent.start("c")
        let child = runtime.entity(SleepyChild.self, id: "child-of-p")
        // Idle once the child's start, handed over by the parent's commit, is committed too.
        await runtime.untilIdle()
        #expect(try runtime.journal.timers().count == 2)
        clock.advance(by: .seconds(60))
        #expect(try await parent.result() == "deadline,child-wait-cancelled")
        let kinds = try runtime.historyKinds(of: EntityName(type: ChildOrDeadline.entityType, id: "p"))
        #expect(kinds == [.started, .childStarted, .timerStarted, .timerFired, .completed])
        clock.advance(by: .seconds(3_600))
        #expect(try await withDeadline(seconds: 60) { try await child.result() } == "woke:c")
    }
    /// What `child.result()` throws (`nil` if it answers): a child asked to cancel ends failed. A
    /// deadline passing is rethrown, so a child that never ends fails the test.
    func failure(of child: EntityRef<SleepyChild>) async throws -> (any Error)? {
        do {
            _ = try await withDeadline(seconds: 60) { try await child.result() }
            return nil
        } catch let error as DeadlineExceeded {
            throw error
        } catch {
            return error
        }
    }

    @Test("executeChild raced against a durable timer that fires first: the cancelled wait throws CancellationError and asks the child to cancel (childCancelRequested), which ends the child's sleep; the code replays its history")
    func executeChildWaitCancelsTheChild() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock))
        defer { runtime.close() }
        let name = EntityName(type: ExecuteChildOrDeadline.entityType, id: "p")
        let parent = runtime.entity(ExecuteChildOrDeadline.self, id: "p")
        try await parent.start("c")
        // The child's type is registered (its start would wait for it otherwise).
        let child = runtime.entity(SleepyChild.self, id: "child-of-p")
        // Idle once the child's start, handed over by the parent's commit, is committed too.
        await runtime.untilIdle()
        #expect(try runtime.journal.timers().count == 2)
        clock.advance(by: .seconds(60))
        #expect(try await parent.result() == "deadline,child-cancelled")
        // The child's hour-long sleep ended with the request, not with time: the clock has moved 60 s.
        // Its body let the CancellationError end the run: the run was cancelled.
        let failure = try await failure(of: child)
        #expect((failure as? EntityError)?.code == .cancelled)
        #expect(((failure as? EntityError)?.underlying as? WorkflowFailure)?.isCancellation == true)
        #expect(String(describing: failure).contains("CancellationError"))
        let childKinds = try runtime.historyKinds(of: EntityName(type: SleepyChild.entityType, id: "child-of-p"))
        #expect(childKinds.contains(.cancelRequested))
        #expect(childKinds.contains(.timerCancelled))
        await runtime.untilIdle()
        #expect(try runtime.journal.timers().isEmpty)
        // The request went out with the parent's last turn; the child's outcome is recorded after it.
        #expect(try runtime.historyKinds(of: name) == [.started, .childStarted, .timerStarted, .timerFired, .childCancelRequested, .completed, .childFailed])
        _ = try runtime.exportHistory(of: name).replay(as: ExecuteChildOrDeadline.self)
    }

    @Test("a fan-out raced against a durable timer that fires first: its two running children are asked to cancel, the third never starts, and the fan-out throws CancellationError")
    func cancelledFanOutCancelsItsChildren() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock))
        defer { runtime.close() }
        let name = EntityName(type: FanOutOrDeadline.entityType, id: "f")
        let parent = runtime.entity(FanOutOrDeadline.self, id: "f")
        try await parent.start("c")
        let children = (0..<3).map { runtime.entity(SleepyChild.self, id: "fan-\($0)-of-f") }
        await runtime.untilIdle()
        #expect(try runtime.journal.timers().count == 3)
        #expect(try runtime.entityIDs(of: SleepyChild.self) == ["fan-0-of-f", "fan-1-of-f"])
        clock.advance(by: .seconds(60))
        #expect(try await parent.result() == "deadline,fan-out-cancelled")
        for child in children.prefix(2) {
            #expect(String(describing: try await failure(of: child)).contains("CancellationError"))
        }
        await runtime.untilIdle()
        let recorded = try runtime.historyKinds(of: name)
        #expect(recorded.filter { $0 == .childStarted }.count == 2)
        #expect(Array(recorded.drop { $0 != .timerFired })
                == [.timerFired, .childCancelRequested, .childCancelRequested, .completed, .childFailed, .childFailed])
        #expect(try runtime.entityIDs(of: SleepyChild.self) == ["fan-0-of-f", "fan-1-of-f"])
        #expect(try runtime.journal.timers().isEmpty)
        _ = try runtime.exportHistory(of: name).replay(as: FanOutOrDeadline.self)
    }
}
