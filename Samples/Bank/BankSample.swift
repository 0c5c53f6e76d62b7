import ArgumentParser
import DurableEntities
import Logging

/// The bank sample: bank accounts as durable entities in one LMDB directory.
///
/// `demo` (the default) tells the story end to end: deposits, a refused withdrawal, transfers (one
/// approved, one refused), a restart, and a crash. `serve` is the bank as an HTTP service, `load` a load
/// generator for it, `verify` the data directory's integrity check. Each opens the data directory
/// through ``BankOptions``.
@main
struct BankSample: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "BankSample",
        abstract: "Bank accounts and transfers as durable entities, on a local LMDB directory: a demo, an HTTP service, a load generator.",
        subcommands: [Demo.self, Serve.self, Load.self, Verify.self, DepositForever.self],
        defaultSubcommand: Demo.self)
}

/// The options every subcommand shares: where the data lives, and how much the runtime logs.
struct BankOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("The LMDB directory (created when missing).", valueName: "dir"))
    var data: String = "./bank-data"

    @Option(name: .long, help: ArgumentHelp("The runtime's log level, on standard error: trace, debug, info, notice, warning, error, critical.", valueName: "level"))
    var logLevel: String = "warning"

    func validate() throws {
        guard Logger.Level(rawValue: logLevel) != nil else {
            throw ValidationError("'\(logLevel)' is not a log level; use one of trace, debug, info, notice, warning, error, critical.")
        }
    }

    /// A logger to standard error at the chosen level.
    func logger() -> Logger {
        var logger = Logger(label: "BankSample") { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = Logger.Level(rawValue: logLevel) ?? .warning
        return logger
    }

    /// Opens an entity runtime on the data directory, with ``Account`` registered.
    /// - Throws: ``EntityError`` with code `storage` when the directory cannot be opened (for
    ///   instance because another process has it open).
    func openRuntime() throws(EntityError) -> EntityRuntime {
        try EntityRuntime(configuration: .init(directory: data, logger: logger()), entityTypes: [Account.self])
    }

    /// Opens the ``Bank`` (accounts and transfers) on the data directory.
    /// - Throws: ``EntityError`` with code `storage` when the directory cannot be opened.
    func openBank(approvalThreshold: Int64 = Bank.defaultApprovalThreshold) throws(EntityError) -> Bank {
        try Bank(configuration: .init(directory: data, logger: logger()), approvalThreshold: approvalThreshold)
    }
}
