@_spi(Testing) @testable import DurableEntities
import DurableEntitiesTesting
import Foundation
import TestSupport
import Testing

extension ChildCancellationType {
    /// The type named `label` (the test workflows take it as their input).
    init(label: String) {
        switch label {
        case "wait": self = .waitCancellationCompleted
        case "abandon": self = .abandon
        default: self = .tryCancel
        }
    }
}

/// A child that sleeps an hour and answers "woke"; asked to cancel, it cleans up for ten minutes
/// (a durable timer of its own) and answers "cleaned" — it finishes anyway.
struct CleaningChild: EntityWorkflow {
    struct State: Codable, Sendable {}
    typealias Input = String
    static func initialState(id: String) -> State { State() }
    static func run(_ input: String, context: WorkflowContext<Self>) async throws -> String {
        do {
            try await context.sleep(for: .seconds(3_600))
            return "woke:\(input)"
        } catch is CancellationError {
            try await context.sleep(for: .seconds(600))
            return "cleaned:\(input)"
        }
    }
}

/// Races `executeChild` (the cancellation type named by the input, parent-close policy `abandon`)
/// against 60 seconds. The child is a ``CleaningChild`` for ids starting "clean", else a
/// ``SleepyChild`` (which lets the cancellation end its run). For ids starting "handle" the
/// ``CleaningChild`` is started first and its handle's `result(cancellationType:)` races instead.
struct TypedChildOrDeadline: EntityWorkflow {
    struct State: Codable, Sendable {}
    typealias Input = String
    static func initialState(id: String) -> State { State() }
    static func run(_ label: String, context: WorkflowContext<Self>) async throws -> String {
        let type = ChildCancellationType(label: label)
        let childID = "child-of-\(context.id)"
        return try await RaceStep.race(context) {
            do {
                let output = if context.id.hasPrefix("handle") {
                    try await context.startChild(CleaningChild.self, id: childID, input: label, parentClosePolicy: .abandon)
                        .result(cancellationType: type)
                } else if context.id.hasPrefix("clean") {
                    try await context.executeChild(CleaningChild.self, id: childID, input: label, parentClosePolicy: .abandon,
                                                   cancellationType: type)
                } else {
                    try await context.executeChild(SleepyChild.self, id: childID, input: label, parentClosePolicy: .abandon,
                                                   cancellationType: type)
                }
                return "child:" + output
            } catch is CancellationError {
                return "child-cancelled"
            } catch let failure as ChildFailure {
                return "child-failed:\(failure.reason)"
            }
        }
    }
}

/// Awaits a ``CleaningChild`` in the body's own task, with the cancellation type named by the
/// input; reports what the wait gave and whether the run's cancellation was requested.
struct AwaitsCleaningChild: EntityWorkflow {
    struct State: Codable, Sendable {}
    typealias Input = String
    static func initialState(id: String) -> State { State() }
    static func run(_ label: String, context: WorkflowContext<Self>) async throws -> String {
        let outcome: String
        do {
            outcome = try await context.executeChild(CleaningChild.self, id: "child-of-\(context.id)", input: label,
                                                     parentClosePolicy: .abandon, cancellationType: .init(label: label))
        } catch is CancellationError {
            outcome = "wait-cancelled"
        }
        return "\(outcome);cancelled=\(context.isCancellationRequested)"
    }
}

/// A fan-out of three ``CleaningChild``ren, two at a time, with the cancellation type named by the
/// input, raced against 60 seconds (ids starting "race"), or awaited alone otherwise (the run's
/// cancellation is then what cancels it).
struct TypedFanOut: EntityWorkflow {
    struct State: Codable, Sendable {}
    typealias Input = String
    static func initialState(id: String) -> State { State() }
    static func run(_ label: String, context: WorkflowContext<Self>) async throws -> String {
        let children = (0..<3).map { (id: "fan-\($0)-of-\(context.id)", input: label) }
        @Sendable func fanOut() async throws -> String {
            do {
                let outcomes = try await context.fanOut(CleaningChild.self, children, maxConcurrent: 2, parentClosePolicy: .abandon,
                                                        cancellationType: .init(label: label))
                return "fan-out:" + outcomes.map { (try? $0.get()) ?? "failed" }.joined(separator: "|")
            } catch is CancellationError {
                return "fan-out-cancelled"
            }
        }
        guard context.id.hasPrefix("race") else { return try await fanOut() }
        return try await RaceStep.race(context) { try await fanOut() }
    }
}

@Suite("Child cancellation types", .timeLimit(.minutes(10)))
struct ChildCancellationTypeTests {
    /// A runtime on a fresh directory and a test clock that moves only when told.
    struct Harness {
        let directory = TemporaryDirectory()
        let clock = TestClock(skipsTimeWhenIdle: false)
        let runtime: EntityRuntime

        init() throws {
            runtime = try EntityRuntime(configuration: .quiet(directory, clock))
        }

        func close() {
            runtime.close()
            directory.remove()
        }

        func kinds<W: EntityWorkflow>(_ type: W.Type, _ id: String) throws -> [HistoryEvent.Kind] {
            try runtime.historyKinds(of: EntityName(type: W.entityType, id: id))
        }
    }

    @Test("waitCancellationCompleted: the cancelled wait asks the child to cancel and lasts until the child has ended; a child that cleans up and finishes anyway gives its output; the history replays (executeChild, and a started child's handle)",
          arguments: ["clean", "handle"])
    func waitReturnsTheOutputOfAChildThatFinishesAnyway(_ id: String) async throws {
        let harness = try Harness()
        defer { harness.close() }
        let runtime = harness.runtime
        let parent = runtime.entity(TypedChildOrDeadline.self, id: id)
        try await parent.start("wait")
        let child = runtime.entity(CleaningChild.self, id: "child-of-\(id)")
        await runtime.untilIdle()
        await runtime.advance(harness.clock, by: .seconds(60))
        // The request is recorded and delivered; the parent still waits while the child cleans up.
        #expect(try harness.kinds(TypedChildOrDeadline.self, id)
                == [.started, .childStarted, .timerStarted, .timerFired, .childCancelRequested])
        #expect(try harness.kinds(CleaningChild.self, "child-of-\(id)")
                == [.parentLinked, .started, .timerStarted, .cancelRequested, .timerCancelled, .timerStarted])
        harness.clock.advance(by: .seconds(600))
        #expect(try await withDeadline(seconds: 60) { try await parent.result() } == "deadline,child:cleaned:wait")
        #expect(try await child.result() == "cleaned:wait")
        await runtime.untilIdle()
        #expect(try harness.kinds(TypedChildOrDeadline.self, id)
                == [.started, .childStarted, .timerStarted, .timerFired, .childCancelRequested, .childCompleted, .completed])
        _ = try runtime.exportHistory(of: EntityName(type: TypedChildOrDeadline.entityType, id: id))
            .replay(as: TypedChildOrDeadline.self)
    }

    @Test("waitCancellationCompleted: a child that lets the cancellation end it ends the wait with its ChildFailure (reason cancelled), recorded before the parent completes (tryCancel, the control, completes first)")
    func waitThrowsTheFailureOfAChildThatStops() async throws {
        let harness = try Harness()
        defer { harness.close() }
        let runtime = harness.runtime
        let waiting = runtime.entity(TypedChildOrDeadline.self, id: "w")
        let trying = runtime.entity(TypedChildOrDeadline.self, id: "t")
        try await waiting.start("wait")
        try await trying.start("try")
        _ = runtime.entity(SleepyChild.self, id: "child-of-w")
        await runtime.untilIdle()
        harness.clock.advance(by: .seconds(60))
        #expect(try await withDeadline(seconds: 60) { try await waiting.result() } == "deadline,child-failed:cancelled")
        #expect(try await withDeadline(seconds: 60) { try await trying.result() } == "deadline,child-cancelled")
        await runtime.untilIdle()
        #expect(try harness.kinds(TypedChildOrDeadline.self, "w")
                == [.started, .childStarted, .timerStarted, .timerFired, .childCancelRequested, .childFailed, .completed])
        #expect(try harness.kinds(TypedChildOrDeadline.self, "t")
                == [.started, .childStarted, .timerStarted, .timerFired, .childCancelRequested, .completed, .childFailed])
        #expect(try harness.kinds(SleepyChild.self, "child-of-w").contains(.cancelRequested))
        #expect(try runtime.journal.timers().isEmpty)
        for id in ["w", "t"] {
            _ = try runtime.exportHistory(of: EntityName(type: TypedChildOrDeadline.entityType, id: id)).replay(as: TypedChildOrDeadline.self)
        }
    }

    @Test("abandon: the cancelled wait throws CancellationError at once, nothing is recorded for the child, and the child sleeps on and finishes")
    func abandonLeavesTheChildAlone() async throws {
        let harness = try Harness()
        defer { harness.close() }
        let runtime = harness.runtime
        let parent = runtime.entity(TypedChildOrDeadline.self, id: "a")
        try await parent.start("abandon")
        let child = runtime.entity(SleepyChild.self, id: "child-of-a")
        await runtime.untilIdle()
        harness.clock.advance(by: .seconds(60))
        #expect(try await withDeadline(seconds: 60) { try await parent.result() } == "deadline,child-cancelled")
        await runtime.untilIdle()
        #expect(try harness.kinds(TypedChildOrDeadline.self, "a") == [.started, .childStarted, .timerStarted, .timerFired, .completed])
        #expect(try !harness.kinds(SleepyChild.self, "child-of-a").contains(.cancelRequested))
        harness.clock.advance(by: .seconds(3_600))
        #expect(try await withDeadline(seconds: 60) { try await child.result() } == "woke:abandon")
    }

    @Test("the run's cancellation: a waitCancellationCompleted wait in the body's own task asks the child to cancel and returns its output once it finished, with isCancellationRequested set; a tryCancel wait (the control) throws at once and asks nothing")
    func runCancellationWaitsForTheChild() async throws {
        let harness = try Harness()
        defer { harness.close() }
        let runtime = harness.runtime
        let waiting = runtime.entity(AwaitsCleaningChild.self, id: "w")
        let trying = runtime.entity(AwaitsCleaningChild.self, id: "t")
        try await waiting.start("wait")
        try await trying.start("try")
        _ = ["w", "t"].map { runtime.entity(CleaningChild.self, id: "child-of-\($0)") }
        await runtime.untilIdle()
        try await waiting.cancel()
        try await trying.cancel()
        #expect(try await withDeadline(seconds: 60) { try await trying.result() } == "wait-cancelled;cancelled=true")
        await runtime.untilIdle()
        #expect(try harness.kinds(AwaitsCleaningChild.self, "w") == [.started, .childStarted, .cancelRequested, .childCancelRequested])
        #expect(try harness.kinds(AwaitsCleaningChild.self, "t") == [.started, .childStarted, .cancelRequested, .completed])
        // The control's child was not asked: it sleeps on.
        #expect(try !harness.kinds(CleaningChild.self, "child-of-t").contains(.cancelRequested))
        harness.clock.advance(by: .seconds(600))
        #expect(try await withDeadline(seconds: 60) { try await waiting.result() } == "cleaned:wait;cancelled=true")
        await runtime.untilIdle()
        #expect(try harness.kinds(AwaitsCleaningChild.self, "w")
                == [.started, .childStarted, .cancelRequested, .childCancelRequested, .childCompleted, .completed])
        _ = try runtime.exportHistory(of: EntityName(type: AwaitsCleaningChild.entityType, id: "w")).replay(as: AwaitsCleaningChild.self)
    }

    @Test("a waitCancellationCompleted wait survives a restart: reopened while the child cleans up, the parent replays the request without sending it again and gets the child's output")
    func waitSurvivesARestart() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        do {
            let runtime = try EntityRuntime(configuration: .quiet(directory, clock))
            defer { runtime.close() }
            try await runtime.entity(AwaitsCleaningChild.self, id: "p").start("wait")
            _ = runtime.entity(CleaningChild.self, id: "child-of-p")
            await runtime.untilIdle()
            try await runtime.entity(AwaitsCleaningChild.self, id: "p").cancel()
            await runtime.untilIdle()
            #expect(try runtime.historyKinds(of: EntityName(type: CleaningChild.entityType, id: "child-of-p")).last == .timerStarted)
        }
        let reopened = try EntityRuntime(configuration: .quiet(directory, clock))
        defer { reopened.close() }
        let parent = reopened.entity(AwaitsCleaningChild.self, id: "p")
        _ = reopened.entity(CleaningChild.self, id: "child-of-p")
        await reopened.untilIdle()
        clock.advance(by: .seconds(600))
        #expect(try await withDeadline(seconds: 60) { try await parent.result() } == "cleaned:wait;cancelled=true")
        await reopened.untilIdle()
        #expect(try reopened.historyKinds(of: EntityName(type: AwaitsCleaningChild.entityType, id: "p"))
                == [.started, .childStarted, .cancelRequested, .childCancelRequested, .childCompleted, .completed])
        // Delivered once: the child recorded one request.
        #expect(try reopened.historyKinds(of: EntityName(type: CleaningChild.entityType, id: "child-of-p"))
            .filter { $0 == .cancelRequested }.count == 1)
    }

    @Test("a fan-out raced against a deadline with waitCancellationCompleted: the two running children are asked to cancel, the third never starts, and the fan-out throws CancellationError only once both have cleaned up")
    func fanOutWaitsForItsCancelledChildren() async throws {
        let harness = try Harness()
        defer { harness.close() }
        let runtime = harness.runtime
        let parent = runtime.entity(TypedFanOut.self, id: "race")
        try await parent.start("wait")
        _ = (0..<3).map { runtime.entity(CleaningChild.self, id: "fan-\($0)-of-race") }
        await runtime.untilIdle()
        await runtime.advance(harness.clock, by: .seconds(60))
        #expect(Array(try harness.kinds(TypedFanOut.self, "race").drop { $0 != .timerFired })
                == [.timerFired, .childCancelRequested, .childCancelRequested])
        harness.clock.advance(by: .seconds(600))
        #expect(try await withDeadline(seconds: 60) { try await parent.result() } == "deadline,fan-out-cancelled")
        await runtime.untilIdle()
        #expect(Array(try harness.kinds(TypedFanOut.self, "race").drop { $0 != .timerFired })
                == [.timerFired, .childCancelRequested, .childCancelRequested, .childCompleted, .childCompleted, .completed])
        #expect(try runtime.entityIDs(of: CleaningChild.self) == ["fan-0-of-race", "fan-1-of-race"])
        _ = try runtime.exportHistory(of: EntityName(type: TypedFanOut.entityType, id: "race")).replay(as: TypedFanOut.self)
    }

    @Test("a fan-out with waitCancellationCompleted and the run's cancellation: the running children are asked to cancel, no further child starts once they ended, and the fan-out throws CancellationError")
    func fanOutStopsOnTheRunsCancellation() async throws {
        let harness = try Harness()
        defer { harness.close() }
        let runtime = harness.runtime
        let parent = runtime.entity(TypedFanOut.self, id: "run")
        try await parent.start("wait")
        _ = (0..<3).map { runtime.entity(CleaningChild.self, id: "fan-\($0)-of-run") }
        await runtime.untilIdle()
        try await parent.cancel()
        await runtime.untilIdle()
        #expect(Array(try harness.kinds(TypedFanOut.self, "run").drop { $0 != .cancelRequested })
                == [.cancelRequested, .childCancelRequested, .childCancelRequested])
        harness.clock.advance(by: .seconds(600))
        #expect(try await withDeadline(seconds: 60) { try await parent.result() } == "fan-out-cancelled")
        await runtime.untilIdle()
        #expect(try runtime.entityIDs(of: CleaningChild.self) == ["fan-0-of-run", "fan-1-of-run"])
        _ = try runtime.exportHistory(of: EntityName(type: TypedFanOut.entityType, id: "run")).replay(as: TypedFanOut.self)
    }

    @Test("a fan-out raced against a deadline with abandon: it throws at once, its children are not asked to cancel and finish on their own; with no cancellation a waitCancellationCompleted fan-out collects every output")
    func fanOutAbandonsItsChildren() async throws {
        let harness = try Harness()
        defer { harness.close() }
        let runtime = harness.runtime
        let abandoning = runtime.entity(TypedFanOut.self, id: "race-a")
        let plain = runtime.entity(TypedFanOut.self, id: "plain")
        try await abandoning.start("abandon")
        try await plain.start("wait")
        let children = (0..<3).map { runtime.entity(CleaningChild.self, id: "fan-\($0)-of-race-a") }
        _ = (0..<3).map { runtime.entity(CleaningChild.self, id: "fan-\($0)-of-plain") }
        await runtime.untilIdle()
        harness.clock.advance(by: .seconds(60))
        #expect(try await withDeadline(seconds: 60) { try await abandoning.result() } == "deadline,fan-out-cancelled")
        await runtime.untilIdle()
        #expect(try !harness.kinds(TypedFanOut.self, "race-a").contains(.childCancelRequested))
        harness.clock.advance(by: .seconds(3_600))
        for child in children.prefix(2) {
            #expect(try await withDeadline(seconds: 60) { try await child.result() } == "woke:abandon")
        }
        // The plain fan-out's third child started when the first two ended; one more hour ends it.
        await runtime.untilIdle()
        harness.clock.advance(by: .seconds(3_600))
        #expect(try await withDeadline(seconds: 60) { try await plain.result() } == "fan-out:woke:wait|woke:wait|woke:wait")
        #expect(try runtime.entityIDs(of: CleaningChild.self).count == 5)
    }
}
