@testable import DurableEntities
import Foundation
import LMDB
import TestSupport
import Testing

@Suite("Journal verification")
struct VerificationTests {
    /// Every table the verification reads, in its order.
    static let tables = ["log", "history", "names", "pending-names", "entities", "snapshots", "timers", "tasks",
                         "idempotency", "idempotency-times"]

    /// A directory with rows in every table: two entities (events in history chunks and in the log,
    /// a snapshot each, metadata), names merged and pending, timers, tasks and results.
    static func populate(_ directory: String) async throws -> (order: EntityKey, cart: EntityKey) {
        let journal = try Journal(configuration: .init(directory: directory, coalesceThreshold: 4, deferredNameLimit: 4,
                                                       logger: quietLogger))
        defer { journal.close() }
        let order = try await journal.register(EntityName(type: "Order", id: "o-1"))
        let cart = try await journal.register(EntityName(type: "Cart", id: "c-1"))
        // More names than the deferred limit: the first four merge into `names`, the last three stay pending.
        for index in 1...5 { _ = try await journal.register(EntityName(type: "Order", id: "o-extra-\(index)")) }
        for sequence in 1...9 {
            var batch = JournalBatch()
            batch.append(order, sequence: UInt64(sequence), payload: bytes("order-\(sequence)"))
            batch.append(cart, sequence: UInt64(sequence), payload: bytes("cart-\(sequence)"))
            _ = try await journal.commit(batch)
        }
        // A merge sorts its names off the writer's thread, then writes them a slice per commit:
        // commits go on until the first four are in `names`.
        let metadata = EntityMetadata(name: EntityName(type: "Order", id: "o-1"), status: 1, run: 1)
        while journal.pending.isMerging {
            var touch = JournalBatch()
            touch.setMetadata(order, metadata)
            _ = try await journal.commit(touch)
        }
        var batch = JournalBatch()
        batch.saveSnapshot(order, sequence: 6, payload: bytes("order@6"))
        batch.saveSnapshot(cart, sequence: 6, payload: bytes("cart@6"))
        batch.setMetadata(order, metadata)
        batch.setMetadata(cart, EntityMetadata(name: EntityName(type: "Cart", id: "c-1"), status: 1, run: 1))
        batch.scheduleTimer(JournalTimer(dueNanoseconds: 1_000, entity: order, id: 1, payload: bytes("remind")))
        batch.scheduleTimer(JournalTimer(dueNanoseconds: 2_000, entity: cart, id: 1, payload: bytes("expire")))
        batch.putTask(key: bytes("a-1"), value: bytes("charge"))
        batch.putTask(key: bytes("a-2"), value: bytes("ship"))
        batch.recordResult(forKey: bytes("k-1"), payload: bytes("ok:1"), recordedAt: 10)
        batch.recordResult(forKey: bytes("k-2"), payload: bytes("ok:2"), recordedAt: 20)
        _ = try await journal.commit(batch)
        return (order, cart)
    }

    @Test("an intact directory verifies as intact: every row of every table is read once, in batches of any size")
    func intactDirectory() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        _ = try await Self.populate(directory.path)
        var expected: [String: Int] = [:]
        for table in Self.tables { expected[table] = try tableRows(table, directory: directory.path).count }
        for table in Self.tables { #expect(expected[table]! > 0, "the directory has rows in \(table)") }
        #expect(expected["pending-names"]! > 1, "registrations wait besides the merge watermark")

        let journal = try Journal(configuration: .init(directory: directory.path, logger: quietLogger))
        defer { journal.close() }
        for batchSize in [1, 3, 10_000] {
            let report = try journal.verify(batchSize: batchSize)
            #expect(report.isIntact, "batch \(batchSize): \(report)")
            #expect(report.damage.isEmpty)
            #expect(report.tables.map(\.name) == Self.tables)
            for table in report.tables {
                #expect(table.rows == expected[table.name], "batch \(batchSize): \(table.name)")
            }
            #expect(report.rows == expected.values.reduce(0, +))
        }
        let open = try journal.verify()
        journal.close()
        // Without opening the journal: the same report.
        #expect(try Journal.verify(directory: directory.path, batchSize: 5) == open)
    }

    @Test("verifying a directory without opening its journal refuses what it cannot check: no journal there, tables in an older format")
    func verifyWithoutOpening() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let missing = #expect(throws: JournalError.self) { try Journal.verify(directory: directory.path + "/nothing") }
        #expect(missing?.code == .storage)
        _ = try await Self.populate(directory.path)
        #expect(try Journal.verify(directory: directory.path).isIntact)
        // The log as format 1 wrote it: its checks would all fail here; the open upgrades it.
        #expect(try downgradeLog(directory: directory.path) > 0)
        let old = #expect(throws: JournalError.self) { try Journal.verify(directory: directory.path) }
        #expect(old?.code == .unsupportedFormat)
        let journal = try Journal(configuration: .init(directory: directory.path, logger: quietLogger))
        journal.close()
        #expect(try Journal.verify(directory: directory.path).isIntact)
    }

    @Test("a damaged row in each table is reported with its table, its entity (by name when its metadata is intact) and its sequence; the verification changes nothing")
    func damagedRows() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let (order, cart) = try await Self.populate(directory.path)
        let path = directory.path
        func flipLastByte(_ table: String, of key: [UInt8]) throws {
            try editTable(table, directory: path) { txn, database in
                var value = try #require(try txn.value(forKey: key, in: database))
                value[value.count - 1] ^= 0x01
                try txn.put(value, forKey: key, in: database)
            }
        }
        func put(_ table: String, _ value: [UInt8], at key: [UInt8]) throws {
            try editTable(table, directory: path) { txn, database in try txn.put(value, forKey: key, in: database) }
        }
        // log: the first record still in the log (the order's tail).
        let logRows = try tableRows("log", directory: path)
        let logged = try #require(logRows.first { $0.value.prefix(8).elementsEqual(Key8(order.rawValue).withBytes { Array($0) }) })
        let loggedSequence = logged.value.withUnsafeBytes { $0.bigEndianUInt64(at: 8) }
        try flipLastByte("log", of: logged.key)
        // history: the cart's first chunk, its last event.
        let chunk = try #require(try tableRows("history", directory: path).first { $0.key.prefix(8).elementsEqual(Key8(cart.rawValue).withBytes { Array($0) }) })
        let chunkLast = chunk.value.withUnsafeBytes { HistoryChunk(firstSequence: chunk.key.withUnsafeBytes { $0.bigEndianUInt64(at: 8) }, bytes: $0).lastSequence }
        try flipLastByte("history", of: chunk.key)
        // names: a name whose value lost a byte.
        let name = try #require(try tableRows("names", directory: path).first)
        try put("names", Array(name.value.prefix(7)), at: name.key)
        // pending-names: a registration cut short.
        let registration = try #require(try tableRows("pending-names", directory: path).first { !$0.key.allSatisfy { $0 == 0 } })
        try put("pending-names", Array(registration.value.prefix(8)), at: registration.key)
        // entities: the cart's metadata record of an unknown version.
        let cartKey = Key8(cart.rawValue).withBytes { Array($0) }
        var metadata = try #require(try tableRows("entities", directory: path).first { $0.key == cartKey }).value
        metadata[0] = 0xEE
        try put("entities", metadata, at: cartKey)
        // snapshots, timers, tasks, results: one payload bit each.
        try flipLastByte("snapshots", of: Key8(order.rawValue).withBytes { Array($0) })
        try flipLastByte("timers", of: Key24(2_000, cart.rawValue, 1).withBytes { Array($0) })
        try flipLastByte("tasks", of: bytes("a-2"))
        try flipLastByte("idempotency", of: bytes("k-1"))
        // idempotency-times: a row that should be empty.
        let time = try #require(try tableRows("idempotency-times", directory: path).first)
        try put("idempotency-times", [1], at: time.key)

        var before: [String: [[UInt8]]] = [:]
        for table in Self.tables { before[table] = try tableRows(table, directory: path).flatMap { [$0.key, $0.value] } }

        // A damaged pending name fails the journal's open: the directory is verified without it.
        let refused = #expect(throws: JournalError.self) { try Journal(configuration: .init(directory: path, logger: quietLogger)) }
        #expect(refused?.code == .corruptedRecord)
        let report = try Journal.verify(directory: path, batchSize: 2)
        #expect(!report.isIntact)
        #expect(report.damagedRows == Self.tables.count, "\(report)")
        #expect(report.tables.allSatisfy { $0.damagedRows == 1 }, "\(report)")
        #expect(report.damage.map(\.table) == Self.tables)
        let byTable = Dictionary(uniqueKeysWithValues: report.damage.map { ($0.table, $0) })
        let orderName = EntityName(type: "Order", id: "o-1")

        let log = try #require(byTable["log"])
        #expect(log.entity == order && log.name == orderName && log.sequence == loggedSequence && log.key == logged.key)
        let history = try #require(byTable["history"])
        #expect(history.entity == cart && history.sequence == chunkLast && history.sequence != nil)
        #expect(history.name == nil, "the cart's metadata is damaged too: no name")
        #expect(byTable["names"]?.key == name.key && byTable["names"]?.entity == nil)
        #expect(byTable["pending-names"]?.key == registration.key)
        #expect(byTable["entities"]?.entity == cart && byTable["entities"]?.name == nil)
        let snapshot = try #require(byTable["snapshots"])
        #expect(snapshot.entity == order && snapshot.name == orderName && snapshot.sequence == 6)
        #expect(byTable["timers"]?.entity == cart)
        #expect(byTable["tasks"]?.key == bytes("a-2") && byTable["tasks"]?.entity == nil)
        #expect(byTable["idempotency"]?.key == bytes("k-1"))
        #expect(byTable["idempotency-times"]?.key == time.key)

        // What an operator reads: every damaged row on its own line, with its place.
        let text = report.description
        #expect(text.hasPrefix("10 damaged rows"))
        #expect(text.contains("log Order/o-1 sequence \(loggedSequence): the record fails its check"), "\(text)")
        #expect(text.contains("snapshots Order/o-1 sequence 6: the snapshot fails its checksum"), "\(text)")

        // A report limit keeps the first rows and counts them all.
        let limited = try Journal.verify(directory: path, reportLimit: 3)
        #expect(limited.damage.count == 3 && limited.damagedRows == Self.tables.count)
        #expect(limited.damage == Array(report.damage.prefix(3)))
        #expect(limited.description.hasSuffix("… and 7 more"))

        for table in Self.tables {
            #expect(try tableRows(table, directory: path).flatMap { [$0.key, $0.value] } == before[table], "\(table) unchanged")
        }
    }
}
