@testable import CartSample
@_spi(Testing) import DurableEntities
import DurableEntitiesTesting
import Foundation
import Logging
import SampleHTTPClient
import Testing

/// A logger that drops everything, so test output shows test results.
let quietLogger = Logger(label: "cart-test", factory: { _ in SwiftLogNoOpLogHandler() })

/// The cart service of one test: a fresh LMDB directory, a runtime on a ``TestClock`` that moves only
/// when the test says so, the HTTP routes served on a free loopback port, and a client.
///
/// ``crashAndReopen()`` drops the runtime as a crash would and serves a new one on the same directory.
final class CartServer {
    let directory: String
    let clock = TestClock(skipsTimeWhenIdle: false)
    let gateway = PaymentGateway()
    let settings: Shop.Settings
    let configuration: EntityRuntime.Configuration
    private(set) var runtime: EntityRuntime
    private(set) var client: SampleHTTPClient
    private(set) var port: Int
    private var server: Task<Void, any Error>

    init(settings: Shop.Settings = Shop.Settings(cartIdleTimeout: .seconds(600), paymentTimeout: .seconds(10)),
         _ label: String = #function) async throws {
        directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("cart-\(label.filter { $0.isLetter }.prefix(30))-\(UUID().uuidString.prefix(8))").path
        var configuration = EntityRuntime.Configuration(directory: directory, clock: clock, logger: quietLogger)
        configuration.journal.logger = quietLogger
        self.configuration = configuration
        self.settings = settings
        runtime = try Shop.openRuntime(configuration: configuration, gateway: gateway)
        (port, server) = try await Self.serve(Shop(runtime: runtime, settings: settings))
        client = try await SampleHTTPClient(port: port)
    }

    /// Runs `body` with a fresh server, and stops it (and removes its directory) afterwards.
    static func run(settings: Shop.Settings = Shop.Settings(cartIdleTimeout: .seconds(600), paymentTimeout: .seconds(10)),
                    _ label: String = #function, _ body: (CartServer) async throws -> Void) async throws {
        let server = try await CartServer(settings: settings, label)
        do {
            try await body(server)
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    /// Serves the routes of `shop` on a free loopback port.
    private static func serve(_ shop: Shop) async throws -> (Int, Task<Void, any Error>) {
        let (ports, bound) = AsyncStream.makeStream(of: Int.self)
        let application = CartRoutes.application(shop: shop, host: "127.0.0.1", port: 0, logger: quietLogger) { port in
            bound.yield(port)
            bound.finish()
        }
        let task = Task { try await application.runService(gracefulShutdownSignals: []) }
        for await port in ports { return (port, task) }
        task.cancel()
        throw CartTestFailure("the HTTP server did not start")
    }

    /// Stops the HTTP server and closes the runtime (cleanly), then removes the directory.
    func stop() async {
        try? await client.close()
        server.cancel()
        _ = await server.result
        runtime.close()
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// Crashes the runtime (what was not committed is lost, nothing acknowledged is), opens a new
    /// one on the same directory with the same activities and payment gateway, and serves it.
    func crashAndReopen() async throws {
        runtime.simulateCrash()
        try? await client.close()
        server.cancel()
        _ = await server.result
        runtime = try Shop.openRuntime(configuration: configuration, gateway: gateway)
        (port, server) = try await Self.serve(Shop(runtime: runtime, settings: settings))
        client = try await SampleHTTPClient(port: port)
    }

    // MARK: Requests

    /// Sends `fields` as a JSON object.
    func send(_ method: String, _ path: String, _ fields: [String: JSONField]) async throws -> SampleHTTPResponse {
        try await client.request(method, path, json: fields)
    }

    func get(_ path: String) async throws -> SampleHTTPResponse {
        try await client.request("GET", path)
    }

    func restock(_ sku: String, _ quantity: Int, price: Int? = nil, requestID: String? = nil) async throws -> InventoryView {
        var fields: [String: JSONField] = ["quantity": .int(quantity), "requestId": .string(requestID ?? "restock-\(sku)-\(quantity)")]
        if let price { fields["priceCents"] = .int(price) }
        return try expect(200, try await send("POST", "/inventory/\(sku)", fields), InventoryView.self)
    }

    func add(_ cart: String, _ sku: String, _ quantity: Int, requestID: String) async throws -> SampleHTTPResponse {
        try await send("POST", "/carts/\(cart)/items", ["sku": .string(sku), "quantity": .int(quantity), "requestId": .string(requestID)])
    }

    func checkout(_ cart: String, token: String, requestID: String) async throws -> SampleHTTPResponse {
        try await send("POST", "/carts/\(cart)/checkout", ["paymentToken": .string(token), "requestId": .string(requestID)])
    }

    func inventory(_ sku: String) async throws -> InventoryView {
        try expect(200, try await get("/inventory/\(sku)"), InventoryView.self)
    }

    func order(_ id: String) async throws -> OrderView {
        try expect(200, try await get("/orders/\(id)"), OrderView.self)
    }

    /// Waits (without moving the clock) for order `id`'s saga to end; returns the order.
    func finished(_ id: String) async throws -> OrderView {
        _ = try await runtime.entity(Order.self, id: id).result()
        return try await order(id)
    }

    // MARK: The invariant

    /// Checks every SKU in `skus`, over HTTP and in the entity's state: nothing negative,
    /// `available + reserved + shipped == restocked`, every hold positive; with `settled`, also that
    /// nothing is held any more (every cart and order has ended: no leaked reservation).
    func checkStock(_ skus: [String], settled: Bool, sourceLocation: SourceLocation = #_sourceLocation) async throws {
        for sku in skus {
            let view = try await inventory(sku)
            #expect(view.available >= 0 && view.reserved >= 0 && view.shipped >= 0, "\(sku): \(view)", sourceLocation: sourceLocation)
            #expect(view.available + view.reserved + view.shipped == view.restocked, "\(sku): \(view)", sourceLocation: sourceLocation)
            let state = try await runtime.entity(InventoryItem.self, id: sku).query { $0 }
            #expect(state.isConsistent, "\(sku): \(state)", sourceLocation: sourceLocation)
            if settled { #expect(state.holds.isEmpty, "\(sku) still holds \(state.holds)", sourceLocation: sourceLocation) }
        }
    }
}

/// A JSON value to send (so that tests can send wrong types on purpose).
enum JSONField: Encodable, ExpressibleByStringLiteral, ExpressibleByIntegerLiteral {
    case string(String), int(Int), double(Double), bool(Bool)

    init(stringLiteral value: String) { self = .string(value) }
    init(integerLiteral value: Int) { self = .int(value) }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .string(let value): try container.encode(value)
        case .int(let value): try container.encode(value)
        case .double(let value): try container.encode(value)
        case .bool(let value): try container.encode(value)
        }
    }
}

/// The JSON body of a refused request.
struct ErrorBody: Decodable, Equatable {
    var error: String
    var message: String
}

struct CartTestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Expects `status`, then decodes the body as `T`.
func expect<T: Decodable>(_ status: Int, _ response: SampleHTTPResponse, _ type: T.Type,
                          sourceLocation: SourceLocation = #_sourceLocation) throws -> T {
    guard response.status == status else {
        Issue.record("expected \(status), got \(response.status): \(response.text)", sourceLocation: sourceLocation)
        throw CartTestFailure("expected \(status), got \(response.status): \(response.text)")
    }
    return try response.decode(T.self)
}

/// Expects a refusal: `status`, and a JSON body `{"error": error, "message": ...}`.
func expectError(_ status: Int, _ error: String, _ response: SampleHTTPResponse, sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(response.status == status, "\(response.text)", sourceLocation: sourceLocation)
    let body = try? response.decode(ErrorBody.self)
    #expect(body?.error == error, "\(response.text)", sourceLocation: sourceLocation)
    #expect(body.map { !$0.message.isEmpty } == true, "\(response.text)", sourceLocation: sourceLocation)
}
