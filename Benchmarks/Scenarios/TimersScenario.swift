import DurableEntities
import DurableEntitiesTesting
import Foundation
import Synchronization

/// `timers`: many entities asleep on durable timers, then all of them falling due at once (a long
/// downtime's backlog, or a deadline shared by many).
///
/// `--events N` sleepers (default 200,000), started by `--in-flight K` client tasks (default 256),
/// in a runtime whose resident set is bounded by `--param max-resident=R` (default 10,000) and whose
/// journal keeps `--param recent-records-mb=M` MiB of recent records (default 32; 0 for none). Each
/// sleeper's run body sleeps for an hour on a ``TestClock`` and, woken, reports through a local
/// activity. Measured (throughput and latency): the `start` calls; each records the sleeper's
/// `started` and its timer. Then the clock jumps two hours ahead and every timer falls due.
///
/// Extra fields: `asleep_heap_mb`, `asleep_mapped_mb` and `asleep_resident` (the process's own
/// memory, its resident pages of LMDB's map, and the resident entities once all are asleep: timers
/// are rows on disk, the entities passivate), `pending_timers` (read back from the journal), `fire_s`
/// and `fire_per_s` (from the jump to the last wake-up), `firing_resident_max` (resident entities
/// while the backlog fires, sampled every 1,000 wake-ups), `fired_heap_mb` and `fired_mapped_mb`
/// (after the last wake-up), and `timers_left` after every run has ended (0). Durable; the 1-minute
/// load average at the start. The harness's peak RSS counts LMDB's resident pages too.
struct TimersScenario: BenchmarkScenario {
    static let name = "timers"
    static let summary = "N entities asleep on durable timers, then all falling due at once"

    func run(_ options: ScenarioOptions, _ recorder: LatencyRecorder) async throws -> ScenarioResult {
        let sleepers = max(1, options.value(\.events, full: 200_000, quick: 2_000))
        let clients = max(1, options.value(\.inFlight, full: 256, quick: 64))
        let maxResident = try options.extra("max-resident", full: 10_000, quick: 1_000)
        guard maxResident > 0 else { throw BenchmarkFailure(message: "--param max-resident must be positive") }
        let recentRecordsMiB = try options.extra("recent-records-mb", as: Int.self)
        if let recentRecordsMiB, recentRecordsMiB < 0 { throw BenchmarkFailure(message: "--param recent-records-mb must be 0 or more") }
        let load = EntityBench.loadAverage()

        let directory = try options.makeScratchDirectory("timers")
        defer { directory.remove() }
        let clock = TestClock(skipsTimeWhenIdle: false)
        var configuration = try EntityBench.configuration(directory: directory.path, durability: .durable, snapshotEvery: 100,
                                                          maxResidentEntities: maxResident, shards: options.shards)
        configuration.clock = clock
        if let recentRecordsMiB { configuration.journal.recentRecordBytes = recentRecordsMiB << 20 }
        let runtime = try EntityRuntime(configuration: configuration, entityTypes: [BenchSleeper.self])
        defer { runtime.close() }
        // Registered once the runtime is there to ask for its resident entities (nothing wakes before).
        let wakeUps = WakeUps(expected: sleepers) { [weak runtime] in runtime?.residentEntities ?? 0 }
        runtime.register(activity: BenchWoke(wakeUps: wakeUps))

        // Measured: every sleeper starts (its run body reaches its sleep; the timer is durable).
        recorder.start()
        try await EntityBench.forEach(count: sleepers, workers: clients) { index in
            let start = ContinuousClock.Instant.now
            try await runtime.entity(BenchSleeper.self, id: BenchSleeper.id(index)).start(.seconds(3_600))
            recorder.record(since: start)
        }
        recorder.stop()
        let asleepRSS = PeakMemory.current()
        let asleepResident = runtime.residentEntities
        let pending = try runtime.journal.timers().count
        guard pending == sleepers else { throw BenchmarkFailure(message: "\(pending) timers pending, expected \(sleepers)") }

        // Every timer falls due at once.
        let jumped = ContinuousClock.Instant.now
        clock.advance(by: .seconds(2 * 3_600))
        await wakeUps.all()
        let fire = ContinuousClock.Instant.now - jumped
        let firingRSS = PeakMemory.current()

        // Every run ended with its wake-up, and its timer is gone.
        try await EntityBench.forEach(count: sleepers, workers: clients) { index in
            let id = BenchSleeper.id(index)
            let outcome = try await runtime.entity(BenchSleeper.self, id: id).result()
            guard outcome == id else { throw BenchmarkFailure(message: "\(id) ended with \(outcome)") }
        }
        let left = try runtime.journal.timers().count
        guard wakeUps.count == sleepers else { throw BenchmarkFailure(message: "\(wakeUps.count) wake-ups for \(sleepers) sleepers") }

        var extra: [String: JSONValue] = [
            "asleep_resident": .int(asleepResident),
            "pending_timers": .int(pending),
            "fire_s": .double(fire.seconds),
            "fire_per_s": .double(Double(sleepers) / fire.seconds),
            "firing_resident_max": .int(wakeUps.mostResident),
            "timers_left": .int(left),
        ]
        if let asleepRSS {
            extra["asleep_heap_mb"] = .double(asleepRSS.anonymous)
            extra["asleep_mapped_mb"] = .double(asleepRSS.mapped)
        }
        if let firingRSS {
            extra["fired_heap_mb"] = .double(firingRSS.anonymous)
            extra["fired_mapped_mb"] = .double(firingRSS.mapped)
        }
        if let load { extra["load_avg_1m"] = .double(load) }
        return ScenarioResult(
            operations: sleepers,
            params: ["sleepers": .int(sleepers), "in_flight": .int(clients), "max_resident": .int(maxResident),
                     "shards": .int(configuration.shards), "durability": .string("durable")],
            extra: extra)
    }
}

/// Sleeps for its input on the runtime's clock, then reports through ``BenchWoke``; returns its id.
struct BenchSleeper: EntityWorkflow {
    struct State: Codable, Sendable {}
    static let entityType = "BenchSleeper"
    static func initialState(id: String) -> State { State() }
    static func run(_ input: Duration, context: WorkflowContext<Self>) async throws -> String {
        try await context.sleep(for: input)
        return try await context.executeLocal(BenchWoke.self, context.id)
    }

    /// Sleeper `index`'s id: short enough for Swift to keep inline.
    static func id(_ index: Int) -> String { "z-\(index)" }
}

/// Counts a sleeper's wake-up; returns the sleeper's id.
struct BenchWoke: Activity {
    let wakeUps: WakeUps
    func run(_ input: String, context: ActivityContext) async throws -> String {
        wakeUps.add()
        return input
    }
}

/// Wake-ups so far; ``all()`` returns once every sleeper has woken.
final class WakeUps: Sendable {
    private struct State {
        var count = 0
        var mostResident = 0
        var waiter: CheckedContinuation<Void, Never>?
    }
    private let state = Mutex(State())
    private let expected: Int
    /// Reads the resident entities (sampled every 1,000 wake-ups).
    private let resident: @Sendable () -> Int
    /// Called at each wake-up.
    private let each: (@Sendable () -> Void)?

    init(expected: Int, resident: @escaping @Sendable () -> Int, each: (@Sendable () -> Void)? = nil) {
        self.expected = expected
        self.resident = resident
        self.each = each
    }

    var count: Int { state.withLock { $0.count } }
    var mostResident: Int { state.withLock { $0.mostResident } }

    func add() {
        each?()
        let (waiter, samples) = state.withLock { state -> (CheckedContinuation<Void, Never>?, Bool) in
            state.count += 1
            return (state.count == expected ? state.waiter.take() : nil, state.count % 1_000 == 0)
        }
        if samples {
            let now = resident()
            state.withLock { $0.mostResident = max($0.mostResident, now) }
        }
        waiter?.resume()
    }

    func all() async {
        await withCheckedContinuation { continuation in
            let done = state.withLock { state -> Bool in
                if state.count >= expected { return true }
                state.waiter = continuation
                return false
            }
            if done { continuation.resume() }
        }
    }
}
