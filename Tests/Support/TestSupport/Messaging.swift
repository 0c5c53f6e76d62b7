import DurableEntities

/// Receives notes and keeps them in arrival order (the receiving end of the messaging tests).
public struct Inbox: EntityWorkflow {
    public struct State: Codable, Sendable, Equatable { public var received: [String] = [] }
    public enum Signal: Codable, Sendable { case note(String) }
    public typealias Update = NoMessage
    public static var entityType: String { "Inbox" }
    public static func initialState(id: String) -> State { State() }
    public static func handle(_ signal: Signal, state: inout State, context: EntityContext) throws {
        if case .note(let text) = signal { state.received.append(text) }
    }
}

/// Forwards each text to an inbox from its signal handler (an entity without a run body, Akka-style):
/// the note "<forwarder id>:<text>" leaves with the turn that records the forward.
public struct Forwarder: EntityWorkflow {
    public struct State: Codable, Sendable, Equatable { public var forwarded: [String] = [] }
    public enum Signal: Codable, Sendable { case forward(String, to: String) }
    public typealias Update = NoMessage
    public static var entityType: String { "Forwarder" }
    public static func initialState(id: String) -> State { State() }
    public static func handle(_ signal: Signal, state: inout State, context: EntityContext) throws {
        if case .forward(let text, let inbox) = signal {
            try context.signal(Inbox.self, id: inbox, .note("\(context.id):\(text)"))
            state.forwarded.append(text)
        }
    }
}
