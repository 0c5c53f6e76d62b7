@testable import CartSample
import DurableEntities
import Foundation
import SampleHTTPClient
import TestSupport
import Testing

/// `CartSample serve` as a real process: the runtime runs as a service of a `ServiceGroup`, and
/// SIGTERM stops the HTTP server, drains the runtime and closes the directory.
@Suite("Cart sample: serve")
struct CartServeTests {
    @Test("SIGTERM drains and closes cleanly: exit status 0, and the directory reopens with everything acknowledged")
    func sigtermClosesCleanly() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("cart-serve-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let child = try ChildProcess("CartSample", arguments: ["serve", "--data", directory, "--port", "0"])
        let banner = try #require(await child.readLine())
        let port = try #require(banner.split(separator: ":").last.flatMap { Int($0.prefix { $0.isNumber }) }, "\(banner)")

        let client = try await SampleHTTPClient(port: port)
        let restocked = try await client.request("POST", "/inventory/socks", json: ["quantity": JSONField.int(7), "requestId": "r-1"])
        #expect(restocked.status == 200)
        let added = try await client.request("POST", "/carts/c-1/items",
                                             json: ["sku": JSONField.string("socks"), "quantity": 2, "requestId": "a-1"])
        #expect(added.status == 200, "\(added.text)")
        try await client.close()

        kill(child.process.processIdentifier, SIGTERM)
        if !child.waitForExit(timeout: .seconds(120)) {
            Issue.record("serve did not exit within 120 s of SIGTERM")
            child.kill()
        }
        #expect(child.process.terminationReason == .exit && child.process.terminationStatus == 0)
        #expect(await child.remainingLines().contains { $0.contains("stopped") })

        // The directory opens again (the lock was released) and holds what was acknowledged.
        var configuration = EntityRuntime.Configuration(directory: directory, logger: quietLogger)
        configuration.journal.logger = quietLogger
        let runtime = try Shop.openRuntime(configuration: configuration, gateway: PaymentGateway())
        defer { runtime.close() }
        let socks = try await runtime.entity(InventoryItem.self, id: "socks").query { $0 }
        #expect(socks.restocked == 7 && socks.available == 5 && socks.holds == [InventoryItem.holder(cart: "c-1"): 2])
        #expect(try await runtime.entity(Cart.self, id: "c-1").query(\.lines) == [Cart.Line(sku: "socks", quantity: 2, priceCents: 100)])
    }
}
