import Synchronization

/// The events of one entity that are still only in the `log`: sequence numbers
/// `firstSequence ..< firstSequence + positions.count`, at those log positions.
struct TailRun: Sendable {
    var firstSequence: UInt64
    var positions: [UInt64]

    var latestSequence: UInt64 { firstSequence + UInt64(positions.count) - 1 }

    /// At open, adds the log record at `position`, whose header claims `sequence` (see
    /// `Journal.recover`). Returns whether that is the sequence expected next; if not (damage), the
    /// run still gets one position per sequence: 0 (never a log position) for each record missing
    /// before this one, as many as the positions in between allow; else this record stands for the
    /// expected sequence (its header is wrong, which reads check).
    mutating func addRecovered(position: UInt64, claiming sequence: UInt64) -> Bool {
        let expected = firstSequence + UInt64(positions.count)
        guard sequence != expected else {
            positions.append(position)
            return true
        }
        let room = position - (positions.last ?? 0) - 1
        if sequence > expected, sequence - expected <= room {
            positions.append(contentsOf: repeatElement(0, count: Int(sequence - expected)))
        }
        positions.append(position)
        return false
    }

    /// At open, lets the intact record at `position`, which claims `sequence`, take the place of the
    /// run's last record `suspect` (one that failed its check) when that stood for `sequence`.
    /// Returns whether it did.
    mutating func replaceLast(_ suspect: UInt64, with position: UInt64, claiming sequence: UInt64) -> Bool {
        guard positions.last == suspect, sequence == latestSequence else { return false }
        positions[positions.count - 1] = position
        return true
    }

    /// Applies a delta over this run in place (one dictionary access in ``TailIndex/publish(_:)``).
    mutating func apply(_ delta: TailDelta) {
        if delta.dropped > 0 { positions.removeFirst(delta.dropped) }
        delta.appended.append(to: &positions)
        firstSequence = delta.firstSequence
    }
}

/// Entity key → its tail in the log. Written by the journal's writer thread after each commit, read by
/// any reader, which copies an entity's run under the lock and only then begins its read transaction
/// (see ``Journal/forEachEvent(of:from:through:_:)`` for why that order makes reads consistent).
final class TailIndex: Sendable {
    let runs = Mutex(EntityTable<TailRun>())

    func run(of entity: UInt64) -> TailRun? {
        runs.withLock { $0[entity] }
    }

    /// The length and first sequence of the entity's tail, read in place: no copy of its positions
    /// (the writer asks this for every entity of every commit, and retaining each entity's positions
    /// array, last touched a commit or more ago, was ~2% of `entity-signals`' CPU).
    func shape(of entity: UInt64) -> (count: Int, firstSequence: UInt64)? {
        runs.withLock { $0.read(entity) { ($0.positions.count, $0.firstSequence) } }
    }
}

/// A table keyed by entity key. Keys are allocated densely from 1, so it is a paged array: lookups
/// index, never hash (hashing was a visible share of the writer's time with 1,000 entities a commit).
/// A page exists only while it holds a value: the table's memory follows the entities that have a
/// value now, not every key that ever had one (a journal whose million entities each once had a tail
/// in the log would otherwise keep ~16 MB of empty pages).
struct EntityTable<Value>: ~Copyable {
    private static var pageBits: UInt64 { 12 }
    private var pages: [[Value?]] = []
    /// Values in each page (a page whose count falls to 0 is freed).
    private var occupied: [Int] = []
    private(set) var count = 0

    /// Pages allocated now (for tests).
    var allocatedPages: Int { occupied.count(where: { $0 > 0 }) }

    init() {}

    /// The page and slot of `key`.
    private static func split(_ key: UInt64) -> (page: Int, slot: Int) {
        (Int(key >> pageBits), Int(key & ((1 << pageBits) - 1)))
    }

    /// Where `key`'s value is, if its page exists.
    private func location(of key: UInt64) -> (page: Int, slot: Int)? {
        let (page, slot) = Self.split(key)
        guard page < pages.count, !pages[page].isEmpty else { return nil }
        return (page, slot)
    }

    subscript(key: UInt64) -> Value? {
        get {
            guard let (page, slot) = location(of: key) else { return nil }
            return pages[page][slot]
        }
        set {
            let (page, slot) = Self.split(key)
            if page >= pages.count {
                guard newValue != nil else { return }
                pages.append(contentsOf: repeatElement([], count: page - pages.count + 1))
                occupied.append(contentsOf: repeatElement(0, count: page - occupied.count + 1))
            }
            if pages[page].isEmpty {
                guard newValue != nil else { return }
                pages[page] = Array(repeating: nil, count: 1 << Int(Self.pageBits))
            }
            let change = (newValue != nil ? 1 : 0) - (pages[page][slot] != nil ? 1 : 0)
            count += change
            occupied[page] += change
            if occupied[page] == 0 {
                pages[page] = []
            } else {
                pages[page][slot] = newValue
            }
        }
    }

    /// Mutates the value under `key` in place, if there is one.
    mutating func modify(_ key: UInt64, _ body: (inout Value) -> Void) {
        guard let (page, slot) = location(of: key), pages[page][slot] != nil else { return }
        body(&pages[page][slot]!)
    }

    /// What `body` reads from the value under `key`, in place (the value is not copied: reading a
    /// field of a value with an array in it does not retain the array), if there is one.
    func read<R>(_ key: UInt64, _ body: (borrowing Value) -> R) -> R? {
        guard let (page, slot) = location(of: key), pages[page][slot] != nil else { return nil }
        return body(pages[page][slot]!)
    }

    /// Every key and value, in key order.
    func forEach(_ body: (UInt64, Value) -> Void) {
        for (pageIndex, page) in pages.enumerated() where !page.isEmpty {
            for (slot, value) in page.enumerated() {
                if let value { body(UInt64(pageIndex) << Self.pageBits | UInt64(slot), value) }
            }
        }
    }
}

/// What one transaction changes in an entity's tail, kept apart from the published ``TailRun`` so that
/// the transaction never copies the published positions (copy-on-write) and publishing appends in place.
struct TailDelta {
    /// Positions the published run had when the transaction loaded it (0 when none, or after a move).
    var baseCount: Int
    /// Positions dropped from the front of the published run by retention.
    var dropped = 0
    /// The sequence of the tail's first event, after drops and moves.
    var firstSequence: UInt64
    /// Positions this transaction appended.
    var appended = AppendedPositions()
    /// The whole tail was moved to history by this transaction; the published run no longer applies.
    var moved = false

    var count: Int { baseCount - dropped + appended.count }

    /// Appends a position; returns the tail's new length.
    mutating func append(_ position: UInt64) -> Int {
        appended.append(position)
        return count
    }
    var latestSequence: UInt64 { firstSequence + UInt64(count) - 1 }
}

/// The log positions a transaction appended to one entity's tail, in order. An entity's events in
/// one batch get consecutive positions, and an entity has one batch in most commits (its turns
/// commit one after another), so the first run of consecutive positions is held inline: a commit
/// costs no allocation per entity for them. Positions after a gap go to an array.
struct AppendedPositions {
    /// The inline run: `runCount` consecutive positions from `runStart`.
    private var runStart: UInt64 = 0
    private var runCount = 0
    /// Positions after the inline run.
    private var rest: [UInt64] = []

    var count: Int { runCount + rest.count }
    var isEmpty: Bool { count == 0 }
    var first: UInt64? { runCount > 0 ? runStart : rest.first }

    mutating func append(_ position: UInt64) {
        if rest.isEmpty {
            if runCount == 0 {
                runStart = position
                runCount = 1
                return
            }
            if position == runStart &+ UInt64(runCount) {
                runCount += 1
                return
            }
        }
        rest.append(position)
    }

    /// Drops the first `count` positions (at most ``count``).
    mutating func removeFirst(_ count: Int) {
        let fromRun = min(count, runCount)
        runStart &+= UInt64(fromRun)
        runCount -= fromRun
        rest.removeFirst(count - fromRun)
    }

    /// Appends the positions, in order, to `positions`.
    func append(to positions: inout [UInt64]) {
        for offset in 0..<runCount { positions.append(runStart &+ UInt64(offset)) }
        positions.append(contentsOf: rest)
    }

    /// The positions, in order, in an array with room for at least `minimumCapacity`.
    func array(minimumCapacity: Int = 0) -> [UInt64] {
        var positions: [UInt64] = []
        positions.reserveCapacity(Swift.max(count, minimumCapacity))
        append(to: &positions)
        return positions
    }
}

extension TailIndex {
    /// Applies a committed transaction's deltas in place.
    func publish(_ deltas: [UInt64: TailDelta]) {
        runs.withLock { runs in
            for (entity, delta) in deltas {
                if delta.count == 0 {
                    runs[entity] = nil
                } else if delta.moved || delta.baseCount == 0 {
                    runs[entity] = TailRun(firstSequence: delta.firstSequence, positions: delta.appended.array(minimumCapacity: 8))  // room for a few more turns' events
                } else if delta.dropped > 0 || !delta.appended.isEmpty {
                    runs.modify(entity) { $0.apply(delta) }
                }
            }
        }
    }
}

/// Hands out entity keys: ascending, never reused within a process. A key becomes durable with the
/// commit that registers a name under it; a reserved key whose registration never commits is simply
/// never used (holes are harmless).
final class KeyAllocator: Sendable {
    private let next: Atomic<UInt64>
    init(next: UInt64) { self.next = Atomic(max(1, next)) }
    /// A fresh key.
    func allocate() -> UInt64 { next.add(1, ordering: .relaxed).oldValue }
    /// Every key below this one has been handed out.
    var bound: UInt64 { next.load(ordering: .relaxed) }
}
