import Glibc
import LMDB

/// What ``Journal/verify(batchSize:reportLimit:acrossTables:)`` found: how many rows each table
/// holds, the rows that failed a check, and where tables disagree.
///
/// A row is damaged when it fails its checksum (log records, history events, snapshots, timers,
/// tasks, results: see ``JournalLayout``) or does not have the shape its table gives every row
/// (a key or value of the wrong length, a metadata record or name that does not decode). The
/// verification reads; it changes nothing. What the runtime does with each kind of damage when it
/// meets it is in the README's *Records* section: a damaged event fails its entity's reads with
/// ``JournalError/Code/corruptedRecord``, a damaged timer or task is stored again by its owner.
///
/// Tables disagree (an ``Inconsistency``) when a row that another table's row needs is not there:
/// a chunk of an entity's events lost, an entity's metadata or its name, a result's time row.
public struct JournalVerification: Sendable, Equatable, CustomStringConvertible {
    /// One table: its rows, and how many of them are damaged.
    public struct Table: Sendable, Equatable {
        /// The table's (LMDB database's) name: `log`, `history`, `names`, …
        public let name: String
        public internal(set) var rows = 0
        public internal(set) var damagedRows = 0
    }

    /// A row that failed a check (a ``damage`` entry), or rows of two tables that disagree (an
    /// ``inconsistencies`` entry): where, and what is wrong.
    public struct Finding: Sendable, Equatable, CustomStringConvertible {
        /// The damaged row's table; for tables that disagree, the one that lacks a row or whose row
        /// disagrees with another table.
        public let table: String
        /// The row's key, as stored: always there for a damaged row; `nil` when tables disagree
        /// because a row is not there.
        public let key: [UInt8]?
        /// The entity concerned, as the row names it (a damaged row may name another), when there is
        /// one (a damaged task or result names none).
        public let entity: EntityKey?
        /// That entity's name, when its metadata record is intact.
        public let name: EntityName?
        /// The event's sequence (a log record, a history event, a snapshot), or the first of the
        /// events concerned.
        public let sequence: UInt64?
        /// What is wrong.
        public let problem: String

        public var description: String {
            var place = table
            if let name { place += " \(name)" } else if let entity { place += " entity \(entity)" }
            if let sequence { place += " sequence \(sequence)" }
            if entity == nil, let key { place += " key \(key.prefix(32).map { String($0, radix: 16) }.joined(separator: " "))" }
            return "\(place): \(problem)"
        }
    }

    /// A row that failed its own check.
    public typealias DamagedRow = Finding

    /// Rows of two tables that disagree, or a row one table needs and its table lacks: what a row's
    /// own checks cannot see (a whole chunk of events lost, a name without its entity). Found by the
    /// check across tables (``Journal/verify(batchSize:reportLimit:acrossTables:)``); a relation with
    /// a damaged row in it is not checked, since the damaged row is reported already.
    public typealias Inconsistency = Finding

    /// Every table, in the order they were read.
    public internal(set) var tables: [Table]
    /// The damaged rows, in table and key order: the first `reportLimit` of them (``damagedRows``
    /// counts them all).
    public internal(set) var damage: [DamagedRow] = []
    /// Whether the tables were checked against each other (see ``Inconsistency``).
    public internal(set) var checkedAcrossTables = false
    /// Where the tables disagree: the first `reportLimit` (``inconsistencyCount`` counts them all).
    public internal(set) var inconsistencies: [Inconsistency] = []
    /// How many disagreements the check across tables found.
    public internal(set) var inconsistencyCount = 0

    /// How many rows were read.
    public var rows: Int { tables.reduce(0) { $0 + $1.rows } }
    /// How many rows failed a check.
    public var damagedRows: Int { tables.reduce(0) { $0 + $1.damagedRows } }
    /// Whether every row passed its checks and the tables agree.
    public var isIntact: Bool { damagedRows == 0 && inconsistencyCount == 0 }

    public var description: String {
        let counts = tables.map { table in
            table.damagedRows == 0 ? "\(table.name) \(table.rows)" : "\(table.name) \(table.rows) (\(table.damagedRows) damaged)"
        }
        var verdict: [String] = []
        if damagedRows > 0 { verdict.append("\(damagedRows) damaged rows") }
        if inconsistencyCount > 0 { verdict.append("\(inconsistencyCount) inconsistencies") }
        if verdict.isEmpty { verdict.append(checkedAcrossTables ? "intact" : "intact rows (tables not checked against each other)") }
        var text = "\(verdict.joined(separator: ", ")) — rows: \(counts.joined(separator: ", "))"
        for row in damage { text += "\n  \(row)" }
        if damage.count < damagedRows { text += "\n  … and \(damagedRows - damage.count) more damaged rows" }
        for inconsistency in inconsistencies { text += "\n  \(inconsistency)" }
        if inconsistencies.count < inconsistencyCount {
            text += "\n  … and \(inconsistencyCount - inconsistencies.count) more inconsistencies"
        }
        return text
    }
}

extension Journal {
    /// Reads a task's key (the `tasks` table's keys are the application's): the entity that owns
    /// the task, or `nil` for a task that names none (or a key it does not know).
    public typealias TaskOwner = @Sendable (_ key: UnsafeRawBufferPointer) -> EntityKey?

    /// Reads every row of every table and checks it: the directory's integrity check (what
    /// `PRAGMA integrity_check` is to SQLite). It reads only, in read transactions of at most
    /// `batchSize` rows each, so it may run while the journal commits (a long read transaction
    /// would keep LMDB from reusing the pages freed meanwhile); rows moved or deleted by commits
    /// in between may then be counted twice or not at all, but an intact row is never reported
    /// damaged.
    ///
    /// Then, with `acrossTables`, it checks that the tables agree (see
    /// ``JournalVerification/Inconsistency``): every entity's events consecutive across its history
    /// chunks and its log records, names and metadata naming each other, snapshots, timers and
    /// results with the rows they need, and — with the configuration's ``Configuration/taskOwner`` —
    /// tasks of entities that exist. That check needs a consistent view, so it reads in one read
    /// transaction: while it runs (about as long as the row checks), LMDB cannot reuse the pages
    /// that commits free meanwhile, and the file may grow by what they write. Its memory is bounded
    /// by the registrations waiting to merge and the entities with events in the log, plus 8 bytes a
    /// recorded result.
    ///
    /// ``verify(directory:batchSize:reportLimit:acrossTables:)`` does the same without opening the
    /// journal, for a directory whose open fails.
    /// - Parameters:
    ///   - batchSize: rows read per read transaction by the row checks.
    ///   - reportLimit: damaged rows described in ``JournalVerification/damage``, and inconsistencies
    ///     in ``JournalVerification/inconsistencies`` (all are counted).
    ///   - acrossTables: whether to check the tables against each other.
    /// - Throws: ``JournalError/Code/storage`` if LMDB fails (a read, not a check, failing).
    public func verify(batchSize: Int = 10_000, reportLimit: Int = 1_000, acrossTables: Bool = true) throws(JournalError) -> JournalVerification {
        try Self.verify(environment, stores: stores, batchSize: batchSize, reportLimit: reportLimit, acrossTables: acrossTables,
                        taskOwner: configuration.taskOwner)
    }

    /// ``verify(batchSize:reportLimit:acrossTables:)`` on a directory the journal need not open: LMDB's
    /// environment alone, none of the journal's recovery (which refuses some damage, a damaged
    /// pending name for one). It takes no lock: another process may have the journal open, and
    /// keeps committing meanwhile. `taskOwner` reads tasks' keys, as the configuration's does for
    /// ``verify(batchSize:reportLimit:acrossTables:)`` (``EntityRuntime/verify(directory:batchSize:reportLimit:acrossTables:)``
    /// passes the runtime's).
    /// - Throws: ``JournalError`` with code `storage` if the directory holds no journal or LMDB
    ///   fails, `alreadyOpen` if this process has it open with other settings (verify that journal
    ///   instead), `unsupportedFormat` if a table is in another format than this version writes (an
    ///   older one: open the journal once, which upgrades it; a newer one: verify with that version).
    public static func verify(directory: String, batchSize: Int = 10_000, reportLimit: Int = 1_000,
                              acrossTables: Bool = true, taskOwner: TaskOwner? = nil) throws(JournalError) -> JournalVerification {
        guard access(directory + "/data.mdb", F_OK) == 0 else {
            throw JournalError(.storage, "'\(directory)' holds no journal (no data.mdb)")
        }
        let environment: Environment
        switch Result(catching: { () throws(LMDBError) in try Environment.open(.init(directory: directory)) }) {
        case .success(let opened): environment = opened
        case .failure(let error) where error.code == .alreadyOpenDifferently:
            throw JournalError(.alreadyOpen, "the journal in '\(directory)' is open in this process; call verify() on it")
        case .failure(let error): throw JournalError.storage(error, "opening '\(directory)'")
        }
        defer { environment.close() }
        do {
            try checkFormats(environment)
            return try verify(environment, stores: Stores(environment, create: false), batchSize: batchSize,
                              reportLimit: reportLimit, acrossTables: acrossTables, taskOwner: taskOwner)
        } catch {
            throw JournalError.storage(error, "verifying '\(directory)'")
        }
    }

    /// Refuses a directory whose tables are not all in the formats this version writes.
    private static func checkFormats(_ environment: Environment) throws {
        let formats: Database
        switch Result(catching: { () throws(LMDBError) in try environment.database("format", create: false) }) {
        case .success(let database): formats = database
        case .failure(let error) where error.code == .notFound:
            throw JournalError(.unsupportedFormat, "the journal was written by an older version of DurableEntities (it has no format table); open it once with this version, which upgrades it, then verify it")
        case .failure(let error): throw error
        }
        try environment.read { txn in
            for format in JournalLayout.storedFormats {
                let found = try storedFormat(of: format, in: txn, formats: formats)
                guard found == format.current else {
                    let stored = found.map { "format \($0)" } ?? "no intact format row"
                    throw JournalError(.unsupportedFormat, "the journal's \(format.table) table has \(stored); this version writes and verifies format \(format.current). An older format is upgraded by opening the journal once with this version; a newer one is verified by the version that wrote it")
                }
            }
        }
    }

    /// The row checks, then (`acrossTables`) the check across tables.
    private static func verify(_ environment: Environment, stores: Stores, batchSize: Int, reportLimit: Int,
                               acrossTables: Bool, taskOwner: TaskOwner?) throws(JournalError) -> JournalVerification {
        var report = try verifyRows(environment, tables: verifiedTables(stores), entities: stores.entities,
                                    batchSize: batchSize, reportLimit: reportLimit)
        guard acrossTables else { return report }
        do {
            var check = CrossTableCheck(stores: stores, reportLimit: reportLimit, taskOwner: taskOwner)
            try environment.read { txn in try check.run(txn) }
            report.checkedAcrossTables = true
            report.inconsistencies = check.found
            report.inconsistencyCount = check.count
        } catch {
            throw JournalError.storage(error, "checking the tables against each other")
        }
        return report
    }

    /// The row checks: each table in batches of rows, one read transaction a batch.
    private static func verifyRows(_ environment: Environment, tables: [VerifiedTable], entities: Database,
                                   batchSize: Int, reportLimit: Int) throws(JournalError) -> JournalVerification {
        let batch = max(1, batchSize)
        var report = JournalVerification(tables: [])
        for table in tables {
            var counts = JournalVerification.Table(name: table.name)
            var after: [UInt8]?
            var done = false
            while !done {
                do {
                    try environment.read { txn in
                        try txn.withCursor(table.database) { cursor in
                            var entry: Cursor.Entry?
                            if let after { entry = try cursor.seek(atLeast: after) } else { entry = try cursor.first() }
                            if let current = entry, let after, current.key.elementsEqual(after) { entry = try cursor.next() }
                            var read = 0
                            while let current = entry, read < batch {
                                read += 1
                                counts.rows += 1
                                if let problem = table.check(current.key, current.value) {
                                    counts.damagedRows += 1
                                    if report.damage.count < reportLimit {
                                        let entity = problem.entity
                                        let name = try entity.flatMap { entity -> EntityName? in
                                            do { return try metadata(of: entity, in: txn, entities: entities)?.name } catch is JournalError { return nil }
                                        }
                                        report.damage.append(JournalVerification.DamagedRow(
                                            table: table.name, key: Array(current.key), entity: entity, name: name,
                                            sequence: problem.sequence, problem: problem.text))
                                    }
                                }
                                after = Array(current.key)
                                entry = try cursor.next()
                            }
                            done = entry == nil
                        }
                    }
                } catch {
                    throw JournalError.storage(error, "verifying the table '\(table.name)'")
                }
            }
            report.tables.append(counts)
        }
        return report
    }

    /// What is wrong with one row.
    private struct Problem {
        var entity: EntityKey?
        var sequence: UInt64?
        var text: String
    }

    /// A table and the check of each of its rows (`nil`: intact).
    private struct VerifiedTable {
        let name: String
        let database: Database
        let check: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) -> Problem?
    }

    private static func verifiedTables(_ stores: Stores) -> [VerifiedTable] {
        func entity(at offset: Int, of bytes: UnsafeRawBufferPointer) -> EntityKey? {
            bytes.count >= offset + 8 ? EntityKey(rawValue: bytes.bigEndianUInt64(at: offset)) : nil
        }
        func keyed(_ what: String, keyCount: Int? = nil, entityAt offset: Int? = nil) -> (UnsafeRawBufferPointer, UnsafeRawBufferPointer) -> Problem? {
            { key, value in
                let owner = offset.flatMap { entity(at: $0, of: key) }
                if let keyCount, key.count != keyCount {
                    return Problem(entity: owner, text: "\(what)'s key has \(key.count) bytes instead of \(keyCount)")
                }
                guard JournalLayout.keyedPayload(key: key, value: value) != nil else {
                    return Problem(entity: owner, text: "\(what)'s row fails its check (its key or its payload is damaged)")
                }
                return nil
            }
        }
        return [
            VerifiedTable(name: "log", database: stores.log) { key, value in
                guard key.count == 8 else { return Problem(text: "the key has \(key.count) bytes instead of 8") }
                guard value.count >= JournalLayout.logHeader else {
                    return Problem(entity: entity(at: 0, of: value), text: "the record is truncated (\(value.count) bytes)")
                }
                let payload = UnsafeRawBufferPointer(rebasing: value[JournalLayout.logHeader...])
                guard CRC32C.checksum(payload) == JournalLayout.flippedCheck(ofLogRecord: value) else {
                    return Problem(entity: entity(at: 0, of: value), sequence: value.bigEndianUInt64(at: 8),
                                   text: "the record fails its check (its header or its payload is damaged)")
                }
                return nil
            },
            VerifiedTable(name: "history", database: stores.history) { key, value in
                guard key.count == 16 else { return Problem(entity: entity(at: 0, of: key), text: "the key has \(key.count) bytes instead of 16") }
                let owner = entity(at: 0, of: key)
                let chunk = HistoryChunk(firstSequence: key.bigEndianUInt64(at: 8), bytes: value)
                var damaged: [UInt64] = []
                var placeholders = 0
                let broken = chunk.forEach { sequence, record in
                    let payload = UnsafeRawBufferPointer(rebasing: record[JournalLayout.checksumBytes...])
                    if CRC32C.checksum(payload) != record.littleEndianUInt32(at: 0) {
                        damaged.append(sequence)
                        if payload.elementsEqual(JournalLayout.missingRecordPayload) { placeholders += 1 }
                    }
                    return true
                }
                if let broken {
                    return Problem(entity: owner, sequence: broken, text: "the history chunk is malformed from this event on (a damaged length or count)")
                }
                guard chunk.isWellFormed else {
                    return Problem(entity: owner, sequence: chunk.firstSequence,
                                   text: "the history chunk's event count (\(chunk.count ?? 0)) does not match its \(value.count) bytes")
                }
                guard let first = damaged.first else { return nil }
                var text = damaged.count == 1 ? "an event fails its checksum" : "\(damaged.count) events fail their checksums (sequences \(damaged.map(String.init).joined(separator: ", ")))"
                if placeholders > 0 {
                    text += placeholders == damaged.count
                        ? ": the log had no intact record of \(placeholders == 1 ? "it" : "them") when the tail moved to history"
                        : " (\(placeholders) of them lost from the log before the tail moved to history)"
                }
                return Problem(entity: owner, sequence: first, text: text)
            },
            VerifiedTable(name: "names", database: stores.names) { key, value in
                let owner = value.count == 8 ? EntityKey(rawValue: value.bigEndianUInt64(at: 0)) : nil
                guard EntityName(nameKey: key) != nil else { return Problem(entity: owner, text: "the key is not an entity type, a zero byte and an id") }
                guard owner != nil else { return Problem(text: "the value has \(value.count) bytes instead of an entity key's 8") }
                return nil
            },
            VerifiedTable(name: "pending-names", database: stores.pendingNames) { key, value in
                guard key.count == 8 else { return Problem(text: "the key has \(key.count) bytes instead of 8") }
                if key.bigEndianUInt64(at: 0) == 0 {
                    return value.count == 8 ? nil : Problem(text: "the merge watermark has \(value.count) bytes instead of 8")
                }
                guard value.count > 8 else { return Problem(text: "the registration is truncated (\(value.count) bytes)") }
                guard EntityName(nameKey: UnsafeRawBufferPointer(rebasing: value[8...])) != nil else {
                    return Problem(entity: entity(at: 0, of: value), text: "the registration's name is not an entity type, a zero byte and an id")
                }
                return nil
            },
            VerifiedTable(name: "entities", database: stores.entities) { key, value in
                guard key.count == 8 else { return Problem(text: "the key has \(key.count) bytes instead of 8") }
                let owner = EntityKey(rawValue: key.bigEndianUInt64(at: 0))
                do throws(JournalError) {
                    _ = try EntityMetadata.decode(value, key: owner)
                } catch {
                    return Problem(entity: owner, text: error.message)
                }
                return nil
            },
            VerifiedTable(name: "snapshots", database: stores.snapshots) { key, value in
                guard key.count == 8 else { return Problem(text: "the key has \(key.count) bytes instead of 8") }
                let owner = EntityKey(rawValue: key.bigEndianUInt64(at: 0))
                guard value.count >= 12 else { return Problem(entity: owner, text: "the snapshot is truncated (\(value.count) bytes)") }
                let stored = value.bigEndianUInt64(at: 0)
                let sequence = stored & ~JournalLayout.snapshotHeaderChecked
                let header = stored & JournalLayout.snapshotHeaderChecked == 0
                    ? 0 : JournalLayout.headerCheck(entity: owner.rawValue, sequence: sequence)
                let payload = UnsafeRawBufferPointer(rebasing: value[12...])
                guard CRC32C.checksum(payload) ^ header == value.littleEndianUInt32(at: 8) else {
                    return Problem(entity: owner, sequence: sequence, text: "the snapshot fails its checksum")
                }
                return nil
            },
            VerifiedTable(name: "timers", database: stores.timers, check: keyed("the timer", keyCount: 24, entityAt: 8)),
            VerifiedTable(name: "tasks", database: stores.tasks, check: keyed("the task")),
            VerifiedTable(name: "idempotency", database: stores.idempotency, check: keyed("the result")),
            VerifiedTable(name: "idempotency-times", database: stores.resultTimes) { key, value in
                guard key.count > 8 else { return Problem(text: "the key has \(key.count) bytes: not a time and an idempotency key") }
                return value.isEmpty ? nil : Problem(text: "the row holds \(value.count) bytes where it holds none")
            },
        ]
    }
}
