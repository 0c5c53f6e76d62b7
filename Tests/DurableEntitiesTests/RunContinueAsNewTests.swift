@testable import DurableEntities
import DurableEntitiesTesting
import Foundation
import Testing

/// A run body that loops through runs: each run waits for one more signal than it was started with,
/// counts a tick, and continues as new with the next iteration, until `Ticker.limit`.
struct Ticker: EntityWorkflow {
    static let limit = 10
    struct State: Codable, Sendable, Equatable {
        var signals = 0
        var ticks = 0
        /// The iteration each run was started with, in order.
        var runs: [Int] = []
    }
    enum Signal: Codable, Sendable { case poke }
    static var entityType: String { "Ticker" }
    static func initialState(id: String) -> State { State() }
    static func handle(_ signal: Signal, state: inout State, context: EntityContext) throws { state.signals += 1 }

    static func run(_ iteration: Int, context: WorkflowContext<Self>) async throws -> Int {
        context.updateState { $0.runs.append(iteration) }
        try await context.condition { $0.signals > iteration }
        context.updateState { $0.ticks += 1 }
        if iteration + 1 >= limit { return context.state.ticks }
        try context.continueAsNew(iteration + 1)
    }
}

/// A run body that sleeps between runs (its timers belong to the run that started them).
struct Countdown: EntityWorkflow {
    struct State: Codable, Sendable, Equatable { var laps: [Int] = [] }
    typealias Signal = NoMessage
    static var entityType: String { "Countdown" }
    static func initialState(id: String) -> State { State() }

    static func run(_ remaining: Int, context: WorkflowContext<Self>) async throws -> String {
        context.updateState { $0.laps.append(remaining) }
        guard remaining > 0 else { return "lift-off after \(context.state.laps.count - 1) laps" }
        try await context.sleep(for: .seconds(3_600))
        try context.continueAsNew(remaining - 1)
    }
}

/// A parent that waits for a `Countdown` child: the child's chain of runs reports once, at its end.
struct Launcher: EntityWorkflow {
    struct State: Codable, Sendable, Equatable {}
    typealias Signal = NoMessage
    static var entityType: String { "Launcher" }
    static func initialState(id: String) -> State { State() }

    static func run(_ input: Int, context: WorkflowContext<Self>) async throws -> String {
        try await context.executeChild(Countdown.self, id: "countdown-\(context.id)", input: input)
    }
}

/// A body that continues as new without ever waiting.
struct Spinner: EntityWorkflow {
    struct State: Codable, Sendable, Equatable {}
    typealias Signal = NoMessage
    static var entityType: String { "Spinner" }
    static func initialState(id: String) -> State { State() }
    static func run(_ input: Int, context: WorkflowContext<Self>) async throws -> Int {
        try context.continueAsNew(input + 1)
    }
}

@Suite("Continue-as-new from a run body")
struct RunContinueAsNewTests {
    func configuration(_ directory: TemporaryDirectory, clock: TestClock? = nil) -> EntityRuntime.Configuration {
        var configuration = EntityRuntime.Configuration(directory: directory.path, logger: quietLogger)
        if let clock { configuration.clock = clock }
        configuration.journal.logger = quietLogger
        return configuration
    }

    @Test("a looping body continues as new run after run: every signal counted once, history bounded, result at the end")
    func loopThroughRuns() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let runtime = try EntityRuntime(configuration: configuration(directory), entityTypes: [Ticker.self])
        defer { runtime.close() }
        let ticker = runtime.entity(Ticker.self, id: "t")
        try await ticker.start(0)
        // Half the signals one by one (a switch per turn), the other half at once (several switches in
        // one turn: the signals after a switch belong to the new run).
        for _ in 0..<(Ticker.limit / 2) { try await ticker.signal(.poke) }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in (Ticker.limit / 2)..<Ticker.limit { group.addTask { try await ticker.signal(.poke) } }
            try await group.waitForAll()
        }
        #expect(try await ticker.result() == Ticker.limit)
        let state = try await ticker.query { $0 }
        #expect(state == Ticker.State(signals: Ticker.limit, ticks: Ticker.limit, runs: Array(0..<Ticker.limit)))

        let key = try #require(try runtime.journal.key(for: ticker.name))
        let metadata = try #require(try runtime.journal.metadata(of: key))
        #expect(metadata.run == UInt64(Ticker.limit), "one run per iteration")
        // The last run's history opens with its start; the run before it ends with `continuedAsNew`
        // (kept: keepRuns = 1), and nothing older is left.
        let events = try runtime.journal.events(of: key)
        let current = events.filter { $0.sequence >= metadata.runStartSequence }.compactMap { event in event.payload.withUnsafeBytes { HistoryEvent.decode($0) } }
        #expect(current.first?.kind == .started)
        #expect(current.last?.kind == .completed)
        let previous = events.filter { $0.sequence < metadata.runStartSequence }.compactMap { event in event.payload.withUnsafeBytes { HistoryEvent.decode($0) } }
        #expect(previous.first?.kind == .started && previous.last?.kind == .continuedAsNew, "\(previous.map { $0.kind })")
        #expect(events.count <= 20, "\(events.count) events kept of \(Ticker.limit) runs")
        // The new run starts from a snapshot taken at the switch.
        let snapshot = try #require(try runtime.journal.snapshot(of: key))
        #expect(snapshot.sequence == metadata.runStartSequence - 1)
    }

    @Test("a crash between switches resumes in the right run with the carried state; nothing is repeated")
    func crashBetweenRuns() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let configuration = configuration(directory)
        var runtime = try EntityRuntime(configuration: configuration, entityTypes: [Ticker.self])
        try await runtime.entity(Ticker.self, id: "t").start(0)
        for round in 0..<3 {
            for _ in 0..<3 { try await runtime.entity(Ticker.self, id: "t").signal(.poke) }
            runtime = try runtime.crashAndReopen(configuration: configuration, entityTypes: [Ticker.self])
            // Reactivated by replaying the current run only, from its snapshot.
            let state = try await runtime.entity(Ticker.self, id: "t").query { $0 }
            #expect(state.ticks == 3 * (round + 1) && state.signals == 3 * (round + 1))
            #expect(state.runs == Array(0...(3 * (round + 1))), "round \(round): \(state.runs)")
        }
        defer { runtime.close() }
        let ticker = runtime.entity(Ticker.self, id: "t")
        try await ticker.signal(.poke)
        #expect(try await ticker.result() == Ticker.limit)
        #expect(try await ticker.query { $0 } == Ticker.State(signals: Ticker.limit, ticks: Ticker.limit, runs: Array(0..<Ticker.limit)))
    }

    @Test("timers carry across runs on the test clock, and a parent gets the child's last run's output once")
    func childChainReportsToParent() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock()
        let runtime = try EntityRuntime(configuration: configuration(directory, clock: clock),
                                        entityTypes: [Launcher.self, Countdown.self])
        defer { runtime.close() }
        let launcher = runtime.entity(Launcher.self, id: "l")
        let started = clock.nowNanoseconds()
        try await launcher.start(5)
        #expect(try await launcher.result() == "lift-off after 5 laps")
        // Five one-hour sleeps, one per run, skipped by the test clock.
        #expect(clock.nowNanoseconds() - started >= 5 * 3_600 * 1_000_000_000)
        let countdown = runtime.entity(Countdown.self, id: "countdown-l")
        #expect(try await countdown.query(\.laps) == [5, 4, 3, 2, 1, 0])
        let key = try #require(try runtime.journal.key(for: countdown.name))
        #expect(try runtime.journal.metadata(of: key)?.run == 6)
        // The parent link was carried into every run: the child's last run reported (one outcome).
        let parentKey = try #require(try runtime.journal.key(for: launcher.name))
        let outcomes = try runtime.journal.events(of: parentKey).compactMap { event in event.payload.withUnsafeBytes { HistoryEvent.decode($0) } }.filter { $0.kind == .childCompleted }
        #expect(outcomes.count == 1)
    }

    @Test("a body that continues as new without waiting fails after a bounded number of runs")
    func spinningBodyFails() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let runtime = try EntityRuntime(configuration: configuration(directory), entityTypes: [Spinner.self])
        defer { runtime.close() }
        let spinner = runtime.entity(Spinner.self, id: "s")
        try await spinner.start(0)
        let outcome: Result<Int, EntityError>
        do { outcome = .success(try await spinner.result()) } catch { outcome = .failure(error) }
        guard case .failure(let error) = outcome else { Issue.record("the spinning body finished: \(outcome)"); return }
        #expect(error.code == .rejected)
        #expect("\(error)".contains("continued as new \(EntityCell<Spinner>.maximumRunSwitchesPerTurn) times"), "\(error)")
    }
}
