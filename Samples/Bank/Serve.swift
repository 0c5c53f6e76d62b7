import ArgumentParser
import DurableEntities
import Foundation
import Hummingbird

/// `BankSample serve`: the bank as an HTTP service on a data directory, until SIGTERM or SIGINT.
struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve the bank over HTTP (JSON, amounts in integer cents) on a local LMDB directory.",
        discussion: """
            Routes: POST /accounts/{id}/deposits, POST /accounts/{id}/withdrawals, GET /accounts/{id}, \
            POST /transfers, GET /transfers/{id}, POST /transfers/{id}/approve, POST /transfers/{id}/reject. \
            See Samples/Bank/README.md for curl examples. Once listening it prints one line, \
            "listening on http://HOST:PORT". SIGTERM or SIGINT shuts down gracefully: requests in flight \
            finish, then the runtime commits and closes the directory, and the process exits 0.
            """)

    @OptionGroup var options: BankOptions

    @Option(name: .long, help: ArgumentHelp("The address to listen on.", valueName: "host"))
    var host: String = "127.0.0.1"

    @Option(name: .long, help: ArgumentHelp("The TCP port (0: any free port, printed at start).", valueName: "port"))
    var port: Int = 8080

    @Option(name: .long, help: ArgumentHelp("Transfers of this many cents or more wait for an approval (up to 24 hours).", valueName: "cents"))
    var approvalThreshold: Int64 = Bank.defaultApprovalThreshold

    func validate() throws {
        guard (0...65_535).contains(port) else { throw ValidationError("--port must be between 0 and 65535.") }
        guard approvalThreshold > 0 else { throw ValidationError("--approval-threshold must be positive.") }
    }

    func run() async throws {
        let logger = options.logger()
        let bank = try Bank(configuration: .init(directory: options.data, logger: logger), approvalThreshold: approvalThreshold)
        let host = self.host
        let app = BankServer.application(bank: bank, host: host, port: port, logger: logger) { port in
            // One unbuffered write: whoever started us (a test, a script) reads the port from it.
            try? FileHandle.standardOutput.write(contentsOf: Data("listening on http://\(host):\(port)\n".utf8))
        }
        try await app.runService(gracefulShutdownSignals: [.sigterm, .sigint])
    }
}
