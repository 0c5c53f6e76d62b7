@_spi(Testing) import DurableEntities
import DurableEntitiesTesting
import Foundation
import Synchronization
import TestSupport
import Testing

@testable import BankSample

/// A large transfer's wait for an approver: a reminder after 4 hours, the end after 24 counted from
/// the same start, and transfers that began waiting before reminders existed.
@Suite("Bank approvals")
struct BankApprovalTests {
    /// Reminders the bank delivered, in order.
    final class Inbox: Sendable {
        private let reminders = Mutex<[ApprovalReminder]>([])
        /// While set, the approvers' chat is down: a delivery throws ``ChatDown``.
        private let down = Mutex(false)
        /// One element per delivery that failed.
        let failures: AsyncStream<Void>
        private let failed: AsyncStream<Void>.Continuation
        struct ChatDown: Error {}

        init() { (failures, failed) = AsyncStream.makeStream(of: Void.self) }
        func deliver(_ reminder: ApprovalReminder) throws {
            guard !down.withLock({ $0 }) else {
                failureTotal.withLock { $0 += 1 }
                failed.yield()
                throw ChatDown()
            }
            reminders.withLock { $0.append(reminder) }
        }
        func setDown(_ isDown: Bool) { down.withLock { $0 = isDown } }
        /// How many deliveries failed.
        var failureCount: Int { failureTotal.withLock { $0 } }
        private let failureTotal = Mutex(0)
        var all: [ApprovalReminder] { reminders.withLock { $0 } }
    }

    func openBank(_ directory: TemporaryDirectory, _ clock: TestClock, _ inbox: Inbox) throws -> Bank {
        try Bank(configuration: .init(directory: directory.path, shards: 2, clock: clock, logger: BankFixture.quiet),
                 approvalThreshold: 5_000, onReminder: inbox.deliver)
    }

    /// The transfer once its state satisfies `condition` (the runtime resumes the wait when a turn
    /// commits it; nothing polls). The wait's own timeout runs on the test clock, which only the
    /// test moves: a watchdog of 60 s real time fails the test instead of letting it hang.
    func awaitTransfer(_ bank: Bank, _ id: String, line: Int = #line,
                       _ condition: @escaping @Sendable (Transfer.State) -> Bool) async throws -> Transfer.State {
        let transfer = bank.runtime.entity(Transfer.self, id: id)
        return try await withDeadline(seconds: 60, line: line) { try await transfer.awaitState(timeout: .seconds(365 * 86_400), where: condition) }
    }

    /// The transfer once it has ended.
    func awaitEnd(_ bank: Bank, _ id: String, line: Int = #line) async throws -> Transfer.State {
        try await awaitTransfer(bank, id, line: line) { $0.status.isTerminal }
    }

    /// alice gets $90; t-1 moves $60 of it to bob, which waits for an approval (the threshold is $50).
    func startWaitingTransfer(_ bank: Bank, sourceLocation: SourceLocation = #_sourceLocation) async throws {
        _ = try await bank.deposit(account: "alice", cents: 9_000, requestId: "d-1")
        _ = try await bank.startTransfer(id: "t-1", from: "alice", to: "bob", cents: 6_000)
        #expect(try await bank.awaitTransferSettled("t-1").status == "awaiting_approval", sourceLocation: sourceLocation)
    }

    /// A fresh bank on the test clock, for `body`.
    func withBank(_ body: (Bank, TestClock, Inbox) async throws -> Void) async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let inbox = Inbox()
        let bank = try openBank(directory, clock, inbox)
        defer { bank.close() }
        try await body(bank, clock, inbox)
    }

    /// A fresh bank on the test clock with t-1 waiting for an approval, for `body`.
    func withWaitingTransfer(_ body: (Bank, TestClock, Inbox) async throws -> Void) async throws {
        try await withBank { bank, clock, inbox in
            try await startWaitingTransfer(bank)
            try await body(bank, clock, inbox)
        }
    }

    /// The approvers' chat goes down and the reminder falls due: its attempt 1 fails, and its retry
    /// is stored (the chat stays down).
    func reminderFailsOnce(_ bank: Bank, _ clock: TestClock, _ inbox: Inbox) async {
        inbox.setDown(true)
        var failures = inbox.failures.makeAsyncIterator()
        clock.advance(by: Transfer.approvalReminderAfter)
        #expect(await failures.next() != nil)  // attempt 1 failed
        await bank.runtime.waitUntilIdle()  // its retry is stored
    }

    @Test("the approvers' chat is down when the reminder falls due: the reminder backs off; once the chat is back, an operator's retry delivers it at once, not at the end of its backoff")
    func reminderRetriedNow() async throws {
        try await withWaitingTransfer { bank, clock, inbox in
            let since = clock.nowNanoseconds()
            await reminderFailsOnce(bank, clock, inbox)
            let run = try bank.transferRun("t-1")
            #expect(run.activities.map(\.state) == ["backing_off"] && run.activities.first?.attempt == 2, "\(run)")
            #expect(run.activities.first?.lastFailure?.contains("ChatDown") == true, "\(run)")

            inbox.setDown(false)
            let retried = try await bank.retryTransfer("t-1")
            #expect(retried == .init(transferId: "t-1", retried: [.init(name: RemindApprovers.name, attempt: 2)]))
            let reminded = try await awaitTransfer(bank, "t-1") { $0.remindedAt != nil }
            // The clock stayed at the reminder's due time: delivered now, not after the 1 s backoff.
            #expect(reminded.remindedAt == since + 4 * 3_600 * 1_000_000_000)
            #expect(inbox.all.map(\.transfer) == ["t-1"])
            #expect(try await bank.retryTransfer("t-1").retried.isEmpty, "nothing waits for a retry any more")
            await #expect(throws: BankError.self) { try await bank.retryTransfer("t-9") }
        }
    }

    @Test("while the approvers' chat is down, an operator pauses the transfer: its reminder makes no attempt while the clock passes its backoffs, and shows as paused; once the chat is back, a retry resumes it at once")
    func reminderPausedThenResumed() async throws {
        try await withWaitingTransfer { bank, clock, inbox in
            let since = clock.nowNanoseconds()
            await reminderFailsOnce(bank, clock, inbox)
            let paused = try await bank.pauseTransfer("t-1")
            #expect(paused == .init(transferId: "t-1", paused: [.init(name: RemindApprovers.name, attempt: 2, afterRunningAttempt: false)]))
            var run = try bank.transferRun("t-1")
            #expect(run.activities.map(\.state) == ["paused"] && run.activities.first?.nextAttemptAt == nil, "\(run)")
            #expect(try await bank.pauseTransfer("t-1") == paused, "pausing again changes nothing")

            clock.advance(by: .seconds(600))  // past the 1 s backoff and all the ones after it
            await bank.runtime.waitUntilIdle()
            #expect(inbox.failureCount == 1, "no attempt while paused")
            run = try bank.transferRun("t-1")
            #expect(run.activities.map(\.state) == ["paused"], "\(run)")

            inbox.setDown(false)
            let retried = try await bank.retryTransfer("t-1")
            #expect(retried == .init(transferId: "t-1", retried: [.init(name: RemindApprovers.name, attempt: 2)]))
            let reminded = try await awaitTransfer(bank, "t-1") { $0.remindedAt != nil }
            #expect(reminded.remindedAt == since + 4 * 3_600 * 1_000_000_000 + 600 * 1_000_000_000, "delivered when resumed")
            #expect(inbox.all.map(\.transfer) == ["t-1"] && inbox.failureCount == 1)
        }
    }

    @Test("undecided for 4 hours, the approvers are reminded once; approved after that, the transfer completes")
    func reminderThenApproval() async throws {
        try await withWaitingTransfer { bank, clock, inbox in
            let since = clock.nowNanoseconds()

            clock.advance(by: Transfer.approvalReminderAfter)
            let reminded = try await awaitTransfer(bank, "t-1") { $0.remindedAt != nil }
            #expect(reminded.status == .awaitingApproval && reminded.remindedAt == since + 4 * 3_600 * 1_000_000_000)
            #expect(inbox.all == [ApprovalReminder(transfer: "t-1", from: "alice", to: "bob", amount: 6_000, waitingSince: since)])
            #expect(try await bank.transfer("t-1").remindedAt == reminded.remindedAt, "the HTTP view shows when")

            _ = try await bank.decide("t-1", approve: true, requestId: "a-1")
            #expect(try await bank.awaitTransfer("t-1") == .completed)
            #expect(try await bank.account("bob").balance == 6_000)
            #expect(inbox.all.count == 1, "reminded once")
            // The reminder is an activity in the transfer's history, between the withdrawal and the deposit.
            let activities = try bank.runtime.exportHistory(of: EntityName(type: Transfer.entityType, id: "t-1")).activities()
            #expect(activities.map(\.name) == ["bank.withdraw", "bank.remindApprovers", "bank.deposit"])
        }
    }

    @Test("a transfer approved within 4 hours sends no reminder")
    func approvalBeforeReminder() async throws {
        try await withWaitingTransfer { bank, clock, inbox in
            clock.advance(by: .seconds(3 * 3_600))
            _ = try await bank.decide("t-1", approve: true, requestId: "a-1")
            #expect(try await bank.awaitTransfer("t-1") == .completed)
            clock.advance(by: Transfer.approvalTimeout)  // the reminder's timer, if it were still pending, would fire now
            #expect(try await bank.transfer("t-1").remindedAt == nil)
            #expect(try bank.runtime.exportHistory(of: EntityName(type: Transfer.entityType, id: "t-1")).activities().map(\.name)
                == ["bank.withdraw", "bank.deposit"])
            #expect(inbox.all.isEmpty)
        }
    }

    @Test("never decided: reminded at 4 hours, compensated at 24 hours after the wait began (not 24 after the reminder), also across a restart")
    func deadlineCountsFromTheStart() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let inbox = Inbox()
        var bank = try openBank(directory, clock, inbox)
        try await startWaitingTransfer(bank)
        clock.advance(by: Transfer.approvalReminderAfter)
        _ = try await awaitTransfer(bank, "t-1") { $0.remindedAt != nil }
        bank.close()

        bank = try openBank(directory, clock, inbox)
        defer { bank.close() }
        clock.advance(by: .seconds(20 * 3_600))
        let ended = try await awaitEnd(bank, "t-1")
        #expect(ended.status == .compensated && ended.reason == "approval_timed_out")
        #expect(try await bank.account("alice").balance == 9_000, "refunded")
        #expect(inbox.all.count == 1)
    }

    /// ``Transfer`` as the sample's first version ran it, up to its wait for an approval (the same
    /// entity type name, state and commands): one 24-hour wait, no reminder.
    struct TransferBeforeReminders: EntityWorkflow {
        typealias State = Transfer.State
        typealias Input = Transfer.Input
        typealias Update = Transfer.Update
        typealias UpdateResult = Transfer.State
        static var entityType: String { Transfer.entityType }
        static func initialState(id: String) -> State { State() }
        static func validate(_ update: Update, state: State) throws { try Transfer.validate(update, state: state) }
        static func apply(_ update: Update, state: inout State, context: EntityContext) throws -> State {
            try Transfer.apply(update, state: &state, context: context)
        }
        static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> Transfer.Status {
            context.updateState { state in
                state.status = .running
                state.from = input.from
                state.to = input.to
                state.amount = input.amount
            }
            _ = try await context.execute(WithdrawFromAccount.self, Posting(account: input.from, cents: input.amount, step: "withdraw"),
                                          options: Transfer.moneyMove)
            context.updateState { $0.status = .awaitingApproval }
            _ = try await context.condition(timeout: Transfer.approvalTimeout) { $0.decision != nil }
            return .failed  // not reached in the test: the new code takes over while it waits
        }
    }

    @Test("a transfer that began waiting under the first version (no reminders) keeps its single 24-hour wait under the new code: no reminder, compensated at 24 hours")
    func waitStartedBeforeReminders() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let configuration = EntityRuntime.Configuration(directory: directory.path, shards: 2, clock: clock, logger: BankFixture.quiet)
        do {
            let old = try EntityRuntime(configuration: configuration, entityTypes: [Account.self, TransferBeforeReminders.self])
            defer { old.close() }
            old.register(activity: WithdrawFromAccount(link: RuntimeLink(old)))
            try await old.entity(Account.self, id: "alice").signal(.deposit(cents: 9_000, ref: "d-1"))
            let transfer = old.entity(TransferBeforeReminders.self, id: "t-1")
            try await transfer.start(.init(from: "alice", to: "bob", amount: 6_000, approvalThreshold: 5_000))
            _ = try await withDeadline(seconds: 60) { try await transfer.awaitState { $0.status == .awaitingApproval } }
        }
        let inbox = Inbox()
        let bank = try openBank(directory, clock, inbox)
        defer { bank.close() }
        #expect(try await bank.transfer("t-1").status == "awaiting_approval")
        clock.advance(by: Transfer.approvalTimeout)
        let ended = try await awaitEnd(bank, "t-1")
        #expect(ended.status == .compensated && ended.reason == "approval_timed_out" && ended.remindedAt == nil)
        #expect(inbox.all.isEmpty, "reminded under the old path: \(inbox.all)")
        let history = try bank.runtime.exportHistory(of: EntityName(type: Transfer.entityType, id: "t-1"))
        #expect(try history.activities().map(\.name) == ["bank.withdraw", "bank.deposit"], "the withdrawal, then its refund")
        #expect(!history.events.contains { $0.kind == .versionMarker })
    }

    @Test("cancelled while it waits for an approval, a transfer refunds its withdrawal and ends cancelled; its run ends cancelled too (result() throws EntityError.cancelled), the refund is the saga's compensation in its history, and cancelling again is refused with transferFinished")
    func cancelWhileAwaitingApproval() async throws {
        try await withWaitingTransfer { bank, _, _ in
            #expect(try await bank.account("alice").balance == 3_000, "withdrawn, held while it waits")
            let view = try await bank.cancelTransfer("t-1")
            #expect(view.status == "awaiting_approval", "answered when the cancellation is recorded")
            #expect(try await bank.awaitTransfer("t-1") == .cancelled)
            let ended = try await awaitEnd(bank, "t-1")
            #expect(ended.status == .cancelled && ended.reason == "refunded")
            #expect(try await bank.account("alice").balance == 9_000)
            #expect(try await bank.account("bob").balance == 0)
            do {
                let status = try await bank.runtime.entity(Transfer.self, id: "t-1").result()
                Issue.record("the cancelled transfer's run completed: \(status)")
            } catch {
                #expect((error as? EntityError)?.code == .cancelled)
            }
            let name = EntityName(type: Transfer.entityType, id: "t-1")
            let history = try bank.runtime.exportHistory(of: name)
            #expect(try history.activities().map(\.name) == ["bank.withdraw", "bank.deposit"], "the withdrawal, then its refund")
            #expect(history.events.map(\.kind).contains(.cancelRequested))
            #expect(history.events.last?.kind == .cancelled)
            _ = try history.replay(as: Transfer.self)
            do {
                _ = try await bank.cancelTransfer("t-1")
                Issue.record("a finished transfer accepted a cancellation")
            } catch {
                #expect((error as? BankError)?.code == .transferFinished)
            }
            // The approval wait's durable timer went with the cancellation, in its turn.
            let kinds = history.events.map(\.kind)
            #expect(kinds.firstIndex(of: .timerCancelled).map { $0 > kinds.firstIndex(of: .cancelRequested)! } == true)
        }
    }

    @Test("a large transfer cancelled right after it starts (while its withdrawal may still be under way) always ends cancelled with the money back: the withdrawal's answer comes first, then its refund")
    func cancelRightAfterStart() async throws {
        try await withBank { bank, _, _ in
            _ = try await bank.deposit(account: "alice", cents: 9_000, requestId: "d-1")
            for index in 0..<5 {
                let id = "t-\(index)"
                _ = try await bank.startTransfer(id: id, from: "alice", to: "bob", cents: 6_000)
                _ = try await bank.cancelTransfer(id)
                #expect(try await withDeadline(seconds: 60) { try await bank.awaitTransfer(id) } == .cancelled)
                #expect(try await bank.account("alice").balance == 9_000)
            }
            #expect(try await bank.account("bob").balance == 0)
        }
    }

    @Test("a transfer under the approval threshold that has completed cannot be cancelled: transferFinished, nothing moves")
    func cancelAfterCompletion() async throws {
        try await withBank { bank, _, _ in
            _ = try await bank.deposit(account: "alice", cents: 9_000, requestId: "d-1")
            _ = try await bank.startTransfer(id: "t-1", from: "alice", to: "bob", cents: 1_000)
            #expect(try await bank.awaitTransfer("t-1") == .completed)
            for (id, code) in [("t-1", BankError.Code.transferFinished), ("t-none", .notFound)] {
                do {
                    _ = try await bank.cancelTransfer(id)
                    Issue.record("transfer \(id) accepted a cancellation")
                } catch {
                    #expect((error as? BankError)?.code == code)
                }
            }
            #expect(try await bank.account("alice").balance == 8_000)
            #expect(try await bank.account("bob").balance == 1_000)
        }
    }

    @Test("a golden history of a transfer waiting under the first version, its outcome in the form before attempts were recorded, replays under the new code")
    func waitRecordedBeforeReminders() throws {
        let golden = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("Histories/transfer-awaiting-approval-v0.json").path
        let history = try HistoryFiles.load(golden)
        // Its activity outcome was written before outcomes recorded their attempt, too.
        #expect(history.events.map(\.kind) == [.started, .activityScheduled, .activityCompletedWithoutAttempt, .timerStarted])
        let state = try history.replay(as: Transfer.self)
        #expect(state.status == .awaitingApproval && state.remindedAt == nil)
        let activities = try history.activities()
        #expect(activities.map(\.name) == ["bank.withdraw"] && activities[0].attempt == nil && activities[0].outcome != nil)
        // The wait it recorded ends 24 hours after it began, as the old code said.
        let timer = try #require(try history.decodedEvents().last?.event)
        let due = timer.body.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self).bigEndian }
        #expect(due == timer.timeNanoseconds + 24 * 3_600 * 1_000_000_000)
    }
}
