import DurableEntities

/// A job of one activity that kills its process on every attempt, for the crash-loop tests and the
/// crash child: input 0 executes ``Poison`` (which stores a heartbeat first), input 1
/// ``InstantPoison`` (which records each attempt's start). At most 3 attempts, 10 ms apart. Returns
/// the activity's output, or `failed:<reason>:<attempts>:<cause type>` once it failed for good.
public struct PoisonJob: EntityWorkflow {
    public struct State: Codable, Sendable {}
    public static var entityType: String { "PoisonJob" }
    public static func initialState(id: String) -> State { State() }
    public static func run(_ input: Int, context: WorkflowContext<Self>) async throws -> String {
        let options = ActivityOptions(retry: .init(initialInterval: .milliseconds(10), maximumAttempts: 3))
        do {
            if input == 1 { return try await context.execute(InstantPoison.self, input, options: options) }
            return try await context.execute(Poison.self, input, options: options)
        } catch let failure as ActivityFailure {
            return "failed:\(failure.reason):\(failure.attempts):\(failure.causeType)"
        }
    }
}

/// ``PoisonJob``'s activity for input 0; what an attempt does is the caller's (the crash child kills
/// its process after a heartbeat; a test notes a rerun).
public struct Poison: Activity {
    let attempt: @Sendable (ActivityContext) async throws -> String
    public init(_ attempt: @escaping @Sendable (ActivityContext) async throws -> String) { self.attempt = attempt }
    public func run(_ input: Int, context: ActivityContext) async throws -> String { try await attempt(context) }
}

/// ``PoisonJob``'s activity for input 1: each attempt's start is stored before it runs.
public struct InstantPoison: Activity {
    public static var recordsAttemptStart: Bool { true }
    let attempt: @Sendable (ActivityContext) async throws -> String
    public init(_ attempt: @escaping @Sendable (ActivityContext) async throws -> String) { self.attempt = attempt }
    public func run(_ input: Int, context: ActivityContext) async throws -> String { try await attempt(context) }
}
