@testable import DurableEntities
import Foundation
import Logging
import ServiceLifecycle
import Testing

@Suite("Runtime as a Service")
struct ServiceTests {
    @Test("a graceful shutdown of the service group drains and closes the runtime; everything acknowledged is there after")
    func gracefulShutdown() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        var configuration = EntityRuntime.Configuration(directory: directory.path, logger: quietLogger)
        configuration.journal.logger = quietLogger
        let runtime = try EntityRuntime(configuration: configuration)
        let group = ServiceGroup(services: [runtime], logger: quietLogger)
        let running = Task { try await group.run() }
        for index in 0..<20 { try await runtime.entity(Account.self, id: "svc-\(index % 4)").signal(.deposit(1)) }
        await group.triggerGracefulShutdown()
        try await running.value
        // Closed: new messages are refused with a typed error.
        let refused = await #expect(throws: EntityError.self) { try await runtime.entity(Account.self, id: "svc-0").signal(.deposit(1)) }
        #expect(refused?.code == .closed)
        // And the directory reopens with every acknowledged deposit.
        let reopened = try EntityRuntime(configuration: configuration)
        defer { reopened.close() }
        for index in 0..<4 { #expect(try await reopened.entity(Account.self, id: "svc-\(index)").query(\.balance) == 5) }
    }
}
