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

extension Flow {
    /// Version 4 asks about the same change twice: before the timer and after it.
    struct V4: EntityWorkflow {
        typealias State = Flow.State
        typealias Input = Flow.Input
        static var entityType: String { "Flow" }
        static func initialState(id: String) -> State { State() }
        static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> String {
            let first = try context.version("effect-first", minSupported: 0, maxSupported: 1)
            try await context.sleep(for: .seconds(60))
            let second = try context.version("effect-first", minSupported: 0, maxSupported: 1)
            let token = try context.sideEffect { "token" }
            return "\(first)-\(second):\(token)"
        }
    }
}

@Suite("Deterministic replay")
struct NondeterminismTests {
    func runtime(_ directory: TemporaryDirectory, _ clock: TestClock, _ type: any EntityWorkflow.Type) throws -> EntityRuntime {
        let configuration = EntityRuntime.Configuration.quiet(directory, clock)
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

    @Test("a run that began before a change keeps its default version at every call, live ones after the replay included, and replays again")
    func versionDefaultHoldsForTheRun() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        _ = try await startWithV1(directory, clock)

        let runtime = try runtime(directory, clock, Flow.V4.self)
        defer { runtime.close() }
        let old = runtime.entity(Flow.V4.self, id: "flow-1")
        let new = runtime.entity(Flow.V4.self, id: "flow-2")
        try await new.start(.init())
        clock.skipsTimeWhenIdle = true
        // flow-1's first call is replayed (its history has no marker), its second runs live.
        #expect(try await old.result() == "0-0:token")
        #expect(try await new.result() == "1-1:token")
        let oldEvents = try runtime.journal.events(of: try #require(try runtime.journal.key(for: old.name)))
        #expect(!oldEvents.contains { $0.payload.withUnsafeBytes { HistoryEvent.decode($0)?.kind } == .versionMarker })
        // Both histories replay under the same code (a marker recorded by the live call would make the
        // replay take the new branch at the first call, against the recorded timer).
        _ = try runtime.exportHistory(of: old.name).replay(as: Flow.V4.self)
        _ = try runtime.exportHistory(of: new.name).replay(as: Flow.V4.self)
    }

    @Test("a due timer of an entity that fails to load is set aside once, not handed over again and again")
    func timerOfFailedEntityIsSetAside() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        _ = try await startWithV1(directory, clock)
        // The unguarded change: flow-1 fails to load, and its 60-second timer falls due.
        let runtime = try runtime(directory, clock, Flow.V2.self)
        defer { runtime.close() }
        let timers = runtime.core.timers
        clock.advance(by: .seconds(61))
        let setAside = await Task.detached { timers.park(timeout: .seconds(60)) { $0.inFlight == 0 && timers.deliveries >= 1 } }.value
        let first = try #require(setAside, "the timer was handed over and set aside")
        #expect(timers.deliveries == 1)
        // Looking again (as any new timer or clock move makes the loop do) hands it over no more.
        timers.wake()
        let again = await Task.detached { timers.park(timeout: .seconds(60)) { $0.parkings > first.parkings } }.value
        #expect(again != nil)
        #expect(timers.deliveries == 1)
        let error = await #expect(throws: EntityError.self) { try await runtime.entity(Flow.V2.self, id: "flow-1").result() }
        #expect(error?.code == .nondeterminism)
        #expect(try runtime.journal.timers().count == 1, "the timer stays stored for the next open")
    }
}
