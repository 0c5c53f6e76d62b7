import ArgumentParser
import DurableEntities
import Logging

/// The cart sample: inventory, shopping carts and a checkout saga as durable entities in one LMDB
/// directory, behind an HTTP API.
///
/// `serve` runs the HTTP service; `demo` (the default) tells the story in-process on a fresh
/// temporary directory.
@main
struct CartSample: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "CartSample",
        abstract: "Inventory, carts and a checkout saga as durable entities, over HTTP, on a local LMDB directory.",
        subcommands: [Serve.self, Demo.self],
        defaultSubcommand: Demo.self)
}

/// The options both subcommands share: how much the runtime logs, and the shop's timeouts.
struct CartOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("The log level, on standard error: trace, debug, info, notice, warning, error, critical.", valueName: "level"))
    var logLevel: String = "warning"

    @Option(name: .long, help: ArgumentHelp("Seconds a cart may stay unchanged before it expires and its items go back to the shelf. Default: 1800 (serve), 1 (demo).", valueName: "seconds"))
    var cartIdleTimeout: Double?

    @Option(name: .long, help: ArgumentHelp("Seconds one payment attempt may take before it times out (two attempts, then the checkout compensates). Default: 10 (serve), 0.3 (demo).", valueName: "seconds"))
    var paymentTimeout: Double?

    func validate() throws {
        guard Logger.Level(rawValue: logLevel) != nil else {
            throw ValidationError("'\(logLevel)' is not a log level; use one of trace, debug, info, notice, warning, error, critical.")
        }
        for (name, value) in [("--cart-idle-timeout", cartIdleTimeout), ("--payment-timeout", paymentTimeout)] {
            if let value, !(0.001...31_536_000).contains(value) { throw ValidationError("\(name) must be between 0.001 and 31536000 seconds.") }
        }
    }

    /// A logger to standard error at the chosen level.
    func logger() -> Logger {
        var logger = Logger(label: "CartSample") { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = Logger.Level(rawValue: logLevel) ?? .warning
        return logger
    }

    /// The shop's settings: the options given, else `defaults`.
    func settings(defaults: Shop.Settings = Shop.Settings()) -> Shop.Settings {
        var settings = defaults
        if let cartIdleTimeout { settings.cartIdleTimeout = .milliseconds(Int64(cartIdleTimeout * 1_000)) }
        if let paymentTimeout { settings.paymentTimeout = .milliseconds(Int64(paymentTimeout * 1_000)) }
        return settings
    }

    /// The runtime's configuration on `directory`.
    func configuration(directory: String) -> EntityRuntime.Configuration {
        EntityRuntime.Configuration(directory: directory, logger: logger())
    }
}
