import Foundation
import Hummingbird
import Logging

/// The shop's HTTP API over ``Shop``: JSON in, JSON out, amounts in integer cents. Every mutating
/// request carries a `requestId`; a refused request gets `{"error": ..., "message": ...}` with a 4xx
/// status and changes nothing.
///
/// | route | body | answer |
/// | --- | --- | --- |
/// | `POST /inventory/{sku}` | `{"quantity", "requestId", "priceCents"?}` | 200 ``InventoryView`` |
/// | `GET /inventory/{sku}` | | 200 ``InventoryView`` |
/// | `POST /carts/{id}/items` | `{"sku", "quantity", "requestId"}` | 200 ``CartView`` |
/// | `DELETE /carts/{id}/items/{sku}?requestId=…` | (or `{"requestId"}`) | 200 ``CartView`` |
/// | `GET /carts/{id}` | | 200 ``CartView`` |
/// | `POST /carts/{id}/checkout` | `{"requestId", "paymentToken"}` | 202 ``OrderView`` |
/// | `GET /orders/{id}` | | 200 ``OrderView`` |
/// | `GET /orders/{id}?waitFor=completed,compensated,failed&timeoutMs=10000` | | 200 ``OrderView`` once its status is one of those, or as it is after the timeout (a long poll; at most 30 s) |
enum CartRoutes {
    /// The router of every route above.
    static func router(_ shop: Shop) -> Router<BasicRequestContext> {
        let router = Router()
        router.add(middleware: JSONErrorMiddleware())
        router.post("/inventory/:sku") { request, context in
            await respond {
                let body = try await JSONFields.read(request)
                return try await shop.restock(sku: try context.parameter("sku"), quantity: try body.quantity("quantity"),
                                              priceCents: try body.price("priceCents"), requestID: try body.requestID())
            }
        }
        router.get("/inventory/:sku") { _, context in
            await respond { try await shop.inventory(sku: try context.parameter("sku")) }
        }
        router.post("/carts/:id/items") { request, context in
            await respond {
                let body = try await JSONFields.read(request)
                return try await shop.addItem(cart: try context.parameter("id"), sku: try body.string("sku"),
                                              quantity: try body.quantity("quantity"), requestID: try body.requestID())
            }
        }
        router.delete("/carts/:id/items/:sku") { request, context in
            await respond {
                let requestID: String
                if let query = request.uri.queryParameters["requestId"] {
                    requestID = String(query)
                    try ShopError.checkID(requestID, "requestId")
                } else {
                    requestID = try await JSONFields.read(request, allowEmpty: true).requestID()
                }
                return try await shop.removeItem(cart: try context.parameter("id"), sku: try context.parameter("sku"), requestID: requestID)
            }
        }
        router.get("/carts/:id") { _, context in
            await respond { try await shop.cart(id: try context.parameter("id")) }
        }
        router.post("/carts/:id/checkout") { request, context in
            await respond(.accepted) {
                let body = try await JSONFields.read(request)
                return try await shop.checkout(cart: try context.parameter("id"), paymentToken: try body.string("paymentToken"),
                                               requestID: try body.requestID())
            }
        }
        router.get("/orders/:id") { request, context in
            await respond {
                let id = try context.parameter("id")
                guard let wanted = request.uri.queryParameters["waitFor"] else { return try await shop.order(id: id) }
                let (statuses, timeout) = try waitParameters(String(wanted), request.uri.queryParameters["timeoutMs"].map(String.init))
                return try await shop.order(id: id, waitingFor: statuses, timeout: timeout)
            }
        }
        return router
    }

    /// The HTTP server on `host`:`port` (0: any free port); `onServerRunning` gets the bound port.
    static func application(shop: Shop, host: String, port: Int, logger: Logger,
                            onServerRunning: @escaping @Sendable (Int) async -> Void = { _ in }) -> some ApplicationProtocol {
        Application(router: router(shop), configuration: .init(address: .hostname(host, port: port), serverName: "CartSample"),
                    onServerRunning: { channel in await onServerRunning(channel.localAddress?.port ?? port) }, logger: logger)
    }

    /// `waitFor` (comma-separated order statuses) and `timeoutMs` (default 10,000, at most 30,000).
    static func waitParameters(_ wanted: String, _ timeoutMs: String?) throws(ShopError) -> (Set<Order.Status>, Duration) {
        var statuses = Set<Order.Status>()
        for name in wanted.split(separator: ",") {
            guard let status = Order.Status(rawValue: String(name)), status != .new else {
                let known = Order.Status.allCases.filter { $0 != .new }.map(\.rawValue).joined(separator: ", ")
                throw ShopError(.invalid, "waitFor: '\(name)' is not an order status (\(known))")
            }
            statuses.insert(status)
        }
        guard !statuses.isEmpty else { throw ShopError(.invalid, "waitFor names no status") }
        var milliseconds = 10_000
        if let timeoutMs {
            guard let value = Int(timeoutMs), (0...30_000).contains(value) else {
                throw ShopError(.invalid, "timeoutMs must be an integer in 0...30000, not '\(timeoutMs)'")
            }
            milliseconds = value
        }
        return (statuses, .milliseconds(milliseconds))
    }

    /// Runs `body` and answers with its value as JSON (`status`), or with its ``ShopError``.
    private static func respond<Value: Encodable>(_ status: HTTPResponse.Status = .ok,
                                                  _ body: () async throws -> Value) async -> Response {
        do {
            return json(try await body(), status: status)
        } catch let error as ShopError {
            return json(["error": error.code.name, "message": error.message], status: .init(code: error.code.status))
        } catch {
            return json(["error": ShopError.Code.internal.name, "message": "\(error)"], status: .internalServerError)
        }
    }

    static func json(_ value: some Encodable, status: HTTPResponse.Status) -> Response {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let bytes = (try? encoder.encode(value)) ?? Data(#"{"error":"internal","message":"the answer did not encode"}"#.utf8)
        return Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(bytes: bytes)))
    }
}

/// Gives the errors Hummingbird raises itself (no such route, a body too large to read) the shop's
/// JSON shape, `{"error": ..., "message": ...}`.
struct JSONErrorMiddleware<Context: RequestContext>: RouterMiddleware {
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        do {
            return try await next(request, context)
        } catch let error as HTTPResponseError {
            let name = switch error.status {
            case .notFound: ShopError.Code.notFound.name
            case .contentTooLarge: ShopError.Code.payloadTooLarge.name
            default: "http_error"
            }
            let message = error.status == .notFound ? "no route \(request.method) \(request.uri.path)" : "\(error.status)"
            return CartRoutes.json(["error": name, "message": message], status: error.status)
        }
    }
}

extension BasicRequestContext {
    /// A path parameter, checked as an id.
    fileprivate func parameter(_ name: String) throws(ShopError) -> String {
        let value = parameters.get(name) ?? ""
        try ShopError.checkID(value, name)
        return value
    }
}

/// A request's JSON object, read field by field so that each problem gets its own message.
struct JSONFields: Sendable {
    let values: [String: JSONValue]

    /// Reads and parses the body of `request` (at most ``ShopError/maxBodyBytes``).
    /// - Parameter allowEmpty: an empty body reads as an object without fields.
    /// - Throws: ``ShopError`` `payloadTooLarge`, or `malformedJSON` when the body is not a JSON object.
    static func read(_ request: Request, allowEmpty: Bool = false) async throws(ShopError) -> JSONFields {
        if let length = request.headers[.contentLength].flatMap(Int.init), length > ShopError.maxBodyBytes {
            throw tooLarge
        }
        let buffer: ByteBuffer
        do {
            buffer = try await request.body.collect(upTo: ShopError.maxBodyBytes)
        } catch let error as HTTPResponseError where error.status == .contentTooLarge {
            throw tooLarge
        } catch {
            throw ShopError(.malformedJSON, "the body could not be read: \(error)")
        }
        let bytes = Array(buffer.readableBytesView)
        if allowEmpty, bytes.isEmpty { return JSONFields(values: [:]) }
        return try parse(bytes)
    }

    private static var tooLarge: ShopError {
        ShopError(.payloadTooLarge, "the body exceeds \(ShopError.maxBodyBytes) bytes")
    }

    /// Parses `bytes` as a JSON object.
    static func parse(_ bytes: [UInt8]) throws(ShopError) -> JSONFields {
        let value: JSONValue
        do { value = try JSONDecoder().decode(JSONValue.self, from: Data(bytes)) } catch {
            throw ShopError(.malformedJSON, bytes.isEmpty ? "the body is empty; a JSON object is expected" : "the body is not valid JSON")
        }
        guard case .object(let values) = value else { throw ShopError(.malformedJSON, "the body must be a JSON object") }
        return JSONFields(values: values)
    }

    /// A required string field.
    func string(_ key: String) throws(ShopError) -> String {
        switch values[key] {
        case .string(let text): return text
        case nil, .null: throw ShopError(.invalid, "\(key) is required")
        default: throw ShopError(.invalid, "\(key) must be a string")
        }
    }

    /// The required `requestId`, checked as an id.
    func requestID() throws(ShopError) -> String {
        let id = try string("requestId")
        try ShopError.checkID(id, "requestId")
        return id
    }

    /// A required quantity: a whole number from 1 to ``InventoryItem/maxQuantity``.
    func quantity(_ key: String) throws(ShopError) -> Int64 {
        guard let quantity = try integer(key) else { throw ShopError(.invalid, "\(key) is required") }
        guard quantity > 0 else { throw ShopError(.invalidQuantity, "\(key) must be positive, got \(quantity)") }
        guard quantity <= InventoryItem.maxQuantity else { throw ShopError(.invalidQuantity, "\(key) must be at most \(InventoryItem.maxQuantity)") }
        return quantity
    }

    /// An optional price in cents: a whole number from 0 to ``InventoryItem/maxQuantity``.
    func price(_ key: String) throws(ShopError) -> Int64? {
        guard let cents = try integer(key) else { return nil }
        guard (0...InventoryItem.maxQuantity).contains(cents) else { throw ShopError(.invalidQuantity, "\(key) must be between 0 and \(InventoryItem.maxQuantity)") }
        return cents
    }

    private func integer(_ key: String) throws(ShopError) -> Int64? {
        switch values[key] {
        case .integer(let value): return value
        case nil, .null: return nil
        case .number: throw ShopError(.invalid, "\(key) must be a whole number (amounts are integer cents)")
        default: throw ShopError(.invalid, "\(key) must be a number")
        }
    }
}

/// Any JSON value; integers stay apart from other numbers.
enum JSONValue: Decodable, Sendable {
    case null, bool(Bool), integer(Int64), number(Double), string(String), array([JSONValue]), object([String: JSONValue])

    init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() { self = .null }
        else if let value = try? container.decode(Bool.self) { self = .bool(value) }
        else if let value = try? container.decode(Int64.self) { self = .integer(value) }
        else if let value = try? container.decode(Double.self) { self = .number(value) }
        else if let value = try? container.decode(String.self) { self = .string(value) }
        else if let value = try? container.decode([JSONValue].self) { self = .array(value) }
        else { self = .object(try container.decode([String: JSONValue].self)) }
    }
}
