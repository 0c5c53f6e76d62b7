import ArgumentParser
import Foundation
import DurableEntities
import Hummingbird
import ServiceLifecycle

/// `CartSample serve --data DIR --port P`: the shop's HTTP API (see ``CartRoutes``).
///
/// The entity runtime and the HTTP server run as two services of one `ServiceGroup`. On SIGTERM or
/// SIGINT the group shuts them down in reverse order: the server stops taking requests and finishes
/// those in flight, then the runtime finishes its queued turns and closes the LMDB directory.
struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve the shop's HTTP API (inventory, carts, checkout, orders) on a local LMDB directory.",
        discussion: "Stop it with SIGTERM or Ctrl-C: requests in flight finish, then the directory closes cleanly. See Samples/Cart/README.md for curl examples.")

    @Option(name: .long, help: ArgumentHelp("The LMDB directory (created when missing).", valueName: "dir"))
    var data: String = "./cart-data"

    @Option(name: .long, help: ArgumentHelp("The address to listen on.", valueName: "host"))
    var host: String = "127.0.0.1"

    @Option(name: .long, help: ArgumentHelp("The port to listen on (0: any free port).", valueName: "port"))
    var port: Int = 8080

    @OptionGroup var options: CartOptions

    func validate() throws {
        guard (0...65_535).contains(port) else { throw ValidationError("--port must be between 0 and 65535.") }
    }

    func run() async throws {
        let logger = options.logger()
        let runtime = try Shop.openRuntime(configuration: options.configuration(directory: data), gateway: PaymentGateway())
        let shop = Shop(runtime: runtime, settings: options.settings())
        let host = self.host
        let data = self.data
        let server = CartRoutes.application(shop: shop, host: host, port: port, logger: logger) { port in
            say("CartSample: serving http://\(host):\(port) on the LMDB directory \(data) (SIGTERM or Ctrl-C stops it cleanly)")
        }
        let group = ServiceGroup(services: [runtime, server], gracefulShutdownSignals: [.sigterm, .sigint], cancellationSignals: [],
                                 logger: logger)
        try await group.run()
        say("CartSample: stopped; \(data) is closed.")
    }
}

/// Prints a line to standard output at once, even when it is a pipe (a supervisor or a test reads it).
private func say(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}
