@_spi(Testing) @testable import DurableEntities
import DurableEntitiesTesting
import Foundation
import Synchronization
import Testing

/// Calls `Step` once with the options in its input; returns the output, or how the call was refused.
struct CallStepChecked: EntityWorkflow {
    struct State: Codable, Sendable {}
    typealias Input = CallStep.Input
    static func initialState(id: String) -> State { State() }
    static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> String {
        do {
            return try await context.execute(Step.self, input.label, options: input.options)
        } catch let error as EntityError {
            return "refused:\(error.code):\(error.message)"
        }
    }
}

/// A saga-shaped body: one pool activity, and a compensation in its `catch` that acts at once (a
/// local activity). Reports each time its `catch` runs.
struct CompensateOnError: EntityWorkflow {
    struct State: Codable, Sendable {}
    typealias Input = String
    static func initialState(id: String) -> State { State() }
    static let unwinding = AsyncStream.makeStream(of: Void.self)
    static func run(_ input: String, context: WorkflowContext<Self>) async throws -> String {
        do {
            return try await context.execute(Step.self, input)
        } catch {
            unwinding.continuation.yield()
            _ = try? await context.executeLocal(Step.self, "compensate")
            throw error
        }
    }
}

@Suite("Activity options and lifecycle", .timeLimit(.minutes(10)))
struct ActivityLifecycleTests {
    func configuration(_ directory: TemporaryDirectory, _ clock: TestClock) -> EntityRuntime.Configuration {
        EntityRuntime.Configuration.quiet(directory, clock)
    }

    func kinds(_ runtime: EntityRuntime, _ name: EntityName) throws -> [HistoryEvent.Kind] {
        let key = try #require(try runtime.journal.key(for: name))
        return try runtime.journal.events(of: key).compactMap { $0.payload.withUnsafeBytes { HistoryEvent.decode($0)?.kind } }
    }

    @Test("invalid retry policies and timeouts are refused with invalidArgument before anything is scheduled; valid ones run")
    func invalidOptions() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock()
        let log = AttemptLog()
        let runtime = try EntityRuntime(configuration: configuration(directory, clock), activities: [ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: label))
            return "ran:\(label)"
        }])
        defer { runtime.close() }
        let cases: [(id: String, options: ActivityOptions, mentions: String)] = [
            ("zero-interval", .retrying(.init(initialInterval: .zero)), "initial interval"),
            ("small-coefficient", .retrying(.init(backoffCoefficient: 0.5)), "backoff coefficient"),
            ("nan-coefficient", .retrying(.init(backoffCoefficient: .nan)), "backoff coefficient"),
            ("maximum-below-initial", .retrying(.init(initialInterval: .seconds(10), maximumInterval: .seconds(1))), "maximum interval"),
            ("negative-attempts", .retrying(.init(maximumAttempts: -1)), "maximum attempts"),
            ("negative-timeout", .init(startToCloseTimeout: .seconds(-1)), "start-to-close"),
            ("zero-heartbeat", .init(heartbeatTimeout: .zero), "heartbeat"),
        ]
        for (id, options, mentions) in cases {
            let call = runtime.entity(CallStepChecked.self, id: id)
            try await call.start(.init(label: id, options: options))
            let result = try await call.result()
            #expect(result.hasPrefix("refused:invalidArgument:"), "\(id): \(result)")
            #expect(result.contains(mentions), "\(id): \(result)")
            #expect(try !kinds(runtime, call.name).contains(.activityScheduled), "\(id): nothing is scheduled")
        }
        #expect(log.all.isEmpty)
        #expect(try runtime.journal.tasks(prefix: [ActivityTask.keyPrefix]).isEmpty)
        // The same calls with valid options run; "never" is a huge but valid value, not a wrapped one.
        let valid = runtime.entity(CallStepChecked.self, id: "valid")
        try await valid.start(.init(label: "valid", options: .init(retry: .init(initialInterval: .milliseconds(1), backoffCoefficient: 1,
                                                                                  maximumAttempts: 1),
                                                                  startToCloseTimeout: .seconds(Int64.max))))
        #expect(try await valid.result() == "ran:valid")
    }

    @Test("very long durations saturate: a retry delay or timeout of Int64.max seconds lies in the far future, not in the past")
    func durationsSaturate() {
        #expect(Duration.seconds(Int64.max).nanoseconds == UInt64.max)
        #expect(Duration.seconds(-5).nanoseconds == 0)
        #expect(Duration.milliseconds(1_500).nanoseconds == 1_500_000_000)
        #expect(UInt64(10).saturatingAdd(.max) == .max)
        let policy = RetryPolicy(initialInterval: .seconds(Int64.max / 2), backoffCoefficient: 1_000)
        #expect(policy.delay(after: 50) > .seconds(1_000_000_000))
        #expect(RetryPolicy(initialInterval: .seconds(1), backoffCoefficient: 2).delay(after: 3) == .seconds(4))
    }

    @Test("an activity given up while it retries — its entity terminated, or its run cancelled (the body sees ActivityFailure, reason cancelled) — loses its stored task: no attempt runs again, now or after reopen",
          arguments: ["terminate", "cancel"])
    func givenUpActivity(_ how: String) async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let (attempts, attempted) = AsyncStream.makeStream(of: Int.self)
        let stub = ActivityStub<Step> { _, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            attempted.yield(context.attempt)
            throw Flake()
        }
        let configuration = configuration(directory, clock)
        let runtime = try EntityRuntime(configuration: configuration, activities: [stub])
        let call = runtime.entity(CallStep.self, id: "given-up")
        try await call.start(.init(label: "x", options: .retrying(.init(initialInterval: .seconds(1)))))
        var iterator = attempts.makeAsyncIterator()
        #expect(await iterator.next() == 1)
        if how == "terminate" {
            try await call.terminate(reason: "given up")
        } else {
            try await call.cancel()
            // The body's wait ends with a typed failure that says it was a cancellation.
            #expect(try await call.result() == "failed:cancelled:0:CancellationError")
        }
        // Whichever commits first, the retry of attempt 2 or the entity's turn, the task ends deleted.
        _ = await Task.detached { runtime.core.waitUntilIdle() }.value
        #expect(try runtime.journal.tasks(prefix: [ActivityTask.keyPrefix]).isEmpty)
        // The retry timer falls due and finds nothing to run.
        let handed = runtime.core.timers.deliveries
        clock.advance(by: .seconds(10))
        let parked = await Task.detached {
            runtime.core.timers.park(timeout: .seconds(60)) { $0.inFlight == 0 && runtime.core.timers.deliveries > handed }
        }.value
        #expect(parked != nil, "the retry timer was handed over")
        _ = await Task.detached { runtime.core.waitUntilIdle() }.value
        #expect(log.all.map(\.number) == [1])
        runtime.close()
        // Nor does a reopen run it (it would run every stored task that is due).
        let reopened = try EntityRuntime(configuration: configuration, activities: [stub])
        _ = await Task.detached { reopened.core.waitUntilIdle() }.value
        #expect(try reopened.journal.tasks(prefix: [ActivityTask.keyPrefix]).isEmpty)
        reopened.close()
        #expect(log.all.map(\.number) == [1])
        attempted.finish()
    }

    @Test("the running attempt of an activity its run gave up (entity terminated, run cancelled) is cancelled once that is committed — pool attempts with or without timeouts, and a local one that left its turn; it is not retried",
          arguments: ["terminate", "cancel"], ["pool", "pool-timed", "local"])
    func givenUpAttemptIsCancelled(_ how: String, kind: String) async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let silence = Silence()
        defer { silence.finish() }
        let (stub, events) = StallingStep.make(clock: clock, log: log, silence: silence)
        let runtime = try EntityRuntime(configuration: configuration(directory, clock), activities: [stub])
        defer { runtime.close() }
        let options = ActivityOptions(retry: .init(initialInterval: .seconds(1)), startToCloseTimeout: kind == "pool-timed" ? .seconds(600) : nil)
        // The run's controls, whichever entity type runs it.
        let (result, cancel, terminate): (@Sendable () async throws -> String, @Sendable () async throws -> Void, @Sendable () async throws -> Void)
        if kind == "local" {
            let call = runtime.entity(LocalSteps.self, id: "given-up")
            try await call.start(.init(labels: ["x"], options: options))
            (result, cancel, terminate) = ({ try await call.result() }, { try await call.cancel() }, { try await call.terminate(reason: "given up") })
        } else {
            let call = runtime.entity(CallStep.self, id: "given-up")
            try await call.start(.init(label: "x", options: options))
            (result, cancel, terminate) = ({ try await call.result() }, { try await call.cancel() }, { try await call.terminate(reason: "given up") })
        }
        var iterator = events.makeAsyncIterator()
        #expect(await iterator.next() == "started")
        if how == "terminate" {
            try await terminate()
        } else {
            try await cancel()
            #expect(try await result() == "failed:cancelled:0:CancellationError")
        }
        // Without the cancellation the attempt would wait for ever (the test's time limit ends the wait).
        let ended = await iterator.next()
        #expect(ended == "cancelled")
        guard ended == "cancelled" else { return }
        _ = await Task.detached { runtime.core.waitUntilIdle() }.value
        #expect(try runtime.journal.tasks(prefix: [ActivityTask.keyPrefix]).isEmpty)
        // The cancelled attempt's failure is not retried: nothing is due, even much later.
        clock.advance(by: .seconds(3_600))
        _ = await Task.detached { runtime.core.waitUntilIdle() }.value
        #expect(log.all.map(\.number) == [1])
    }

    @Test("a run dropped from memory while it waits (passivation) only unwinds: its catch block's compensation does not run, and the reloaded run finishes")
    func abandonedRunDoesNotCompensate() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let log = AttemptLog()
        let (started, start) = AsyncStream.makeStream(of: Void.self)
        let (releases, release) = AsyncStream.makeStream(of: Void.self)
        let runtime = try EntityRuntime(configuration: configuration(directory, clock), activities: [ActivityStub<Step> { label, context in
            log.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: label))
            if label == "main" {
                start.yield()
                for await _ in releases { break }
            }
            return "done:\(label)"
        }])
        defer { runtime.close() }
        let saga = runtime.entity(CompensateOnError.self, id: "saga")
        try await saga.start("main")
        var iterator = started.makeAsyncIterator()
        await iterator.next()                           // the activity runs; the body waits for it
        #expect(runtime.passivateIdleEntities() == 1)   // the run leaves memory and is abandoned
        var unwound = CompensateOnError.unwinding.stream.makeAsyncIterator()
        await unwound.next()                            // its catch block ran
        release.yield()
        #expect(try await saga.result() == "done:main")  // reloaded from history, it goes on
        // Every attempt started has ended (a detached one counts as busy until it does): only "main" ran.
        _ = await Task.detached { runtime.core.waitUntilIdle() }.value
        #expect(log.all.map(\.key) == ["main"], "the abandoned run's compensation ran")
    }

    @Test("an activity nobody registered fails with notRegistered once its schedule-to-close timeout passes; without one it waits for its registration")
    func unregisteredActivity() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock))
        defer { runtime.close() }
        let bounded = runtime.entity(CallStep.self, id: "bounded")
        try await bounded.start(.init(label: "b", options: .init(scheduleToCloseTimeout: .seconds(30))))
        let waiting = runtime.entity(CallStep.self, id: "waiting")
        try await waiting.start(.init(label: "w", options: .init()))
        clock.advance(by: .seconds(31))
        #expect(try await bounded.result() == "failed:notRegistered:0:notRegistered")
        // Recorded as ended without an attempt.
        #expect(try runtime.exportHistory(of: bounded.name).activities().map(\.attempt) == [ActivityAttempt(number: 0, startedAt: nil)])
        // The other still waits; registering the activity runs it.
        runtime.register(activity: ActivityStub<Step> { label, _ in "late:\(label)" })
        #expect(try await waiting.result() == "late:w")
    }
}
