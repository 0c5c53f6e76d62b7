import Synchronization

/// The events of one entity that are still only in the `log`: sequence numbers
/// `firstSequence ..< firstSequence + positions.count`, at those log positions.
struct TailRun: Sendable {
    var firstSequence: UInt64
    var positions: [UInt64]

    var latestSequence: UInt64 { firstSequence + UInt64(positions.count) - 1 }
}

/// Entity key → its tail in the log. Written by the journal's writer thread after each commit, read by
/// any reader, which copies an entity's run under the lock and only then begins its read transaction
/// (see ``Journal/forEachEvent(of:from:through:_:)`` for why that order makes reads consistent).
final class TailIndex: Sendable {
    let runs = Mutex<[UInt64: TailRun]>([:])

    func run(of entity: UInt64) -> TailRun? {
        runs.withLock { $0[entity] }
    }
}
