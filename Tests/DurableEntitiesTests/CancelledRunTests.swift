@_spi(Testing) @testable import DurableEntities
import DurableEntitiesTesting
import Foundation
import TestSupport
import Testing

/// Sleeps an hour ("woke"), or for mode "activity" awaits a ``Step`` (a stalling stub in these
/// tests). When the wait throws, the mode says what the body does: "return" answers "stopped" with
/// whether its cancellation was requested, "other" throws ``Refused``, anything else lets the error
/// out. Mode "unasked" throws `CancellationError` at once, with no request.
struct CancellableRun: EntityWorkflow {
    struct State: Codable, Sendable {}
    typealias Input = String
    struct Refused: Error {}
    static func initialState(id: String) -> State { State() }
    static func run(_ mode: String, context: WorkflowContext<Self>) async throws -> String {
        if mode == "unasked" { throw CancellationError() }
        do {
            if mode == "activity" { return try await context.execute(Step.self, "x") }
            try await context.sleep(for: .seconds(3_600))
            return "woke"
        } catch {
            switch mode {
            case "return": return "stopped:\(context.isCancellationRequested)"
            case "other": throw Refused()
            default: throw error
            }
        }
    }
}

/// Runs a ``CancellableRun`` child (its input is this run's) and answers with its output, or with
/// "child-" and its ``ChildFailure``'s reason.
struct AwaitsCancellableRun: EntityWorkflow {
    struct State: Codable, Sendable {}
    typealias Input = String
    static func initialState(id: String) -> State { State() }
    static func run(_ mode: String, context: WorkflowContext<Self>) async throws -> String {
        do {
            return try await context.executeChild(CancellableRun.self, id: "child-of-\(context.id)", input: mode)
        } catch let failure as ChildFailure {
            return "child-\(failure.reason)"
        }
    }
}

@Suite("Cancelled runs", .timeLimit(.minutes(10)))
struct CancelledRunTests {
    /// What `result()` throws (`nil` if it answers); a deadline passing is rethrown.
    func failure<W: EntityWorkflow>(of entity: EntityRef<W>) async throws -> EntityError? {
        do {
            _ = try await withDeadline(seconds: 60) { try await entity.result() }
            return nil
        } catch let error as EntityError {
            return error
        }
    }

    @Test("a run whose body lets the cancellation out ends cancelled: the history's last event is cancelled, result() throws EntityError.cancelled carrying a WorkflowFailure marked as a cancellation — from memory, and from disk after a reopen — and the history replays (a sleep's CancellationError, an activity's ActivityFailure(cancelled))",
          arguments: ["rethrow", "activity"])
    func cancelledRunEndsCancelled(_ mode: String) async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let silence = Silence()
        let (stub, events) = StallingStep.make(clock: clock, log: AttemptLog(), silence: silence)
        let name = EntityName(type: CancellableRun.entityType, id: mode)
        do {
            let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
            defer { runtime.close() }
            defer { silence.finish() }
            let run = runtime.entity(CancellableRun.self, id: mode)
            try await run.start(mode)
            if mode == "activity" {
                // Its attempt runs (and would for ever): the runtime is not idle until it is cancelled.
                var iterator = events.makeAsyncIterator()
                #expect(await iterator.next() == "started")
                try await run.cancel()
                #expect(await iterator.next() == "cancelled")
            } else {
                await runtime.untilIdle()
                try await run.cancel()
            }
            let error = try await failure(of: run)
            #expect(error?.code == .cancelled)
            let recorded = error?.underlying as? WorkflowFailure
            #expect(recorded?.isCancellation == true)
            #expect(recorded?.message.contains(mode == "activity" ? "cancelled" : "CancellationError") == true)
            await runtime.untilIdle()
            let kinds = try runtime.historyKinds(of: name)
            #expect(kinds.last == .cancelled)
            #expect(!kinds.contains(.failed))
            #expect(kinds.contains(.cancelRequested))
            _ = try runtime.exportHistory(of: name).replay(as: CancellableRun.self)
        }
        let reopened = try EntityRuntime(configuration: .quiet(directory, clock), activities: [stub])
        defer { reopened.close() }
        let error = try await failure(of: reopened.entity(CancellableRun.self, id: mode))
        #expect(error?.code == .cancelled)
        #expect((error?.underlying as? WorkflowFailure)?.isCancellation == true)
    }

    @Test("a run is cancelled only if its cancellation was requested and the body let a cancellation out: a body that returns completes, one that throws another error after the request fails, and a CancellationError thrown with no request fails")
    func otherEndsAreNotCancellations() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock))
        defer { runtime.close() }
        let returning = runtime.entity(CancellableRun.self, id: "return")
        let other = runtime.entity(CancellableRun.self, id: "other")
        let unasked = runtime.entity(CancellableRun.self, id: "unasked")
        for (entity, mode) in [(returning, "return"), (other, "other"), (unasked, "unasked")] { try await entity.start(mode) }
        await runtime.untilIdle()
        try await returning.cancel()
        try await other.cancel()
        #expect(try await withDeadline(seconds: 60) { try await returning.result() } == "stopped:true")
        for (entity, message) in [(other, "Refused"), (unasked, "CancellationError")] {
            let error = try await failure(of: entity)
            #expect(error?.code == .rejected)
            let recorded = error?.underlying as? WorkflowFailure
            #expect(recorded?.isCancellation == false)
            #expect(recorded?.message.contains(message) == true)
        }
        await runtime.untilIdle()
        let ends = try ["return", "other", "unasked"].map {
            try runtime.historyKinds(of: EntityName(type: CancellableRun.entityType, id: $0)).last
        }
        #expect(ends == [.completed, .failed, .failed])
    }

    @Test("a child cancelled by another caller: the parent awaiting it with executeChild gets ChildFailure(cancelled) when the child lets the cancellation out, ChildFailure(failed) when it throws something else, and its output when it returns",
          arguments: [("rethrow", "child-cancelled"), ("other", "child-failed"), ("return", "stopped:true")])
    func parentSeesTheChildsCancellation(_ mode: String, _ expected: String) async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock))
        defer { runtime.close() }
        let parent = runtime.entity(AwaitsCancellableRun.self, id: "p")
        try await parent.start(mode)
        let child = runtime.entity(CancellableRun.self, id: "child-of-p")
        await runtime.untilIdle()
        try await child.cancel()
        #expect(try await withDeadline(seconds: 60) { try await parent.result() } == expected)
        await runtime.untilIdle()
        let kinds = try runtime.historyKinds(of: EntityName(type: AwaitsCancellableRun.entityType, id: "p"))
        #expect(kinds == [.started, .childStarted, expected == "stopped:true" ? .childCompleted : .childFailed, .completed])
        _ = try runtime.exportHistory(of: EntityName(type: AwaitsCancellableRun.entityType, id: "p")).replay(as: AwaitsCancellableRun.self)
    }

    @Test("a history written before cancelled runs had their own event (a cancelled run recorded as failed) replays under the new code and keeps its recorded failure; the same history with its cancelled event replays as a cancellation")
    func olderHistoryKeepsItsFailure() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock))
        defer { runtime.close() }
        let run = runtime.entity(CancellableRun.self, id: "old")
        try await run.start("rethrow")
        await runtime.untilIdle()
        try await run.cancel()
        _ = try await failure(of: run)
        let history = try runtime.exportHistory(of: EntityName(type: CancellableRun.entityType, id: "old"))
        #expect(history.events.last?.kind == .cancelled)
        var older = history
        older.events[older.events.count - 1].kind = .failed
        #expect(try replayedFailure(history)?.isCancellation == true)
        let kept = try replayedFailure(older)
        #expect(kept?.isCancellation == false)
        #expect(kept?.message.contains("CancellationError") == true)
    }

    /// The failure a replay of `history` leaves the run with (`nil`: it did not fail).
    func replayedFailure(_ history: ExportedHistory) throws -> WorkflowFailure? {
        let name = EntityName(type: history.entityType, id: history.entityID)
        let events = try history.decodedEvents().map { ($0.sequence, $0.event) }
        var durable = EntityDurable(state: CancellableRun.initialState(id: history.entityID), key: nil, lastSequence: 0,
                                    snapshotSequence: 0, status: .active, run: history.run, runStartSequence: 1)
        try HistoryReplayer<CancellableRun>(name: name, codec: BinaryEntityCodec(), logger: quietLogger).replay(events, into: &durable)
        let run = EntityCell<CancellableRun>.run(durable)
        defer { run?.abandon() }
        guard case .failure(let failure)? = run?.outcome else { return nil }
        return failure
    }
}
