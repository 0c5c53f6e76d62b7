@testable import DurableEntities
import DurableEntitiesTesting
import Foundation
import Metrics
import MetricsTestKit
import TestSupport
import Testing

/// An activity only the metrics suite registers, so that its metrics (dimension `activity`) are
/// this suite's alone in the process's shared backend.
struct MeteredStep: Activity {
    func run(_ input: String, context: ActivityContext) async throws -> String { "real:\(input)" }
}

/// Runs `MeteredStep` on the pool with the options given, then locally; returns what each gave.
struct CallMetered: EntityWorkflow {
    struct State: Codable, Sendable {}
    struct Input: Codable, Sendable { var label: String; var options: ActivityOptions }
    static func initialState(id: String) -> State { State() }
    static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> String {
        let pool: String
        do {
            pool = try await context.execute(MeteredStep.self, input.label, options: input.options)
        } catch let failure as ActivityFailure {
            pool = "failed:\(failure.reason)"
        }
        return pool + "," + (try await context.executeLocal(MeteredStep.self, "local"))
    }
}

@Suite("Metrics")
struct MetricsTests {
    /// The process's metrics backend: bootstrapped once (swift-metrics allows one bootstrap), before
    /// this test makes its runtime. Other tests' runtimes record into it too, harmlessly.
    static let metrics: TestMetrics = {
        let metrics = TestMetrics()
        MetricsSystem.bootstrap(metrics)
        return metrics
    }()

    @Test("shards report turns, their messages and the ready queue; the journal its commits")
    func shardAndJournalMetrics() async throws {
        let metrics = Self.metrics
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        var configuration = EntityRuntime.Configuration(directory: directory.path, shards: 1, logger: quietLogger)
        configuration.journal.logger = quietLogger
        let runtime = try EntityRuntime(configuration: configuration)
        defer { runtime.close() }
        for index in 0..<10 { try await runtime.entity(Account.self, id: "m-\(index)").signal(.deposit(1)) }
        let dimensions = [("shard", "0")]
        #expect(try metrics.expectTimer("durable_entities_turn_duration", dimensions).values.count >= 10)
        #expect(try metrics.expectRecorder("durable_entities_turn_messages", dimensions).values.allSatisfy { $0 >= 1 })
        #expect(try !metrics.expectGauge("durable_entities_shard_ready_entities", dimensions).values.isEmpty)
        #expect(metrics.counterTotal(label: "durable_entities_journal_commits") >= 10)
        #expect(try !metrics.expectRecorder("durable_entities_journal_commit_operations").values.isEmpty)
    }
    @Test("activities report each attempt's result, duration and wait to start, and timeouts; timers their hand-overs and lateness (all on the runtime's clock)")
    func activityAndTimerMetrics() async throws {
        let metrics = Self.metrics
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let (events, event) = AsyncStream.makeStream(of: Int.self)
        let silence = Silence()
        defer { silence.finish() }
        // Each attempt takes 2 s of the test clock. "flaky" fails its first attempt; "stall" waits
        // until its start-to-close watchdog ends it.
        let stub = ActivityStub<MeteredStep> { label, context in
            clock.advance(by: .seconds(2))
            event.yield(context.attempt)
            if label == "flaky", context.attempt == 1 { throw Flake() }
            if label == "stall" { try await silence.wait() }
            return "stub:\(label)"
        }
        // The runtime's own dimension keeps its figures apart from other suites' runtimes.
        var configuration = EntityRuntime.Configuration.quiet(directory, clock)
        let mine = ("runtime", "metrics-activities")
        configuration.metricsDimensions = [mine]
        let runtime = try EntityRuntime(configuration: configuration, activities: [stub])
        defer { runtime.close() }
        func idle() async { _ = await Task.detached { runtime.core.waitUntilIdle() }.value }
        var started = events.makeAsyncIterator()

        // A first attempt that fails, retried 1 s later; the test clock is moved 5 s on once the retry
        // is stored, so the retry's timer is handed over 4 s late and its attempt starts 4 s late.
        let flaky = runtime.entity(CallMetered.self, id: "flaky")
        try await flaky.start(.init(label: "flaky", options: .retrying(.exponential(max: 3, initial: .seconds(1)))))
        #expect(await started.next() == 1)
        await idle()
        clock.advance(by: .seconds(5))
        #expect(try await withDeadline(seconds: 60) { try await flaky.result() } == "stub:flaky,stub:local")

        // An attempt that stalls past its 1 s start-to-close timeout, with no retry left.
        let stalled = runtime.entity(CallMetered.self, id: "stall")
        try await stalled.start(.init(label: "stall", options: ActivityOptions(retry: .exponential(max: 1), startToCloseTimeout: .seconds(1))))
        #expect(await started.next() == 2)  // the flaky run's second attempt
        #expect(await started.next() == 1)  // its local one
        #expect(await started.next() == 1)  // the stalling one, 2 s in: past its timeout already
        #expect(try await withDeadline(seconds: 60) { try await stalled.result() } == "failed:startToCloseTimeout,stub:local")

        let activity = ("activity", MeteredStep.name)
        func attempts(_ result: String) -> Int64 {
            metrics.counterTotal(label: "durable_entities_activity_attempts", dimensions: [activity, mine, ("result", result)])
        }
        // flaky: retried then completed on the pool, completed locally; stall: failed, completed locally.
        #expect(attempts("completed") == 3)
        #expect(attempts("retried") == 1)
        #expect(attempts("failed") == 1)
        #expect(attempts("dropped") == 0)
        #expect(metrics.counterTotal(label: "durable_entities_activity_timeouts", dimensions: [activity, mine, ("timeout", "start_to_close")]) == 1)
        #expect(metrics.counterTotal(label: "durable_entities_activity_timeouts", dimensions: [activity, mine, ("timeout", "heartbeat")]) == 0)
        let twoSeconds: Int64 = 2_000_000_000
        #expect(try metrics.expectTimer("durable_entities_activity_attempt_duration", [activity, mine]).values
                == [twoSeconds, twoSeconds, twoSeconds, twoSeconds, twoSeconds])
        // Pool attempts only: the first at once, the retry 4 s after it was due, the stalling one at once.
        #expect(try metrics.expectTimer("durable_entities_activity_schedule_to_start", [activity, mine]).values == [0, 4_000_000_000, 0])
        // One durable timer fired in this runtime: the retry's, 4 s late.
        #expect(metrics.counterTotal(label: "durable_entities_timers_fired", dimensions: [("kind", "retry"), mine]) == 1)
        #expect(metrics.counterTotal(label: "durable_entities_timers_fired", dimensions: [("kind", "entity"), mine]) == 0)
        #expect(try metrics.expectTimer("durable_entities_timer_lag", [mine]).values == [4_000_000_000])
        // The journal took the runtime's dimensions, and so did the shards.
        #expect(metrics.counterTotal(label: "durable_entities_journal_commits", dimensions: [mine]) >= 4)
        #expect(try !metrics.expectTimer("durable_entities_turn_duration", [("shard", "0"), mine]).values.isEmpty)
    }

    @Test("the activity pool reports its occupancy: attempts running out of maxConcurrentActivities, and attempts queued for a slot")
    func poolOccupancy() async throws {
        let metrics = Self.metrics
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let steps = ActivityPoolTests.GatedSteps()
        var configuration = EntityRuntime.Configuration(directory: directory.path, maxConcurrentActivities: 2, logger: quietLogger)
        configuration.journal.logger = quietLogger
        let mine = [("runtime", "metrics-pool")]
        configuration.metricsDimensions = mine
        let runtime = try EntityRuntime(configuration: configuration, activities: [steps.stub()])
        defer { runtime.close() }
        func occupancy() throws -> (running: Double?, queued: Double?) {
            (try metrics.expectGauge("durable_entities_activity_pool_running", mine).lastValue,
             try metrics.expectGauge("durable_entities_activity_pool_queued", mine).lastValue)
        }

        // Three calls, two slots: two run (held on their gates), the third waits in the queue.
        let labels = ["p0", "p1", "p2"]
        for label in labels { try await runtime.entity(CallStep.self, id: label).start(.init(label: label, options: .default)) }
        var started = steps.started.makeAsyncIterator()
        let first = await started.next()!
        let second = await started.next()!
        // One more committed turn: the completions that queued the third call have run.
        try await runtime.entity(Account.self, id: "barrier").signal(.deposit(1))
        #expect(try occupancy() == (running: 2, queued: 1))

        // The first ends: its slot goes to the queued call, recorded before that call starts.
        steps.gate(first).open()
        let third = await started.next()!
        #expect(Set([first, second, third]) == Set(labels))
        #expect(try occupancy() == (running: 2, queued: 0))

        // All end: the pool is empty once the runtime is idle.
        steps.gate(second).open()
        steps.gate(third).open()
        for label in labels { #expect(try await runtime.entity(CallStep.self, id: label).result() == "done:\(label)") }
        _ = await Task.detached { runtime.core.waitUntilIdle() }.value
        #expect(try occupancy() == (running: 0, queued: 0))
    }
}
