import DequeModule
import Dispatch
import Foundation
import LMDB
import Synchronization

/// The journal's single writer: one dedicated thread owns every LMDB write transaction.
///
/// Callers on any thread ``enqueue(_:)`` a ``Submission``. The thread takes *whatever is queued* (up to
/// ``Journal/Configuration/maxOperationsPerCommit``; it never waits for a batch to fill), checks each
/// submission on its own, writes the valid ones into one transaction, commits, publishes the new tail
/// index, and hands the completions to a serial completion queue — so the next transaction starts
/// while callers are being resumed. A failed commit fails every submission in it; nothing of it is
/// visible, because in-memory state changes only after a successful commit.
///
/// `@unchecked Sendable`: the queue is guarded by `condition`; the `state` is touched only by the
/// writer thread (and read once by `shutdown` after that thread has ended).
final class GroupCommitWriter: @unchecked Sendable {
    struct Submission: Sendable {
        let batch: JournalBatch
        let completion: @Sendable (Result<CommitReceipt, JournalError>) -> Void
    }

    private let environment: Environment
    private let stores: Journal.Stores
    private let tails: TailIndex
    private let configuration: Journal.Configuration
    private var state: WriterCounters

    /// Counters for benchmarks and metrics.
    let statistics = Mutex(Journal.Statistics())
    private let condition = NSCondition()
    private var pending = Deque<Submission>()
    private var closing = false
    private var finished = false
    private let completions = DispatchQueue(label: "DurableEntities.Journal.completions")
    private var thread: Thread?

    init(environment: Environment, stores: Journal.Stores, tails: TailIndex,
         configuration: Journal.Configuration, recovered: Journal.Recovered) {
        self.environment = environment
        self.stores = stores
        self.tails = tails
        self.configuration = configuration
        self.state = WriterCounters(nextPosition: recovered.nextPosition, liveHead: recovered.liveHead,
                           nextEntityKey: recovered.nextEntityKey)
        let thread = Thread { [unowned self] in self.run() }
        thread.stackSize = 8 << 20
        self.thread = thread
        thread.start()
    }

    func enqueue(_ submission: Submission) {
        condition.lock()
        if closing {
            condition.unlock()
            submission.completion(.failure(JournalError(.closed, "the journal is closed; nothing was written")))
            return
        }
        pending.append(submission)
        if pending.count == 1 { condition.signal() }
        condition.unlock()
    }

    /// Stops taking submissions, commits everything already queued, and waits for the thread to end
    /// and for every completion to have run.
    func shutdown() {
        condition.lock()
        closing = true
        condition.broadcast()
        while !finished { condition.wait() }
        condition.unlock()
        completions.sync {}
    }

    private func run() {
        while let batch = nextBatch() {
            process(batch)
        }
        condition.lock()
        finished = true
        condition.broadcast()
        condition.unlock()
    }

    /// Blocks until something is queued; returns `nil` when closing and drained.
    private func nextBatch() -> [Submission]? {
        condition.lock()
        defer { condition.unlock() }
        while pending.isEmpty {
            if closing { return nil }
            condition.wait()
        }
        var batch: [Submission] = []
        var operations = 0
        while let next = pending.first,
              batch.isEmpty || operations + next.batch.operations.count <= configuration.maxOperationsPerCommit {
            operations += next.batch.operations.count
            batch.append(pending.removeFirst())
        }
        return batch
    }

    // MARK: One group commit

    /// What a transaction body produced, published only after the commit succeeds.
    private struct Outcome {
        var results: [Result<CommitReceipt, JournalError>]
        var runs: [UInt64: TailRun] = [:]
        var removed: Set<UInt64> = []
        var state: WriterCounters
    }

    private func process(_ batch: [Submission]) {
        let outcome: Outcome
        let started = ContinuousClock.now
        var built = started
        do {
            outcome = try environment.write { txn in
                let outcome = try write(batch, in: txn)
                built = ContinuousClock.now
                return outcome
            }
        } catch {
            let failure = JournalError.storage(error, "committing \(batch.count) batches; none of them was written")
            configuration.logger.error("journal commit failed", metadata: ["journal.error": "\(error)"])
            completions.async { for submission in batch { submission.completion(.failure(failure)) } }
            return
        }
        state = outcome.state
        let committed = ContinuousClock.now
        statistics.withLock { stats in
            stats.commits += 1
            stats.submissions += batch.count
            stats.operations += batch.reduce(0) { $0 + $1.batch.operations.count }
            stats.buildTime += built - started
            stats.commitTime += committed - built
        }
        tails.runs.withLock { runs in
            for entity in outcome.removed { runs[entity] = nil }
            for (entity, run) in outcome.runs { runs[entity] = run.positions.isEmpty ? nil : run }
        }
        completions.async {
            for (submission, result) in zip(batch, outcome.results) { submission.completion(result) }
        }
    }

    /// The transaction body. Re-runnable: it changes nothing outside the transaction (LMDB runs it
    /// again after growing a full map).
    private func write(_ batch: [Submission], in txn: borrowing WriteTransaction) throws -> Outcome {
        var context = CommitContext(stores: stores, tails: tails, configuration: configuration, counters: state)
        var outcome = Outcome(results: [], state: state)
        outcome.results.reserveCapacity(batch.count)
        for submission in batch {
            do {
                try context.validate(submission.batch, in: txn)
            } catch let refusal as JournalError {
                outcome.results.append(.failure(refusal))
                continue
            }
            let registered = try context.apply(submission.batch, in: txn)
            outcome.results.append(.success(CommitReceipt(registered: registered)))
        }
        try context.moveFullTails(in: txn)
        try context.moveExpiredTails(in: txn)
        try context.trimLog(in: txn)
        outcome.runs = context.runs
        outcome.removed = context.removed
        outcome.state = context.counters
        return outcome
    }
}

/// The writer's counters, changed only after a commit succeeds.
private struct WriterCounters {
    /// The log position the next appended event gets.
    var nextPosition: UInt64
    /// The oldest log position that may still be live (not yet moved to history).
    var liveHead: UInt64
    /// The key the next registered entity gets.
    var nextEntityKey: UInt64
}

/// The working state of one transaction body: the tails it touched, counters, scratch space.
private struct CommitContext {
    let stores: Journal.Stores
    let tails: TailIndex
    let configuration: Journal.Configuration
    var counters: WriterCounters
    var nextPosition: UInt64 {
        get { counters.nextPosition }
        set { counters.nextPosition = newValue }
    }
    var liveHead: UInt64 {
        get { counters.liveHead }
        set { counters.liveHead = newValue }
    }
    var nextEntityKey: UInt64 {
        get { counters.nextEntityKey }
        set { counters.nextEntityKey = newValue }
    }
    /// Tails loaded or changed by this transaction.
    var runs: [UInt64: TailRun] = [:]
    /// Tails moved entirely to history by this transaction.
    var removed: Set<UInt64> = []
    /// Entities appended to by this transaction (candidates for a coalesced move).
    var appended: Set<UInt64> = []
    var appendedCount = 0
    var registeredHere: [EntityName: EntityKey] = [:]
    var scratch: [UInt8] = []

    init(stores: Journal.Stores, tails: TailIndex, configuration: Journal.Configuration, counters: WriterCounters) {
        self.stores = stores
        self.tails = tails
        self.configuration = configuration
        self.counters = counters
    }

    /// The entity's tail as this transaction sees it; loads it from the shared index or, when the
    /// entity has no tail, starts an empty one after its latest committed sequence.
    private mutating func run(of entity: UInt64, in txn: borrowing WriteTransaction) throws -> TailRun {
        if let run = runs[entity] { return run }
        if !removed.contains(entity), let shared = tails.run(of: entity) {
            runs[entity] = shared
            return shared
        }
        let latest = try Journal.latestCommittedSequence(of: entity, in: txn, stores: stores)
        let run = TailRun(firstSequence: latest + 1, positions: [])
        runs[entity] = run
        return run
    }

    /// Checks a batch without writing anything: sequence numbers, entity keys, sizes.
    mutating func validate(_ batch: JournalBatch, in txn: borrowing WriteTransaction) throws {
        // Latest sequence per entity within this batch; batches touch few entities, so a small array.
        var latest: [(entity: UInt64, sequence: UInt64)] = []
        let maxPayload = configuration.maxPayloadBytes
        func checkSize(_ payload: [UInt8], _ entity: EntityKey?, _ sequence: UInt64?, _ what: String) throws(JournalError) {
            guard payload.count <= maxPayload else {
                throw JournalError(.payloadTooLarge, key: entity, sequence: sequence,
                                   "the \(what) has \(payload.count) bytes, more than the limit of \(maxPayload); nothing was written")
            }
        }
        func checkKnown(_ entity: EntityKey, _ sequence: UInt64?) throws(JournalError) {
            guard entity.rawValue > 0, entity.rawValue < nextEntityKey else {
                throw JournalError(.unknownEntity, key: entity, sequence: sequence,
                                   "no entity is registered under this key; register it first. Nothing was written")
            }
        }
        for operation in batch.operations {
            switch operation {
            case .register(let name):
                _ = try name.nameKey()
            case .append(let entity, let sequence, let payload):
                try checkKnown(entity, sequence)
                try checkSize(payload, entity, sequence, "event")
                let slot = latest.firstIndex { $0.entity == entity.rawValue }
                let previous = try slot.map { latest[$0].sequence } ?? run(of: entity.rawValue, in: txn).latestSequence
                guard sequence == previous + 1 else {
                    let name = try? Key8(entity.rawValue).withBytes { k in
                        try txn.withValue(forKey: k, in: stores.entities) { v in
                            try v.map { v throws(JournalError) in try EntityMetadata.decode(v, key: entity).name }
                        }
                    }
                    throw JournalError(.nonConsecutiveSequence, entity: name ?? nil, key: entity, sequence: sequence,
                                       "the entity's latest sequence is \(previous), so the next append must be \(previous + 1); nothing was written")
                }
                if let slot { latest[slot].sequence = sequence } else { latest.append((entity.rawValue, sequence)) }
            case .snapshot(let entity, let sequence, let payload):
                try checkKnown(entity, sequence)
                try checkSize(payload, entity, sequence, "snapshot")
            case .prune(let entity, _), .metadata(let entity, _):
                try checkKnown(entity, nil)
            case .scheduleTimer(let timer):
                try checkKnown(timer.entity, nil)
                try checkSize(timer.payload, timer.entity, nil, "timer payload")
            case .cancelTimer:
                break
            case .recordResult(let key, let payload):
                guard (1...511).contains(key.count) else {
                    throw JournalError(.nameTooLong, "an idempotency key must have 1...511 bytes (got \(key.count)); nothing was written")
                }
                try checkSize(payload, nil, nil, "recorded result")
            }
        }
    }

    /// Writes a validated batch. Returns the keys of the entities it registered.
    mutating func apply(_ batch: JournalBatch, in txn: borrowing WriteTransaction) throws -> [EntityKey] {
        var registered: [EntityKey] = []
        for operation in batch.operations {
            switch operation {
            case .register(let name):
                registered.append(try register(name, in: txn))
            case .append(let entity, let sequence, let payload):
                let position = nextPosition
                nextPosition += 1
                let checksum = CRC32C.checksum(payload)
                try Key8(position).withBytes { key in
                    try txn.put(reserving: JournalLayout.logHeader + payload.count, forKey: key, in: stores.log, flags: .append) { out in
                        out.storeBigEndian(entity.rawValue, at: 0)
                        out.storeBigEndian(sequence, at: 8)
                        out.storeLittleEndian(checksum, at: 16)
                        payload.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: out[20...]).copyMemory(from: $0) }
                    }
                }
                runs[entity.rawValue]!.positions.append(position)
                appended.insert(entity.rawValue)
                appendedCount += 1
            case .snapshot(let entity, let sequence, let payload):
                let checksum = CRC32C.checksum(payload)
                try Key8(entity.rawValue).withBytes { key in
                    try txn.put(reserving: 12 + payload.count, forKey: key, in: stores.snapshots) { out in
                        out.storeBigEndian(sequence, at: 0)
                        out.storeLittleEndian(checksum, at: 8)
                        payload.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: out[12...]).copyMemory(from: $0) }
                    }
                }
            case .prune(let entity, let before):
                try prune(entity, before: before, in: txn)
            case .metadata(let entity, var metadata):
                if let existing = try readMetadata(entity, in: txn) { metadata.prunedBefore = existing.prunedBefore }
                try Key8(entity.rawValue).withBytes { key in
                    try metadata.encoded().withUnsafeBytes { try txn.put($0, forKey: key, in: stores.entities) }
                }
            case .scheduleTimer(let timer):
                try Key24(timer.dueNanoseconds, timer.entity.rawValue, timer.id).withBytes { key in
                    try timer.payload.withUnsafeBytes { try txn.put($0, forKey: key, in: stores.timers) }
                }
            case .cancelTimer(let due, let entity, let id):
                try Key24(due, entity.rawValue, id).withBytes { key in _ = try txn.delete(key, in: stores.timers) }
            case .recordResult(let key, let payload):
                let checksum = CRC32C.checksum(payload)
                var record = [UInt8](repeating: 0, count: 4)
                record.withUnsafeMutableBytes { $0.storeLittleEndian(checksum, at: 0) }
                record.append(contentsOf: payload)
                do {
                    try txn.put(record, forKey: key, in: stores.idempotency, flags: .noOverwrite)
                } catch let error as LMDBError where error.code == .keyExists {
                    // The first recorded result wins.
                }
            }
        }
        return registered
    }

    private mutating func register(_ name: EntityName, in txn: borrowing WriteTransaction) throws -> EntityKey {
        if let key = registeredHere[name] { return key }
        let nameKey = try name.nameKey()
        let existing: EntityKey? = try nameKey.withUnsafeBytes { k in
            try txn.withValue(forKey: k, in: stores.names) { v in v.map { EntityKey(rawValue: $0.bigEndianUInt64(at: 0)) } }
        }
        if let existing { return existing }
        let key = EntityKey(rawValue: nextEntityKey)
        nextEntityKey += 1
        try Key8(key.rawValue).withBytes { k in
            try nameKey.withUnsafeBytes { try txn.put(k, forKey: $0, in: stores.names) }
            try EntityMetadata(name: name).encoded().withUnsafeBytes { try txn.put($0, forKey: k, in: stores.entities, flags: .append) }
        }
        registeredHere[name] = key
        return key
    }

    private func readMetadata(_ entity: EntityKey, in txn: borrowing WriteTransaction) throws -> EntityMetadata? {
        try Key8(entity.rawValue).withBytes { k in
            try txn.withValue(forKey: k, in: stores.entities) { v in
                try v.map { v throws(JournalError) in try EntityMetadata.decode(v, key: entity) }
            }
        }
    }

    /// Deletes events before `before` from history and from the entity's tail, and records the floor
    /// so the latest sequence survives even when every event is gone.
    private mutating func prune(_ entity: EntityKey, before requested: UInt64, in txn: borrowing WriteTransaction) throws {
        var tail = try run(of: entity.rawValue, in: txn)
        let before = min(requested, tail.latestSequence + 1)
        guard before > 1 else { return }
        try txn.withCursor(stores.history) { cursor in
            var entry = try Key16(entity.rawValue, 0).withBytes { try cursor.seek(atLeast: $0) }
            while let current = entry, current.key.bigEndianUInt64(at: 0) == entity.rawValue,
                  current.key.bigEndianUInt64(at: 8) < before {
                try cursor.deleteCurrent()
                entry = try cursor.next()
            }
        }
        if tail.firstSequence < before {
            let drop = min(Int(before - tail.firstSequence), tail.positions.count)
            tail.positions.removeFirst(drop)
            tail.firstSequence += UInt64(drop)
            runs[entity.rawValue] = tail
        }
        guard var metadata = try readMetadata(entity, in: txn) else { return }
        metadata.prunedBefore = max(metadata.prunedBefore, before)
        try Key8(entity.rawValue).withBytes { key in
            try metadata.encoded().withUnsafeBytes { try txn.put($0, forKey: key, in: stores.entities) }
        }
    }

    /// Moves an entity's whole tail from the log into its history range: one page for many events.
    private mutating func moveTail(of entity: UInt64, in txn: borrowing WriteTransaction) throws -> Int {
        guard let tail = runs[entity] ?? (removed.contains(entity) ? nil : tails.run(of: entity)) else { return 0 }
        for (offset, position) in tail.positions.enumerated() {
            try Key8(position).withBytes { key in
                try txn.withValue(forKey: key, in: stores.log) { value in
                    guard let value, value.count >= JournalLayout.logHeader else {
                        throw JournalError(.corruptedRecord, key: EntityKey(rawValue: entity), sequence: tail.firstSequence + UInt64(offset),
                                           "the log has no record at position \(position), which the tail index lists")
                    }
                    scratch.removeAll(keepingCapacity: true)
                    scratch.append(contentsOf: UnsafeRawBufferPointer(rebasing: value[16...]))
                }
            }
            try Key16(entity, tail.firstSequence + UInt64(offset)).withBytes { key in
                try scratch.withUnsafeBytes { try txn.put($0, forKey: key, in: stores.history) }
            }
        }
        runs[entity] = nil
        removed.insert(entity)
        return tail.positions.count
    }

    /// Moves the tails of entities appended to here that reached the coalesce threshold.
    mutating func moveFullTails(in txn: borrowing WriteTransaction) throws {
        let threshold = configuration.coalesceThreshold
        for entity in appended.sorted() where (runs[entity]?.positions.count ?? 0) >= threshold {
            _ = try moveTail(of: entity, in: txn)
        }
    }

    /// Walks the log from its oldest live entry and moves the tails of entities whose oldest event is
    /// out of the window, so the log stays bounded. Bounded work per commit: a little more than was
    /// appended, so the log keeps up under load without one commit doing it all.
    mutating func moveExpiredTails(in txn: borrowing WriteTransaction) throws {
        let window = UInt64(configuration.logWindow)
        guard nextPosition - liveHead > window else { return }
        var budget = appendedCount + 1_024
        var expired: [(position: UInt64, entity: UInt64)] = []
        try txn.withCursor(stores.log) { cursor in
            var entry = try Key8(liveHead).withBytes { try cursor.seek(atLeast: $0) }
            var head = liveHead
            while let current = entry, nextPosition - head > window, expired.count < budget {
                let position = current.key.bigEndianUInt64(at: 0)
                expired.append((position, current.value.bigEndianUInt64(at: 0)))
                head = position + 1
                entry = try cursor.next()
            }
        }
        for (position, entity) in expired {
            guard budget > 0 else { break }
            liveHead = position + 1
            let tail = runs[entity] ?? (removed.contains(entity) ? nil : tails.run(of: entity))
            guard let tail, tail.positions.first == position else { continue }  // moved already
            budget -= try moveTail(of: entity, in: txn)
        }
    }

    /// Deletes log entries below the oldest live one: contiguous deletes at the log's start.
    mutating func trimLog(in txn: borrowing WriteTransaction) throws {
        let head = liveHead
        try txn.withCursor(stores.log) { cursor in
            var entry = try cursor.first()
            while let current = entry, current.key.bigEndianUInt64(at: 0) < head {
                try cursor.deleteCurrent()
                entry = try cursor.next()
            }
        }
    }
}
