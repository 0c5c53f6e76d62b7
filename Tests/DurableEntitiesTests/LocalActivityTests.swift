@_spi(Testing) @testable import DurableEntities
import DurableEntitiesTesting
import Foundation
import Synchronization
import Testing

/// Runs `Step` as a local activity once per label, in order; between the first and the second it
/// waits for the `go` signal if asked. Returns the outputs joined, or the failure.
struct LocalSteps: EntityWorkflow {
    struct State: Codable, Sendable { var go = false; var done = 0 }
    enum Signal: Codable, Sendable { case go }
    struct Input: Codable, Sendable {
        var labels: [String]
        var options: ActivityOptions = .default
        var waitAfterFirst = false
    }
    static func initialState(id: String) -> State { State() }
    static func handle(_ signal: Signal, state: inout State, context: EntityContext) throws { state.go = true }

    static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> String {
        var outputs: [String] = []
        do {
            for (index, label) in input.labels.enumerated() {
                if index == 1, input.waitAfterFirst { try await context.condition { $0.go } }
                outputs.append(try await context.executeLocal(Step.self, label, options: input.options))
                context.updateState { $0.done += 1 }
            }
        } catch let failure as ActivityFailure {
            outputs.append("failed:\(failure.reason):\(failure.attempts):\(failure.causeType)")
        }
        return outputs.joined(separator: ",")
    }
}

@Suite("Local activities")
struct LocalActivityTests {
    func configuration(_ directory: TemporaryDirectory, _ clock: TestClock) -> EntityRuntime.Configuration {
        var configuration = EntityRuntime.Configuration(directory: directory.path, activityGracePeriod: .milliseconds(20), clock: clock,
                                                        logger: quietLogger)
        configuration.journal.logger = quietLogger
        return configuration
    }

    /// A runtime whose `Step` stub answers `output`, except that for the label "slow" it first yields
    /// "waiting" on the returned stream and waits for the gate.
    func gatedRuntime(_ configuration: EntityRuntime.Configuration,
                      output: @escaping @Sendable (String, ActivityContext) -> String) throws -> (EntityRuntime, AsyncGate, AsyncStream<String>) {
        let gate = AsyncGate()
        let (events, event) = AsyncStream.makeStream(of: String.self)
        let runtime = try EntityRuntime(configuration: configuration, activities: [ActivityStub<Step> { label, context in
            if label == "slow" {
                event.yield("waiting")
                await gate.wait()
            }
            return output(label, context)
        }])
        return (runtime, gate, events)
    }

    func kinds(_ runtime: EntityRuntime, _ id: String) throws -> [HistoryEvent.Kind] {
        try runtime.exportHistory(of: EntityName(type: LocalSteps.entityType, id: id)).events.map(\.kind)
    }

    @Test("three local activities that do not wait run inside the turn: the whole run is one commit, in the body's order, nothing stored")
    func inlineInOneCommit() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock()
        let log = AttemptLog()
        let runtime = try EntityRuntime(configuration: configuration(directory, clock), activities: [ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            return "ok:\(label)"
        }])
        defer { runtime.close() }
        let steps = runtime.entity(LocalSteps.self, id: "inline")
        let before = runtime.journal.statistics.commits
        try await steps.start(.init(labels: ["a", "b", "c"]))
        #expect(runtime.journal.statistics.commits - before == 1)
        #expect(try await steps.result() == "ok:a,ok:b,ok:c")
        #expect(runtime.journal.statistics.commits - before == 1)
        #expect(try kinds(runtime, "inline") == [.started, .activityScheduled, .activityCompleted, .activityScheduled, .activityCompleted,
                                                 .activityScheduled, .activityCompleted, .completed])
        #expect(log.all.map(\.number) == [1, 1, 1])
        #expect(log.all.map(\.key) == (1...3).map { "LocalSteps/inline/\(UInt64(1) << 32 | UInt64($0))" })
        // Each outcome is recorded with its attempt, as a pool activity's is.
        let activities = try runtime.exportHistory(of: steps.name).activities()
        #expect(activities.map(\.attempt) == log.all.map { ActivityAttempt(number: 1, startedAt: $0.time) })
        #expect(try activities.map { try $0.output(as: String.self) } == ["ok:a", "ok:b", "ok:c"])
        #expect(try runtime.journal.tasks(prefix: [ActivityTask.keyPrefix]).isEmpty)
    }

    @Test("recorded local outcomes are replayed, not run again: after a restart the body continues past them")
    func replayDoesNotRerun() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock()
        let log = AttemptLog()
        let stub = ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: label))
            return "ok:\(label)"
        }
        do {
            let first = try EntityRuntime(configuration: configuration(directory, clock), activities: [stub])
            let steps = first.entity(LocalSteps.self, id: "replay")
            try await steps.start(.init(labels: ["a", "b"], waitAfterFirst: true))
            _ = try await steps.awaitState { $0.done == 1 }
            await first.shutdown()
        }
        let second = try EntityRuntime(configuration: configuration(directory, clock), activities: [stub])
        defer { second.close() }
        let steps = second.entity(LocalSteps.self, id: "replay")
        try await steps.signal(.go)
        #expect(try await steps.result() == "ok:a,ok:b")
        #expect(log.all.map(\.key) == ["a", "b"])
    }

    @Test("a local activity that waits outside the turn is stored as a task until its outcome is recorded")
    func detachedIsStored() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let (runtime, gate, waiting) = try gatedRuntime(configuration(directory, TestClock(skipsTimeWhenIdle: false))) { label, _ in "ok:\(label)" }
        var iterator = waiting.makeAsyncIterator()
        defer { runtime.close() }
        let steps = runtime.entity(LocalSteps.self, id: "slow")
        try await steps.start(.init(labels: ["fast", "slow", "after"]))
        #expect(await iterator.next() == "waiting")
        // The start was acknowledged: its commit holds the first outcome and the stored second activity.
        let stored = try runtime.journal.tasks(prefix: [ActivityTask.keyPrefix]).compactMap { ActivityTask.decode($0.value) }
        #expect(stored.map(\.name) == [Step.name])
        #expect(stored.map(\.attempt) == [1])
        gate.open()
        #expect(try await steps.result() == "ok:fast,ok:slow,ok:after")
        #expect(try kinds(runtime, "slow") == [.started, .activityScheduled, .activityCompleted, .activityScheduled, .activityCompleted,
                                               .activityScheduled, .activityCompleted, .completed])
        #expect(try runtime.journal.tasks(prefix: [ActivityTask.keyPrefix]).isEmpty)
    }

    @Test("run bodies and local attempts run on parked runners, reused across entities: each outcome reaches its own run, a detached attempt keeps its runner, closing ends the parked ones")
    func runnersAreReused() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let configuration = configuration(directory, TestClock(skipsTimeWhenIdle: false))
        let (runtime, gate, waiting) = try gatedRuntime(configuration) { label, context in "\(context.entity.id):\(label)" }
        var iterator = waiting.makeAsyncIterator()
        let slow = runtime.entity(LocalSteps.self, id: "slow")
        try await slow.start(.init(labels: ["fast", "slow", "after"]))
        #expect(await iterator.next() == "waiting")
        // While the slow attempt holds its runner outside the turn, 40 runs of three local activities
        // each, 20 at a time, go through the parked runners.
        for round in 0..<2 {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for index in 0..<20 {
                    let id = "e-\(round)-\(index)"
                    group.addTask {
                        let result = try await runtime.entity(LocalSteps.self, id: id).execute(.init(labels: ["a", "b", "c"]))
                        #expect(result == "\(id):a,\(id):b,\(id):c")
                    }
                }
                try await group.waitForAll()
            }
        }
        // The runners are reused across rounds: at most one per run body alive at once (the 20 of a
        // round) and one per turn running an attempt (a turn per shard), all parked now. Without
        // reuse, the 40 runs would have left 40 body runners and more.
        let parked = runtime.core.runners.count
        #expect((1...(20 + configuration.shards)).contains(parked))
        gate.open()
        #expect(try await slow.result() == "slow:fast,slow:slow,slow:after")
        runtime.close()
        #expect(runtime.core.runners.count == 0)
    }

    @Test("a failed local attempt retries on the pool by the policy: attempts 1, 2, 3 with gaps 1 s, 2 s on the test clock, one idempotency key")
    func retriesOnThePool() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock()
        let log = AttemptLog()
        let runtime = try EntityRuntime(configuration: configuration(directory, clock), activities: [ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            if context.attempt < 3 { throw Flake() }
            return "ok:\(label):\(context.attempt)"
        }])
        defer { runtime.close() }
        let steps = runtime.entity(LocalSteps.self, id: "retry")
        try await steps.start(.init(labels: ["x"], options: .retrying(.init(initialInterval: .seconds(1), backoffCoefficient: 2))))
        #expect(try await steps.result() == "ok:x:3")
        let attempts = log.all
        #expect(attempts.map(\.number) == [1, 2, 3])
        #expect(Set(attempts.map(\.key)).count == 1)
        #expect(zip(attempts.dropFirst(), attempts).map { $0.time - $1.time } == [1_000_000_000, 2_000_000_000])
        #expect(try runtime.journal.tasks(prefix: [ActivityTask.keyPrefix]).isEmpty)
    }

    @Test("a local activity's non-retryable error and its last allowed attempt end it with the same ActivityFailure as on the pool")
    func failures() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock()
        let runtime = try EntityRuntime(configuration: configuration(directory, clock), activities: [ActivityStub<Step> { label, _ in
            if label == "fatal" { throw Fatal() }
            throw Flake()
        }])
        defer { runtime.close() }
        let fatal = runtime.entity(LocalSteps.self, id: "fatal")
        try await fatal.start(.init(labels: ["fatal"], options: .retrying(.init(nonRetryableErrorTypes: ["Fatal"]))))
        #expect(try await fatal.result() == "failed:nonRetryable:1:Fatal")
        let once = runtime.entity(LocalSteps.self, id: "once")
        try await once.start(.init(labels: ["flaky"], options: .retrying(.never)))
        #expect(try await once.result() == "failed:retriesExhausted:1:Flake")
        let limited = runtime.entity(LocalSteps.self, id: "limited")
        try await limited.start(.init(labels: ["flaky"], options: .retrying(.exponential(max: 3))))
        #expect(try await limited.result() == "failed:retriesExhausted:3:Flake")
    }

    @Test("a waiting local attempt is caught by its heartbeat timeout and retried on the pool; the retry reads the last heartbeat",
          .timeLimit(.minutes(10)))
    func heartbeatTimeout() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let (heartbeats, heartbeated) = AsyncStream.makeStream(of: Int.self)
        let silence = Silence()
        defer { silence.finish() }
        let runtime = try EntityRuntime(configuration: configuration(directory, clock), activities: [ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey,
                          heartbeat: context.lastHeartbeat(as: Int.self)))
            if context.attempt == 1 {
                context.heartbeat(5)            // progress: 5 items done
                heartbeated.yield(5)
                try await silence.wait()        // then it stalls, outside the turn
            }
            return "resumed-from-\(context.lastHeartbeat(as: Int.self) ?? -1)"
        }])
        defer { runtime.close() }
        let steps = runtime.entity(LocalSteps.self, id: "stalled")
        try await steps.start(.init(labels: ["h"], options: .init(retry: .init(initialInterval: .seconds(1)), heartbeatTimeout: .seconds(10))))
        var iterator = heartbeats.makeAsyncIterator()
        #expect(await iterator.next() == 5)
        clock.advance(by: .seconds(11))         // no heartbeat for 10 s: the attempt is timed out
        clock.skipsTimeWhenIdle = true          // then let the retry's backoff pass
        #expect(try await steps.result() == "resumed-from-5")
        let attempts = log.all
        #expect(attempts.map(\.number) == [1, 2])
        #expect(attempts.map(\.heartbeat) == [nil, 5])
        #expect(Set(attempts.map(\.key)).count == 1)
        #expect(try runtime.journal.tasks(prefix: [ActivityTask.keyPrefix]).isEmpty)
    }

    @Test("a local activity still running when the runtime closes runs again at the next open, with the same idempotency key",
          .timeLimit(.minutes(10)))
    func closeThenRerun() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let (started, didStart) = AsyncStream.makeStream(of: Void.self)
        let silence = Silence()
        defer { silence.finish() }
        do {
            let first = try EntityRuntime(configuration: configuration(directory, clock), activities: [ActivityStub<Step> { _, context in
                log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
                didStart.yield()
                try await silence.wait()  // never answers; close cancels it
            }])
            try await first.entity(LocalSteps.self, id: "hang").start(.init(labels: ["h"]))
            var iterator = started.makeAsyncIterator()
            _ = await iterator.next()
            await first.shutdown()
        }
        let second = try EntityRuntime(configuration: configuration(directory, clock), activities: [ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            return "second:\(label)"
        }])
        defer { second.close() }
        #expect(try await second.entity(LocalSteps.self, id: "hang").result() == "second:h")
        let attempts = log.all
        #expect(attempts.map(\.number) == [1, 1])
        #expect(Set(attempts.map(\.key)).count == 1)
    }
}

/// Counts how often its body starts (a replay starts it again); fails when asked to.
struct CountedRun: EntityWorkflow {
    static let starts = Mutex<[String: Int]>([:])
    struct State: Codable, Sendable { var pings = 0 }
    enum Signal: Codable, Sendable { case ping }
    struct Input: Codable, Sendable { var fail = false }
    static func initialState(id: String) -> State { State() }
    static func handle(_ signal: Signal, state: inout State, context: EntityContext) throws { state.pings += 1 }
    static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> String {
        starts.withLock { $0[context.id, default: 0] += 1 }
        if input.fail { throw Fatal() }
        return "done:\(context.id)"
    }
}

@Suite("Results of finished runs")
struct FinishedResultTests {
    @Test("result() of a finished run that left memory is read from its last event, without replaying the body; a failure too")
    func readWithoutReplay() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let runtime = try EntityRuntime(configuration: LocalActivityTests().configuration(directory, TestClock()))
        defer { runtime.close() }
        let ok = runtime.entity(CountedRun.self, id: "finished-ok")
        try await ok.start(.init())
        // The run finished in the start's turn and left memory; result() asks the journal.
        #expect(try await ok.result() == "done:finished-ok")
        #expect(try await ok.result() == "done:finished-ok")
        #expect(CountedRun.starts.withLock { $0["finished-ok"] } == 1)

        let failing = runtime.entity(CountedRun.self, id: "finished-failed")
        try await failing.start(.init(fail: true))
        let error = await #expect(throws: EntityError.self) { _ = try await failing.result() }
        #expect(error?.code == .rejected)
        #expect((error?.underlying as? WorkflowFailure)?.message.contains("Fatal") == true)
        #expect(CountedRun.starts.withLock { $0["finished-failed"] } == 1)
    }

    @Test("after a signal recorded past the run's end, result() asks the entity and still gives the run's outcome")
    func signalAfterTheEnd() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let runtime = try EntityRuntime(configuration: LocalActivityTests().configuration(directory, TestClock()))
        defer { runtime.close() }
        let entity = runtime.entity(CountedRun.self, id: "signalled-after")
        try await entity.start(.init())
        try await entity.signal(.ping)
        #expect(try await entity.result() == "done:signalled-after")
        #expect(try await entity.query { $0.pings } == 1)
    }
}

@Suite("execute: start and await the outcome in one message")
struct ExecuteTests {
    func runtime(_ directory: TemporaryDirectory, activities: [any Activity] = [], maxPayloadBytes: Int? = nil) throws -> EntityRuntime {
        var configuration = LocalActivityTests().configuration(directory, TestClock())
        if let maxPayloadBytes { configuration.maxPayloadBytes = maxPayloadBytes }
        return try EntityRuntime(configuration: configuration, activities: activities)
    }

    @Test("a body of local activities that finishes in its first turn answers after that one commit, with the same history as start + result")
    func localInOneCommit() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let runtime = try runtime(directory, activities: [ActivityStub<Step> { label, _ in "ok:\(label)" }])
        defer { runtime.close() }
        let before = runtime.journal.statistics.commits
        #expect(try await runtime.entity(LocalSteps.self, id: "one").execute(.init(labels: ["a", "b", "c"])) == "ok:a,ok:b,ok:c")
        #expect(runtime.journal.statistics.commits - before == 1)
        #expect(try runtime.exportHistory(of: EntityName(type: LocalSteps.entityType, id: "one")).events.map(\.kind)
            == [.started, .activityScheduled, .activityCompleted, .activityScheduled, .activityCompleted,
                .activityScheduled, .activityCompleted, .completed])
    }

    @Test("a body that finishes in a later turn (a pool activity, a signal) answers when its outcome is durable")
    func laterTurn() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let runtime = try runtime(directory, activities: [ActivityStub<Step> { label, _ in "pool:\(label)" }])
        defer { runtime.close() }
        #expect(try await runtime.entity(CallStep.self, id: "pool").execute(.init(label: "x", options: .default)) == "pool:x")

        // Waits for a signal between its first and second step: execute returns only after it.
        let steps = runtime.entity(LocalSteps.self, id: "waits")
        async let output = steps.execute(.init(labels: ["a", "b"], waitAfterFirst: true))
        _ = try await steps.awaitState { $0.done == 1 }
        try await steps.signal(.go)
        #expect(try await output == "pool:a,pool:b")
        #expect(try await steps.query { $0.done } == 2)
    }

    @Test("executing again, or after start, starts nothing new and gives the same outcome without replaying the body; a failed body is rejected with its failure")
    func idempotent() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let runtime = try runtime(directory)
        defer { runtime.close() }
        let ok = runtime.entity(CountedRun.self, id: "execute-ok")
        #expect(try await ok.execute(.init()) == "done:execute-ok")
        #expect(try await ok.execute(.init(fail: true)) == "done:execute-ok")  // the first input stands
        #expect(try await ok.result() == "done:execute-ok")
        // A fresh reference: the turn finds the finished run on disk and answers from its last event.
        #expect(try await runtime.entity(CountedRun.self, id: "execute-ok").execute(.init()) == "done:execute-ok")
        #expect(CountedRun.starts.withLock { $0["execute-ok"] } == 1)

        let started = runtime.entity(CountedRun.self, id: "start-then-execute")
        try await started.start(.init())
        #expect(try await started.execute(.init()) == "done:start-then-execute")
        #expect(CountedRun.starts.withLock { $0["start-then-execute"] } == 1)

        let failing = runtime.entity(CountedRun.self, id: "execute-failed")
        for _ in 0..<2 {
            let error = await #expect(throws: EntityError.self) { _ = try await failing.execute(.init(fail: true)) }
            #expect(error?.code == .rejected)
            #expect((error?.underlying as? WorkflowFailure)?.message.contains("Fatal") == true)
        }
        #expect(CountedRun.starts.withLock { $0["execute-failed"] } == 1)
    }

    @Test("an input over the payload limit is refused with payloadTooLarge and nothing is recorded")
    func tooLarge() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let runtime = try runtime(directory, maxPayloadBytes: 64)
        defer { runtime.close() }
        let entity = runtime.entity(LocalSteps.self, id: "too-large")
        let error = await #expect(throws: EntityError.self) {
            _ = try await entity.execute(.init(labels: [String(repeating: "x", count: 200)]))
        }
        #expect(error?.code == .payloadTooLarge)
        #expect(try runtime.journal.key(for: EntityName(type: LocalSteps.entityType, id: "too-large")) == nil)
        let notStarted = await #expect(throws: EntityError.self) { _ = try await entity.result() }
        #expect(notStarted?.code == .rejected)
    }
}
