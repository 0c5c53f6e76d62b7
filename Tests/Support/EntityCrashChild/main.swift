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
//
//   EntityCrashChild activities DIR
//       Opens a runtime on DIR (maxConcurrentActivities 128) and starts the 100 `ActivityJob` entities
//       "job-<i>", i in 0..<100, whose run body executes the activity `Effect` once with input i and
//       returns its output (the idempotency key). `Effect` prints `running <i> <key>`, then (except
//       when i % 4 == 3) appends "<key>" to DIR/effects.log unless a line for the key is there (the
//       side-effect table, idempotent by key) and prints `applied <i> <key>`; then an even i waits
//       50–199 ms of real time and returns the key, an odd i stays in flight until the process is
//       killed (i % 4 == 3 before its effect, i % 4 == 1 after it). Prints `started <i>` once the
//       start of "job-<i>" is durable and `done <i> <key>` once its result (committed) is observed.
//       Never finishes on its own: the test SIGKILLs it.
//
//   EntityCrashChild local DIR
//       The `activities` mode with local activities. Opens a runtime on DIR (the same settings) and
//       starts the 60 `LocalJob` entities "job-<i>", i in 0..<60, whose run body executes the local
//       activity `LocalEffect` (registered as "Effect") once with input i (`executeLocal`) and
//       returns its output (the idempotency key). `LocalEffect` prints `running <i> <key>`; i % 3 == 2 then stays in flight
//       until the process is killed, before its effect; otherwise it appends "<key>" to
//       DIR/effects.log unless a line for the key is there and prints `applied <i> <key>`, after which
//       i % 3 == 0 returns the key at once (inside the start's turn) and i % 3 == 1 stays in flight.
//       Prints `started <i>` once the start of "job-<i>" is durable and `done <i> <key>` once its
//       result is observed. Once every job is started and every i % 3 == 0 one done, it starts
//       "blocker" with input 1000, whose attempt applies its effect inside the start's turn, prints
//       `applied 1000 <key>` and then blocks its thread, so the turn is never committed.
//       Never finishes on its own: the test SIGKILLs it.
//
//   EntityCrashChild saga DIR STALL WHEN
//       Opens a runtime on DIR and starts the `CrashTransfer` saga "t-1" with amount 100: activities
//       Withdraw, Deposit, Record (which applies its effect, a recorded refusal, then throws a
//       non-retryable error), then the compensations UndoDeposit and Refund. Each activity prints
//       `running <name> <key>`, appends "<name> <key>" to DIR/effects.log unless a line for the key is
//       there, and returns. The activity named STALL (UndoDeposit or Refund) stays in flight until
//       the process is killed, before its effect when WHEN is `before`, after it when `after`; it prints
//       `stalled <name> <key>` when it starts waiting. Prints `started` once the start is durable.
//
//   EntityCrashChild poison DIR start|resume
//       Opens a runtime on DIR (the activity modes' settings); with `start`, starts the `PoisonJob`
//       "p" (input 0) and prints `started`. Its run body executes the activity `Poison` (at most 3
//       attempts, 10 ms apart), which prints `attempt <n> <last>` (its attempt number and the last
//       heartbeat it reads, 0 for none), heartbeats n, waits until a deposit to the `Account`
//       "marker" is durable (commits keep the order of submission, so the heartbeat is stored by
//       then), prints `stored <n>` and SIGKILLs its own process. With `resume`, the runtime's open
//       runs what is owed. The body returns "failed:<reason>:<attempts>:<cause type>" once the
//       activity failed for good (never in the child: each attempt kills it).
//
//   EntityCrashChild poison DIR start|resume instant
//       The same with the `PoisonJob` "q" (input 1), whose activity `InstantPoison` records each
//       attempt's start (`recordsAttemptStart`): it prints `attempt <n>` and SIGKILLs its own process
//       at once, without a heartbeat.
//
//   EntityCrashChild messages DIR COUNT SINK
//       Opens a runtime on DIR and sends COUNT `forward` signals, number n to the `Forwarder`
//       "fw-<n % 4>" (text "<n>", to the `Inbox` "sink"), 4 at a time, printing `ack <n>` once each is
//       durable. The forwarders' handlers signal the inbox. SINK `registered` registers `Inbox` (the
//       test kills the process at a random ack); `unregistered` leaves it out, so that every message
//       stays between its sender's commit and its delivery, prints `done` and waits to be killed.
//
//   EntityCrashChild cancel DIR
//       Opens a runtime on DIR (the activity modes' settings) and starts the 40 `CancelJob` entities
//       "job-<i>", i in 0..<40, whose run body executes the activity `Stubborn` once with input i and
//       cancellation type `waitCancellationCompleted`, and returns "done:<output>", or
//       "<reason>:<attempts>" when the activity fails. `Stubborn` prints `running <i> <key>`, appends
//       "<key>" to DIR/effects.log unless a line for the key is there and prints `applied <i> <key>`,
//       then stays in flight until the process is killed, ignoring cancellation (it prints
//       `cancel-seen <i>` when its attempt is cancelled). Prints `started <i>` once the start of
//       "job-<i>" is durable. Once every activity has applied its effect, it cancels the runs from 4
//       tasks (task k cancels the jobs i with i % 4 == k, in increasing order), printing
//       `cancel-acked <i>` once the cancellation of "job-<i>" is durable. Never finishes on its own:
//       the test SIGKILLs it.
//
//   EntityCrashChild fanout DIR WIDTH WINDOW
//       Opens a runtime on DIR and starts the `FanNode` "r" (WIDTH children of WIDTH leaves each, at
//       most WINDOW running per parent); the `LeafWork` activity prints `leaf <id>` on every attempt.
//       Prints `started`, then `result <sum>` once the root finished. The test kills it mid-way.
import DurableEntities
import Foundation
import Logging
import Synchronization
import TestSupport

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
func openRuntime(_ directory: String, entityTypes: [any EntityWorkflow.Type] = [Account.self]) throws -> EntityRuntime {
    let quiet = Logger(label: "child", factory: { _ in SwiftLogNoOpLogHandler() })
    var configuration = EntityRuntime.Configuration(directory: directory, snapshotEvery: 10, logger: quiet)
    // Small threshold and window so a kill can hit snapshots, moves and log trimming too.
    configuration.journal.coalesceThreshold = 8
    configuration.journal.logWindow = 512
    return try EntityRuntime(configuration: configuration, entityTypes: entityTypes)
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

// MARK: - Activity crash modes

/// The side-effect table of the activity modes: DIR/effects.log, one line per effect whose last
/// space-separated field is the idempotency key, each appended with one write(2) on an O_APPEND
/// descriptor. `applyOnce` skips a key that already has a line, as an idempotent receiver would.
final class EffectsFile: Sendable {
    let path: String
    private let lock = Mutex<Void>(())

    init(_ path: String) { self.path = path }

    /// Appends `line` unless a line for `key` is there already; returns whether it appended.
    func applyOnce(key: String, line: String) -> Bool {
        lock.withLock { _ in
            let existing = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
            if existing.split(separator: "\n").contains(where: { $0.split(separator: " ").last.map(String.init) == key }) { return false }
            let descriptor = open(path, O_WRONLY | O_APPEND | O_CREAT, 0o644)
            guard descriptor >= 0 else { fail("cannot open \(path)") }
            defer { close(descriptor) }
            let bytes = Array((line + "\n").utf8)
            guard bytes.withUnsafeBytes({ write(descriptor, $0.baseAddress, $0.count) }) == bytes.count else { fail("short write to \(path)") }
            return true
        }
    }
}

/// Settings of both activity modes (the tests reopen the directory with the same ones).
func activityConfiguration(_ directory: String) -> EntityRuntime.Configuration {
    let quiet = Logger(label: "child", factory: { _ in SwiftLogNoOpLogHandler() })
    var configuration = EntityRuntime.Configuration(directory: directory, maxConcurrentActivities: 128, logger: quiet)
    configuration.journal.logger = quiet
    return configuration
}

/// Waits until the test SIGKILLs the process (or the attempt is cancelled: then it throws
/// `CancellationError`, as a sleep would). No timer: a stall never ends on its own before the kill,
/// however slowly a starved host brings the child to it (a 60 s sleep once let stalled activities
/// apply their effects when the hypervisor took 90% of the CPU). A child whose test died ends
/// through `ParentWatch`.
func stallUntilKilled() async throws {
    let (never, continuation) = AsyncStream.makeStream(of: Never.self)
    for await _ in never {}  // ends only when the task is cancelled
    withExtendedLifetime(continuation) {}  // held open until then: a finished stream would end the loop
    try Task.checkCancellation()
}

/// One activity per entity: the `activities` mode. The same shape as the tests' `CrashActivityJob`.
struct ActivityJob: EntityWorkflow {
    struct State: Codable, Sendable {}
    static var entityType: String { "ActivityJob" }
    static func initialState(id: String) -> State { State() }
    static func run(_ input: Int, context: WorkflowContext<Self>) async throws -> String {
        try await context.execute(Effect.self, input, options: .init(retry: .init(initialInterval: .milliseconds(10))))
    }
}

/// The `activities` mode's activity (see the header); named "Effect" like the tests' `CrashEffect`.
struct Effect: Activity {
    static var name: String { "Effect" }
    let effects: EffectsFile

    func run(_ input: Int, context: ActivityContext) async throws -> String {
        let key = context.idempotencyKey
        emit("running \(input) \(key)")
        if input % 4 == 3 { try await stallUntilKilled() }
        _ = effects.applyOnce(key: key, line: key)
        emit("applied \(input) \(key)")
        if input % 2 == 1 { try await stallUntilKilled() }
        try await Task.sleep(for: .milliseconds(50 + (input * 37) % 150))
        return key
    }
}

func activities(directory: String) async throws {
    let effects = EffectsFile(directory + "/effects.log")
    let runtime = try EntityRuntime(configuration: activityConfiguration(directory), entityTypes: [ActivityJob.self],
                                    activities: [Effect(effects: effects)])
    try await withThrowingTaskGroup(of: Void.self) { group in
        for index in 0..<100 {
            group.addTask {
                let job = runtime.entity(ActivityJob.self, id: "job-\(index)")
                try await job.start(index)
                emit("started \(index)")
                let key = try await job.result()
                emit("done \(index) \(key)")
            }
        }
        try await group.waitForAll()
    }
    runtime.close()
}

/// The runtime, for activities that send through it; they may run during its open (recovered
/// attempts), before it is set, and then wait for it.
final class RuntimeBox: Sendable {
    private let state = Mutex<(runtime: EntityRuntime?, waiters: [CheckedContinuation<EntityRuntime, Never>])>((nil, []))

    func set(_ runtime: EntityRuntime) {
        let waiters = state.withLock { state in
            state.runtime = runtime
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume(returning: runtime) }
    }

    func get() async -> EntityRuntime {
        await withCheckedContinuation { continuation in
            let runtime = state.withLock { state -> EntityRuntime? in
                if state.runtime == nil { state.waiters.append(continuation) }
                return state.runtime
            }
            if let runtime { continuation.resume(returning: runtime) }
        }
    }
}

/// The `poison` mode (see the header): ``PoisonJob``, whose activities kill the process.
func poison(directory: String, start: Bool, instant instantMode: Bool) async throws {
    let box = RuntimeBox()
    // Heartbeats, waits until that is stored, and kills its process (see the header).
    let poison = Poison { context in
        emit("attempt \(context.attempt) \(context.lastHeartbeat(as: Int.self) ?? 0)")
        context.heartbeat(context.attempt)
        try await box.get().entity(Account.self, id: "marker").signal(.deposit(1))
        emit("stored \(context.attempt)")
        kill(getpid(), SIGKILL)
        try await stallUntilKilled()
        return "not reached"
    }
    // Its start is stored before it runs: it kills its process at once.
    let instant = InstantPoison { context in
        emit("attempt \(context.attempt)")
        kill(getpid(), SIGKILL)
        try await stallUntilKilled()
        return "not reached"
    }
    let runtime = try EntityRuntime(configuration: activityConfiguration(directory), entityTypes: [PoisonJob.self, Account.self],
                                    activities: [poison, instant])
    box.set(runtime)
    if start {
        try await runtime.entity(PoisonJob.self, id: instantMode ? "q" : "p").start(instantMode ? 1 : 0)
        emit("started")
    }
    try await stallUntilKilled()
}

/// One local activity per entity: the `local` mode. The same shape as the tests' `CrashLocalJob`.
struct LocalJob: EntityWorkflow {
    struct State: Codable, Sendable {}
    static var entityType: String { "LocalJob" }
    static func initialState(id: String) -> State { State() }
    static func run(_ input: Int, context: WorkflowContext<Self>) async throws -> String {
        try await context.executeLocal(LocalEffect.self, input, options: .init(retry: .init(initialInterval: .milliseconds(10))))
    }
}

/// The `local` mode's activity (see the header). Named "Effect" like the `activities` mode's (each
/// mode registers only its own), so that the tests' `CrashEffect` stands in for both after reopen.
struct LocalEffect: Activity {
    static var name: String { "Effect" }
    let effects: EffectsFile

    func run(_ input: Int, context: ActivityContext) async throws -> String {
        let key = context.idempotencyKey
        emit("running \(input) \(key)")
        if input % 3 == 2 { try await stallUntilKilled() }
        _ = effects.applyOnce(key: key, line: key)
        emit("applied \(input) \(key)")
        if input == 1000 {
            // Holds the shard's thread inside the turn (a semaphore nothing signals): the turn never
            // reaches its commit.
            DispatchSemaphore(value: 0).wait()
        }
        if input % 3 == 1 { try await stallUntilKilled() }
        return key
    }
}

func local(directory: String) async throws {
    let effects = EffectsFile(directory + "/effects.log")
    let runtime = try EntityRuntime(configuration: activityConfiguration(directory), entityTypes: [LocalJob.self],
                                    activities: [LocalEffect(effects: effects)])
    try await withThrowingTaskGroup(of: Void.self) { group in
        for index in 0..<60 {
            group.addTask {
                let job = runtime.entity(LocalJob.self, id: "job-\(index)")
                try await job.start(index)
                emit("started \(index)")
                guard index % 3 == 0 else { return }
                let key = try await job.result()
                emit("done \(index) \(key)")
            }
        }
        try await group.waitForAll()
    }
    // Every job is started and every inline one done: now the turn that never commits.
    try await runtime.entity(LocalJob.self, id: "blocker").start(1000)
    fail("the blocker's start was acknowledged")
}

/// Names a saga step (an activity type per name, one generic implementation).
protocol SagaStepName { static var name: String { get } }
enum WithdrawStep: SagaStepName { static var name: String { "Withdraw" } }
enum DepositStep: SagaStepName { static var name: String { "Deposit" } }
enum RecordStep: SagaStepName { static var name: String { "Record" } }
enum UndoDepositStep: SagaStepName { static var name: String { "UndoDeposit" } }
enum RefundStep: SagaStepName { static var name: String { "Refund" } }

/// A saga step of the `saga` mode: runs `perform` with its name, returns the amount.
struct SagaStep<Step: SagaStepName>: Activity {
    static var name: String { Step.name }
    let perform: @Sendable (String, ActivityContext) async throws -> Void
    func run(_ input: Int64, context: ActivityContext) async throws -> Int64 {
        try await perform(Step.name, context)
        return input
    }
}

/// A 3-step transfer saga whose third step fails: the same shape as the tests' `CrashTransfer`.
struct CrashTransfer: EntityWorkflow {
    struct State: Codable, Sendable {}
    static var entityType: String { "CrashTransfer" }
    static func initialState(id: String) -> State { State() }
    static func run(_ amount: Int64, context: WorkflowContext<Self>) async throws -> String {
        let options = ActivityOptions(retry: .init(initialInterval: .milliseconds(10)))
        var saga = Saga()
        do {
            saga.addCompensation("refund") { _ = try await context.execute(SagaStep<RefundStep>.self, amount, options: options) }
            _ = try await context.execute(SagaStep<WithdrawStep>.self, amount, options: options)
            saga.addCompensation("undo-deposit") { _ = try await context.execute(SagaStep<UndoDepositStep>.self, amount, options: options) }
            _ = try await context.execute(SagaStep<DepositStep>.self, amount, options: options)
            _ = try await context.execute(SagaStep<RecordStep>.self, amount, options: options)
            return "completed"
        } catch let failure as ActivityFailure {
            try await saga.compensate()
            return "compensated after \(failure.activity)"
        }
    }
}

func saga(directory: String, stall: String, stallBeforeEffect: Bool) async throws {
    let effects = EffectsFile(directory + "/effects.log")
    let perform: @Sendable (String, ActivityContext) async throws -> Void = { name, context in
        let key = context.idempotencyKey
        emit("running \(name) \(key)")
        if name == stall, stallBeforeEffect {
            emit("stalled \(name) \(key)")
            try await stallUntilKilled()
        }
        _ = effects.applyOnce(key: key, line: "\(name) \(key)")
        if name == stall {
            emit("stalled \(name) \(key)")
            try await stallUntilKilled()
        }
        if name == RecordStep.name { throw NonRetryableError("the ledger refused the transfer") }
    }
    let runtime = try EntityRuntime(configuration: activityConfiguration(directory), entityTypes: [CrashTransfer.self], activities: [
        SagaStep<WithdrawStep>(perform: perform), SagaStep<DepositStep>(perform: perform), SagaStep<RecordStep>(perform: perform),
        SagaStep<UndoDepositStep>(perform: perform), SagaStep<RefundStep>(perform: perform),
    ])
    let transfer = runtime.entity(CrashTransfer.self, id: "t-1")
    try await transfer.start(100)
    emit("started")
    emit("result \(try await transfer.result())")
    runtime.close()
}

// MARK: - Cancellation mode

/// The `cancel` mode's job (see the header). The same shape as the tests' `CrashCancelJob`.
struct CancelJob: EntityWorkflow {
    struct State: Codable, Sendable {}
    static var entityType: String { "CancelJob" }
    static func initialState(id: String) -> State { State() }
    static func run(_ input: Int, context: WorkflowContext<Self>) async throws -> String {
        let options = ActivityOptions(retry: .init(initialInterval: .milliseconds(10)), cancellationType: .waitCancellationCompleted)
        do {
            return "done:" + (try await context.execute(Stubborn.self, input, options: options))
        } catch let failure as ActivityFailure {
            return "\(failure.reason):\(failure.attempts)"
        }
    }
}

/// The `cancel` mode's activity: applies its effect, then never ends, whatever it is asked.
struct Stubborn: Activity {
    static var name: String { "Stubborn" }
    let effects: EffectsFile
    let applied: @Sendable () -> Void

    func run(_ input: Int, context: ActivityContext) async throws -> String {
        let key = context.idempotencyKey
        emit("running \(input) \(key)")
        _ = effects.applyOnce(key: key, line: key)
        emit("applied \(input) \(key)")
        applied()
        await withTaskCancellationHandler {
            // Never resumed: the attempt outlives its cancellation until the process is killed.
            await withUnsafeContinuation { (_: UnsafeContinuation<Void, Never>) in }
        } onCancel: {
            emit("cancel-seen \(input)")
        }
        return key
    }
}

func cancel(directory: String) async throws {
    let count = 40
    let (appliedAll, appliedOne) = AsyncStream.makeStream(of: Void.self)
    let effects = EffectsFile(directory + "/effects.log")
    let runtime = try EntityRuntime(configuration: activityConfiguration(directory), entityTypes: [CancelJob.self],
                                    activities: [Stubborn(effects: effects, applied: { appliedOne.yield() })])
    for index in 0..<count {
        try await runtime.entity(CancelJob.self, id: "job-\(index)").start(index)
        emit("started \(index)")
    }
    var applied = 0
    for await _ in appliedAll {
        applied += 1
        if applied == count { break }
    }
    try await withThrowingTaskGroup(of: Void.self) { group in
        for lane in 0..<4 {
            group.addTask {
                for index in stride(from: lane, to: count, by: 4) {
                    try await runtime.entity(CancelJob.self, id: "job-\(index)").cancel()
                    emit("cancel-acked \(index)")
                }
            }
        }
        try await group.waitForAll()
    }
    try await stallUntilKilled()
}

// MARK: - Messaging and fan-out modes

func messages(directory: String, count: Int, registerSink: Bool) async throws {
    let runtime = try openRuntime(directory, entityTypes: registerSink ? [Forwarder.self, Inbox.self] : [Forwarder.self])
    try await withThrowingTaskGroup(of: Void.self) { group in
        for lane in 0..<4 {
            group.addTask {
                for n in stride(from: lane, to: count, by: 4) {
                    try await runtime.entity(Forwarder.self, id: "fw-\(n % 4)").signal(.forward("\(n)", to: "sink"))
                    emit("ack \(n)")
                }
            }
        }
        try await group.waitForAll()
    }
    emit("done")
    try await stallUntilKilled()
}

func fanout(directory: String, width: Int, window: Int) async throws {
    let runtime = try openRuntime(directory, entityTypes: [FanNode.self])
    runtime.register(activity: LeafWork { id in emit("leaf \(id)") })
    let root = runtime.entity(FanNode.self, id: "r")
    try await root.start(.init(width: width, depth: 2, maxConcurrent: window))
    emit("started")
    emit("result \(try await root.result())")
    try await stallUntilKilled()
}

ParentWatch.exitWhenOrphaned()
let arguments = CommandLine.arguments
if arguments.count == 5, arguments[1] == "messages", let count = Int(arguments[3]), ["registered", "unregistered"].contains(arguments[4]) {
    do { try await messages(directory: arguments[2], count: count, registerSink: arguments[4] == "registered") } catch {
        fail("EntityCrashChild: \(error)")
    }
    exit(0)
}
if arguments.count == 5, arguments[1] == "fanout", let width = Int(arguments[3]), let window = Int(arguments[4]) {
    do { try await fanout(directory: arguments[2], width: width, window: window) } catch { fail("EntityCrashChild: \(error)") }
    exit(0)
}
if [4, 5].contains(arguments.count), arguments[1] == "poison", ["start", "resume"].contains(arguments[3]),
   arguments.count == 4 || arguments[4] == "instant" {
    do {
        try await poison(directory: arguments[2], start: arguments[3] == "start", instant: arguments.count == 5)
    } catch { fail("EntityCrashChild: \(error)") }
    exit(0)
}
if arguments.count == 3, arguments[1] == "cancel" {
    do { try await cancel(directory: arguments[2]) } catch { fail("EntityCrashChild: \(error)") }
    exit(0)
}
if arguments.count > 1, ["activities", "local", "saga"].contains(arguments[1]) {
    do {
        if arguments[1] == "activities", arguments.count == 3 {
            try await activities(directory: arguments[2])
        } else if arguments[1] == "local", arguments.count == 3 {
            try await local(directory: arguments[2])
        } else if arguments[1] == "saga", arguments.count == 5, ["UndoDeposit", "Refund"].contains(arguments[3]),
                  ["before", "after"].contains(arguments[4]) {
            try await saga(directory: arguments[2], stall: arguments[3], stallBeforeEffect: arguments[4] == "before")
        } else {
            fail("usage: EntityCrashChild activities DIR | local DIR | saga DIR UndoDeposit|Refund before|after")
        }
    } catch {
        fail("EntityCrashChild: \(error)")
    }
    exit(0)
}
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
