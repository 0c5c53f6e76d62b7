import DurableEntities

/// The account entity the runtime tests use.
struct Account: EntityWorkflow {
    struct State: Codable, Sendable, Equatable {
        var balance: Int64 = 0
        var deposits = 0
    }
    enum Signal: Codable, Sendable {
        case deposit(Int64)
        case fail
    }
    enum Update: Codable, Sendable {
        case withdraw(Int64)
    }
    struct InsufficientFunds: Error, Equatable {}
    struct Refused: Error {}

    static func initialState(id: String) -> State { State() }

    static func handle(_ signal: Signal, state: inout State, context: EntityContext) throws {
        switch signal {
        case .deposit(let amount):
            state.balance += amount
            state.deposits += 1
        case .fail:
            state.balance = -999  // must never be seen: the handler throws
            throw Refused()
        }
    }

    static func validate(_ update: Update, state: State) throws {
        if case .withdraw(let amount) = update, amount > state.balance { throw InsufficientFunds() }
    }

    static func apply(_ update: Update, state: inout State, context: EntityContext) throws -> Int64 {
        switch update {
        case .withdraw(let amount):
            state.balance -= amount
            return state.balance
        }
    }
}
