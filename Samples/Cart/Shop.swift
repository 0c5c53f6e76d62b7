import DurableEntities
import Logging

/// The shop's operations — what the HTTP routes and the demo call. Each one that changes something
/// takes the client's `requestId` and derives every entity's idempotency key from it, so repeating a
/// request (after a timeout, a crash, a lost response) returns the first outcome and changes nothing.
///
/// Adding to a cart sends its messages in a fixed order (see ``Cart``): the cart remembers the SKU,
/// the cart's run body (its expiry timer) starts if it has not, the SKU holds the units for the cart,
/// the cart's line grows. Removing shrinks the cart first, then gives the units back. Checking out
/// closes the cart into an ``Order`` and starts its saga.
struct Shop: Sendable {
    /// The shop's knobs.
    struct Settings: Sendable {
        /// An idle cart expires after this long.
        var cartIdleTimeout: Duration = .seconds(30 * 60)
        /// The longest one payment attempt may take.
        var paymentTimeout: Duration = .seconds(10)

        init(cartIdleTimeout: Duration = .seconds(30 * 60), paymentTimeout: Duration = .seconds(10)) {
            self.cartIdleTimeout = cartIdleTimeout
            self.paymentTimeout = paymentTimeout
        }
    }

    let runtime: EntityRuntime
    let settings: Settings

    /// The entity types of the shop.
    static let entityTypes: [any EntityWorkflow.Type] = [InventoryItem.self, Cart.self, Order.self]

    /// Opens a runtime with the shop's entity types and activities (the payment activities call
    /// `gateway`), and hands it to the activities that message entities.
    /// - Throws: ``EntityError`` with code `storage` when the directory cannot be opened.
    static func openRuntime(configuration: EntityRuntime.Configuration, gateway: PaymentGateway) throws(EntityError) -> EntityRuntime {
        let handle = RuntimeHandle()
        let runtime = try EntityRuntime(configuration: configuration, entityTypes: entityTypes, activities: activities(handle, gateway))
        handle.attach(runtime)
        return runtime
    }

    // MARK: Inventory

    /// Puts `quantity` more units of `sku` on the shelf (and sets its unit price when given).
    func restock(sku: String, quantity: Int64, priceCents: Int64?, requestID: String) async throws(ShopError) -> InventoryView {
        try ShopError.checkID(sku, "sku")
        let outcome = try await call {
            try await item(sku).update(.restock(quantity: quantity, priceCents: priceCents), idempotencyKey: "restock:\(requestID)")
        }
        return InventoryView(sku: sku, outcome: outcome)
    }

    /// A SKU's stock.
    /// - Throws: ``ShopError`` `notFound` for a SKU never restocked.
    func inventory(sku: String) async throws(ShopError) -> InventoryView {
        try ShopError.checkID(sku, "sku")
        let state = try await call { try await item(sku).query { $0 } }
        guard state.exists else { throw ShopError(.notFound, "no SKU '\(sku)'") }
        return InventoryView(sku: sku, state: state)
    }

    // MARK: Carts

    /// Adds `quantity` units of `sku` to cart `id` (creating the cart), holding them on the shelf.
    /// - Throws: ``ShopError``: `notFound` (unknown SKU), `outOfStock`, `cartClosed`, `invalid`.
    func addItem(cart id: String, sku: String, quantity: Int64, requestID: String) async throws(ShopError) -> CartView {
        try ShopError.checkID(id, "cart id")
        try ShopError.checkID(sku, "sku")
        let item = item(sku)
        guard try await call({ try await item.query(\.exists) }) else { throw ShopError(.notFound, "no SKU '\(sku)'") }
        let cart = cart(id)
        _ = try await call { try await cart.update(.touch(sku: sku), idempotencyKey: "add:\(requestID):touch") }
        try await call { try await cart.start(.init(idleTimeoutMilliseconds: Self.milliseconds(settings.cartIdleTimeout))) }
        let holder = InventoryItem.holder(cart: id)
        let held = try await call { try await item.update(.hold(holder: holder, quantity: quantity), idempotencyKey: "\(holder):add:\(requestID)") }
        let state = try await call {
            try await cart.update(.add(sku: sku, quantity: quantity, priceCents: held.priceCents), idempotencyKey: "add:\(requestID)")
        }
        return CartView(id: id, state: state)
    }

    /// Drops the line of `sku` from cart `id` and gives its units back to the shelf.
    /// - Throws: ``ShopError``: `notFound` (unknown cart, or the SKU is not in it), `cartClosed`.
    func removeItem(cart id: String, sku: String, requestID: String) async throws(ShopError) -> CartView {
        _ = try await cart(id: id)
        let state = try await call { try await cart(id).update(.remove(sku: sku), idempotencyKey: "remove:\(requestID)") }
        let holder = InventoryItem.holder(cart: id)
        _ = try await call { try await item(sku).update(.release(holders: [holder], close: false), idempotencyKey: "\(holder):remove:\(requestID)") }
        return CartView(id: id, state: state)
    }

    /// Cart `id`.
    /// - Throws: ``ShopError`` `notFound` for a cart that never had an item.
    func cart(id: String) async throws(ShopError) -> CartView {
        try ShopError.checkID(id, "cart id")
        let state = try await call { try await cart(id).query { $0 } }
        guard state.status != .new else { throw ShopError(.notFound, "no cart '\(id)'") }
        return CartView(id: id, state: state)
    }

    /// Closes cart `id` into an order and starts the order's checkout saga; returns the order as it
    /// is right after the start (the saga goes on in the background: `GET /orders/{id}`).
    /// - Throws: ``ShopError``: `notFound`, `cartClosed` (checked out already, or expired), `cartEmpty`.
    func checkout(cart id: String, paymentToken: String, requestID: String) async throws(ShopError) -> OrderView {
        _ = try await cart(id: id)
        let timeout = Self.milliseconds(settings.paymentTimeout)
        let state = try await call {
            try await cart(id).update(.checkout(paymentToken: paymentToken, paymentTimeoutMilliseconds: timeout),
                                      idempotencyKey: "checkout:\(requestID)")
        }
        guard let input = state.order else { throw ShopError(.internal, "the checked-out cart has no order") }
        try await call { try await runtime.entity(Order.self, id: input.orderID).start(input) }
        return try await order(id: input.orderID)
    }

    // MARK: Orders

    /// Order `id`.
    /// - Throws: ``ShopError`` `notFound` for an order that never started.
    func order(id: String) async throws(ShopError) -> OrderView {
        try ShopError.checkID(id, "order id")
        let state = try await call { try await runtime.entity(Order.self, id: id).query { $0 } }
        guard state.status != .new else { throw ShopError(.notFound, "no order '\(id)'") }
        return OrderView(id: id, state: state)
    }

    /// Order `id` once its status is one of `statuses`, or as it is when `timeout` passes (a long
    /// poll: the runtime resumes the wait when a turn commits the status; nothing polls). The timeout
    /// runs on the runtime's clock.
    /// - Throws: ``ShopError`` `notFound` (checked first: an order that never started is not waited for).
    func order(id: String, waitingFor statuses: Set<Order.Status>, timeout: Duration) async throws(ShopError) -> OrderView {
        let current = try await order(id: id)
        guard let status = Order.Status(rawValue: current.status), !statuses.contains(status) else { return current }
        let waited: Result<Order.State, EntityError>
        do {
            waited = .success(try await runtime.entity(Order.self, id: id).awaitState(timeout: timeout) { statuses.contains($0.status) })
        } catch {
            waited = .failure(error)
        }
        switch waited {
        case .success(let state): return OrderView(id: id, state: state)
        case .failure(let error) where error.code == EntityError.Code.timedOut: return try await order(id: id)
        case .failure(let error): throw ShopError(error)
        }
    }

    // MARK: Helpers

    private func item(_ sku: String) -> EntityRef<InventoryItem> { runtime.entity(InventoryItem.self, id: sku) }
    private func cart(_ id: String) -> EntityRef<Cart> { runtime.entity(Cart.self, id: id) }

    /// Whole milliseconds, at least 1.
    private static func milliseconds(_ duration: Duration) -> Int64 {
        let (seconds, attoseconds) = duration.components
        return max(1, seconds * 1_000 + attoseconds / 1_000_000_000_000_000)
    }

    /// Runs one entity call, turning its ``EntityError`` into a ``ShopError``.
    private func call<Value>(_ body: () async throws -> Value) async throws(ShopError) -> Value {
        do {
            return try await body()
        } catch let error as EntityError {
            throw ShopError(error)
        } catch {
            throw ShopError(.internal, "\(error)")
        }
    }
}

// MARK: What the shop answers (the JSON bodies of the responses)

/// A SKU's stock.
struct InventoryView: Codable, Sendable, Equatable {
    var sku: String
    var available: Int64
    var reserved: Int64
    var shipped: Int64
    var restocked: Int64
    var priceCents: Int64

    init(sku: String, state: InventoryItem.State) {
        self.sku = sku
        available = state.available
        reserved = state.reserved
        shipped = state.shipped
        restocked = state.restocked
        priceCents = state.priceCents
    }

    init(sku: String, outcome: InventoryItem.Outcome) {
        self.sku = sku
        available = outcome.available
        reserved = outcome.reserved
        shipped = outcome.shipped
        restocked = outcome.restocked
        priceCents = outcome.priceCents
    }
}

/// One line of a cart or an order.
struct ItemView: Codable, Sendable, Equatable {
    var sku: String
    var quantity: Int64
    var priceCents: Int64
}

/// A cart.
struct CartView: Codable, Sendable, Equatable {
    var id: String
    var status: String
    var items: [ItemView]
    var totalCents: Int64
    var orderId: String?

    init(id: String, state: Cart.State) {
        self.id = id
        status = state.status.rawValue
        items = state.lines.map { ItemView(sku: $0.sku, quantity: $0.quantity, priceCents: $0.priceCents) }
        totalCents = state.totalCents
        orderId = state.order?.orderID
    }
}

/// An order and its saga's progress.
struct OrderView: Codable, Sendable, Equatable {
    var id: String
    var cartId: String
    var status: String
    var items: [ItemView]
    var totalCents: Int64
    var paymentId: String?
    var reason: String?
    var steps: [String]

    init(id: String, state: Order.State) {
        self.id = id
        cartId = state.cartID
        status = state.status.rawValue
        items = state.lines.map { ItemView(sku: $0.sku, quantity: $0.quantity, priceCents: $0.priceCents) }
        totalCents = state.totalCents
        paymentId = state.paymentID
        reason = state.reason
        steps = state.steps
    }
}
