import DurableEntities

/// A checkout as a saga, itself a durable entity: reserve every line's stock (one SKU entity each, in
/// parallel), charge the payment, ship; any failure refunds the payment, then releases the
/// reservations (the reverse order of the steps).
///
/// Each step is an activity: run outside the entity, retried by policy, with an idempotency key
/// derived from the order id, so a retry or a crash never applies it twice. The body registers each
/// compensation *before* its step runs, so a step that may have half-happened (a payment that timed
/// out) is compensated too; the compensations tolerate undoing nothing.
///
/// ``State/status`` tells where the saga is: `reserving` → `charging` → `fulfilling` → `completed`,
/// or, on a failure, `compensating` → `compensated` (everything undone; ``State/reason`` says why) or
/// `failed` (a compensation itself failed; ``State/reason`` says which).
struct Order: EntityWorkflow {
    enum Status: String, Codable, Sendable, Hashable, CaseIterable {
        case new, reserving, charging, fulfilling, completed, compensating, compensated, failed

        /// Whether the saga has ended.
        var isFinal: Bool { [.completed, .compensated, .failed].contains(self) }
    }

    /// What the checkout hands the order: the cart's lines and every SKU the cart touched.
    struct Input: Codable, Sendable, Equatable {
        var orderID: String
        var cartID: String
        var lines: [Cart.Line]
        /// Every SKU the cart ever held stock on: the reservation step sweeps the cart's holds on all
        /// of them (those without a line reserve 0 units).
        var skus: [String]
        var paymentToken: String
        /// The longest one payment attempt may take.
        var paymentTimeoutMilliseconds: Int64

        var totalCents: Int64 { lines.reduce(0) { $0 + $1.quantity * $1.priceCents } }
        func quantity(of sku: String) -> Int64 { lines.first { $0.sku == sku }?.quantity ?? 0 }
    }

    /// What is durable about an order.
    struct State: Codable, Sendable, Equatable {
        var status: Status = .new
        var cartID = ""
        var lines: [Cart.Line] = []
        var totalCents: Int64 = 0
        /// The payment gateway's charge id, once charged.
        var paymentID: String?
        /// Why the saga compensated or failed.
        var reason: String?
        /// What happened, one line per step, in order.
        var steps: [String] = []
    }
    typealias Output = Status

    static var entityType: String { "Order" }
    static func initialState(id: String) -> State { State() }

    static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> Status {
        context.updateState {
            $0.status = .reserving
            $0.cartID = input.cartID
            $0.lines = input.lines
            $0.totalCents = input.totalCents
        }
        let order = InventoryItem.holder(order: input.orderID)
        let cart = InventoryItem.holder(cart: input.cartID)
        var saga = Saga()
        do {
            saga.addCompensation("release-reservations") {
                try await forEachSKU(input.skus, context) { sku in
                    _ = try await context.execute(ReleaseStock.self, .init(sku: sku, holders: [order, cart], key: "\(order):release"),
                                                  options: stockOptions)
                }
                log(context, "released the reservations")
            }
            try await forEachSKU(input.skus, context) { sku in
                let step = ReserveStock.Input(sku: sku, order: input.orderID, cart: input.cartID, quantity: input.quantity(of: sku))
                _ = try await context.execute(ReserveStock.self, step, options: stockOptions)
            }
            log(context, "reserved " + input.lines.map { "\($0.sku) ×\($0.quantity)" }.joined(separator: ", "), status: .charging)

            saga.addCompensation("refund-payment") {
                let refunded = try await context.execute(RefundPayment.self, input.orderID, options: stockOptions)
                log(context, refunded > 0 ? "refunded \(Money.format(refunded))" : "nothing to refund")
            }
            let charge = ChargePayment.Input(orderID: input.orderID, amountCents: input.totalCents, token: input.paymentToken)
            let receipt = try await context.execute(ChargePayment.self, charge, options: paymentOptions(input))
            context.updateState { $0.paymentID = receipt.paymentID }
            log(context, "charged \(Money.format(receipt.amountCents)) (\(receipt.paymentID))", status: .fulfilling)

            try await forEachSKU(input.lines.map(\.sku), context) { sku in
                _ = try await context.execute(ShipStock.self, .init(sku: sku, order: input.orderID), options: stockOptions)
            }
            log(context, "shipped", status: .completed)
        } catch {
            context.updateState {
                $0.status = .compensating
                $0.reason = reason(error)
            }
            do {
                try await saga.compensate()
                context.updateState { $0.status = .compensated }
            } catch {
                context.updateState {
                    $0.status = .failed
                    $0.reason = ($0.reason ?? "") + "; then \(error)"
                }
            }
        }
        return context.state.status
    }

    /// How the payment is tried: `paymentTimeoutMilliseconds` per attempt, two attempts, a decline
    /// ends it at once.
    static func paymentOptions(_ input: Input) -> ActivityOptions {
        ActivityOptions(retry: RetryPolicy(initialInterval: .milliseconds(500), maximumAttempts: 2,
                                           nonRetryableErrorTypes: [String(describing: PaymentDeclined.self)]),
                        startToCloseTimeout: .milliseconds(max(1, input.paymentTimeoutMilliseconds)))
    }

    /// Runs `step` for every SKU at once, as child tasks of the body (deterministic: they run on the
    /// entity's executor, resumed in history order). Throws the first failure once all have ended.
    private static func forEachSKU(_ skus: [String], _ context: WorkflowContext<Self>,
                                   _ step: @escaping @Sendable (String) async throws -> Void) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            for sku in skus { group.addTask { try await step(sku) } }
            try await group.waitForAll()
        }
    }

    private static func log(_ context: WorkflowContext<Self>, _ step: String, status: Status? = nil) {
        context.updateState {
            $0.steps.append(step)
            if let status { $0.status = status }
        }
    }

    /// A sentence for ``State/reason``.
    private static func reason(_ error: any Error) -> String {
        guard let failure = error as? ActivityFailure else { return "\(error)" }
        let step = switch failure.activity {
        case ChargePayment.name: "payment"
        case ReserveStock.name: "reservation"
        case ShipStock.name: "shipping"
        default: failure.activity
        }
        if failure.isTimeout {
            return "\(step) timed out (\(failure.reason.rawValue), \(failure.attempts) attempt\(failure.attempts == 1 ? "" : "s"))"
        }
        return "\(step) failed: \(failure.cause)"
    }
}

/// The options of the stock and bookkeeping activities: retried until they succeed (a refusal ends
/// them at once, as a ``NonRetryableError``), 200 ms apart at first, at most 10 s apart.
let stockOptions = ActivityOptions(retry: RetryPolicy(initialInterval: .milliseconds(200), maximumInterval: .seconds(10)))
