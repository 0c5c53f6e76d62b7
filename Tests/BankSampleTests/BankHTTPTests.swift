@_spi(Testing) import DurableEntities
import DurableEntitiesTesting
import Foundation
import Logging
import SampleHTTPClient
import TestSupport
import Testing

@testable import BankSample

/// The bank's HTTP service, driven over loopback: a server in this process on a free port and a fresh
/// directory per test, and `SampleHTTPClient` for the requests.
@Suite("Bank HTTP service")
struct BankHTTPTests {
    @Test("deposits, withdrawals and balances; an account never seen has balance 0")
    func accounts() async throws {
        try await BankFixture.with { bank in
            try await bank.expect("POST", "/accounts/alice/deposits", ["amount": 10_000, "requestId": "d-1"], 200,
                                  #"{"accountId":"alice","balance":10000}"#)
            try await bank.expect("POST", "/accounts/alice/withdrawals", ["amount": 2_500, "requestId": "w-1"], 200,
                                  #"{"accountId":"alice","balance":7500}"#)
            let refused = try await bank.client.request("POST", "/accounts/alice/withdrawals", json: ["amount": 10_000, "requestId": "w-2"] as Body)
            #expect(refused.status == 409)
            #expect(try refused.decode(ErrorBody.self).error == "insufficient_funds")
            #expect(try await bank.balance("alice") == 7_500)
            #expect(try await bank.balance("nobody") == 0)
        }
    }

    @Test("a retried request (same requestId) gets the original response and changes nothing")
    func idempotentRetries() async throws {
        try await BankFixture.with { bank in
            let first = try await bank.client.request("POST", "/accounts/alice/deposits", json: ["amount": 1_000, "requestId": "d-1"] as Body)
            _ = try await bank.client.request("POST", "/accounts/alice/deposits", json: ["amount": 500, "requestId": "d-2"] as Body)
            let retry = try await bank.client.request("POST", "/accounts/alice/deposits", json: ["amount": 1_000, "requestId": "d-1"] as Body)
            #expect(retry.status == 200)
            #expect(retry.body == first.body, "the first answer (balance 1000), not today's balance")
            #expect(try await bank.balance("alice") == 1_500)

            let withdrawal = try await bank.client.request("POST", "/accounts/alice/withdrawals", json: ["amount": 300, "requestId": "w-1"] as Body)
            let again = try await bank.client.request("POST", "/accounts/alice/withdrawals", json: ["amount": 300, "requestId": "w-1"] as Body)
            #expect(withdrawal.status == 200 && again.status == 200)
            #expect(again.body == withdrawal.body)
            #expect(try await bank.balance("alice") == 1_200)
        }
    }

    /// Bad input: a 4xx with `{"error", "message"}`, and nothing changes.
    @Test("every malformed request gets a 4xx JSON error and changes nothing")
    func badRequests() async throws {
        try await BankFixture.with { bank in
            try await bank.expect("POST", "/accounts/alice/deposits", ["amount": 1_000, "requestId": "d-0"], 200)
            let cases: [(String, String, String, Int, String)] = [
                ("POST", "/accounts/alice/deposits", #"{"amount": 10, "requestId": "x-1""#, 400, "malformed_json"),
                ("POST", "/accounts/alice/deposits", "", 400, "malformed_json"),
                ("POST", "/accounts/alice/deposits", "[1, 2]", 400, "malformed_json"),
                ("POST", "/accounts/alice/deposits", #"{"amount": -5, "requestId": "x-2"}"#, 400, "invalid_amount"),
                ("POST", "/accounts/alice/deposits", #"{"amount": 0, "requestId": "x-3"}"#, 400, "invalid_amount"),
                ("POST", "/accounts/alice/deposits", #"{"amount": 10.5, "requestId": "x-4"}"#, 400, "invalid_amount"),
                ("POST", "/accounts/alice/deposits", #"{"amount": "10", "requestId": "x-5"}"#, 400, "invalid_amount"),
                ("POST", "/accounts/alice/deposits", #"{"amount": 1e30, "requestId": "x-6"}"#, 400, "invalid_amount"),
                ("POST", "/accounts/alice/deposits", #"{"requestId": "x-7"}"#, 400, "invalid_amount"),
                ("POST", "/accounts/alice/deposits", #"{"amount": 10}"#, 400, "invalid_request_id"),
                ("POST", "/accounts/alice/deposits", #"{"amount": 10, "requestId": ""}"#, 400, "invalid_request_id"),
                ("POST", "/accounts/alice/deposits", #"{"amount": 10, "requestId": 7}"#, 400, "invalid_request_id"),
                ("POST", "/accounts/alice/withdrawals", #"{"amount": -1, "requestId": "x-8"}"#, 400, "invalid_amount"),
                ("POST", "/accounts/alice/withdrawals", #"{"amount": 10}"#, 400, "invalid_request_id"),
                ("POST", "/accounts/al%20ice/deposits", #"{"amount": 10, "requestId": "x-9"}"#, 400, "invalid_id"),
                ("POST", "/transfers", #"{"transferId": "t-1", "from": "alice", "to": "bob", "amount": -10}"#, 400, "invalid_amount"),
                ("POST", "/transfers", #"{"transferId": "t-1", "from": "alice", "to": "bob", "amount": "10"}"#, 400, "invalid_amount"),
                ("POST", "/transfers", #"{"transferId": "t-1", "from": "alice", "amount": 10}"#, 400, "invalid_request"),
                ("POST", "/transfers", #"{"transferId": "t-1", "from": "alice", "to": "alice", "amount": 10}"#, 400, "invalid_request"),
                ("POST", "/transfers", #"{"transferId": "", "from": "alice", "to": "bob", "amount": 10}"#, 400, "invalid_id"),
                ("GET", "/transfers/nope", "", 404, "not_found"),
                ("POST", "/transfers/nope/approve", #"{"requestId": "x-10"}"#, 404, "not_found"),
                ("POST", "/transfers/nope/reject", #"{"requestId": "x-11"}"#, 404, "not_found"),
                ("POST", "/transfers/nope/approve", "{}", 400, "invalid_request_id"),
                ("GET", "/no/such/route", "", 404, "not_found"),
            ]
            for (method, path, body, status, error) in cases {
                let response = try await bank.client.request(method, path, body: body.isEmpty && method == "GET" ? nil : Array(body.utf8))
                #expect(response.status == status, "\(method) \(path) \(body): \(response.text)")
                let decoded = try? response.decode(ErrorBody.self)
                #expect(decoded?.error == error, "\(method) \(path) \(body): \(response.text)")
                #expect(decoded.map { !$0.message.isEmpty } == true, "\(method) \(path): a message")
            }

            // Oversized: 413, and the client reconnects for the next request.
            let huge = #"{"amount": 10, "requestId": "big", "padding": ""# + String(repeating: "x", count: 64 * 1024) + #""}"#
            let tooLarge = try await bank.client.request("POST", "/accounts/alice/deposits", body: Array(huge.utf8))
            #expect(tooLarge.status == 413)
            #expect(try tooLarge.decode(ErrorBody.self).error == "body_too_large")

            #expect(try await bank.balance("alice") == 1_000, "nothing changed")
            #expect(try await bank.balance("bob") == 0)
            let missing = try await bank.client.request("GET", "/transfers/t-1")
            #expect(missing.status == 404, "no transfer was started")
        }
    }

    @Test("a transfer completes; posting its transferId again returns it and moves nothing")
    func transferCompletes() async throws {
        try await BankFixture.with { bank in
            try await bank.expect("POST", "/accounts/alice/deposits", ["amount": 10_000, "requestId": "d-1"], 200)
            let posted = try await bank.client.request("POST", "/transfers", json: transfer("t-1", "alice", "bob", 2_500))
            #expect(posted.status == 202)
            let view = try posted.decode(Bank.TransferView.self)
            #expect(view.transferId == "t-1" && ["running", "completed"].contains(view.status))

            let done = try await bank.awaitStatus("t-1", in: terminal)
            #expect(done == Bank.TransferView(id: "t-1", status: "completed", from: "alice", to: "bob", amount: 2_500))
            #expect(try await bank.balance("alice") == 7_500)
            #expect(try await bank.balance("bob") == 2_500)

            let again = try await bank.client.request("POST", "/transfers", json: transfer("t-1", "alice", "bob", 2_500))
            #expect(again.status == 202)
            #expect(try again.decode(Bank.TransferView.self) == done)
            let conflict = try await bank.client.request("POST", "/transfers", json: transfer("t-1", "alice", "bob", 999))
            #expect(conflict.status == 409)
            #expect(try conflict.decode(ErrorBody.self).error == "transfer_conflict")
            #expect(try await bank.balance("alice") == 7_500)
            #expect(try await bank.balance("bob") == 2_500)
        }
    }

    @Test("a transfer from an account with too little money is rejected and moves nothing")
    func transferRejectedForInsufficientFunds() async throws {
        try await BankFixture.with { bank in
            try await bank.expect("POST", "/accounts/alice/deposits", ["amount": 1_000, "requestId": "d-1"], 200)
            let posted = try await bank.client.request("POST", "/transfers", json: transfer("t-1", "alice", "bob", 5_000))
            #expect(posted.status == 202)
            let done = try await bank.awaitStatus("t-1", in: terminal)
            #expect(done.status == "rejected")
            #expect(done.reason == "insufficient_funds")
            #expect(try await bank.balance("alice") == 1_000)
            #expect(try await bank.balance("bob") == 0)
        }
    }

    @Test("a large transfer waits for an approval; approved, it completes; a retried approval gets the same answer")
    func transferApproved() async throws {
        let clock = TestClock(skipsTimeWhenIdle: false)
        try await BankFixture.with(clock: clock, approvalThreshold: 5_000) { bank in
            try await bank.expect("POST", "/accounts/alice/deposits", ["amount": 10_000, "requestId": "d-1"], 200)
            _ = try await bank.client.request("POST", "/transfers", json: transfer("t-1", "alice", "bob", 5_000))
            let waiting = try await bank.awaitStatus("t-1", in: ["awaiting_approval"])
            #expect(waiting.amount == 5_000)
            #expect(try await bank.balance("alice") == 5_000, "withdrawn, held while it waits")
            #expect(try await bank.balance("bob") == 0)

            let approved = try await bank.client.request("POST", "/transfers/t-1/approve", json: ["requestId": "a-1"])
            #expect(approved.status == 200, "\(approved.text)")
            let retried = try await bank.client.request("POST", "/transfers/t-1/approve", json: ["requestId": "a-1"])
            #expect(retried.status == 200 && retried.body == approved.body)

            #expect(try await bank.awaitStatus("t-1", in: terminal).status == "completed")
            #expect(try await bank.balance("alice") == 5_000)
            #expect(try await bank.balance("bob") == 5_000)
            let late = try await bank.client.request("POST", "/transfers/t-1/reject", json: ["requestId": "r-1"])
            #expect(late.status == 409)
            #expect(try late.decode(ErrorBody.self).error == "not_awaiting_approval")
        }
    }

    @Test("a large transfer an approver rejects is refunded")
    func transferRejectedByApprover() async throws {
        let clock = TestClock(skipsTimeWhenIdle: false)
        try await BankFixture.with(clock: clock, approvalThreshold: 5_000) { bank in
            try await bank.expect("POST", "/accounts/alice/deposits", ["amount": 10_000, "requestId": "d-1"], 200)
            _ = try await bank.client.request("POST", "/transfers", json: transfer("t-1", "alice", "bob", 8_000))
            _ = try await bank.awaitStatus("t-1", in: ["awaiting_approval"])
            let rejected = try await bank.client.request("POST", "/transfers/t-1/reject", json: ["requestId": "r-1"])
            #expect(rejected.status == 200)
            let done = try await bank.awaitStatus("t-1", in: terminal)
            #expect(done.status == "rejected")
            #expect(done.reason == "rejected_by_approver")
            #expect(try await bank.balance("alice") == 10_000, "refunded")
            #expect(try await bank.balance("bob") == 0)
        }
    }

    @Test("an approval that never comes times out after 24 hours (test clock): compensated, money refunded")
    func approvalTimesOut() async throws {
        let clock = TestClock(skipsTimeWhenIdle: false)
        try await BankFixture.with(clock: clock, approvalThreshold: 5_000) { bank in
            try await bank.expect("POST", "/accounts/alice/deposits", ["amount": 10_000, "requestId": "d-1"], 200)
            _ = try await bank.client.request("POST", "/transfers", json: transfer("t-1", "alice", "bob", 6_000))
            _ = try await bank.awaitStatus("t-1", in: ["awaiting_approval"])
            #expect(try await bank.balance("alice") == 4_000)

            clock.advance(by: .seconds(23 * 3_600))
            #expect(try await bank.transfer("t-1").status == "awaiting_approval", "23 hours: still waiting")
            clock.advance(by: .seconds(3_600))
            let done = try await bank.awaitStatus("t-1", in: terminal)
            #expect(done.status == "compensated")
            #expect(done.reason == "approval_timed_out")
            #expect(try await bank.balance("alice") == 10_000)
            #expect(try await bank.balance("bob") == 0)
            let late = try await bank.client.request("POST", "/transfers/t-1/approve", json: ["requestId": "a-1"])
            #expect(late.status == 409)
        }
    }

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

    @Test("money is conserved: concurrent transfers in a ring, the balances add up to deposits minus withdrawals")
    func conservation() async throws {
        try await BankFixture.with(approvalThreshold: 1_000_000) { bank in
            let accounts = ["a", "b", "c", "d"]
            for (index, account) in accounts.enumerated() {
                try await bank.expect("POST", "/accounts/\(account)/deposits", ["amount": 5_000, "requestId": "d-\(index)"], 200)
            }
            try await bank.expect("POST", "/accounts/a/withdrawals", ["amount": 700, "requestId": "w-1"], 200)
            let port = bank.server.port
            try await withThrowingTaskGroup(of: Void.self) { group in
                for worker in 0..<4 {
                    group.addTask {
                        let client = try await SampleHTTPClient(port: port)
                        for n in 0..<10 {
                            let from = accounts[(worker + n) % 4], to = accounts[(worker + n + 1) % 4]
                            let posted = try await client.request("POST", "/transfers", json: transfer("t-\(worker)-\(n)", from, to, Int64(100 + n)))
                            #expect(posted.status == 202)
                        }
                        try await client.close()
                    }
                }
                try await group.waitForAll()
            }
            var statuses: [String] = []
            for worker in 0..<4 {
                for n in 0..<10 { statuses.append(try await bank.awaitStatus("t-\(worker)-\(n)", in: terminal).status) }
            }
            #expect(statuses.allSatisfy { $0 == "completed" }, "\(statuses)")
            var sum: Int64 = 0
            for account in accounts { sum += try await bank.balance(account) }
            #expect(sum == 4 * 5_000 - 700)
        }
    }

    @Test("SampleHTTPClient: concurrent requests on one client go one at a time, each getting its own response")
    func clientSerializesRequests() async throws {
        try await BankFixture.with { bank in
            let client = bank.client
            let answers = try await withThrowingTaskGroup(of: (Int, Bank.AccountView).self) { group in
                for n in 0..<20 {
                    group.addTask {
                        let response = try await client.request("POST", "/accounts/acc-\(n)/deposits", json: ["amount": .int(Int64(100 + n)), "requestId": "d-\(n)"] as Body)
                        return (n, try response.decode(Bank.AccountView.self))
                    }
                }
                var answers: [Int: Bank.AccountView] = [:]
                for try await (n, view) in group { answers[n] = view }
                return answers
            }
            for n in 0..<20 {
                #expect(answers[n] == Bank.AccountView(accountId: "acc-\(n)", balance: Int64(100 + n)))
            }
        }
    }

    @Test("BankSample load, briefly: every transfer completes and the money adds up")
    func loadSmoke() async throws {
        try await BankFixture.with { bank in
            let load = BankLoad(host: "127.0.0.1", port: bank.server.port, clients: 4, deposits: 40, transfers: 20, accounts: 5)
            let report = try await load.run()
            #expect(report.conserved, "\(report.jsonLine())")
            #expect(report.transfersCompleted == 20)
            #expect(report.depositedCents == report.balanceSumCents)
            #expect(report.jsonLine().hasPrefix(#"{"scenario":"bank-load","#))
        }
    }

    @Test("BankSample serve as a child process: SIGTERM exits 0, and the directory reopens with the balances")
    func serveExitsCleanlyOnSIGTERM() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let child = try ChildProcess("BankSample", arguments: ["serve", "--data", directory.path, "--port", "0"])
        guard let line = child.readLine(), let port = line.split(separator: ":").last.flatMap({ Int($0) }) else {
            child.kill()
            Issue.record("the server printed no port")
            return
        }
        let client = try await SampleHTTPClient(port: port)
        let deposited = try await client.request("POST", "/accounts/alice/deposits", json: ["amount": 4_200, "requestId": "d-1"] as Body)
        #expect(deposited.status == 200)
        let posted = try await client.request("POST", "/transfers", json: transfer("t-1", "alice", "bob", 200))
        #expect(posted.status == 202)
        var status = ""
        let deadline = ContinuousClock.now + .seconds(20)
        while !terminal.contains(status), ContinuousClock.now < deadline {
            status = try await client.request("GET", "/transfers/t-1").decode(Bank.TransferView.self).status
            if !terminal.contains(status) { try await Task.sleep(for: .milliseconds(2)) }  // a poll interval
        }
        #expect(status == "completed")
        try await client.close()

        kill(child.process.processIdentifier, SIGTERM)
        child.process.waitUntilExit()
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
        guard let line = child.readLine(), let port = line.split(separator: ":").last.flatMap({ Int($0) }) else {
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
        child.process.waitUntilExit()
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

// MARK: Fixture

/// JSON bodies with numbers and strings.
typealias Body = [String: BodyValue]

enum BodyValue: Encodable, ExpressibleByIntegerLiteral, ExpressibleByStringInterpolation {
    case int(Int64), string(String)
    init(integerLiteral value: Int64) { self = .int(value) }
    init(stringLiteral value: String) { self = .string(value) }
    func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .int(let value): try container.encode(value)
        case .string(let value): try container.encode(value)
        }
    }
}

struct ErrorBody: Decodable {
    var error: String
    var message: String
}

let terminal: Set<String> = ["completed", "compensated", "rejected", "failed"]

func transfer(_ id: String, _ from: String, _ to: String, _ amount: Int64) -> Body {
    ["transferId": .string(id), "from": .string(from), "to": .string(to), "amount": .int(amount)]
}

extension Bank.TransferView {
    init(id: String, status: String, from: String, to: String, amount: Int64, reason: String? = nil) {
        self.init(id: id, Transfer.State())
        self.status = status
        self.from = from
        self.to = to
        self.amount = amount
        self.reason = reason
    }
}

/// A fresh directory, a bank server on it in this process, and one client.
struct BankFixture {
    let server: InProcessBankServer
    let client: SampleHTTPClient

    static let quiet = Logger(label: "BankSampleTests") { _ in SwiftLogNoOpLogHandler() }

    /// Runs `body` against a fresh bank, then stops the server (closing the runtime) and deletes the directory.
    static func with(
        clock: (any EntityClock)? = nil, approvalThreshold: Int64 = Bank.defaultApprovalThreshold,
        _ body: (BankFixture) async throws -> Void
    ) async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        var configuration = EntityRuntime.Configuration(directory: directory.path, shards: 2, logger: quiet)
        if let clock { configuration.clock = clock }
        let bank = try Bank(configuration: configuration, approvalThreshold: approvalThreshold)
        let server = try await InProcessBankServer.start(bank: bank, logger: quiet)
        let fixture = BankFixture(server: server, client: try await SampleHTTPClient(port: server.port))
        do {
            try await body(fixture)
        } catch {
            try? await fixture.client.close()
            try? await server.stop()
            throw error
        }
        try await fixture.client.close()
        try await server.stop()
    }

    /// Sends a request and expects `status` (and `body`, when given, byte for byte).
    func expect(_ method: String, _ path: String, _ json: Body, _ status: Int, _ body: String? = nil,
                sourceLocation: SourceLocation = #_sourceLocation) async throws {
        let response = try await client.request(method, path, json: json)
        #expect(response.status == status, "\(method) \(path): \(response.text)", sourceLocation: sourceLocation)
        if let body { #expect(response.text == body, sourceLocation: sourceLocation) }
    }

    func balance(_ account: String) async throws -> Int64 {
        let response = try await client.request("GET", "/accounts/\(account)")
        #expect(response.status == 200)
        return try response.decode(Bank.AccountView.self).balance
    }

    func transfer(_ id: String) async throws -> Bank.TransferView {
        try await client.request("GET", "/transfers/\(id)").decode(Bank.TransferView.self)
    }

    /// Polls `GET /transfers/{id}` until its status is one of `statuses` (a deadline of 20 s fails the test).
    func awaitStatus(_ id: String, in statuses: Set<String>, sourceLocation: SourceLocation = #_sourceLocation) async throws -> Bank.TransferView {
        let deadline = ContinuousClock.now + .seconds(20)
        var view = try await transfer(id)
        while !statuses.contains(view.status) {
            guard ContinuousClock.now < deadline else {
                Issue.record("transfer \(id) is still \(view.status), expected one of \(statuses.sorted())", sourceLocation: sourceLocation)
                throw CancellationError()
            }
            try await Task.sleep(for: .milliseconds(2))  // a poll interval, not a synchronisation
            view = try await transfer(id)
        }
        return view
    }
}

/// A temporary directory for one test's LMDB environment.
struct TemporaryDirectory {
    let path: String
    init() throws {
        path = FileManager.default.temporaryDirectory.appendingPathComponent("bank-test-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func remove() { try? FileManager.default.removeItem(atPath: path) }
}
