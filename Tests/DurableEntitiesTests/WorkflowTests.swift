@testable import DurableEntities
import DurableEntitiesTesting
import Foundation
import LMDB
import Logging
import Synchronization
import TestSupport
import Testing

/// A transfer approval: waits up to 24 hours for an approval signal.
struct Approval: EntityWorkflow {
    struct State: Codable, Sendable, Equatable {
        var approved = false
        var reminders = 0
        var outcome: String?
    }
    enum Signal: Codable, Sendable { case approve }
    struct Input: Codable, Sendable { var amount: Int64 }
    enum Output: Codable, Sendable, Equatable { case approved(reference: String), expired }

    static func initialState(id: String) -> State { State() }
    static func handle(_ signal: Signal, state: inout State, context: EntityContext) throws {
        state.approved = true
    }
    static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> Output {
        // A reminder after 1 hour, expiry after 24.
        if try await context.condition(timeout: .seconds(3_600), { $0.approved }) == false {
            context.updateState { $0.reminders += 1 }
            guard try await context.condition(timeout: .seconds(23 * 3_600), { $0.approved }) else {
                context.updateState { $0.outcome = "expired" }
                return .expired
            }
        }
        let reference = try context.sideEffect { "ref-\(input.amount)-\(UUID().uuidString.prefix(8))" }
        context.updateState { $0.outcome = reference }
        return .approved(reference: reference)
    }
}

/// Sleeps, then reports.
struct Reminder: EntityWorkflow {
    struct State: Codable, Sendable {}
    struct Input: Codable, Sendable { var after: Duration }
    static func initialState(id: String) -> State { State() }
    static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> String {
        // Half by duration, then until a deadline fixed at the start: both are durable timers.
        let deadline = context.nowNanoseconds + input.after.nanoseconds
        try await context.sleep(for: input.after / 2)
        try await context.sleep(untilNanoseconds: deadline)
        return "reminded"
    }
}

/// Waits for an approval against deadlines fixed when it began: escalates at 1 hour, gives up at 2,
/// then asks once more with the first deadline, long past. Reports each wait's answer.
struct Escalation: EntityWorkflow {
    struct State: Codable, Sendable { var approved = false; var escalated = false }
    enum Signal: Codable, Sendable { case approve }
    static func initialState(id: String) -> State { State() }
    static func handle(_ signal: Signal, state: inout State, context: EntityContext) throws { state.approved = true }
    static func run(_ input: Int, context: WorkflowContext<Self>) async throws -> String {
        let since = context.nowNanoseconds
        let hour: UInt64 = 3_600 * 1_000_000_000
        let first = try await context.condition(untilNanoseconds: since + hour) { $0.approved }
        if !first { context.updateState { $0.escalated = true } }
        let second = try await context.condition(untilNanoseconds: since + 2 * hour) { $0.approved }
        let late = try await context.condition(untilNanoseconds: since + hour) { $0.approved }
        return "\(first),\(second),\(late)"
    }
}

/// Sleeps once, then reports: a second timer-driven type beside ``Reminder``.
struct Nap: EntityWorkflow {
    struct State: Codable, Sendable {}
    static func initialState(id: String) -> State { State() }
    static func run(_ input: Duration, context: WorkflowContext<Self>) async throws -> String {
        try await context.sleep(for: input)
        return "woke"
    }
}

/// Sleeps, then reports its wake-up through `Step` (a local activity): a test counts wake-ups from
/// the activity's stub, without holding every sleeper in memory by awaiting its result.
struct ReportingSleeper: EntityWorkflow {
    struct State: Codable, Sendable {}
    static func initialState(id: String) -> State { State() }
    static func run(_ input: Duration, context: WorkflowContext<Self>) async throws -> String {
        try await context.sleep(for: input)
        return try await context.executeLocal(Step.self, context.id)
    }
}

/// Holds the journal's LMDB write lock from a thread of its own until released: the journal's writer
/// stops at its next commit, so nothing the runtime submits meanwhile becomes durable.
final class WriterStall: Sendable {
    private let held = DispatchSemaphore(value: 0)
    private let released = DispatchSemaphore(value: 0)

    init(_ environment: LMDB.Environment) {
        Thread { [held, released] in
            _ = try? environment.write { _ in
                held.signal()
                released.wait()
            }
        }.start()
    }

    /// Returns once the write lock is held.
    func hold() async {
        await Task.detached { [self] in waitUntilHeld() }.value
    }
    private func waitUntilHeld() { held.wait() }

    /// Lets the writer go on (again: nothing, the lock's thread has gone and a spare signal is harmless).
    func release() { released.signal() }
}

@Suite("Workflow run bodies", .timeLimit(.minutes(10)))
struct WorkflowTests {
    func configuration(_ directory: TemporaryDirectory, clock: TestClock) -> EntityRuntime.Configuration {
        EntityRuntime.Configuration.quiet(directory, clock)
    }

    @Test("a caller waiting for a run's result when the runtime closes gets closed, not a wait for ever; the run goes on at the next open")
    func resultWaitEndsAtClose() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let runtime = try EntityRuntime(configuration: configuration(directory, clock: clock))
        let nap = runtime.entity(Nap.self, id: "n")
        try await nap.start(.seconds(3_600))
        // The caller's wait, queued from here (as `result()` queues it): once the runtime is idle, the
        // run's entity holds it.
        let (replies, reply) = AsyncStream.makeStream(of: Result<any Sendable, EntityError>.self)
        _ = runtime.core.enqueue(.result { reply.yield($0) }, to: Nap.self, nap.name)
        _ = await Task.detached { runtime.core.waitUntilIdle() }.value
        #expect(runtime.core.residentCell(Nap.self, nap.name)?.cell.withLock { $0.resultWaiters.count } == 1)
        await runtime.shutdown()
        var answers = replies.makeAsyncIterator()
        guard case .failure(let error)? = await answers.next() else {
            Issue.record("the wait ended with a result")
            return
        }
        #expect(error.code == .closed)
        let reopened = try EntityRuntime(configuration: configuration(directory, clock: clock))
        defer { reopened.close() }
        clock.advance(by: .seconds(3_600))
        #expect(try await reopened.entity(Nap.self, id: "n").result() == "woke")
    }

    @Test("a query answers while the body waits on a 24-hour timer; the wait expires in milliseconds")
    func approvalExpires() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let runtime = try EntityRuntime(configuration: configuration(directory, clock: clock))
        defer { runtime.close() }
        let approval = runtime.entity(Approval.self, id: "t-1")
        try await approval.start(.init(amount: 50_000))
        #expect(try await approval.query { $0 } == Approval.State())
        // Now let every wait run out: the clock jumps to each timer as soon as everything waits.
        let started = ContinuousClock.now
        let before = clock.nowNanoseconds()
        clock.skipsTimeWhenIdle = true
        #expect(try await approval.result() == .expired)
        #expect(clock.nowNanoseconds() - before >= 24 * 3_600 * 1_000_000_000)
        // Alone it takes milliseconds. The bound is loose because the whole suite shares two cores,
        // on a host that can starve them (51.7 s was seen with two busy loops beside the suite); a
        // real wait for the 24 hours, or for one of them, would still fail it by a factor of 12 or more.
        #expect(ContinuousClock.now - started < .seconds(300))
        #expect(try await approval.query { $0 } == Approval.State(approved: false, reminders: 1, outcome: "expired"))
    }

    @Test("an approval signal ends the wait early, cancels the timer, and the outcome survives a reopen")
    func approvedBySignal() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let reference: String
        do {
            let runtime = try EntityRuntime(configuration: configuration(directory, clock: clock))
            let approval = runtime.entity(Approval.self, id: "t-2")
            try await approval.start(.init(amount: 7))
            try await approval.signal(.approve)
            guard case .approved(let ref) = try await approval.result() else {
                Issue.record("expected an approval")
                return
            }
            reference = ref
            #expect(try runtime.journal.timers().isEmpty, "the timeout timer was cancelled")
            runtime.close()
        }
        // Replay after a reopen returns the recorded side effect, not a new UUID.
        let runtime = try EntityRuntime(configuration: configuration(directory, clock: clock))
        defer { runtime.close() }
        let approval = runtime.entity(Approval.self, id: "t-2")
        #expect(try await approval.result() == .approved(reference: reference))
        #expect(try await approval.query(\.outcome) == reference)
    }

    @Test("with a test clock that skips idle time, a 24-hour wait completes at once")
    func idleTimeIsSkipped() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: true)
        let runtime = try EntityRuntime(configuration: configuration(directory, clock: clock))
        defer { runtime.close() }
        let approval = runtime.entity(Approval.self, id: "t-3")
        let before = clock.nowNanoseconds()
        try await approval.start(.init(amount: 1))
        #expect(try await approval.result() == .expired)
        #expect(clock.nowNanoseconds() - before >= 24 * 3_600 * 1_000_000_000)
    }

    @Test("condition(untilNanoseconds:) keeps deadlines fixed at the start across waits: timers due at exactly 1 h and 2 h, a passed deadline answers false without a timer, an approval in time answers true")
    func conditionUntilDeadline() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let runtime = try EntityRuntime(configuration: configuration(directory, clock: clock))
        defer { runtime.close() }
        let hour: UInt64 = 3_600 * 1_000_000_000
        let lapsed = runtime.entity(Escalation.self, id: "lapsed")
        let since = clock.nowNanoseconds()
        try await lapsed.start(1)  // its first timer is stored when this returns
        clock.advance(by: .seconds(3_600))
        _ = try await withDeadline(seconds: 60) { try await lapsed.awaitState { $0.escalated } }  // recorded with the second timer
        clock.advance(by: .seconds(3_600))
        #expect(try await lapsed.result() == "false,false,false")
        let events = try runtime.exportHistory(of: lapsed.name).decodedEvents().map(\.event)
        let timers = events.filter { $0.kind == .timerStarted }.compactMap { $0.command }
        #expect(timers.map(\.description) == ["StartTimer(id: \(UInt64(1) << 32 | 1), due: \(since + hour))",
                                               "StartTimer(id: \(UInt64(1) << 32 | 2), due: \(since + 2 * hour))"])
        #expect(events.filter { $0.kind == .timerFired }.map(\.timeNanoseconds) == [since + hour, since + 2 * hour])

        let approved = runtime.entity(Escalation.self, id: "approved")
        try await approved.start(1)
        try await approved.signal(.approve)
        #expect(try await approved.result() == "true,true,true")
        #expect(try await !approved.query(\.escalated))
    }

    @Test("a timer that fell due while the process was down fires right after reopen")
    func timerDueDuringDowntime() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        do {
            let runtime = try EntityRuntime(configuration: configuration(directory, clock: clock))
            try await runtime.entity(Reminder.self, id: "r-1").start(.init(after: .seconds(3_600)))
            #expect(try runtime.journal.timers().count == 1)
            runtime.close()
        }
        clock.advance(by: .seconds(2 * 3_600))     // "downtime": the first timer is now overdue
        let runtime = try EntityRuntime(configuration: configuration(directory, clock: clock))
        defer { runtime.close() }
        // Nobody sends it anything: the timer service activates the entity on its own.
        let reminder = runtime.entity(Reminder.self, id: "r-1")
        #expect(try await reminder.result() == "reminded")
        #expect(try runtime.journal.timers().isEmpty)
    }

    @Test("pending timers cost disk, not memory: 5,000 sleepers stay within a resident bound of 250; when all fall due at once, the timers in flight stop at the cap while nothing can commit, and every one fires once",
          .timeLimit(.minutes(10)))
    func pendingTimersCostDisk() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let sleepers = 5_000
        let bound = 250
        var configuration = configuration(directory, clock: clock)
        configuration.maxResidentEntities = bound
        let runtime = try EntityRuntime(configuration: configuration, entityTypes: [ReportingSleeper.self])
        defer { runtime.close() }
        // Wake-ups, and the most entities resident at one (registered once the runtime is there to ask).
        let (woke, report) = AsyncStream.makeStream(of: String.self)
        let peak = Mutex(0)
        runtime.register(activity: ActivityStub<Step> { [weak runtime] id, _ in
            let now = runtime?.residentEntities ?? 0
            peak.withLock { $0 = max($0, now) }
            report.yield(id)
            return "woke:\(id)"
        })
        try await withThrowingTaskGroup(of: Void.self) { group in
            for worker in 0..<8 {
                group.addTask {
                    for n in stride(from: worker, to: sleepers, by: 8) {
                        try await runtime.entity(ReportingSleeper.self, id: "s-\(n)").start(.seconds(3_600))
                    }
                }
            }
            try await group.waitForAll()
        }
        // Asleep: on disk, not in memory.
        #expect(try runtime.journal.timers().count == sleepers)
        #expect(runtime.residentEntities <= bound + configuration.shards)

        // All fall due at once, first with the journal's writer stalled: no firing becomes durable, so
        // no delivery ends, and the timer service stops at its cap instead of loading every sleeper.
        let stall = WriterStall(runtime.journal.environment)
        defer { stall.release() }
        await stall.hold()
        clock.advance(by: .seconds(2 * 3_600))
        let stalled = await Task.detached { runtime.core.timers.park(timeout: .seconds(60)) { $0.inFlight > 0 }?.inFlight }.value
        #expect(stalled == TimerService.maxInFlight, "\(stalled.map(String.init) ?? "no") timers on their way with nothing durable")
        #expect(runtime.residentEntities <= bound + TimerService.maxInFlight + configuration.shards)
        #expect(try runtime.journal.timers().count == sleepers)
        // The writer goes on. A delivered timer makes its entity resident until its turn is done.
        stall.release()
        var seen: Set<String> = []
        var wakeUps = woke.makeAsyncIterator()
        while seen.count < sleepers, let id = await wakeUps.next() {
            #expect(seen.insert(id).inserted, "\(id) woke twice")
        }
        #expect(seen.count == sleepers)
        // At most so many timers were on their way at once, and so the resident set stayed bounded too.
        let inFlight = runtime.core.timers.mostInFlight
        #expect(inFlight > 0 && inFlight <= TimerService.maxInFlight, "\(inFlight) timers in flight at once")
        let most = peak.withLock { $0 }
        #expect(most <= bound + TimerService.maxInFlight + configuration.shards, "\(most) entities resident at once")
        // Every run ended with its wake-up's turn durable, and so did its timer's deletion.
        try await withThrowingTaskGroup(of: Void.self) { group in
            for worker in 0..<8 {
                group.addTask {
                    for n in stride(from: worker, to: sleepers, by: 8) {
                        let result = try await runtime.entity(ReportingSleeper.self, id: "s-\(n)").result()
                        #expect(result == "woke:s-\(n)")
                    }
                }
            }
            try await group.waitForAll()
        }
        #expect(try runtime.journal.timers().isEmpty)
        #expect(runtime.residentEntities <= bound + configuration.shards)
    }

    @Test("timers no entity owns (a damaged journal) are set aside and kept: the due timers after them still fire",
          .timeLimit(.minutes(10)))
    func orphanTimersAreSetAside() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let runtime = try EntityRuntime(configuration: configuration(directory, clock: clock))
        defer { runtime.close() }
        // More orphans than fit in flight, due before the nap's timer: keys registered in the journal
        // with no entity's metadata under them.
        let orphans = TimerService.maxInFlight + 10
        var batch = JournalBatch()
        for n in 0..<orphans {
            let key = try await runtime.journal.register(EntityName(type: "Orphan", id: "o-\(n)"))
            batch.scheduleTimer(JournalTimer(dueNanoseconds: clock.nowNanoseconds() + 1, entity: key, id: 1))
        }
        _ = try await runtime.journal.commit(batch)
        let nap = runtime.entity(Nap.self, id: "nap")
        try await nap.start(.seconds(60))
        clock.advance(by: .seconds(120))
        #expect(try await withDeadline(seconds: 240) { try await nap.result() } == "woke")
        #expect(try runtime.journal.timers().count == orphans, "the orphans are kept, not fired or dropped")
    }

    @Test("""
        a timer whose row fails its check is never fired: its entity's history stores it again (a due time damaged \
        into an earlier one, a damaged check), and a damaged row no entity claims is set aside and reported once
        """)
    func damagedTimersAreRepaired() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let naps: [(id: String, after: Duration)] = [("check", .seconds(10)), ("id", .seconds(20)), ("soon", .seconds(60)), ("due", .seconds(3_600))]
        do {
            let runtime = try EntityRuntime(configuration: configuration(directory, clock: clock))
            defer { runtime.close() }
            for nap in naps { try await runtime.entity(Nap.self, id: nap.id).start(nap.after) }
            #expect(try runtime.journal.timers().count == naps.count)
        }
        // Damage, as a disk could leave it: `check`'s check flipped in place; `id`'s row under another
        // timer id of its entity; `due`'s row moved to a due time before `soon`'s.
        let rows = try tableRows("timers", directory: directory.path)
        try #require(rows.count == naps.count)
        let (check, id, soon, due) = (rows[0], rows[1], rows[2], rows[3])
        let soonDue = soon.key.withUnsafeBytes { $0.bigEndianUInt64(at: 0) }
        let dueEntity = EntityKey(rawValue: due.key.withUnsafeBytes { $0.bigEndianUInt64(at: 8) })
        let otherID = id.key.prefix(16) + Key8(id.key.withUnsafeBytes { $0.bigEndianUInt64(at: 16) } + 7).withBytes { Array($0) }
        let earlier = Key8(soonDue - 1_000_000_000).withBytes { Array($0) } + due.key.dropFirst(8)
        try editTable("timers", directory: directory.path) { txn, timers in
            try txn.put(check.value.enumerated().map { $0.offset == 0 ? $0.element ^ 0x10 : $0.element }, forKey: check.key, in: timers)
            #expect(try txn.delete(id.key, in: timers))
            try txn.put(id.value, forKey: Array(otherID), in: timers)
            #expect(try txn.delete(due.key, in: timers))
            try txn.put(due.value, forKey: earlier, in: timers)
        }

        var configuration = configuration(directory, clock: clock)
        let (reports, report) = AsyncStream.makeStream(of: String.self)
        configuration.logger = Logger(label: "test") { _ in
            MessageStream(level: .warning, continuation: report, tag: "entity.id") { $0.contains("timer") }
        }
        let runtime = try EntityRuntime(configuration: configuration)
        defer { runtime.close() }
        let asleep = try runtime.journal.latestSequence(of: dueEntity)
        clock.advance(by: .seconds(120))
        for nap in ["check", "id", "soon"] {
            #expect(try await withDeadline(seconds: 240) { try await runtime.entity(Nap.self, id: nap).result() } == "woke")
        }
        // `due`'s damaged row is claimed by its entity, and `id`'s moved row by none. `check`'s row is
        // claimed too when the timer service reaches it first; when `check`'s load (for the result
        // above) comes first, the load stores the row again in place and the service finds it intact.
        let claimed = "a stored timer failed its check (damaged on disk); its entity's history stored it again"
        let unclaimed = "a stored timer fails its check (damaged on disk) and no entity claims it; it is set aside and not fired"
        var messages = try await withDeadline(seconds: 240) {
            var messages: [String] = []
            for await message in reports {
                messages.append(message)
                if messages.contains(unclaimed), messages.contains("\(claimed) [due]") { break }
            }
            return messages
        }
        #expect(try runtime.journal.latestSequence(of: dueEntity) == asleep, "the long nap did not wake early")
        let left = try runtime.journal.timers()
        #expect(left.map(\.isIntact) == [false, true], "the unclaimed row is kept; the long nap's timer is stored again")
        #expect(left.last.map { [$0.dueNanoseconds, $0.entity.rawValue, $0.id] } == due.key.withUnsafeBytes {
            [$0.bigEndianUInt64(at: 0), $0.bigEndianUInt64(at: 8), $0.bigEndianUInt64(at: 16)]
        }, "at its own due time")
        clock.advance(by: .seconds(3_600))
        #expect(try await withDeadline(seconds: 240) { try await runtime.entity(Nap.self, id: "due").result() } == "woke")
        report.finish()
        messages += try await firstMessages(.max, of: reports)
        #expect(messages.filter { $0 == unclaimed }.count == 1, "the unclaimed row was reported once: \(messages)")
        #expect(messages.filter { $0 != unclaimed }.sorted() == ["check", "due"].compactMap { nap in
            let message = "\(claimed) [\(nap)]"
            return nap == "check" && !messages.contains(message) ? nil : message
        }, "claimed once each, by the entities whose rows they were: \(messages)")
    }

    @Test("due timers of a type never registered do not hold back the due timers after them, however many come first",
          .timeLimit(.minutes(10)))
    func unregisteredTimersDoNotStarve() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let reminders = TimerService.maxInFlight + 76  // more than the timer service hands over at once
        do {
            let runtime = try EntityRuntime(configuration: configuration(directory, clock: clock))
            try await withThrowingTaskGroup(of: Void.self) { group in
                for n in 0..<reminders {
                    group.addTask { try await runtime.entity(Reminder.self, id: "r-\(n)").start(.init(after: .seconds(3_600))) }
                }
                try await group.waitForAll()
            }
            // Due after every reminder's first timer (at 30 minutes).
            try await runtime.entity(Nap.self, id: "nap").start(.seconds(3_000))
            #expect(try runtime.journal.timers().count == reminders + 1)
            runtime.close()
        }
        clock.advance(by: .seconds(2 * 3_600))
        // Reopened by a program that no longer has `Reminder`: its timers are due, and wait.
        let runtime = try EntityRuntime(configuration: configuration(directory, clock: clock))
        defer { runtime.close() }
        let nap = runtime.entity(Nap.self, id: "nap")
        #expect(try await withDeadline(seconds: 240) { try await nap.result() } == "woke")
        #expect(try runtime.journal.timers().count == reminders)
        // Registered at last, the reminders' timers fire too (more than fit in flight at once).
        try await withThrowingTaskGroup(of: String.self) { group in
            for n in 0..<reminders { group.addTask { try await runtime.entity(Reminder.self, id: "r-\(n)").result() } }
            for try await result in group { #expect(result == "reminded") }
        }
        #expect(try runtime.journal.timers().isEmpty)
    }
}
