import DurableEntities
import Synchronization

// The side effects of carts and orders. Activities run outside entities, may run more than once, and
// so each sends an idempotency key derived from its order or cart; the inventory updates they send
// are also harmless to repeat on their own.

/// The runtime, for activities that message entities. Activities are registered when the runtime
/// opens (so that work recovered after a crash finds them) but the runtime only exists after that:
/// ``attach(_:)`` hands it over, and an attempt that starts earlier waits for it.
final class RuntimeHandle: Sendable {
    private struct Stored {
        var runtime: EntityRuntime?
        var waiting: [CheckedContinuation<EntityRuntime, Never>] = []
    }
    private let stored = Mutex(Stored())

    init() {}

    /// Hands over the runtime; attempts waiting for it proceed.
    func attach(_ runtime: EntityRuntime) {
        let waiting = stored.withLock { stored in
            stored.runtime = runtime
            defer { stored.waiting = [] }
            return stored.waiting
        }
        for continuation in waiting { continuation.resume(returning: runtime) }
    }

    /// The runtime, once attached.
    var runtime: EntityRuntime {
        get async {
            await withCheckedContinuation { continuation in
                let ready = stored.withLock { stored -> EntityRuntime? in
                    if let runtime = stored.runtime { return runtime }
                    stored.waiting.append(continuation)
                    return nil
                }
                if let ready { continuation.resume(returning: ready) }
            }
        }
    }
}

/// Sends an update to a SKU; a refusal becomes a ``NonRetryableError`` (retrying cannot help),
/// anything else (the runtime closing, storage) is retried by the activity's policy.
private func updateStock(_ handle: RuntimeHandle, sku: String, _ update: InventoryItem.Update, key: String) async throws -> InventoryItem.Outcome {
    let item = await handle.runtime.entity(InventoryItem.self, id: sku)
    do {
        return try await untyped { try await item.update(update, idempotencyKey: key) }
    } catch let error as EntityError where error.code == .rejected {
        throw NonRetryableError("\(sku): \((error.underlying as? InventoryRefusal)?.message ?? error.message)")
    }
}

/// Runs `body`, its typed error seen as `any Error` (for `catch … as … where`).
private func untyped<Value>(_ body: () async throws -> Value) async throws -> Value {
    try await body()
}

/// Turns a cart's hold on one SKU into the order's reservation (see ``InventoryItem/Update/reserve(order:cart:quantity:)``).
struct ReserveStock: Activity {
    struct Input: Codable, Sendable {
        var sku: String
        var order: String
        var cart: String
        var quantity: Int64
    }
    static var name: String { "ReserveStock" }
    let handle: RuntimeHandle

    func run(_ input: Input, context: ActivityContext) async throws -> Int64 {
        let update = InventoryItem.Update.reserve(order: InventoryItem.holder(order: input.order),
                                                  cart: InventoryItem.holder(cart: input.cart), quantity: input.quantity)
        return try await updateStock(handle, sku: input.sku, update, key: "order:\(input.order):reserve").quantity
    }
}

/// Gives holders' units on one SKU back to the shelf and closes them there. Returns the units released.
struct ReleaseStock: Activity {
    struct Input: Codable, Sendable {
        var sku: String
        var holders: [String]
        /// The idempotency key of the update (`<holder>:release`, `<holder>:expire`).
        var key: String
    }
    static var name: String { "ReleaseStock" }
    let handle: RuntimeHandle

    func run(_ input: Input, context: ActivityContext) async throws -> Int64 {
        try await updateStock(handle, sku: input.sku, .release(holders: input.holders, close: true), key: input.key).quantity
    }
}

/// Ships an order's reserved units of one SKU. Returns the units shipped.
struct ShipStock: Activity {
    struct Input: Codable, Sendable {
        var sku: String
        var order: String
    }
    static var name: String { "ShipStock" }
    let handle: RuntimeHandle

    func run(_ input: Input, context: ActivityContext) async throws -> Int64 {
        let order = InventoryItem.holder(order: input.order)
        return try await updateStock(handle, sku: input.sku, .ship(order: order), key: "\(order):ship").quantity
    }
}

/// Starts an order's saga (a repeated start does nothing). The cart's run body calls it after a
/// checkout, so the order starts even if the checkout request died right after closing the cart.
struct StartOrder: Activity {
    static var name: String { "StartOrder" }
    let handle: RuntimeHandle

    func run(_ input: Order.Input, context: ActivityContext) async throws -> String {
        try await handle.runtime.entity(Order.self, id: input.orderID).start(input)
        return input.orderID
    }
}

/// Charges an order's total through the ``PaymentGateway``, keyed by the order id.
struct ChargePayment: Activity {
    struct Input: Codable, Sendable {
        var orderID: String
        var amountCents: Int64
        var token: String
    }
    static var name: String { "ChargePayment" }
    let gateway: PaymentGateway

    func run(_ input: Input, context: ActivityContext) async throws -> PaymentGateway.Receipt {
        try await gateway.charge(orderID: input.orderID, amountCents: input.amountCents, token: input.token)
    }
}

/// Refunds an order's charge, if there is one. Returns the cents refunded (0: nothing was charged).
struct RefundPayment: Activity {
    static var name: String { "RefundPayment" }
    let gateway: PaymentGateway

    func run(_ input: String, context: ActivityContext) async throws -> Int64 {
        gateway.refund(orderID: input)
    }
}

extension Shop {
    /// Every activity of the sample, wired to `handle` and `gateway`.
    static func activities(_ handle: RuntimeHandle, _ gateway: PaymentGateway) -> [any Activity] {
        [ReserveStock(handle: handle), ReleaseStock(handle: handle), ShipStock(handle: handle), StartOrder(handle: handle),
         ChargePayment(gateway: gateway), RefundPayment(gateway: gateway)]
    }
}
