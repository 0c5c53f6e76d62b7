@testable import DurableEntities
import DurableEntitiesTesting
import Foundation
import Testing

/// Fans out inside its body with `async let`: two branches, each a timer and a side effect.
struct FanOut: EntityWorkflow {
    struct State: Codable, Sendable {}
    struct Input: Codable, Sendable {}
    static func initialState(id: String) -> State { State() }
    static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> [String] {
        async let slow: String = {
            try await context.sleep(for: .seconds(30))
            return try context.sideEffect { "slow-\(UUID().uuidString.prefix(4))" }
        }()
        async let fast: String = {
            try await context.sleep(for: .seconds(10))
            return try context.sideEffect { "fast-\(UUID().uuidString.prefix(4))" }
        }()
        return try await [fast, slow]
    }
}

/// Waits for approval; when cancelled, records its compensation and ends.
struct Cancellable: EntityWorkflow {
    struct State: Codable, Sendable, Equatable { var approved = false; var compensated = false }
    enum Signal: Codable, Sendable { case approve }
    struct Input: Codable, Sendable {}
    static func initialState(id: String) -> State { State() }
    static func handle(_ signal: Signal, state: inout State, context: EntityContext) throws { state.approved = true }
    static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> String {
        do {
            try await context.condition { $0.approved }
            return "approved"
        } catch is CancellationError {
            try await context.sleep(for: .seconds(5))   // compensation may still wait on timers
            context.updateState { $0.compensated = true }
            return "compensated"
        }
    }
}

@Suite("Workflow replay")
struct WorkflowReplayTests {
    func configuration(_ directory: TemporaryDirectory, _ clock: TestClock) -> EntityRuntime.Configuration {
        EntityRuntime.Configuration.quiet(directory, clock)
    }

    @Test("async let inside a body is deterministic: a crash mid-way and a replay give the same result")
    func structuredConcurrency() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let configuration = configuration(directory, clock)
        let runtime = try EntityRuntime(configuration: configuration)
        let fanOut = runtime.entity(FanOut.self, id: "f-1")
        try await fanOut.start(.init())
        clock.advance(by: .seconds(10))   // the fast branch's timer
        // Crash with the slow branch still waiting, then let it finish in the new runtime.
        let reopened = try runtime.crashAndReopen(configuration: configuration)
        defer { reopened.close() }
        clock.skipsTimeWhenIdle = true
        let result = try await reopened.entity(FanOut.self, id: "f-1").result()
        #expect(result.count == 2 && result[0].hasPrefix("fast-") && result[1].hasPrefix("slow-"))
        // Replaying the exported history gives the same commands (no nondeterminism).
        let history = try reopened.exportHistory(of: EntityName(type: "FanOut", id: "f-1"))
        _ = try history.replay(as: FanOut.self)
        // And a cold reactivation returns the recorded side effects, not new ones.
        let again = try reopened.crashAndReopen(configuration: configuration)
        defer { again.close() }
        #expect(try await again.entity(FanOut.self, id: "f-1").result() == result)
    }

    @Test("cancel is cooperative: the body sees CancellationError, compensates, and its outcome is durable")
    func cooperativeCancel() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: true)
        let configuration = configuration(directory, clock)
        let runtime = try EntityRuntime(configuration: configuration)
        let job = runtime.entity(Cancellable.self, id: "c-1")
        try await job.start(.init())
        try await job.cancel()
        #expect(try await job.result() == "compensated")
        #expect(try await job.query { $0 } == Cancellable.State(approved: false, compensated: true))
        let reopened = try runtime.crashAndReopen(configuration: configuration)
        defer { reopened.close() }
        #expect(try await reopened.entity(Cancellable.self, id: "c-1").result() == "compensated")
    }

    @Test("a golden history (JSON, committed) replays under the guarded change and fails under the unguarded one")
    func goldenHistory() async throws {
        let golden = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Histories/flow-v1.json").path
        // The golden file was exported from Flow.V1 with a test clock (deterministic times):
        // regenerate it with DE_WRITE_GOLDEN=1 if the history format changes on purpose.
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: true)
        let runtime = try EntityRuntime(configuration: configuration(directory, clock))
        let flow = runtime.entity(Flow.V1.self, id: "golden")
        try await flow.start(.init())
        #expect(try await flow.result() == "timer-then-effect:token")
        let exported = try runtime.exportHistory(of: flow.name)
        runtime.close()
        if ProcessInfo.processInfo.environment["DE_WRITE_GOLDEN"] == "1" { try HistoryFiles.save(exported, to: golden) }
        let history = try HistoryFiles.load(golden)
        #expect(history == exported, "the history format changed; regenerate the golden file on purpose")

        _ = try history.replay(as: Flow.V1.self)
        _ = try history.replay(as: Flow.V3.self)
        let error = #expect(throws: EntityError.self) { try history.replay(as: Flow.V2.self) }
        #expect(error?.code == .nondeterminism)
        #expect((error?.underlying as? NondeterminismError)?.sequence == 2)
    }
}
