@_spi(Testing) import DurableEntities
import DurableEntitiesTesting
import Foundation
import SampleHTTPClient
import TestSupport
import Testing

@testable import BankSample

/// What survives: a transfer across a simulated crash, every transfer's history on replay, and the
/// data of `BankSample serve` (a child process) across SIGTERM.
@Suite("Bank durability")
struct BankDurabilityTests {

    @Test("a transfer awaiting approval survives a crash: after reopening, approved, the money moves once")
    func transferSurvivesCrash() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let configuration = EntityRuntime.Configuration(directory: directory.path, shards: 2, clock: TestClock(skipsTimeWhenIdle: false),
                                                        logger: BankFixture.quiet)
        let before = try Bank(configuration: configuration, approvalThreshold: 5_000)
        _ = try await before.deposit(account: "alice", cents: 9_000, requestId: "d-1")
        _ = try await before.startTransfer(id: "t-1", from: "alice", to: "bob", cents: 6_000)
        #expect(try await before.awaitTransferSettled("t-1").status == "awaiting_approval")
        before.runtime.simulateCrash()

        let after = try Bank(configuration: configuration, approvalThreshold: 5_000)
        defer { after.close() }
        #expect(try await after.transfer("t-1").status == "awaiting_approval")
        #expect(try await after.account("alice").balance == 3_000)
        let retried = try await after.startTransfer(id: "t-1", from: "alice", to: "bob", cents: 6_000)
        #expect(retried.status == "awaiting_approval", "a retried POST finds the transfer, starts nothing")
        _ = try await after.decide("t-1", approve: true, requestId: "a-1")
        #expect(try await after.awaitTransfer("t-1") == .completed)
        #expect(try await after.account("alice").balance == 3_000)
        #expect(try await after.account("bob").balance == 6_000)
    }

    @Test("every transfer's history replays through the code to the state it reached (the saga is deterministic)")
    func transferHistoriesReplay() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        let bank = try Bank(configuration: .init(directory: directory.path, shards: 2, clock: clock, logger: BankFixture.quiet),
                            approvalThreshold: 5_000)
        defer { bank.close() }
        _ = try await bank.deposit(account: "alice", cents: 30_000, requestId: "d-1")
        _ = try await bank.startTransfer(id: "small", from: "alice", to: "bob", cents: 1_000)
        _ = try await bank.startTransfer(id: "broke", from: "carol", to: "bob", cents: 1_000)
        for id in ["approved", "refused", "expired"] {
            _ = try await bank.startTransfer(id: id, from: "alice", to: "bob", cents: 6_000)
            #expect(try await bank.awaitTransferSettled(id).status == "awaiting_approval")
        }
        _ = try await bank.decide("approved", approve: true, requestId: "a-1")
        _ = try await bank.decide("refused", approve: false, requestId: "r-1")
        clock.advance(by: Transfer.approvalTimeout)

        let expected: [String: Transfer.Status] = [
            "small": .completed, "broke": .rejected, "approved": .completed, "refused": .rejected, "expired": .compensated,
        ]
        for (id, status) in expected.sorted(by: { $0.key < $1.key }) {
            #expect(try await bank.awaitTransfer(id) == status, "\(id)")
            let live = try await bank.runtime.entity(Transfer.self, id: id).query { $0 }
            let history = try bank.runtime.exportHistory(of: EntityName(type: Transfer.entityType, id: id))
            #expect(try history.replay(as: Transfer.self) == live, "\(id): replay reaches the live state")
        }
        #expect(try await bank.account("alice").balance == 30_000 - 1_000 - 6_000)
        #expect(try await bank.account("bob").balance == 1_000 + 6_000)
    }

    @Test("BankSample serve as a child process: SIGTERM exits 0, and the directory reopens with the balances")
    func serveExitsCleanlyOnSIGTERM() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let child = try ChildProcess("BankSample", arguments: ["serve", "--data", directory.path, "--port", "0"])
        guard let line = await child.readLine(), let port = line.split(separator: ":").last.flatMap({ Int($0) }) else {
            child.kill()
            Issue.record("the server printed no port")
            return
        }
        let client = try await SampleHTTPClient(port: port)
        let deposited = try await client.request("POST", "/accounts/alice/deposits", json: ["amount": 4_200, "requestId": "d-1"] as Body)
        #expect(deposited.status == 200)
        let posted = try await client.request("POST", "/transfers", json: transfer("t-1", "alice", "bob", 200))
        #expect(posted.status == 202)
        let waitFor = terminal.sorted().joined(separator: ",")
        let status = try await client.request("GET", "/transfers/t-1?waitFor=\(waitFor)&timeoutMs=30000").decode(Bank.TransferView.self).status
        #expect(status == "completed")
        try await client.close()

        kill(child.process.processIdentifier, SIGTERM)
        if !child.waitForExit(timeout: .seconds(120)) {
            Issue.record("serve did not exit within 120 s of SIGTERM")
            child.kill()
        }
        #expect(child.process.terminationReason == .exit)
        #expect(child.process.terminationStatus == 0)

        let bank = try Bank(configuration: .init(directory: directory.path, logger: BankFixture.quiet))
        defer { bank.close() }
        #expect(try await bank.account("alice").balance == 4_000)
        #expect(try await bank.account("bob").balance == 200)
        #expect(try await bank.transfer("t-1").status == "completed")
    }

    @Test("SIGTERM while clients deposit: the server drains, exits 0, and every acknowledged deposit is in the directory")
    func sigtermDrainsInFlightRequests() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let child = try ChildProcess("BankSample", arguments: ["serve", "--data", directory.path, "--port", "0"])
        guard let line = await child.readLine(), let port = line.split(separator: ":").last.flatMap({ Int($0) }) else {
            child.kill()
            Issue.record("the server printed no port")
            return
        }
        // Four senders deposit 1 cent at a time, each until a request fails (the server is gone).
        let (acknowledgements, acknowledged) = AsyncStream.makeStream(of: Void.self)
        let senders = Task {
            try await withThrowingTaskGroup(of: (String, Int64).self) { group in
                for sender in 0..<4 {
                    group.addTask {
                        let account = "saver-\(sender)"
                        let client = try await SampleHTTPClient(port: port)
                        var count: Int64 = 0
                        while let response = try? await client.request(
                            "POST", "/accounts/\(account)/deposits", json: ["amount": 1, "requestId": "d-\(count + 1)"] as Body),
                            response.status == 200 {
                            count += 1
                            acknowledged.yield()
                        }
                        try? await client.close()
                        return (account, count)
                    }
                }
                var counts: [String: Int64] = [:]
                for try await (account, count) in group { counts[account] = count }
                return counts
            }
        }
        var seen = 0
        for await _ in acknowledgements {
            seen += 1
            if seen == 40 { break }
        }
        kill(child.process.processIdentifier, SIGTERM)
        let counts = try await senders.value
        if !child.waitForExit(timeout: .seconds(120)) {
            Issue.record("serve did not exit within 120 s of SIGTERM")
            child.kill()
        }
        #expect(child.process.terminationReason == .exit)
        #expect(child.process.terminationStatus == 0)

        let bank = try Bank(configuration: .init(directory: directory.path, logger: BankFixture.quiet))
        defer { bank.close() }
        for (account, count) in counts.sorted(by: { $0.key < $1.key }) {
            let balance = try await bank.account(account).balance
            // Each sender has one request in flight at most: the server may have applied it and gone
            // before answering.
            #expect((count...count + 1).contains(balance), "\(account): \(count) acknowledged, \(balance) recorded")
        }
        #expect(counts.values.reduce(0, +) >= 40)
    }
}
