@_spi(Testing) @testable import DurableEntities
import DurableEntitiesTesting
import Foundation
import Synchronization
import Testing

/// `Step`'s shape, for an activity that might bring the process down: each attempt's start is stored
/// before the attempt runs.
struct FragileStep: Activity {
    static var recordsAttemptStart: Bool { true }
    func run(_ input: String, context: ActivityContext) async throws -> String { "real:\(input)" }
}

/// Calls `FragileStep` once, on the pool or as a local activity; reports a final failure as its result.
struct CallFragile: EntityWorkflow {
    struct State: Codable, Sendable {}
    struct Input: Codable, Sendable { var local: Bool; var options: ActivityOptions }
    static func initialState(id: String) -> State { State() }
    static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> String {
        do {
            if input.local { return try await context.executeLocal(FragileStep.self, "f", options: input.options) }
            return try await context.execute(FragileStep.self, "f", options: input.options)
        } catch let failure as ActivityFailure {
            return "failed:\(failure.reason):\(failure.attempts):\(failure.causeType)"
        }
    }
}

extension JournalBatch {
    /// Whether the batch rewrites a stored task (a heartbeat's store, an attempt's start, a retry).
    var replacesTask: Bool {
        operations.contains { if case .replaceTask = $0 { true } else { false } }
    }
}

/// ``Activity/recordsAttemptStart``: an attempt cut off by a crash counts even before any heartbeat.
@Suite("Recorded attempt starts", .timeLimit(.minutes(10)))
struct AttemptStartTests {
    /// A runtime whose `FragileStep` logs its attempt, reports its number on the stream, then hangs
    /// without a heartbeat until `silence` ends or the attempt is cancelled.
    func hangingRuntime(_ configuration: EntityRuntime.Configuration, _ clock: TestClock, _ log: AttemptLog,
                        _ silence: Silence) throws -> (EntityRuntime, AsyncStream<Int>) {
        let (started, start) = AsyncStream.makeStream(of: Int.self)
        let runtime = try EntityRuntime(configuration: configuration, activities: [ActivityStub<FragileStep> { _, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            start.yield(context.attempt)
            try await silence.wait()
        }])
        return (runtime, started)
    }

    @Test("an attempt that records its start is marked running before it runs: cut off by a crash before any heartbeat, it counts as failed (pool and local calls)",
          arguments: [false, true], [1, 2])
    func crashBeforeHeartbeatCounts(local: Bool, maximumAttempts: Int) async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let configuration = EntityRuntime.Configuration.quiet(directory, clock)
        let log = AttemptLog()
        let silence = Silence()
        defer { silence.finish() }
        let (first, started) = try hangingRuntime(configuration, clock, log, silence)
        var iterator = started.makeAsyncIterator()
        let options = ActivityOptions(retry: .init(initialInterval: .seconds(2), maximumAttempts: maximumAttempts))
        try await first.entity(CallFragile.self, id: "f").start(.init(local: local, options: options))
        #expect(await iterator.next() == 1)
        // Running, so its start is durable (a local call ran on the pool: inside the turn, its task
        // would not be stored yet).
        let marked = try HeartbeatStoreTests.storedTask(first)
        #expect(marked?.runningAttempt == 1 && marked?.attempt == 1)
        first.simulateCrash()

        let opened = clock.nowNanoseconds()
        let second = try EntityRuntime(configuration: configuration, activities: [ActivityStub<FragileStep> { _, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            return "ran \(context.attempt)"
        }])
        defer { second.close() }
        clock.skipsTimeWhenIdle = true  // the retry's backoff passes
        let result = try await second.entity(CallFragile.self, id: "f").result()
        if maximumAttempts == 1 {
            #expect(result == "failed:retriesExhausted:1:interrupted")
            #expect(log.all.map(\.number) == [1], "no attempt after the last one allowed")
        } else {
            #expect(result == "ran 2")
            #expect(log.all.map(\.number) == [1, 2])
            #expect(Set(log.all.map(\.key)).count == 1, "one idempotency key across the crash")
            #expect(log.all.last.map { $0.time - opened } == 2_000_000_000, "the retry policy's backoff, from the open")
        }
        #expect(try second.journal.tasks(prefix: [ActivityTask.keyPrefix]).isEmpty)
        withExtendedLifetime(first) {}  // the crashed runtime's attempt hangs until `silence` ends
    }

    @Test("an attempt whose start cannot be stored does not run and is not counted: it runs after the policy's delay, with its number")
    func unstorableStartWaits() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let faults = JournalFaults()
        var configuration = EntityRuntime.Configuration.quiet(directory, clock)
        configuration.journal.faults = faults
        let log = AttemptLog()
        let runtime = try EntityRuntime(configuration: configuration, activities: [ActivityStub<FragileStep> { _, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            return "ran \(context.attempt)"
        }])
        defer { runtime.close() }
        faults.failCommits(1) { $0.replacesTask }  // the first start's store
        let scheduled = clock.nowNanoseconds()
        let call = runtime.entity(CallFragile.self, id: "f")
        try await call.start(.init(local: false, options: .init(retry: .init(initialInterval: .seconds(3), maximumAttempts: 1))))
        _ = await Task.detached { runtime.core.waitUntilIdle() }.value  // the failed start and the stored retry
        #expect(faults.failed.commits == 1)
        #expect(log.all.isEmpty, "the attempt ran without its start stored")
        let waiting = try HeartbeatStoreTests.storedTask(runtime)
        #expect(waiting?.attempt == 1 && waiting?.runningAttempt == nil)
        #expect(waiting?.notBefore == scheduled + 3_000_000_000, "the policy's delay")
        clock.skipsTimeWhenIdle = true
        #expect(try await call.result() == "ran 1", "not counted: with one attempt allowed, it still runs")
        #expect(log.all.map(\.time) == [scheduled + 3_000_000_000])
    }

    @Test("an attempt that recorded its start and is cancelled by a close is not counted: the next open runs the same attempt")
    func closeUnmarksStart() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        var configuration = EntityRuntime.Configuration.quiet(directory, clock)
        configuration.activityGracePeriod = .milliseconds(20)
        configuration.activityCancellationWait = .seconds(120)  // the cancelled attempt ends; never abandoned, however loaded the machine
        let log = AttemptLog()
        let silence = Silence()
        defer { silence.finish() }
        let (first, started) = try hangingRuntime(configuration, clock, log, silence)
        var iterator = started.makeAsyncIterator()
        try await first.entity(CallFragile.self, id: "f").start(.init(local: false, options: .init(retry: .init(maximumAttempts: 1))))
        #expect(await iterator.next() == 1)
        await first.shutdown()
        let unmarked = try EntityRuntime(configuration: configuration)
        let stored = try HeartbeatStoreTests.storedTask(unmarked)
        #expect(stored?.runningAttempt == nil && stored?.attempt == 1, "the close took the running mark away")
        unmarked.close()

        let second = try EntityRuntime(configuration: configuration, activities: [ActivityStub<FragileStep> { _, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            return "again \(context.attempt)"
        }])
        defer { second.close() }
        #expect(try await second.entity(CallFragile.self, id: "f").result() == "again 1")
        #expect(log.all.map(\.number) == [1, 1])
    }
}
