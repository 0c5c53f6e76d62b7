import Foundation
import LMDB
import Synchronization
import Testing

@Suite("Map growth")
struct MapGrowthTests {
    static let kib = 1 << 10
    static let mib = 1 << 20

    @Test("LMDB accepts a 64 KiB initial map")
    func smallInitialMap() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let environment = try Environment.open(scratch.configuration(mapSize: 64 * Self.kib))
        defer { environment.close() }
        #expect(environment.mapSize == 64 * Self.kib)
        #expect(environment.mapGrowthCount == 0)
        let data = try environment.database("data")
        try environment.write { txn in try txn.put(bytes("v"), forKey: bytes("k"), in: data) }
        #expect(environment.mapGrowthCount == 0)
    }

    @Test("writing ~5 MiB into a 64 KiB map grows it; everything stays readable, also after reopening")
    func growsFromSmallMap() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let configuration = scratch.configuration(mapSize: 64 * Self.kib)
        let environment = try Environment.open(configuration)
        let data = try environment.database("data")
        let transactions: UInt32 = 20
        let perTransaction: UInt32 = 64
        let valueSize = 4 * Self.kib  // 20 * 64 * 4 KiB = 5 MiB
        for t in 0..<transactions {
            try environment.write { txn throws in
                for i in 0..<perTransaction {
                    let n = t * perTransaction + i
                    try txn.put(pattern(n, count: valueSize), forKey: bigEndian(n), in: data)
                }
            }
        }
        #expect(environment.mapGrowthCount > 0)
        #expect(environment.mapSize > 5 * Self.mib)
        let total = transactions * perTransaction
        let mismatches = try environment.read { txn throws in
            try (0..<total).filter { n in try txn.value(forKey: bigEndian(n), in: data) != pattern(n, count: valueSize) }
        }
        #expect(mismatches.isEmpty)
        #expect(try environment.read { try $0.count(data) } == Int(total))
        environment.close()

        // Reopened with the same small configured size, LMDB takes the size the file needs.
        let reopened = try Environment.open(configuration)
        defer { reopened.close() }
        #expect(reopened.mapSize > 5 * Self.mib)
        let again = try reopened.database("data", create: false)
        #expect(try reopened.read { try $0.count(again) } == Int(total))
        #expect(try reopened.read { try $0.value(forKey: bigEndian(total - 1), in: again) } == pattern(total - 1, count: valueSize))
    }

    @Test("a single transaction larger than the map grows it and runs the body again from the start")
    func bodyRerunsAfterGrowth() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let environment = try Environment.open(scratch.configuration(mapSize: 64 * Self.kib))
        defer { environment.close() }
        let data = try environment.database("data")
        var runs = 0
        try environment.write { txn throws in
            runs += 1
            for n in UInt32(0)..<256 { try txn.put(pattern(n, count: 4 * Self.kib), forKey: bigEndian(n), in: data) }
        }
        #expect(runs == 2)
        #expect(environment.mapGrowthCount == 1)
        #expect(try environment.read { try $0.count(data) } == 256)
    }

    @Test("a write beyond maxMapSize throws mapFull; earlier data is intact and small writes still work")
    func maxMapSizeStopsGrowth() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let maxMapSize = 256 * Self.kib
        let environment = try Environment.open(scratch.configuration(mapSize: 64 * Self.kib, maxMapSize: maxMapSize))
        defer { environment.close() }
        let data = try environment.database("data")
        // Fits after growing to maxMapSize: 25 values of one overflow page each (~100 KiB).
        let small = 3_000
        for t in UInt32(0)..<5 {
            try environment.write { txn throws in
                for i in UInt32(0)..<5 {
                    let n = t * 5 + i
                    try txn.put(pattern(n, count: small), forKey: bigEndian(n), in: data)
                }
            }
        }
        #expect(environment.mapSize <= maxMapSize)

        let error = try #require(throws: LMDBError.self) {
            try environment.write { txn throws in
                for n in UInt32(1_000)..<1_256 { try txn.put(pattern(n, count: 4 * Self.kib), forKey: bigEndian(n), in: data) }
            }
        }
        #expect(error.code == .mapFull)
        #expect(error.returnCode == -30792)  // MDB_MAP_FULL
        #expect(error.path == environment.path)
        #expect(error.operation.contains("mdb_"))
        #expect(environment.mapSize == maxMapSize)
        #expect(environment.mapGrowthCount >= 1)

        try environment.read { txn throws in
            #expect(try txn.count(data) == 25)
            for n in UInt32(0)..<25 { #expect(try txn.value(forKey: bigEndian(n), in: data) == pattern(n, count: small)) }
            #expect(try txn.value(forKey: bigEndian(1_000), in: data) == nil)
        }
        try environment.write { txn in try txn.put(bytes("small"), forKey: bytes("after"), in: data) }
        #expect(try environment.read { try $0.value(forKey: bytes("after"), in: data) } == bytes("small"))
    }
}
