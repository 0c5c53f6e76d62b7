import DequeModule
import Dispatch
import Foundation
import Logging
import Synchronization

/// What every cell of a runtime shares: the journal, codec, clock, shards and the resident cells.
final class RuntimeCore: Sendable {
    let journal: Journal
    let codec: any EntityCodec
    let clock: any EntityClock
    let configuration: EntityRuntime.Configuration
    let logger: Logger
    let shards: [Shard]
    let types = Mutex<[String: any RegisteredEntityType]>([:])
    private let tables: [CellTableBox]
    let closed = Atomic<Bool>(false)
    /// Entities with messages queued or a turn in flight, plus timers being delivered. Zero means idle:
    /// every entity waits (for a message or a timer).
    private let busy = Atomic<Int>(0)
    let timers: TimerService
    let activities: ActivityWorker
    /// Parked tasks for run bodies and local activities' attempts (see ``TurnRunner``).
    let runners = TurnRunners()
    /// Signalled when the runtime becomes idle (for a draining close).
    private let idle = NSCondition()
    /// Messages to entity types not registered yet (after a restart): delivered on registration.
    struct ParkedMessages {
        var messages: [String: [(EntityEnvelope, TaskKey)]] = [:]
        /// Types whose parked messages are being handed over: later messages queue behind them.
        var flushing: Set<String> = []
    }
    let parkedMessages = Mutex(ParkedMessages())
    /// A reply that calls ``becameIdle()``, made once: a message counted busy by its sender (an
    /// activity's outcome) carries it instead of a closure of its own. Set at the end of `init`,
    /// before the core is shared, and never changed.
    nonisolated(unsafe) private(set) var idleReply: VoidReply = { _ in }

    final class CellTableBox: Sendable {
        let table = Mutex(CellTable())
    }

    /// The resident cells of one shard, with passivation order.
    struct CellTable: ~Copyable {
        var cells: [EntityName: any ResidentCell] = [:]
        /// Cells in the order they became resident; passivation looks at the oldest first.
        var order = Deque<EntityName>()
    }

    init(journal: Journal, configuration: EntityRuntime.Configuration) {
        self.journal = journal
        self.codec = configuration.codec
        self.clock = configuration.clock
        self.configuration = configuration
        self.logger = configuration.logger
        let count = max(1, configuration.shards)
        // The shards pace the journal's commits: a commit waits for the submissions of turns queued
        // or running (see ``Journal/Configuration/commitWindow``).
        let queue = ReadyQueue { [weak journal] in journal?.producersIdle() }
        journal.pace(with: queue)
        self.shards = (0..<count).map { Shard(index: $0, queue: queue, metricsDimensions: configuration.metricsDimensions) }
        self.timers = TimerService(metricsDimensions: configuration.metricsDimensions)
        self.tables = (0..<count).map { _ in CellTableBox() }
        self.activities = ActivityWorker(limit: configuration.maxConcurrentActivities, heartbeatStoreInterval: configuration.activityHeartbeatStoreInterval,
                                         cancellationWait: configuration.activityCancellationWait,
                                         metricsDimensions: configuration.metricsDimensions)
        self.activities.attach(self)
        idleReply = { [unowned self] _ in becameIdle() }
    }

    func becameBusy() { busy.add(1, ordering: .relaxed) }

    /// Runs `action` a second from now on the runtime's clock: a delivery whose commit (or read) failed
    /// is tried again then, not at once, which would spin against a failing journal.
    func retryShortly(_ action: @escaping @Sendable () -> Void) {
        _ = timers.alarm(at: clock.nowNanoseconds().saturatingAdd(1_000_000_000), action)
    }

    /// A stored row naming `entity` failed its check: asks that entity to store again the rows its
    /// run is owed (see ``OwedRows``); `done` gets whether the damaged row was one of them (`false`
    /// without asking when no entity has that key). An entity whose type is not registered yet is
    /// asked on its type's registration.
    func repair(_ damage: DamagedRow, of entity: EntityKey, done: @escaping @Sendable (Result<Bool, EntityError>) -> Void) {
        guard let name = try? journal.metadata(of: entity)?.name else { return done(.success(false)) }
        let repair = ParkedRepair(damage: damage, entityID: name.id, done: done)
        let registered = parkedRepairs.withLock { parked -> (any RegisteredEntityType)? in
            if let type = types.withLock({ $0[name.type] }) { return type }
            parked[name.type, default: []].append(repair)
            return nil
        }
        registered?.repair(damage, entityID: name.id, core: self, reply: done)
    }

    /// A repair waiting for its entity type's registration.
    struct ParkedRepair: Sendable {
        let damage: DamagedRow
        let entityID: String
        let done: @Sendable (Result<Bool, EntityError>) -> Void
    }
    /// Repairs waiting for their entity type's registration, by type (checked under this lock).
    private let parkedRepairs = Mutex<[String: [ParkedRepair]]>([:])

    /// An entity type was registered: its entities get the repairs that waited for it.
    func deliverParkedRepairs(to type: String) {
        guard let registered = types.withLock({ $0[type] }) else { return }
        for repair in parkedRepairs.withLock({ $0.removeValue(forKey: type) }) ?? [] {
            registered.repair(repair.damage, entityID: repair.entityID, core: self, reply: repair.done)
        }
    }

    func becameIdle() {
        let left = busy.subtract(1, ordering: .acquiringAndReleasing).newValue
        if left == 0 { timers.wake() }
        // A closing runtime waits for other counts too (only abandoned activity attempts left).
        if left == 0 || closed.load(ordering: .relaxed) {
            idle.lock()
            idle.broadcast()
            idle.unlock()
        }
    }

    /// Blocks until no entity has messages queued or a turn in flight, not counting `excluded()` busy
    /// holders (abandoned activity attempts), or until `deadline`.
    /// - Returns: whether the runtime became idle (`false`: the deadline passed).
    @discardableResult
    func waitUntilIdle(deadline: ContinuousClock.Instant? = nil, excluding excluded: () -> Int = { 0 }) -> Bool {
        idle.lock()
        defer { idle.unlock() }
        while busy.load(ordering: .acquiring) > excluded() {
            if let deadline {
                let left = ContinuousClock.now.duration(to: deadline)
                guard left > .zero else { return false }
                let (seconds, attoseconds) = left.components
                _ = idle.wait(until: Date(timeIntervalSinceNow: Double(seconds) + Double(attoseconds) / 1e18))
            } else {
                idle.wait()
            }
        }
        return true
    }

    var isIdle: Bool { busy.load(ordering: .acquiring) == 0 }

    func shardIndex(_ name: EntityName) -> Int {
        Int((name.type.hashValueStable ^ name.id.hashValueStable &* 0x100_0000_01B3) % UInt64(shards.count))
    }

    /// The resident cell of an entity, created (not yet loaded) when it is not resident.
    /// The entity's cell if it is in memory (nothing is created).
    func residentCell<W: EntityWorkflow>(_ type: W.Type, _ name: EntityName) -> EntityCell<W>? {
        tables[shardIndex(name)].table.withLock { $0.cells[name] as? EntityCell<W> }
    }

    /// Queues `message` in the entity's resident cell, loading the entity if needed. A cell that
    /// left memory meanwhile refuses the message, and the next lookup makes a fresh one.
    /// Returns the cell that took it.
    @discardableResult
    func enqueue<W: EntityWorkflow>(_ message: CellMessage, to type: W.Type, _ name: EntityName,
                                    bounded: Bool = false) -> EntityCell<W> {
        while true {
            let cell = cell(W.self, name)
            if cell.enqueue(message, bounded: bounded) { return cell }
        }
    }

    func cell<W: EntityWorkflow>(_ type: W.Type, _ name: EntityName) -> EntityCell<W> {
        let index = shardIndex(name)
        let maxResident = max(1, configuration.maxResidentEntities / shards.count)
        return tables[index].table.withLock { table in
            if let existing = table.cells[name] as? EntityCell<W> { return existing }
            // Passivate idle entities, oldest first, while the shard holds its share or more. Busy
            // ones stay (the bound is soft while entities are busy), and the new cell is added after
            // the sweep, so it is never its own victim.
            var checked = 0
            let candidates = table.order.count
            while table.cells.count >= maxResident, checked < candidates, let oldest = table.order.popFirst() {
                checked += 1
                guard let candidate = table.cells[oldest] else { continue }
                if candidate.evictIfIdle(lastActiveBefore: .max, sparingParents: true) {
                    table.cells[oldest] = nil
                } else {
                    table.order.append(oldest)
                }
            }
            let cell = EntityCell<W>(name: name, core: self, shard: shards[index])
            table.cells[name] = cell
            table.order.append(name)
            return cell
        }
    }

    /// Passivates every idle entity not active since `cutoff` (ns on the runtime's clock).
    /// - Returns: how many left memory.
    @discardableResult
    func passivateIdle(activeBefore cutoff: UInt64) -> Int {
        var count = 0
        for box in tables {
            box.table.withLock { table in
                var evicted = false
                for (name, cell) in table.cells where cell.evictIfIdle(lastActiveBefore: cutoff, sparingParents: false) {
                    table.cells[name] = nil
                    count += 1
                    evicted = true
                }
                if evicted { table.order = Deque(table.order.filter { table.cells[$0] != nil }) }
            }
        }
        return count
    }

    /// Runs ``passivateIdle(activeBefore:)`` every quarter of `idle` (at least every second) on the
    /// runtime's clock.
    func schedulePassivation(after idle: Duration) {
        repeatEvery(max(1_000_000_000, idle.nanoseconds / 4)) { [weak self] done in
            guard let self else { return }
            passivateIdle(activeBefore: time(ago: idle))
            done()
        }
    }

    // MARK: Housekeeping

    /// Runs `sweep` every `interval` ns on the runtime's clock until the runtime closes. The next run
    /// is armed when `sweep` calls `done`, so runs never overlap; a sweep that does not call it ends
    /// the series.
    func repeatEvery(_ interval: UInt64, _ sweep: @escaping @Sendable (_ done: @escaping @Sendable () -> Void) -> Void) {
        _ = timers.alarm(at: clock.nowNanoseconds() &+ interval) { [weak self] in
            guard let self, !self.closed.load(ordering: .acquiring) else { return }
            sweep { [weak self] in self?.repeatEvery(interval, sweep) }
        }
    }

    /// The runtime clock's time `age` ago (0 when the clock is not that far from the epoch).
    func time(ago age: Duration) -> UInt64 {
        let now = clock.nowNanoseconds()
        return now > age.nanoseconds ? now - age.nanoseconds : 0
    }

    // MARK: Idempotency results

    /// The most idempotency results one expiry commit deletes: a large backlog goes in many short
    /// commits among the turns' commits, never in one long one.
    static let resultsExpiredPerCommit = 1_000

    /// Deletes the idempotency results recorded before `cutoff` (ns on the runtime's clock), one
    /// bounded commit after another; `completion` gets how many went, or the error that stopped it.
    func expireResults(recordedBefore cutoff: UInt64, expiredBefore: Int = 0,
                       completion: @escaping @Sendable (Result<Int, JournalError>) -> Void) {
        var batch = JournalBatch()
        batch.expireResults(recordedBefore: cutoff, limit: Self.resultsExpiredPerCommit)
        journal.submit(batch) { [self] result in
            switch result {
            case .success(let receipt) where receipt.expiredResults == Self.resultsExpiredPerCommit:
                expireResults(recordedBefore: cutoff, expiredBefore: expiredBefore + receipt.expiredResults, completion: completion)
            case .success(let receipt):
                completion(.success(expiredBefore + receipt.expiredResults))
            case .failure(let error):
                completion(.failure(error))
            }
        }
    }

    /// Expires the results older than `retention` every 24th of it (at least every second, at most
    /// every hour) on the runtime's clock; the next sweep is armed once this one is done.
    func scheduleResultExpiry(after retention: Duration) {
        repeatEvery(min(3_600_000_000_000, max(1_000_000_000, retention.nanoseconds / 24))) { [weak self] done in
            guard let self else { return }
            expireResults(recordedBefore: time(ago: retention)) { [weak self] result in
                guard let self else { return }
                switch result {
                case .success(let count):
                    if count > 0 { logger.info("idempotency results expired", metadata: ["entities.results.expired": "\(count)"]) }
                case .failure(let error):
                    guard error.code != .closed else { return }
                    logger.warning("expiring idempotency results failed; the next sweep tries again", metadata: ["error": "\(error)"])
                }
                done()
            }
        }
    }

    // MARK: Entity-to-entity messages

    /// Delivers a message whose outbox row `row` is durable to its receiver's mailbox (waiting there
    /// for room if it is full). A receiver type not registered yet gets it on registration.
    func deliver(_ envelope: EntityEnvelope, row: TaskKey) {
        guard !closed.load(ordering: .acquiring) else { return }  // the row stays: the next open delivers it
        let type = envelope.target.type
        let registered = parkedMessages.withLock { parked -> (any RegisteredEntityType)? in
            // Behind messages parked earlier (its type just registered, they are being handed over),
            // it waits its turn: a sender's messages arrive in the order it sent them.
            if parked.messages[type] == nil, !parked.flushing.contains(type), let registered = types.withLock({ $0[type] }) {
                return registered
            }
            parked.messages[type, default: []].append((envelope, row))
            return nil
        }
        registered?.deliver(envelope, row: row, core: self)
    }

    /// An entity type was registered: delivers the messages that waited for it, oldest first, and
    /// those that queued behind them meanwhile, until none is left.
    func deliverParkedMessages(to type: String) {
        guard let registered = types.withLock({ $0[type] }) else { return }
        while true {
            let parked = parkedMessages.withLock { parked -> [(EntityEnvelope, TaskKey)]? in
                guard let messages = parked.messages.removeValue(forKey: type) else {
                    parked.flushing.remove(type)
                    return nil
                }
                parked.flushing.insert(type)
                return messages
            }
            guard let parked else { return }
            for (envelope, row) in parked {
                guard !closed.load(ordering: .acquiring) else { break }  // the rows stay: the next open delivers them
                registered.deliver(envelope, row: row, core: self)
            }
        }
    }

    /// At open: every message still in the outbox (its sender committed, its receiver had not) is
    /// delivered again, in row order — per sender, the order it was sent in.
    func recoverOutbox() {
        let stored: [JournalTask]
        do {
            stored = try journal.tasks(prefix: [EntityEnvelope.keyPrefix])
        } catch {
            logger.error("reading the outbox failed; its messages are delivered at the next open", metadata: ["error": "\(error)"])
            return
        }
        for row in stored {
            guard row.isIntact else {
                logger.error("an outbox message fails its check (damaged on disk); it is left in place and not delivered",
                             metadata: ["row": "\(row.key)"])
                continue
            }
            guard let envelope = EntityEnvelope.decode(row.value) else {
                logger.error("an outbox message does not decode; it is left in place", metadata: ["row": "\(row.key)"])
                continue
            }
            deliver(envelope, row: TaskKey(row.key))
        }
    }

    /// Removes `cell` from memory if it is still the resident cell of `name` and idle (a finished run).
    func passivate<W: EntityWorkflow>(_ cell: EntityCell<W>) {
        let index = shardIndex(cell.name)
        tables[index].table.withLock { table in
            guard let resident = table.cells[cell.name], resident === cell, cell.evictIfIdle() else { return }
            table.cells[cell.name] = nil
            // The passivation order keeps names lazily; compact it when stale names dominate.
            if table.order.count > 1_024 && table.order.count > 2 * table.cells.count {
                table.order = Deque(table.order.filter { table.cells[$0] != nil })
            }
        }
    }

    /// Ends every state watch, and every wait for a run's result, with `closed` (the runtime is closing).
    func failAllWatches() {
        let cells = tables.flatMap { box in box.table.withLock { Array($0.cells.values) } }
        for cell in cells { cell.failWatches(EntityError(.closed, entity: nil, "the runtime closed while waiting for the entity's state")) }
    }

    /// Drops every resident cell, at close once the runtime is idle. A run body suspended in a wait
    /// is abandoned on a shard thread, as passivation does (the shards run it before they stop); the
    /// next open replays it from history. A cell holds the core, so one left in its table would keep
    /// the core, every cell and their run bodies in memory after the runtime was released.
    /// - Returns: how many cells were not idle (none after a close that waited for idleness); they
    ///   leave the table all the same.
    @discardableResult
    func releaseResidentCells() -> Int {
        var busy = 0
        for box in tables {
            let cells = box.table.withLock { table in
                defer { table.cells = [:]; table.order = [] }
                return Array(table.cells.values)
            }
            for cell in cells where !cell.evictIfIdle() { busy += 1 }
        }
        return busy
    }

    /// Ids for state watches.
    let watchIDs = Atomic<UInt64>(0)

    /// How many entities are resident.
    var residentCount: Int { tables.reduce(0) { $0 + $1.table.withLock { $0.cells.count } } }

    /// The longest idempotency key accepted, in UTF-8 bytes (LMDB keys hold 511; the entity key and
    /// a kind byte come first).
    static let maxIdempotencyKeyBytes = 400

    /// Which kind of message an idempotency key belongs to: signals and updates have separate keys.
    enum KeyKind: UInt8 {
        case signal = 0x73  // "s"
        case update = 0x75  // "u"
    }

    /// The journal key under which an idempotency result is stored: the entity's key, the kind, then
    /// the sender's key (whole: a key that does not fit is refused, never truncated).
    static func resultKey(_ key: String, _ kind: KeyKind, _ entity: EntityKey) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 8)
        bytes.withUnsafeMutableBytes { $0.storeBytes(of: entity.rawValue.bigEndian, as: UInt64.self) }
        bytes.append(kind.rawValue)
        bytes.append(contentsOf: key.utf8)
        return bytes
    }

    /// The recorded result of a message with idempotency key `key`, if one was committed.
    /// - Throws: ``EntityError`` `storage` when the lookup fails: a resent message is then refused
    ///   rather than risked twice.
    func recorded(_ key: String, _ kind: KeyKind, for entity: EntityKey?, name: EntityName) throws(EntityError) -> [UInt8]? {
        guard let entity else { return nil }
        do {
            return try journal.recordedResult(forKey: Self.resultKey(key, kind, entity))
        } catch {
            throw EntityError(.storage, entity: name, "looking up idempotency key '\(key)' failed; nothing was recorded", underlying: error)
        }
    }
}

/// A resident cell, whatever its entity type.
protocol ResidentCell: AnyObject, Sendable {
    func failWatches(_ error: EntityError)
    func evictIfIdle() -> Bool
    func evictIfIdle(lastActiveBefore cutoff: UInt64, sparingParents: Bool) -> Bool
}

extension EntityCell: ResidentCell {}

/// A registered entity type, for the untyped entry points (raw payloads, recovery).
protocol RegisteredEntityType: Sendable {
    func signal(id: String, payload: [UInt8], idempotencyKey: String?, runtime: EntityRuntime) async throws(EntityError)
    func fireTimer(id: UInt64, due: UInt64, entityID: String, core: RuntimeCore, done: @escaping VoidReply)
    /// Asks the entity to store again the rows its run is owed; `reply` gets whether `damage` was one.
    func repair(_ damage: DamagedRow, entityID: String, core: RuntimeCore, reply: @escaping @Sendable (Result<Bool, EntityError>) -> Void)
    func deliverActivityOutcome(id: UInt64, _ outcome: Result<[UInt8], ActivityFailure>, _ attempt: ActivityAttempt, entityID: String, core: RuntimeCore,
                                reply: @escaping VoidReply)
    func deliver(_ envelope: EntityEnvelope, row: TaskKey, core: RuntimeCore)
}

struct Registered<W: EntityWorkflow>: RegisteredEntityType {
    func signal(id: String, payload: [UInt8], idempotencyKey: String?, runtime: EntityRuntime) async throws(EntityError) {
        let name = EntityName(type: W.entityType, id: id)
        let signal: W.Signal
        do {
            signal = try payload.withUnsafeBytes { try runtime.core.codec.decode(W.Signal.self, from: $0) }
        } catch {
            throw EntityError(.undecodablePayload, entity: name, "the payload is not a \(W.entityType) signal; nothing was recorded", underlying: error)
        }
        try await runtime.entity(W.self, id: id).send(signal, bytes: payload, idempotencyKey: idempotencyKey)
    }

    func fireTimer(id: UInt64, due: UInt64, entityID: String, core: RuntimeCore, done: @escaping VoidReply) {
        let name = EntityName(type: W.entityType, id: entityID)
        core.enqueue(.timerFired(id: id, due: due, reply: done), to: W.self, name)
    }

    func repair(_ damage: DamagedRow, entityID: String, core: RuntimeCore, reply: @escaping @Sendable (Result<Bool, EntityError>) -> Void) {
        let name = EntityName(type: W.entityType, id: entityID)
        core.enqueue(.repair(damage, reply: { result in reply(result.map { $0 as? Bool ?? false }) }), to: W.self, name)
    }

    func deliverActivityOutcome(id: UInt64, _ outcome: Result<[UInt8], ActivityFailure>, _ attempt: ActivityAttempt, entityID: String, core: RuntimeCore,
                                reply: @escaping VoidReply) {
        let name = EntityName(type: W.entityType, id: entityID)
        core.enqueue(.activityOutcome(id: id, outcome, attempt, reply: reply), to: W.self, name)
    }

    func deliver(_ envelope: EntityEnvelope, row: TaskKey, core: RuntimeCore) {
        core.enqueue(.envelope(envelope, key: row) { result in
            // A failed commit leaves the row in place: try again shortly (other failures — an entity
            // that cannot load — wait for the next open, where the row is delivered again).
            guard case .failure(let error) = result, error.code == .storage, !core.closed.load(ordering: .acquiring) else { return }
            core.retryShortly { core.deliver(envelope, row: row) }
        }, to: W.self, envelope.target, bounded: true)
    }
}
