/// All-or-nothing over a chain of activities: each step registers its compensation *before* it runs;
/// on failure ``compensate()`` runs the registered compensations in reverse order (or all at once),
/// each one typically a durable, retried activity.
///
/// ## Usage
/// ```swift
/// var saga = Saga()
/// do {
///     saga.addCompensation("refund") { _ = try await context.execute(Refund.self, debit) }
///     _ = try await context.execute(Withdraw.self, debit)
///     saga.addCompensation("undo-deposit") { _ = try await context.execute(Withdraw.self, credit) }
///     _ = try await context.execute(Deposit.self, credit)
/// } catch {
///     try await saga.compensate()          // undo-deposit, then refund
///     throw error
/// }
/// ```
/// Registering first means a step that may have taken effect before failing (a timeout, a crash
/// before its outcome was recorded) is compensated too; compensations must therefore tolerate
/// undoing something that did not happen (they are activities with idempotency keys).
public struct Saga {
    /// Runs compensations concurrently instead of one after another (last first).
    public var parallelCompensation: Bool
    private var compensations: [(name: String, body: () async throws -> Void)] = []

    public init(parallelCompensation: Bool = false) {
        self.parallelCompensation = parallelCompensation
    }

    /// Registers the compensation of the step about to run.
    public mutating func addCompensation(_ name: String, _ body: @escaping () async throws -> Void) {
        // Room for a few steps at once: growing one element at a time reallocated at each step.
        if compensations.capacity == 0 { compensations.reserveCapacity(4) }
        compensations.append((name, body))
    }

    /// The names of the registered compensations, in registration order.
    public var registered: [String] { compensations.map(\.name) }

    /// Runs the compensations: in reverse order of registration, each one after the previous has
    /// finished — or all concurrently with `parallelCompensation`. Every compensation is attempted
    /// even if an earlier one fails.
    /// - Throws: ``SagaCompensationError`` naming what compensated, what failed (with the error each
    ///   threw, typically an ``ActivityFailure``) and what was never attempted (only with cancellation).
    public func compensate() async throws {
        var compensated: [String] = []
        var failed: [(name: String, error: any Error)] = []
        var attempted = [Bool](repeating: false, count: compensations.count)
        if parallelCompensation {
            let indexed = Array(compensations.enumerated())
            try await withThrowingTaskGroup(of: (Int, (any Error)?).self) { group in
                for (index, compensation) in indexed {
                    let body = UncheckedBox(compensation.body)
                    group.addTask {
                        do { try await body.value(); return (index, nil) } catch { return (index, error) }
                    }
                }
                var outcomes: [(Int, (any Error)?)] = []
                for try await outcome in group { outcomes.append(outcome) }
                for (index, error) in outcomes.sorted(by: { $0.0 > $1.0 }) {
                    attempted[index] = true
                    if let error { failed.append((compensations[index].name, error)) } else { compensated.append(compensations[index].name) }
                }
            }
        } else {
            for (index, compensation) in compensations.enumerated().reversed() {
                if Task.isCancelled { break }
                attempted[index] = true
                do {
                    try await compensation.body()
                    compensated.append(compensation.name)
                } catch {
                    failed.append((compensation.name, error))
                }
            }
        }
        guard failed.isEmpty, compensated.count == compensations.count else {
            throw SagaCompensationError(compensated: compensated, failed: failed,
                                        notAttempted: compensations.indices.filter { !attempted[$0] }.map { compensations[$0].name })
        }
    }
}

/// A saga's compensation did not fully succeed.
public struct SagaCompensationError: Error, Sendable, CustomStringConvertible {
    /// Compensations that ran successfully, last registered first (the order they ran in, or with
    /// parallel compensation the order they would have run in: a replay reports them alike).
    public let compensated: [String]
    /// Compensations that failed, in the same order, with the error each threw (an ``ActivityFailure``
    /// for an activity that ended for good: its reason, attempts and cause).
    public let failed: [(name: String, error: any Error)]
    /// Compensations never attempted (the run was cancelled while compensating), in registration order.
    public let notAttempted: [String]

    public var description: String {
        "saga compensation incomplete: compensated \(compensated), failed \(failed.map { "\($0.name): \($0.error)" }), not attempted \(notAttempted)"
    }
}

/// Carries a non-Sendable closure into a child task of a run body. Safe there: the body's tasks all
/// run on one executor that the entity's shard drains, one job at a time.
struct UncheckedBox<Value>: @unchecked Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
}
