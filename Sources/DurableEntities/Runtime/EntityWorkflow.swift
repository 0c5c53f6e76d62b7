/// An entity type: its durable state, the signals it accepts, the updates it answers, and how each
/// changes the state.
///
/// Handlers run one at a time per entity, inside the entity's *turn*, and must be deterministic:
/// everything that varies (time, randomness, ids) comes from the ``EntityContext``. The runtime records
/// each accepted signal and update in the entity's history and replays them, through the same handlers,
/// to rebuild the state after a restart.
///
/// A handler that throws *rejects* the message: the state is left as it was, nothing is recorded, and
/// the sender gets ``EntityError/Code/rejected`` with the handler's error. So a replay never meets a
/// failing handler.
///
/// ## Usage
/// ```swift
/// struct Account: EntityWorkflow {
///     struct State: Codable, Sendable { var balance: Int64 = 0 }
///     enum Signal: Codable, Sendable { case deposit(Int64) }
///     enum Update: Codable, Sendable { case withdraw(Int64) }
///     struct Overdrawn: Error {}
///
///     static func initialState(id: String) -> State { State() }
///     static func handle(_ signal: Signal, state: inout State, context: EntityContext) throws {
///         switch signal { case .deposit(let amount): state.balance += amount }
///     }
///     static func validate(_ update: Update, state: State) throws {
///         if case .withdraw(let amount) = update, amount > state.balance { throw Overdrawn() }
///     }
///     static func apply(_ update: Update, state: inout State, context: EntityContext) throws -> Int64 {
///         if case .withdraw(let amount) = update { state.balance -= amount }
///         return state.balance
///     }
/// }
/// ```
public protocol EntityWorkflow: Sendable {
    /// The durable state; snapshots store it, queries read it.
    associatedtype State: Codable & Sendable
    /// The one-way messages the entity accepts.
    associatedtype Signal: Codable & Sendable = NoMessage
    /// The request/response messages the entity answers.
    associatedtype Update: Codable & Sendable = NoMessage
    /// What an accepted update returns.
    associatedtype UpdateResult: Codable & Sendable = NoMessage
    /// The input of the entity's long-running ``run(_:context:)`` body. An entity type has a body when
    /// its `Input` is not ``NoMessage`` (use ``EmptyInput`` for a body without input).
    associatedtype Input: Codable & Sendable = NoMessage
    /// What the body returns.
    associatedtype Output: Codable & Sendable = NoMessage

    /// The entity type's name in histories and errors. Changing it orphans existing entities.
    static var entityType: String { get }

    /// The state of a new entity.
    static func initialState(id: String) -> State

    /// Applies a signal. Throw to reject it (nothing is recorded).
    static func handle(_ signal: Signal, state: inout State, context: EntityContext) throws

    /// Checks an update against the state without changing it. Throw to reject it (nothing is recorded).
    static func validate(_ update: Update, state: State) throws

    /// Applies an accepted update and returns its result.
    static func apply(_ update: Update, state: inout State, context: EntityContext) throws -> UpdateResult

    /// The entity's long-running body: orchestration code that waits on durable timers, on conditions
    /// over the state (which signals change), and records side effects — deterministically.
    ///
    /// It runs on an executor the runtime drives, so one history always gives one interleaving, and
    /// after a restart it is replayed from the run's history to where it was. It must get time,
    /// randomness and every outside value from `context`, and must not await anything but `context`
    /// (and its own child tasks). Handlers keep running while it waits.
    static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> Output
}

/// The input of a run body that takes none.
public struct EmptyInput: Codable, Sendable, Hashable {
    public init() {}
}

extension EntityWorkflow {
    public static var entityType: String { String(describing: Self.self) }
    public static func validate(_ update: Update, state: State) throws {}

    /// Whether the type has a run body (its `Input` is not ``NoMessage``).
    static var hasRunBody: Bool { Input.self != NoMessage.self }
}

extension EntityWorkflow where Input == NoMessage {
    public static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> Output {
        throw EntityError(.rejected, entity: EntityName(type: entityType, id: context.id), "this entity type has no run body")
    }
}

extension EntityWorkflow where Signal == NoMessage {
    public static func handle(_ signal: Signal, state: inout State, context: EntityContext) throws {}
}

extension EntityWorkflow where Update == NoMessage {
    public static func apply(_ update: Update, state: inout State, context: EntityContext) throws -> UpdateResult {
        throw EntityError(.rejected, entity: EntityName(type: entityType, id: context.id), "this entity type takes no updates")
    }
}

/// The message type of an entity that has no signals or no updates. No value of it can be made or
/// decoded.
public struct NoMessage: Codable, Sendable, Hashable {
    private init() {}
    public init(from decoder: any Decoder) throws {
        throw DecodingError.dataCorrupted(.init(codingPath: [], debugDescription: "this entity type takes no such message"))
    }
    public func encode(to encoder: any Encoder) throws {}
}
