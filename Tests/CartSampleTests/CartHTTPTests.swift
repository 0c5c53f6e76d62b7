@testable import CartSample
import DurableEntities
import DurableEntitiesTesting
import Foundation
import SampleHTTPClient
import Testing

/// The cart sample's HTTP service, driven in-process over loopback: each test serves a fresh LMDB
/// directory on a free port (``CartServer``) and checks the stock invariant
/// `available + reserved + shipped == restocked` (and, once everything has ended, that nothing is
/// still held).
@Suite("Cart sample over HTTP", .serialized)
struct CartHTTPTests {
    @Test("restock and read a SKU; a retried restock returns the first result and adds nothing")
    func restock() async throws {
        try await CartServer.run { shop in
            let first = try await shop.restock("socks", 10, price: 500, requestID: "r-1")
            #expect(first == InventoryView(sku: "socks", state: .init(priceCents: 500, restocked: 10, available: 10)))
            let retried = try await shop.restock("socks", 10, price: 500, requestID: "r-1")
            #expect(retried == first)
            #expect(try await shop.inventory("socks").available == 10)
            _ = try await shop.restock("socks", 5, requestID: "r-2")
            let after = try await shop.inventory("socks")
            #expect(after.available == 15 && after.reserved == 0 && after.priceCents == 500)
            let raw = try await shop.get("/inventory/socks").text
            #expect(raw.contains(#""sku":"socks""#) && raw.contains(#""available":15"#) && raw.contains(#""reserved":0"#))
            try await shop.checkStock(["socks"], settled: true)
        }
    }

    @Test("add, retry, remove: holds follow the cart, and a retried request changes nothing")
    func cartFlow() async throws {
        try await CartServer.run { shop in
            _ = try await shop.restock("socks", 10, price: 500)
            _ = try await shop.restock("mug", 4, price: 1_200)

            let added = try expect(200, try await shop.add("c-1", "socks", 2, requestID: "a-1"), CartView.self)
            #expect(added.items == [ItemView(sku: "socks", quantity: 2, priceCents: 500)] && added.status == "open")
            let cart = try expect(200, try await shop.add("c-1", "mug", 3, requestID: "a-2"), CartView.self)
            #expect(cart.totalCents == 2 * 500 + 3 * 1_200)
            let retried = try expect(200, try await shop.add("c-1", "mug", 3, requestID: "a-2"), CartView.self)
            #expect(retried == cart)
            #expect(try await shop.inventory("mug").reserved == 3)
            #expect(try await shop.inventory("socks").reserved == 2)
            try await shop.checkStock(["socks", "mug"], settled: false)

            // Not enough mugs left for another 2: refused, nothing held.
            expectError(409, "out_of_stock", try await shop.add("c-1", "mug", 2, requestID: "a-3"))
            #expect(try await shop.inventory("mug").reserved == 3)

            let removed = try expect(200, try await shop.client.request("DELETE", "/carts/c-1/items/mug?requestId=d-1"), CartView.self)
            #expect(removed.items.map(\.sku) == ["socks"])
            #expect(try await shop.inventory("mug") .available == 4)
            let removedAgain = try expect(200, try await shop.client.request("DELETE", "/carts/c-1/items/mug?requestId=d-1"), CartView.self)
            #expect(removedAgain == removed)
            // The requestId may come in a JSON body too.
            expectError(404, "not_found", try await shop.send("DELETE", "/carts/c-1/items/mug", ["requestId": "d-2"]))
            #expect(try expect(200, try await shop.get("/carts/c-1"), CartView.self) == removed)
            try await shop.checkStock(["socks", "mug"], settled: false)
            #expect(try await shop.inventory("socks").reserved == 2)
        }
    }

    @Test("a checkout completes: stock shipped, one charge, a retried checkout returns the same order")
    func checkoutCompletes() async throws {
        try await CartServer.run { shop in
            _ = try await shop.restock("socks", 10, price: 500)
            _ = try await shop.restock("mug", 4, price: 1_200)
            _ = try await shop.restock("hat", 2, price: 2_000)
            _ = try expect(200, try await shop.add("c-1", "socks", 2, requestID: "a-1"), CartView.self)
            _ = try expect(200, try await shop.add("c-1", "mug", 1, requestID: "a-2"), CartView.self)
            // Touched, then removed: the checkout sweeps its (released) hold too.
            _ = try expect(200, try await shop.add("c-1", "hat", 1, requestID: "a-3"), CartView.self)
            _ = try expect(200, try await shop.client.request("DELETE", "/carts/c-1/items/hat?requestId=d-1"), CartView.self)

            let accepted = try expect(202, try await shop.checkout("c-1", token: "tok_ok", requestID: "co-1"), OrderView.self)
            #expect(accepted.id == "order-c-1" && accepted.totalCents == 2 * 500 + 1_200)
            let again = try expect(202, try await shop.checkout("c-1", token: "tok_ok", requestID: "co-1"), OrderView.self)
            #expect(again.id == accepted.id)

            let order = try await shop.finished("order-c-1")
            #expect(order.status == "completed")
            #expect(order.paymentId != nil && order.reason == nil)
            #expect(order.items.map(\.sku) == ["socks", "mug"])
            #expect(shop.gateway.charge(of: "order-c-1") == PaymentGateway.Charge(paymentID: order.paymentId ?? "", amountCents: 2_200))
            #expect(shop.gateway.attempts == 1)

            let socks = try await shop.inventory("socks")
            #expect(socks.available == 8 && socks.reserved == 0 && socks.shipped == 2)
            #expect(try await shop.inventory("mug").shipped == 1)
            #expect(try await shop.inventory("hat").available == 2)
            let cart = try expect(200, try await shop.get("/carts/c-1"), CartView.self)
            #expect(cart.status == "checked_out" && cart.orderId == "order-c-1")

            // Retried after the saga ended: the same order, nothing runs again.
            _ = try await shop.runtime.entity(Cart.self, id: "c-1").result()
            let late = try expect(202, try await shop.checkout("c-1", token: "tok_ok", requestID: "co-1"), OrderView.self)
            #expect(late == order)
            #expect(try await shop.finished("order-c-1") == order)
            let socksLater = try await shop.inventory("socks")
            #expect(shop.gateway.attempts == 1 && socksLater == socks)

            // The cart is closed: no more items, no second checkout; nothing is held for it.
            expectError(409, "cart_closed", try await shop.add("c-1", "socks", 1, requestID: "a-4"))
            expectError(409, "cart_closed", try await shop.checkout("c-1", token: "tok_ok", requestID: "co-2"))
            _ = try await shop.runtime.entity(Cart.self, id: "c-1").result()
            try await shop.checkStock(["socks", "mug", "hat"], settled: true)
        }
    }

    @Test("GET /orders/{id}?waitFor= answers when the saga reaches one of the statuses, or at the timeout as it is")
    func orderLongPoll() async throws {
        try await CartServer.run { shop in
            _ = try await shop.restock("socks", 10, price: 500)
            _ = try expect(200, try await shop.add("c-1", "socks", 2, requestID: "a-1"), CartView.self)
            _ = try expect(202, try await shop.checkout("c-1", token: "tok_ok", requestID: "co-1"), OrderView.self)
            // One request that returns when the saga has ended: no polling loop.
            let settled = try expect(200, try await shop.get("/orders/order-c-1?waitFor=completed,compensated,failed&timeoutMs=30000"),
                                     OrderView.self)
            #expect(settled.status == "completed" && settled.paymentId != nil)
            #expect(settled == (try await shop.order("order-c-1")))
            // Already there: answers at once.
            #expect(try expect(200, try await shop.get("/orders/order-c-1?waitFor=completed"), OrderView.self) == settled)

            // A status it will never reach: a zero timeout answers at once with the order as it is.
            let asItIs = try expect(200, try await shop.get("/orders/order-c-1?waitFor=compensated&timeoutMs=0"), OrderView.self)
            #expect(asItIs == settled)

            expectError(400, "invalid_request", try await shop.get("/orders/order-c-1?waitFor=shipped"))
            expectError(400, "invalid_request", try await shop.get("/orders/order-c-1?waitFor=completed&timeoutMs=99999"))
            expectError(400, "invalid_request", try await shop.get("/orders/order-c-1?waitFor="))
            expectError(404, "not_found", try await shop.get("/orders/order-nope?waitFor=completed"))
        }
    }

    @Test("bad requests get a 4xx with a JSON error and change nothing")
    func badRequests() async throws {
        try await CartServer.run { shop in
            _ = try await shop.restock("socks", 5)
            _ = try expect(200, try await shop.add("c-1", "socks", 1, requestID: "a-1"), CartView.self)
            let before = try await shop.inventory("socks")
            let cartBefore = try await shop.get("/carts/c-1").text

            // Malformed JSON, and JSON that is not an object.
            expectError(400, "malformed_json", try await shop.client.request("POST", "/inventory/socks", body: Array(#"{"quantity": 3,"#.utf8)))
            expectError(400, "malformed_json", try await shop.client.request("POST", "/carts/c-1/items", body: Array("[1, 2]".utf8)))
            expectError(400, "malformed_json", try await shop.client.request("POST", "/carts/c-1/checkout", body: []))
            // Quantities: negative, zero, not an integer, not a number.
            for quantity: JSONField in [-1, 0] {
                expectError(422, "invalid_quantity", try await shop.send("POST", "/inventory/socks", ["quantity": quantity, "requestId": "r-x"]))
                expectError(422, "invalid_quantity", try await shop.send("POST", "/carts/c-1/items", ["sku": "socks", "quantity": quantity, "requestId": "a-x"]))
            }
            expectError(400, "invalid_request", try await shop.send("POST", "/inventory/socks", ["quantity": .double(1.5), "requestId": "r-x"]))
            expectError(400, "invalid_request", try await shop.send("POST", "/carts/c-1/items", ["sku": "socks", "quantity": .double(2.5), "requestId": "a-x"]))
            expectError(400, "invalid_request", try await shop.send("POST", "/carts/c-1/items", ["sku": "socks", "quantity": "2", "requestId": "a-x"]))
            expectError(422, "invalid_quantity", try await shop.send("POST", "/inventory/socks", ["quantity": 2, "priceCents": -5, "requestId": "r-x"]))
            // A missing requestId, on every mutating route.
            expectError(400, "invalid_request", try await shop.send("POST", "/inventory/socks", ["quantity": 3]))
            expectError(400, "invalid_request", try await shop.send("POST", "/carts/c-1/items", ["sku": "socks", "quantity": 1]))
            expectError(400, "invalid_request", try await shop.send("POST", "/carts/c-1/checkout", ["paymentToken": "tok_ok"]))
            expectError(400, "invalid_request", try await shop.client.request("DELETE", "/carts/c-1/items/socks"))
            expectError(400, "invalid_request", try await shop.send("POST", "/carts/c-1/items", ["sku": "socks", "quantity": 1, "requestId": ""]))
            // Unknown SKU, cart, order, line.
            expectError(404, "not_found", try await shop.get("/inventory/nope"))
            expectError(404, "not_found", try await shop.add("c-1", "nope", 1, requestID: "a-y"))
            expectError(404, "not_found", try await shop.get("/carts/c-404"))
            expectError(404, "not_found", try await shop.get("/orders/order-c-404"))
            expectError(404, "not_found", try await shop.checkout("c-404", token: "tok_ok", requestID: "co-x"))
            expectError(404, "not_found", try await shop.client.request("DELETE", "/carts/c-404/items/socks?requestId=d-x"))
            expectError(404, "not_found", try await shop.client.request("DELETE", "/carts/c-1/items/mug?requestId=d-y"))
            // No such route.
            expectError(404, "not_found", try await shop.get("/warehouses/1"))
            // A bad id in the path.
            expectError(400, "invalid_request", try await shop.get("/inventory/so%20cks"))
            // An oversized body (on a connection of its own: the server may close it after the 413).
            let big = try await SampleHTTPClient(port: shop.port)
            let padding = String(repeating: "x", count: 64 * 1_024)
            expectError(413, "payload_too_large", try await big.request("POST", "/carts/c-1/items", body: Array(#"{"sku": "socks", "quantity": 1, "requestId": "a-z", "pad": "\#(padding)"}"#.utf8)))
            try? await big.close()

            #expect(try await shop.inventory("socks") == before)
            #expect(try await shop.get("/carts/c-1").text == cartBefore)
            expectError(404, "not_found", try await shop.get("/carts/c-404"))
            try await shop.checkStock(["socks"], settled: false)
        }
    }

    @Test("a declined payment compensates: no charge, stock back on the shelf, order compensated with its reason")
    func paymentDeclined() async throws {
        try await CartServer.run { shop in
            _ = try await shop.restock("socks", 5, price: 500)
            _ = try await shop.restock("hat", 2, price: 2_000)
            _ = try expect(200, try await shop.add("c-1", "socks", 3, requestID: "a-1"), CartView.self)
            _ = try expect(200, try await shop.add("c-1", "hat", 2, requestID: "a-2"), CartView.self)
            _ = try expect(202, try await shop.checkout("c-1", token: "tok_decline", requestID: "co-1"), OrderView.self)

            let order = try await shop.finished("order-c-1")
            #expect(order.status == "compensated")
            #expect(order.reason?.contains("declined") == true, "\(order.reason ?? "no reason")")
            #expect(order.steps.suffix(2) == ["nothing to refund", "released the reservations"])
            #expect(shop.gateway.charge(of: "order-c-1") == nil)
            for (sku, restocked) in [("socks", 5), ("hat", 2)] as [(String, Int64)] {
                let view = try await shop.inventory(sku)
                #expect(view.available == restocked && view.reserved == 0 && view.shipped == 0, "\(view)")
            }
            _ = try await shop.runtime.entity(Cart.self, id: "c-1").result()
            try await shop.checkStock(["socks", "hat"], settled: true)
        }
    }

    @Test("a reservation that cannot be made compensates: the SKUs already reserved are released, nothing is charged")
    func reservationFails() async throws {
        try await CartServer.run { shop in
            _ = try await shop.restock("socks", 4, price: 500)
            _ = try await shop.restock("mug", 2, price: 1_200)
            _ = try expect(200, try await shop.add("c-1", "socks", 2, requestID: "a-1"), CartView.self)
            _ = try expect(200, try await shop.add("c-1", "mug", 1, requestID: "a-2"), CartView.self)
            // A race between a removal and an add can leave a cart's line without its hold; play it
            // directly: c-1's socks go back to the shelf, and c-2 takes every sock.
            _ = try await shop.runtime.entity(InventoryItem.self, id: "socks")
                .update(.release(holders: [InventoryItem.holder(cart: "c-1")], close: false), idempotencyKey: "race")
            _ = try expect(200, try await shop.add("c-2", "socks", 4, requestID: "b-1"), CartView.self)

            _ = try expect(202, try await shop.checkout("c-1", token: "tok_ok", requestID: "co-1"), OrderView.self)
            let order = try await shop.finished("order-c-1")
            #expect(order.status == "compensated")
            #expect(order.reason?.contains("reservation failed: socks") == true, "\(order.reason ?? "no reason")")
            #expect(shop.gateway.attempts == 0)
            let mugs = try await shop.inventory("mug")
            #expect(mugs.available == 2 && mugs.reserved == 0)
            let socks = try await shop.runtime.entity(InventoryItem.self, id: "socks").query { $0 }
            #expect(socks.available == 0 && socks.holds == [InventoryItem.holder(cart: "c-2"): 4])
            _ = try await shop.runtime.entity(Cart.self, id: "c-1").result()
            try await shop.checkStock(["socks", "mug"], settled: false)
        }
    }

    @Test("a payment that never answers times out after two attempts and compensates")
    func paymentTimeout() async throws {
        try await CartServer.run(settings: .init(cartIdleTimeout: .seconds(86_400), paymentTimeout: .seconds(10))) { shop in
            _ = try await shop.restock("socks", 5, price: 500)
            _ = try expect(200, try await shop.add("c-1", "socks", 4, requestID: "a-1"), CartView.self)
            _ = try expect(202, try await shop.checkout("c-1", token: "tok_timeout", requestID: "co-1"), OrderView.self)

            // Attempt 1 is running (and never answers): 10 s later its start-to-close timeout ends it.
            // The retry's backoff then passes on its own: the clock skips to the retry timer as soon
            // as the runtime waits for nothing else (a running attempt keeps it busy, so nothing is
            // skipped before). Skipping stops once attempt 2 runs, or the cart's 24-hour idle timer
            // would be next.
            await shop.gateway.waitUntilAttempts(1)
            shop.clock.skipsTimeWhenIdle = true
            shop.clock.advance(by: .seconds(10))
            await shop.gateway.waitUntilAttempts(2)
            shop.clock.skipsTimeWhenIdle = false
            shop.clock.advance(by: .seconds(10))
            let order = try await shop.finished("order-c-1")
            #expect(order.status == "compensated")
            #expect(order.reason?.contains("timed out") == true, "\(order.reason ?? "no reason")")
            #expect(shop.gateway.attempts == 2)
            #expect(shop.gateway.charge(of: "order-c-1") == nil)
            let socks = try await shop.inventory("socks")
            #expect(socks.available == 5 && socks.reserved == 0)
            try await shop.checkStock(["socks"], settled: true)
        }
    }

    @Test("an idle cart expires on its durable timer (test clock) and releases its holds; activity restarts the wait")
    func cartExpires() async throws {
        try await CartServer.run(settings: .init(cartIdleTimeout: .seconds(1_800), paymentTimeout: .seconds(10))) { shop in
            _ = try await shop.restock("mug", 5)
            _ = try await shop.restock("socks", 5)
            _ = try expect(200, try await shop.add("c-1", "mug", 3, requestID: "a-1"), CartView.self)
            shop.clock.advance(by: .seconds(1_500))
            _ = try expect(200, try await shop.add("c-1", "socks", 2, requestID: "a-2"), CartView.self)  // restarts the 30 minutes
            shop.clock.advance(by: .seconds(1_500))  // 50 minutes after the first add, 25 after the last
            #expect(try await shop.inventory("mug").reserved == 3)

            let before = ContinuousClock.now
            shop.clock.advance(by: .seconds(400))  // 31 minutes after the last change: expired
            let ended = try await shop.runtime.entity(Cart.self, id: "c-1").result()
            #expect(ended == .expired)
            // Loose, as the suite shares two cores on a host that can starve them (another test's
            // bound of 30 s was passed at 51.7 s under load): a real 31-minute wait would still fail it.
            #expect(ContinuousClock.now - before < .seconds(300))
            #expect(try expect(200, try await shop.get("/carts/c-1"), CartView.self).status == "expired")
            for sku in ["mug", "socks"] {
                let view = try await shop.inventory(sku)
                #expect(view.available == 5 && view.reserved == 0, "\(view)")
            }
            expectError(409, "cart_closed", try await shop.add("c-1", "mug", 1, requestID: "a-3"))
            expectError(409, "cart_closed", try await shop.checkout("c-1", token: "tok_ok", requestID: "co-1"))
            try await shop.checkStock(["mug", "socks"], settled: true)
        }
    }

    @Test("a crash in the middle of a checkout: after reopening, the saga finishes with one charge and consistent stock")
    func crashMidCheckout() async throws {
        try await CartServer.run { shop in
            _ = try await shop.restock("socks", 6, price: 500)
            _ = try await shop.restock("hat", 2, price: 2_000)
            _ = try expect(200, try await shop.add("c-1", "socks", 2, requestID: "a-1"), CartView.self)
            _ = try expect(200, try await shop.add("c-1", "hat", 1, requestID: "a-2"), CartView.self)
            _ = try expect(202, try await shop.checkout("c-1", token: "tok_hold", requestID: "co-1"), OrderView.self)
            await shop.gateway.waitUntilHeld(count: 1)  // the charge is at the gateway, not answered
            #expect(try await shop.order("order-c-1").status == "charging")

            try await shop.crashAndReopen()
            #expect(try await shop.order("order-c-1").status == "charging")
            try await shop.checkStock(["socks", "hat"], settled: false)
            #expect(try await shop.inventory("socks").reserved == 2)

            await shop.gateway.waitUntilHeld(count: 2)  // the charge activity ran again after the reopen
            shop.gateway.releaseHeld()
            let order = try await shop.finished("order-c-1")
            #expect(order.status == "completed")
            let charge = try #require(shop.gateway.charge(of: "order-c-1"))
            #expect(charge.amountCents == 3_000 && !charge.refunded && charge.paymentID == order.paymentId)
            let socks = try await shop.inventory("socks")
            #expect(socks.available == 4 && socks.reserved == 0 && socks.shipped == 2)
            #expect(try await shop.inventory("hat").shipped == 1)
            try await shop.checkStock(["socks", "hat"], settled: true)
        }
    }

    @Test("a crash right after the checkout is accepted, wherever the saga is: it ends as the payment says, stock settled",
          arguments: [("tok_ok", "completed"), ("tok_decline", "compensated")])
    func crashRightAfterCheckout(token: String, outcome: String) async throws {
        try await CartServer.run { shop in
            _ = try await shop.restock("socks", 6, price: 500)
            _ = try await shop.restock("mug", 3, price: 1_200)
            _ = try await shop.restock("hat", 3, price: 2_000)
            for (index, sku) in ["socks", "mug", "hat"].enumerated() {
                _ = try expect(200, try await shop.add("c-1", sku, Int(index) + 1, requestID: "a-\(index)"), CartView.self)
            }
            _ = try expect(202, try await shop.checkout("c-1", token: token, requestID: "co-1"), OrderView.self)
            try await shop.crashAndReopen()  // the reservations are in flight, or done, or the payment is

            let order = try await shop.finished("order-c-1")
            #expect(order.status == outcome, "\(order)")
            let charged: Int64? = shop.gateway.charge(of: "order-c-1")?.amountCents
            let expected: Int64? = outcome == "completed" ? 500 + 2 * 1_200 + 3 * 2_000 : nil
            #expect(charged == expected)
            _ = try await shop.runtime.entity(Cart.self, id: "c-1").result()
            try await shop.checkStock(["socks", "mug", "hat"], settled: true)
            let shipped = try await [shop.inventory("socks").shipped, shop.inventory("mug").shipped, shop.inventory("hat").shipped]
            #expect(shipped == (outcome == "completed" ? [1, 2, 3] : [0, 0, 0]))
        }
    }

    @Test("a cart's expiry timer is durable: it survives a crash and fires on the reopened runtime")
    func expiryAfterCrash() async throws {
        try await CartServer.run(settings: .init(cartIdleTimeout: .seconds(600), paymentTimeout: .seconds(10))) { shop in
            _ = try await shop.restock("mug", 5)
            _ = try expect(200, try await shop.add("c-1", "mug", 4, requestID: "a-1"), CartView.self)
            try await shop.crashAndReopen()
            #expect(try await shop.inventory("mug").reserved == 4)
            #expect(try expect(200, try await shop.get("/carts/c-1"), CartView.self).status == "open")

            shop.clock.advance(by: .seconds(601))
            #expect(try await shop.runtime.entity(Cart.self, id: "c-1").result() == .expired)
            let mugs = try await shop.inventory("mug")
            #expect(mugs.available == 5 && mugs.reserved == 0)
            try await shop.checkStock(["mug"], settled: true)
        }
    }

    @Test("concurrent carts on scarce stock: exactly the available units are held, none oversold")
    func scarceStock() async throws {
        try await CartServer.run { shop in
            _ = try await shop.restock("hat", 5, price: 2_000)
            let port = shop.port
            let statuses = try await withThrowingTaskGroup(of: Int.self) { group in
                for index in 0..<8 {
                    group.addTask {
                        let client = try await SampleHTTPClient(port: port)
                        defer { Task { try? await client.close() } }
                        let response = try await client.request("POST", "/carts/c-\(index)/items",
                                                                json: ["sku": JSONField.string("hat"), "quantity": 1, "requestId": .string("a-\(index)")])
                        return response.status
                    }
                }
                return try await group.reduce(into: [Int]()) { $0.append($1) }
            }
            #expect(statuses.filter { $0 == 200 }.count == 5)
            #expect(statuses.filter { $0 == 409 }.count == 3)
            let hats = try await shop.inventory("hat")
            #expect(hats.available == 0 && hats.reserved == 5)
            try await shop.checkStock(["hat"], settled: false)
        }
    }
}
