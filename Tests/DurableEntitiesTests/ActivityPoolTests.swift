@testable import DurableEntities
import DurableEntitiesTesting
import Foundation
import Synchronization
import Testing

/// The pool that runs activities outside the shards: its bound, its queue, and attempts that wait.
@Suite("Activity pool")
struct ActivityPoolTests {
    /// Attempts of the gated `Step` stub: each reports its start and waits for its label's gate.
    final class GatedSteps: Sendable {
        private struct State {
            var gates: [String: AsyncGate] = [:]
            var running = 0
            var mostAtOnce = 0
        }
        private let state = Mutex(State())
        let started: AsyncStream<String>
        private let didStart: AsyncStream<String>.Continuation

        init() { (started, didStart) = AsyncStream.makeStream(of: String.self) }

        func gate(_ label: String) -> AsyncGate {
            state.withLock { state in
                if let gate = state.gates[label] { return gate }
                let gate = AsyncGate()
                state.gates[label] = gate
                return gate
            }
        }

        var mostAtOnce: Int { state.withLock { $0.mostAtOnce } }

        func stub() -> ActivityStub<Step> {
            ActivityStub<Step> { [self] label, _ in
                state.withLock { state in
                    state.running += 1
                    state.mostAtOnce = max(state.mostAtOnce, state.running)
                }
                didStart.yield(label)
                await gate(label).wait()
                state.withLock { $0.running -= 1 }
                return "done:\(label)"
            }
        }
    }

    /// Waits until every commit submitted so far has had its completions run (they run in order, and
    /// the activities a turn schedules are queued in its commit's completion): one more committed turn.
    /// A quiet runtime in `directory` whose pool runs `limit` attempts at once, with `steps` as `Step`.
    private func open(_ directory: TemporaryDirectory, limit: Int, _ steps: GatedSteps) throws -> EntityRuntime {
        var configuration = EntityRuntime.Configuration(directory: directory.path, maxConcurrentActivities: limit, logger: quietLogger)
        configuration.journal.logger = quietLogger
        return try EntityRuntime(configuration: configuration, activities: [steps.stub()])
    }

    private func afterPendingCompletions(_ runtime: EntityRuntime) async throws {
        try await runtime.entity(Account.self, id: "barrier").signal(.deposit(1))
    }

    @Test("at most maxConcurrentActivities attempts run at once; the others wait in the queue and start as slots free",
          .timeLimit(.minutes(10)))
    func boundedConcurrency() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let steps = GatedSteps()
        let runtime = try open(directory, limit: 3, steps)
        defer { runtime.close() }
        runtime.register(Account.self)
        let labels = (0..<6).map { "s\($0)" }
        for label in labels { try await runtime.entity(CallStep.self, id: label).start(.init(label: label, options: .default)) }

        var started = steps.started.makeAsyncIterator()
        var running: [String] = []
        for _ in 0..<3 { running.append(await started.next()!) }
        try await afterPendingCompletions(runtime)
        // Every attempt is dispatched: three run, three wait.
        let counts = runtime.core.activities.poolCounts
        #expect(counts.running == 3 && counts.queued == 3)

        // Each attempt that ends lets exactly one queued attempt start.
        var finished: Set<String> = []
        while finished.count < labels.count {
            let next = running.removeFirst()
            steps.gate(next).open()
            finished.insert(next)
            #expect(try await runtime.entity(CallStep.self, id: next).result() == "done:\(next)")
            if finished.count + running.count < labels.count { running.append(await started.next()!) }
        }
        #expect(steps.mostAtOnce == 3)
        #expect(Set(labels) == finished)
        let after = runtime.core.activities.poolCounts
        #expect(after.queued == 0)
    }

    @Test("attempts that wait for something outside do not hold the pool's threads: a quick activity completes while 16 others wait",
          .timeLimit(.minutes(10)))
    func waitingAttemptsDoNotBlockOthers() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let steps = GatedSteps()
        let runtime = try open(directory, limit: 64, steps)
        defer { runtime.close() }
        let waiting = (0..<16).map { "w\($0)" }
        for label in waiting { try await runtime.entity(CallStep.self, id: label).start(.init(label: label, options: .default)) }
        var started = steps.started.makeAsyncIterator()
        var seen: Set<String> = []
        for _ in waiting { seen.insert(await started.next()!) }
        #expect(seen == Set(waiting))
        // All 16 are waiting on their gates (more than this machine has processors, so more than
        // the pool has drains); one more attempt still runs and ends.
        steps.gate("quick").open()
        let quick = runtime.entity(CallStep.self, id: "quick")
        try await quick.start(.init(label: "quick", options: .default))
        #expect(try await quick.result() == "done:quick")
        for label in waiting { steps.gate(label).open() }
        for label in waiting { #expect(try await runtime.entity(CallStep.self, id: label).result() == "done:\(label)") }
        // The quick attempt ran while the 16 waited.
        #expect(steps.mostAtOnce == 17)
    }
}

@Suite("Activity pool bookkeeping")
struct ActivityPoolBookkeepingTests {
    func task(activity: UInt64, attempt: Int) -> ActivityTask {
        var task = ActivityRecordTests.task(heartbeat: nil, error: nil)
        task.activityID = activity
        task.attempt = attempt
        return task
    }

    /// Dispatches attempt `attempt` of task `activity`: whether it was queued.
    func dispatch(_ pool: inout ActivityWorker.Pool, _ activity: UInt64, attempt: Int) -> Bool {
        pool.enqueue(task(activity: activity, attempt: attempt))
    }

    /// Takes the next queued task as a drain does, counting its slot.
    func take(_ pool: inout ActivityWorker.Pool) -> ActivityTask? {
        guard let next = pool.queue.popFirst() else { return nil }
        pool.attempts += 1
        return next
    }

    @Test("a task's next attempt, dispatched by its retry timer while the attempt before still holds its slot, is queued as that slot ends")
    func followingAttemptWaitsForTheSlot() throws {
        var pool = ActivityWorker.Pool()
        #expect(dispatch(&pool, 1, attempt: 1))
        let first = try #require(take(&pool))
        // The first attempt failed and stored its retry; the timer fires before the drain ended its slot.
        #expect(!dispatch(&pool, 1, attempt: 2))
        #expect(pool.queue.isEmpty)
        pool.endSlot(first.id)
        #expect(pool.queue.map(\.attempt) == [2])
        #expect(pool.active[first.id] == 2)
        let second = try #require(take(&pool))
        pool.endSlot(second.id)
        #expect(pool.active.isEmpty && pool.following.isEmpty && pool.queue.isEmpty && pool.attempts == 0)
    }

    @Test("a task dispatched again at the attempt it is running or queued at is left alone: it never runs twice at once")
    func sameAttemptIsLeftAlone() throws {
        var pool = ActivityWorker.Pool()
        #expect(dispatch(&pool, 1, attempt: 3))
        #expect(!dispatch(&pool, 1, attempt: 3))  // queued
        #expect(pool.queue.count == 1)
        let running = try #require(take(&pool))
        #expect(!dispatch(&pool, 1, attempt: 3))  // running
        #expect(!dispatch(&pool, 1, attempt: 2))  // an older attempt
        pool.endSlot(running.id)
        #expect(pool.queue.isEmpty && pool.active.isEmpty && pool.following.isEmpty)
        // Another task is not held up by it.
        #expect(dispatch(&pool, 2, attempt: 1))
    }

    @Test("closing queues nothing: a following attempt dispatched while closing stays stored for the next open")
    func closingQueuesNothing() throws {
        var pool = ActivityWorker.Pool()
        #expect(dispatch(&pool, 1, attempt: 1))
        let running = try #require(take(&pool))
        pool.closing = true
        #expect(!dispatch(&pool, 1, attempt: 2))
        #expect(!dispatch(&pool, 2, attempt: 1))
        pool.endSlot(running.id)
        #expect(pool.queue.isEmpty && pool.following.isEmpty)
    }
}
