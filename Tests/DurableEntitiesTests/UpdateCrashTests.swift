@testable import DurableEntities
import Foundation
import Synchronization
import TestSupport
import Testing

/// Acceptance: "a rejected update leaves no event; an accepted one is applied exactly once across a
/// crash".
@Suite("Updates: rejected ones leave no event, accepted ones apply exactly once across crashes")
struct UpdateCrashTests {
    static let withdrawalCount = 4_000
    static let accountCount = 20
    static let opening: Int64 = 1_000_000

    static func account(_ index: Int) -> Int { index % accountCount }
    static func amount(_ index: Int) -> Int64 { Int64(index % 5 + 1) }
    static func index(ofKey key: String) -> Int? { key.hasPrefix("wd-") ? Int(key.dropFirst(3)) : nil }

    /// The same settings as `EntityCrashChild`.
    func configuration(_ directory: TemporaryDirectory) -> EntityRuntime.Configuration {
        var configuration = EntityRuntime.Configuration(directory: directory.path, snapshotEvery: 10, logger: quietLogger)
        configuration.journal.coalesceThreshold = 8
        configuration.journal.logWindow = 512
        configuration.journal.logger = quietLogger
        return configuration
    }

    /// What one `EntityCrashChild withdraw` run printed.
    struct Round {
        var sent = Set<Int>()
        /// Index → the balance the update returned.
        var acked: [Int: Int64] = [:]
        var opened = false
        var done = false
        var malformed: [String] = []

        mutating func record(_ line: String) {
            let parts = line.split(separator: " ")
            if parts.count == 2, parts[0] == "send", let index = Int(parts[1]) {
                sent.insert(index)
            } else if parts.count == 3, parts[0] == "ack", let index = Int(parts[1]), let balance = Int64(parts[2]) {
                if acked.updateValue(balance, forKey: index) != nil { malformed.append("acknowledged twice: \(line)") }
            } else if line == "opened" {
                opened = true
            } else if line == "done" {
                done = true
            } else {
                malformed.append(line)
            }
        }
    }

    /// The withdrawals an account's history holds, read back from the journal.
    struct AccountHistory {
        /// Withdrawal index → the result recorded with it, in history order.
        var withdrawals: [(index: Int, result: Int64)] = []
        var updateEvents = 0
        var problems: [String] = []
    }

    /// Reads one account's history and checks its shape: its first event is the opening deposit, then
    /// only keyed withdrawals of this account, each with its own amount, at most once per key, each
    /// recording as its result the balance after it (opening minus every withdrawal up to it).
    func history(of account: Int, in runtime: EntityRuntime) throws -> AccountHistory {
        var history = AccountHistory()
        let name = EntityName(type: Account.entityType, id: "acc-\(account)")
        guard let key = try runtime.journal.key(for: name) else { return history }
        let codec = runtime.core.codec
        var balance = Self.opening
        var seen = Set<Int>()
        for (position, stored) in try runtime.journal.events(of: key).enumerated() {
            guard let event = stored.payload.withUnsafeBytes({ HistoryEvent.decode($0) }) else {
                history.problems.append("event \(stored.sequence) does not decode")
                continue
            }
            if position == 0 {
                let deposit = try event.body.withUnsafeBytes { try codec.decode(Account.Signal.self, from: $0) }
                guard event.kind == .signal, event.idempotencyKey == "open-\(account)", case .deposit(Self.opening) = deposit else {
                    history.problems.append("event 1 is \(event.kind) '\(event.idempotencyKey ?? "")', not the opening deposit")
                    continue
                }
                continue
            }
            guard event.kind == .update else {
                history.problems.append("event \(stored.sequence) is a \(event.kind) with key '\(event.idempotencyKey ?? "")'")
                continue
            }
            history.updateEvents += 1
            guard let index = event.idempotencyKey.flatMap(Self.index(ofKey:)), Self.account(index) == account,
                  let parts = event.updateParts()
            else {
                history.problems.append("update event \(stored.sequence) has key '\(event.idempotencyKey ?? "")' or a malformed body")
                continue
            }
            if !seen.insert(index).inserted { history.problems.append("withdrawal \(index) is recorded twice (again at \(stored.sequence))") }
            let update = try Array(parts.update).withUnsafeBytes { try codec.decode(Account.Update.self, from: $0) }
            let result = try Array(parts.result).withUnsafeBytes { try codec.decode(Int64.self, from: $0) }
            guard case .withdraw(let amount) = update, amount == Self.amount(index) else {
                history.problems.append("withdrawal \(index) records \(update), not withdraw(\(Self.amount(index)))")
                continue
            }
            balance -= amount
            if result != balance { history.problems.append("withdrawal \(index) recorded result \(result); the balance after it is \(balance)") }
            history.withdrawals.append((index, result))
        }
        return history
    }

    /// Reopens the directory in this process and checks every account: each acknowledged withdrawal is
    /// in its history exactly once with the balance the child printed, no withdrawal that was never
    /// sent is, and the balance is the opening balance minus exactly the recorded withdrawals.
    /// - Returns: the withdrawals recorded but not acknowledged (committed just before a kill).
    @discardableResult
    func verify(_ directory: TemporaryDirectory, label: String, acked: [Int: Int64], sent: Set<Int>) async throws -> Set<Int> {
        let runtime = try EntityRuntime(configuration: configuration(directory), entityTypes: [Account.self])
        defer { runtime.close() }
        var unacknowledged = Set<Int>()
        for account in 0..<Self.accountCount {
            let history = try history(of: account, in: runtime)
            #expect(history.problems.isEmpty, "\(label): acc-\(account): \(history.problems.prefix(5))")
            #expect(history.updateEvents == history.withdrawals.count, "\(label): acc-\(account)")
            let recorded = Dictionary(history.withdrawals.map { ($0.index, $0.result) }, uniquingKeysWith: { first, _ in first })
            let lost = acked.keys.filter { Self.account($0) == account && recorded[$0] == nil }.sorted()
            #expect(lost.isEmpty, "\(label): acc-\(account) lost acknowledged withdrawals \(lost.prefix(10))")
            unacknowledged.formUnion(recorded.keys.filter { acked[$0] == nil })
            let unsent = recorded.keys.filter { !sent.contains($0) }.sorted()
            #expect(unsent.isEmpty, "\(label): acc-\(account) recorded withdrawals never sent \(unsent.prefix(10))")
            let differing = acked.filter { index, balance in
                Self.account(index) == account && recorded[index] != nil && recorded[index] != balance
            }
            #expect(differing.isEmpty, "\(label): acc-\(account) acknowledged balances differ from the recorded results: \(differing.prefix(5))")

            let state = try await runtime.entity(Account.self, id: "acc-\(account)").query { $0 }
            let expected = Self.opening - history.withdrawals.reduce(0) { $0 + Self.amount($1.index) }
            if try runtime.journal.key(for: EntityName(type: Account.entityType, id: "acc-\(account)")) != nil {
                #expect(state == Account.State(balance: expected, deposits: 1), "\(label): acc-\(account)")
            } else {
                #expect(state == Account.State(), "\(label): acc-\(account)")
                #expect(!acked.keys.contains { Self.account($0) == account }, "\(label): acc-\(account) has no history but acknowledged withdrawals")
            }
        }
        return unacknowledged
    }

    /// Runs a child that withdraws every index in `pending`; returns what it printed.
    func runChild(_ directory: TemporaryDirectory, pending: [Int], label: String, killAfter: Int?) async throws -> Round {
        let child = try ChildProcess("EntityCrashChild",
                                     arguments: ["withdraw", directory.path, EntityCrashTests().ranges(pending), "32"])
        let watchdog = EntityCrashTests.Watchdog(child)
        var output = Round()
        if let killAfter {
            while output.acked.count < killAfter, let line = await child.readLine() { output.record(line) }
            #expect(!watchdog.disarm(), "\(label): the child hung (\(output.acked.count) acks)")
            child.kill()
            for line in await child.remainingLines() { output.record(line) }
            #expect(output.acked.count >= killAfter, "\(label): the child stopped early")
            #expect(!output.done, "\(label): the child finished before it was killed")
        } else {
            while let line = await child.readLine() { output.record(line) }
            #expect(!watchdog.disarm(), "\(label): the child hung (\(output.acked.count) of \(pending.count) acks)")
            child.process.waitUntilExit()
            #expect(child.process.terminationStatus == 0, "\(label)")
            #expect(output.done, "\(label)")
        }
        #expect(output.malformed.isEmpty, "\(label): unexpected output \(output.malformed.prefix(5))")
        #expect(output.acked.isEmpty || output.opened, "\(label): acknowledged withdrawals before the opening deposits")
        #expect(Set(output.acked.keys).isSubset(of: output.sent), "\(label): acknowledged withdrawals it did not send")
        #expect(Set(output.acked.keys).isSubset(of: Set(pending)), "\(label): acknowledged withdrawals it was not asked for")
        return output
    }

    @Test("4,000 keyed withdrawals, SIGKILLed 3 times and resent with the same keys: each applied exactly once")
    func sigkillWithdrawalStream() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        var acked: [Int: Int64] = [:]
        var sent = Set<Int>()
        /// Withdrawals committed but not acknowledged when a child was killed (most runs have some):
        /// a later child resends them with the same key and must get the recorded result back.
        var committedAtKill = Set<Int>()

        for round in 1...3 {
            let pending = (0..<Self.withdrawalCount).filter { acked[$0] == nil }
            let label = "round \(round)"
            let output = try await runChild(directory, pending: pending, label: label, killAfter: Int.random(in: 100...1_000))
            #expect(Set(output.acked.keys).isDisjoint(with: acked.keys), "\(label): acknowledged withdrawals acknowledged before")
            acked.merge(output.acked) { first, _ in first }
            sent.formUnion(output.sent)
            committedAtKill.formUnion(try await verify(directory, label: "\(label) (\(output.acked.count) new acks, \(output.sent.count - output.acked.count) in flight at the kill)",
                             acked: acked, sent: sent))
        }

        // The last child sends whatever is left, including the withdrawals in flight at the last kill.
        let pending = (0..<Self.withdrawalCount).filter { acked[$0] == nil }
        let output = try await runChild(directory, pending: pending, label: "final run", killAfter: nil)
        #expect(Set(output.acked.keys) == Set(pending))
        acked.merge(output.acked) { first, _ in first }
        sent.formUnion(output.sent)
        #expect(acked.count == Self.withdrawalCount)
        try await verify(directory, label: "final", acked: acked, sent: sent)

        // Exactly once: every balance is the opening balance minus each of its withdrawals once, and the
        // history holds one update event per withdrawal.
        let runtime = try EntityRuntime(configuration: configuration(directory), entityTypes: [Account.self])
        defer { runtime.close() }
        for account in 0..<Self.accountCount {
            let indices = stride(from: account, to: Self.withdrawalCount, by: Self.accountCount)
            let expected = Self.opening - indices.reduce(0) { $0 + Self.amount($1) }
            let ref = runtime.entity(Account.self, id: "acc-\(account)")
            #expect(try await ref.query { $0 } == Account.State(balance: expected, deposits: 1), "acc-\(account)")
            let history = try history(of: account, in: runtime)
            #expect(history.updateEvents == Self.withdrawalCount / Self.accountCount, "acc-\(account) update events")
            #expect(Set(history.withdrawals.map(\.index)) == Set(indices), "acc-\(account) withdrawals")
        }

        // Resending an acknowledged withdrawal with its key returns the result acknowledged then and
        // changes nothing. Most interesting are those committed at a kill but acknowledged only by a
        // later child's resend (which must have got the recorded result back), then any others.
        var samples = Array(committedAtKill.shuffled().prefix(20))
        samples += acked.keys.filter { !committedAtKill.contains($0) }.shuffled().prefix(40 - samples.count)
        for index in samples {
            let ref = runtime.entity(Account.self, id: "acc-\(Self.account(index))")
            let key = try #require(try runtime.journal.key(for: ref.name))
            let before = try await ref.query(\.balance)
            let length = try runtime.journal.latestSequence(of: key)
            let result = try await ref.update(.withdraw(Self.amount(index)), idempotencyKey: "wd-\(index)")
            #expect(result == acked[index], "wd-\(index): the resend returned \(result), the child was acknowledged \(acked[index] ?? -1)")
            #expect(try await ref.query(\.balance) == before, "wd-\(index): the resend changed the balance")
            #expect(try runtime.journal.latestSequence(of: key) == length, "wd-\(index): the resend was recorded")
        }
    }

    /// The test process's history length of `ref`: its events, counted, and its latest sequence.
    func length(of ref: EntityRef<Account>, in runtime: EntityRuntime) throws -> (events: Int, sequence: UInt64) {
        guard let key = try runtime.journal.key(for: ref.name) else { return (0, 0) }
        return (try runtime.journal.events(of: key).count, try runtime.journal.latestSequence(of: key))
    }

    @Test("a rejected update leaves no event and no idempotency key, alone or among accepted ones in one turn")
    func rejectedUpdateLeavesNoEvent() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        var configuration = configuration(directory)
        configuration.snapshotEvery = 3
        do {
            let runtime = try EntityRuntime(configuration: configuration, entityTypes: [Account.self])
            defer { runtime.close() }
            let ref = runtime.entity(Account.self, id: "r")
            try await ref.signal(.deposit(100), idempotencyKey: "open")
            #expect(try await ref.update(.withdraw(30), idempotencyKey: "w-1") == 70)
            #expect(try length(of: ref, in: runtime) == (2, 2))

            // Rejected: more than the balance. Nothing recorded, not even its key.
            let rejected = await #expect(throws: EntityError.self) { try await ref.update(.withdraw(1_000), idempotencyKey: "big") }
            #expect(rejected?.code == .rejected)
            #expect(rejected?.underlying is Account.InsufficientFunds)
            #expect(try length(of: ref, in: runtime) == (2, 2))
            #expect(try await ref.query { $0 } == Account.State(balance: 70, deposits: 1))
            let key = try #require(try runtime.journal.key(for: ref.name))
            #expect(try runtime.journal.recordedResult(forKey: RuntimeCore.resultKey("big", .update, key)) == nil)
            // … so the same key, on an update that fits, is applied.
            #expect(try await ref.update(.withdraw(50), idempotencyKey: "big") == 20)
            #expect(try length(of: ref, in: runtime) == (3, 3))

            // Many at once, so accepted and rejected updates share turns: 20 withdrawals of 3 from 20
            // leave exactly 6 accepted, and exactly 6 events.
            let outcomes = await withTaskGroup(of: Result<Int64, EntityError>.self) { group in
                for sender in 0..<20 {
                    group.addTask {
                        do throws(EntityError) {
                            return .success(try await ref.update(.withdraw(3), idempotencyKey: "many-\(sender)"))
                        } catch {
                            return .failure(error)
                        }
                    }
                }
                var outcomes: [Result<Int64, EntityError>] = []
                for await outcome in group { outcomes.append(outcome) }
                return outcomes
            }
            let accepted = outcomes.compactMap { try? $0.get() }
            let refusals = outcomes.compactMap { outcome -> EntityError? in
                if case .failure(let error) = outcome { return error }
                return nil
            }
            #expect(accepted.count == 6)
            #expect(accepted.sorted() == [2, 5, 8, 11, 14, 17])
            #expect(refusals.count == 14)
            #expect(refusals.allSatisfy { $0.code == .rejected && $0.underlying is Account.InsufficientFunds })
            #expect(try length(of: ref, in: runtime) == (9, 9))
            #expect(try await ref.query { $0 } == Account.State(balance: 2, deposits: 1))
            let events = try runtime.journal.events(of: key).compactMap { event in event.payload.withUnsafeBytes { HistoryEvent.decode($0) } }
            #expect(events.filter { $0.kind == .update }.count == 8)
        }
        // Replay after reopening sees the same history and state: the rejected updates were never there.
        let runtime = try EntityRuntime(configuration: configuration, entityTypes: [Account.self])
        defer { runtime.close() }
        let ref = runtime.entity(Account.self, id: "r")
        #expect(try await ref.query { $0 } == Account.State(balance: 2, deposits: 1))
        #expect(try length(of: ref, in: runtime) == (9, 9))
        let again = await #expect(throws: EntityError.self) { try await ref.update(.withdraw(3)) }
        #expect(again?.code == .rejected)
        #expect(try length(of: ref, in: runtime) == (9, 9))
    }
}
