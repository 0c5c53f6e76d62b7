import Dispatch
import LMDB
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The durable, group-committed store of every entity's history, snapshots, timers, idempotency
/// results and metadata: one LMDB environment in one directory.
///
/// **Why the layout.** One fsync'd LMDB commit costs ~360 µs on the reference machine, so durable
/// throughput exists only through group commit; and a commit that lands in 1,000 different entities'
/// key ranges dirties ~1,000 pages and runs ~10× slower than one that appends at one end of a B-tree.
/// So the journal writes every event first to an append-only `log` keyed by a global position
/// (each group commit touches a few pages at the log's end), and moves an entity's events into its
/// own contiguous `history` range only in bulk: when it has ``Configuration/coalesceThreshold``
/// events waiting, or when its oldest waiting event falls out of a ``Configuration/logWindow``-event
/// window. A move writes one page for many events of one entity. The exception is a new entity: the
/// events that arrive in the batch that registers it go straight into its history range, which is at
/// the history's end (its key is among the newest), so they cost what log records would and are never
/// moved (a short workflow that starts and ends in one turn never touches the log). A new entity's
/// name, the one write that lands at a random place, waits and merges into the `names` index in bulk
/// (``PendingNames``). Reads merge the two levels;
/// replaying an entity is a range scan plus at most a window's worth of point reads.
///
/// **Writes** go through ``commit(_:)`` or ``submit(_:completion:)``: a dedicated writer thread owns
/// every write transaction (LMDB's write lock belongs to a thread), takes whatever is queued, commits it
/// in one transaction, and only then completes the callers. **Reads** are synchronous and may run on
/// any thread, concurrently with commits.
///
/// ## Usage
/// ```swift
/// let journal = try Journal(configuration: .init(directory: "./data"))
/// let key = try await journal.register(EntityName(type: "Account", id: "alice"))
/// var batch = JournalBatch()
/// batch.append(key, sequence: 1, payload: Array("deposited 100".utf8))
/// try await journal.commit(batch)             // returns once durable
/// let events = try journal.events(of: key)
/// journal.close()
/// ```
public final class Journal: Sendable {
    /// Options for opening a journal.
    public struct Configuration: Sendable {
        /// The LMDB directory; created when missing.
        public var directory: String
        /// `durable` (fsync per commit, the default), `noMetaSync`, or `relaxed` (acknowledges before fsync).
        public var durability: Environment.Durability
        /// The initial map size; it grows by itself up to ``maxMapSize``.
        public var initialMapSize: Int
        /// The largest the map may grow to; past it, commits fail with a `storage` error.
        public var maxMapSize: Int
        /// The most operations one LMDB transaction takes from the queue.
        public var maxOperationsPerCommit: Int
        /// An entity's events move from the log to its history range once about this many wait
        /// (each entity's threshold is spread up to +50% by key). Measured on the reference machine
        /// (`journal-append --entities 1000`): 32 → 327K events/s, 64 → 380K, 128 → 486K, 256 → 616K.
        /// Larger means fewer, fuller history pages per move, and more point reads of the log when an
        /// entity's newest events are replayed.
        public var coalesceThreshold: Int
        /// Events older than this many log positions are moved regardless of count, bounding the log
        /// (and the in-memory tail index, 8 bytes an event). With 100,000 entities: 262,144 → 303K
        /// events/s, 1,048,576 → 467K.
        public var logWindow: Int
        /// The largest payload accepted for an event, snapshot or result.
        public var maxPayloadBytes: Int
        /// Bytes of the newest appended events the writer keeps in memory, so that moving a tail into
        /// its history range reads them from there instead of searching the log for each (0: off).
        /// Memory: this many bytes plus a slot table of 3/8 of it (44 MiB at the default), resident
        /// only as far as events have gone through the log.
        public var recentRecordBytes: Int
        /// `MDB_WRITEMAP`: LMDB writes through the memory map instead of copying dirty pages.
        public var writeMap: Bool
        /// How many newly registered entity names wait (in memory, and in an append-only table)
        /// before they are sorted and merged into the `names` index in bulk. Names arrive in no
        /// particular order, so inserting each at once writes a random index page per new entity;
        /// merged in key order, a page takes many. Larger means fewer index pages written per name
        /// (about `index leaves / limit` of a page each) and more memory (~150 bytes a waiting name).
        /// 1 merges every commit's names in the next commits.
        public var deferredNameLimit: Int
        /// How long a commit may wait, after the previous one started, for the submissions of work
        /// that ``Journal/pace(with:)``'s producers report on its way (`.zero`: it never waits). Without
        /// producers a commit takes whatever is queued at once. Each commit costs a fixed share of
        /// CPU, so on a busy machine fewer, fuller commits leave more to the work itself: in
        /// `saga-transfer --param local=true` (1,000 in flight) 2 ms made ~800 commits per 100,000
        /// transfers instead of ~2,200, for 5–7% less CPU a transfer (side by side) and, alternating,
        /// +14% throughput and −19% p99 (medians of 6 runs).
        public var commitWindow: Duration
        /// The least time from one commit's start to the next one's, whether or not any work is on
        /// its way (`.zero`, the default: none). The ``commitWindow`` paces commits only while the
        /// producers work; at moderate load they go idle after almost every turn, so commits stay
        /// small and frequent, each at its fixed cost. A linger makes them fewer and fuller at the
        /// price of latency: every acknowledgement may wait up to this long. The first commit after
        /// opening and a full batch (``maxOperationsPerCommit``) never wait, and closing commits at
        /// once. In `saga-transfer --param rate=5000` (an open loop) 3 ms made ~6,400 commits per
        /// 100,000 transfers instead of ~24,000: ~23% less CPU a transfer, and the median latency
        /// went from ~6.5 to ~13 ms.
        public var commitLinger: Duration
        /// Where the journal logs (open, close, recovery figures). Never payloads.
        public var logger: Logger
        /// Which entity owns a task, read from its key (see ``TaskOwner``): with it, ``verify(batchSize:reportLimit:acrossTables:)``
        /// also finds tasks whose entity has no metadata record. The journal itself never reads task
        /// keys. An ``EntityRuntime`` sets its own (``EntityRuntime/taskOwner``).
        public var taskOwner: TaskOwner?
        /// Added to each of the journal's metrics (`durable_entities_journal_*`), e.g.
        /// `[("runtime", "orders")]` when a process has more than one journal. An ``EntityRuntime``
        /// passes its own (``EntityRuntime/Configuration/metricsDimensions``) when these are empty.
        public var metricsDimensions: [(String, String)] = []
        /// Storage failures on purpose, for tests (see ``JournalFaults``); `nil` in use.
        var faults: JournalFaults?

        public init(
            directory: String,
            durability: Environment.Durability = .durable,
            initialMapSize: Int = 1 << 30,
            maxMapSize: Int = 1 << 40,
            maxOperationsPerCommit: Int = 16_384,
            coalesceThreshold: Int = 256,
            logWindow: Int = 1_048_576,
            maxPayloadBytes: Int = 16 << 20,
            recentRecordBytes: Int = 32 << 20,
            writeMap: Bool = false,
            deferredNameLimit: Int = 65_536,
            commitWindow: Duration = .milliseconds(2),
            commitLinger: Duration = .zero,
            logger: Logger = Logger(label: "DurableEntities.Journal"),
            taskOwner: TaskOwner? = nil
        ) {
            self.directory = directory
            self.durability = durability
            self.initialMapSize = initialMapSize
            self.maxMapSize = maxMapSize
            self.maxOperationsPerCommit = maxOperationsPerCommit
            self.coalesceThreshold = coalesceThreshold
            self.logWindow = logWindow
            self.maxPayloadBytes = maxPayloadBytes
            self.recentRecordBytes = recentRecordBytes
            self.writeMap = writeMap
            self.deferredNameLimit = deferredNameLimit
            self.commitWindow = commitWindow
            self.commitLinger = commitLinger
            self.logger = logger
            self.taskOwner = taskOwner
        }
    }

    /// The named databases.
    struct Stores: Sendable {
        let log, history, names, entities, snapshots, timers, idempotency, tasks: Database
        /// The idempotency results by the time they were recorded, for expiry.
        let resultTimes: Database
        /// Registrations not yet merged into `names` (see ``PendingNames``), under a counter; the
        /// row under key 0 holds the merge watermark.
        let pendingNames: Database

        /// Opens the named databases; `create`: those missing are created (else LMDB's `notFound`).
        init(_ environment: Environment, create: Bool = true) throws(LMDBError) {
            log = try environment.database("log", create: create)
            history = try environment.database("history", create: create)
            names = try environment.database("names", create: create)
            entities = try environment.database("entities", create: create)
            snapshots = try environment.database("snapshots", create: create)
            timers = try environment.database("timers", create: create)
            idempotency = try environment.database("idempotency", create: create)
            tasks = try environment.database("tasks", create: create)
            resultTimes = try environment.database("idempotency-times", create: create)
            pendingNames = try environment.database("pending-names", create: create)
        }
    }

    public let configuration: Configuration
    let environment: Environment
    let stores: Stores
    let tails: TailIndex
    let keys: KeyAllocator
    /// Registered names not yet in `names`.
    let pending: PendingNames
    private let writer: GroupCommitWriter
    private let lockDescriptor: Int32
    private let closed = Atomic<Bool>(false)
    /// What the journal found as it opened (also in its "journal opened" log line).
    public let opened: OpenSummary

    /// What a journal found as it opened: how much recovery had to rebuild.
    public struct OpenSummary: Sendable, Equatable {
        /// Entities registered in the directory (every key ever given out).
        public var entities: UInt64
        /// Events still in the log (not yet moved to their entities' histories), which the open
        /// read to rebuild its index of them.
        public var tailEvents: Int
        /// Entities with events in the log.
        public var tailEntities: Int
        /// Registrations not yet merged into the name index.
        public var pendingNames: Int
        /// Entities whose events in the log were found damaged (see ``JournalError/Code/corruptedRecord``).
        public var damagedTails: Int
        /// Log records left out: each failed its check and stood in for a sequence that an intact
        /// record of the entity its header names claimed next (its header was what was damaged).
        public var strayRecords: Int
    }

    /// Opens the journal in `configuration.directory`, recovering its in-memory index from the log.
    /// Tables written by an older version in an older format (log records whose checks did not
    /// cover their headers; timers, tasks and results without keyed checks) are upgraded first, a
    /// batch a transaction (an open killed part-way leaves tables the next open finishes).
    ///
    /// - Throws: ``JournalError`` with code `alreadyOpen` if another journal (in this process or
    ///   another) has the directory open, `unsupportedFormat` if a newer version of the library wrote
    ///   it (nothing is changed), `storage` if LMDB fails.
    public init(configuration: Configuration) throws(JournalError) {
        self.configuration = configuration
        pending = PendingNames(batch: configuration.deferredNameLimit)
        let directory = configuration.directory
        if mkdir(directory, 0o755) != 0 && errno != EEXIST {
            throw JournalError(.storage, "cannot create the directory '\(directory)': \(String(cString: strerror(errno)))")
        }
        // One journal per directory: an exclusive lock that the kernel releases when the process dies.
        let lockPath = directory + "/journal.lock"
        let fd = Glibc.open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            throw JournalError(.storage, "cannot open '\(lockPath)': \(String(cString: strerror(errno)))")
        }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            Glibc.close(fd)
            throw JournalError(.alreadyOpen,
                               "the journal in '\(directory)' is already open (in this process or another); open it once and share the instance")
        }
        lockDescriptor = fd

        do {
            environment = try Environment.open(.init(
                directory: directory, mapSize: configuration.initialMapSize,
                maxMapSize: configuration.maxMapSize, maxDatabases: 16, durability: configuration.durability,
                writeMap: configuration.writeMap))
        } catch {
            flock(fd, LOCK_UN)
            Glibc.close(fd)
            throw JournalError.storage(error, "opening '\(directory)'")
        }
        do {
            stores = try Stores(environment)
            try Self.upgrade(JournalLayout.storedFormats, environment: environment, logger: configuration.logger)
            try Self.indexUntimedResults(environment: environment, stores: stores)
            tails = TailIndex()
            let recovered = try Self.recover(environment: environment, stores: stores, tails: tails,
                                             coalesceThreshold: configuration.coalesceThreshold)
            keys = KeyAllocator(next: recovered.nextEntityKey)
            pending.add(recovered.pendingNames)
            writer = GroupCommitWriter(
                environment: environment, stores: stores, tails: tails, keys: keys, pending: pending,
                configuration: configuration, recovered: recovered)
            if !recovered.strayRecords.isEmpty {
                configuration.logger.error("the journal's log has records whose header fails its check, each in place of an intact record of the entity it names; they are left out", metadata: [
                    "journal.directory": "\(environment.path)", "log.positions": "\(recovered.strayRecords)"])
            }
            opened = OpenSummary(entities: recovered.nextEntityKey - 1, tailEvents: recovered.tailEvents,
                                 tailEntities: recovered.tailEntities, pendingNames: recovered.pendingNames.count,
                                 damagedTails: recovered.damagedTails.count, strayRecords: recovered.strayRecords.count)
            configuration.logger.info("journal opened", metadata: [
                "journal.directory": "\(environment.path)",
                "journal.entities": "\(opened.entities)",
                "journal.log.tailEvents": "\(opened.tailEvents)",
                "journal.log.tailEntities": "\(opened.tailEntities)",
                "journal.names.pending": "\(opened.pendingNames)",
                "journal.log.damagedTails": "\(opened.damagedTails)",
                "journal.log.strayRecords": "\(opened.strayRecords)",
            ])
        } catch {
            environment.close()
            flock(fd, LOCK_UN)
            Glibc.close(fd)
            throw JournalError.storage(error, "recovering '\(directory)'")
        }
    }

    /// Why the journal stopped committing, or `nil` while it commits. It stops after a commit that
    /// failed with MDB_PANIC (LMDB's "the environment had a fatal error"): from then on every
    /// submission fails at once with ``JournalError/Code/storage``; what was committed stays, and
    /// opening the directory again recovers it.
    public var stopReason: JournalError? { writer.stopReason }

    /// Calls `handler` once if the journal stops (see ``stopReason``), on the completion queue; at
    /// once if it has stopped already.
    public func whenStopped(_ handler: @escaping @Sendable (JournalError) -> Void) {
        writer.whenStopped(handler)
    }

    /// Finishes what is queued (every queued caller is completed), then closes the environment.
    /// Later commits fail with ``JournalError/Code/closed``. Calling it twice has no effect.
    public func close() {
        close(abandoningQueued: false)
    }

    /// Closes as a crash would leave things: batches still queued are not written (their callers get
    /// ``JournalError/Code/closed``); the commit in progress, if any, finishes or not as LMDB decides.
    /// For tests of recovery inside one process.
    @_spi(Testing)
    public func abandon() {
        close(abandoningQueued: true)
    }

    private func close(abandoningQueued: Bool) {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        writer.shutdown(abandoningQueued: abandoningQueued)
        environment.close()
        flock(lockDescriptor, LOCK_UN)
        Glibc.close(lockDescriptor)
        configuration.logger.info("journal closed", metadata: ["journal.directory": "\(environment.path)"])
    }

    deinit { close() }

    // MARK: Writes

    /// Commits `batch` durably and returns once it is (per the configured durability).
    /// - Throws: ``JournalError``: the batch's own refusal (nothing of it written), or the commit's
    ///   failure (nothing of any batch in that transaction written).
    public func commit(_ batch: JournalBatch) async throws(JournalError) -> CommitReceipt {
        let result = await withUnsafeContinuation { (continuation: UnsafeContinuation<Result<CommitReceipt, JournalError>, Never>) in
            submit(batch) { continuation.resume(returning: $0) }
        }
        return try result.get()
    }

    /// Queues `batch`; `completion` runs once it is durable or refused, on the journal's completion
    /// queue (keep it short: hand work off rather than doing it there).
    ///
    /// Batches from one caller commit in the order submitted.
    public func submit(_ batch: JournalBatch, completion: @escaping @Sendable (Result<CommitReceipt, JournalError>) -> Void) {
        writer.enqueue(GroupCommitWriter.Submission(batch: batch, completion: completion))
    }

    /// Paces commits by `producers` from now on: while they report work on its way, a commit waits
    /// for its submissions, up to ``Configuration/commitWindow`` after the previous commit started.
    /// Call ``producersIdle()`` whenever they stop producing, so that a waiting commit starts at once.
    public func pace(with producers: any CommitProducers) {
        writer.pace(with: producers)
    }

    /// The producers given to ``pace(with:)`` have nothing queued or running any more.
    public func producersIdle() {
        writer.producersIdle()
    }

    /// The key of `name`: its registered one, or a fresh key reserved for it (not durable until a
    /// batch with ``JournalBatch/register(_:as:)`` commits).
    public func reserveKey(for name: EntityName) throws(JournalError) -> (key: EntityKey, registered: Bool) {
        if let key = try key(for: name) { return (key, true) }
        return (reserveNewKey(), false)
    }

    /// A fresh key, for a caller that has just found its entity unregistered and is the only one that
    /// registers it (an entity's own turns); not durable until a batch with
    /// ``JournalBatch/register(_:as:)`` commits. Saves ``reserveKey(for:)``'s second lookup.
    public func reserveNewKey() -> EntityKey { EntityKey(rawValue: keys.allocate()) }

    /// Registers `name` if needed and returns its key. Idempotent.
    public func register(_ name: EntityName) async throws(JournalError) -> EntityKey {
        if let key = try key(for: name) { return key }
        var batch = JournalBatch()
        batch.register(name)
        return try await commit(batch).registered[0]
    }

    /// Counters of the writer since open: commits, what they carried, where the time went.
    public struct Statistics: Sendable {
        /// LMDB write transactions committed.
        public var commits = 0
        /// Caller batches committed (or refused) in them.
        public var submissions = 0
        /// Operations (appends, snapshots, …) in those batches.
        public var operations = 0
        /// Time spent building transactions (puts, moves) on the writer thread.
        public var buildTime = Duration.zero
        /// Time spent in `mdb_txn_commit` (page writes and fsync).
        public var commitTime = Duration.zero
    }

    /// The writer's counters since open.
    public var statistics: Statistics { writer.statistics.withLock { $0 } }

    // MARK: Reads

    /// The key registered for `name`, or `nil`.
    public func key(for name: EntityName) throws(JournalError) -> EntityKey? {
        let count = try name.nameKeyCount()
        // Before the read transaction begins: see ``PendingNames`` on why this order finds every name.
        if let key = pending.key(for: name) { return key }
        return try read("looking up \(name)") { txn in
            try name.withNameKey(count: count) { k in
                try txn.withValue(forKey: k, in: stores.names) { value in
                    value.map { EntityKey(rawValue: $0.bigEndianUInt64(at: 0)) }
                }
            }
        }
    }

    /// The names of the registered entities of `type`, in the order of their ids' UTF-8 bytes: at
    /// most `limit` of them, those whose id sorts after `after` (all when `nil`). Page through by
    /// passing a page's last id as the next `after`. Sees every registration acknowledged before
    /// the call.
    public func names(ofType type: String, after: String? = nil, limit: Int) throws(JournalError) -> [EntityName] {
        guard limit > 0 else { return [] }
        _ = try EntityName(type: type, id: after ?? "").nameKeyCount()  // a type LMDB keys can hold
        let prefix = Array(type.utf8) + [0]
        let start = prefix + Array((after ?? "").utf8)
        // Before the read transaction begins: see ``PendingNames`` on why this order finds every name.
        let waiting = pending.names(ofType: type, after: after)
        var found = try read("listing the entities of \(type)") { txn in
            try txn.withCursor(stores.names) { cursor in
                var names: [EntityName] = []
                var entry = try cursor.seek(atLeast: start)
                while let current = entry, names.count < limit, current.key.starts(with: prefix) {
                    if after == nil || !current.key.elementsEqual(start), let name = EntityName(nameKey: current.key) {
                        names.append(name)
                    }
                    entry = try cursor.next()
                }
                return names
            }
        }
        // The first `limit` names after `after` are among the first `limit` stored ones and the
        // waiting ones; a name of a merge under way may be in both.
        if !waiting.isEmpty {
            found = Array(Set(found).union(waiting)).sorted { $0.id.utf8.lexicographicallyPrecedes($1.id.utf8) }
            if found.count > limit { found.removeLast(found.count - limit) }
        }
        return found
    }

    /// The metadata of `entity`, or `nil` if it was never registered.
    public func metadata(of entity: EntityKey) throws(JournalError) -> EntityMetadata? {
        try read("reading metadata of \(entity)") { txn in try metadata(of: entity, in: txn) }
    }

    /// The sequence number of the entity's latest event, or 0 when it has none.
    public func latestSequence(of entity: EntityKey) throws(JournalError) -> UInt64 {
        if let run = tails.run(of: entity.rawValue), !run.positions.isEmpty { return run.latestSequence }
        return try read("reading the latest sequence of \(entity)") { txn in
            try Self.latestCommittedSequence(of: entity.rawValue, in: txn, stores: stores)
        }
    }

    /// Calls `body` with each event of `entity` whose sequence is in `from...through`, in order.
    ///
    /// The payload buffer is valid only during the call. Sees every commit acknowledged before the call.
    /// - Throws: ``JournalError/Code/corruptedRecord`` naming the entity and sequence when a record
    ///   fails its checksum; what `body` throws.
    public func forEachEvent(
        of entity: EntityKey, from: UInt64 = 1, through: UInt64 = .max,
        _ body: (_ sequence: UInt64, _ payload: UnsafeRawBufferPointer) throws -> Void
    ) throws {
        // Copy the entity's tail *before* beginning the read transaction. The writer publishes tail
        // changes only after they commit, so every position in the copy is, in the transaction's
        // snapshot, either still in the log or already moved to history (which is scanned first).
        let run = tails.run(of: entity.rawValue)
        try read("reading the history of \(entity)") { txn in
            var last: UInt64 = from == 0 ? 0 : from - 1
            try txn.withCursor(stores.history) { cursor in
                // Start at the chunk holding `from`: the last chunk that starts at or before it.
                var entry = try cursor.seek(below: Key16(entity.rawValue, from &+ 1).bytes)
                if entry.map({ $0.key.bigEndianUInt64(at: 0) != entity.rawValue }) ?? true {
                    entry = try Key16(entity.rawValue, from).withBytes { try cursor.seek(atLeast: $0) }
                }
                while let current = entry, current.key.count == 16, current.key.bigEndianUInt64(at: 0) == entity.rawValue {
                    let chunk = HistoryChunk(firstSequence: current.key.bigEndianUInt64(at: 8), bytes: current.value)
                    guard chunk.firstSequence <= through else { break }
                    // Events between the last one read and this chunk are in no chunk: deleted by
                    // retention (below the entity's floor), or else lost. Never a silent gap.
                    if chunk.firstSequence > last + 1, chunk.firstSequence > (try metadata(of: entity, in: txn)?.prunedBefore ?? 0) {
                        throw corrupted(entity, last + 1, "its events \(last + 1)...\(chunk.firstSequence - 1) are missing from its history (the next chunk starts at \(chunk.firstSequence))", txn)
                    }
                    var finished = false
                    let broken = try chunk.forEach { sequence, record in
                        guard sequence <= through else { finished = true; return false }
                        guard sequence > last else { return true }
                        try body(sequence, try verified(record, entity: entity, sequence: sequence, in: txn))
                        last = sequence
                        return true
                    }
                    if let broken {
                        throw corrupted(entity, broken, "its history chunk starting at \(chunk.firstSequence) is malformed", txn)
                    }
                    if finished { break }
                    entry = try cursor.next()
                }
            }
            guard let run, last < through else { return }
            for (offset, position) in run.positions.enumerated() {
                let sequence = run.firstSequence + UInt64(offset)
                guard sequence > last else { continue }
                guard sequence <= through else { break }
                try Key8(position).withBytes { k in
                    try txn.withValue(forKey: k, in: stores.log) { value in
                        guard let value else {
                            // Deleted by retention meanwhile (below the entity's retention floor),
                            // or else damage: never a silent gap in a history.
                            guard let floor = try metadata(of: entity, in: txn)?.prunedBefore, sequence >= floor else { return }
                            throw corrupted(entity, sequence, "its log record at position \(position) is missing", txn)
                        }
                        guard value.count >= JournalLayout.logHeader,
                              value.bigEndianUInt64(at: 0) == entity.rawValue,
                              value.bigEndianUInt64(at: 8) == sequence
                        else {
                            throw corrupted(entity, sequence, "its log record at position \(position) belongs elsewhere", txn)
                        }
                        try body(sequence, try verified(UnsafeRawBufferPointer(rebasing: value[16...]), entity: entity, sequence: sequence,
                                                        header: JournalLayout.headerCheck(entity: entity.rawValue, sequence: sequence), in: txn))
                    }
                }
            }
        }
    }

    /// The events of `entity` in `from...through`, copied.
    public func events(of entity: EntityKey, from: UInt64 = 1, through: UInt64 = .max) throws -> [JournalEvent] {
        var events: [JournalEvent] = []
        try forEachEvent(of: entity, from: from, through: through) { sequence, payload in
            events.append(JournalEvent(sequence: sequence, payload: Array(payload)))
        }
        return events
    }

    /// The entity's latest snapshot, or `nil`.
    public func snapshot(of entity: EntityKey) throws(JournalError) -> JournalSnapshot? {
        try read("reading the snapshot of \(entity)") { txn in
            try Key8(entity.rawValue).withBytes { k in
                try txn.withValue(forKey: k, in: stores.snapshots) { value -> JournalSnapshot? in
                    guard let value else { return nil }
                    guard value.count >= 12 else { throw corrupted(entity, nil, "its snapshot record is truncated", txn) }
                    let stored = value.bigEndianUInt64(at: 0)
                    let sequence = stored & ~JournalLayout.snapshotHeaderChecked
                    let header = stored & JournalLayout.snapshotHeaderChecked == 0
                        ? 0 : JournalLayout.headerCheck(entity: entity.rawValue, sequence: sequence)
                    let payload = try verified(UnsafeRawBufferPointer(rebasing: value[8...]), entity: entity, sequence: sequence,
                                               header: header, in: txn)
                    return JournalSnapshot(sequence: sequence, payload: Array(payload))
                }
            }
        }
    }

    /// Timers due from `earliest` through `dueNanoseconds`, earliest first: at most `limit` of
    /// those `include` accepts (a timer it passes over does not count against the limit). A timer
    /// whose row fails its check is returned with ``JournalTimer/isIntact`` `false` (and its row's
    /// bytes as they are), for the caller to report and never fire (its owner can store it again,
    /// see ``unstoredTimers(_:)``).
    public func timers(dueAtOrAfter earliest: UInt64 = 0, dueAtOrBefore dueNanoseconds: UInt64 = .max, limit: Int = .max,
                       where include: (JournalTimer) -> Bool = { _ in true }) throws(JournalError) -> [JournalTimer] {
        try read("reading timers") { txn in
            var timers: [JournalTimer] = []
            try txn.withCursor(stores.timers) { cursor in
                var entry = try Key8(earliest).withBytes { start in try cursor.seek(atLeast: start) }
                while let current = entry, timers.count < limit {
                    let due = current.key.bigEndianUInt64(at: 0)
                    guard due <= dueNanoseconds else { break }
                    let payload = JournalLayout.keyedPayload(key: current.key, value: current.value)
                    var timer = JournalTimer(
                        dueNanoseconds: due, entity: EntityKey(rawValue: current.key.bigEndianUInt64(at: 8)),
                        id: current.key.bigEndianUInt64(at: 16), payload: Array(payload ?? current.value))
                    timer.isIntact = payload != nil
                    if include(timer) { timers.append(timer) }
                    entry = try cursor.next()
                }
            }
            return timers
        }
    }

    /// Those of `timers` whose row is not stored as given: absent, failing its check, or holding
    /// another payload (one read transaction for all of them). The owner of timers known from
    /// elsewhere (a history) stores them again with these.
    public func unstoredTimers(_ timers: [JournalTimer]) throws(JournalError) -> [JournalTimer] {
        guard !timers.isEmpty else { return [] }
        return try read("checking timer rows") { txn in
            try timers.filter { timer in
                try Key24(timer.dueNanoseconds, timer.entity.rawValue, timer.id).withBytes { key in
                    try txn.withValue(forKey: key, in: stores.timers) { value in
                        guard let value, let payload = JournalLayout.keyedPayload(key: key, value: value) else { return true }
                        return !payload.elementsEqual(timer.payload)
                    }
                }
            }
        }
    }

    /// The result recorded for an idempotency key, or `nil`.
    public func recordedResult(forKey key: [UInt8]) throws(JournalError) -> [UInt8]? {
        try read("reading an idempotency result") { txn in
            try key.withUnsafeBytes { k in
                try txn.withValue(forKey: k, in: stores.idempotency) { value -> [UInt8]? in
                    try value.map { value in try keyedVerified(value, key: k, "a result", in: txn) }
                }
            }
        }
    }

    /// Pending tasks (work the runtime owes: activities to run, messages to deliver), in key order,
    /// those whose key starts with `prefix`. A task whose row fails its check is returned with
    /// ``JournalTask/isIntact`` `false`, for the caller to report and pass over.
    public func tasks(prefix: [UInt8] = []) throws(JournalError) -> [JournalTask] {
        try read("reading tasks") { txn in
            var tasks: [JournalTask] = []
            try txn.withCursor(stores.tasks) { cursor in
                var entry = prefix.isEmpty ? try cursor.first() : try cursor.seek(atLeast: prefix)
                while let current = entry, current.key.starts(with: prefix) {
                    let payload = JournalLayout.keyedPayload(key: current.key, value: current.value)
                    tasks.append(JournalTask(key: Array(current.key), value: Array(payload ?? current.value), isIntact: payload != nil))
                    entry = try cursor.next()
                }
            }
            return tasks
        }
    }

    /// One pending task's value, or `nil`.
    /// - Throws: ``JournalError/Code/corruptedRecord`` when its row fails its check.
    public func task(forKey key: [UInt8]) throws(JournalError) -> [UInt8]? {
        try read("reading a task") { txn in
            try key.withUnsafeBytes { k in
                try txn.withValue(forKey: k, in: stores.tasks) { value -> [UInt8]? in
                    try value.map { value in try keyedVerified(value, key: k, "a task", in: txn) }
                }
            }
        }
    }

    /// Several pending tasks' values, read in one snapshot (`nil` for a key not stored): rows that
    /// one commit writes or deletes together are seen together.
    /// - Throws: ``JournalError/Code/corruptedRecord`` when one of the rows fails its check.
    public func tasks(forKeys keys: [[UInt8]]) throws(JournalError) -> [[UInt8]?] {
        try read("reading tasks") { txn in
            try keys.map { key in
                try key.withUnsafeBytes { k in
                    try txn.withValue(forKey: k, in: stores.tasks) { value -> [UInt8]? in
                        try value.map { value in try keyedVerified(value, key: k, "a task", in: txn) }
                    }
                }
            }
        }
    }

    // MARK: Internals shared with the writer

    private func read<R>(_ doing: @autoclosure () -> String, _ body: (borrowing ReadTransaction) throws -> R) throws(JournalError) -> R {
        do {
            if let faults = configuration.faults, faults.readFails(doing()) { throw InjectedFault() }
            return try environment.read(body)
        } catch {
            throw JournalError.storage(error, doing())
        }
    }

    func metadata(of entity: EntityKey, in txn: borrowing some TransactionReading & ~Copyable) throws -> EntityMetadata? {
        try Self.metadata(of: entity, in: txn, entities: stores.entities)
    }

    /// An entity's metadata record in `entities`, or `nil`; ``JournalError/Code/corruptedRecord`` when damaged.
    static func metadata(of entity: EntityKey, in txn: borrowing some TransactionReading & ~Copyable,
                         entities: Database) throws -> EntityMetadata? {
        try Key8(entity.rawValue).withBytes { k in
            try txn.withValue(forKey: k, in: entities) { value in
                try value.map { v throws(JournalError) in try EntityMetadata.decode(v, key: entity) }
            }
        }
    }

    /// Checks a `CRC-32C (4) + payload` record and returns the payload. A log record's check also
    /// covers its header: `header` is ``JournalLayout/headerCheck(entity:sequence:)`` (0 in history).
    private func verified(_ record: UnsafeRawBufferPointer, entity: EntityKey?, sequence: UInt64?, header: UInt32 = 0,
                          in txn: borrowing some TransactionReading & ~Copyable) throws -> UnsafeRawBufferPointer {
        guard record.count >= 4 else {
            throw corrupted(entity, sequence, "the record is truncated (\(record.count) bytes)", txn)
        }
        let payload = UnsafeRawBufferPointer(rebasing: record[4...])
        guard CRC32C.checksum(payload) ^ header == record.littleEndianUInt32(at: 0) else {
            if payload.elementsEqual(JournalLayout.missingRecordPayload) {
                throw corrupted(entity, sequence, "the log had no intact record of the event when its tail moved to history", txn)
            }
            throw corrupted(entity, sequence, "the record fails its checksum", txn)
        }
        return payload
    }

    /// The payload of a `keyed check (4) + payload` row (``JournalLayout/keyedPayload(key:value:)``).
    /// - Throws: ``JournalError/Code/corruptedRecord`` when the row fails its check.
    private func keyedVerified(_ value: UnsafeRawBufferPointer, key: UnsafeRawBufferPointer, _ what: String,
                               in txn: borrowing some TransactionReading & ~Copyable) throws -> [UInt8] {
        guard let payload = JournalLayout.keyedPayload(key: key, value: value) else {
            throw corrupted(nil, nil, "\(what)'s row fails its check", txn)
        }
        return Array(payload)
    }

    private func corrupted(_ entity: EntityKey?, _ sequence: UInt64?, _ what: String,
                           _ txn: borrowing some TransactionReading & ~Copyable) -> JournalError {
        let name = entity.flatMap { try? metadata(of: $0, in: txn)?.name }
        return JournalError(.corruptedRecord, entity: name, key: entity, sequence: sequence,
                            "\(what); the record is damaged on disk. Restore the directory from a backup, or delete the entity's history")
    }

    /// The latest sequence of an entity in `history` (or its retention floor), ignoring the log tail.
    static func latestCommittedSequence(of entity: UInt64, in txn: borrowing some TransactionReading & ~Copyable, stores: Stores) throws -> UInt64 {
        let inHistory: UInt64 = try txn.withCursor(stores.history) { cursor in
            let entry: Cursor.Entry?
            if entity == .max {
                entry = try cursor.last()
            } else if try Key16(entity + 1, 0).withBytes({ try cursor.seek(atLeast: $0) }) != nil {
                entry = try cursor.previous()
            } else {
                entry = try cursor.last()
            }
            guard let entry, entry.key.count == 16, entry.key.bigEndianUInt64(at: 0) == entity else { return 0 }
            let chunk = HistoryChunk(firstSequence: entry.key.bigEndianUInt64(at: 8), bytes: entry.value)
            guard let lastSequence = chunk.lastSequence else {
                throw JournalError(.corruptedRecord, key: EntityKey(rawValue: entity), sequence: chunk.firstSequence,
                                   "its history chunk starting at \(chunk.firstSequence) has a damaged header")
            }
            return lastSequence
        }
        let prunedBefore: UInt64 = try Key8(entity).withBytes { k in
            try txn.withValue(forKey: k, in: stores.entities) { value in
                guard let value, value.count >= 18 else { return 0 }
                return value.bigEndianUInt64(at: 10)
            }
        }
        return max(inHistory, prunedBefore == 0 ? 0 : prunedBefore - 1)
    }

    struct Recovered {
        var nextPosition: UInt64 = 1
        var liveHead: UInt64 = 1
        var nextEntityKey: UInt64 = 1
        var tailEvents = 0
        var tailEntities = 0
        var fullTails: Set<UInt64> = []
        /// Entities whose tail in the log is damaged (an event's record missing, or its header
        /// wrong): the writer's next commit moves them to history, recording the damage there.
        var damagedTails: Set<UInt64> = []
        /// Log positions of records that fail their check and that an intact record of the entity
        /// their header names replaced (a damaged header: another entity's event, or one of its own
        /// under a wrong sequence). Reported only: they stay in the log until it is trimmed, and a
        /// later open weighs them the same way, or finds their sequence in history already.
        var strayRecords: [UInt64] = []
        /// Registrations waiting for the `names` index, and the next `pending-names` row.
        var pendingNames: [PendingName] = []
        var nextNameSequence: UInt64 = 1
        /// Rows below this are in `names` already (a merge finished; their deletion had not).
        var mergedBefore: UInt64 = 1
        var mergedRowsLeft = false
    }

    /// The format `format`'s table is stored in: its row in the `format` database, 1 without one (a
    /// directory written before the rows), `nil` when the row is damaged.
    static func storedFormat(of format: JournalLayout.StoredFormat, in txn: borrowing some TransactionReading & ~Copyable,
                             formats: Database) throws -> UInt64? {
        try format.formatKey.withUnsafeBytes { key in
            try txn.withValue(forKey: key, in: formats) { value -> UInt64? in
                guard let value else { return 1 }
                return value.count == 8 ? value.bigEndianUInt64(at: 0) : nil
            }
        }
    }

    /// Brings the rows of each table in `formats` to its current format, in order. A directory
    /// without a table's `format` row wrote that table in format 1. Rows are rewritten `batchSize` a
    /// transaction across the tables; each transaction also stores the key to go on from (the
    /// `format` row named after the table with `-upgrade`), so an open that crashes part-way resumes
    /// where the last one committed and no row is rewritten twice, and a table's format row is
    /// written in the transaction that finishes it. One pass over the tables, once (the log holds at
    /// most the log window and what is not yet in history); a new directory takes one transaction
    /// for every row. `batches` bounds the transactions (tests).
    /// - Returns: whether every table is in its current format.
    /// - Throws: ``JournalError/Code/unsupportedFormat`` for a format newer than this version's
    ///   (checked for every table before anything is written).
    @discardableResult
    static func upgrade(_ formats: [JournalLayout.StoredFormat], environment: Environment, logger: Logger,
                        batchSize: Int = 16_384, batches: Int = .max) throws -> Bool {
        let formatRows = try environment.database("format")
        let found: [UInt64] = try environment.read { txn in
            try formats.map { format in
                guard let found = try storedFormat(of: format, in: txn, formats: formatRows) else {
                    throw JournalError(.corruptedRecord, "the journal's format record of its \(format.table) table is damaged")
                }
                return found
            }
        }
        for (format, from) in zip(formats, found) where from > format.current {
            throw JournalError(.unsupportedFormat,
                               "the journal's \(format.table) table has format \(from), written by a newer version of DurableEntities; this version reads format \(format.current) and older. Nothing was changed")
        }
        var pending = try formats.indices.filter { formats[$0].current != found[$0] }.map { index in
            (index: index, from: found[index], table: try environment.database(formats[index].table))
        }
        guard !pending.isEmpty else { return true }
        var upgraded = [Int](repeating: 0, count: formats.count)  // rows looked at, per table
        for _ in 0..<batches {
            let done = try environment.write { txn -> Bool in
                var budget = batchSize
                while let (index, from, table) = pending.first {
                    let format = formats[index]
                    let next: [UInt8]? = try format.rewrite(from).flatMap { rewrite in
                        let start = try txn.value(forKey: format.progressKey, in: formatRows)
                        return try txn.withCursor(table) { cursor in
                            var entry = try start.map { try cursor.seek(atLeast: $0) } ?? cursor.first()
                            while let current = entry {
                                guard budget > 0 else { return Array(current.key) }
                                if let value = rewrite(current.key, current.value) {
                                    let key = Array(current.key)
                                    try value.withUnsafeBytes { v in try key.withUnsafeBytes { k in try cursor.put(v, forKey: k) } }
                                }
                                budget -= 1
                                upgraded[index] += 1
                                entry = try cursor.next()
                            }
                            return nil
                        }
                    }
                    if let next {
                        try txn.put(next, forKey: format.progressKey, in: formatRows)
                        return false
                    }
                    _ = try txn.delete(format.progressKey, in: formatRows)
                    try txn.put(Key8(format.current).withBytes { Array($0) }, forKey: format.formatKey, in: formatRows)
                    pending.removeFirst()
                }
                return true
            }
            if done {
                for (format, rows) in zip(formats, upgraded) where rows > 0 {
                    logger.info("journal table upgraded", metadata: [
                        "journal.directory": "\(environment.path)", "journal.table": "\(format.table)",
                        "journal.format": "\(format.current)", "journal.rows": "\(rows)"])
                }
                return true
            }
        }
        return false
    }

    /// A directory written before results had times has results but no `idempotency-times` rows
    /// (both are written in one transaction since): those results are given the time of this open,
    /// so they expire like results recorded now, never earlier.
    private static func indexUntimedResults(environment: Environment, stores: Stores) throws {
        let untimed = try environment.read { txn in
            try txn.count(stores.resultTimes) == 0 && txn.count(stores.idempotency) > 0
        }
        guard untimed else { return }
        let time = SystemEntityClock().nowNanoseconds()
        try environment.write { txn in
            var keys: [[UInt8]] = []
            try txn.withCursor(stores.idempotency) { cursor in
                var entry = try cursor.first()
                while let current = entry {
                    keys.append(Array(current.key))
                    entry = try cursor.next()
                }
            }
            // A longer key (accepted before) has no room for the time: it stays, unexpired.
            for key in keys where key.count <= JournalLayout.maxResultKeyBytes {
                try txn.put([], forKey: JournalLayout.resultTimeKey(time, key), in: stores.resultTimes)
            }
        }
    }

    /// Rebuilds the tail index from the log: an entry is live when its entity's history and retention
    /// floor do not already cover its sequence.
    ///
    /// An entity's live entries hold consecutive sequences from just past that floor. Where they do
    /// not (damage), the run still gets one position for each sequence, so that the entity's latest
    /// sequence stays right and nothing is ever appended twice under one sequence: position 0 (never
    /// a log position) for an event whose record is missing, and a record whose header claims a
    /// sequence it cannot have stands for the one expected there (reads check headers). The entity is
    /// reported in ``Recovered/damagedTails``.
    ///
    /// Each live record's check is verified (it covers the header). A record that fails it is
    /// counted for the entity its header names, as before, since a damaged payload is likelier than
    /// a damaged header and reads report it at that sequence; but when the next record of that
    /// entity is intact and claims the very sequence the damaged one stood for, the damaged one was
    /// not that entity's (its header is what was damaged): the intact record takes its place, and the
    /// damaged one is reported in ``Recovered/strayRecords``.
    private static func recover(environment: Environment, stores: Stores, tails: TailIndex, coalesceThreshold: Int) throws -> Recovered {
        try environment.read { txn in
            var recovered = Recovered()
            try txn.withCursor(stores.entities) { cursor in
                if let last = try cursor.last() { recovered.nextEntityKey = last.key.bigEndianUInt64(at: 0) + 1 }
            }
            try txn.withCursor(stores.pendingNames) { cursor in
                var entry = try cursor.first()
                while let current = entry {
                    let sequence = current.key.bigEndianUInt64(at: 0)
                    if sequence == 0 {
                        recovered.mergedBefore = current.value.bigEndianUInt64(at: 0)
                    } else if sequence >= recovered.mergedBefore {
                        recovered.pendingNames.append(try PendingName.decode(sequence: sequence, current.value))
                    } else {
                        recovered.mergedRowsLeft = true
                    }
                    recovered.nextNameSequence = max(recovered.nextNameSequence, sequence + 1)
                    entry = try cursor.next()
                }
                recovered.nextNameSequence = max(recovered.nextNameSequence, recovered.mergedBefore)
            }
            var runs: [UInt64: TailRun] = [:]
            var covered: [UInt64: UInt64] = [:]
            // Entity → the last position of its run, when that record failed its check.
            var suspects: [UInt64: UInt64] = [:]
            var firstLive: UInt64?
            try txn.withCursor(stores.log) { cursor in
                var entry = try cursor.first()
                if let first = entry { recovered.liveHead = first.key.bigEndianUInt64(at: 0) }
                while let current = entry {
                    let position = current.key.bigEndianUInt64(at: 0)
                    recovered.nextPosition = position + 1
                    guard current.value.count >= JournalLayout.logHeader else {
                        // Too short to name an entity: its entity's run shows the gap.
                        entry = try cursor.next()
                        continue
                    }
                    let entity = current.value.bigEndianUInt64(at: 0)
                    let sequence = current.value.bigEndianUInt64(at: 8)
                    let floor: UInt64
                    if let known = covered[entity] {
                        floor = known
                    } else {
                        floor = try latestCommittedSequence(of: entity, in: txn, stores: stores)
                        covered[entity] = floor
                    }
                    if sequence > floor {
                        let payload = UnsafeRawBufferPointer(rebasing: current.value[JournalLayout.logHeader...])
                        let intact = CRC32C.checksum(payload) == JournalLayout.flippedCheck(ofLogRecord: current.value)
                        let suspect = suspects.isEmpty ? nil : suspects.removeValue(forKey: entity)
                        if !intact { suspects[entity] = position }
                        if intact, let suspect, runs[entity]?.replaceLast(suspect, with: position, claiming: sequence) == true {
                            recovered.strayRecords.append(suspect)
                        } else if !runs[entity, default: TailRun(firstSequence: floor + 1, positions: [])]
                            .addRecovered(position: position, claiming: sequence) {
                            recovered.damagedTails.insert(entity)
                        }
                        if firstLive == nil { firstLive = position }
                    }
                    entry = try cursor.next()
                }
            }
            recovered.liveHead = firstLive ?? recovered.nextPosition
            recovered.tailEntities = runs.count
            recovered.tailEvents = runs.values.reduce(0) { $0 + $1.positions.count }
            // The writer's per-entity thresholds are at least the configured one; it re-checks on the next append.
            recovered.fullTails = Set(runs.filter { $0.value.positions.count >= coalesceThreshold }.keys)
            tails.runs.withLock { table in
                for (entity, run) in runs { table[entity] = run }
            }
            return recovered
        }
    }
}

/// Whoever submits to a ``Journal`` in bursts (the runtime's shards), telling its writer whether
/// more submissions are on their way (see ``Journal/pace(with:)``).
public protocol CommitProducers: AnyObject, Sendable {
    /// Whether work that submits is queued or running now. The writer asks with its own lock held:
    /// answer without calling into the journal.
    var areProducing: Bool { get }
}
