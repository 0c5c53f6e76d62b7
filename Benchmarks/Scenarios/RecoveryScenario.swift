import DurableEntities
import DurableEntitiesTesting
import Foundation
import Synchronization
import TestSupport

/// `recovery`: how long a directory takes to open again after its process was killed (SIGKILL) in
/// the middle of its work, and to resume what was in flight.
///
/// A child process (this executable, run with `--recovery-child DIR`) fills a fresh directory, with
/// `--in-flight K` client tasks (default 256): `--entities E` accounts with one deposit each
/// (default 100,000), `--events N` runs each waiting for a pool activity that never answers in the
/// child (default 10,000: stored activity tasks), and `--param sleepers=S` runs asleep on an hour's
/// durable timer (default 10,000). Then it keeps depositing into the first 1,000 accounts, K at a
/// time, and reports every 1,000 acknowledgements; once it reports `--param kill-after=D` (default
/// 100,000; 3,000 with `--quick`) this process kills it, so the kill lands in the middle of a commit
/// or close to one, with the deposits' events in the journal's log (up to its window) for the open
/// to index again.
///
/// Measured here: the open (`EntityRuntime.init`: LMDB, the journal's index of the events still in
/// its log, the stored activity tasks queued again, the timer service started: `open_ms`), then each
/// waiting activity running again and each sleeper waking (the test clock is two hours on: every
/// timer fell due during the downtime). The latencies are those moments, counted from the start of
/// the open; the throughput is runs resumed a second, from the start of the open until every run
/// has ended. Checked: each waiting activity ran again exactly once, each with its own idempotency
/// key; every run ended with its expected output; every deposit acknowledged before the kill is in
/// the balances. The directory is in the page cache (it was just written), as after a crash of the
/// process alone; with `--param cold=true` the LMDB file is written back and dropped from this
/// machine's page cache before the open (`posix_fadvise(POSIX_FADV_DONTNEED)`), as after a reboot —
/// as far as this VM can tell: a hypervisor may still cache the disk under it.
///
/// Extra fields: `open_ms`, `tail_events` and `tail_entities` (what the open found still in the
/// log: ``Journal/OpenSummary``), `entities_registered`, `activities_rerun` and `last_rerun_ms`
/// (the last of them, from the start of the open), `sleepers_woken` and `last_wake_ms`,
/// `deposits_acknowledged` (the child's last report before it died) and `deposits_found` (in the
/// hot accounts' balances, at least as many), `data_mb` (the LMDB file), `cached_mb` (how much of
/// it was in the page cache at the open, by `mincore`), `child_setup_s`; durable; the 1-minute load
/// average at the start.
struct RecoveryScenario: BenchmarkScenario {
    static let name = "recovery"
    static let summary = "reopen after SIGKILL: open time, in-flight runs resumed"

    /// The child's sizes, from the same options as the scenario's.
    struct Sizes {
        var accounts: Int
        var runs: Int
        var sleepers: Int
        var clients: Int
        /// The deposits acknowledged after set-up before the child is killed.
        var killAfter: Int
        /// The accounts the child keeps depositing into until it is killed.
        var hot: Int { min(1_000, accounts) }

        init(_ options: ScenarioOptions) throws {
            accounts = max(1, options.value(\.entities, full: 100_000, quick: 2_000))
            runs = max(1, options.value(\.events, full: 10_000, quick: 200))
            sleepers = try options.extra("sleepers", full: 10_000, quick: 200)
            guard sleepers >= 0 else { throw BenchmarkFailure(message: "--param sleepers must be 0 or more") }
            clients = max(1, options.value(\.inFlight, full: 256, quick: 32))
            killAfter = max(1_000, try options.extra("kill-after", full: 100_000, quick: 3_000))
        }

        /// The command-line options that give the child these sizes.
        var arguments: [String] {
            ["--entities", "\(accounts)", "--events", "\(runs)", "--in-flight", "\(clients)", "--param", "sleepers=\(sleepers)"]
        }
    }

    /// The child's clock starts here; the reopened runtime's two hours later.
    static let epoch: UInt64 = 1_767_225_600_000_000_000
    static let sleepLength = Duration.seconds(3_600)

    static func configuration(directory: String, clock: TestClock, options: ScenarioOptions) throws -> EntityRuntime.Configuration {
        var configuration = try EntityBench.configuration(directory: directory, durability: .durable, snapshotEvery: 100,
                                                          maxResidentEntities: 20_000, shards: options.shards)
        configuration.clock = clock
        return configuration
    }

    func run(_ options: ScenarioOptions, _ recorder: LatencyRecorder) async throws -> ScenarioResult {
        let sizes = try Sizes(options)
        let cold = try options.extra("cold", full: false, quick: false)
        let load = EntityBench.loadAverage()
        let directory = try options.makeScratchDirectory("recovery")
        defer { directory.remove() }

        // The child fills the directory, reports, and is killed while it deposits.
        let setupStarted = ContinuousClock.Instant.now
        var arguments = ["--recovery-child", directory.path] + sizes.arguments
        if let shards = options.shards { arguments += ["--shards", "\(shards)"] }
        let child = try ChildProcess("Benchmarks", arguments: arguments)
        var acknowledged = 0
        var setup: Duration?
        while acknowledged < sizes.killAfter, let line = await child.readLine() {
            if line == "ready" { setup = .now - setupStarted }
            if let count = Self.acknowledged(line) { acknowledged = count }
        }
        child.kill()
        for line in await child.remainingLines() { acknowledged = max(acknowledged, Self.acknowledged(line) ?? 0) }
        guard let setup, acknowledged >= sizes.killAfter else {
            throw BenchmarkFailure(message: "the child ended before it was killed (exit status \(child.process.terminationStatus))")
        }
        let dataMB = Double((try? FileManager.default.attributesOfItem(atPath: directory.path + "/data.mdb")[.size] as? Int) ?? 0) / 1_048_576
        if cold { try PageCache.drop(directory.path + "/data.mdb") }
        let cachedMB = try PageCache.residentMB(directory.path + "/data.mdb")

        // Measured: the open, then every run resuming.
        let clock = TestClock(startNanoseconds: Self.epoch + UInt64(2 * Self.sleepLength.components.seconds) * 1_000_000_000,
                              skipsTimeWhenIdle: false)
        let configuration = try Self.configuration(directory: directory.path, clock: clock, options: options)
        recorder.start()
        let opening = ContinuousClock.Instant.now
        let reruns = Resumed(since: opening, recorder: recorder)
        let woken = Resumed(since: opening, recorder: recorder)
        let wakeUps = WakeUps(expected: sizes.sleepers, resident: { 0 }, each: { woken.add() })
        let runtime = try EntityRuntime(
            configuration: configuration, entityTypes: [BenchAccount.self, BenchHolder.self, BenchSleeper.self],
            activities: [BenchHold { input, context in
                reruns.add(context.idempotencyKey)
                return input
            }, BenchWoke(wakeUps: wakeUps)])
        let open = ContinuousClock.Instant.now - opening
        defer { runtime.close() }
        let found = runtime.journal.opened
        try await EntityBench.forEach(count: sizes.runs + sizes.sleepers, workers: sizes.clients) { index in
            let output: String, expected: String
            if index < sizes.runs {
                expected = BenchHolder.id(index)
                output = try await runtime.entity(BenchHolder.self, id: expected).result()
            } else {
                expected = BenchSleeper.id(index - sizes.runs)
                output = try await runtime.entity(BenchSleeper.self, id: expected).result()
            }
            guard output == expected else { throw BenchmarkFailure(message: "\(expected) ended with \(output)") }
        }
        recorder.stop()

        // Nothing ran twice, nothing acknowledged was lost.
        let keys = reruns.keys
        guard keys.count == sizes.runs, Set(keys).count == sizes.runs else {
            throw BenchmarkFailure(message: "\(keys.count) activity attempts with \(Set(keys).count) keys for \(sizes.runs) waiting runs")
        }
        guard wakeUps.count == sizes.sleepers else {
            throw BenchmarkFailure(message: "\(wakeUps.count) wake-ups for \(sizes.sleepers) sleepers")
        }
        let deposits = Mutex(0)
        try await EntityBench.forEach(count: sizes.hot, workers: sizes.clients) { index in
            let balance = try await runtime.entity(BenchAccount.self, id: EntityBench.id(index)).query { $0.balance }
            deposits.withLock { $0 += Int(balance) }
        }
        // Each hot account also had its set-up deposit.
        let depositsFound = deposits.withLock { $0 } - sizes.hot
        guard depositsFound >= acknowledged else {
            throw BenchmarkFailure(message: "\(acknowledged) deposits were acknowledged before the kill, \(depositsFound) are in the balances")
        }

        var extra: [String: JSONValue] = [
            "open_ms": .double(open.seconds * 1_000),
            "tail_events": .int(found.tailEvents),
            "tail_entities": .int(found.tailEntities),
            "entities_registered": .int(Int(found.entities)),
            "activities_rerun": .int(keys.count),
            "last_rerun_ms": .double(reruns.last.seconds * 1_000),
            "last_wake_ms": .double(woken.last.seconds * 1_000),
            "sleepers_woken": .int(wakeUps.count),
            "deposits_acknowledged": .int(acknowledged),
            "deposits_found": .int(depositsFound),
            "data_mb": .double(dataMB),
            "cached_mb": .double(cachedMB),
            "child_setup_s": .double(setup.seconds),
        ]
        if let load { extra["load_avg_1m"] = .double(load) }
        return ScenarioResult(
            operations: sizes.runs + sizes.sleepers,
            params: ["accounts": .int(sizes.accounts), "runs": .int(sizes.runs), "sleepers": .int(sizes.sleepers),
                     "in_flight": .int(sizes.clients), "kill_after": .int(sizes.killAfter), "shards": .int(configuration.shards), "durability": .string("durable"),
                     "cold": .bool(cold)],
            extra: extra)
    }

    /// The count in a child's `acked N` report.
    private static func acknowledged(_ line: String) -> Int? {
        guard line.hasPrefix("acked ") else { return nil }
        return Int(line.dropFirst(6))
    }

    // MARK: The child

    /// The child's work (`Benchmarks --recovery-child DIR …`): fills `directory`, says `ready`, then
    /// deposits until it is killed, saying `acked N` at every 1,000th acknowledgement. Returns only
    /// if nobody killed it within ten minutes (an error).
    static func child(directory: String, options: ScenarioOptions) async throws {
        let sizes = try Sizes(options)
        let clock = TestClock(startNanoseconds: epoch, skipsTimeWhenIdle: false)
        let runtime = try EntityRuntime(
            configuration: try configuration(directory: directory, clock: clock, options: options),
            entityTypes: [BenchAccount.self, BenchHolder.self, BenchSleeper.self],
            activities: [BenchHold { _, _ in
                try await Task.sleep(for: .seconds(86_400))  // never answers before the kill
                return "late"
            }, BenchWoke(wakeUps: WakeUps(expected: sizes.sleepers, resident: { 0 }))])
        try await EntityBench.forEach(count: sizes.accounts, workers: sizes.clients) { index in
            try await runtime.entity(BenchAccount.self, id: EntityBench.id(index)).signal(.deposit(1))
        }
        try await EntityBench.forEach(count: sizes.runs, workers: sizes.clients) { index in
            let id = BenchHolder.id(index)
            try await runtime.entity(BenchHolder.self, id: id).start(id)
        }
        try await EntityBench.forEach(count: sizes.sleepers, workers: sizes.clients) { index in
            try await runtime.entity(BenchSleeper.self, id: BenchSleeper.id(index)).start(sleepLength)
        }
        say("ready")
        let acknowledged = Atomic<Int>(0)
        let deadline = ContinuousClock.Instant.now + .seconds(600)
        try await EntityBench.forEach(count: Int.max, workers: sizes.clients) { index in
            guard ContinuousClock.Instant.now < deadline else { throw BenchmarkFailure(message: "the recovery child was not killed") }
            try await runtime.entity(BenchAccount.self, id: EntityBench.id(index % sizes.hot)).signal(.deposit(1))
            let count = acknowledged.wrappingAdd(1, ordering: .relaxed).newValue
            if count % 1_000 == 0 { say("acked \(count)") }
        }
    }

    /// Writes `line` to standard output at once (the parent reads it through a pipe).
    private static func say(_ line: String) {
        FileHandle.standardOutput.write(Data((line + "\n").utf8))
    }
}

/// Runs ``BenchHold`` and returns its output.
struct BenchHolder: EntityWorkflow {
    struct State: Codable, Sendable {}
    static let entityType = "BenchHolder"
    static func initialState(id: String) -> State { State() }
    static func run(_ input: String, context: WorkflowContext<Self>) async throws -> String {
        try await context.execute(BenchHold.self, input)
    }

    /// Run `index`'s id.
    static func id(_ index: Int) -> String { "h-\(index)" }
}

/// A pool activity whose attempt does what the process gives it: in the recovery child, wait until
/// the process is killed; after the reopen, note the attempt and answer.
struct BenchHold: Activity {
    let body: @Sendable (String, ActivityContext) async throws -> String
    init(_ body: @escaping @Sendable (String, ActivityContext) async throws -> String) { self.body = body }
    func run(_ input: String, context: ActivityContext) async throws -> String { try await body(input, context) }
}

/// Runs resuming after the open: each moment recorded since `start`, the last, and the keys given.
final class Resumed: Sendable {
    private let state = Mutex<(keys: [String], last: Duration)>(([], .zero))
    private let start: ContinuousClock.Instant
    private let recorder: LatencyRecorder

    init(since start: ContinuousClock.Instant, recorder: LatencyRecorder) {
        self.start = start
        self.recorder = recorder
    }

    func add(_ key: String? = nil) {
        let elapsed = ContinuousClock.Instant.now - start
        recorder.record(elapsed)
        state.withLock {
            if let key { $0.keys.append(key) }
            $0.last = max($0.last, elapsed)
        }
    }

    var keys: [String] { state.withLock { $0.keys } }
    var last: Duration { state.withLock { $0.last } }
}

/// A file's pages in this machine's page cache.
enum PageCache {
    /// Writes the file's dirty pages back, then asks the kernel to drop all of its pages from the
    /// page cache (`POSIX_FADV_DONTNEED`: no privileges needed; pages in use elsewhere may stay).
    static func drop(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw BenchmarkFailure(message: "cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard fdatasync(fd) == 0, posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0 else {
            throw BenchmarkFailure(message: "cannot drop \(path) from the page cache: \(String(cString: strerror(errno)))")
        }
    }

    /// How many MiB of the file are in the page cache (`mincore` over a read-only mapping of it).
    static func residentMB(_ path: String) throws -> Double {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw BenchmarkFailure(message: "cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var status = stat()
        guard fstat(fd, &status) == 0, status.st_size > 0 else { return 0 }
        let size = Int(status.st_size)
        guard let map = mmap(nil, size, PROT_READ, MAP_SHARED, fd, 0), map != MAP_FAILED else {
            throw BenchmarkFailure(message: "cannot map \(path): \(String(cString: strerror(errno)))")
        }
        defer { munmap(map, size) }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        var resident = [UInt8](repeating: 0, count: (size + page - 1) / page)
        guard mincore(map, size, &resident) == 0 else {
            throw BenchmarkFailure(message: "mincore failed on \(path): \(String(cString: strerror(errno)))")
        }
        return Double(resident.reduce(0) { $0 + Int($1 & 1) } * page) / 1_048_576
    }
}
