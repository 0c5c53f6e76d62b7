import Dispatch
import LMDB
import Synchronization

/// Names registered but not yet in the sorted `names` index, for lookups from any thread.
///
/// **Why.** Entity names arrive in no particular order (order ids, UUIDs), so inserting each into the
/// `names` B-tree as it registers dirties a random leaf page per new entity: once the index has more
/// leaves than a commit has registrations, that is one 4 KiB page written and fsync'd for every new
/// entity, most of a busy commit's bytes (measured in `saga-transfer`: 1.9 → 0.8 ms a commit without
/// it). So a registration writes its name to the `pending-names` table instead — keyed by a counter,
/// so every commit appends at that table's end — and into this in-memory table; when
/// ``Journal/Configuration/deferredNameLimit`` names wait, the writer sorts them (off its thread) and
/// merges them into `names` in key order, a bounded slice per commit, so a merge touches each leaf
/// once for many names instead of once per name.
///
/// **Visibility.** The writer adds a commit's names here after the commit and before its callers are
/// completed, and removes merged names only after the commit that put them into `names`. A lookup
/// checks here first and then opens its read transaction: a name missing here either was never
/// registered, or was merged by a commit that finished before the check, which that later read
/// transaction sees.
final class PendingNames: Sendable {
    private let table = Mutex<[EntityName: EntityKey]>([:])

    /// The key of a registered name that is not in `names` yet, or `nil`.
    func key(for name: EntityName) -> EntityKey? { table.withLock { $0[name] } }

    var count: Int { table.withLock { $0.count } }

    /// Names a commit registered (call after it committed).
    func add(_ names: [PendingName]) {
        guard !names.isEmpty else { return }
        table.withLock { table in
            for pending in names { table[pending.name] = pending.key }
        }
    }

    /// Names a commit put into `names` (call after it committed).
    func remove(_ names: ArraySlice<PendingName>) {
        guard !names.isEmpty else { return }
        table.withLock { table in
            for pending in names { table[pending.name] = nil }
        }
    }
}

/// A registration waiting for the `names` index: its name and key.
struct PendingName: Sendable {
    var name: EntityName
    var key: EntityKey
    /// The `names` key (type, zero byte, id), filled in when a merge sorts it.
    var nameKey: [UInt8] = []

    /// Layout of a `pending-names` row's value: the entity key (8 bytes, big-endian), then its `names` key.
    /// The row under key 0 holds the merge watermark instead: rows below it are in `names` already.
    static func decode(sequence: UInt64, _ value: UnsafeRawBufferPointer) throws(JournalError) -> PendingName {
        guard value.count > 9, let name = EntityName(nameKey: UnsafeRawBufferPointer(rebasing: value[8...])) else {
            throw JournalError(.corruptedRecord, "the pending name in row \(sequence) is damaged (\(value.count) bytes)")
        }
        return PendingName(name: name, key: EntityKey(rawValue: value.bigEndianUInt64(at: 0)))
    }
}

/// The writer's side of the deferred name index (owned by the writer thread; changed only after a
/// commit succeeds, like its other counters).
struct NameMerge {
    enum Phase {
        /// Names wait until ``Journal/Configuration/deferredNameLimit`` of them do.
        case idle
        /// A batch of names (every row below `upTo`) is being sorted off the writer's thread.
        case sorting(upTo: UInt64, result: SortResult)
        /// `sorted[next...]` still go into `names`, a slice per commit.
        case merging(sorted: [PendingName], next: Int, upTo: UInt64)
        /// Every row below `upTo` is in `names`; the rows are deleted from `pending-names`, a slice per commit.
        case deleting(upTo: UInt64)
    }

    /// Where a background sort leaves its result.
    final class SortResult: Sendable {
        private let sorted = Mutex<[PendingName]?>(nil)
        func put(_ names: [PendingName]) { sorted.withLock { $0 = names } }
        func take() -> [PendingName]? { sorted.withLock { $0.take() } }
    }

    var phase = Phase.idle
    /// Committed registrations not yet part of a merge.
    var waiting: [PendingName] = []

    /// Moves on from `sorting` once the sort is done, and starts one when enough names wait; `next`
    /// is the first `pending-names` row not yet written.
    mutating func advance(limit: Int, next: UInt64) {
        if case .sorting(let upTo, let result) = phase, let sorted = result.take() {
            phase = .merging(sorted: sorted, next: 0, upTo: upTo)
        }
        guard case .idle = phase, waiting.count >= max(1, limit) else { return }
        let result = SortResult()
        let names = waiting
        waiting = []
        phase = .sorting(upTo: next, result: result)
        DispatchQueue.global(qos: .utility).async {
            result.put(Self.sorted(names))
        }
    }

    /// `names` sorted by their `names` key, as LMDB orders keys (bytewise, a prefix first).
    static func sorted(_ names: [PendingName]) -> [PendingName] {
        var keyed = names
        for index in keyed.indices { keyed[index].nameKey = keyed[index].name.nameKey }
        keyed.sort { $0.nameKey.lexicographicallyPrecedes($1.nameKey) }
        return keyed
    }
}
