import Foundation
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
/// ``Journal/Configuration/deferredNameLimit`` names wait, the writer sorts them (on a low-priority thread) and
/// merges them into `names` in key order, a bounded slice per commit, so a merge touches each leaf
/// once for many names instead of once per name.
///
/// **Visibility.** The writer adds a commit's names here after the commit and before its callers are
/// completed. When a merge begins, the names waiting so far become its batch; the batch leaves only
/// after the commit that put its last names into `names` (one swap, not a removal per name: removing
/// each slice's names from a 65,536-entry table took a fifth of the writer's time while merging, under
/// the lock every lookup takes). A lookup checks here first and then opens its read transaction: a
/// name missing here either was never registered, or was merged by a commit that finished before the
/// check, which that later read transaction sees.
final class PendingNames: Sendable {
    private struct Tables {
        /// Names registered since the last merge began.
        var recent: [EntityName: EntityKey] = [:]
        /// The batch being merged.
        var merging: [EntityName: EntityKey] = [:]
    }
    private let tables: Mutex<Tables>
    /// Room reserved in each table: a merge's batch, with a quarter more for the names that arrive
    /// while the previous merge finishes. Growing a table rehashes every name in it while holding the
    /// lock every lookup takes (at 49,152 names, a pause of several milliseconds for every turn that
    /// looks a name up); the room is reserved up front instead. Untouched room costs address space,
    /// not memory.
    private let capacity: Int

    /// `batch`: names a merge takes (``Journal/Configuration/deferredNameLimit``).
    init(batch: Int) {
        capacity = max(1, batch) + max(1, batch) / 4
        tables = Mutex(Tables(recent: Dictionary(minimumCapacity: capacity)))
    }

    /// The key of a registered name that is not in `names` yet (or not known to be), or `nil`.
    func key(for name: EntityName) -> EntityKey? {
        tables.withLock { tables in
            if let key = tables.recent[name] { return key }
            return tables.merging.isEmpty ? nil : tables.merging[name]
        }
    }

    var count: Int { tables.withLock { $0.recent.count + $0.merging.count } }

    /// The waiting names of `type` whose id sorts after `after` (by UTF-8 bytes), unsorted. A name
    /// of the batch being merged may be in `names` too.
    func names(ofType type: String, after: String?) -> [EntityName] {
        tables.withLock { tables in
            var found: [EntityName] = []
            for table in [tables.recent, tables.merging] {
                for name in table.keys where name.type == type {
                    if let after, !after.utf8.lexicographicallyPrecedes(name.id.utf8) { continue }
                    found.append(name)
                }
            }
            return found
        }
    }

    /// Names a commit registered (call after it committed).
    func add(_ names: [PendingName]) {
        guard !names.isEmpty else { return }
        tables.withLock { tables in
            for pending in names { tables.recent[pending.name] = pending.key }
        }
    }

    /// A merge begins if at least `limit` names were added since the last one began: they become its
    /// batch, returned (the table itself, which stays as it is until ``endMerge()``). Writer only.
    func beginMerge(atLeast limit: Int) -> [EntityName: EntityKey]? {
        guard tables.withLock({ $0.recent.count }) >= max(1, limit) else { return nil }
        var fresh = [EntityName: EntityKey](minimumCapacity: capacity)
        return tables.withLock { tables in
            precondition(tables.merging.isEmpty, "a name merge began before the previous one ended")
            swap(&tables.recent, &tables.merging)
            swap(&tables.recent, &fresh)
            return tables.merging
        }
    }

    /// Whether a merge has begun and not yet ended.
    var isMerging: Bool { tables.withLock { !$0.merging.isEmpty } }

    /// The commit that put the batch's last names into `names` is done: the batch goes.
    func endMerge() {
        var batch: [EntityName: EntityKey] = [:]
        tables.withLock { swap(&$0.merging, &batch) }
        // Freed off the writer's thread (tens of thousands of names; dispatch runs background work at nice 10).
        DispatchQueue.global(qos: .background).async { [batch] in withExtendedLifetime(batch) {} }
    }
}

/// A registration waiting for the `names` index: its name and key.
struct PendingName: Sendable {
    var name: EntityName
    var key: EntityKey

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
        /// `sorted`'s names from `next` on still go into `names`, a slice per commit.
        case merging(sorted: SortedNames, next: Int, upTo: UInt64)
        /// Every row below `upTo` is in `names`; the rows are deleted from `pending-names`, a slice per commit.
        case deleting(upTo: UInt64)
    }

    /// Where a background sort leaves its result.
    final class SortResult: Sendable {
        private let sorted = Mutex<SortedNames?>(nil)
        func put(_ names: SortedNames) { sorted.withLock { $0 = names } }
        func take() -> SortedNames? { sorted.withLock { $0.take() } }
    }

    var phase = Phase.idle

    /// Moves on from `sorting` once the sort is done, and starts one when enough names wait in
    /// `pending`; `next` is the first `pending-names` row not yet written.
    mutating func advance(limit: Int, next: UInt64, pending: PendingNames) {
        if case .sorting(let upTo, let result) = phase, let sorted = result.take() {
            phase = .merging(sorted: sorted, next: 0, upTo: upTo)
        }
        guard case .idle = phase, let batch = pending.beginMerge(atLeast: limit) else { return }
        let result = SortResult()
        phase = .sorting(upTo: next, result: result)
        Self.sortInBackground(batch, into: result)
    }

    /// Sorts on a thread of its own at the lowest CPU priority (nice 19), so that it runs on time the
    /// turns leave: at normal priority, the sort of 65,536 names took half of both cores from the turns
    /// while it ran, and `saga-transfer`'s slowest transfers were the ones in flight then. Its names are
    /// found in the table meanwhile.
    private static func sortInBackground(_ names: [EntityName: EntityKey], into result: SortResult) {
        Thread {
            // Named from inside: on Linux a name given before `start()` never reaches the OS thread.
            Thread.current.name = "de-name-sort"
            _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 19)  // this thread only (Linux)
            result.put(SortedNames(names))
        }.start()
    }
}

/// A merge's names in `names` key order, as LMDB orders keys (bytewise, a prefix first).
///
/// Every key's bytes are in one buffer, so a batch is three allocations rather than one per name (a
/// key array each made the sort ~4× slower, comparing through generic iterators, and freeing 65,536 of
/// them at the merge's end held the writer up for milliseconds).
struct SortedNames: Sendable {
    /// Every name's `names` key (type, zero byte, id), one after another.
    private var bytes: [UInt8] = []
    /// In key order: where each name's key is in `bytes`, and the entity key it maps to.
    private var entries: [(start: Int, count: Int, key: EntityKey)] = []

    init(_ names: [EntityName: EntityKey]) {
        entries.reserveCapacity(names.count)
        for (name, key) in names {
            let count = name.type.utf8.count + 1 + name.id.utf8.count
            entries.append((bytes.count, count, key))
            name.withNameKey(count: count) { bytes.append(contentsOf: $0) }
        }
        bytes.withUnsafeBytes { all in
            entries.sort { a, b in
                let order = memcmp(all.baseAddress! + a.start, all.baseAddress! + b.start, min(a.count, b.count))
                return order != 0 ? order < 0 : a.count < b.count
            }
        }
    }

    var count: Int { entries.count }

    /// Calls `body` with the `names` key and the entity key of the name at `index` (in key order).
    func withEntry<R>(at index: Int, _ body: (_ nameKey: UnsafeRawBufferPointer, _ key: EntityKey) throws -> R) rethrows -> R {
        let entry = entries[index]
        return try bytes.withUnsafeBytes { try body(UnsafeRawBufferPointer(rebasing: $0[entry.start..<(entry.start + entry.count)]), entry.key) }
    }
}
