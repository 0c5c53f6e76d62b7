import Foundation

/// The newest log records (checksum + payload), kept in a fixed byte ring by the writer, so that moving
/// an entity's tail into its history range seldom has to read its events back from the log: each
/// `mdb_get` there is a B-tree search, and a commit moves about as many events as it appends.
///
/// Bounded: `capacity` bytes of records and one slot per power-of-two position modulo. A record is
/// found only while its slot still names its position and the ring has not written over its bytes;
/// otherwise the caller reads the log. Filled for positions appended by transactions that may still
/// abort: a position is only looked up after it was appended again, which overwrites its slot (or,
/// for a record too large to keep, clears it), so a stale record is never returned.
///
/// Used by the writer thread only.
final class RecentRecords {
    private struct Slot {
        /// The position plus one; 0 for an empty slot (fresh memory from `calloc` reads as empty).
        var tag: UInt64
        /// Absolute byte offset (bytes written since creation) of the record's first byte.
        var start: UInt64
        var count: Int
    }
    /// Both buffers come from `calloc`: the system hands out untouched zero pages, so memory is
    /// resident only as far as the ring has been written.
    private let ring: UnsafeMutableRawBufferPointer
    private let slots: UnsafeMutableBufferPointer<Slot>
    private let slotMask: Int
    /// Bytes written since creation (the ring's write offset is this modulo its size).
    private var written: UInt64 = 0
    private(set) var hits = 0
    private(set) var misses = 0

    /// - Parameter capacity: bytes of records to keep (0 disables the cache).
    init(capacity: Int) {
        let bytes = max(0, capacity)
        // One slot per 64 bytes of ring (about one per record), a power of two.
        var count = 1
        while count < max(1, bytes / 64) { count <<= 1 }
        if bytes == 0 { count = 0 }
        ring = UnsafeMutableRawBufferPointer(start: bytes == 0 ? nil : calloc(bytes, 1), count: bytes)
        slots = UnsafeMutableBufferPointer(start: count == 0 ? nil : calloc(count, MemoryLayout<Slot>.stride)?.assumingMemoryBound(to: Slot.self),
                                           count: count)
        slotMask = max(0, count - 1)
    }

    deinit {
        free(ring.baseAddress)
        free(slots.baseAddress)
    }

    /// Keeps the `CRC-32C (4) + payload` record appended at `position`.
    func record(position: UInt64, record: UnsafeRawBufferPointer) {
        let size = record.count
        guard !slots.isEmpty else { return }
        guard size <= ring.count / 16 else {
            // Not kept; the slot forgets whatever it held for this position (a record of a transaction
            // that aborted may have used the same position), so a lookup reads the log.
            slots[Int(truncatingIfNeeded: position) & slotMask].tag = 0
            return
        }
        var offset = Int(written % UInt64(ring.count))
        if offset + size > ring.count {  // records never wrap: skip to the ring's start
            written += UInt64(ring.count - offset)
            offset = 0
        }
        UnsafeMutableRawBufferPointer(rebasing: ring[offset..<(offset + size)]).copyMemory(from: record)
        slots[Int(truncatingIfNeeded: position) & slotMask] = Slot(tag: position &+ 1, start: written, count: size)
        written += UInt64(size)
    }

    /// Calls `body` with the record of `position` (checksum + payload) if it is still kept.
    /// - Returns: `false` when it is not (read the log instead).
    func withRecord(position: UInt64, _ body: (UnsafeRawBufferPointer) throws -> Void) rethrows -> Bool {
        guard !slots.isEmpty else { return false }
        let slot = slots[Int(truncatingIfNeeded: position) & slotMask]
        guard slot.tag == position &+ 1, written - slot.start <= UInt64(ring.count) else {
            misses += 1
            return false
        }
        hits += 1
        let offset = Int(slot.start % UInt64(ring.count))
        try body(UnsafeRawBufferPointer(rebasing: ring[offset..<(offset + slot.count)]))
        return true
    }
}
