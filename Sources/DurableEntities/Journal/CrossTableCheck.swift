import LMDB

/// The verification's check across tables: in one read transaction (a consistent snapshot), the
/// relations every commit keeps.
///
/// - `names` and the registrations in `pending-names` name entities whose metadata names them back,
///   and every entity's metadata has its name in one of them.
/// - An entity's events are consecutive: its history chunks follow each other without a gap or an
///   overlap from its retention floor (1 when nothing was pruned), and its events still in the log
///   (those past its history) continue them.
/// - History, log events, snapshots and timers belong to entities that have metadata; a snapshot is
///   not past its entity's latest event. So do tasks, when a ``Journal/TaskOwner`` reads their keys.
/// - Every recorded result has its time row (what expiry reads) and every time row its result.
///
/// Memory stays bounded by the tables that are bounded: the registrations waiting to merge and the
/// entities with events in the log. The results' time rows are remembered as one 8-byte hash each.
struct CrossTableCheck {
    let stores: Journal.Stores
    let reportLimit: Int
    let taskOwner: Journal.TaskOwner?
    private(set) var found: [JournalVerification.Inconsistency] = []
    private(set) var count = 0

    /// An entity's metadata record as the check sees it.
    private enum Metadata {
        case missing
        /// Damaged: reported by its row's check; relations through it are not checked.
        case damaged
        case intact(EntityMetadata)

        var name: EntityName? { if case .intact(let metadata) = self { metadata.name } else { nil } }
    }

    init(stores: Journal.Stores, reportLimit: Int, taskOwner: Journal.TaskOwner? = nil) {
        self.stores = stores
        self.reportLimit = reportLimit
        self.taskOwner = taskOwner
    }

    mutating func run(_ txn: borrowing ReadTransaction) throws {
        try checkNames(txn)
        let next = try checkHistoryAndLog(txn)
        try checkSnapshots(txn, next: next)
        try checkTimers(txn)
        try checkTasks(txn)
        try checkResults(txn)
    }

    private mutating func report(_ table: String, key: [UInt8]? = nil, entity: EntityKey?, metadata: Metadata = .missing,
                                 sequence: UInt64? = nil, _ problem: String) {
        count += 1
        guard found.count < reportLimit else { return }
        found.append(.init(table: table, key: key, entity: entity, name: metadata.name, sequence: sequence, problem: problem))
    }

    private func metadata(of entity: EntityKey, in txn: borrowing ReadTransaction) throws -> Metadata {
        do {
            return try Journal.metadata(of: entity, in: txn, entities: stores.entities).map { .intact($0) } ?? .missing
        } catch is JournalError {
            return .damaged
        }
    }

    /// `names` and `pending-names` against `entities`, both ways.
    private mutating func checkNames(_ txn: borrowing ReadTransaction) throws {
        // Registrations not yet merged (at or above the watermark): the name's key → its entity.
        var pending: [[UInt8]: EntityKey] = [:]
        var pendingRows: [(row: [UInt8], name: [UInt8], entity: EntityKey)] = []
        var watermark: UInt64 = 1
        // A damaged registration may be any name's: a name found nowhere else is then not reported.
        var damagedRegistrations = false
        try Self.rows(stores.pendingNames, in: txn) { key, value in
            guard key.count == 8 else { return }
            let row = key.bigEndianUInt64(at: 0)
            if row == 0 {
                if value.count == 8 { watermark = value.bigEndianUInt64(at: 0) }
                return
            }
            // Rows below the watermark were merged (their deletion had not committed yet).
            guard row >= watermark else { return }
            guard value.count > 8, EntityName(nameKey: UnsafeRawBufferPointer(rebasing: value[8...])) != nil else {
                damagedRegistrations = true
                return
            }
            let name = Array(value[8...])
            let entity = EntityKey(rawValue: value.bigEndianUInt64(at: 0))
            pending[name] = entity
            pendingRows.append((Array(key), name, entity))
        }
        // Each name, merged or pending, is registered under an entity whose metadata names it.
        try Self.rows(stores.names, in: txn) { key, value in
            guard value.count == 8, EntityName(nameKey: key) != nil else { return }
            try checkRegistration("names", row: Array(key), name: key, entity: EntityKey(rawValue: value.bigEndianUInt64(at: 0)), in: txn)
        }
        for registration in pendingRows {
            try registration.name.withUnsafeBytes { name in
                try checkRegistration("pending-names", row: registration.row, name: name, entity: registration.entity, in: txn)
            }
        }
        // Each entity's name is registered, under it.
        try Self.rows(stores.entities, in: txn) { key, value in
            guard key.count == 8 else { return }
            let entity = EntityKey(rawValue: key.bigEndianUInt64(at: 0))
            guard let stored = try? EntityMetadata.decode(value, key: entity), let count = try? stored.name.nameKeyCount() else { return }
            // `.some(nil)`: the name's row in `names` is damaged (its check reports it).
            let registered: EntityKey?? = try stored.name.withNameKey(count: count) { name in
                let merged: EntityKey?? = try txn.withValue(forKey: name, in: stores.names) { value in
                    value.map { $0.count == 8 ? EntityKey(rawValue: $0.bigEndianUInt64(at: 0)) : nil }
                }
                return merged ?? pending[Array(name)].map { .some($0) }
            }
            switch registered {
            case .some(.some(let registered)) where registered != entity:
                report("names", entity: entity, metadata: .intact(stored), "the names index gives the entity's name to entity \(registered)")
            case nil where !damagedRegistrations:
                report("names", entity: entity, metadata: .intact(stored), "the entity's name is neither in the names index nor among the registrations waiting for it")
            default:
                break
            }
        }
    }

    /// A `names` or `pending-names` row: its entity's metadata names it.
    private mutating func checkRegistration(_ table: String, row: [UInt8], name: UnsafeRawBufferPointer, entity: EntityKey,
                                            in txn: borrowing ReadTransaction) throws {
        let what = EntityName(nameKey: name).map { "the name \($0)" } ?? "the name"
        let metadata = try metadata(of: entity, in: txn)
        switch metadata {
        case .damaged:
            return
        case .missing:
            report(table, key: row, entity: entity, "\(what) is registered under an entity that has no metadata record")
        case .intact(let stored):
            guard let count = try? stored.name.nameKeyCount(), stored.name.withNameKey(count: count, { name.elementsEqual($0) }) else {
                report(table, key: row, entity: entity, metadata: metadata, "\(what) is registered under an entity whose metadata names \(stored.name)")
                return
            }
        }
    }

    /// Each entity's history chunks, then its events in the log: consecutive from its retention
    /// floor. Returns, for each entity with records in the log, the sequence after its latest event
    /// (`nil` when unknown).
    private mutating func checkHistoryAndLog(_ txn: borrowing ReadTransaction) throws -> [UInt64: UInt64?] {
        var entity: UInt64 = 0
        var metadata = Metadata.missing
        // The sequence the entity's next chunk must start at; `nil` when a damaged metadata record or a
        // malformed chunk (each reported by its row's check) leaves it unknown.
        var next: UInt64?
        try Self.rows(stores.history, in: txn) { key, value in
            guard key.count == 16 else { return }
            let owner = key.bigEndianUInt64(at: 0)
            let chunk = HistoryChunk(firstSequence: key.bigEndianUInt64(at: 8), bytes: value)
            if owner != entity {
                entity = owner
                metadata = try self.metadata(of: EntityKey(rawValue: owner), in: txn)
                switch metadata {
                case .intact(let stored): next = max(1, stored.prunedBefore)
                case .damaged: next = nil
                case .missing:
                    next = nil
                    report("entities", entity: EntityKey(rawValue: owner), sequence: chunk.firstSequence,
                           "the entity has events in history but no metadata record")
                }
            }
            // The chunk's first sequence is its key's, whether or not the chunk itself is intact.
            if let expected = next, chunk.firstSequence != expected {
                report("history", key: Array(key), entity: EntityKey(rawValue: owner), metadata: metadata, sequence: min(expected, chunk.firstSequence),
                       chunk.firstSequence > expected
                           ? "events \(expected)...\(chunk.firstSequence - 1) are missing: the history goes on at \(chunk.firstSequence)"
                           : "the chunk starting at \(chunk.firstSequence) repeats events up to \(expected - 1)")
            }
            next = chunk.isWellFormed ? chunk.lastSequence.map { $0 + 1 } : nil
        }
        // The log: records past an entity's history (its tail) continue it, one sequence a record.
        // Entity → the sequence its next live record must have; `.some(nil)`: not checkable (its last
        // history chunk is damaged). A log holds runs of one entity's records (a turn's events): the
        // run's entity is kept aside, out of the dictionary.
        var expected: [UInt64: UInt64?] = [:]
        var run: (entity: UInt64, want: UInt64?)?
        try Self.rows(stores.log, in: txn) { key, value in
            guard key.count == 8, value.count >= JournalLayout.logHeader else { return }
            let entity = value.bigEndianUInt64(at: 0)
            let sequence = value.bigEndianUInt64(at: 8)
            // Checked only for the records that count: most of a log is records moved to history already.
            var intact: Bool {
                CRC32C.checksum(UnsafeRawBufferPointer(rebasing: value[JournalLayout.logHeader...])) == JournalLayout.flippedCheck(ofLogRecord: value)
            }
            if run?.entity != entity {
                if let run { expected[run.entity] = .some(run.want) }
                if let known = expected[entity] {
                    run = (entity, known)
                } else {
                    if intact, case .missing = try self.metadata(of: EntityKey(rawValue: entity), in: txn) {
                        report("entities", entity: EntityKey(rawValue: entity), sequence: sequence, "the entity has events in the log but no metadata record")
                    }
                    run = (entity, try latestInHistory(of: entity, in: txn).map { $0 + 1 })
                }
            }
            // Below `want`: moved to history already, or pruned (the log keeps such records until trimmed).
            guard let want = run?.want, sequence >= want else { return }
            if sequence > want {
                // A damaged record claiming a later sequence: its header may be what is damaged (its check reports it).
                guard intact else { return }
                let owner = EntityKey(rawValue: entity)
                report("log", key: Array(key), entity: owner, metadata: try self.metadata(of: owner, in: txn), sequence: want,
                       "events \(want)...\(sequence - 1) are missing: the entity's events in the log go on at \(sequence)")
            }
            run?.want = sequence + 1
        }
        if let run { expected[run.entity] = .some(run.want) }
        return expected
    }

    /// Snapshots: of an entity with metadata, not past its latest event.
    private mutating func checkSnapshots(_ txn: borrowing ReadTransaction, next: [UInt64: UInt64?]) throws {
        try Self.rows(stores.snapshots, in: txn) { key, value in
            guard key.count == 8, value.count >= 12 else { return }
            let entity = EntityKey(rawValue: key.bigEndianUInt64(at: 0))
            let sequence = value.bigEndianUInt64(at: 0) & ~JournalLayout.snapshotHeaderChecked
            let metadata = try metadata(of: entity, in: txn)
            if case .missing = metadata {
                report("entities", entity: entity, sequence: sequence, "the entity has a snapshot but no metadata record")
                return
            }
            let latest: UInt64? = if let after = next[entity.rawValue] { after.map { $0 - 1 } } else { try latestInHistory(of: entity.rawValue, in: txn) }
            if let latest, sequence > latest {
                report("snapshots", key: Array(key), entity: entity, metadata: metadata, sequence: sequence,
                       "the snapshot is of sequence \(sequence), past the entity's latest event (\(latest))")
            }
        }
    }

    /// Timers: of entities with metadata.
    private mutating func checkTimers(_ txn: borrowing ReadTransaction) throws {
        var last: (entity: EntityKey, missing: Bool)?
        try Self.rows(stores.timers, in: txn) { key, value in
            guard key.count == 24, JournalLayout.keyedPayload(key: key, value: value) != nil else { return }
            let entity = EntityKey(rawValue: key.bigEndianUInt64(at: 8))
            if try lacksMetadata(entity, lastAsked: &last, in: txn) {
                report("timers", key: Array(key), entity: entity,
                       "the timer (due at \(key.bigEndianUInt64(at: 0)) ns, id \(key.bigEndianUInt64(at: 16))) belongs to an entity that has no metadata record")
            }
        }
    }

    /// Tasks whose keys name an owner: of entities with metadata.
    private mutating func checkTasks(_ txn: borrowing ReadTransaction) throws {
        guard let taskOwner else { return }
        var last: (entity: EntityKey, missing: Bool)?
        try Self.rows(stores.tasks, in: txn) { key, value in
            // A damaged row's key may be what is damaged (its check reports it).
            guard JournalLayout.keyedPayload(key: key, value: value) != nil, let entity = taskOwner(key) else { return }
            if try lacksMetadata(entity, lastAsked: &last, in: txn) {
                report("tasks", key: Array(key), entity: entity, "the task belongs to an entity that has no metadata record")
            }
        }
    }

    /// Whether `entity` has no metadata record, looked up once for each run of one entity's rows
    /// (`lastAsked`: the table's rows of one entity sort together).
    private func lacksMetadata(_ entity: EntityKey, lastAsked: inout (entity: EntityKey, missing: Bool)?,
                               in txn: borrowing ReadTransaction) throws -> Bool {
        if let lastAsked, lastAsked.entity == entity { return lastAsked.missing }
        let missing = if case .missing = try metadata(of: entity, in: txn) { true } else { false }
        lastAsked = (entity, missing)
        return missing
    }

    /// Results and their time rows, both ways.
    private mutating func checkResults(_ txn: borrowing ReadTransaction) throws {
        var timed = Set<Int>()
        try Self.rows(stores.resultTimes, in: txn) { key, _ in
            guard key.count > 8 else { return }
            let result = UnsafeRawBufferPointer(rebasing: key[8...])
            timed.insert(Self.hash(result))
            if try !txn.withValue(forKey: result, in: stores.idempotency, { $0 != nil }) {
                report("idempotency", key: Array(result), entity: nil,
                       "a time row (recorded at \(key.bigEndianUInt64(at: 0)) ns) names a result that is not stored")
            }
        }
        // A hash shared by two keys could hide a missing time row; it never reports an intact one.
        try Self.rows(stores.idempotency, in: txn) { key, _ in
            if !timed.contains(Self.hash(key)) {
                report("idempotency-times", key: Array(key), entity: nil, "the result has no time row: it never expires")
            }
        }
    }

    /// Calls `body` with each row of `database`, in key order.
    private static func rows(_ database: Database, in txn: borrowing ReadTransaction,
                             _ body: (_ key: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer) throws -> Void) throws {
        try txn.withCursor(database) { cursor in
            var entry = try cursor.first()
            while let current = entry {
                try body(current.key, current.value)
                entry = try cursor.next()
            }
        }
    }

    /// The latest sequence of `entity` in history (or its retention floor); `nil` when its last chunk is damaged.
    private func latestInHistory(of entity: UInt64, in txn: borrowing ReadTransaction) throws -> UInt64? {
        do {
            return try Journal.latestCommittedSequence(of: entity, in: txn, stores: stores)
        } catch is JournalError {
            return nil
        }
    }

    private static func hash(_ bytes: UnsafeRawBufferPointer) -> Int {
        var hasher = Hasher()
        hasher.combine(bytes: bytes)
        return hasher.finalize()
    }
}
