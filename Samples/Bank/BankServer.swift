import Hummingbird
import Logging
import ServiceLifecycle

/// The bank's HTTP service: a Hummingbird application whose service group also runs the entity
/// runtime. On a graceful shutdown (SIGTERM) the server stops taking connections and finishes the
/// requests in flight first, then the runtime drains its mailboxes, commits and closes LMDB —
/// services stop in the reverse order they were listed, and the runtime is listed first.
enum BankServer {
    /// The application serving `bank` on `host:port` (port 0: any free port).
    /// - Parameter onRunning: called with the bound port once the server listens.
    static func application(
        bank: Bank, host: String, port: Int, logger: Logger,
        onRunning: @escaping @Sendable (Int) async -> Void = { _ in }
    ) -> some ApplicationProtocol {
        Application(
            router: BankHTTP.router(bank: bank, logger: logger),
            configuration: .init(address: .hostname(host, port: port), serverName: "BankSample"),
            services: [bank.runtime],
            onServerRunning: { channel in await onRunning(channel.localAddress?.port ?? port) },
            logger: logger)
    }
}

/// A bank server running inside this process, for the tests and `load`: start it on a free port,
/// talk to it over loopback, stop it gracefully (which closes the runtime too).
final class InProcessBankServer: Sendable {
    /// The port it listens on, on 127.0.0.1.
    let port: Int
    let bank: Bank
    private let group: ServiceGroup
    private let running: Task<Void, any Error>

    private init(port: Int, bank: Bank, group: ServiceGroup, running: Task<Void, any Error>) {
        self.port = port
        self.bank = bank
        self.group = group
        self.running = running
    }

    /// Starts serving `bank` on 127.0.0.1 and a free port; returns once it listens.
    /// - Throws: what the server throws when it cannot start (the bank is closed then).
    static func start(bank: Bank, logger: Logger) async throws -> InProcessBankServer {
        let (ports, portSink) = AsyncStream.makeStream(of: Result<Int, any Error>.self)
        let app = BankServer.application(bank: bank, host: "127.0.0.1", port: 0, logger: logger) { port in
            portSink.yield(.success(port))
        }
        let group = ServiceGroup(configuration: .init(services: [app], logger: logger))
        let running = Task {
            do {
                try await group.run()
                portSink.yield(.failure(CancellationError()))
            } catch {
                portSink.yield(.failure(error))
                throw error
            }
        }
        var first = ports.makeAsyncIterator()
        guard let port = try await first.next()?.get() else { throw CancellationError() }
        return InProcessBankServer(port: port, bank: bank, group: group, running: running)
    }

    /// Shuts down gracefully: the server finishes its requests, then the runtime closes.
    func stop() async throws {
        await group.triggerGracefulShutdown()
        try await running.value
    }
}
