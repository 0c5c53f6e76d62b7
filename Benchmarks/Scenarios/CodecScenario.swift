import DurableEntities

#if canImport(Glibc)
import Glibc
#endif

/// `codec`: encode and decode throughput of ``JSONEntityCodec`` and ``BinaryEntityCodec`` on the two
/// small messages the entity scenarios use: ``BenchAccount``'s signal (an enum, one `Int64` associated
/// value) and its state (a struct of 13 `Int64`s).
///
/// Single-threaded, through `any EntityCodec` as the runtime calls it. Each of the eight
/// (codec, message, direction) measurements runs for `--param millis=T` milliseconds (default 300,
/// quick 40) in batches of 256 operations, `--param rounds=R` times (default 3, quick 1); the round
/// with the best CPU-time rate counts. `--param codecs=binary` (or `json`) measures one codec only,
/// and `--param only=decode_signal` (or `encode_signal`, `encode_state`, `decode_state`) one
/// measurement only (the others run one batch), e.g. under a profiler.
///
/// The headline throughput is the binary codec decoding signals (replay's inner loop), per wall
/// second. Every figure is an extra field: `{json,binary}_{encode,decode}_{signal,state}_ops_per_s`
/// (per wall second) and `..._ops_per_cpu_s` (per second of the measuring thread's CPU time, which
/// other processes on the machine disturb much less); the speed-ups `speedup_{encode,decode}_{signal,state}`
/// (binary over JSON, from the CPU-time rates); and the encoded sizes `{json,binary}_{signal,state}_bytes`.
/// No latency percentiles: one operation is far below the clock's resolution.
struct CodecScenario: BenchmarkScenario {
    static let name = "codec"
    static let summary = "encode/decode ops/s, JSON vs binary codec, small messages"

    func run(_ options: ScenarioOptions, _ recorder: LatencyRecorder) async throws -> ScenarioResult {
        let millis = max(1, try options.extra("millis", full: 300, quick: 40))
        let rounds = max(1, try options.extra("rounds", full: 3, quick: 1))
        let load = EntityBench.loadAverage()
        let budget = Duration.milliseconds(millis)

        let signal = BenchAccount.Signal.deposit(1_234)
        var state = BenchAccount.initialState(id: "acc-42")
        state.balance = 98_765_432
        state.deposits = 4_321
        state.lastAmount = 1_234

        let selected = (options.extra("codecs") ?? "json,binary").split(separator: ",").map(String.init)
        let codecs: [(name: String, codec: any EntityCodec)] = [("json", JSONEntityCodec()), ("binary", BinaryEntityCodec())]
            .filter { selected.contains($0.name) }
        guard !codecs.isEmpty else { throw ScenarioOptionsError(message: "--param codecs: expected json, binary or json,binary") }
        let measures = ["encode_signal", "decode_signal", "encode_state", "decode_state"]
        let only = options.extra("only")
        guard only == nil || measures.contains(only ?? "") else {
            throw ScenarioOptionsError(message: "--param only: expected one of \(measures.joined(separator: ", "))")
        }
        let noBudget = Duration.zero
        var extra: [String: JSONValue] = [:]
        var headline: (operations: Int, wall: Duration) = (0, .zero)  // binary signal decoding, else JSON's
        for (name, codec) in codecs {
            let signalBytes = try codec.encode(signal)
            let stateBytes = try codec.encode(state)
            // Both codecs must read back what they wrote before anything is timed.
            guard case .deposit(1_234) = try signalBytes.withUnsafeBytes({ try codec.decode(BenchAccount.Signal.self, from: $0) }),
                  try stateBytes.withUnsafeBytes({ try codec.decode(BenchAccount.State.self, from: $0) }) == state
            else { throw BenchmarkFailure(message: "\(name) codec: round trip changed the value") }
            extra["\(name)_signal_bytes"] = .int(signalBytes.count)
            extra["\(name)_state_bytes"] = .int(stateBytes.count)

            let encodeSignal = try Self.best(rounds, only == nil || only == "encode_signal" ? budget : noBudget) { count in
                var sink = 0
                for _ in 0..<count { sink &+= try codec.encode(signal).count }
                return sink
            }
            let decodeSignal = try Self.best(rounds, only == nil || only == "decode_signal" ? budget : noBudget) { count in
                var sink = 0
                try signalBytes.withUnsafeBytes { bytes in
                    for _ in 0..<count {
                        if case .deposit(let amount) = try codec.decode(BenchAccount.Signal.self, from: bytes) { sink &+= Int(amount) }
                    }
                }
                return sink
            }
            let encodeState = try Self.best(rounds, only == nil || only == "encode_state" ? budget : noBudget) { count in
                var sink = 0
                for _ in 0..<count { sink &+= try codec.encode(state).count }
                return sink
            }
            let decodeState = try Self.best(rounds, only == nil || only == "decode_state" ? budget : noBudget) { count in
                var sink = 0
                try stateBytes.withUnsafeBytes { bytes in
                    for _ in 0..<count { sink &+= Int(try codec.decode(BenchAccount.State.self, from: bytes).balance) }
                }
                return sink
            }
            for (measure, figures) in [("encode_signal", encodeSignal), ("decode_signal", decodeSignal),
                                       ("encode_state", encodeState), ("decode_state", decodeState)] {
                extra["\(name)_\(measure)_ops_per_s"] = .double(figures.rate)
                extra["\(name)_\(measure)_ops_per_cpu_s"] = .double(figures.cpuRate)
            }
            if name == "binary" || headline.operations == 0 { headline = (decodeSignal.operations, decodeSignal.wall) }
        }
        for measure in ["encode_signal", "decode_signal", "encode_state", "decode_state"] {
            if case .double(let json) = extra["json_\(measure)_ops_per_cpu_s"], case .double(let binary) = extra["binary_\(measure)_ops_per_cpu_s"], json > 0 {
                extra["speedup_\(measure)"] = .double((binary / json * 100).rounded() / 100)
            }
        }
        if let load { extra["load_avg_1m"] = .double(load) }
        return ScenarioResult(
            operations: headline.operations, wall: headline.wall,
            params: ["millis": .int(millis), "rounds": .int(rounds), "codecs": .string(codecs.map(\.name).joined(separator: ","))],
            extra: extra)
    }

    /// The best of `rounds` timed runs of `body`, each repeating batches of 256 operations until
    /// `budget` has passed (after one untimed warm-up batch): operations per wall second, and per
    /// second of this thread's CPU time (steadier when other processes share the cores).
    private static func best(
        _ rounds: Int, _ budget: Duration, _ body: (Int) throws -> Int
    ) throws -> (rate: Double, cpuRate: Double, operations: Int, wall: Duration) {
        let batch = 256
        var sink = try body(batch)
        var best: (rate: Double, cpuRate: Double, operations: Int, wall: Duration) = (0, 0, 0, .zero)
        for _ in 0..<rounds {
            var operations = 0
            let start = ContinuousClock.Instant.now
            let cpuStart = threadCPUSeconds()
            var elapsed = Duration.zero
            repeat {
                sink &+= try body(batch)
                operations += batch
                elapsed = ContinuousClock.Instant.now - start
            } while elapsed < budget
            let cpu = threadCPUSeconds() - cpuStart
            let rate = Double(operations) / elapsed.seconds
            let cpuRate = cpu > 0 ? Double(operations) / cpu : rate
            if cpuRate > best.cpuRate { best = (rate, cpuRate, operations, elapsed) }
        }
        if sink == 42 { print("", terminator: "") }  // keeps `sink`, and so the work, alive
        return best
    }

    /// CPU time of the calling thread. The measured loops never suspend, so they stay on one thread.
    private static func threadCPUSeconds() -> Double {
        var now = timespec()
        guard clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now) == 0 else { return 0 }
        return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
    }
}
