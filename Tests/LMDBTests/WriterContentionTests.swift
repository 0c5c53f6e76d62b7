import Foundation
import LMDB
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A start line: every thread spins (yielding) until all have arrived, so that they contend.
final class StartLine: Sendable {
    private let arrived = Atomic<Int>(0)
    private let expected: Int
    init(_ expected: Int) { self.expected = expected }
    func arriveAndWait() {
        arrived.add(1, ordering: .acquiringAndReleasing)
        while arrived.load(ordering: .acquiring) < expected { sched_yield() }
    }
}

@Suite("Writers on several threads")
struct WriterContentionTests {
    static let counterKey = bytes("counter")

    /// One transaction: increments the counter (read-modify-write) and stores one value of its own.
    static func writeOne(_ environment: Environment, _ data: Database, writer: UInt32, index: UInt32, valueSize: Int) throws {
        try environment.write { txn throws in
            let current = try txn.value(forKey: counterKey, in: data).map(decodeBigEndian) ?? 0
            try txn.put(bigEndian(current + 1), forKey: counterKey, in: data)
            let n = writer << 16 | index
            try txn.put(pattern(n, count: valueSize), forKey: bigEndian(n), in: data)
        }
    }

    static func runWriters(
        _ environment: Environment, _ data: Database, writers: Int, transactions: Int, valueSize: Int
    ) async throws {
        let start = StartLine(writers)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for writer in 0..<writers {
                group.addTask {
                    try await ConcurrencyTests.onThread {
                        start.arriveAndWait()
                        for index in 0..<transactions {
                            try writeOne(environment, data, writer: UInt32(writer), index: UInt32(index), valueSize: valueSize)
                        }
                    }
                }
            }
            try await group.waitForAll()
        }
    }

    /// The counter and every writer's values, checked in one read transaction.
    static func verify(_ environment: Environment, _ data: Database, writers: Int, transactions: Int, valueSize: Int) throws -> (counter: UInt32?, count: Int, wrong: Int) {
        try environment.read { txn throws in
            var wrong = 0
            for writer in 0..<writers {
                for index in 0..<transactions {
                    let n = UInt32(writer) << 16 | UInt32(index)
                    if try txn.value(forKey: bigEndian(n), in: data) != pattern(n, count: valueSize) { wrong += 1 }
                }
            }
            return (try txn.value(forKey: counterKey, in: data).map(decodeBigEndian), try txn.count(data), wrong)
        }
    }

    @Test("write transactions from several threads are serialised: no lost update", .timeLimit(.minutes(10)))
    func noLostUpdates() async throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let environment = try Environment.open(scratch.configuration())
        defer { environment.close() }
        let data = try environment.database("data")
        try await Self.runWriters(environment, data, writers: 4, transactions: 200, valueSize: 100)
        let result = try Self.verify(environment, data, writers: 4, transactions: 200, valueSize: 100)
        #expect(result.counter == 800)
        #expect(result.count == 801)
        #expect(result.wrong == 0)
    }

    @Test("writers that fill the map together grow it, and none fails while the data fits in maxMapSize",
          .timeLimit(.minutes(10)), arguments: 0..<5)
    func contendedGrowthWithinMaximum(attempt: Int) async throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        // The first growth reaches maxMapSize at once (min(max, current + 64 MiB)); the data, ~200 KiB,
        // fits in it with room to spare.
        let environment = try Environment.open(scratch.configuration(mapSize: 64 << 10, maxMapSize: 1 << 20))
        defer { environment.close() }
        let data = try environment.database("data")
        try await Self.runWriters(environment, data, writers: 4, transactions: 50, valueSize: 1_000)
        let result = try Self.verify(environment, data, writers: 4, transactions: 50, valueSize: 1_000)
        #expect(result.counter == 200)
        #expect(result.wrong == 0)
        #expect(environment.mapSize == 1 << 20)
    }

    @Test("control: the same data written from one thread fits in the same maxMapSize after one growth")
    func singleWriterControl() async throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let environment = try Environment.open(scratch.configuration(mapSize: 64 << 10, maxMapSize: 1 << 20))
        defer { environment.close() }
        let data = try environment.database("data")
        try await Self.runWriters(environment, data, writers: 1, transactions: 200, valueSize: 1_000)
        let result = try Self.verify(environment, data, writers: 1, transactions: 200, valueSize: 1_000)
        #expect(result.counter == 200)
        #expect(result.wrong == 0)
        #expect(environment.mapGrowthCount == 1)
        #expect(environment.mapSize == 1 << 20)
    }

    @Test("writers that fill the map together grow it once when one growth is enough",
          .timeLimit(.minutes(10)), arguments: 0..<5)
    func contendedGrowthGrowsOnce(attempt: Int) async throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        // One growth takes 64 KiB to 64 MiB + 64 KiB, far more than the ~200 KiB written.
        let environment = try Environment.open(scratch.configuration(mapSize: 64 << 10))
        defer { environment.close() }
        let data = try environment.database("data")
        try await Self.runWriters(environment, data, writers: 4, transactions: 50, valueSize: 1_000)
        let result = try Self.verify(environment, data, writers: 4, transactions: 50, valueSize: 1_000)
        #expect(result.counter == 200)
        #expect(result.wrong == 0)
        #expect(environment.mapGrowthCount == 1, "map size now \(environment.mapSize)")
    }
}
