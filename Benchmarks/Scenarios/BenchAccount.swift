import DurableEntities
import Foundation
import LMDB
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The account the entity scenarios use: 104 bytes of state held inline (13 `Int64` fields, no heap
/// allocation, so a resident entity's state costs exactly its size), and one signal, a deposit.
struct BenchAccount: EntityWorkflow {
    struct State: Codable, Sendable, Equatable {
        var balance: Int64 = 0
        var deposits: Int64 = 0
        var lastAmount: Int64 = 0
        var overdraftLimit: Int64 = 0
        var dailyLimit: Int64 = 1_000_000
        var withdrawnToday: Int64 = 0
        var openedAtSeconds: Int64 = 1_700_000_000
        var branch: Int64 = 0
        var product: Int64 = 1
        var flags: Int64 = 0
        var interestBasisPoints: Int64 = 125
        var feesCharged: Int64 = 0
        var version: Int64 = 1
    }

    enum Signal: Codable, Sendable {
        case deposit(Int64)
    }

    static var entityType: String { "BenchAccount" }

    static func initialState(id: String) -> State {
        var state = State()
        state.branch = Int64(id.utf8.count)
        return state
    }

    static func handle(_ signal: Signal, state: inout State, context: EntityContext) throws {
        switch signal {
        case .deposit(let amount):
            state.balance += amount
            state.deposits += 1
            state.lastAmount = amount
        }
    }
}

/// Helpers shared by the entity scenarios (`entity-signals`, `entity-activate`, `replay`, `entity-memory`).
enum EntityBench {
    static let quietLogger = Logger(label: "bench", factory: { _ in SwiftLogNoOpLogHandler() })

    /// The entity id of account `index`: at most 15 UTF-8 bytes, so Swift keeps it inline (no heap).
    static func id(_ index: Int) -> String { "acc-\(index)" }

    /// A runtime configuration with the scenarios' common knobs. `noContinueAsNew` turns automatic
    /// continue-as-new off (it snapshots too, which would change a scenario's history layout).
    /// `codec` is `binary` (the runtime's default), `json` or `raw` (``BenchAccountRawCodec``).
    static func configuration(
        directory: String, durability: Environment.Durability, snapshotEvery: Int,
        maxResidentEntities: Int = 100_000, shards: Int? = nil, maxMessagesPerTurn: Int? = nil,
        noContinueAsNew: Bool = false, codec: String = "binary", commitWindowMicroseconds: Int? = nil,
        commitLingerMicroseconds: Int? = nil
    ) throws -> EntityRuntime.Configuration {
        var configuration = EntityRuntime.Configuration(
            directory: directory, durability: durability, snapshotEvery: snapshotEvery,
            maxResidentEntities: maxResidentEntities, logger: quietLogger)
        switch codec {
        case "binary": configuration.codec = BinaryEntityCodec()
        case "json": configuration.codec = JSONEntityCodec()
        case "raw": configuration.codec = BenchAccountRawCodec()
        default: throw BenchmarkFailure(message: "--param codec must be binary, json or raw")
        }
        if let shards { configuration.shards = shards }
        if let maxMessagesPerTurn { configuration.maxMessagesPerTurn = maxMessagesPerTurn }
        if let commitWindowMicroseconds {
            guard commitWindowMicroseconds >= 0 else { throw BenchmarkFailure(message: "--param commit-window-us must be 0 or more") }
            configuration.journal.commitWindow = .microseconds(commitWindowMicroseconds)
        }
        if let commitLingerMicroseconds {
            guard commitLingerMicroseconds >= 0 else { throw BenchmarkFailure(message: "--param commit-linger-us must be 0 or more") }
            configuration.journal.commitLinger = .microseconds(commitLingerMicroseconds)
        }
        if noContinueAsNew {
            // Automatic continue-as-new also snapshots; scenarios that need a known history layout turn it off.
            configuration.continueAsNewAfterEvents = 1 << 40
            configuration.continueAsNewAfterBytes = 1 << 50
        }
        return configuration
    }

    /// A duration in whole µs, for the JSON params (the commit window and linger).
    static func microseconds(_ duration: Duration) -> Int {
        let (seconds, attoseconds) = duration.components
        return Int(seconds) * 1_000_000 + Int(attoseconds / 1_000_000_000_000)
    }

    /// Opens a runtime with ``BenchAccount`` registered.
    static func open(_ configuration: EntityRuntime.Configuration) throws -> EntityRuntime {
        try EntityRuntime(configuration: configuration, entityTypes: [BenchAccount.self])
    }

    /// Runs `body(i)` for every `i` in `0..<count`, on `workers` tasks pulling indices from a shared counter.
    static func forEach(
        count: Int, workers: Int, _ body: @escaping @Sendable (Int) async throws -> Void
    ) async throws {
        let next = IndexCounter()
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<max(1, min(workers, count)) {
                group.addTask {
                    while true {
                        let index = next.take()
                        guard index < count else { return }
                        try await body(index)
                    }
                }
            }
            try await group.waitForAll()
        }
    }

    /// Sends `count` deposits of `amount` to one entity, all at once (so the entity's turns batch them).
    static func burst(_ ref: EntityRef<BenchAccount>, count: Int, amount: Int64 = 1) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<count { group.addTask { try await ref.signal(.deposit(amount)) } }
            try await group.waitForAll()
        }
    }

    /// The 1-minute load average from `/proc/loadavg` (what else was running), or `nil`.
    static func loadAverage() -> Double? {
        guard let text = try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8) else { return nil }
        return text.split(separator: " ").first.flatMap { Double($0) }
    }

    static func durability(_ text: String?, default fallback: Environment.Durability) throws -> Environment.Durability {
        guard let text else { return fallback }
        return try JournalAppendScenario.durability(text)
    }

    /// A `--param name=true|false` switch (absent: false).
    static func flag(_ text: String?, name: String) throws -> Bool {
        switch text {
        case nil, "false", "0", "no": return false
        case "true", "1", "yes": return true
        case let other?: throw BenchmarkFailure(message: "--param \(name) must be true or false (got \(other))")
        }
    }

    /// Percentile figures of a histogram in microseconds, for extra fields.
    static func microseconds(_ summary: LatencySummary, prefix: String) -> [String: JSONValue] {
        [
            "\(prefix)_p50_us": .double(Double(summary.p50) / 1e3),
            "\(prefix)_p90_us": .double(Double(summary.p90) / 1e3),
            "\(prefix)_p99_us": .double(Double(summary.p99) / 1e3),
        ]
    }
}

/// An experiment, selected with `--param codec=raw`: fixed-layout bytes for ``BenchAccount``'s signal
/// (8 bytes) and state (104 bytes), JSON for anything else. It shows what the runtime costs when
/// encoding and decoding cost next to nothing; the default binary codec is what users get.
struct BenchAccountRawCodec: EntityCodec {
    private let json = JSONEntityCodec()

    func encode<Value: Encodable>(_ value: Value) throws -> [UInt8] {
        if let signal = value as? BenchAccount.Signal {
            switch signal {
            case .deposit(let amount): return Self.bytes([amount])
            }
        }
        if let s = value as? BenchAccount.State {
            return Self.bytes([s.balance, s.deposits, s.lastAmount, s.overdraftLimit, s.dailyLimit, s.withdrawnToday,
                               s.openedAtSeconds, s.branch, s.product, s.flags, s.interestBasisPoints, s.feesCharged, s.version])
        }
        return try json.encode(value)
    }

    func decode<Value: Decodable>(_ type: Value.Type, from bytes: UnsafeRawBufferPointer) throws -> Value {
        if type == BenchAccount.Signal.self {
            let words = try Self.words(bytes, count: 1)
            return BenchAccount.Signal.deposit(words[0]) as! Value
        }
        if type == BenchAccount.State.self {
            let w = try Self.words(bytes, count: 13)
            let state = BenchAccount.State(
                balance: w[0], deposits: w[1], lastAmount: w[2], overdraftLimit: w[3], dailyLimit: w[4], withdrawnToday: w[5],
                openedAtSeconds: w[6], branch: w[7], product: w[8], flags: w[9], interestBasisPoints: w[10], feesCharged: w[11], version: w[12])
            return state as! Value
        }
        return try json.decode(type, from: bytes)
    }

    private static func bytes(_ words: [Int64]) -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(words.count * 8)
        for word in words { withUnsafeBytes(of: word.littleEndian) { out.append(contentsOf: $0) } }
        return out
    }

    private static func words(_ bytes: UnsafeRawBufferPointer, count: Int) throws -> [Int64] {
        guard bytes.count == count * 8 else { throw BenchmarkFailure(message: "raw codec: \(bytes.count) bytes, expected \(count * 8)") }
        return (0..<count).map { Int64(littleEndian: bytes.loadUnaligned(fromByteOffset: $0 * 8, as: Int64.self)) }
    }
}

/// A shared, lock-free index dispenser.
final class IndexCounter: Sendable {
    private let next = Atomic<Int>(0)
    func take() -> Int { next.wrappingAdd(1, ordering: .relaxed).oldValue }
}

/// CPU time the whole process used (user + system, all threads), from `getrusage`.
enum ProcessCPU {
    static func now() -> Duration {
        var usage = rusage()
        #if canImport(Glibc)
        let who = __rusage_who_t(RUSAGE_SELF.rawValue)
        #else
        let who = RUSAGE_SELF
        #endif
        guard getrusage(who, &usage) == 0 else { return .zero }
        func duration(_ t: timeval) -> Duration { .seconds(Int64(t.tv_sec)) + .microseconds(Int64(t.tv_usec)) }
        return duration(usage.ru_utime) + duration(usage.ru_stime)
    }
}

/// The process's resident memory, as `/proc/self/status` reports it.
enum ProcessMemory {
    struct Sample: Sendable {
        /// `VmRSS`, bytes.
        var rss: Int
        /// `RssAnon` (heap, stacks), bytes.
        var anonymous: Int
        /// `RssFile` (mapped files: the LMDB map, libraries), bytes.
        var file: Int
    }

    /// Returns freed heap to the system (`malloc_trim(0)`), then reads the counters.
    static func sample() -> Sample {
        trim()
        return Sample(rss: field("VmRSS") * 1024, anonymous: field("RssAnon") * 1024, file: field("RssFile") * 1024)
    }

    static func trim() {
        #if os(Linux)
        typealias MallocTrim = @convention(c) (Int) -> Int32
        guard let handle = dlopen(nil, RTLD_NOW) else { return }
        defer { dlclose(handle) }
        guard let symbol = dlsym(handle, "malloc_trim") else { return }
        _ = unsafeBitCast(symbol, to: MallocTrim.self)(0)
        #endif
    }

    private static func field(_ name: String) -> Int {
        guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return 0 }
        for line in status.split(separator: "\n") where line.hasPrefix(name + ":") {
            return Int(line.dropFirst(name.count + 1).filter(\.isNumber)) ?? 0
        }
        return 0
    }
}
