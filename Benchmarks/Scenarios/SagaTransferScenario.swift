import DequeModule
import DurableEntities
import Foundation
import Synchronization

/// `saga-transfer`: money-transfer workflows — a run body executing three activities in sequence
/// (withdraw, deposit, record) inside a ``Saga`` — started and awaited the way users do.
///
/// `--in-flight K` client tasks (default 1,000) each loop: run a new ``SagaTransfer`` entity
/// `tr-<client>-<n>` to its end with `execute(_:)` (start it and await its outcome, one message);
/// `--events N` transfers in all (default 100,000). Latency is from the call to its return (the
/// transfer's three activities ran and its completion is durable). `--param api=start-result` calls
/// `start(_:)` and then `result()` instead (two calls, the way to start without waiting). Transfers move money between `--entities E`
/// accounts (default 1,000) of an in-memory ``SagaLedger``; its activities are idempotent by
/// ``ActivityContext/idempotencyKey``. The saga registers a compensation before each money step;
/// none runs on this happy path. Not measured: the first `--param warm-up=W` transfers (default 5 × K),
/// after which the clients run straight on into the measured ones (the steady state of K in flight);
/// `--param start=together` instead runs one warm-up transfer per client, waits for all of them and
/// starts all K clients' measured transfers at once (the method used up to the thirteenth session).
///
/// Per transfer the runtime makes 4 journal submissions one after another (register the entity with
/// `started` + schedule withdraw; 3 × activity outcome + the next command or `completed`; with
/// `api=start-result`, sometimes one more for a turn that only registers the `result` waiter), and
/// records 8 history events and 3 activity tasks (put, then deleted).
///
/// Extra fields: with `api=start-result`, `start_p50_ms` and `start_p99_ms` (the `start` call alone:
/// the rest of a transfer's latency is the `result` wait); the journal writer's figures for the measured region (`commits`, `events_per_commit`,
/// `submissions_per_commit`, …), `events_per_transfer` (read back from the journal), the process's CPU
/// time per transfer (`cpu_us_per_transfer`, all threads) and cores kept busy, the ledger's check
/// (`balances_consistent`: Σ withdrawn == Σ deposited, every transfer withdrew, deposited and recorded
/// exactly once, money is conserved), and the 1-minute load average at the start.
///
/// `--param rate=R` makes it an open loop: transfers start on a schedule of R a second (slot k at
/// k / R seconds), each slot taken by whichever of the K clients is free, so K bounds the transfers
/// in flight and R sets the load. Latency counts from the slot, not from the call: when the runtime
/// falls behind the rate, the wait for a free client is in the figures (no coordinated omission).
/// Without it (the default, and the target), each client starts its next transfer as soon
/// as its last one returns: K in flight at all times, and the throughput is what the machine gives.
///
/// `--param local=true` runs the three activities (and the compensations) as local activities
/// (``WorkflowContext/executeLocal(_:_:options:)``): they run inside the turn, so a transfer is one
/// commit instead of four, with no trip through the activity pool (entity type `SagaTransferLocal`).
///
/// `--param durability=relaxed`, `--param shards=N`, `--param max-per-turn=N`, `--param commit-window-us=N`
/// (``Journal/Configuration/commitWindow``, default 2,000; 0 commits as soon as anything is queued),
/// `--param commit-linger-us=N` (``Journal/Configuration/commitLinger``, default 0),
/// `--param activities=N` (`maxConcurrentActivities`, default 2,048) and `--param max-resident=N`
/// (default the larger of 10,000 and 4 × K), `--param deferred-names=N`
/// (``Journal/Configuration/deferredNameLimit``, default 65,536: names waiting before a merge into the
/// name index) change the runtime. `--param codec=` selects the codec of
/// the transfer's own payloads (input, activity inputs and outputs, result): `binary` (the runtime's
/// default, ``BinaryEntityCodec``), `json` (``JSONEntityCodec``) or `raw` (``SagaRawCodec``, an
/// experiment showing the runtime without the user-payload codec). The runtime's internal records
/// (scheduled activities, activity tasks) are encoded by the runtime itself whatever the codec.
struct SagaTransferScenario: BenchmarkScenario {
    static let name = "saga-transfer"
    static let summary = "saga workflows: K clients start transfers of 3 activities"

    func run(_ options: ScenarioOptions, _ recorder: LatencyRecorder) async throws -> ScenarioResult {
        let clients = max(1, options.value(\.inFlight, full: 1_000, quick: 200))
        let total = max(clients, options.value(\.events, full: 100_000, quick: 2_000))
        let accounts = max(2, options.value(\.entities, full: 1_000, quick: 1_000))
        let durability = try EntityBench.durability(options.extra("durability"), default: .durable)
        let shards = try options.extra("shards", as: Int.self)
        let maxPerTurn = try options.extra("max-per-turn", as: Int.self)
        let commitWindow = try options.extra("commit-window-us", as: Int.self)
        let commitLinger = try options.extra("commit-linger-us", as: Int.self)
        let codec = options.extra("codec") ?? "binary"
        guard ["binary", "json", "raw"].contains(codec) else { throw BenchmarkFailure(message: "--param codec must be binary, json or raw") }
        let maxActivities = try options.extra("activities", full: 2_048, quick: 2_048)
        let maxResident = try options.extra("max-resident", full: max(10_000, 4 * clients), quick: max(10_000, 4 * clients))
        guard maxResident > clients else {
            throw BenchmarkFailure(message: "--param max-resident=\(maxResident) must exceed --in-flight \(clients)")
        }
        let local = try EntityBench.flag(options.extra("local"), name: "local")
        let api = options.extra("api") ?? "execute"
        guard ["execute", "start-result"].contains(api) else { throw BenchmarkFailure(message: "--param api must be execute or start-result") }
        let separate = api == "start-result"
        let load = EntityBench.loadAverage()

        let directory = try options.makeScratchDirectory("saga-transfer")
        defer { directory.remove() }
        var configuration = try EntityBench.configuration(
            directory: directory.path, durability: durability, snapshotEvery: 100,
            maxResidentEntities: maxResident, shards: shards, maxMessagesPerTurn: maxPerTurn,
            commitWindowMicroseconds: commitWindow, commitLingerMicroseconds: commitLinger)
        configuration.maxConcurrentActivities = maxActivities
        configuration.journal.writeMap = try options.extra("writemap", full: false, quick: false)
        if let limit = try options.extra("deferred-names", as: Int.self) {
            guard limit >= 1 else { throw BenchmarkFailure(message: "--param deferred-names must be at least 1") }
            configuration.journal.deferredNameLimit = limit
        }
        switch codec {
        case "json": configuration.codec = JSONEntityCodec()
        case "raw": configuration.codec = SagaRawCodec()
        default: configuration.codec = BinaryEntityCodec()
        }
        // Sized for every activity of the run: growing a table of 300,000 keys rehashes them all under
        // the ledger's lock, a 10–50 ms stall of every shard (measured) that a real side-effect store
        // does not have.
        let ledger = SagaLedger(accounts: accounts, openingBalance: SagaTransfer.openingBalance,
                                expectedKeys: 3 * (total + clients))
        let runtime = try EntityRuntime(
            configuration: configuration, entityTypes: [SagaTransfer.self, SagaTransferLocal.self],
            activities: [
                SagaWithdraw(ledger: ledger), SagaDeposit(ledger: ledger), SagaRecord(ledger: ledger),
                SagaRefund(ledger: ledger), SagaUndoDeposit(ledger: ledger),
            ])
        defer { runtime.close() }

        /// Transfer `n` of client `c`: between two accounts picked so that concurrent clients spread
        /// over the ledger; amounts 1…10.
        @Sendable func input(client: Int, n: Int) -> SagaTransfer.Input {
            let from = (client &* 7 &+ n &* 13) % accounts
            return SagaTransfer.Input(from: SagaLedger.account(from), to: SagaLedger.account((from + 1 + n % (accounts - 1)) % accounts),
                                      amount: Int64(1 + n % 10))
        }

        let type: any SagaTransferEntity.Type = local ? SagaTransferLocal.self : SagaTransfer.self
        /// Runs transfer `id` and returns its receipt; `starts`, when given, gets the time `start` took.
        @Sendable func transfer(_ id: String, _ input: SagaTransfer.Input, starts: LatencyRecorder?) async throws -> Int64 {
            func run<W: SagaTransferEntity>(_ type: W.Type) async throws -> Int64 {
                let ref = runtime.entity(W.self, id: id)
                guard separate else { return try await ref.execute(input) }
                if let starts {
                    try await starts.measure { try await ref.start(input) }
                } else {
                    try await ref.start(input)
                }
                return try await ref.result()
            }
            return try await run(type)
        }
        /// Latencies of the `start` calls alone (the rest is the `result` wait).
        let starts = LatencyRecorder()

        // The measured region. By default the clients never stop between warm-up and measuring: the
        // first `warm-up` transfers to complete (all clients starting at once, the shards, the writer and
        // the name index filling) are not measured; the one that completes the warm-up opens the region,
        // and from then on each transfer a client starts takes one of `total` tickets. The region
        // measures the steady state of K transfers in flight. `--param start=together` is the older
        // method: one warm-up transfer per client, every client waits for all of them, then all K
        // clients start their measured transfers at the same instant (a burst the steady state never
        // has; it adds its queueing to the first ~100 ms of the measured latencies).
        let together = switch options.extra("start") ?? "steady" {
        case "steady": false
        case "together": true
        default: throw BenchmarkFailure(message: "--param start must be steady or together")
        }
        let warmUp = together ? 0 : try options.extra("warm-up", full: 5 * clients, quick: clients)
        let region = MeasuredRegion(total: total, warmUp: warmUp)
        // `--param rate=R`: an open loop (see the type's doc); without it, a closed loop.
        let rate = try options.extra("rate", as: Double.self)
        if let rate, !(rate > 0 && rate.isFinite) { throw BenchmarkFailure(message: "--param rate must be a positive number of transfers a second") }
        let schedule = rate.map { OpenLoopSchedule(rate: $0) }
        defer { schedule?.stop() }  // a failed run stops it too (a second stop does nothing)
        let baseline = Baseline()
        // `--param timeline=PATH`: the run's progress every 20 ms, warm-up included (see `Timeline`).
        let timeline = options.extra("timeline").map { Timeline(path: $0) }
        @Sendable func open() {
            baseline.set(runtime.journal.statistics, ProcessCPU.now())
            recorder.start()
            timeline?.measuredRegionOpened()
            region.open()
        }
        if together {
            try await EntityBench.forEach(count: clients, workers: clients) { client in
                _ = try await transfer("warm-\(client)", input(client: client, n: 0), starts: nil)
            }
        }
        timeline?.start {
            let statistics = runtime.journal.statistics
            return [("commits", Double(statistics.commits)), ("commit_build_ms", statistics.buildTime.milliseconds),
                    ("commit_write_ms", statistics.commitTime.milliseconds)]
        }
        defer { try? timeline?.stop() }  // a failed run stops it too (a second stop does nothing)
        if together || warmUp <= 0 { open() }
        /// How many `tr-<client>-<n>` transfers each client ran (warm-up and measured).
        let ran = try await withThrowingTaskGroup(of: (client: Int, count: Int).self) { group in
            for client in 0..<clients {
                group.addTask {
                    var n = 0
                    while true {
                        let measured: Bool
                        switch region.take() {
                        case .warmUp: measured = false
                        case .measured: measured = true
                        case .done: return (client, n)
                        }
                        // Open loop: the next slot of the schedule, whichever client is free; the latency
                        // counts from the slot, so a transfer that waited for a free client (the runtime
                        // fell behind the rate) counts that wait too.
                        let start = await schedule?.next() ?? .now
                        let receipt = try await transfer("tr-\(client)-\(n)", input(client: client, n: n), starts: measured ? starts : nil)
                        guard receipt > 0 else { throw BenchmarkFailure(message: "tr-\(client)-\(n) returned receipt \(receipt)") }
                        timeline?.operationCompleted()
                        if measured {
                            recorder.record(since: start)
                        } else if region.warmedUp() {
                            open()
                        }
                        n += 1
                    }
                }
            }
            var ran = [Int](repeating: 0, count: clients)
            for try await (client, count) in group { ran[client] = count }
            return ran
        }
        recorder.stop()
        schedule?.stop()
        let cpu = ProcessCPU.now() - baseline.cpu
        try timeline?.stop()
        let before = baseline.statistics
        let after = runtime.journal.statistics

        // Sanity: every transfer's history is in the journal (and how long it is).
        var events: UInt64 = 0
        for client in 0..<clients {
            for n in 0..<ran[client] {
                let name = EntityName(type: type.entityType, id: "tr-\(client)-\(n)")
                guard let key = try runtime.journal.key(for: name) else {
                    throw BenchmarkFailure(message: "\(name) is not registered")
                }
                events += try runtime.journal.latestSequence(of: key)
            }
        }
        let named = ran.reduce(0, +)
        let books = ledger.books
        let transfers = named + (together ? clients : 0)  // measured + warm-up
        let consistent = books.withdrawn == books.deposited && books.refunded == 0 && books.undone == 0
            && books.withdrawals == transfers && books.deposits == transfers && books.records == transfers
            && books.balanceSum == Int64(accounts) * SagaTransfer.openingBalance

        let commits = after.commits - before.commits
        let perCommit = { (value: Int) -> JSONValue in .double(Double(value) / Double(max(1, commits))) }
        var extra: [String: JSONValue] = [
            "commits": .int(commits),
            "events_per_commit": .double(Double(events) / Double(max(1, commits))),
            "events_per_transfer": .double(Double(events) / Double(named)),
            "submissions_per_commit": perCommit(after.submissions - before.submissions),
            "submissions_per_transfer": .double(Double(after.submissions - before.submissions) / Double(total)),
            "operations_per_commit": perCommit(after.operations - before.operations),
            "build_ms_per_commit": .double((after.buildTime - before.buildTime).milliseconds / Double(max(1, commits))),
            "commit_ms_per_commit": .double((after.commitTime - before.commitTime).milliseconds / Double(max(1, commits))),
            "cpu_us_per_transfer": .double(cpu.seconds * 1e6 / Double(total)),
            "balances_consistent": .bool(consistent),
            "withdrawn_total": .int(Int(books.withdrawn)),
            "deposited_total": .int(Int(books.deposited)),
            "activity_duplicates": .int(books.duplicates),
        ]
        if separate {
            let startSummary = starts.summary
            extra["start_p50_ms"] = .double(startSummary.p50Milliseconds)
            extra["start_p99_ms"] = .double(startSummary.p99Milliseconds)
        }
        if let wall = recorder.elapsed { extra["cores_busy"] = .double(cpu.seconds / wall.seconds) }
        if let load { extra["load_avg_1m"] = .double(load) }
        if let timeline {
            // The spread of the measured region's 100 ms windows' throughput: a closed loop's p99 follows its slow end.
            let windows = timeline.windows(of: .milliseconds(100)).sorted()
            if !windows.isEmpty {
                extra["window_100ms_throughput_min"] = .double(windows[0])
                extra["window_100ms_throughput_p10"] = .double(windows[windows.count / 10])
                extra["window_100ms_throughput_median"] = .double(windows[windows.count / 2])
                extra["window_100ms_throughput_max"] = .double(windows[windows.count - 1])
            }
            extra["timeline"] = .string(timeline.path)
        }
        guard consistent else {
            throw BenchmarkFailure(message: "the ledger is inconsistent: \(books)")
        }
        return ScenarioResult(
            operations: total,
            params: [
                "in_flight": .int(clients), "events": .int(total), "entities": .int(accounts),
                "durability": .string("\(durability)"), "shards": .int(configuration.shards),
                "max_per_turn": .int(configuration.maxMessagesPerTurn), "activities": .int(maxActivities),
                "max_resident": .int(maxResident), "codec": .string(codec), "local": .bool(local), "api": .string(api),
                "start": .string(together ? "together" : "steady"), "warm_up": .int(together ? clients : warmUp),
                "commit_window_us": .int(EntityBench.microseconds(configuration.journal.commitWindow)),
                "commit_linger_us": .int(EntityBench.microseconds(configuration.journal.commitLinger)),
                "rate": rate.map { .double($0) } ?? .string("closed-loop"),
            ],
            extra: extra)
    }
}

// MARK: The workflow

/// A money transfer as a saga: withdraw from one account, deposit into another, record it. Each money
/// step registers its compensation first (refund, undo the deposit); a failure would run them in
/// reverse order. The state is the transfer's status.
struct SagaTransfer: EntityWorkflow {
    struct State: Codable, Sendable { var status: UInt8 = 0 }
    struct Input: Codable, Sendable {
        var from: String
        var to: String
        var amount: Int64
    }
    typealias Output = Int64

    static let openingBalance: Int64 = 1_000_000_000
    static let options = ActivityOptions(retry: .init(initialInterval: .milliseconds(100), maximumAttempts: 3,
                                                      nonRetryableErrorTypes: ["InsufficientFunds"]))

    static var entityType: String { "SagaTransfer" }
    static func initialState(id: String) -> State { State() }

    static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> Int64 {
        try await transfer(input, context: context, local: false)
    }

    /// The transfer, with its activities on the pool or local.
    static func transfer<W: EntityWorkflow>(_ input: Input, context: WorkflowContext<W>, local: Bool) async throws -> Int64
    where W.State == State {
        func call<A: Activity>(_ activity: A.Type, _ input: A.Input) async throws -> A.Output {
            local ? try await context.executeLocal(activity, input, options: options) : try await context.execute(activity, input, options: options)
        }
        var saga = Saga()
        let debit = SagaLeg(account: input.from, amount: input.amount)
        let credit = SagaLeg(account: input.to, amount: input.amount)
        do {
            saga.addCompensation("refund") { _ = try await call(SagaRefund.self, debit) }
            _ = try await call(SagaWithdraw.self, debit)
            context.updateState { $0.status = 1 }
            saga.addCompensation("undo-deposit") { _ = try await call(SagaUndoDeposit.self, credit) }
            _ = try await call(SagaDeposit.self, credit)
            context.updateState { $0.status = 2 }
            let receipt = try await call(SagaRecord.self, input)
            context.updateState { $0.status = 3 }
            return receipt
        } catch {
            try await saga.compensate()
            context.updateState { $0.status = 4 }
            throw error
        }
    }
}

/// The same transfer with local activities (`--param local=true`).
struct SagaTransferLocal: EntityWorkflow {
    typealias State = SagaTransfer.State
    typealias Input = SagaTransfer.Input
    typealias Output = Int64
    static var entityType: String { "SagaTransferLocal" }
    static func initialState(id: String) -> State { State() }
    static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> Int64 {
        try await SagaTransfer.transfer(input, context: context, local: true)
    }
}

/// The two transfer entity types, for the scenario's client loop.
protocol SagaTransferEntity: EntityWorkflow where Input == SagaTransfer.Input, Output == Int64 {}
extension SagaTransfer: SagaTransferEntity {}
extension SagaTransferLocal: SagaTransferEntity {}

/// One side of a transfer.
struct SagaLeg: Codable, Sendable {
    var account: String
    var amount: Int64
}

/// The in-memory bank the activities call: balances by account, and every applied operation by
/// idempotency key (a repeated attempt returns the first result and changes nothing).
final class SagaLedger: Sendable {
    struct Books: Sendable, CustomStringConvertible {
        var balances: [String: Int64] = [:]
        var applied: [String: Int64] = [:]
        var withdrawn: Int64 = 0
        var deposited: Int64 = 0
        var refunded: Int64 = 0
        var undone: Int64 = 0
        var withdrawals = 0
        var deposits = 0
        var records = 0
        var duplicates = 0
        var balanceSum: Int64 { balances.values.reduce(0, +) }
        var description: String {
            "withdrawn \(withdrawn) (\(withdrawals)), deposited \(deposited) (\(deposits)), records \(records), "
                + "refunded \(refunded), undone \(undone), balance sum \(balanceSum), duplicates \(duplicates)"
        }
    }

    struct InsufficientFunds: Error {}

    private let state: Mutex<Books>

    /// `expectedKeys`: how many idempotency keys the run applies; the table is sized for them.
    init(accounts: Int, openingBalance: Int64, expectedKeys: Int) {
        var books = Books()
        books.applied.reserveCapacity(expectedKeys)
        for index in 0..<accounts { books.balances[Self.account(index)] = openingBalance }
        state = Mutex(books)
    }

    static func account(_ index: Int) -> String { "a-\(index)" }

    var books: Books { state.withLock { $0 } }

    /// Applies `change` once per idempotency key; returns its result (the first one, on a repeat).
    func once(_ key: String, _ change: (inout Books) throws -> Int64) throws -> Int64 {
        try state.withLock { books in
            if let done = books.applied[key] {
                books.duplicates += 1
                return done
            }
            let result = try change(&books)
            books.applied[key] = result
            return result
        }
    }

    /// Moves `amount` out of (negative) or into (positive) `account`; returns the new balance.
    static func move(_ amount: Int64, _ account: String, in books: inout Books) throws -> Int64 {
        let balance = books.balances[account, default: 0]
        guard balance + amount >= 0 else { throw InsufficientFunds() }
        books.balances[account] = balance + amount
        return balance + amount
    }
}

struct SagaWithdraw: Activity {
    let ledger: SagaLedger
    func run(_ input: SagaLeg, context: ActivityContext) async throws -> Int64 {
        try ledger.once(context.idempotencyKey) { books in
            let balance = try SagaLedger.move(-input.amount, input.account, in: &books)
            books.withdrawn += input.amount
            books.withdrawals += 1
            return balance
        }
    }
}

struct SagaDeposit: Activity {
    let ledger: SagaLedger
    func run(_ input: SagaLeg, context: ActivityContext) async throws -> Int64 {
        try ledger.once(context.idempotencyKey) { books in
            let balance = try SagaLedger.move(input.amount, input.account, in: &books)
            books.deposited += input.amount
            books.deposits += 1
            return balance
        }
    }
}

/// Records the transfer; returns its receipt number (1, 2, …).
struct SagaRecord: Activity {
    let ledger: SagaLedger
    func run(_ input: SagaTransfer.Input, context: ActivityContext) async throws -> Int64 {
        try ledger.once(context.idempotencyKey) { books in
            books.records += 1
            return Int64(books.records)
        }
    }
}

/// Compensates a withdrawal (registered by every transfer, run by none on the happy path).
struct SagaRefund: Activity {
    let ledger: SagaLedger
    func run(_ input: SagaLeg, context: ActivityContext) async throws -> Int64 {
        try ledger.once(context.idempotencyKey) { books in
            let balance = try SagaLedger.move(input.amount, input.account, in: &books)
            books.refunded += input.amount
            return balance
        }
    }
}

/// Compensates a deposit (registered by every transfer, run by none on the happy path).
struct SagaUndoDeposit: Activity {
    let ledger: SagaLedger
    func run(_ input: SagaLeg, context: ActivityContext) async throws -> Int64 {
        try ledger.once(context.idempotencyKey) { books in
            let balance = try SagaLedger.move(-input.amount, input.account, in: &books)
            books.undone += input.amount
            return balance
        }
    }
}

/// An experiment, selected with `--param codec=raw`: fixed-layout bytes for the transfer's payloads
/// (``SagaLeg``, ``SagaTransfer/Input``, `Int64` outputs, ``SagaTransfer/State``), JSON for anything
/// else. It shows what the runtime costs when the user-payload codec costs next to nothing.
struct SagaRawCodec: EntityCodec {
    private let json = JSONEntityCodec()

    func encode<Value: Encodable>(_ value: Value) throws -> [UInt8] {
        var out = [UInt8]()
        if let leg = value as? SagaLeg {
            Self.put(leg.amount, &out)
            out.append(contentsOf: leg.account.utf8)
        } else if let input = value as? SagaTransfer.Input {
            Self.put(input.amount, &out)
            Self.put(Int64(input.from.utf8.count), &out)
            out.append(contentsOf: input.from.utf8)
            out.append(contentsOf: input.to.utf8)
        } else if let number = value as? Int64 {
            Self.put(number, &out)
        } else if let state = value as? SagaTransfer.State {
            out.append(state.status)
        } else {
            return try json.encode(value)
        }
        return out
    }

    func decode<Value: Decodable>(_ type: Value.Type, from bytes: UnsafeRawBufferPointer) throws -> Value {
        if type == SagaLeg.self {
            let amount = try Self.word(bytes, at: 0)
            return SagaLeg(account: String(decoding: bytes[8...], as: UTF8.self), amount: amount) as! Value
        }
        if type == SagaTransfer.Input.self {
            let amount = try Self.word(bytes, at: 0)
            let fromCount = Int(try Self.word(bytes, at: 8))
            guard fromCount >= 0, 16 + fromCount <= bytes.count else { throw BenchmarkFailure(message: "raw codec: bad transfer input") }
            let from = String(decoding: bytes[16..<(16 + fromCount)], as: UTF8.self)
            let to = String(decoding: bytes[(16 + fromCount)...], as: UTF8.self)
            return SagaTransfer.Input(from: from, to: to, amount: amount) as! Value
        }
        if type == Int64.self { return try Self.word(bytes, at: 0) as! Value }
        if type == SagaTransfer.State.self {
            guard bytes.count == 1 else { throw BenchmarkFailure(message: "raw codec: bad state") }
            return SagaTransfer.State(status: bytes[0]) as! Value
        }
        return try json.decode(type, from: bytes)
    }

    private static func put(_ word: Int64, _ out: inout [UInt8]) {
        withUnsafeBytes(of: word.littleEndian) { out.append(contentsOf: $0) }
    }

    private static func word(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws -> Int64 {
        guard offset + 8 <= bytes.count else { throw BenchmarkFailure(message: "raw codec: \(bytes.count) bytes, expected more") }
        return Int64(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: Int64.self))
    }
}

/// The measured region of a run whose clients run on from warm-up into measuring (see the scenario).
final class MeasuredRegion: Sendable {
    enum Ticket { case warmUp, measured, done }

    private let total: Int
    private let warmUp: Int
    private let isOpen = Atomic<Bool>(false)
    private let warmed = Atomic<Int>(0)
    private let tickets = Atomic<Int>(0)

    /// `total` measured transfers after `warmUp` unmeasured ones.
    init(total: Int, warmUp: Int) {
        self.total = total
        self.warmUp = warmUp
    }

    /// What the transfer a client is about to start is: warm-up before the region opens, then one of
    /// the `total` measured transfers, then none.
    func take() -> Ticket {
        guard isOpen.load(ordering: .acquiring) else { return .warmUp }
        return tickets.wrappingAdd(1, ordering: .relaxed).oldValue < total ? .measured : .done
    }

    /// Counts a completed warm-up transfer; `true` for exactly the one that completes the warm-up
    /// (its client then opens the region).
    func warmedUp() -> Bool { warmed.wrappingAdd(1, ordering: .relaxed).newValue == warmUp }

    /// Opens the region: transfers started from now on are measured.
    func open() { isOpen.store(true, ordering: .releasing) }
}

/// The start times of an open loop: slot `k` is `k / rate` seconds after the first one, handed out in
/// order to whichever client asks next.
///
/// A client whose slot is still ahead waits for it without a timer of its own: one thread wakes at
/// the next due slot, at most once a ``tick``, and resumes the clients due by then, so the pacing
/// costs at most 2,000 sleeps a second rather than a dispatch timer per transfer (which, at 10,000
/// transfers a second, cost ~20 µs a transfer).
final class OpenLoopSchedule: Sendable {
    private struct State {
        var origin: ContinuousClock.Instant?
        var slot = 0
        /// Clients waiting for their slots, in slot order.
        var waiting = Deque<(due: ContinuousClock.Instant, client: UnsafeContinuation<ContinuousClock.Instant, Never>)>()
        var stopped = false
    }

    /// The pacing thread's shortest sleep.
    static let tick = Duration.microseconds(500)
    private let interval: Double
    private let state = Mutex(State())
    private let done = DispatchSemaphore(value: 0)

    init(rate: Double) {
        interval = 1e9 / rate
        // Named from inside: on Linux, a name given before `start()` never reaches the OS thread, which
        // would then show (in `perf`, `top -H` and ``Timeline``'s groups) under its creator's name.
        Thread { [self] in
            Thread.current.name = "bench-pacer"
            self.pace()
        }.start()
    }

    /// Waits for the next slot; returns its start time (in the past when the clients fell behind the rate).
    func next() async -> ContinuousClock.Instant {
        await withUnsafeContinuation { client in
            let now = ContinuousClock.Instant.now
            let due = state.withLock { state -> ContinuousClock.Instant? in
                let origin = state.origin ?? now
                state.origin = origin
                let due = origin + .nanoseconds(Int64((Double(state.slot) * interval).rounded()))
                state.slot += 1
                if due <= now { return due }
                state.waiting.append((due, client))
                return nil
            }
            if let due { client.resume(returning: due) }
        }
    }

    /// Ends the pacing thread (once; later calls return at once); every client still waiting is resumed.
    func stop() {
        let first = state.withLock { state in
            defer { state.stopped = true }
            return !state.stopped
        }
        if first { done.wait() }
    }

    private func pace() {
        while true {
            let now = ContinuousClock.Instant.now
            var due: [(due: ContinuousClock.Instant, client: UnsafeContinuation<ContinuousClock.Instant, Never>)] = []
            let (next, stopped) = state.withLock { state in
                while let first = state.waiting.first, first.due <= now || state.stopped { due.append(state.waiting.removeFirst()) }
                return (state.waiting.first?.due, state.stopped)
            }
            for (slot, client) in due { client.resume(returning: slot) }
            if stopped { break }
            // Never less than a tick: one wake-up per slot cost ~15 µs a transfer at 10,000/s. A client
            // then starts up to a tick after its slot, and that lateness counts in its latency.
            let pause = max(Self.tick, next.map { now.duration(to: $0) } ?? Self.tick)
            let (seconds, attoseconds) = pause.components
            Thread.sleep(forTimeInterval: Double(seconds) + Double(attoseconds) / 1e18)
        }
        done.signal()
    }
}

/// The journal's counters and the process's CPU time when the measured region opened.
final class Baseline: Sendable {
    private let state = Mutex<(statistics: Journal.Statistics, cpu: Duration)?>(nil)
    func set(_ statistics: Journal.Statistics, _ cpu: Duration) { state.withLock { $0 = (statistics, cpu) } }
    var statistics: Journal.Statistics { state.withLock { $0!.statistics } }
    var cpu: Duration { state.withLock { $0!.cpu } }
}
