import ArgumentParser
import DurableEntities
import Foundation

/// The bank sample's story, in eleven numbered steps a newcomer can follow: deposits and withdrawals on
/// durable accounts, a refused withdrawal, three transfers (one completes, one waits for an approval,
/// one is rejected), a restart that finds every balance and the waiting transfer again, the approval,
/// and a crash (SIGKILL of a child process in the middle of a stream of deposits) that loses nothing
/// acknowledged.
struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Deposits, withdrawals, transfers, a restart and a crash on bank accounts stored in LMDB.",
        discussion: """
            Phase 1 opens the bank (an entity runtime) on the data directory, deposits into alice, bob \
            and carol (a retried deposit counts once), withdraws, has a withdrawal refused, then runs three \
            transfers: one completes, one waits for an approval, one is rejected for insufficient funds. \
            It closes the runtime and opens a new one on the same directory: the balances are the same \
            and the waiting transfer still waits; approved, it completes, and the money adds up. Phase 2 starts a child \
            process that deposits 1 cent at a time, kills it with SIGKILL, reopens the directory and \
            accounts for every acknowledged deposit. Exits non-zero when a check fails.
            """)

    @OptionGroup var options: BankOptions

    @Flag(name: .long, help: "Keep what the data directory holds. Without it, the demo deletes the directory first and starts fresh.")
    var keep = false

    @Option(name: .long, help: "Kill the child process once it has acknowledged this many deposits.")
    var killAfter: Int = 500

    @Option(name: .long, help: "How many senders the child runs in parallel (one account each).")
    var senders: Int = 4

    @Option(name: .long, help: ArgumentHelp("Transfers of this many cents or more wait for an approval.", valueName: "cents"))
    var approvalThreshold: Int64 = 15_000

    func validate() throws {
        guard killAfter > 0 else { throw ValidationError("--kill-after must be positive.") }
        guard (1...64).contains(senders) else { throw ValidationError("--senders must be between 1 and 64.") }
    }

    func run() async throws {
        let started = ContinuousClock.now
        let data = options.data
        if !keep { try? FileManager.default.removeItem(atPath: data) }
        print("Bank sample: accounts as durable entities, stored in the LMDB directory \(data).")
        print("Amounts are integer cents, shown in dollars.")

        // Phase 1: operations and transfers, then a restart.
        print()
        step(1, "Open the bank — an EntityRuntime with accounts and transfers — on \(data) (\(keep ? "keeping what it holds" : "a fresh directory")).")
        var bank = try options.openBank(approvalThreshold: approvalThreshold)
        if try await bank.runtime.entity(Account.self, id: "alice").state().operations > 0 {
            print("   It holds accounts from an earlier run. The operations below reuse that run's refs,")
            print("   which are their idempotency keys: each is recognised as already recorded and counted once.")
        }

        step(2, "Deposits. A deposit is a signal; it returns only once it is durable (committed and fsync'd).")
        print("   Its ref is also its idempotency key.")
        for (id, cents, ref) in [("alice", 10_000, "dep-alice-1"), ("bob", 25_000, "dep-bob-1"),
                                 ("alice", 4_000, "dep-alice-2"), ("carol", 7_500, "dep-carol-1")] as [(String, Int64, String)] {
            try await deposit(bank.runtime, id, cents, ref)
        }

        step(3, "A retry. alice's client timed out waiting for dep-alice-2 and sends it again.")
        try await deposit(bank.runtime, "alice", 4_000, "dep-alice-2")

        step(4, "Withdrawals. A withdrawal is an update: validated against the balance, then applied and")
        print("   recorded; the new balance comes back. A refused one records nothing.")
        try await withdraw(bank.runtime, "bob", 3_000, "wd-bob-1")
        try await withdraw(bank.runtime, "carol", 50_000, "wd-carol-1")
        try await deposit(bank.runtime, "alice", -500, "dep-alice-3")

        step(5, "Balances.")
        let people = ["alice", "bob", "carol"]
        printStates(people, try await states(bank.runtime, people))
        let money = Int64(10_000 + 25_000 + 4_000 + 7_500 - 3_000)  // deposits minus withdrawals

        step(6, "Transfers. Each is a durable entity whose run body is a saga: withdraw from one account,")
        print("   deposit to the other, record; a refund is registered as soon as the withdrawal is done.")
        print("   Transfers of \(Money.format(approvalThreshold)) or more wait up to 24 hours for an approval.")
        try await transfer(bank, "t-1", "alice", "bob", 2_500, wait: true)
        try await transfer(bank, "t-2", "bob", "carol", 20_000, wait: false)
        try await transfer(bank, "t-3", "carol", "alice", 100_000, wait: true)
        let held = try await bank.transfer("t-2").status == Transfer.Status.awaitingApproval.rawValue ? Int64(20_000) : 0
        let before = try await states(bank.runtime, people)
        printStates(people, before)
        try check(before, people, money: money, inTransit: held)
        print("   t-1's history holds each activity once: its schedule, and its outcome with the attempt that ended it.")
        try printActivities(of: "t-1", bank.runtime)

        step(7, "A restart. Close the runtime and open a NEW one on the same directory: each account's")
        print("   state is rebuilt from LMDB: its latest snapshot, if any, then a replay of the history after it;")
        print("   t-2's run body is replayed to where it waits for an approval, its timer still pending (the")
        print("   approvers are reminded after 4 hours, and the transfer is given up 24 hours after the wait began).")
        bank.close()
        let reopening = ContinuousClock.now
        bank = try options.openBank(approvalThreshold: approvalThreshold)
        let after = try await states(bank.runtime, people)
        print("   Reopened and read back in \(milliseconds(ContinuousClock.now - reopening)).")
        printStates(people, after)
        guard after == before else {
            print("   ✘ The balances differ from before the restart.")
            bank.close()
            throw ExitCode.failure
        }
        print("   ✔ Identical to before the restart; t-2 is \(try await bank.transfer("t-2").status).")
        try printRun(of: "t-2", bank)

        step(8, "An approver approves t-2 (a retried approval with the same requestId would get the same answer).")
        do {
            let decided = try await bank.decide("t-2", approve: true, requestId: "approve-t-2")
            print("   t-2  approved → \(decided.status)")
        } catch {
            guard error.code == .notAwaitingApproval else { throw error }
            print("   t-2  was decided in an earlier run: \(error.message)")
        }
        print("   t-2  → \(try await bank.awaitTransfer("t-2").rawValue)")
        let settled = try await states(bank.runtime, people)
        printStates(people, settled)
        try check(settled, people, money: money, inTransit: 0)
        print("   Then carol sends alice $160.00 (t-4, withdrawn and held for an approval) and cancels it: the")
        print("   cancellation is recorded, the approval wait ends, and the saga refunds carol before the run ends cancelled.")
        try await transfer(bank, "t-4", "carol", "alice", 16_000, wait: false)
        do {
            _ = try await bank.cancelTransfer("t-4")
            print("   t-4  cancelled by carol")
        } catch {
            guard error.code == .transferFinished else { throw error }
            print("   t-4  was cancelled in an earlier run: \(error.message)")
        }
        let ended = try await bank.awaitTransfer("t-4")
        print("   t-4  → \(ended.rawValue)\(try await bank.transfer("t-4").reason.map { " (\($0))" } ?? "")")
        let refunded = try await states(bank.runtime, people)
        printStates(people, refunded)
        try check(refunded, people, money: money, inTransit: 0)
        bank.close()
        var runtime = try options.openRuntime()

        // Phase 2: a crash.
        let savers = DepositForever.accounts(senders)
        var baseline: [String: Int64] = [:]
        for id in savers { baseline[id] = try await runtime.entity(Account.self, id: id).state().balance }
        await runtime.shutdown()

        print()
        step(9, "A crash. A child process (BankSample deposit-forever) opens the directory and deposits")
        print("   1 cent at a time into \(savers.first!)…\(savers.last!), \(senders) senders in parallel, one account each;")
        print("   it prints a line for every acknowledged deposit. After \(killAfter) acknowledgements we kill it")
        print("   with SIGKILL (kill -9): no shutdown, no flush, no cleanup.")
        let run = "crash-" + String(UInt32.random(in: 0x1000_0000...UInt32.max), radix: 16)
        let crash = try crashChild(run: run)
        let late = crash.acknowledged - crash.killedAt
        print("   The child is dead; \(late == 0 ? "no" : "\(late)") more acknowledgement\(late == 1 ? "" : "s") arrived between the kill and its death.")

        step(10, "Reopen the directory after the crash, and count what the savers' balances hold.")
        runtime = try options.openRuntime()
        defer { runtime.close() }
        let verification = try runtime.journal.verify()
        guard verification.isIntact else {
            print("   ✘ The directory is damaged: \(verification)")
            throw ExitCode.failure
        }
        print("   ✔ No torn write: each of the directory's \(verification.rows) rows passes its check, and the tables agree (`BankSample verify`).")
        var recorded: [String: Int] = [:]
        for id in savers {
            recorded[id] = Int(try await runtime.entity(Account.self, id: id).state().balance - baseline[id]!)
        }
        let width = savers.map(\.count).max()!
        for id in savers {
            let acked = crash.lastNumber[id, default: 0]
            let extra = recorded[id]! - acked
            let note = extra == 1 ? "  +1: deposit #\(acked + 1) was committed, its acknowledgement never arrived" : ""
            print("   \(id.padding(width))  acknowledged \(pad(acked, 4))  recorded \(pad(recorded[id]!, 4))\(note)")
        }
        let total = recorded.values.reduce(0, +)
        if baseline.values.contains(where: { $0 != 0 }) {
            print("   (recorded = this run's deposits: the balance minus what it was before the child started)")
        }
        print("   Total: \(crash.acknowledged) acknowledged, \(total) recorded.")
        guard total >= crash.acknowledged, total <= crash.acknowledged + senders,
              savers.allSatisfy({ (0...1).contains(recorded[$0]! - crash.lastNumber[$0, default: 0]) }) else {
            print("   ✘ Expected between \(crash.acknowledged) and \(crash.acknowledged + senders), at most one more than acknowledged per sender.")
            throw ExitCode.failure
        }
        print("   ✔ Every acknowledged deposit is there (\(crash.acknowledged) ≤ \(total)): a deposit is acknowledged only")
        print("     after its commit is durable, so a crash cannot take back an acknowledged one.")
        print("   ✔ At most \(senders) more (\(total) ≤ \(crash.acknowledged) + \(senders)): the in-flight window. A deposit is committed")
        print("     first and acknowledged after; a crash between the two leaves it recorded while its sender")
        print("     never heard back. Each sender waits for one deposit at a time, so at most one per sender")
        print("     is in that window, and the sender cannot tell whether it went through.")
        if total == crash.acknowledged {
            print("     (This time the kill found none there; run it again, or with --senders 16, to see some.)")
        }

        step(11, "Close the window: each sender resends its in-flight deposit with the same ref, its idempotency key.")
        for id in savers {
            let number = crash.lastNumber[id, default: 0] + 1
            let ref = DepositForever.ref(run: run, number: number)
            let account = runtime.entity(Account.self, id: id)
            let operations = try await account.state().operations
            try await account.deposit(cents: 1, ref: ref)
            let outcome = try await account.state().operations == operations
                ? "already recorded: counted once" : "had not been recorded: recorded now"
            print("   \(id.padding(width))  resend deposit #\(number) (ref \(ref))  → \(outcome)")
        }
        var exact = true
        for id in savers {
            let now = Int(try await runtime.entity(Account.self, id: id).state().balance - baseline[id]!)
            exact = exact && now == crash.lastNumber[id, default: 0] + 1
        }
        guard exact else {
            print("   ✘ A saver's balance is not its acknowledged deposits plus the one resent.")
            throw ExitCode.failure
        }
        print("   ✔ Each saver now holds exactly its acknowledged deposits plus the resent one:")
        print("     nothing lost, nothing counted twice.")

        print()
        print("All balances:")
        printStates(people + savers, try await states(runtime, people + savers))
        print()
        print("Done in \(milliseconds(ContinuousClock.now - started)). Run it again on the same data with `scripts/demo.sh --keep`.")
    }

    // MARK: Operations, narrated

    /// Deposits and prints the outcome: the new balance, a recognised retry, or the refusal.
    private func deposit(_ runtime: EntityRuntime, _ id: String, _ cents: Int64, _ ref: String) async throws {
        let account = runtime.entity(Account.self, id: id)
        let operations = try await account.state().operations
        let line = "   \(id.padding(5))  deposit  \(Money.format(cents).padding(9, left: true))  ref \(ref.padding(11))  →"
        do {
            try await account.deposit(cents: cents, ref: ref)
        } catch {
            guard error.code == .rejected else { throw error }
            printRefusal(line, error)
            return
        }
        let state = try await account.state()
        let note = state.operations == operations ? "  (already recorded: counted once)" : ""
        print("\(line) balance \(Money.format(state.balance).padding(9, left: true))\(note)")
    }

    /// Withdraws and prints the outcome: the returned balance, a recognised retry, or the refusal with
    /// its typed cause.
    private func withdraw(_ runtime: EntityRuntime, _ id: String, _ cents: Int64, _ ref: String) async throws {
        let account = runtime.entity(Account.self, id: id)
        let operations = try await account.state().operations
        let line = "   \(id.padding(5))  withdraw \(Money.format(cents).padding(9, left: true))  ref \(ref.padding(11))  →"
        let balance: Int64
        do {
            balance = try await account.withdraw(cents: cents, ref: ref)
        } catch {
            guard error.code == .rejected else { throw error }
            printRefusal(line, error)
            return
        }
        let recognised = try await account.state().operations == operations
        print("\(line) balance \(Money.format(balance).padding(9, left: true))\(recognised ? "  (already recorded: its first result returned)" : "")")
    }

    /// Starts a transfer and prints what became of it: its final status when `wait` (the demo waits
    /// for its run body), else its status once it stops running (awaiting an approval).
    private func transfer(_ bank: Bank, _ id: String, _ from: String, _ to: String, _ cents: Int64, wait: Bool) async throws {
        let line = "   \(id)  \(from.padding(5)) → \(to.padding(5))  \(Money.format(cents).padding(9, left: true))  →"
        _ = try await bank.startTransfer(id: id, from: from, to: to, cents: cents)
        let status = wait ? try await bank.awaitTransfer(id).rawValue : try await bank.awaitTransferSettled(id).status
        let view = try await bank.transfer(id)
        let reason = view.reason.map { " (\($0))" } ?? ""
        let note = status == Transfer.Status.awaitingApproval.rawValue ? ": withdrawn from \(from), held until an approver decides" : ""
        print("\(line) \(status)\(reason)\(note)")
    }

    /// Checks that the balances add up to the deposits minus the withdrawals, less what a transfer holds.
    private func check(_ states: [String: Account.State], _ ids: [String], money: Int64, inTransit: Int64) throws {
        let sum = ids.reduce(Int64(0)) { $0 + states[$1]!.balance }
        let held = inTransit > 0 ? " + \(Money.format(inTransit)) held by t-2" : ""
        guard sum + inTransit == money else {
            print("   ✘ The balances add up to \(Money.format(sum))\(held), not \(Money.format(money)) (deposits minus withdrawals).")
            throw ExitCode.failure
        }
        print("   ✔ Money is conserved: \(Money.format(sum))\(held) = \(Money.format(money)), the deposits minus the withdrawals.")
    }

    /// Prints a refused operation: the runtime's error code, and the entity's typed error, which
    /// arrives as the `EntityError`'s underlying error.
    private func printRefusal(_ line: String, _ error: EntityError) {
        print("\(line) refused, nothing recorded:")
        print("          EntityError code .\(error.code), underlying \(error.underlying.map { "\($0)" } ?? "-")")
    }

    private func states(_ runtime: EntityRuntime, _ ids: [String]) async throws -> [String: Account.State] {
        var states: [String: Account.State] = [:]
        for id in ids { states[id] = try await runtime.entity(Account.self, id: id).state() }
        return states
    }

    private func printStates(_ ids: [String], _ states: [String: Account.State]) {
        let width = ids.map(\.count).max() ?? 0
        for id in ids {
            let state = states[id]!
            let refs = state.recentRefs.count > 3 ? "…, " + state.recentRefs.suffix(2).joined(separator: ", ") : state.recentRefs.joined(separator: ", ")
            print("   \(id.padding(width))  \(Money.format(state.balance).padding(9, left: true))  \(pad(state.operations, 4)) operation\(state.operations == 1 ? " " : "s")  last refs: \(refs)")
        }
    }

    /// A transfer's activities as its history records them (``ExportedHistory/activities()``).
    private func printActivities(of transfer: String, _ runtime: EntityRuntime) throws {
        let history = try runtime.exportHistory(of: EntityName(type: Transfer.entityType, id: transfer))
        let activities = try history.activities()
        let width = activities.map(\.name.count).max() ?? 0
        for activity in activities {
            let outcome = switch activity.outcome {
            case .success?: "completed"
            case .failure(let failure)?: "failed (\(failure.reason))"
            case nil: "awaited"
            }
            let attempt = activity.attempt.map { ", attempt \($0.number)" } ?? ""
            let took = activity.closedAt.map { "; recorded \(String(format: "%.1f", Double($0 &- activity.scheduledAt) / 1e6)) ms after its schedule" } ?? ""
            print("     \(activity.name.padding(width))  \(outcome)\(attempt)\(took)")
        }
    }

    /// What a transfer's run waits for, as the runtime describes it (`GET /transfers/{id}/run`).
    private func printRun(of transfer: String, _ bank: Bank) throws(BankError) {
        let run = try bank.transferRun(transfer)
        let now = UInt64(Date().timeIntervalSince1970 * 1e9)
        let timers = run.timers.map { timer in
            "a timer due in \(String(format: "%.2f", Double(timer.dueAt > now ? timer.dueAt - now : 0) / 3.6e12)) h"
        }
        let moves = run.activities.map { "\($0.name) (\($0.state), attempt \($0.attempt ?? 1))" }
        let waits = timers + moves
        print("   Described by the runtime, \(transfer)'s run is \(run.run) after \(run.events) events, waiting for "
              + (waits.isEmpty ? "nothing." : waits.joined(separator: ", ") + "."))
    }

    private func step(_ number: Int, _ text: String) {
        print("\(number). \(text)")
    }

    // MARK: The crash

    /// What the parent learned from the child's output.
    struct CrashReport {
        /// The acknowledgement after which the parent sent SIGKILL.
        var killedAt: Int
        /// Every acknowledgement the child printed, including those read after the kill.
        var acknowledged: Int
        /// Per account, the number of its sender's last acknowledged deposit.
        var lastNumber: [String: Int]
    }

    /// Starts `BankSample deposit-forever` on the data directory, reads its acknowledgements as they
    /// come, sends SIGKILL after `killAfter` of them, then reads the rest until the pipe closes.
    /// Synchronisation is by the child's output only: no sleeps.
    private func crashChild(run: String) throws -> CrashReport {
        let child = Process()
        child.executableURL = Self.executable()
        child.arguments = ["deposit-forever", "--data", options.data, "--log-level", options.logLevel,
                           "--run", run, "--senders", "\(senders)"]
        let output = Pipe()
        child.standardOutput = output
        child.standardInput = FileHandle.nullDevice
        try child.run()

        var report = CrashReport(killedAt: 0, acknowledged: 0, lastNumber: [:])
        var pending: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        let progress = Set([1, killAfter / 5, 2 * killAfter / 5, 3 * killAfter / 5, 4 * killAfter / 5])
        while true {
            let count = chunk.withUnsafeMutableBytes { read(output.fileHandleForReading.fileDescriptor, $0.baseAddress, $0.count) }
            if count < 0, errno == EINTR { continue }
            guard count > 0 else { break }  // end of file: the child is gone
            pending.append(contentsOf: chunk[..<count])
            while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                let fields = String(decoding: pending[..<newline], as: UTF8.self).split(separator: " ")
                pending.removeSubrange(...newline)
                guard fields.count == 4, fields[0] == "ack", let acknowledged = Int(fields[1]), let number = Int(fields[3]) else { continue }
                report.acknowledged = acknowledged
                report.lastNumber[String(fields[2]), default: 0] = max(report.lastNumber[String(fields[2]), default: 0], number)
                if report.killedAt == 0 {
                    if progress.contains(acknowledged) {
                        print("   child: acknowledged \("#\(acknowledged)".padding(4))  (\(fields[2]) deposit #\(number))")
                    }
                    if acknowledged >= killAfter {
                        print("   child: acknowledged \("#\(acknowledged)".padding(4))  (\(fields[2]) deposit #\(number))  ← kill -9 now")
                        kill(child.processIdentifier, SIGKILL)
                        report.killedAt = acknowledged
                    }
                }
            }
        }
        child.waitUntilExit()
        guard report.killedAt > 0, child.terminationReason == .uncaughtSignal, child.terminationStatus == SIGKILL else {
            print("   ✘ The child ended on its own (status \(child.terminationStatus)) after \(report.acknowledged) acknowledgements.")
            throw ExitCode.failure
        }
        return report
    }

    /// This program, to start it again as the child.
    static func executable() -> URL {
        let path = CommandLine.arguments[0]
        if path.contains("/") { return URL(fileURLWithPath: path) }
        return Bundle.main.executableURL ?? URL(fileURLWithPath: "/proc/self/exe")
    }
}

// MARK: Formatting

private func pad(_ value: Int, _ width: Int) -> String {
    "\(value)".padding(width, left: true)
}

/// A duration as `12 ms`, or `1.3 s` from a second on.
func milliseconds(_ duration: Duration) -> String {
    let (seconds, attoseconds) = duration.components
    let ms = Double(seconds) * 1_000 + Double(attoseconds) / 1e15
    return ms < 1_000 ? "\(Int(ms.rounded())) ms" : "\((ms / 100).rounded() / 10) s"
}

extension String {
    /// Pads with spaces to `width` characters, on the right (or the left, for numbers).
    fileprivate func padding(_ width: Int, left: Bool = false) -> String {
        let fill = String(repeating: " ", count: max(0, width - count))
        return left ? fill + self : self + fill
    }
}
