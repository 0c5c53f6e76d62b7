import DurableEntities

/// Stands in for activity `A` in a test: registered under `A`'s name, it runs `body` instead.
///
/// ```swift
/// runtime.register(activity: ActivityStub<Charge> { request, context in
///     Receipt(id: "stub-\(context.idempotencyKey)")
/// })
/// ```
public struct ActivityStub<A: Activity>: Activity {
    public typealias Input = A.Input
    public typealias Output = A.Output
    public static var name: String { A.name }
    public static var recordsAttemptStart: Bool { A.recordsAttemptStart }

    private let body: @Sendable (A.Input, ActivityContext) async throws -> A.Output

    public init(_ body: @escaping @Sendable (A.Input, ActivityContext) async throws -> A.Output) {
        self.body = body
    }

    public func run(_ input: A.Input, context: ActivityContext) async throws -> A.Output {
        try await body(input, context)
    }
}
