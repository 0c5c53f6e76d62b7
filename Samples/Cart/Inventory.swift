import DurableEntities

/// One stock-keeping unit (SKU) as a durable entity: how many units are on the shelf, how many are
/// held for carts and reserved for orders, and how many have shipped.
///
/// Units move between four buckets and are never created or lost except by a restock:
///
///     restocked == available + reserved + shipped        (always; `reserved` is the sum of the holds)
///
/// - A **hold** belongs to a *holder*: `cart:<id>` (units a shopper put in a cart) or `order:<id>`
///   (units a checkout reserved). Holding takes units from `available`; nothing can hold more than
///   is available, so stock never goes negative.
/// - **Releasing** a holder gives its units back to `available`; **shipping** moves an order's units
///   to `shipped`. Both may *close* the holder for this SKU: a closed holder can hold nothing again.
///   That is what makes a late or retried request harmless — a cart that expired or checked out
///   cannot grab stock afterwards, so no hold outlives its cart or its order.
/// - Every update is also safe to repeat on its own (releasing twice releases once, reserving for an
///   order that already has its reservation does nothing), and callers send idempotency keys as well.
///
/// Updates are validated against the state first; a refused one (not enough stock, a closed holder)
/// records nothing.
///
/// ## Usage
/// ```swift
/// let socks = runtime.entity(InventoryItem.self, id: "socks")
/// _ = try await socks.update(.restock(quantity: 10, priceCents: 500), idempotencyKey: "r-1")
/// _ = try await socks.update(.hold(holder: "cart:c-1", quantity: 2), idempotencyKey: "cart:c-1:add-1")
/// let reserved = try await socks.query(\.reserved)     // 2
/// ```
struct InventoryItem: EntityWorkflow {
    /// What is durable about a SKU. Snapshots store it; queries read it.
    struct State: Codable, Sendable, Equatable {
        /// The price of one unit, in cents (set by a restock; 100 until one sets it).
        var priceCents: Int64 = InventoryItem.defaultPriceCents
        /// Every unit ever restocked.
        var restocked: Int64 = 0
        /// Units on the shelf, free to hold.
        var available: Int64 = 0
        /// Units that left with a completed order.
        var shipped: Int64 = 0
        /// Units held, by holder (`cart:<id>` or `order:<id>`).
        var holds: [String: Int64] = [:]
        /// Holders that are done with this SKU: they may not hold again.
        var closed: Set<String> = []

        /// Units held for carts and orders.
        var reserved: Int64 { holds.values.reduce(0, +) }
        /// Whether the SKU was ever restocked (an unknown SKU was not).
        var exists: Bool { restocked > 0 }
        /// The conservation law every update keeps.
        var isConsistent: Bool {
            available >= 0 && shipped >= 0 && holds.values.allSatisfy { $0 > 0 } && available + reserved + shipped == restocked
        }
    }

    /// The request/response messages a SKU answers.
    enum Update: Codable, Sendable {
        /// Puts `quantity` (> 0) more units on the shelf, and sets the unit price when one is given.
        case restock(quantity: Int64, priceCents: Int64?)
        /// Holds `quantity` (> 0) more units for `holder`, taken from `available`.
        case hold(holder: String, quantity: Int64)
        /// Turns a cart's hold into an order's reservation of exactly `quantity` units (0 allowed):
        /// the cart's hold is given back, the order takes `quantity` from the shelf, and the cart is
        /// closed. Done already for this order: nothing changes.
        case reserve(order: String, cart: String, quantity: Int64)
        /// Gives every listed holder's units back to the shelf; `close` also closes them.
        case release(holders: [String], close: Bool)
        /// Ships an order's reserved units, and closes the order.
        case ship(order: String)
    }

    /// What every update returns: the units the holder concerned now holds (or that moved), and the
    /// SKU's figures after the update.
    struct Outcome: Codable, Sendable, Equatable {
        var quantity: Int64
        var priceCents: Int64
        var available: Int64
        var reserved: Int64
        var shipped: Int64
        var restocked: Int64
    }
    typealias UpdateResult = Outcome

    /// The unit price of a SKU whose restocks never named one.
    static let defaultPriceCents: Int64 = 100
    /// The most units one update may move: keeps every sum far from overflow.
    static let maxQuantity: Int64 = 1_000_000_000

    /// Pinned: renaming the Swift type must not orphan stored SKUs.
    static var entityType: String { "InventoryItem" }

    static func initialState(id: String) -> State { State() }

    /// Checks an update against the state, changing nothing.
    /// - Throws: ``InventoryRefusal``: a quantity out of range, not enough stock, a closed holder.
    static func validate(_ update: Update, state: State) throws {
        switch update {
        case .restock(let quantity, let price):
            try checkQuantity(quantity)
            guard state.restocked <= maxQuantity * 1_000 else { throw InventoryRefusal(.invalidQuantity, "the SKU cannot hold more stock") }
            if let price, !(0...maxQuantity).contains(price) { throw InventoryRefusal(.invalidQuantity, "priceCents must be between 0 and \(maxQuantity)") }
        case .hold(let holder, let quantity):
            try checkQuantity(quantity)
            guard !state.closed.contains(holder) else { throw InventoryRefusal(.closedHolder, "\(holder) is closed for this SKU (expired or checked out)") }
            guard quantity <= state.available else {
                throw InventoryRefusal(.insufficientStock, "\(quantity) requested, \(state.available) available")
            }
        case .reserve(let order, let cart, let quantity):
            guard (0...maxQuantity).contains(quantity) else { throw InventoryRefusal(.invalidQuantity, "quantity \(quantity) is out of range") }
            if state.holds[order] != nil || state.closed.contains(order) { return }  // already reserved
            let free = state.available + (state.holds[cart] ?? 0)
            guard quantity <= free else { throw InventoryRefusal(.insufficientStock, "\(quantity) to reserve, \(free) available") }
        case .release, .ship:
            return
        }
    }

    /// Applies a validated update (again on replay, where validation is not repeated: it passed
    /// against the same state when the update was first recorded).
    static func apply(_ update: Update, state: inout State, context: EntityContext) throws -> Outcome {
        var quantity: Int64 = 0
        switch update {
        case .restock(let added, let price):
            state.restocked += added
            state.available += added
            if let price { state.priceCents = price }
            quantity = added
        case .hold(let holder, let added):
            state.available -= added
            state.holds[holder, default: 0] += added
            quantity = state.holds[holder] ?? 0
        case .reserve(let order, let cart, let wanted):
            if state.holds[order] == nil, !state.closed.contains(order) {
                state.available += state.holds.removeValue(forKey: cart) ?? 0
                state.closed.insert(cart)
                state.available -= wanted
                if wanted > 0 { state.holds[order] = wanted }
            }
            quantity = state.holds[order] ?? 0
        case .release(let holders, let close):
            for holder in holders {
                let released = state.holds.removeValue(forKey: holder) ?? 0
                state.available += released
                quantity += released
                if close { state.closed.insert(holder) }
            }
        case .ship(let order):
            quantity = state.holds.removeValue(forKey: order) ?? 0
            state.shipped += quantity
            state.closed.insert(order)
        }
        return Outcome(quantity: quantity, priceCents: state.priceCents, available: state.available, reserved: state.reserved,
                       shipped: state.shipped, restocked: state.restocked)
    }

    private static func checkQuantity(_ quantity: Int64) throws {
        guard quantity > 0 else { throw InventoryRefusal(.invalidQuantity, "quantity must be positive, got \(quantity)") }
        guard quantity <= maxQuantity else { throw InventoryRefusal(.invalidQuantity, "quantity must be at most \(maxQuantity), got \(quantity)") }
    }

    /// The holder name of a cart.
    static func holder(cart id: String) -> String { "cart:\(id)" }
    /// The holder name of an order.
    static func holder(order id: String) -> String { "order:\(id)" }
}

/// Why a SKU refused an update. Delivered as the ``EntityError/underlying`` of an ``EntityError``
/// with code `rejected`; nothing was recorded.
struct InventoryRefusal: Error, Sendable, CustomStringConvertible {
    /// The kind of refusal. Extensible.
    struct Code: Hashable, Sendable, CustomStringConvertible {
        fileprivate enum Base: Hashable, Sendable { case insufficientStock, closedHolder, invalidQuantity }
        fileprivate let base: Base
        /// More units were asked for than are available.
        static let insufficientStock = Code(base: .insufficientStock)
        /// The holder (a cart that expired or checked out, a finished order) may not hold any more.
        static let closedHolder = Code(base: .closedHolder)
        /// A quantity or price out of range.
        static let invalidQuantity = Code(base: .invalidQuantity)
        var description: String { "\(base)" }
    }

    let code: Code
    let message: String

    init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    var description: String { "InventoryRefusal.\(code): \(message)" }
}
