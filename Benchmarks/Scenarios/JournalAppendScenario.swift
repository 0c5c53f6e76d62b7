import DurableEntities
import LMDB
import Logging
import Synchronization

/// `journal-append`: durable appends from concurrent submitters.
///
/// `--entities E` accounts receive events round-robin; `--in-flight K` appends are outstanding in total
/// (K tasks, each submitting one append and awaiting its durable commit, then the next). Latency is
/// submit-to-durable. Defaults: 1,000 entities, 4,096 in flight, 2,000,000 events (enough to pass the
/// journal's log window several times, so moves from the log into history are in the figures).
/// `--param durability=relaxed|noMetaSync` changes the sync mode; `--param payload=N` the event size.
struct JournalAppendScenario: BenchmarkScenario {
    static let name = "journal-append"
    static let summary = "durable appends, K in flight over E entities"

    func run(_ options: ScenarioOptions, _ recorder: LatencyRecorder) async throws -> ScenarioResult {
        let entityCount = options.value(\.entities, full: 1_000, quick: 200)
        let inFlight = options.value(\.inFlight, full: 4_096, quick: 256)
        let total = options.value(\.events, full: 2_000_000, quick: 20_000)
        let payloadSize = try options.extra("payload", full: 64, quick: 64)
        let durability = try Self.durability(options.extra("durability") ?? "durable")
        let defaults = Journal.Configuration(directory: "")
        let window = try options.extra("window", full: defaults.logWindow, quick: defaults.logWindow)
        let threshold = try options.extra("threshold", full: defaults.coalesceThreshold, quick: defaults.coalesceThreshold)
        let writeMap = try options.extra("writemap", full: false, quick: false)
        let mode = options.extra("mode") ?? "callbacks"

        let directory = try options.makeScratchDirectory("journal-append")
        defer { directory.remove() }
        let journal = try Journal(configuration: .init(
            directory: directory.path, durability: durability, coalesceThreshold: threshold, logWindow: window, writeMap: writeMap,
            logger: Logger(label: "bench", factory: { _ in SwiftLogNoOpLogHandler() })))
        defer { journal.close() }

        // Set-up, not measured: register the entities, 1,000 per commit.
        let keys = try await journal.registerAccounts(entityCount, prefix: "acc-")

        let generator = AppendGenerator(keys: keys, total: total, payloadSize: payloadSize)
        let failed: Int
        recorder.start()
        switch mode {
        case "callbacks":
            failed = await Self.driveWithCallbacks(generator, journal, inFlight: inFlight, recorder: recorder)
        case "tasks":
            failed = await Self.driveWithTasks(generator, journal, inFlight: inFlight, recorder: recorder)
        default:
            throw BenchmarkFailure(message: "--param mode must be callbacks or tasks")
        }
        recorder.stop()
        let stats = journal.statistics
        if failed > 0 { throw BenchmarkFailure(message: "\(failed) appends failed") }
        // Sanity: every event is there.
        var stored: UInt64 = 0
        for key in keys { stored += try journal.latestSequence(of: key) }
        guard stored == UInt64(total) else { throw BenchmarkFailure(message: "stored \(stored) events, expected \(total)") }
        return ScenarioResult(
            operations: total,
            params: [
                "entities": .int(entityCount), "in_flight": .int(inFlight), "events": .int(total),
                "payload_bytes": .int(payloadSize), "durability": .string("\(durability)"),
                "log_window": .int(window), "coalesce_threshold": .int(threshold), "writemap": .bool(writeMap), "mode": .string(mode),
            ],
            extra: [
                "commits": .int(stats.commits),
                "events_per_commit": .double(Double(stats.operations) / Double(max(1, stats.commits))),
                "build_ms_per_commit": .double(stats.buildTime.milliseconds / Double(max(1, stats.commits))),
                "commit_ms_per_commit": .double(stats.commitTime.milliseconds / Double(max(1, stats.commits))),
            ])
    }

    /// K submitter chains on the callback API, the way the runtime's shards use the journal (no task per
    /// append): each completion records its latency and submits that chain's next append.
    static func driveWithCallbacks(_ generator: AppendGenerator, _ journal: Journal, inFlight: Int, recorder: LatencyRecorder) async -> Int {
        let tracker = CompletionTracker(chains: inFlight)
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            tracker.onFinish { done.resume() }
            @Sendable func next() {
                let start = ContinuousClock.Instant.now
                let submitted = generator.submitNext(to: journal) { result in
                    recorder.record(since: start)
                    if case .failure = result { tracker.fail() }
                    next()
                }
                if !submitted { tracker.chainEnded() }
            }
            for _ in 0..<inFlight { next() }
        }
        return tracker.failures
    }

    /// K Swift tasks, each awaiting `commit` and then submitting its next append.
    static func driveWithTasks(_ generator: AppendGenerator, _ journal: Journal, inFlight: Int, recorder: LatencyRecorder) async -> Int {
        await withTaskGroup(of: Int.self) { group in
            for _ in 0..<inFlight {
                group.addTask {
                    var failures = 0
                    while true {
                        let start = ContinuousClock.Instant.now
                        // Pick the next (entity, sequence) and enqueue it in one step, so appends to one
                        // entity reach the writer in sequence order.
                        let result = await withUnsafeContinuation { (continuation: UnsafeContinuation<Result<CommitReceipt, JournalError>?, Never>) in
                            guard generator.submitNext(to: journal, completion: { continuation.resume(returning: $0) }) else {
                                continuation.resume(returning: nil)
                                return
                            }
                        }
                        guard let result else { break }
                        recorder.record(since: start)
                        if case .failure = result { failures += 1 }
                    }
                    return failures
                }
            }
            return await group.reduce(0, +)
        }
    }

    static func durability(_ text: String) throws -> Environment.Durability {
        switch text {
        case "durable": .durable
        case "noMetaSync": .noMetaSync
        case "relaxed": .relaxed
        default: throw BenchmarkFailure(message: "--param durability must be durable, noMetaSync or relaxed")
        }
    }
}

/// Hands out (entity, next sequence) round-robin and submits under one lock.
final class AppendGenerator: Sendable {
    private struct State {
        var next = 0
        var sequences: [UInt64]
    }
    private let keys: [EntityKey]
    private let total: Int
    private let payload: [UInt8]
    private let state: Mutex<State>

    init(keys: [EntityKey], total: Int, payloadSize: Int) {
        self.keys = keys
        self.total = total
        self.payload = [UInt8](repeating: 0x5A, count: payloadSize)
        self.state = Mutex(State(sequences: [UInt64](repeating: 0, count: keys.count)))
    }

    func submitNext(to journal: Journal, completion: @escaping @Sendable (Result<CommitReceipt, JournalError>) -> Void) -> Bool {
        state.withLock { state in
            guard state.next < total else { return false }
            let index = state.next % keys.count
            state.next += 1
            state.sequences[index] += 1
            var batch = JournalBatch()
            // A fresh payload per event, as a caller encoding its event would have (one array shared
            // by every in-flight append would make its refcount a contended cache line).
            batch.append(keys[index], sequence: state.sequences[index], payload: Array(payload))
            journal.submit(batch, completion: completion)
            return true
        }
    }
}

/// Counts callback chains to their end and failures on the way.
final class CompletionTracker: Sendable {
    private struct State {
        var live: Int
        var failures = 0
        var finish: (@Sendable () -> Void)?
    }
    private let state: Mutex<State>

    init(chains: Int) { state = Mutex(State(live: chains)) }

    func onFinish(_ body: @escaping @Sendable () -> Void) { state.withLock { $0.finish = body } }
    func fail() { state.withLock { $0.failures += 1 } }
    var failures: Int { state.withLock { $0.failures } }

    func chainEnded() {
        let finish = state.withLock { state -> (@Sendable () -> Void)? in
            state.live -= 1
            return state.live == 0 ? state.finish : nil
        }
        finish?()
    }
}

struct BenchmarkFailure: Error, CustomStringConvertible {
    let message: String
    var description: String { message }
}
