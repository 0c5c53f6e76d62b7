@testable import DurableEntities
import DurableEntitiesTesting
import Foundation
import Testing

/// Three versions of one entity type's code, as a service would deploy them over time.
enum Flow {
    struct State: Codable, Sendable {}
    struct Input: Codable, Sendable {}

    /// Version 1: a timer, then a side effect.
    struct V1: EntityWorkflow {
        typealias State = Flow.State
        typealias Input = Flow.Input
        static var entityType: String { "Flow" }
        static func initialState(id: String) -> State { State() }
        static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> String {
            try await context.sleep(for: .seconds(60))
            let token = try context.sideEffect { "token" }
            return "timer-then-effect:\(token)"
        }
    }

    /// Version 2 reorders the commands with no guard: unsafe for runs in flight.
    struct V2: EntityWorkflow {
        typealias State = Flow.State
        typealias Input = Flow.Input
        static var entityType: String { "Flow" }
        static func initialState(id: String) -> State { State() }
        static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> String {
            let token = try context.sideEffect { "token" }
            try await context.sleep(for: .seconds(60))
            return "effect-then-timer:\(token)"
        }
    }

    /// Version 3 makes the same change behind a version marker: safe.
    struct V3: EntityWorkflow {
        typealias State = Flow.State
        typealias Input = Flow.Input
        static var entityType: String { "Flow" }
        static func initialState(id: String) -> State { State() }
        static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> String {
            if try context.version("effect-first", minSupported: 0, maxSupported: 1) == 1 {
                let token = try context.sideEffect { "token" }
                try await context.sleep(for: .seconds(60))
                return "effect-then-timer:\(token)"
            }
            try await context.sleep(for: .seconds(60))
            let token = try context.sideEffect { "token" }
            return "timer-then-effect:\(token)"
        }
    }
}

@Suite("Deterministic replay")
struct NondeterminismTests {
    func runtime(_ directory: TemporaryDirectory, _ clock: TestClock, _ type: any EntityWorkflow.Type) throws -> EntityRuntime {
        var configuration = EntityRuntime.Configuration(directory: directory.path, clock: clock, logger: quietLogger)
        configuration.journal.logger = quietLogger
        return try EntityRuntime(configuration: configuration, entityTypes: [type])
    }

    /// Starts flow-1 with version 1 and leaves it waiting on its timer; returns the history length.
    func startWithV1(_ directory: TemporaryDirectory, _ clock: TestClock) async throws -> UInt64 {
        let runtime = try runtime(directory, clock, Flow.V1.self)
        defer { runtime.close() }
        try await runtime.entity(Flow.V1.self, id: "flow-1").start(.init())
        let key = try #require(try runtime.journal.key(for: EntityName(type: "Flow", id: "flow-1")))
        return try runtime.journal.latestSequence(of: key)
    }

    @Test("code that issues its commands in another order fails replay with the sequence, side by side")
    func reorderedCommandsFail() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let recorded = try await startWithV1(directory, clock)
        #expect(recorded == 2)  // started, timer started

        let runtime = try runtime(directory, clock, Flow.V2.self)
        defer { runtime.close() }
        let flow = runtime.entity(Flow.V2.self, id: "flow-1")
        let error = await #expect(throws: EntityError.self) { try await flow.result() }
        #expect(error?.code == .nondeterminism)
        let detail = try #require(error?.underlying as? NondeterminismError)
        #expect(detail.sequence == 2)
        #expect(detail.recorded.contains("StartTimer"))
        #expect(detail.issued.contains("SideEffect"))
        #expect("\(detail)".contains("history recorded"))
        // The entity stays failed and visible as such; its history is untouched.
        let again = await #expect(throws: EntityError.self) { try await flow.query { _ in 0 } }
        #expect(again?.code == .nondeterminism)
        let key = try #require(try runtime.journal.key(for: flow.name))
        #expect(try runtime.journal.latestSequence(of: key) == recorded)
    }

    @Test("a version marker lets new code replay old histories on the old branch and take the new one in new runs")
    func versionMarker() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        _ = try await startWithV1(directory, clock)

        let runtime = try runtime(directory, clock, Flow.V3.self)
        defer { runtime.close() }
        let old = runtime.entity(Flow.V3.self, id: "flow-1")
        let new = runtime.entity(Flow.V3.self, id: "flow-2")
        try await new.start(.init())
        clock.skipsTimeWhenIdle = true
        #expect(try await old.result() == "timer-then-effect:token")
        #expect(try await new.result() == "effect-then-timer:token")
        // The new run recorded its marker; the old one did not.
        let newEvents = try runtime.journal.events(of: try #require(try runtime.journal.key(for: new.name)))
        let oldEvents = try runtime.journal.events(of: try #require(try runtime.journal.key(for: old.name)))
        let kinds = { (events: [JournalEvent]) in events.compactMap { $0.payload.withUnsafeBytes { HistoryEvent.decode($0)?.kind } } }
        #expect(kinds(newEvents).contains(.versionMarker))
        #expect(!kinds(oldEvents).contains(.versionMarker))
    }
}
