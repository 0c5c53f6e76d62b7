import ArgumentParser
@_spi(Testing) import DurableEntities
import Foundation

/// The cart sample's story, in-process on a fresh temporary directory: restock, a cart, a checkout
/// that completes, one whose payment is declined and one whose payment times out (both compensated),
/// a cart that expires, and a crash in the middle of a checkout. After every step the stock of each
/// SKU is checked: `available + reserved + shipped == restocked`, nothing negative, nothing leaked.
struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "A scripted shop: checkouts that complete, compensate, expire, and survive a crash.",
        discussion: "Runs in-process through the same Shop the HTTP routes call, on a fresh temporary directory (or --data). Exits non-zero when a check fails.")

    @Option(name: .long, help: ArgumentHelp("The LMDB directory; deleted first. Default: a fresh temporary directory, removed at the end.", valueName: "dir"))
    var data: String?

    @OptionGroup var options: CartOptions

    static let skus = ["socks", "mug", "hat"]

    func run() async throws {
        let started = ContinuousClock.now
        let directory = data ?? FileManager.default.temporaryDirectory.appendingPathComponent("cart-demo-\(UUID().uuidString.prefix(8))").path
        try? FileManager.default.removeItem(atPath: directory)
        defer { if data == nil { try? FileManager.default.removeItem(atPath: directory) } }
        let settings = options.settings(defaults: .init(cartIdleTimeout: .seconds(1), paymentTimeout: .milliseconds(300)))
        let gateway = PaymentGateway()
        let configuration = options.configuration(directory: directory)
        var runtime = try Shop.openRuntime(configuration: configuration, gateway: gateway)
        var shop = Shop(runtime: runtime, settings: settings)
        print("Cart sample: SKUs, carts and orders as durable entities in \(directory).")
        print("Carts expire after \(settings.cartIdleTimeout) idle; a payment attempt times out after \(settings.paymentTimeout).")

        step(1, "Restock. Each SKU is an entity; a restock is an update keyed by its requestId.")
        for (sku, quantity, price) in [("socks", 10, 500), ("mug", 5, 1_200), ("hat", 3, 2_000)] as [(String, Int64, Int64)] {
            let view = try await shop.restock(sku: sku, quantity: quantity, priceCents: price, requestID: "restock-\(sku)")
            print("   \(sku.padding(5))  +\(quantity) at \(Money.format(price))  → available \(view.available)")
        }
        try await checkStock(shop)

        step(2, "alice fills a cart. Adding holds the units on the shelf for the cart.")
        _ = try await shop.addItem(cart: "alice", sku: "socks", quantity: 2, requestID: "alice-1")
        var cart = try await shop.addItem(cart: "alice", sku: "mug", quantity: 1, requestID: "alice-2")
        print("   cart alice: \(describe(cart.items)), total \(Money.format(cart.totalCents))")
        cart = try await shop.addItem(cart: "alice", sku: "mug", quantity: 1, requestID: "alice-2")
        print("   the same request again (requestId alice-2): \(describe(cart.items)) — counted once")
        try await checkStock(shop)

        step(3, "alice checks out. The order's saga reserves every line in parallel, charges, ships.")
        try await checkout(shop, cart: "alice", token: "tok_ok")
        try await checkStock(shop)

        step(4, "bob's card is declined. The saga compensates: refund (nothing to refund), release.")
        _ = try await shop.addItem(cart: "bob", sku: "hat", quantity: 2, requestID: "bob-1")
        try await checkout(shop, cart: "bob", token: "tok_decline")
        try await checkStock(shop)

        step(5, "carol's payment never answers. Two attempts time out, then the saga compensates.")
        _ = try await shop.addItem(cart: "carol", sku: "socks", quantity: 3, requestID: "carol-1")
        try await checkout(shop, cart: "carol", token: "tok_timeout")
        try await checkStock(shop)

        step(6, "dave fills a cart and leaves. A durable timer expires it and its holds go back.")
        _ = try await shop.addItem(cart: "dave", sku: "mug", quantity: 3, requestID: "dave-1")
        try await printStock(shop, "while dave's cart holds 3 mugs")
        let ended = try await runtime.entity(Cart.self, id: "dave").result()
        print("   cart dave: \(ended.rawValue)")
        try await checkStock(shop)

        step(7, "A crash in the middle of erin's checkout, while the payment gateway is still thinking.")
        _ = try await shop.addItem(cart: "erin", sku: "hat", quantity: 1, requestID: "erin-1")
        _ = try await shop.addItem(cart: "erin", sku: "socks", quantity: 1, requestID: "erin-2")
        let callsBefore = gateway.attempts
        _ = try await shop.checkout(cart: "erin", paymentToken: "tok_hold", requestID: "erin-checkout")
        await gateway.waitUntilHeld(count: 1)
        print("   order-erin: \(try await shop.order(id: "order-erin").status), the charge is at the gateway — crash now")
        runtime.simulateCrash()
        runtime = try Shop.openRuntime(configuration: configuration, gateway: gateway)
        shop = Shop(runtime: runtime, settings: settings)
        print("   reopened: order-erin is \(try await shop.order(id: "order-erin").status); the charge activity runs again, same key")
        await gateway.waitUntilHeld(count: 2)
        gateway.releaseHeld()
        _ = try await runtime.entity(Order.self, id: "order-erin").result()
        let erin = try await shop.order(id: "order-erin")
        print("   order-erin: \(erin.status) — \(erin.steps.joined(separator: "; "))")
        print("   the gateway saw \(gateway.attempts - callsBefore) charge calls for erin and charged once: \(gateway.charge(of: "order-erin").map { Money.format($0.amountCents) } ?? "none")")
        guard erin.status == "completed", gateway.charge(of: "order-erin")?.refunded == false else {
            print("   ✘ expected a completed order charged once")
            throw ExitCode.failure
        }
        try await checkStock(shop)
        for sku in Self.skus where try await !runtime.entity(InventoryItem.self, id: sku).query(\.holds).isEmpty {
            print("   ✘ \(sku) still holds units for an ended cart or order")
            throw ExitCode.failure
        }
        await runtime.shutdown()
        print()
        let elapsed = ContinuousClock.now - started
        print("Done in \(elapsed.components.seconds).\(elapsed.components.attoseconds / 100_000_000_000_000_000) s: every SKU kept available + reserved + shipped == restocked, and nothing is left held.")
    }

    /// Checks out `cart`, waits for the saga and prints its outcome.
    private func checkout(_ shop: Shop, cart: String, token: String) async throws {
        let order = try await shop.checkout(cart: cart, paymentToken: token, requestID: "\(cart)-checkout")
        print("   checkout (token \(token)) → \(order.id), \(order.status)")
        _ = try await shop.runtime.entity(Order.self, id: order.id).result()
        let done = try await shop.order(id: order.id)
        print("   \(order.id): \(done.status)\(done.reason.map { " (\($0))" } ?? "")")
        for step in done.steps { print("      · \(step)") }
    }

    /// Prints every SKU's stock and fails unless each keeps its law with nothing held by an ended cart or order.
    private func checkStock(_ shop: Shop) async throws {
        try await printStock(shop, nil)
    }

    private func printStock(_ shop: Shop, _ note: String?) async throws {
        var line = "   stock" + (note.map { " (\($0))" } ?? "") + ":"
        for sku in Self.skus {
            let state = try await shop.runtime.entity(InventoryItem.self, id: sku).query { $0 }
            guard state.isConsistent else {
                print("   ✘ \(sku) breaks available + reserved + shipped == restocked: \(state)")
                throw ExitCode.failure
            }
            line += "  \(sku) \(state.available)/\(state.reserved)/\(state.shipped)"
        }
        print(line + "  (available/reserved/shipped) ✔")
    }

    private func describe(_ items: [ItemView]) -> String {
        items.map { "\($0.sku) ×\($0.quantity)" }.joined(separator: ", ")
    }

    private func step(_ number: Int, _ text: String) {
        print()
        print("\(number). \(text)")
    }
}

extension String {
    /// Pads with spaces to `width` characters, on the right.
    fileprivate func padding(_ width: Int) -> String {
        self + String(repeating: " ", count: max(0, width - count))
    }
}
