import DurableEntitiesTesting
import Foundation
import SampleHTTPClient
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
                ("GET", "/transfers/nope?waitFor=completed", "", 404, "not_found"),
                ("GET", "/transfers/nope?waitFor=done", "", 400, "invalid_request"),
                ("GET", "/transfers/nope?waitFor=completed&timeoutMs=99999", "", 400, "invalid_request"),
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

    @Test("a large transfer cancelled while it waits for an approval is refunded and ends cancelled; cancelling it again is 409 transfer_finished, an unknown one 404")
    func transferCancelled() async throws {
        let clock = TestClock(skipsTimeWhenIdle: false)
        try await BankFixture.with(clock: clock, approvalThreshold: 5_000) { bank in
            try await bank.expect("POST", "/accounts/alice/deposits", ["amount": 10_000, "requestId": "d-1"], 200)
            _ = try await bank.client.request("POST", "/transfers", json: transfer("t-1", "alice", "bob", 8_000))
            _ = try await bank.awaitStatus("t-1", in: ["awaiting_approval"])
            let cancelled = try await bank.client.request("POST", "/transfers/t-1/cancel")
            #expect(cancelled.status == 202, "\(cancelled.text)")
            #expect(try cancelled.decode(Bank.TransferView.self).status == "awaiting_approval")
            let done = try await bank.awaitStatus("t-1", in: terminal)
            #expect(done.status == "cancelled" && done.reason == "refunded")
            #expect(try await bank.balance("alice") == 10_000)
            #expect(try await bank.balance("bob") == 0)
            let again = try await bank.client.request("POST", "/transfers/t-1/cancel")
            #expect(again.status == 409)
            #expect(try again.decode(ErrorBody.self).error == "transfer_finished")
            let unknown = try await bank.client.request("POST", "/transfers/t-9/cancel")
            #expect(unknown.status == 404)
            #expect(try unknown.decode(ErrorBody.self).error == "not_found")
        }
    }

    @Test("a transfer's run (GET /transfers/{id}/run): while it waits for an approval, running with the reminder's timer 4 hours after the wait began and no money move in flight; once cancelled, the run ended cancelled and waits for nothing; an unknown transfer 404")
    func transferRun() async throws {
        let clock = TestClock(skipsTimeWhenIdle: false)
        try await BankFixture.with(clock: clock, approvalThreshold: 5_000) { bank in
            try await bank.expect("POST", "/accounts/alice/deposits", ["amount": 10_000, "requestId": "d-1"], 200)
            let since = clock.nowNanoseconds()
            _ = try await bank.client.request("POST", "/transfers", json: transfer("t-1", "alice", "bob", 8_000))
            _ = try await bank.awaitStatus("t-1", in: ["awaiting_approval"])
            let waiting = try await bank.client.request("GET", "/transfers/t-1/run")
            #expect(waiting.status == 200, "\(waiting.text)")
            let run = try waiting.decode(Bank.TransferRunView.self)
            #expect(run.transferId == "t-1" && run.run == "running" && run.startedAt == since && run.closedAt == nil)
            #expect(run.timers == [.init(dueAt: since + UInt64(Transfer.approvalReminderAfter.components.seconds) * 1_000_000_000)])
            #expect(run.activities.isEmpty, "the withdrawal is done: \(run.activities)")
            // Nothing waits for a retry: the operator's "retry now" makes nothing due.
            let retry = try await bank.client.request("POST", "/transfers/t-1/retry")
            #expect(retry.status == 200, "\(retry.text)")
            #expect(try retry.decode(Bank.TransferRetryView.self) == .init(transferId: "t-1", retried: []))
            #expect(try await bank.client.request("POST", "/transfers/t-9/retry").status == 404)
            // Nothing in flight: the operator's "pause" pauses nothing.
            let pause = try await bank.client.request("POST", "/transfers/t-1/pause")
            #expect(pause.status == 200, "\(pause.text)")
            #expect(try pause.decode(Bank.TransferPauseView.self) == .init(transferId: "t-1", paused: []))
            #expect(try await bank.client.request("POST", "/transfers/t-9/pause").status == 404)

            _ = try await bank.client.request("POST", "/transfers/t-1/cancel")
            _ = try await bank.awaitStatus("t-1", in: terminal)
            // The transfer's state says cancelled once its compensation is recorded; its run ends in that same turn.
            let ended = try await bank.client.request("GET", "/transfers/t-1/run").decode(Bank.TransferRunView.self)
            #expect(ended.run == "cancelled" && ended.closedAt != nil && ended.timers.isEmpty && ended.activities.isEmpty, "\(ended)")
            let unknown = try await bank.client.request("GET", "/transfers/t-9/run")
            #expect(unknown.status == 404)
            #expect(try unknown.decode(ErrorBody.self).error == "not_found")
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
}
