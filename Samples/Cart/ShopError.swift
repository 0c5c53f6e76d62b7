import DurableEntities

/// Why the shop refused a request. The HTTP routes send it as `{"error": code, "message": ...}` with
/// the code's status; nothing was changed by a refused request.
struct ShopError: Error, Sendable, CustomStringConvertible {
    /// The kind of error: its name in the JSON body and its HTTP status. Extensible.
    struct Code: Hashable, Sendable, CustomStringConvertible {
        /// The `error` field of the JSON body.
        let name: String
        /// The HTTP status it is sent with.
        let status: Int

        /// The body is not JSON, or not the expected object.
        static let malformedJSON = Code(name: "malformed_json", status: 400)
        /// A field is missing or has a wrong type or value (a non-integer quantity, a bad id).
        static let invalid = Code(name: "invalid_request", status: 400)
        /// A quantity or price out of range (zero, negative, too large).
        static let invalidQuantity = Code(name: "invalid_quantity", status: 422)
        /// No such SKU, cart, order or cart line.
        static let notFound = Code(name: "not_found", status: 404)
        /// Not enough stock on the shelf.
        static let outOfStock = Code(name: "out_of_stock", status: 409)
        /// The cart is checked out or expired.
        static let cartClosed = Code(name: "cart_closed", status: 409)
        /// Checkout of an empty cart.
        static let cartEmpty = Code(name: "cart_empty", status: 409)
        /// The body is larger than ``ShopError/maxBodyBytes``.
        static let payloadTooLarge = Code(name: "payload_too_large", status: 413)
        /// The runtime is closing.
        static let unavailable = Code(name: "unavailable", status: 503)
        /// Anything else.
        static let `internal` = Code(name: "internal", status: 500)

        var description: String { name }
    }

    let code: Code
    let message: String

    init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// The shop's reading of a runtime error: a refusal by an entity becomes the matching client error.
    init(_ error: EntityError) {
        switch error.underlying {
        case let refusal as InventoryRefusal:
            switch refusal.code {
            case .insufficientStock: self.init(.outOfStock, "not enough stock: \(refusal.message)")
            case .closedHolder: self.init(.cartClosed, refusal.message)
            default: self.init(.invalidQuantity, refusal.message)
            }
        case let refusal as CartRefusal:
            switch refusal.code {
            case .notOpen: self.init(.cartClosed, refusal.message)
            case .notInCart: self.init(.notFound, refusal.message)
            case .empty: self.init(.cartEmpty, refusal.message)
            default: self.init(.invalidQuantity, refusal.message)
            }
        default:
            switch error.code {
            case .closed: self.init(.unavailable, "the shop is shutting down; retry with the same requestId")
            case .payloadTooLarge: self.init(.payloadTooLarge, error.message)
            default: self.init(.internal, "\(error)")
            }
        }
    }

    var description: String { "ShopError.\(code): \(message)" }

    /// The largest request body accepted.
    static let maxBodyBytes = 16 * 1_024

    /// Ids (SKUs, cart and order ids, request ids): 1 to 64 letters, digits, `-`, `_` or `.`.
    static func checkID(_ id: String, _ what: String) throws(ShopError) {
        guard (1...64).contains(id.utf8.count),
              id.utf8.allSatisfy({ $0 < 0x80 && (Character(Unicode.Scalar($0)).isLetter || Character(Unicode.Scalar($0)).isNumber || "-_.".utf8.contains($0)) })
        else { throw ShopError(.invalid, "\(what) must be 1 to 64 letters, digits, '-', '_' or '.'") }
    }
}
