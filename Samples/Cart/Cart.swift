import DurableEntities

/// A shopping cart as a durable entity: its lines, the SKUs it ever held stock on, and a run body that
/// expires it after a configurable idle time, on a durable timer.
///
/// Adding an item spans two entities, so ``Shop`` sends three messages, in an order that never leaks
/// stock:
/// 1. `touch(sku)`: the cart remembers the SKU *before* any stock is held for it;
/// 2. the SKU holds the units for `cart:<id>` (see ``InventoryItem``);
/// 3. `add(sku, quantity, priceCents)`: the line grows.
///
/// Whatever happens between the steps (a crash, a refusal, a client that gives up), every unit held
/// for the cart is on a SKU the cart touched, and the cart's end — expiry or checkout — sweeps every
/// touched SKU and closes the cart there, so nothing held for it outlives it.
///
/// The run body starts with the cart's first item and waits, on a durable timer, for the cart to go
/// idle for `Input.idleTimeoutMilliseconds`. Each change restarts the wait. When it runs out, the
/// cart becomes `expired` and its holds go back to the shelf (one ``ReleaseStock`` activity per SKU,
/// in parallel). After a checkout the body makes sure the order's saga has started
/// (``StartOrder``), then ends.
struct Cart: EntityWorkflow {
    /// Where a cart is in its life.
    enum Status: String, Codable, Sendable {
        /// Never used: the cart does not exist yet (`GET` answers 404).
        case new
        /// Items may be added and removed.
        case open
        /// Checked out: its lines became an ``Order``.
        case checkedOut = "checked_out"
        /// Idle too long: its holds were released.
        case expired
    }

    /// One line of the cart.
    struct Line: Codable, Sendable, Equatable {
        var sku: String
        var quantity: Int64
        /// The unit price when the line was last added to, in cents.
        var priceCents: Int64
    }

    /// What is durable about a cart.
    struct State: Codable, Sendable, Equatable {
        var status: Status = .new
        var lines: [Line] = []
        /// Every SKU stock was (or may have been) held on for this cart, in first-touch order.
        var touched: [String] = []
        /// When the cart last changed, in nanoseconds since the Unix epoch (the runtime's clock).
        var lastActivityNanoseconds: UInt64 = 0
        /// Counts changes: the run body restarts its idle wait when it moves.
        var revision: UInt64 = 0
        /// The order the checkout made (its input), once checked out.
        var order: Order.Input?

        /// The sum of the lines, in cents.
        var totalCents: Int64 { lines.reduce(0) { $0 + $1.quantity * $1.priceCents } }
    }

    /// The request/response messages a cart answers. Each returns the cart's state after it.
    enum Update: Codable, Sendable {
        /// Remembers `sku` before stock is held for it; opens a new cart.
        case touch(sku: String)
        /// Adds `quantity` units of `sku` (already held) at `priceCents` each.
        case add(sku: String, quantity: Int64, priceCents: Int64)
        /// Drops the line of `sku`.
        case remove(sku: String)
        /// Closes the cart into an order; the order's input is kept in ``State/order``.
        case checkout(paymentToken: String, paymentTimeoutMilliseconds: Int64)
    }
    typealias UpdateResult = State

    /// The run body's input.
    struct Input: Codable, Sendable, Equatable {
        /// How long the cart may stay unchanged before it expires.
        var idleTimeoutMilliseconds: Int64
    }
    /// How the cart ended.
    typealias Output = Status

    /// The most distinct SKUs a cart may touch.
    static let maxSKUs = 100

    static var entityType: String { "Cart" }
    static func initialState(id: String) -> State { State() }

    /// The id of the order a cart's checkout makes.
    static func orderID(cart id: String) -> String { "order-\(id)" }

    /// Checks an update against the cart, changing nothing.
    /// - Throws: ``CartRefusal``: the cart is not open, the SKU is not in it, it is empty, too big.
    static func validate(_ update: Update, state: State) throws {
        switch update {
        case .touch(let sku):
            guard state.status == .new || state.status == .open else { throw CartRefusal.notOpen(state) }
            guard state.touched.contains(sku) || state.touched.count < maxSKUs else {
                throw CartRefusal(.tooLarge, "a cart holds at most \(maxSKUs) different SKUs")
            }
        case .add(let sku, let quantity, _):
            guard state.status == .open else { throw CartRefusal.notOpen(state) }
            guard state.touched.contains(sku) else { throw CartRefusal(.notInCart, "\(sku) was not touched first") }
            let line = state.lines.first { $0.sku == sku }?.quantity ?? 0
            guard quantity > 0, line + quantity <= InventoryItem.maxQuantity else {
                throw CartRefusal(.tooLarge, "a line holds 1 to \(InventoryItem.maxQuantity) units")
            }
        case .remove(let sku):
            guard state.status == .open else { throw CartRefusal.notOpen(state) }
            guard state.lines.contains(where: { $0.sku == sku }) else { throw CartRefusal(.notInCart, "\(sku) is not in the cart") }
        case .checkout:
            guard state.status == .open else { throw CartRefusal.notOpen(state) }
            guard !state.lines.isEmpty else { throw CartRefusal(.empty, "an empty cart cannot check out") }
        }
    }

    /// Applies a validated update; returns the cart after it.
    static func apply(_ update: Update, state: inout State, context: EntityContext) throws -> State {
        switch update {
        case .touch(let sku):
            state.status = .open
            if !state.touched.contains(sku) { state.touched.append(sku) }
        case .add(let sku, let quantity, let price):
            if let index = state.lines.firstIndex(where: { $0.sku == sku }) {
                state.lines[index].quantity += quantity
                state.lines[index].priceCents = price
            } else {
                state.lines.append(Line(sku: sku, quantity: quantity, priceCents: price))
            }
        case .remove(let sku):
            state.lines.removeAll { $0.sku == sku }
        case .checkout(let token, let timeout):
            state.status = .checkedOut
            state.order = Order.Input(orderID: orderID(cart: context.id), cartID: context.id, lines: state.lines,
                                      skus: state.touched, paymentToken: token, paymentTimeoutMilliseconds: timeout)
        }
        state.lastActivityNanoseconds = context.nowNanoseconds
        state.revision += 1
        return state
    }

    /// The cart's life after its first item: expire when idle, or hand over to the order.
    static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> Status {
        let idle = UInt64(max(0, input.idleTimeoutMilliseconds)) * 1_000_000
        let startedAt = context.nowNanoseconds
        while context.state.status == .open || context.state.status == .new {
            let deadline = max(context.state.lastActivityNanoseconds, startedAt) + idle
            let now = context.nowNanoseconds
            if now >= deadline {
                context.updateState { $0.status = .expired; $0.revision += 1 }
                break
            }
            let revision = context.state.revision
            _ = try await context.condition(timeout: .nanoseconds(Int64(deadline - now))) { $0.revision != revision }
        }
        switch context.state.status {
        case .checkedOut:
            if let order = context.state.order { _ = try await context.execute(StartOrder.self, order, options: stockOptions) }
        default:
            let holder = InventoryItem.holder(cart: context.id)
            try await withThrowingTaskGroup(of: Void.self) { group in
                for sku in context.state.touched {
                    let release = ReleaseStock.Input(sku: sku, holders: [holder], key: "\(holder):expire")
                    group.addTask { _ = try await context.execute(ReleaseStock.self, release, options: stockOptions) }
                }
                try await group.waitForAll()
            }
        }
        return context.state.status
    }
}

/// Why a cart refused an update. Delivered as the ``EntityError/underlying`` of an ``EntityError``
/// with code `rejected`; nothing was recorded.
struct CartRefusal: Error, Sendable, CustomStringConvertible {
    /// The kind of refusal. Extensible.
    struct Code: Hashable, Sendable, CustomStringConvertible {
        fileprivate enum Base: Hashable, Sendable { case notOpen, notInCart, empty, tooLarge }
        fileprivate let base: Base
        /// The cart expired or was checked out.
        static let notOpen = Code(base: .notOpen)
        /// The SKU is not in the cart.
        static let notInCart = Code(base: .notInCart)
        /// Checkout of an empty cart.
        static let empty = Code(base: .empty)
        /// Too many SKUs, or too many units on a line.
        static let tooLarge = Code(base: .tooLarge)
        var description: String { "\(base)" }
    }

    let code: Code
    let message: String

    init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    static func notOpen(_ state: Cart.State) -> CartRefusal {
        switch state.status {
        case .checkedOut: CartRefusal(.notOpen, "the cart is checked out (order \(state.order?.orderID ?? "?"))")
        case .expired: CartRefusal(.notOpen, "the cart expired; its items went back to the shelf")
        default: CartRefusal(.notOpen, "the cart is \(state.status.rawValue)")
        }
    }

    var description: String { "CartRefusal.\(code): \(message)" }
}
