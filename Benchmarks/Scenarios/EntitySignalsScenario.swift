import DurableEntities

/// `entity-signals`: durable deposit signals through the entity runtime, the way users send them.
///
/// `--in-flight K` sender tasks (default 1,000), each looping `try await ref.signal(.deposit(1))`, send
/// `--events N` signals in all (default 1,000,000) to `--entities E` accounts (default 10,000). Sender
/// `s` sends to accounts `s`, `s + K`, `s + 2K`, … (mod E), so (with E a multiple of K, as by
/// default) each account hears from one sender and its signals arrive in order. Latency is
/// send-to-acknowledgement (the signal is durable when it returns). Set-up, not measured: every
/// account gets one signal first, so it is registered in the journal and resident.
///
/// Extra fields: the journal writer's figures for the measured region (`commits`,
/// `events_per_commit`, …), the process's CPU time per signal (`cpu_us_per_event`, all threads) and
/// cores kept busy (`cores_busy`), and the 1-minute load average at the start. `--param durability=relaxed`,
/// `--param snapshot-every=N`, `--param shards=N`, `--param max-per-turn=N`, `--param commit-window-us=N`
/// (``Journal/Configuration/commitWindow``; 0: commit as soon as anything is queued) and
/// `--param commit-linger-us=N` (``Journal/Configuration/commitLinger``, default 0) change the runtime;
/// `--param codec=raw` swaps JSON for ``BenchAccountRawCodec`` (an experiment: the runtime without codec costs).
struct EntitySignalsScenario: BenchmarkScenario {
    static let name = "entity-signals"
    static let summary = "durable signals: K sender tasks over E entities"

    func run(_ options: ScenarioOptions, _ recorder: LatencyRecorder) async throws -> ScenarioResult {
        let entityCount = max(1, options.value(\.entities, full: 10_000, quick: 2_000))
        let senders = max(1, options.value(\.inFlight, full: 1_000, quick: 500))
        let total = options.value(\.events, full: 1_000_000, quick: 20_000)
        let durability = try EntityBench.durability(options.extra("durability"), default: .durable)
        let snapshotEvery = try options.extra("snapshot-every", full: 100, quick: 100)
        let shards = try options.extra("shards", as: Int.self)
        let maxPerTurn = try options.extra("max-per-turn", as: Int.self)
        let codec = options.extra("codec") ?? "binary"
        let commitWindow = try options.extra("commit-window-us", as: Int.self)
        let commitLinger = try options.extra("commit-linger-us", as: Int.self)
        let load = EntityBench.loadAverage()

        let directory = try options.makeScratchDirectory("entity-signals")
        defer { directory.remove() }
        let configuration = try EntityBench.configuration(
            directory: directory.path, durability: durability, snapshotEvery: snapshotEvery,
            maxResidentEntities: max(100_000, entityCount * 2), shards: shards, maxMessagesPerTurn: maxPerTurn, codec: codec,
            commitWindowMicroseconds: commitWindow, commitLingerMicroseconds: commitLinger)
        let runtime = try EntityBench.open(configuration)
        defer { runtime.close() }
        let refs = (0..<entityCount).map { runtime.entity(BenchAccount.self, id: EntityBench.id($0)) }

        // Set-up: one signal per account (registers it, makes it resident).
        try await EntityBench.forEach(count: entityCount, workers: senders) { index in
            try await refs[index].signal(.deposit(1))
        }
        guard runtime.residentEntities >= entityCount else {
            throw BenchmarkFailure(message: "only \(runtime.residentEntities) of \(entityCount) accounts are resident after set-up")
        }

        let before = runtime.journal.statistics
        let cpuBefore = ProcessCPU.now()
        recorder.start()
        try await withThrowingTaskGroup(of: Void.self) { group in
            for sender in 0..<senders {
                let count = total / senders + (sender < total % senders ? 1 : 0)
                group.addTask {
                    // The shared recorder, not one histogram per task: 1,000 pre-sized per-task
                    // histograms cost ~250 MB and cache misses that showed in profiles.
                    for k in 0..<count {
                        let ref = refs[(sender + k * senders) % entityCount]
                        let start = ContinuousClock.Instant.now
                        try await ref.signal(.deposit(1))
                        recorder.record(since: start)
                    }
                }
            }
            try await group.waitForAll()
        }
        recorder.stop()
        let cpu = ProcessCPU.now() - cpuBefore
        let after = runtime.journal.statistics

        // Sanity: every signal is in the journal.
        var stored: UInt64 = 0
        for ref in refs {
            guard let key = try runtime.journal.key(for: ref.name) else {
                throw BenchmarkFailure(message: "\(ref.name) is not registered")
            }
            stored += try runtime.journal.latestSequence(of: key)
        }
        guard stored == UInt64(entityCount + total) else {
            throw BenchmarkFailure(message: "the journal holds \(stored) events, expected \(entityCount + total)")
        }

        let commits = after.commits - before.commits
        let perCommit = { (value: Int) -> JSONValue in .double(Double(value) / Double(max(1, commits))) }
        var extra: [String: JSONValue] = [
            "commits": .int(commits),
            "events_per_commit": .double(Double(total) / Double(max(1, commits))),
            "submissions_per_commit": perCommit(after.submissions - before.submissions),
            "operations_per_commit": perCommit(after.operations - before.operations),
            "build_ms_per_commit": .double((after.buildTime - before.buildTime).milliseconds / Double(max(1, commits))),
            "commit_ms_per_commit": .double((after.commitTime - before.commitTime).milliseconds / Double(max(1, commits))),
        ]
        extra["cpu_us_per_event"] = .double(cpu.seconds * 1e6 / Double(max(1, total)))
        if let wall = recorder.elapsed { extra["cores_busy"] = .double(cpu.seconds / wall.seconds) }
        if let load { extra["load_avg_1m"] = .double(load) }
        return ScenarioResult(
            operations: total,
            params: [
                "entities": .int(entityCount), "in_flight": .int(senders), "events": .int(total),
                "durability": .string("\(durability)"), "snapshot_every": .int(snapshotEvery),
                "shards": .int(configuration.shards), "max_per_turn": .int(configuration.maxMessagesPerTurn),
                "commit_window_us": .int(EntityBench.microseconds(configuration.journal.commitWindow)),
                "commit_linger_us": .int(EntityBench.microseconds(configuration.journal.commitLinger)),
                "codec": .string(codec),
            ],
            extra: extra)
    }
}
