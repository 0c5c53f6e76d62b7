import DurableEntities

/// `replay`: full replay of one entity's history through the runtime, as a cold activation does it.
///
/// Set-up, not measured: one account receives `--events N` deposits (default 10,000) in a runtime
/// whose `snapshotEvery` is larger than N, so it has no snapshot. Then, `--param replays=R` times
/// (default 20): reopen the runtime (nothing resident; the reopen is not measured) and time the
/// first `query`, which loads the entity by replaying all N events through its signal handler.
///
/// Throughput is replayed events/s over the summed query times; latency is per full replay. Extra
/// fields: the same history scanned by the journal alone (`journal_scan_events_per_s`, no decoding),
/// and the signal payloads decoded by the runtime's codec alone (`codec_decode_events_per_s`), to
/// separate storage, decoding and the rest. `--param codec=raw` swaps JSON for ``BenchAccountRawCodec``
/// (an experiment: replay without codec costs).
struct ReplayScenario: BenchmarkScenario {
    static let name = "replay"
    static let summary = "activation by full replay of one entity's N events"

    func run(_ options: ScenarioOptions, _ recorder: LatencyRecorder) async throws -> ScenarioResult {
        let eventCount = max(1, options.value(\.events, full: 10_000, quick: 2_000))
        let replays = max(1, try options.extra("replays", full: 20, quick: 5))
        let codecName = options.extra("codec") ?? "binary"
        let load = EntityBench.loadAverage()

        let directory = try options.makeScratchDirectory("replay")
        defer { directory.remove() }
        let configuration = try EntityBench.configuration(
            directory: directory.path, durability: .relaxed, snapshotEvery: 1 << 40, noContinueAsNew: true, codec: codecName)
        let id = "replayed"

        // Set-up: N deposits from 256 senders (turns take up to 256 each).
        do {
            let runtime = try EntityBench.open(configuration)
            defer { runtime.close() }
            let ref = runtime.entity(BenchAccount.self, id: id)
            try await EntityBench.forEach(count: eventCount, workers: 256) { _ in try await ref.signal(.deposit(1)) }
        }

        var measured = Duration.zero
        var payloads: [[UInt8]] = []
        for round in 0..<replays {
            let runtime = try EntityBench.open(configuration)
            defer { runtime.close() }
            let ref = runtime.entity(BenchAccount.self, id: id)
            let start = ContinuousClock.Instant.now
            let balance = try await ref.query { $0.balance }
            let elapsed = ContinuousClock.Instant.now - start
            recorder.record(elapsed)
            measured += elapsed
            guard balance == Int64(eventCount) else { throw BenchmarkFailure(message: "balance \(balance) after replay, expected \(eventCount)") }
            if round == 0 {
                guard let key = try runtime.journal.key(for: ref.name) else { throw BenchmarkFailure(message: "the entity is not registered") }
                if let snapshot = try runtime.journal.snapshot(of: key) {
                    throw BenchmarkFailure(message: "the entity has a snapshot at \(snapshot.sequence): activation would not replay everything")
                }
                payloads = try runtime.journal.events(of: key).map(\.payload)
                guard payloads.count == eventCount else { throw BenchmarkFailure(message: "\(payloads.count) events stored, expected \(eventCount)") }
            }
        }

        // The parts alone: journal scan (no decoding), and codec decoding of the signal bodies.
        var extra: [String: JSONValue] = [:]
        do {
            let runtime = try EntityBench.open(configuration)
            defer { runtime.close() }
            guard let key = try runtime.journal.key(for: EntityName(type: BenchAccount.entityType, id: id)) else {
                throw BenchmarkFailure(message: "the entity is not registered")
            }
            var checksum = 0
            let scanStart = ContinuousClock.Instant.now
            for _ in 0..<replays {
                try runtime.journal.forEachEvent(of: key) { _, payload in checksum &+= payload.count }
            }
            extra["journal_scan_events_per_s"] = .double(Double(replays * eventCount) / (ContinuousClock.Instant.now - scanStart).seconds)
            // Event layout: kind (1), time (8), key length (2), key, body = the encoded signal.
            let bodies = payloads.map { payload -> [UInt8] in
                let keyLength = Int(payload[9]) << 8 | Int(payload[10])
                return Array(payload[(11 + keyLength)...])
            }
            let codec = configuration.codec
            var total: Int64 = 0
            let decodeStart = ContinuousClock.Instant.now
            for body in bodies {
                let signal = try body.withUnsafeBytes { try codec.decode(BenchAccount.Signal.self, from: $0) }
                if case .deposit(let amount) = signal { total += amount }
            }
            extra["codec_decode_events_per_s"] = .double(Double(bodies.count) / (ContinuousClock.Instant.now - decodeStart).seconds)
            precondition(checksum > 0 && total == Int64(eventCount))
            extra["event_bytes"] = .double(Double(payloads.reduce(0) { $0 + $1.count }) / Double(payloads.count))
        }
        if let load { extra["load_avg_1m"] = .double(load) }
        return ScenarioResult(
            operations: replays * eventCount, wall: measured,
            params: ["events": .int(eventCount), "replays": .int(replays), "codec": .string(codecName)],
            extra: extra)
    }
}
