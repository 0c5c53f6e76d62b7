import DurableEntitiesTesting
import Foundation
import Logging
import SampleHTTPClient
import Testing

@testable import BankSample

// What the bank tests share: a fresh bank served over loopback, request bodies, polling.

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

let terminal: Set<String> = ["completed", "compensated", "rejected", "failed", "cancelled"]

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

    /// `GET /transfers/{id}?waitFor=…`: the transfer once its status is one of `statuses` (the server's
    /// long poll, 20 s at most: then the test fails).
    func awaitStatus(_ id: String, in statuses: Set<String>, sourceLocation: SourceLocation = #_sourceLocation) async throws -> Bank.TransferView {
        let view = try await client.request("GET", "/transfers/\(id)?waitFor=\(statuses.sorted().joined(separator: ","))&timeoutMs=30000")
            .decode(Bank.TransferView.self)
        if !statuses.contains(view.status) {
            Issue.record("transfer \(id) is still \(view.status), expected one of \(statuses.sorted())", sourceLocation: sourceLocation)
            throw CancellationError()
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
