// A child process for the entity runtime's crash tests. The tests start it, read what it sends and
// what is acknowledged on stdout, kill it with SIGKILL at a random moment, and check the directory it
// leaves behind by reopening an `EntityRuntime` on it.
//
//   EntityCrashChild deposit DIR INDICES CONCURRENCY
//       Opens a runtime on DIR and sends deposit number i, for every i in INDICES (in increasing
//       order, from CONCURRENCY concurrent tasks): amount (i % 7) + 1 to the `Account` entity
//       "acc-<i % 100>", with idempotency key "dep-<i>", so a deposit resent after a crash counts once.
//       Prints `send <i>` before each signal and `ack <i>` once it is acknowledged (durable), then
//       `done` when every deposit is acknowledged and the runtime is closed; exits 0.
//       INDICES is a comma-separated list of indices and inclusive ranges, e.g. `3,17,40-9999`
//       (`-` alone for none).
//
//   EntityCrashChild withdraw DIR INDICES CONCURRENCY
//       Opens a runtime on DIR (the same settings), first makes sure each of the accounts "acc-<k>",
//       k in 0..<20, has its opening deposit of 1,000,000 with idempotency key "open-<k>" (so every
//       round after the first re-sends them as no-ops), printing `opened` once all are acknowledged.
//       Then sends withdrawal number i, for every i in INDICES (increasing, from CONCURRENCY tasks):
//       the update `.withdraw((i % 5) + 1)` to "acc-<i % 20>" with idempotency key "wd-<i>", printing
//       `send <i>` before and `ack <i> <balance>` after, where <balance> is the update's result (the
//       recorded result when the key was already applied). Then `done`, exit 0.
import DurableEntities
import Foundation
import Logging
import Synchronization

/// The account entity, the same shape as the tests' `Account` (same entity type, state and signal
/// coding), so the test process can reopen what this process wrote.
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
    struct InsufficientFunds: Error {}
    struct Refused: Error {}

    static var entityType: String { "Account" }
    static func initialState(id: String) -> State { State() }
    static func handle(_ signal: Signal, state: inout State, context: EntityContext) throws {
        switch signal {
        case .deposit(let amount):
            state.balance += amount
            state.deposits += 1
        case .fail:
            state.balance = -999  // never seen: the handler throws, so the signal is refused
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

let output = Mutex<Void>(())
/// Writes one line to stdout at once (a single write(2), so lines never interleave).
func emit(_ line: String) {
    output.withLock { _ in
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
    }
}
func fail(_ message: String) -> Never {
    let bytes = Array((message + "\n").utf8)
    _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    exit(2)
}

/// Parses `3,17,40-9999` (or `-` for none) into increasing indices.
func parseIndices(_ text: String) -> [Int] {
    guard text != "-" else { return [] }
    var indices: [Int] = []
    for part in text.split(separator: ",") {
        let bounds = part.split(separator: "-", maxSplits: 1)
        guard let low = Int(bounds[0]), let high = bounds.count == 2 ? Int(bounds[1]) : low, low <= high else {
            fail("bad index range '\(part)'")
        }
        indices.append(contentsOf: low...high)
    }
    return indices.sorted()
}

/// The next position in the list of indices to send, shared by the sending tasks.
let cursor = Atomic<Int>(0)

/// The runtime both modes use (the tests open the directory with the same settings).
func openRuntime(_ directory: String) throws -> EntityRuntime {
    let quiet = Logger(label: "child", factory: { _ in SwiftLogNoOpLogHandler() })
    var configuration = EntityRuntime.Configuration(directory: directory, snapshotEvery: 10, logger: quiet)
    // Small threshold and window so a kill can hit snapshots, moves and log trimming too.
    configuration.journal.coalesceThreshold = 8
    configuration.journal.logWindow = 512
    return try EntityRuntime(configuration: configuration, entityTypes: [Account.self])
}

func deposit(directory: String, indices: [Int], concurrency: Int) async throws {
    let runtime = try openRuntime(directory)
    try await withThrowingTaskGroup(of: Void.self) { group in
        for _ in 0..<concurrency {
            group.addTask {
                while true {
                    let position = cursor.wrappingAdd(1, ordering: .relaxed).oldValue
                    guard position < indices.count else { return }
                    let index = indices[position]
                    emit("send \(index)")
                    try await runtime.entity(Account.self, id: "acc-\(index % 100)")
                        .signal(.deposit(Int64(index % 7 + 1)), idempotencyKey: "dep-\(index)")
                    emit("ack \(index)")
                }
            }
        }
        try await group.waitForAll()
    }
    runtime.close()
    emit("done")
}

/// The `withdraw` mode: opening deposits (idempotent), then keyed withdrawals, each acknowledged with
/// the balance the update returned.
func withdraw(directory: String, indices: [Int], concurrency: Int) async throws {
    let accounts = 20
    let runtime = try openRuntime(directory)
    try await withThrowingTaskGroup(of: Void.self) { group in
        for account in 0..<accounts {
            group.addTask {
                try await runtime.entity(Account.self, id: "acc-\(account)").signal(.deposit(1_000_000), idempotencyKey: "open-\(account)")
            }
        }
        try await group.waitForAll()
    }
    emit("opened")
    try await withThrowingTaskGroup(of: Void.self) { group in
        for _ in 0..<concurrency {
            group.addTask {
                while true {
                    let position = cursor.wrappingAdd(1, ordering: .relaxed).oldValue
                    guard position < indices.count else { return }
                    let index = indices[position]
                    emit("send \(index)")
                    let balance = try await runtime.entity(Account.self, id: "acc-\(index % accounts)")
                        .update(.withdraw(Int64(index % 5 + 1)), idempotencyKey: "wd-\(index)")
                    emit("ack \(index) \(balance)")
                }
            }
        }
        try await group.waitForAll()
    }
    runtime.close()
    emit("done")
}

let arguments = CommandLine.arguments
guard arguments.count == 5, ["deposit", "withdraw"].contains(arguments[1]), let concurrency = Int(arguments[4]), concurrency > 0 else {
    fail("usage: EntityCrashChild deposit|withdraw DIR INDICES CONCURRENCY")
}
do {
    if arguments[1] == "deposit" {
        try await deposit(directory: arguments[2], indices: parseIndices(arguments[3]), concurrency: concurrency)
    } else {
        try await withdraw(directory: arguments[2], indices: parseIndices(arguments[3]), concurrency: concurrency)
    }
} catch {
    fail("EntityCrashChild: \(error)")
}
