import Foundation
import LMDB
import Testing

@Suite("Transactions: put, get, delete and abort")
struct TransactionTests {
    @Test("put, get, overwrite and delete round-trip, and the values survive close and reopen")
    func roundTripSurvivesReopen() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let configuration = scratch.configuration(durability: .durable)

        let environment = try Environment.open(configuration)
        let data = try environment.database("data")
        try environment.write { txn throws in
            try txn.put(bytes("one"), forKey: bytes("k1"), in: data)
            try txn.put(bytes("two"), forKey: bytes("k2"), in: data)
            try txn.put(bytes("three"), forKey: bytes("k3"), in: data)
            // A write transaction sees its own writes.
            #expect(try txn.value(forKey: bytes("k2"), in: data) == bytes("two"))
        }
        try environment.read { txn throws in
            #expect(try txn.value(forKey: bytes("k1"), in: data) == bytes("one"))
            #expect(try txn.value(forKey: bytes("k2"), in: data) == bytes("two"))
            #expect(try txn.value(forKey: bytes("missing"), in: data) == nil)
            #expect(try txn.contains(bytes("k3"), in: data))
            #expect(try txn.count(data) == 3)
        }
        let deleted = try environment.write { txn throws in
            try txn.put(bytes("ONE, longer than before"), forKey: bytes("k1"), in: data)
            return (try txn.delete(bytes("k2"), in: data), try txn.delete(bytes("never there"), in: data))
        }
        #expect(deleted == (true, false))
        try environment.read { txn throws in
            #expect(try txn.value(forKey: bytes("k1"), in: data) == bytes("ONE, longer than before"))
            #expect(try txn.value(forKey: bytes("k2"), in: data) == nil)
            #expect(try !txn.contains(bytes("k2"), in: data))
            #expect(try txn.count(data) == 2)
        }
        environment.close()
        #expect(environment.isClosed)

        let reopened = try Environment.open(configuration)
        defer { reopened.close() }
        #expect(reopened !== environment)
        let again = try reopened.database("data", create: false)
        try reopened.read { txn throws in
            #expect(try txn.value(forKey: bytes("k1"), in: again) == bytes("ONE, longer than before"))
            #expect(try txn.value(forKey: bytes("k2"), in: again) == nil)
            #expect(try txn.value(forKey: bytes("k3"), in: again) == bytes("three"))
            #expect(try txn.count(again) == 2)
        }
    }

    @Test("withValue lends the stored bytes, or nil for a missing key")
    func withValueLendsBytes() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let environment = try Environment.open(scratch.configuration())
        defer { environment.close() }
        let data = try environment.database("data")
        let value = pattern(7, count: 3000)
        try environment.write { txn in try txn.put(value, forKey: bytes("big"), in: data) }
        let (length, equal, missing) = try environment.read { txn throws in
            let found = try bytes("big").withUnsafeBytes { key in
                try txn.withValue(forKey: key, in: data) { buffer in (buffer?.count, buffer.map { Array($0) == value }) }
            }
            let missing = try bytes("nope").withUnsafeBytes { key in
                try txn.withValue(forKey: key, in: data) { $0 == nil }
            }
            return (found.0, found.1, missing)
        }
        #expect(length == 3000)
        #expect(equal == true)
        #expect(missing)
    }

    @Test("put(reserving:) stores the bytes written in place")
    func putReserving() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let environment = try Environment.open(scratch.configuration())
        defer { environment.close() }
        let data = try environment.database("data")
        let expected = pattern(11, count: 1000)
        try environment.write { txn throws in
            try bytes("reserved").withUnsafeBytes { key in
                try txn.put(reserving: expected.count, forKey: key, in: data) { buffer in
                    #expect(buffer.count == expected.count)
                    buffer.copyBytes(from: expected)
                }
            }
        }
        #expect(try environment.read { try $0.value(forKey: bytes("reserved"), in: data) } == expected)
    }

    @Test("clear empties a database but keeps it; count follows")
    func clearKeepsDatabase() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let environment = try Environment.open(scratch.configuration())
        defer { environment.close() }
        let data = try environment.database("data")
        let other = try environment.database("other")
        try environment.write { txn throws in
            for i in 0..<50 { try txn.put(bytes("v\(i)"), forKey: bigEndian(UInt32(i)), in: data) }
            try txn.put(bytes("x"), forKey: bytes("x"), in: other)
        }
        #expect(try environment.read { try $0.count(data) } == 50)
        try environment.write { txn in try txn.clear(data) }
        #expect(try environment.read { try $0.count(data) } == 0)
        #expect(try environment.read { try $0.count(other) } == 1)
        // The database still exists: open without create succeeds, and it takes new writes.
        #expect(try environment.database("data", create: false) == data)
        try environment.write { txn in try txn.put(bytes("back"), forKey: bytes("k"), in: data) }
        #expect(try environment.read { try $0.count(data) } == 1)
    }

    @Test(".append accepts ascending keys and refuses a key out of order with keyExists")
    func appendFlag() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let environment = try Environment.open(scratch.configuration())
        defer { environment.close() }
        let data = try environment.database("data")
        try environment.write { txn throws in
            for i in UInt32(0)..<100 { try txn.put(bigEndian(i), forKey: bigEndian(i * 2), in: data, flags: .append) }
        }
        let error = #expect(throws: LMDBError.self) {
            try environment.write { txn in try txn.put(bytes("late"), forKey: bigEndian(5), in: data, flags: .append) }
        }
        #expect(error?.code == .keyExists)
        #expect(try environment.read { try $0.count(data) } == 100)
        #expect(try environment.read { try $0.value(forKey: bigEndian(5), in: data) } == nil)
    }

    struct Refusal: Error, Equatable {}

    @Test("an error thrown inside write aborts it: none of its puts, deletes or clears is visible")
    func thrownErrorAborts() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let environment = try Environment.open(scratch.configuration())
        defer { environment.close() }
        let data = try environment.database("data")
        try environment.write { txn throws in
            try txn.put(bytes("kept"), forKey: bytes("a"), in: data)
            try txn.put(bytes("kept"), forKey: bytes("b"), in: data)
        }
        #expect(throws: Refusal.self) {
            try environment.write { txn throws in
                try txn.put(bytes("changed"), forKey: bytes("a"), in: data)
                try txn.delete(bytes("b"), in: data)
                for i in UInt32(0)..<200 { try txn.put(pattern(i, count: 100), forKey: bigEndian(i), in: data) }
                throw Refusal()
            }
        }
        // An LMDB error raised inside the body aborts in the same way.
        let error = #expect(throws: LMDBError.self) {
            try environment.write { txn throws in
                try txn.put(bytes("new"), forKey: bytes("c"), in: data)
                try txn.clear(data)
                try txn.put(bytes("once"), forKey: bytes("d"), in: data, flags: .noOverwrite)
                try txn.put(bytes("twice"), forKey: bytes("d"), in: data, flags: .noOverwrite)
            }
        }
        #expect(error?.code == .keyExists)
        try environment.read { txn throws in
            #expect(try txn.count(data) == 2)
            #expect(try txn.value(forKey: bytes("a"), in: data) == bytes("kept"))
            #expect(try txn.value(forKey: bytes("b"), in: data) == bytes("kept"))
            #expect(try txn.value(forKey: bytes("c"), in: data) == nil)
            #expect(try txn.value(forKey: bytes("d"), in: data) == nil)
        }
        // And the environment still takes writes afterwards.
        try environment.write { txn in try txn.put(bytes("later"), forKey: bytes("c"), in: data) }
        #expect(try environment.read { try $0.count(data) } == 3)
    }

    @Test("write and read return the body's result")
    func bodiesReturnResults() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let environment = try Environment.open(scratch.configuration())
        defer { environment.close() }
        let data = try environment.database("data")
        let written: Int = try environment.write { txn throws in
            try txn.put(bytes("v"), forKey: bytes("k"), in: data)
            return 42
        }
        #expect(written == 42)
        #expect(try environment.read { try $0.value(forKey: bytes("k"), in: data) } == bytes("v"))
    }

    @Test("read transactions are reused: each read sees the last commit before it began, also nested in an older one")
    func reusedReadTransactionsSeeTheLatestCommit() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let environment = try Environment.open(scratch.configuration())
        let data = try environment.database("data")
        // Alternate commits and reads: a read renews a transaction an earlier read left, and must not
        // see that earlier read's snapshot.
        for round in 0..<200 {
            try environment.write { txn throws in try txn.put(bytes("v\(round)"), forKey: bytes("k"), in: data) }
            let seen = try environment.read { txn throws in try txn.value(forKey: bytes("k"), in: data) }
            #expect(seen == bytes("v\(round)"))
        }
        // A read that began before a commit keeps its snapshot; reads begun inside it, after the
        // commit, see the commit — more of them at once than the pool keeps.
        try environment.read { outer throws in
            try environment.write { txn throws in try txn.put(bytes("new"), forKey: bytes("k"), in: data) }
            func nested(_ depth: Int) throws {
                try environment.read { inner throws in
                    #expect(try inner.value(forKey: bytes("k"), in: data) == bytes("new"))
                    if depth > 1 { try nested(depth - 1) }
                }
            }
            try nested(Environment.maxIdleReaders + 4)
            #expect(try outer.value(forKey: bytes("k"), in: data) == bytes("v199"))
        }
        // Closing with reset transactions in the pool frees them; the directory reopens and reads.
        environment.close()
        let reopened = try Environment.open(scratch.configuration())
        defer { reopened.close() }
        let again = try reopened.database("data", create: false)
        #expect(try reopened.read { txn throws in try txn.value(forKey: bytes("k"), in: again) } == bytes("new"))
    }
}
