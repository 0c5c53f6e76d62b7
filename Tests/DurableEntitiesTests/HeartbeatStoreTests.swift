@_spi(Testing) @testable import DurableEntities
import DurableEntitiesTesting
import Foundation
import Synchronization
import Testing

/// Heartbeats stored with their task: progress and the count of attempts survive a crash.
@Suite("Stored heartbeats", .timeLimit(.minutes(10)))
struct HeartbeatStoreTests {
    /// The one stored activity task of the runtime.
    static func storedTask(_ runtime: EntityRuntime) throws -> ActivityTask? {
        let rows = try runtime.journal.tasks(prefix: [ActivityTask.keyPrefix])
        #expect(rows.count == 1)
        return rows.first.flatMap { ActivityTask.decode($0.value) }
    }

    func details(_ task: ActivityTask?) -> Int? {
        guard let bytes = task?.heartbeat else { return nil }
        return try? bytes.withUnsafeBytes { try BinaryEntityCodec().decode(Int.self, from: $0) }
    }

    /// How the tests call `Step`: on the pool (`CallStep`), or as a local activity (`LocalSteps`).
    enum Call: CustomTestStringConvertible, CaseIterable {
        case pool, local
        var testDescription: String { "\(self)" }

        func start(_ runtime: EntityRuntime, _ id: String, _ options: ActivityOptions) async throws {
            switch self {
            case .pool: try await runtime.entity(CallStep.self, id: id).start(.init(label: "l", options: options))
            case .local: try await runtime.entity(LocalSteps.self, id: id).start(.init(labels: ["l"], options: options))
            }
        }

        func result(_ runtime: EntityRuntime, _ id: String) async throws -> String {
            switch self {
            case .pool: try await runtime.entity(CallStep.self, id: id).result()
            case .local: try await runtime.entity(LocalSteps.self, id: id).result()
            }
        }
    }

    /// In a fresh directory, starts `Step` as `call` for entity "long" on a runtime whose attempt
    /// gives heartbeats 1 and 2 in the same second, and after the test moved the clock a second on
    /// gives 3; it then hangs until the process "dies" (a simulated crash). On the pool, 1 is stored
    /// at once and 2 waits for the interval; a local attempt gives both inside its turn, and 2 is
    /// stored once the turn's commit stored its task. Then calls `reopen` with the directory's
    /// configuration, the clock and the attempt log.
    func afterCrashMidAttempt(retry: RetryPolicy, timed: Bool = false, call: Call = .pool,
                              reopen: (EntityRuntime.Configuration, TestClock, AttemptLog) async throws -> Void) async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let configuration = EntityRuntime.Configuration.quiet(directory, clock)
        let log = AttemptLog()
        let silence = Silence()
        defer { silence.finish() }
        let (events, event) = AsyncStream.makeStream(of: String.self)
        var iterator = events.makeAsyncIterator()
        let gate = AsyncGate()
        let first = try EntityRuntime(configuration: configuration, activities: [ActivityStub<Step> { _, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey, heartbeat: context.lastHeartbeat(as: Int.self)))
            context.heartbeat(1)  // stored at once (a local attempt: inside its turn, in memory)
            context.heartbeat(2)  // the same second: kept in memory (a local attempt: stored with its task)
            event.yield("beat")
            await gate.wait()     // a local attempt leaves its turn here
            context.heartbeat(3)  // a second later: stored
            try await silence.wait()  // until the process dies
        }])
        first.core.activities.heartbeatStored.withLock { $0 = { _ in event.yield("stored") } }
        // Timed: the attempt runs under a watchdog, in a task of its own (the other path of an attempt).
        let options = ActivityOptions(retry: retry, startToCloseTimeout: timed ? .seconds(3_600) : nil)
        try await call.start(first, "long", options)
        // The store's completion and the attempt's report come in either order.
        #expect(Set([await iterator.next(), await iterator.next()]) == ["beat", "stored"])
        let marked = try Self.storedTask(first)
        if call == .pool {
            #expect(details(marked) == 1, "the first heartbeat is stored at once; the second waits for the interval")
        } else {
            #expect(details(marked) == 2, "the last heartbeat inside the turn is stored with the task")
        }
        #expect(marked?.runningAttempt == 1 && marked?.attempt == 1)
        clock.advance(by: .seconds(1))
        gate.open()
        #expect(await iterator.next() == "stored")
        #expect(details(try Self.storedTask(first)) == 3)
        first.simulateCrash()
        try await reopen(configuration, clock, log)
        withExtendedLifetime(first) {}  // the crashed runtime's attempt hangs until `silence` ends
    }

    @Test("an attempt cut off by a crash after a heartbeat counts as failed: the next one has the next number and reads the stored details",
          arguments: [false, true], Call.allCases)
    func crashedAttemptCounts(timed: Bool, call: Call) async throws {
        try await afterCrashMidAttempt(retry: .init(initialInterval: .seconds(2)), timed: timed, call: call) { configuration, clock, log in
            let opened = clock.nowNanoseconds()
            let second = try EntityRuntime(configuration: configuration, activities: [ActivityStub<Step> { _, context in
                log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey, heartbeat: context.lastHeartbeat(as: Int.self)))
                return "resumed-from-\(context.lastHeartbeat(as: Int.self) ?? -1)"
            }])
            defer { second.close() }
            clock.skipsTimeWhenIdle = true  // the retry's backoff passes
            #expect(try await call.result(second, "long") == "resumed-from-3")
            let attempts = log.all
            #expect(attempts.map(\.number) == [1, 2])
            #expect(Set(attempts.map(\.key)).count == 1, "one idempotency key across the crash")
            #expect(attempts.last?.heartbeat == 3)
            #expect(attempts.last.map { $0.time - opened } == 2_000_000_000, "the retry policy's backoff, from the open")
            #expect(try second.journal.tasks(prefix: [ActivityTask.keyPrefix]).isEmpty)
        }
    }

    @Test("an activity that keeps crashing the process ends after its maximum attempts: the run gets the failure",
          arguments: Call.allCases)
    func crashLoopEnds(call: Call) async throws {
        try await afterCrashMidAttempt(retry: .init(maximumAttempts: 1), call: call) { configuration, clock, log in
            let second = try EntityRuntime(configuration: configuration, activities: [ActivityStub<Step> { _, context in
                log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
                return "ran again"
            }])
            defer { second.close() }
            #expect(try await call.result(second, "long") == "failed:retriesExhausted:1:interrupted")
            #expect(log.all.map(\.number) == [1], "no attempt after the last one allowed")
            #expect(try second.journal.tasks(prefix: [ActivityTask.keyPrefix]).isEmpty)
        }
    }

    @Test("an attempt a close cancels is not a failed one: the next open runs the same attempt again, with its last heartbeat",
          arguments: Call.allCases)
    func closeKeepsAttemptNumber(call: Call) async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        var configuration = EntityRuntime.Configuration.quiet(directory, clock)
        configuration.activityGracePeriod = .milliseconds(20)
        configuration.activityCancellationWait = .seconds(120)  // the cancelled attempt ends; never abandoned, however loaded the machine
        let log = AttemptLog()
        let (events, event) = AsyncStream.makeStream(of: String.self)
        var iterator = events.makeAsyncIterator()
        let silence = Silence()
        defer { silence.finish() }
        let first = try EntityRuntime(configuration: configuration, activities: [ActivityStub<Step> { _, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            context.heartbeat(1)  // stored, with the running mark (a local attempt: in memory, inside its turn)
            context.heartbeat(2)  // in memory (a local attempt: stored with its task, once it left its turn)
            event.yield("beat")
            try await silence.wait()  // cancelled by the close
        }])
        first.core.activities.heartbeatStored.withLock { $0 = { _ in event.yield("stored") } }
        try await call.start(first, "long", .default)
        #expect(Set([await iterator.next(), await iterator.next()]) == ["beat", "stored"])
        #expect(try Self.storedTask(first)?.runningAttempt == 1)
        await first.shutdown()
        let unmarked = try EntityRuntime(configuration: configuration)
        let stored = try Self.storedTask(unmarked)
        #expect(stored?.runningAttempt == nil, "the close took the running mark away")
        #expect(stored?.attempt == 1)
        #expect(details(stored) == 2, "the attempt's last details are kept")
        unmarked.close()

        let second = try EntityRuntime(configuration: configuration, activities: [ActivityStub<Step> { _, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey, heartbeat: context.lastHeartbeat(as: Int.self)))
            return "again"
        }])
        defer { second.close() }
        clock.skipsTimeWhenIdle = true  // a retry's backoff (were the attempt counted) would not stall the test
        #expect(try await call.result(second, "long") == "again")
        #expect(log.all.map(\.number) == [1, 1])
        #expect(log.all.last?.heartbeat == 2)
    }

    @Test("a heartbeat from work an attempt left behind, after it failed, stores nothing: the retry's row stays")
    func lateHeartbeatStoresNothing() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let left = Mutex<ActivityContext?>(nil)
        let (events, event) = AsyncStream.makeStream(of: String.self)
        var iterator = events.makeAsyncIterator()
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [ActivityStub<Step> { _, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey, heartbeat: context.lastHeartbeat(as: Int.self)))
            guard context.attempt == 1 else { return "second" }
            context.heartbeat(1)
            left.withLock { $0 = context }  // kept by work that outlives the attempt
            throw Flake()
        }])
        defer { runtime.close() }
        runtime.core.activities.heartbeatStored.withLock { $0 = { _ in event.yield("stored") } }
        let call = runtime.entity(CallStep.self, id: "late")
        try await call.start(.init(label: "l", options: .init(retry: .init(initialInterval: .seconds(10)))))
        #expect(await iterator.next() == "stored")
        _ = await Task.detached { runtime.core.waitUntilIdle() }.value  // the retry's row is stored
        #expect(try Self.storedTask(runtime).map { ($0.attempt, $0.runningAttempt, details($0)) } ?? (0, nil, nil) == (2, nil, 1))
        clock.advance(by: .seconds(1))  // past the store interval, short of the retry
        left.withLock { $0 }?.heartbeat(99)  // late: the attempt ended
        // Commits keep the order of submission: once this deposit is durable, a store would be too.
        try await runtime.entity(Account.self, id: "marker").signal(.deposit(1))
        #expect(try Self.storedTask(runtime).map { ($0.attempt, $0.runningAttempt, details($0)) } ?? (0, nil, nil) == (2, nil, 1))
        clock.skipsTimeWhenIdle = true
        #expect(try await call.result() == "second")
        #expect(log.all.map(\.number) == [1, 2] && log.all.last?.heartbeat == 1)
    }

    @Test("stored tasks without the running mark read as before; the mark round-trips")
    func runningMarkEncoding() throws {
        var task = ActivityTask(entityType: "T", entityID: "i", entityKey: 7, run: 1, activityID: 3, name: "Step", input: [1, 2],
                                options: .default, attempt: 2, scheduledAt: 10, notBefore: 20, heartbeat: [9])
        let plain = task.encoded()
        #expect(plain.count == task.encodedSize)
        #expect(ActivityTask.decode(plain)?.runningAttempt == nil)
        task.runningAttempt = 2
        let marked = task.encoded()
        #expect(marked.count == task.encodedSize)
        #expect(Array(marked.prefix(plain.count)) == plain, "the mark is appended")
        #expect(ActivityTask.decode(marked)?.runningAttempt == 2)
        #expect(ActivityTask.decode(marked + [0]) == nil, "trailing bytes are refused")
    }
}
