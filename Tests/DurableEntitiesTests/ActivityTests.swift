@_spi(Testing) @testable import DurableEntities
import DurableEntitiesTesting
import Foundation
import Synchronization
import TestSupport
import Testing

/// The activity the tests stub: takes a label, returns a string.
struct Step: Activity {
    func run(_ input: String, context: ActivityContext) async throws -> String { "real:\(input)" }
}

/// Calls `Step` once with the options in its input; returns the output or the failure's description.
struct CallStep: EntityWorkflow {
    struct State: Codable, Sendable {}
    struct Input: Codable, Sendable { var label: String; var options: ActivityOptions }
    static func initialState(id: String) -> State { State() }
    static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> String {
        do {
            return try await context.execute(Step.self, input.label, options: input.options)
        } catch let failure as ActivityFailure {
            return "failed:\(failure.reason):\(failure.attempts):\(failure.causeType)"
        }
    }
}

/// Attempts of a stubbed activity: time on the test clock, attempt number, idempotency key.
final class AttemptLog: Sendable {
    struct Attempt: Equatable { var time: UInt64; var number: Int; var key: String; var heartbeat: Int? }
    let attempts = Mutex<[Attempt]>([])
    func add(_ attempt: Attempt) { attempts.withLock { $0.append(attempt) } }
    var all: [Attempt] { attempts.withLock { $0 } }
}

/// An activity's wait that never ends by itself: ``wait()`` returns only by throwing
/// `CancellationError` once the waiting task is cancelled (or ``finish()`` ends it, at a test's end).
/// No real time passes; one waiter at a time.
final class Silence: Sendable {
    private let stream: AsyncStream<Void>
    private let continuation: AsyncStream<Void>.Continuation

    init() { (stream, continuation) = AsyncStream.makeStream(of: Void.self) }

    func wait() async throws -> Never {
        for await _ in stream {}  // nothing is ever sent: ends on cancellation or finish()
        throw CancellationError()
    }

    func finish() { continuation.finish() }
}

struct Flake: Error {}
struct Fatal: Error {}

@Suite("Activities")
struct ActivityTests {
    func runtime(_ directory: TemporaryDirectory, _ clock: TestClock, _ stub: ActivityStub<Step>) throws -> EntityRuntime {
        let configuration = EntityRuntime.Configuration.quiet(directory, clock)
        return try EntityRuntime(configuration: configuration, activities: [stub])
    }

    @Test("fails 3 times then succeeds: 4 attempts, one idempotency key, gaps exactly 1 s, 2 s, 4 s on the test clock; the history holds its schedule and its outcome with attempt 4, no event per retry")
    func retryGaps() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock()
        let log = AttemptLog()
        let runtime = try runtime(directory, clock, ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            if context.attempt < 4 { throw Flake() }
            return "ok:\(label)"
        })
        defer { runtime.close() }
        let call = runtime.entity(CallStep.self, id: "retry")
        try await call.start(.init(label: "x", options: .retrying(.init(initialInterval: .seconds(1), backoffCoefficient: 2))))
        #expect(try await call.result() == "ok:x")
        let attempts = log.all
        #expect(attempts.map(\.number) == [1, 2, 3, 4])
        #expect(Set(attempts.map(\.key)).count == 1)
        let gaps = zip(attempts.dropFirst(), attempts).map { $0.time - $1.time }
        #expect(gaps == [1_000_000_000, 2_000_000_000, 4_000_000_000])
        // Scheduled, then the fourth attempt (started when the stub saw it start) completed it; the
        // three failed attempts before it are not events.
        let history = try runtime.exportHistory(of: call.name)
        #expect(history.events.map(\.kind) == [.started, .activityScheduled, .activityCompleted, .completed])
        let activity = try #require(try history.activities().first)
        #expect(activity.name == "Step" && activity.scheduledAt == attempts[0].time)
        #expect(activity.attempt == ActivityAttempt(number: 4, startedAt: attempts[3].time))
        #expect(try activity.output(as: String.self) == "ok:x")
        #expect(activity.closedAt == attempts[3].time && activity.closedSequence == 3)
        // Read by people: one line an event.
        let lines = history.description.split(separator: "\n").map(String.init)
        #expect(lines.count == 5 && lines[0] == "CallStep/retry, run 1")
        #expect(lines[2].hasSuffix("ScheduleActivity(id: \(UInt64(1) << 32 | 1), Step, \(activity.input.count) bytes)"), "\(lines)")
        #expect(lines[3] == "3  \(attempts[3].time)  ActivityCompleted(id: \(UInt64(1) << 32 | 1), attempt 4 started at \(attempts[3].time) ns, \((try? activity.outcome?.get())?.count ?? -1) bytes)",
                "\(lines)")
    }

    @Test("a non-retryable error fails at once; maximum attempts is honoured")
    func nonRetryableAndMaximumAttempts() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock()
        let log = AttemptLog()
        let runtime = try runtime(directory, clock, ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: label))
            if label == "fatal" { throw Fatal() }
            throw Flake()
        })
        defer { runtime.close() }
        let fatal = runtime.entity(CallStep.self, id: "fatal")
        try await fatal.start(.init(label: "fatal", options: .retrying(.init(nonRetryableErrorTypes: ["Fatal"]))))
        #expect(try await fatal.result() == "failed:nonRetryable:1:Fatal")
        let limited = runtime.entity(CallStep.self, id: "limited")
        try await limited.start(.init(label: "limited", options: .retrying(.exponential(max: 3))))
        #expect(try await limited.result() == "failed:retriesExhausted:3:Flake")
        #expect(log.all.filter { $0.key == "fatal" }.count == 1)
        #expect(log.all.filter { $0.key == "limited" }.count == 3)
        // Each failure is recorded with the attempt that ended it.
        let failedFatal = try #require(try runtime.exportHistory(of: fatal.name).activities().first)
        #expect(failedFatal.attempt == ActivityAttempt(number: 1, startedAt: log.all.first { $0.key == "fatal" }?.time))
        guard case .failure(let fatalFailure)? = failedFatal.outcome else { Issue.record("no failure recorded"); return }
        #expect(fatalFailure.reason == .nonRetryable && fatalFailure.attempts == 1)
        let failedLimited = try #require(try runtime.exportHistory(of: limited.name).activities().first)
        #expect(failedLimited.attempt == ActivityAttempt(number: 3, startedAt: log.all.last { $0.key == "limited" }?.time))
        #expect(try runtime.exportHistory(of: limited.name).events.map(\.kind) == [.started, .activityScheduled, .activityFailed, .completed])
    }

    @Test("schedule-to-close ends the retries on time")
    func scheduleToClose() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock()
        let log = AttemptLog()
        let runtime = try runtime(directory, clock, ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: label))
            throw Flake()
        })
        defer { runtime.close() }
        let start = clock.nowNanoseconds()
        let call = runtime.entity(CallStep.self, id: "deadline")
        // Attempts at 0 s and 10 s; the next would be at 30 s, past the 25 s deadline.
        try await call.start(.init(label: "d", options: .init(retry: .init(initialInterval: .seconds(10)), scheduleToCloseTimeout: .seconds(25))))
        #expect(try await call.result() == "failed:scheduleToCloseTimeout:2:Flake")
        #expect(log.all.map { ($0.time - start) / 1_000_000_000 } == [0, 10])
        let activity = try #require(try runtime.exportHistory(of: call.name).activities().first)
        #expect(activity.attempt == ActivityAttempt(number: 2, startedAt: start + 10_000_000_000))
    }

    @Test("an entity passivated while its activity runs gets the outcome: the runtime loads it again and the run finishes")
    func outcomeAfterPassivation() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let (started, start) = AsyncStream.makeStream(of: Void.self)
        let (releases, release) = AsyncStream.makeStream(of: Void.self)
        let runtime = try runtime(directory, clock, ActivityStub<Step> { label, _ in
            start.yield()
            for await _ in releases { break }
            return "done:\(label)"
        })
        defer { runtime.close() }
        let call = runtime.entity(CallStep.self, id: "away")
        try await call.start(.init(label: "p", options: .init()))
        var iterator = started.makeAsyncIterator()
        await iterator.next()                       // the attempt runs; the entity waits for its outcome
        #expect(runtime.passivateIdleEntities() == 1)
        #expect(runtime.residentEntities == 0)
        release.yield()
        #expect(try await call.result() == "done:p")
    }

    @Test("a stalled activity is caught by its heartbeat timeout and retried; the new attempt reads the last heartbeat")
    func heartbeatTimeout() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let (heartbeats, heartbeated) = AsyncStream.makeStream(of: Int.self)
        let runtime = try runtime(directory, clock, ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: label, heartbeat: context.lastHeartbeat(as: Int.self)))
            if context.attempt == 1 {
                context.heartbeat(5)            // progress: 5 items done
                heartbeated.yield(5)
                while !context.isCancelled { await Task.yield() }   // then it stalls
                throw CancellationError()
            }
            return "resumed-from-\(context.lastHeartbeat(as: Int.self) ?? -1)"
        })
        defer { runtime.close() }
        let call = runtime.entity(CallStep.self, id: "stalled")
        try await call.start(.init(label: "h", options: .init(retry: .init(initialInterval: .seconds(1)), heartbeatTimeout: .seconds(10))))
        var iterator = heartbeats.makeAsyncIterator()
        #expect(await iterator.next() == 5)
        clock.advance(by: .seconds(11))         // no heartbeat for 10 s: the attempt is timed out
        clock.skipsTimeWhenIdle = true          // then let the retry's backoff pass
        #expect(try await call.result() == "resumed-from-5")
        #expect(log.all.map(\.number) == [1, 2])
        #expect(log.all.last?.heartbeat == 5)
    }

    @Test("after a restart, work waits for late registrations: an activity registered later runs, an outcome for a type registered later is delivered")
    func lateRegistration() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let configuration = EntityRuntime.Configuration.quiet(directory, clock)
        // The first run schedules the activity, and crashes before it ran (it is not registered there).
        let first = try EntityRuntime(configuration: configuration)
        try await first.entity(CallStep.self, id: "late").start(.init(label: "l", options: .default))
        first.simulateCrash()

        // The restart opens with nothing registered; the activity comes later, then the entity type.
        let log = AttemptLog()
        let second = try EntityRuntime(configuration: configuration)
        defer { second.close() }
        let (ran, didRun) = AsyncStream.makeStream(of: Void.self)
        second.register(activity: ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            didRun.yield()
            return "late:\(label)"
        })
        var iterator = ran.makeAsyncIterator()
        _ = await iterator.next()                 // the recovered task ran once its activity was registered
        #expect(try await second.entity(CallStep.self, id: "late").result() == "late:l")
        #expect(log.all.count == 1)
    }

    @Test("a registration racing the recovered attempts loses none: every task parked or still parking runs once it is registered",
          .timeLimit(.minutes(10)))
    func registrationRacesRecovery() async throws {
        for round in 0..<3 {
            let directory = TemporaryDirectory()
            defer { directory.remove() }
            let clock = TestClock(skipsTimeWhenIdle: false)
            let configuration = EntityRuntime.Configuration.quiet(directory, clock)
            let ids = (0..<40).map { "race-\(round)-\($0)" }
            let first = try EntityRuntime(configuration: configuration)
            for id in ids { try await first.entity(CallStep.self, id: id).start(.init(label: id, options: .default)) }
            first.simulateCrash()

            // The pool's drains start the recovered attempts as the runtime opens; the registration
            // comes at once, while some are parking and others are still queued.
            let log = AttemptLog()
            let second = try EntityRuntime(configuration: configuration)
            defer { second.close() }
            second.register(activity: ActivityStub<Step> { label, context in
                log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
                return "ran:\(label)"
            })
            for id in ids { #expect(try await second.entity(CallStep.self, id: id).result() == "ran:\(id)") }
            #expect(log.all.count == ids.count)
            #expect(Set(log.all.map(\.key)).count == ids.count)
        }
    }

    /// Opens the directory again with a `Step` that answers at once; returns the entity's result.
    private func rerun(_ configuration: EntityRuntime.Configuration, id: String, log: AttemptLog, clock: TestClock) async throws -> String {
        let second = try EntityRuntime(configuration: configuration, activities: [ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            return "second:\(label)"
        }])
        defer { second.close() }
        return try await second.entity(CallStep.self, id: id).result()
    }

    @Test("close() does not wait for an activity that never answers: it is cancelled after the grace period, and the next open runs it again with the same idempotency key",
          .timeLimit(.minutes(10)))
    func closeCancelsRunningActivity() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        var configuration = EntityRuntime.Configuration(directory: directory.path, activityGracePeriod: .milliseconds(20), clock: clock, logger: quietLogger)
        configuration.journal.logger = quietLogger
        let log = AttemptLog()
        let (started, didStart) = AsyncStream.makeStream(of: Void.self)
        let cancelled = Mutex(false)
        let silence = Silence()
        defer { silence.finish() }
        let first = try EntityRuntime(configuration: configuration, activities: [ActivityStub<Step> { _, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            didStart.yield()
            do {
                try await silence.wait()  // never answers
            } catch {
                cancelled.withLock { $0 = true }
                throw error
            }
        }])
        try await first.entity(CallStep.self, id: "hang").start(.init(label: "h", options: .default))
        var iterator = started.makeAsyncIterator()
        _ = await iterator.next()
        await first.shutdown()  // returns: the attempt was cancelled
        #expect(cancelled.withLock { $0 })

        #expect(try await rerun(configuration, id: "hang", log: log, clock: clock) == "second:h")
        let attempts = log.all
        // The cancelled attempt recorded nothing: not a failure, not a retry (same attempt number).
        #expect(attempts.count == 2 && attempts.map(\.number) == [1, 1])
        #expect(Set(attempts.map(\.key)).count == 1)
    }

    @Test("an attempt that ignores cancellation is abandoned by close(); its late outcome is dropped and the next open runs it again",
          .timeLimit(.minutes(10)))
    func closeAbandonsStuckActivity() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        var configuration = EntityRuntime.Configuration(directory: directory.path, activityGracePeriod: .zero, clock: clock, logger: quietLogger)
        configuration.journal.logger = quietLogger
        let log = AttemptLog()
        let gate = AsyncGate()
        let (events, event) = AsyncStream.makeStream(of: String.self)
        var iterator = events.makeAsyncIterator()
        do {
            let first = try EntityRuntime(configuration: configuration, activities: [ActivityStub<Step> { _, context in
                log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
                event.yield("started")
                await gate.wait()  // deaf to cancellation
                event.yield("returning")
                return "first"
            }])
            try await first.entity(CallStep.self, id: "stuck").start(.init(label: "s", options: .default))
            #expect(await iterator.next() == "started")
            await first.shutdown()  // returns although the attempt is still running
        }
        // The runtime is gone; the abandoned attempt ends now, and its outcome goes nowhere.
        gate.open()
        #expect(await iterator.next() == "returning")

        #expect(try await rerun(configuration, id: "stuck", log: log, clock: clock) == "second:s")
        let attempts = log.all
        #expect(attempts.count == 2 && Set(attempts.map(\.key)).count == 1)
    }

    @Test("an abandoned attempt that ends after its runtime was released still finds the runtime's core (kept until then), which goes once it ended",
          .timeLimit(.minutes(10)))
    func abandonedAttemptOutlivesRuntime() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        var configuration = EntityRuntime.Configuration(directory: directory.path, activityGracePeriod: .zero, clock: clock, logger: quietLogger)
        configuration.journal.logger = quietLogger
        // A task stored by a runtime that had no such activity registered: it waits for the next open.
        do {
            let first = try EntityRuntime(configuration: configuration)
            try await first.entity(CallStep.self, id: "stuck").start(.init(label: "s", options: .default))
            await first.shutdown()
        }
        let gate = AsyncGate()
        let (events, event) = AsyncStream.makeStream(of: String.self)
        var iterator = events.makeAsyncIterator()
        weak var core: RuntimeCore?
        do {
            // Recovered at open, the attempt runs with no entity in memory: nothing else holds the core.
            let second = try EntityRuntime(configuration: configuration, activities: [ActivityStub<Step> { _, _ in
                event.yield("started")
                await gate.wait()  // deaf to cancellation
                event.yield("returning")
                return "late"
            }])
            core = second.core
            second.core.activities.coreReleased.withLock { $0 = { event.yield("released") } }
            #expect(await iterator.next() == "started")
            await second.shutdown()  // abandons the attempt
        }
        // Released by the application, the runtime's core stays while the abandoned attempt may reach it.
        #expect(core != nil, "the core went while an abandoned attempt could still reach it")
        gate.open()
        #expect(await iterator.next() == "returning")
        // It goes once the attempt's last step on the attempt's thread is done.
        #expect(await iterator.next() == "released")
        #expect(core == nil, "the core is released once the abandoned attempt ended")
    }

    @Test("a simulated crash while an attempt runs: the runtime may be released at once; the attempt, which goes on, still finds the core (kept until it ended); its outcome is dropped, and the next open runs it again with the same key",
          .timeLimit(.minutes(10)))
    func simulatedCrashAbandonsAttempts() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let gate = AsyncGate()
        defer { gate.open() }
        let (events, event) = AsyncStream.makeStream(of: String.self)
        var iterator = events.makeAsyncIterator()
        weak var core: RuntimeCore?
        // A task stored by a runtime that had no such activity registered: at the next open its
        // attempt runs with no entity in memory, so nothing but the runtime holds the core.
        do {
            let first = try EntityRuntime(configuration: .quiet(directory, clock))
            try await first.entity(CallStep.self, id: "crashed").start(.init(label: "c", options: .default))
            await first.shutdown()
        }
        do {
            let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [ActivityStub<Step> { label, context in
                log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
                event.yield("started")
                await gate.wait()
                event.yield("returning")
                return "first:\(label)"
            }])
            core = runtime.core
            runtime.core.activities.coreReleased.withLock { $0 = { event.yield("released") } }
            #expect(await iterator.next() == "started")
            runtime.simulateCrash()
        }
        #expect(core != nil, "the core went while the attempt could still reach it")
        gate.open()
        #expect(await iterator.next() == "returning")
        #expect(await iterator.next() == "released")
        #expect(core == nil, "the core is released once the attempt ended")

        let reopened = try EntityRuntime(configuration: .quiet(directory, clock), activities: [ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            return "second:\(label)"
        }])
        defer { reopened.close() }
        #expect(try await withDeadline(seconds: 60) { try await reopened.entity(CallStep.self, id: "crashed").result() } == "second:c")
        #expect(log.all.map(\.number) == [1, 1] && Set(log.all.map(\.key)).count == 1)
    }
}

/// A one-shot gate that ignores cancellation: `wait()` returns once `open()` was called.
final class AsyncGate: Sendable {
    private struct State {
        var open = false
        var waiters: [CheckedContinuation<Void, Never>] = []
    }
    private let state = Mutex(State())

    func wait() async {
        await withCheckedContinuation { continuation in
            let resume = state.withLock { state -> Bool in
                if state.open { return true }
                state.waiters.append(continuation)
                return false
            }
            if resume { continuation.resume() }
        }
    }

    func open() {
        let waiters = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.open = true
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume() }
    }
}
