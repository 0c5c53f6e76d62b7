@testable import DurableEntities
import DurableEntitiesTesting
import Foundation
import LMDB
import Logging
import TestSupport
import Testing

/// Rows an entity's run is owed — an awaited activity's task, the timer of its retry — lost or
/// damaged on disk: the runtime stores them again from what it still trusts (the history, the task)
/// instead of leaving the run waiting for ever.
@Suite("Rows damaged on disk", .timeLimit(.minutes(10)))
struct DamagedRowTests {
    /// A run of `CallStep` whose first attempt failed: closed with its task stored for attempt 2 an
    /// hour on, and that retry's timer. Returns the two rows.
    func runAwaitingRetry(_ directory: TemporaryDirectory, _ clock: TestClock) async throws
        -> (task: (key: [UInt8], value: [UInt8]), timer: (key: [UInt8], value: [UInt8])) {
        let runtime = try EntityRuntime(configuration: .quiet(directory, clock), activities: [ActivityStub<Step> { _, _ in throw Flake() }])
        let call = runtime.entity(CallStep.self, id: "call")
        try await call.start(.init(label: "x", options: .retrying(.init(initialInterval: .seconds(3_600)))))
        _ = await Task.detached { runtime.core.waitUntilIdle() }.value  // the first attempt failed, its retry is stored
        runtime.close()
        let tasks = try tableRows("tasks", directory: directory.path)
        let timers = try tableRows("timers", directory: directory.path)
        try #require(tasks.count == 1 && timers.count == 1)
        return (tasks[0], timers[0])
    }

    /// A runtime on `directory` whose `Step` succeeds (logging each attempt), and whose log
    /// messages at warning level and above that `keep` accepts go to the returned stream.
    func reopen(_ directory: TemporaryDirectory, _ clock: TestClock, attempts: AttemptLog,
                keep: @escaping @Sendable (String) -> Bool) throws -> (EntityRuntime, AsyncStream<String>, AsyncStream<String>.Continuation) {
        var configuration = EntityRuntime.Configuration.quiet(directory, clock)
        let (reports, report) = AsyncStream.makeStream(of: String.self)
        configuration.logger = Logger(label: "test") { _ in MessageStream(level: .warning, continuation: report, keep: keep) }
        let runtime = try EntityRuntime(configuration: configuration, activities: [ActivityStub<Step> { label, context in
            attempts.add(.init(time: clock.nowNanoseconds(), number: context.attempt, key: context.idempotencyKey))
            return "ok:\(label)"
        }])
        return (runtime, reports, report)
    }

    @Test("an awaited activity's task that fails its check is stored again from the run's history and runs; the run finishes")
    func damagedTaskIsStoredAgain() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let (task, _) = try await runAwaitingRetry(directory, clock)
        try editTable("tasks", directory: directory.path) { txn, tasks in
            try txn.put(task.value.enumerated().map { $0.offset == 2 ? $0.element ^ 0x01 : $0.element }, forKey: task.key, in: tasks)
        }

        let attempts = AttemptLog()
        let (runtime, reports, report) = try reopen(directory, clock, attempts: attempts) { $0.contains("task") }
        defer { runtime.close() }
        #expect(try await withDeadline(seconds: 240) { try await runtime.entity(CallStep.self, id: "call").result() } == "ok:x")
        // Its attempt count was in the damaged row: the activity starts over, under the same key.
        #expect(attempts.all.map(\.number) == [1])
        #expect(attempts.all.map(\.key) == ["CallStep/call/\(UInt64(1) << 32 | 1)"])
        #expect(try tableRows("tasks", directory: directory.path).isEmpty)
        report.finish()
        var messages: [String] = []
        for await message in reports { messages.append(message) }
        #expect(messages == ["a stored activity task failed its check (damaged on disk); its entity's history stored it again"])
    }

    /// What happened to a waiting task's retry timer row on disk, and the report that the row was stored again.
    enum RetryTimerDamage: String, CaseIterable, Sendable {
        /// Gone: the open finds the task without its timer and stores the timer again.
        case deleted
        /// Moved to a due time long past (its key damaged): rebuilt from the task once it falls due,
        /// the damaged row deleted. (The open may store the timer first, or find it rebuilt already.)
        case movedToThePast

        var report: String {
            switch self {
            case .deleted: "retry timers of stored activity tasks were missing or damaged; they were stored again"
            case .movedToThePast: "an activity's retry timer failed its check (damaged on disk); it was rebuilt from the activity's task"
            }
        }
    }

    @Test("a task waiting for its retry whose timer row was lost or damaged gets its timer again: the retry runs when due, not before",
          arguments: RetryTimerDamage.allCases)
    func retryTimerIsStoredAgain(_ damage: RetryTimerDamage) async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let (_, timer) = try await runAwaitingRetry(directory, clock)
        try editTable("timers", directory: directory.path) { txn, timers in
            let deleted = try txn.delete(timer.key, in: timers)
            #expect(deleted)
            if damage == .movedToThePast { try txn.put(timer.value, forKey: Key8(1).withBytes { Array($0) } + timer.key.dropFirst(8), in: timers) }
        }

        let attempts = AttemptLog()
        let (runtime, reports, report) = try reopen(directory, clock, attempts: attempts) { $0 == damage.report }
        defer { runtime.close() }
        #expect(try await firstMessages(1, of: reports) == [damage.report])
        #expect(try tableRows("timers", directory: directory.path).map(\.key) == [timer.key], "the same row, at its due time")
        #expect(attempts.all.isEmpty, "not due yet")
        clock.advance(by: .seconds(3_600))
        #expect(try await withDeadline(seconds: 240) { try await runtime.entity(CallStep.self, id: "call").result() } == "ok:x")
        #expect(attempts.all.map(\.number) == [2], "the attempt count survived")
        report.finish()
        #expect(try await firstMessages(1, of: reports).isEmpty, "reported once")
    }
}

/// The first `count` messages of `stream` (fewer if it finishes first); throws after `seconds`.
func firstMessages(_ count: Int, of stream: AsyncStream<String>, seconds: Double = 240,
                   fileID: String = #fileID, line: Int = #line) async throws -> [String] {
    try await withDeadline(seconds: seconds, fileID: fileID, line: line) {
        var messages: [String] = []
        for await message in stream {
            messages.append(message)
            if messages.count == count { break }
        }
        return messages
    }
}
