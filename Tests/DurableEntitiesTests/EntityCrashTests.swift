@testable import DurableEntities
import Foundation
import LMDB
import Synchronization
import TestSupport
import Testing

@Suite("Entity runtime crash safety")
struct EntityCrashTests {
    static let depositCount = 10_000
    static let accountCount = 100

    static func account(_ index: Int) -> Int { index % accountCount }
    static func amount(_ index: Int) -> Int64 { Int64(index % 7 + 1) }

    /// The same settings as `EntityCrashChild`.
    func configuration(_ directory: TemporaryDirectory) -> EntityRuntime.Configuration {
        var configuration = EntityRuntime.Configuration(directory: directory.path, snapshotEvery: 10, logger: quietLogger)
        configuration.journal.coalesceThreshold = 8
        configuration.journal.logWindow = 512
        return configuration
    }

    /// `indices` (increasing) as the child's argument: `3,17,40-9999`, or `-` for none.
    func ranges(_ indices: [Int]) -> String {
        var parts: [String] = []
        var start = 0
        while start < indices.count {
            var end = start
            while end + 1 < indices.count, indices[end + 1] == indices[end] + 1 { end += 1 }
            parts.append(start == end ? "\(indices[start])" : "\(indices[start])-\(indices[end])")
            start = end + 1
        }
        return parts.isEmpty ? "-" : parts.joined(separator: ",")
    }

    /// SIGKILLs a child still running at a deadline, so a hung runtime fails the test instead of hanging
    /// it. Disarm it before the child is reaped (its pid must not be reused by then).
    ///
    /// Deadlines and time limits in these suites catch hangs, not slowness: in a full run beside
    /// other load a test that takes a second or two alone can take over a minute (the suites share
    /// the machine's two cores and the cooperative threads, which tests that block them hold), so
    /// they are generous — 240 s here and for `withDeadline`, 10 minutes for `.timeLimit` (a full
    /// run took over 4 minutes, against 1 minute usually, while the hypervisor took 65% of the CPU).
    final class Watchdog: Sendable {
        private let state = Mutex((armed: true, fired: false))

        init(_ child: ChildProcess, seconds: Double = 240) {
            let pid = child.process.processIdentifier
            DispatchQueue.global().asyncAfter(deadline: .now() + seconds) { [self] in
                state.withLock { state in
                    guard state.armed else { return }
                    state.fired = true
                    _ = Foundation.kill(pid, SIGKILL)
                }
            }
        }

        /// Stops the watchdog; returns whether it had killed the child.
        func disarm() -> Bool {
            state.withLock { state in
                state.armed = false
                return state.fired
            }
        }
    }

    /// What one child run printed.
    struct Round {
        var sent = Set<Int>()
        var acked = Set<Int>()
        var done = false

        mutating func record(_ line: String) {
            let parts = line.split(separator: " ")
            if parts.count == 2, let index = Int(parts[1]) {
                if parts[0] == "send" { sent.insert(index) }
                if parts[0] == "ack" { acked.insert(index) }
            } else if line == "done" {
                done = true
            }
        }
    }

    /// Reopens the directory in this process and checks every account against what was acknowledged:
    /// every acknowledged deposit is in its balance, only deposits that were sent can be, and the state
    /// equals exactly the deposits whose idempotency keys are recorded (a resend counts once).
    func verify(_ directory: TemporaryDirectory, label: String, acked: Set<Int>, sent: Set<Int>) async throws {
        let runtime = try EntityRuntime(configuration: configuration(directory), entityTypes: [Account.self])
        defer { runtime.close() }
        // The kill left no torn row: every row of every table passes its checks.
        let verification = try runtime.journal.verify()
        #expect(verification.isIntact, "\(label): \(verification)")
        var lowBalance = [Int64](repeating: 0, count: Self.accountCount)
        var lowCount = [Int](repeating: 0, count: Self.accountCount)
        var unclearBalance = [Int64](repeating: 0, count: Self.accountCount)
        var unclearCount = [Int](repeating: 0, count: Self.accountCount)
        for index in acked {
            lowBalance[Self.account(index)] += Self.amount(index)
            lowCount[Self.account(index)] += 1
        }
        for index in sent.subtracting(acked) {
            unclearBalance[Self.account(index)] += Self.amount(index)
            unclearCount[Self.account(index)] += 1
        }
        for account in 0..<Self.accountCount {
            let ref = runtime.entity(Account.self, id: "acc-\(account)")
            let state = try await ref.query { $0 }
            #expect(lowBalance[account] <= state.balance && state.balance <= lowBalance[account] + unclearBalance[account],
                    "\(label): acc-\(account) has balance \(state.balance); acknowledged \(lowBalance[account]), unclear \(unclearBalance[account])")
            #expect(lowCount[account] <= state.deposits && state.deposits <= lowCount[account] + unclearCount[account],
                    "\(label): acc-\(account) has \(state.deposits) deposits; acknowledged \(lowCount[account]), unclear \(unclearCount[account])")

            // Exactly the deposits whose keys are recorded are in the state: the key and the event
            // were committed together.
            var recorded = Account.State()
            var lostKeys: [Int] = []
            var unsentKeys: [Int] = []
            if let key = try runtime.journal.key(for: ref.name) {
                for index in stride(from: account, to: Self.depositCount, by: Self.accountCount) {
                    let isRecorded = try runtime.journal.recordedResult(forKey: RuntimeCore.resultKey("dep-\(index)", .signal, key)) != nil
                    if isRecorded {
                        recorded.balance += Self.amount(index)
                        recorded.deposits += 1
                        if !sent.contains(index) { unsentKeys.append(index) }
                    } else if acked.contains(index) {
                        lostKeys.append(index)
                    }
                }
            } else {
                lostKeys = acked.filter { Self.account($0) == account }.sorted()
            }
            #expect(lostKeys.isEmpty, "\(label): acc-\(account) lost the keys of acknowledged deposits \(lostKeys)")
            #expect(unsentKeys.isEmpty, "\(label): acc-\(account) recorded keys of deposits never sent \(unsentKeys)")
            #expect(state == recorded, "\(label): acc-\(account) state \(state) differs from its recorded keys \(recorded)")
        }
        // Every recorded key has its time row (what expiry reads): both are written in one transaction.
        let (resultCount, timeCount) = try Self.resultRowCounts(directory.path)
        #expect(resultCount == timeCount && resultCount > 0, "\(label): \(resultCount) recorded keys, \(timeCount) time rows")
    }

    /// How many rows the journal's `idempotency` and `idempotency-times` tables hold.
    static func resultRowCounts(_ directory: String) throws -> (results: Int, times: Int) {
        let environment = try Environment.open(.init(directory: directory))
        defer { environment.close() }
        let results = try environment.database("idempotency"), times = try environment.database("idempotency-times")
        return try environment.read { txn in (try txn.count(results), try txn.count(times)) }
    }

    @Test("10,000 deposits with idempotency keys, SIGKILLed 5 times and resent: nothing lost, nothing doubled")
    func sigkillDepositStream() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let concurrency = "32"
        var acked = Set<Int>()
        var sent = Set<Int>()  // ever sent, in any round: each may be in the state, acknowledged or not

        for round in 1...5 {
            let pending = (0..<Self.depositCount).filter { !acked.contains($0) }
            let child = try ChildProcess("EntityCrashChild", arguments: ["deposit", directory.path, ranges(pending), concurrency])
            var output = Round()
            let watchdog = Watchdog(child)
            let killAfter = Int.random(in: 200...1_200)
            while output.acked.count < killAfter, let line = await child.readLine() { output.record(line) }
            #expect(!watchdog.disarm(), "round \(round): the child hung (\(output.acked.count) acks)")
            child.kill()
            for line in await child.remainingLines() { output.record(line) }
            #expect(output.acked.count >= killAfter, "round \(round): the child stopped early")
            #expect(!output.done, "round \(round): the child finished before it was killed")
            #expect(output.acked.isSubset(of: output.sent) && output.acked.isDisjoint(with: acked),
                    "round \(round): acknowledged deposits it did not send in this round")
            acked.formUnion(output.acked)
            sent.formUnion(output.sent)
            try await verify(directory, label: "round \(round) (\(output.acked.count) new acks, \(output.sent.count - output.acked.count) in flight at the kill)",
                             acked: acked, sent: sent)
        }

        // The last child sends whatever is left, including the deposits in flight at the last kill.
        let pending = (0..<Self.depositCount).filter { !acked.contains($0) }
        let child = try ChildProcess("EntityCrashChild", arguments: ["deposit", directory.path, ranges(pending), concurrency])
        let watchdog = Watchdog(child)
        var output = Round()
        while let line = await child.readLine() { output.record(line) }
        #expect(!watchdog.disarm(), "final run: the child hung (\(output.acked.count) of \(pending.count) acks)")
        child.process.waitUntilExit()
        #expect(child.process.terminationStatus == 0)
        #expect(output.done)
        #expect(output.acked == Set(pending))
        acked.formUnion(output.acked)
        sent.formUnion(output.sent)
        #expect(acked.count == Self.depositCount)
        try await verify(directory, label: "final", acked: acked, sent: sent)

        // Every balance equals exactly the sum of its 100 deposits: nothing lost, nothing doubled.
        let runtime = try EntityRuntime(configuration: configuration(directory), entityTypes: [Account.self])
        defer { runtime.close() }
        for account in 0..<Self.accountCount {
            let expected = stride(from: account, to: Self.depositCount, by: Self.accountCount).reduce(Int64(0)) { $0 + Self.amount($1) }
            let state = try await runtime.entity(Account.self, id: "acc-\(account)").query { $0 }
            #expect(state == Account.State(balance: expected, deposits: Self.depositCount / Self.accountCount), "acc-\(account)")
        }
    }
}
