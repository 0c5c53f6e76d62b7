import ArgumentParser
import DurableEntities
import Foundation
import Logging
import SampleHTTPClient

/// `BankSample load`: many concurrent HTTP clients against a bank server, then one JSON line of figures.
struct Load: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "load",
        abstract: "Load the bank's HTTP API with concurrent clients and print one JSON line of figures.",
        discussion: """
            Without --url it starts a bank server in this process, on 127.0.0.1 and a free port, on a \
            fresh temporary directory (deleted afterwards). Each client holds one keep-alive connection \
            and sends one request at a time. Phase 1: the deposits, spread over the accounts. Phase 2: \
            the transfers between those accounts, below the approval threshold; each client posts a \
            transfer, then polls GET /transfers/{id} (every millisecond) until its status is terminal. \
            Reported: requests/s and p50/p99 latency of the deposit POSTs; transfers/s, p50/p99 of the \
            transfer POST alone (`transfer_post_*`) and of POST-until-GET-shows-terminal \
            (`transfer_complete_*`). Finally every account is read back: the sum of the balances must \
            equal the deposits (transfers move money, never make or lose it). Exits non-zero if not.
            """)

    @Option(name: .long, help: ArgumentHelp("A running server, such as http://127.0.0.1:8080 (default: one in this process).", valueName: "url"))
    var url: String?

    @Option(name: .long, help: "Concurrent clients (one connection each).")
    var clients: Int = 32

    @Option(name: .long, help: "Deposits in all (phase 1).")
    var deposits: Int = 8_000

    @Option(name: .long, help: "Transfers in all (phase 2).")
    var transfers: Int = 2_000

    @Option(name: .long, help: "Accounts the deposits and transfers spread over.")
    var accounts: Int = 200

    @Option(name: .long, help: ArgumentHelp("The in-process server's log level.", valueName: "level"))
    var logLevel: String = "warning"

    func validate() throws {
        guard clients > 0, accounts >= 2, deposits >= accounts, transfers >= 0 else {
            throw ValidationError("--clients must be positive, --accounts at least 2, --deposits at least --accounts.")
        }
        if let url { _ = try Self.endpoint(url) }
    }

    func run() async throws {
        #if DEBUG
        FileHandle.standardError.write(Data("warning: a debug build; measure with `swift run -c release BankSample load`\n".utf8))
        #endif
        var server: InProcessBankServer?
        var directory: URL?
        let host: String
        let port: Int
        if let url {
            (host, port) = try Self.endpoint(url)
        } else {
            var logger = Logger(label: "BankSample") { StreamLogHandler.standardError(label: $0) }
            logger.logLevel = Logger.Level(rawValue: logLevel) ?? .warning
            let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("bank-load-\(UUID().uuidString)")
            directory = scratch
            let bank = try Bank(configuration: .init(directory: scratch.path, logger: logger))
            let started = try await InProcessBankServer.start(bank: bank, logger: logger)
            server = started
            (host, port) = ("127.0.0.1", started.port)
        }
        let load = BankLoad(host: host, port: port, clients: clients, deposits: deposits, transfers: transfers, accounts: accounts)
        let report: BankLoadReport
        do {
            report = try await load.run()
        } catch {
            try? await server?.stop()
            if let directory { try? FileManager.default.removeItem(at: directory) }
            throw error
        }
        try await server?.stop()
        if let directory { try? FileManager.default.removeItem(at: directory) }
        print(report.jsonLine())
        guard report.conserved else { throw ExitCode.failure }
    }

    /// `http://host:port` → (host, port).
    static func endpoint(_ url: String) throws -> (String, Int) {
        guard let parsed = URL(string: url), parsed.scheme == "http", let host = parsed.host else {
            throw ValidationError("--url must look like http://127.0.0.1:8080")
        }
        return (host, parsed.port ?? 80)
    }
}

/// The load itself, also run (small) by the tests.
struct BankLoad: Sendable {
    var host: String
    var port: Int
    var clients: Int
    var deposits: Int
    var transfers: Int
    var accounts: Int
    /// Prefixes this run's account, transfer and request ids, so runs against one server never meet.
    var prefix = "load-" + String(UInt32.random(in: 0x1000_0000...UInt32.max), radix: 16)

    /// Runs both phases and the final check.
    /// - Throws: a transport error, or ``BankLoadError`` for an unexpected answer.
    func run() async throws -> BankLoadReport {
        let ids = (0..<accounts).map { "\(prefix)-acc-\($0)" }
        var connections: [SampleHTTPClient] = []
        do {
            for _ in 0..<clients { connections.append(try await SampleHTTPClient(host: host, port: port)) }
            let report = try await measure(connections, ids)
            for connection in connections { try? await connection.close() }
            return report
        } catch {
            for connection in connections { try? await connection.close() }
            throw error
        }
    }

    private func measure(_ connections: [SampleHTTPClient], _ ids: [String]) async throws -> BankLoadReport {
        let prefix = self.prefix
        let loadAverage = Self.loadAverage()  // before we add ours: what else runs on the machine

        // Phase 1: deposits of 10.00…10.99 (enough for every transfer below to find money).
        let depositStart = ContinuousClock.now
        let depositRuns = try await Self.spread(deposits, over: connections) { client, i in
            let amount = Int64(1_000 + i % 100)
            let start = ContinuousClock.now
            let response = try await client.request(
                "POST", "/accounts/\(ids[i % ids.count])/deposits", json: BankHTTP.MoneyRequest(amount: amount, requestId: "\(prefix)-dep-\(i)"))
            guard response.status == 200 else { throw BankLoadError(message: "deposit \(i): \(response.status) \(response.text)") }
            return Sample(latency: ContinuousClock.now - start, amount: amount)
        }
        let depositElapsed = ContinuousClock.now - depositStart

        // Phase 2: transfers of 0.01…0.50, each followed until its status is terminal.
        let transferStart = ContinuousClock.now
        let transferRuns = try await Self.spread(transfers, over: connections) { client, j in
            let from = (j &* 7) % ids.count
            let to = (from + 1 + j % (ids.count - 1)) % ids.count
            let id = "\(prefix)-tr-\(j)"
            let body = BankHTTP.TransferRequest(transferId: id, from: ids[from], to: ids[to], amount: Int64(1 + j % 50))
            let start = ContinuousClock.now
            let posted = try await client.request("POST", "/transfers", json: body)
            let postLatency = ContinuousClock.now - start
            guard posted.status == 202 else { throw BankLoadError(message: "transfer \(id): \(posted.status) \(posted.text)") }
            var view = try posted.decode(Bank.TransferView.self)
            // A long poll: the server answers when the status is terminal (or awaits an approval).
            let settled = Self.terminal.union(["awaiting_approval"]).sorted().joined(separator: ",")
            while !Self.terminal.contains(view.status) {
                guard view.status != "awaiting_approval" else {
                    throw BankLoadError(message: "transfer \(id) awaits an approval: the server's --approval-threshold is below \(body.amount) cents")
                }
                view = try await client.request("GET", "/transfers/\(id)?waitFor=\(settled)&timeoutMs=30000").decode(Bank.TransferView.self)
            }
            return Sample(latency: ContinuousClock.now - start, postLatency: postLatency, status: view.status)
        }
        let transferElapsed = ContinuousClock.now - transferStart

        // Conservation: the balances add up to what was deposited.
        var sum: Int64 = 0
        for id in ids {
            sum += try await connections[0].request("GET", "/accounts/\(id)").decode(Bank.AccountView.self).balance
        }
        let deposited = depositRuns.reduce(Int64(0)) { $0 + $1.amount }

        let depositLatencies = depositRuns.map(\.latency)
        let completion = transferRuns.map(\.latency)
        let post = transferRuns.compactMap(\.postLatency)
        return BankLoadReport(
            clients: clients, accounts: accounts, deposits: deposits, transfers: transfers,
            depositsPerSecond: Double(deposits) / max(depositElapsed.seconds, 1e-9),
            depositP50Ms: Self.percentile(depositLatencies, 50), depositP99Ms: Self.percentile(depositLatencies, 99),
            transfersPerSecond: Double(transfers) / max(transferElapsed.seconds, 1e-9),
            transferPostP50Ms: Self.percentile(post, 50), transferPostP99Ms: Self.percentile(post, 99),
            transferCompleteP50Ms: Self.percentile(completion, 50), transferCompleteP99Ms: Self.percentile(completion, 99),
            transfersCompleted: transferRuns.filter { $0.status == "completed" }.count,
            depositedCents: deposited, balanceSumCents: sum, conserved: sum == deposited,
            build: Self.build, loadAverage: loadAverage)
    }

    static let terminal: Set<String> = ["completed", "compensated", "rejected", "failed"]

    /// One request's (or one transfer's) measurement.
    struct Sample: Sendable {
        var latency: Duration
        var postLatency: Duration?
        var amount: Int64 = 0
        var status = ""
    }

    /// Runs `body(client, i)` for every `i` in `0..<count`, client `c` taking `c`, `c + clients`, …
    private static func spread(
        _ count: Int, over clients: [SampleHTTPClient], _ body: @escaping @Sendable (SampleHTTPClient, Int) async throws -> Sample
    ) async throws -> [Sample] {
        try await withThrowingTaskGroup(of: [Sample].self) { group in
            for (c, client) in clients.enumerated() {
                group.addTask {
                    var samples: [Sample] = []
                    for i in stride(from: c, to: count, by: clients.count) { samples.append(try await body(client, i)) }
                    return samples
                }
            }
            var all: [Sample] = []
            for try await samples in group { all.append(contentsOf: samples) }
            return all
        }
    }

    /// The `p`th percentile in milliseconds (0 when empty).
    static func percentile(_ values: [Duration], _ p: Int) -> Double {
        guard !values.isEmpty else { return 0 }
        let sorted = values.sorted()
        return (sorted[min(sorted.count - 1, sorted.count * p / 100)].seconds * 1e5).rounded() / 100
    }

    static var build: String {
        #if DEBUG
        "debug"
        #else
        "release"
        #endif
    }

    /// The 1-minute load average (what else ran on the machine), or `nil`.
    static func loadAverage() -> Double? {
        guard let text = try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8) else { return nil }
        return text.split(separator: " ").first.flatMap { Double($0) }
    }
}

/// What `load` prints, as one JSON line (snake_case keys).
struct BankLoadReport: Codable, Sendable {
    var clients: Int
    var accounts: Int
    var deposits: Int
    var transfers: Int
    var depositsPerSecond: Double
    var depositP50Ms: Double
    var depositP99Ms: Double
    var transfersPerSecond: Double
    /// The transfer's POST alone.
    var transferPostP50Ms: Double
    var transferPostP99Ms: Double
    /// From the POST until a GET shows a terminal status.
    var transferCompleteP50Ms: Double
    var transferCompleteP99Ms: Double
    var transfersCompleted: Int
    var depositedCents: Int64
    var balanceSumCents: Int64
    /// The sum of the balances equals the deposits.
    var conserved: Bool
    var build: String
    /// The 1-minute load average when the load started: what else ran on the machine.
    var loadAverage: Double?

    func jsonLine() -> String {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        encoder.outputFormatting = [.sortedKeys]
        let body = (try? encoder.encode(self)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
        return "{\"scenario\":\"bank-load\"," + body.dropFirst()
    }
}

/// An answer the load did not expect.
struct BankLoadError: Error, CustomStringConvertible {
    let message: String
    var description: String { "BankLoadError: \(message)" }
}

extension Duration {
    /// In seconds, as a `Double`.
    var seconds: Double {
        let (seconds, attoseconds) = components
        return Double(seconds) + Double(attoseconds) / 1e18
    }
}
