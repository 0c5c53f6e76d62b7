@testable import DurableEntities
import Foundation
import LMDB
import Synchronization
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

    /// Adds to `batch` the registration of `name` with ten 508-byte events, which go to history with
    /// it, three to a chunk: chunks at 1, 4, 7 and 10.
    static func registerBook(_ name: EntityName, in journal: Journal, into batch: inout JournalBatch) throws -> EntityKey {
        let key = try journal.reserveKey(for: name).key
        batch.register(name, as: key)
        for sequence in 1...10 { batch.append(key, sequence: UInt64(sequence), payload: [UInt8](repeating: UInt8(sequence), count: 500)) }
        return key
    }

    /// Deletes the row under `key` from `table`, which must have it.
    static func deleteRow(_ table: String, _ key: [UInt8], directory: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        try editTable(table, directory: directory) { txn, database in
            let deleted = try txn.delete(key, in: database)
            #expect(deleted, "\(table) had the row", sourceLocation: sourceLocation)
        }
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
        #expect(limited.description.hasSuffix("… and 7 more damaged rows"))
        // Damage is reported once, by its row's check: no relation through a damaged row is checked.
        #expect(report.checkedAcrossTables && report.inconsistencyCount == 0 && report.inconsistencies.isEmpty, "\(report)")

        for table in Self.tables {
            #expect(try tableRows(table, directory: path).flatMap { [$0.key, $0.value] } == before[table], "\(table) unchanged")
        }
    }

    @Test("tables that disagree are reported where a row is missing: a lost chunk of events or log record, an entity without metadata or without its name, a snapshot past the events, a result without its time row")
    func tablesThatDisagree() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.path
        let (order, cart) = try await Self.populate(path)
        // A ledger whose events all wait in the log (a coalesce threshold above them), and a book whose
        // ten events went to history with its registration, three to a chunk.
        let ledger: EntityKey
        let book: EntityKey
        do {
            let journal = try Journal(configuration: .init(directory: path, coalesceThreshold: 1_000, logger: quietLogger))
            defer { journal.close() }
            ledger = try await journal.register(EntityName(type: "Ledger", id: "l-1"))
            for sequence in 1...6 {
                var batch = JournalBatch()
                batch.append(ledger, sequence: UInt64(sequence), payload: bytes("entry-\(sequence)"))
                _ = try await journal.commit(batch)
            }
            var batch = JournalBatch()
            book = try Self.registerBook(EntityName(type: "Book", id: "b-1"), in: journal, into: &batch)
            _ = try await journal.commit(batch)
            // Retention: the order's events before 3 go; its history starts at its floor.
            var prune = JournalBatch()
            prune.deleteHistory(of: order, before: 3)
            _ = try await journal.commit(prune)
            #expect(try journal.events(of: order).first?.sequence == 3)
            let intact = try journal.verify()
            #expect(intact.isIntact && intact.checkedAcrossTables, "before any change: \(intact)")
            // The journal takes a snapshot past the order's latest event (9) as it is told to.
            var ahead = JournalBatch()
            ahead.saveSnapshot(order, sequence: 12, payload: bytes("order@12"))
            _ = try await journal.commit(ahead)
        }
        let historyKeys = try tableRows("history", directory: path).map(\.key)
        let bookChunks = historyKeys.filter { $0.prefix(8).elementsEqual(Key8(book.rawValue).withBytes { Array($0) }) }
        #expect(bookChunks == [1, 4, 7, 10].map { Key16(book.rawValue, $0).bytes }, "three 508-byte events to a chunk")
        let ledgerRecords = try tableRows("log", directory: path).filter { $0.value.prefix(8).elementsEqual(Key8(ledger.rawValue).withBytes { Array($0) }) }
        #expect(ledgerRecords.count == 6, "the ledger's events wait in the log")
        // The cart's events: some in history, maybe some still in the log.
        let cartPrefix = Key8(cart.rawValue).withBytes { Array($0) }
        let cartHistoryLast = try #require(try tableRows("history", directory: path).last { $0.key.prefix(8).elementsEqual(cartPrefix) }.flatMap { row in
            row.value.withUnsafeBytes { HistoryChunk(firstSequence: row.key.withUnsafeBytes { $0.bigEndianUInt64(at: 8) }, bytes: $0).lastSequence }
        })
        let cartInLog = try tableRows("log", directory: path).contains { row in
            row.value.prefix(8).elementsEqual(cartPrefix) && row.value.withUnsafeBytes { $0.bigEndianUInt64(at: 8) } > cartHistoryLast
        }

        func delete(_ table: String, _ key: [UInt8], sourceLocation: SourceLocation = #_sourceLocation) throws {
            try Self.deleteRow(table, key, directory: path, sourceLocation: sourceLocation)
        }
        try delete("history", Key16(book.rawValue, 4).bytes)                        // events 4...6 of the book
        let lostRecord = try #require(ledgerRecords.first { $0.value.withUnsafeBytes { $0.bigEndianUInt64(at: 8) } == 3 })
        try delete("log", lostRecord.key)                                            // the ledger's event 3
        try delete("entities", Key8(cart.rawValue).withBytes { Array($0) })         // the cart's metadata
        let extra = EntityName(type: "Order", id: "o-extra-1")
        let extraKey = Array("Order".utf8) + [0] + Array("o-extra-1".utf8)
        let extraEntity = try #require(try tableRows("names", directory: path).first { $0.key == extraKey }).value
        try delete("names", extraKey)                                               // a merged name
        try delete("idempotency", bytes("k-1"))                                      // a result, its time row left
        let k2Time = try #require(try tableRows("idempotency-times", directory: path).first { $0.key.suffix(3).elementsEqual(bytes("k-2")) })
        try delete("idempotency-times", k2Time.key)                                  // a time row, its result left

        var before: [String: [[UInt8]]] = [:]
        for table in Self.tables { before[table] = try tableRows(table, directory: path).flatMap { [$0.key, $0.value] } }
        let report = try Journal.verify(directory: path)
        #expect(report.damagedRows == 0, "every row passes its own check: \(report)")
        #expect(!report.isIntact && report.checkedAcrossTables)
        var unmatched = report.inconsistencies
        func expectFound(_ table: String, entity: EntityKey? = nil, key: [UInt8]? = nil, sequence: UInt64? = nil, _ problem: String,
                         sourceLocation: SourceLocation = #_sourceLocation) {
            guard let index = unmatched.firstIndex(where: { found in
                found.table == table && (entity == nil || found.entity == entity) && (key == nil || found.key == key)
                    && found.sequence == sequence && found.problem.contains(problem)
            }) else {
                Issue.record("no \(table) inconsistency \"\(problem)\" in \(report)", sourceLocation: sourceLocation)
                return
            }
            unmatched.remove(at: index)
        }
        expectFound("history", entity: book, key: Key16(book.rawValue, 7).bytes, sequence: 4, "events 4...6 are missing: the history goes on at 7")
        expectFound("log", entity: ledger, key: ledgerRecords[3].key, sequence: 3, "events 3...3 are missing: the entity's events in the log go on at 4")
        // The cart without metadata: its name, its history, its snapshot and its timer each say so.
        expectFound("names", entity: cart, "the name Cart/c-1 is registered under an entity that has no metadata record")
        expectFound("entities", entity: cart, sequence: 1, "the entity has events in history but no metadata record")
        if cartInLog { expectFound("entities", entity: cart, sequence: cartHistoryLast + 1, "the entity has events in the log but no metadata record") }
        expectFound("entities", entity: cart, sequence: 6, "the entity has a snapshot but no metadata record")
        expectFound("timers", entity: cart, key: Key24(2_000, cart.rawValue, 1).withBytes { Array($0) }, "belongs to an entity that has no metadata record")
        expectFound("names", entity: EntityKey(rawValue: extraEntity.withUnsafeBytes { $0.bigEndianUInt64(at: 0) }),
                    "the entity's name is neither in the names index nor among the registrations waiting for it")
        expectFound("snapshots", entity: order, sequence: 12, "past the entity's latest event (9)")
        expectFound("idempotency", key: bytes("k-1"), "names a result that is not stored")
        expectFound("idempotency-times", key: bytes("k-2"), "the result has no time row: it never expires")
        #expect(unmatched.isEmpty, "nothing else: \(unmatched)")
        #expect(report.inconsistencyCount == report.inconsistencies.count)
        let byName = report.inconsistencies.filter { $0.name == extra }
        #expect(byName.count == 1, "an inconsistency names its entity when its metadata is intact")
        #expect(report.description.hasPrefix("\(report.inconsistencyCount) inconsistencies — rows:"), "\(report)")
        #expect(report.description.contains("history Book/b-1 sequence 4: events 4...6 are missing"), "\(report)")

        // Row checks alone find nothing; a report limit keeps the first and counts them all.
        let rowsOnly = try Journal.verify(directory: path, acrossTables: false)
        #expect(rowsOnly.isIntact && !rowsOnly.checkedAcrossTables && rowsOnly.inconsistencies.isEmpty)
        #expect(rowsOnly.description.hasPrefix("intact rows (tables not checked against each other)"))
        let limited = try Journal.verify(directory: path, reportLimit: 2)
        #expect(limited.inconsistencies == Array(report.inconsistencies.prefix(2)) && limited.inconsistencyCount == report.inconsistencyCount)
        #expect(limited.description.hasSuffix("… and \(report.inconsistencyCount - 2) more inconsistencies"))
        for table in Self.tables {
            #expect(try tableRows(table, directory: path).flatMap { [$0.key, $0.value] } == before[table], "\(table) unchanged")
        }

        // A chunk whose event count lost one (its bytes hold three events) fails its own check; the gap
        // before it is still found from its key, and nothing is reported twice.
        try editTable("history", directory: path) { txn, database in
            let key = Key16(book.rawValue, 7).bytes
            var value = try #require(try txn.value(forKey: key, in: database))
            value[0] -= 1
            try txn.put(value, forKey: key, in: database)
        }
        let recounted = try Journal.verify(directory: path)
        #expect(recounted.damagedRows == 1 && recounted.damage.first?.problem == "the history chunk's event count (2) does not match its 1528 bytes",
                "\(recounted)")
        #expect(recounted.inconsistencies == report.inconsistencies)
    }

    @Test("with the runtime's task owner, tasks of an entity without metadata are reported (activity tasks and outbox messages); other task keys are not read")
    func tasksOfMissingEntities() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.path
        let (order, cart) = try await Self.populate(path)
        let ghost = EntityKey(rawValue: 999_999)
        let activity = ActivityTask.key(entity: order.rawValue, activity: 1 << 32 | 1).bytes
        let message = EntityEnvelope.key(sender: cart, sequence: 9, index: 0).bytes
        let ghostActivity = ActivityTask.key(entity: ghost.rawValue, activity: 1 << 32 | 2).bytes
        let ghostMessage = EntityEnvelope.key(sender: ghost, sequence: 4, index: 1).bytes
        #expect(EntityRuntime.taskOwner(UnsafeRawBufferPointer(start: nil, count: 0)) == nil)
        for (key, owner) in [(activity, order), (message, cart), (ghostActivity, ghost), (ghostMessage, ghost), (bytes("a-1"), nil)] {
            #expect(key.withUnsafeBytes { EntityRuntime.taskOwner($0) } == owner)
        }
        do {
            let journal = try Journal(configuration: .init(directory: path, logger: quietLogger, taskOwner: EntityRuntime.taskOwner))
            defer { journal.close() }
            var batch = JournalBatch()
            for key in [activity, message, ghostActivity, ghostMessage] { batch.putTask(key: key, value: bytes("owed")) }
            _ = try await journal.commit(batch)
            let report = try journal.verify()
            #expect(report.damagedRows == 0 && report.inconsistencyCount == 2, "\(report)")
            #expect(report.inconsistencies.map(\.table) == ["tasks", "tasks"])
            #expect(Set(report.inconsistencies.compactMap(\.key)) == [ghostActivity, ghostMessage])
            #expect(report.inconsistencies.allSatisfy { $0.entity == ghost && $0.problem == "the task belongs to an entity that has no metadata record" })
        }
        // Without the journal: the runtime's check finds them, the journal's alone does not read task keys.
        let runtimeReport = try EntityRuntime.verify(directory: path)
        #expect(runtimeReport.inconsistencyCount == 2 && !runtimeReport.isIntact)
        #expect(try Journal.verify(directory: path).isIntact)
        // A runtime's journal checks its tasks without being told.
        let runtime = try EntityRuntime(configuration: .init(directory: path, logger: quietLogger))
        defer { runtime.close() }
        #expect(try runtime.journal.verify().inconsistencies == runtimeReport.inconsistencies)
    }

    /// What the verifier and the writer of ``verifyWhileCommitting()`` share.
    private final class Progress: Sendable {
        let commits = Atomic<Int>(0)
        /// Verifications during which at least one commit landed.
        let overlapped = Atomic<Int>(0)
        let writerDone = Atomic<Bool>(false)
        /// The verifier's findings: how many verifications ran, the reports that were not intact
        /// (at most a few), the last report, and what it threw.
        let findings = Mutex<(count: Int, broken: [JournalVerification], last: JournalVerification?, error: JournalError?)>((0, [], nil, nil))
        let finished = DispatchSemaphore(value: 0)
    }

    @Test("a verification while the journal commits (registrations, tail moves, name merges, pruning, snapshots, timers, results) finds an intact directory every time")
    func verifyWhileCommitting() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let journal = try Journal(configuration: .init(directory: directory.path, coalesceThreshold: 4, deferredNameLimit: 8,
                                                       logger: quietLogger))
        defer { journal.close() }
        let progress = Progress()
        let (verifierStarted, started) = AsyncStream<Void>.makeStream()
        // The verifier loops on a thread of its own: on the concurrency pool it would hold a thread
        // the writer's awaits need, for as long as the writer is not done.
        Thread {
            defer { progress.finished.signal() }
            started.yield()
            // Until the writer stops, and at least three times.
            while !progress.writerDone.load(ordering: .acquiring) || progress.findings.withLock({ $0.count }) < 3 {
                let before = progress.commits.load(ordering: .acquiring)
                let report: JournalVerification
                do throws(JournalError) {
                    report = try journal.verify(batchSize: 7)
                } catch {
                    progress.findings.withLock { $0.error = error }
                    return
                }
                if progress.commits.load(ordering: .acquiring) > before { progress.overlapped.add(1, ordering: .releasing) }
                progress.findings.withLock { findings in
                    findings.count += 1
                    findings.last = report
                    if !(report.isIntact && report.checkedAcrossTables), findings.broken.count < 3 { findings.broken.append(report) }
                }
            }
        }.start()
        for await _ in verifierStarted { break }

        // A deterministic mix of every kind of write, until at least 300 commits landed and three
        // verifications each saw a commit land while they read.
        var random = UInt64(0x5EED)
        func next(_ bound: Int) -> Int {
            random = random &* 6364136223846793005 &+ 1442695040888963407
            return Int((random >> 33) % UInt64(bound))
        }
        var latest: [EntityKey: UInt64] = [:]
        var entities: [EntityKey] = []
        var timers: [(due: UInt64, entity: EntityKey)] = []
        var commit = 0
        while commit < 300 || progress.overlapped.load(ordering: .acquiring) < 3, commit < 20_000,
              progress.findings.withLock({ $0.error == nil }) {
            commit += 1
            var batch = JournalBatch()
            if entities.count < 8 || next(3) == 0 {
                let name = EntityName(type: "Item", id: "i-\(commit)")
                let key = try journal.reserveKey(for: name).key
                batch.register(name, as: key)
                let count = 1 + next(3)
                for sequence in 1...count { batch.append(key, sequence: UInt64(sequence), payload: bytes("\(name)#\(sequence)")) }
                latest[key] = UInt64(count)
                entities.append(key)
            }
            for _ in 0..<3 {
                let key = entities[next(entities.count)]
                guard !batch.operations.contains(where: { if case .append(key, _) = $0 { true } else { false } }) else { continue }
                let first = latest[key]! + 1
                let count = 1 + next(5)
                for sequence in first..<(first + UInt64(count)) { batch.append(key, sequence: sequence, payload: bytes("e\(sequence)")) }
                latest[key] = first + UInt64(count) - 1
            }
            if commit % 10 == 0 {
                let key = entities[next(entities.count)]
                batch.saveSnapshot(key, sequence: latest[key]!, payload: bytes("state@\(latest[key]!)"))
                batch.deleteHistory(of: key, before: max(3, latest[key]!) - 2)
                let due = UInt64(commit) * 1_000
                batch.scheduleTimer(JournalTimer(dueNanoseconds: due, entity: key, id: 1, payload: bytes("t")))
                timers.append((due, key))
                batch.recordResult(forKey: bytes("r-\(commit)"), payload: bytes("ok"), recordedAt: UInt64(commit))
            }
            if commit % 25 == 0, !timers.isEmpty {
                let timer = timers.removeFirst()
                batch.cancelTimer(dueNanoseconds: timer.due, entity: timer.entity, id: 1)
                batch.expireResults(recordedBefore: UInt64(max(0, commit - 50)), limit: 3)
            }
            _ = try await journal.commit(batch)
            progress.commits.add(1, ordering: .releasing)
        }
        progress.writerDone.store(true, ordering: .releasing)
        await withCheckedContinuation { done in DispatchQueue.global().async { progress.finished.wait(); done.resume() } }
        let findings = progress.findings.withLock { $0 }
        #expect(findings.error == nil)
        #expect(findings.count >= 3 && progress.overlapped.load(ordering: .acquiring) >= 3, "verifications overlapped commits")
        #expect(findings.broken.isEmpty, "\(findings.broken)")
        // The journal merged names and moved tails meanwhile: the last report has rows in those tables.
        let last = try #require(findings.last)
        #expect(last.tables.first { $0.name == "names" }!.rows > 0 && last.tables.first { $0.name == "history" }!.rows > 0)
    }

    @Test("a history chunk lost whole fails the entity's reads at its first missing event, never a silent gap; a pruned history still reads from its floor")
    func lostChunkFailsReads() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let book: EntityKey
        let pruned: EntityKey
        do {
            let journal = try Journal(configuration: .init(directory: directory.path, logger: quietLogger))
            defer { journal.close() }
            var batch = JournalBatch()
            book = try Self.registerBook(EntityName(type: "Book", id: "b-1"), in: journal, into: &batch)
            pruned = try Self.registerBook(EntityName(type: "Book", id: "b-2"), in: journal, into: &batch)
            _ = try await journal.commit(batch)
            var prune = JournalBatch()
            prune.deleteHistory(of: pruned, before: 7)
            _ = try await journal.commit(prune)
        }
        try Self.deleteRow("history", Key16(book.rawValue, 4).bytes, directory: directory.path)
        let journal = try Journal(configuration: .init(directory: directory.path, logger: quietLogger))
        defer { journal.close() }
        for from: UInt64 in [1, 2, 5] {
            let error = #expect(throws: JournalError.self) { try journal.events(of: book, from: from) }
            #expect(error?.code == .corruptedRecord && error?.sequence == max(from, 4), "from \(from): \(String(describing: error))")
            #expect(error?.entity == EntityName(type: "Book", id: "b-1"))
            #expect(error?.message.contains("events \(max(from, 4))...6 are missing from its history") == true, "\(String(describing: error))")
        }
        // Past the gap, and before it, reads succeed.
        #expect(try journal.events(of: book, from: 7).map(\.sequence) == Array(7...10))
        #expect(try journal.events(of: book, from: 1, through: 3).map(\.sequence) == [1, 2, 3])
        // Events below the retention floor are not a gap.
        #expect(try journal.events(of: pruned).map(\.sequence) == Array(7...10))
        #expect(try journal.events(of: pruned, from: 3).map(\.sequence) == Array(7...10))
        // The verification finds the same gap.
        let report = try journal.verify()
        #expect(report.damagedRows == 0 && report.inconsistencyCount == 1 && report.inconsistencies.first?.sequence == 4, "\(report)")
    }
}
