import DurableEntities

/// How fast this machine's caches serve a small working set right now.
///
/// On a shared host (a VM, a busy server) other tenants compete for the last-level cache and the
/// memory bus. A pure arithmetic loop does not notice them, but code that chases pointers through a
/// few megabytes — a runtime's entities, mailboxes, allocator and B-tree pages — slows down by up
/// to several times, and so do its figures. The harness times this probe before and after each
/// scenario and prints both next to the figures, so runs from different hours can be told apart by
/// the machine's state rather than by guesswork.
///
/// The probe: 2,000,000 dependent loads at random over a 4 MiB table (one cycle through every
/// slot, so no load can start before the previous one ended and nothing is predictable). On a quiet
/// host the table stays in the last-level cache; when neighbours evict it, every load goes to
/// memory. It runs on one thread for tens to a few hundred milliseconds.
enum HostProbe {
    /// Slots of the table: 4 MiB of `UInt32`.
    static let slots = 1 << 20
    /// Loads timed per probe.
    static let loads = 2_000_000

    /// One cycle through all slots (Sattolo's algorithm): `table[i]` is the slot visited after `i`.
    /// A fixed seed: every run walks the same path. Built for each probe, outside the timing, and
    /// freed after it, so the table is not part of a scenario's peak memory.
    private static func makeTable() -> [UInt32] {
        var table = (0..<UInt32(slots)).map { $0 }
        var generator = DeterministicRandom(seed: 0x5EED_CAC4E)
        var index = slots - 1
        while index > 0 {
            let other = Int(generator.next() % UInt64(index))
            table.swapAt(index, other)
            index -= 1
        }
        return table
    }

    /// Milliseconds for ``loads`` dependent loads over the table.
    static func milliseconds() -> Double {
        let table = makeTable()
        let clock = ContinuousClock()
        var slot: UInt32 = 0
        let elapsed = clock.measure {
            table.withUnsafeBufferPointer { walk in
                for _ in 0..<loads { slot = walk[Int(slot)] }
            }
        }
        // Keeps the walk from being optimised away: the slot is always in range.
        precondition(Int(slot) < slots)
        return elapsed.seconds * 1e3
    }
}
