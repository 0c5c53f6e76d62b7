import Foundation
import LMDB
import Testing

@Suite("Cursors")
struct CursorTests {
    /// Keys whose byte order differs from their insertion order and whose little-endian order would differ.
    static let numbers: [UInt32] = [1, 2, 10, 255, 256, 4_096, 65_536, 1 << 24, UInt32.max]

    /// Opens an environment with `numbers` stored (shuffled) under big-endian keys, value = "v<n>".
    private static func filled(_ scratch: ScratchDirectory) throws -> (Environment, Database) {
        let environment = try Environment.open(scratch.configuration())
        let data = try environment.database("data")
        try environment.write { txn throws in
            for n in numbers.shuffled() { try txn.put(bytes("v\(n)"), forKey: bigEndian(n), in: data) }
        }
        return (environment, data)
    }

    private static func number(_ entry: Cursor.Entry?) -> UInt32? {
        entry.map { decodeBigEndian($0.key) }
    }

    @Test("first/next walks big-endian keys in numeric order; last/previous walks back")
    func ordering() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let (environment, data) = try Self.filled(scratch)
        defer { environment.close() }
        let (forward, backward, values) = try environment.read { txn throws in
            try txn.withCursor(data) { cursor in
                var forward: [UInt32] = []
                var values: [[UInt8]] = []
                var entry = try cursor.first()
                while let current = entry {
                    forward.append(decodeBigEndian(current.key))
                    values.append(Array(current.value))
                    entry = try cursor.next()
                }
                var backward: [UInt32] = []
                entry = try cursor.last()
                while let current = entry {
                    backward.append(decodeBigEndian(current.key))
                    entry = try cursor.previous()
                }
                return (forward, backward, values)
            }
        }
        #expect(forward == Self.numbers)
        #expect(backward == Self.numbers.reversed())
        #expect(values == Self.numbers.map { bytes("v\($0)") })
    }

    @Test("previous at the first entry and next at the last return nil")
    func endsReturnNil() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let (environment, data) = try Self.filled(scratch)
        defer { environment.close() }
        let result = try environment.read { txn throws in
            try txn.withCursor(data) { cursor in
                let first = Self.number(try cursor.first())
                let beforeFirst = Self.number(try cursor.previous())
                let last = Self.number(try cursor.last())
                let afterLast = Self.number(try cursor.next())
                return [first, beforeFirst, last, afterLast]
            }
        }
        #expect(result == [1, nil, UInt32.max, nil])
    }

    @Test("an empty database: every move returns nil")
    func emptyDatabase() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let environment = try Environment.open(scratch.configuration())
        defer { environment.close() }
        let data = try environment.database("data")
        let result = try environment.read { txn throws in
            try txn.withCursor(data) { cursor in
                [try cursor.first(), try cursor.last(), try cursor.seek(atLeast: bigEndian(5)), try cursor.seek(below: bigEndian(5))]
                    .map { $0 == nil }
            }
        }
        #expect(result == [true, true, true, true])
    }

    @Test("seek(atLeast:) finds the key itself or the next greater; nil past the last",
          arguments: [(UInt32(0), UInt32?.some(1)), (1, 1), (3, 10), (255, 255), (257, 4_096),
                      (65_537, 1 << 24), (UInt32.max, UInt32.max)])
    func seekAtLeast(target: UInt32, expected: UInt32?) throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let (environment, data) = try Self.filled(scratch)
        defer { environment.close() }
        let found = try environment.read { txn throws in
            try txn.withCursor(data) { cursor in Self.number(try cursor.seek(atLeast: bigEndian(target))) }
        }
        #expect(found == expected)
    }

    @Test("seek(atLeast:) past every key returns nil")
    func seekAtLeastPastEnd() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let (environment, data) = try Self.filled(scratch)
        defer { environment.close() }
        // A five-byte key sorts after every four-byte key with the same first four bytes.
        let found = try environment.read { txn throws in
            try txn.withCursor(data) { cursor in Self.number(try cursor.seek(atLeast: bigEndian(UInt32.max) + [0])) }
        }
        #expect(found == nil)
    }

    @Test("seek(below:) finds the last key strictly below; nil below the first",
          arguments: [(UInt32(0), UInt32?.none), (1, nil), (2, 1), (3, 2), (10, 2), (11, 10),
                      (65_536, 4_096), (UInt32.max, 1 << 24)])
    func seekBelow(target: UInt32, expected: UInt32?) throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let (environment, data) = try Self.filled(scratch)
        defer { environment.close() }
        let found = try environment.read { txn throws in
            try txn.withCursor(data) { cursor in Self.number(try cursor.seek(below: bigEndian(target))) }
        }
        #expect(found == expected)
    }

    @Test("seek(below:) past every key returns the last entry")
    func seekBelowPastEnd() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let (environment, data) = try Self.filled(scratch)
        defer { environment.close() }
        let found = try environment.read { txn throws in
            try txn.withCursor(data) { cursor in Self.number(try cursor.seek(below: bigEndian(UInt32.max) + [0])) }
        }
        #expect(found == UInt32.max)
    }

    @Test("deleteCurrent removes the entry and next() then returns the entry after it")
    func deleteCurrentThenNext() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let (environment, data) = try Self.filled(scratch)
        defer { environment.close() }
        let afterDelete = try environment.write { txn throws in
            try txn.withCursor(data) { cursor in
                #expect(Self.number(try cursor.seek(atLeast: bigEndian(10))) == 10)
                try cursor.deleteCurrent()
                return Self.number(try cursor.next())
            }
        }
        #expect(afterDelete == 255)
        let remaining = try environment.read { txn throws in
            try txn.withCursor(data) { cursor in
                var keys: [UInt32] = []
                var entry = try cursor.first()
                while let current = entry { keys.append(decodeBigEndian(current.key)); entry = try cursor.next() }
                return keys
            }
        }
        #expect(remaining == Self.numbers.filter { $0 != 10 })
    }

    @Test("a loop of deleteCurrent + next removes exactly the chosen entries, and deleting the last leaves next() nil")
    func deleteWhileIterating() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let environment = try Environment.open(scratch.configuration())
        defer { environment.close() }
        let data = try environment.database("data")
        try environment.write { txn throws in
            for i in UInt32(0)..<1_000 { try txn.put(pattern(i, count: 40), forKey: bigEndian(i), in: data) }
        }
        let lastNext = try environment.write { txn throws in
            try txn.withCursor(data) { cursor in
                var entry = try cursor.first()
                while let current = entry {
                    if decodeBigEndian(current.key) % 3 == 0 {
                        try cursor.deleteCurrent()
                        entry = try cursor.next()
                    } else {
                        entry = try cursor.next()
                    }
                }
                _ = try cursor.last()
                try cursor.deleteCurrent()  // deletes 998, the last survivor
                return Self.number(try cursor.next())
            }
        }
        #expect(lastNext == nil)
        let survivors = try environment.read { txn throws in
            try txn.withCursor(data) { cursor in
                var keys: [UInt32] = []
                var entry = try cursor.first()
                while let current = entry {
                    #expect(Array(current.value) == pattern(decodeBigEndian(current.key), count: 40))
                    keys.append(decodeBigEndian(current.key))
                    entry = try cursor.next()
                }
                return keys
            }
        }
        #expect(survivors == (UInt32(0)..<998).filter { $0 % 3 != 0 })
        #expect(try environment.read { try $0.count(data) } == survivors.count)
    }

    @Test("deleteCurrent in a read transaction is refused")
    func deleteCurrentInReadTransaction() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let (environment, data) = try Self.filled(scratch)
        defer { environment.close() }
        let error = try #require(throws: LMDBError.self) {
            try environment.read { txn throws in
                try txn.withCursor(data) { cursor in
                    _ = try cursor.first()
                    try cursor.deleteCurrent()
                }
            }
        }
        #expect(error.operation.contains("mdb_cursor_del"))
        #expect(error.path == environment.path)
        #expect(try environment.read { try $0.count(data) } == Self.numbers.count)
    }

    @Test("put through a cursor stores keys among existing ones, in or out of order, and leaves the cursor on the key put")
    func putThroughCursor() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let (environment, data) = try Self.filled(scratch)
        defer { environment.close() }
        let added: [UInt32] = [3, 11, 12, 300, 70_000, 5]  // in order, then one that goes back
        try environment.write { txn throws in
            try txn.withCursor(data) { cursor in
                for n in added {
                    try bigEndian(n).withUnsafeBytes { k in try bytes("w\(n)").withUnsafeBytes { try cursor.put($0, forKey: k) } }
                    #expect(Self.number(try cursor.current()) == n)
                }
                // Overwrites by default; refuses with .noOverwrite, naming mdb_cursor_put.
                try bigEndian(3).withUnsafeBytes { k in try bytes("again").withUnsafeBytes { try cursor.put($0, forKey: k) } }
                let error = try #require(throws: LMDBError.self) {
                    try bigEndian(3).withUnsafeBytes { k in try bytes("x").withUnsafeBytes { try cursor.put($0, forKey: k, flags: .noOverwrite) } }
                }
                #expect(error.code == .keyExists)
                #expect(error.operation.contains("mdb_cursor_put"))
            }
        }
        let stored = try environment.read { txn throws in
            try txn.withCursor(data) { cursor -> [(UInt32, String)] in
                var all: [(UInt32, String)] = []
                var entry = try cursor.first()
                while let current = entry {
                    all.append((decodeBigEndian(current.key), String(decoding: current.value, as: UTF8.self)))
                    entry = try cursor.next()
                }
                return all
            }
        }
        #expect(stored.map(\.0) == (Self.numbers + added).sorted())
        #expect(stored.first { $0.0 == 3 }?.1 == "again")
        #expect(stored.first { $0.0 == 300 }?.1 == "w300")
        #expect(stored.first { $0.0 == 256 }?.1 == "v256")
    }
}
