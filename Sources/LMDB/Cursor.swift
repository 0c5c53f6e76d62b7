import CLMDB

/// A position in a ``Database``, lent by ``TransactionReading/withCursor(_:_:)``.
///
/// Moves return the entry at the new position, or `nil` past either end. An entry's buffers are valid
/// until the cursor moves or the transaction writes or ends.
public struct Cursor: ~Copyable {
    /// A key and its value, pointing into the map.
    public struct Entry {
        public let key: UnsafeRawBufferPointer
        public let value: UnsafeRawBufferPointer
    }

    let handle: OpaquePointer
    let database: Database
    let path: String

    deinit { mdb_cursor_close(handle) }

    private func move(_ op: MDB_cursor_op, key: UnsafeRawBufferPointer? = nil) throws(LMDBError) -> Entry? {
        var k = MDB_val()
        if let key { k = MDB_val(mv_size: key.count, mv_data: UnsafeMutableRawPointer(mutating: key.baseAddress)) }
        var v = MDB_val()
        let rc = mdb_cursor_get(handle, &k, &v, op)
        if rc == MDB_NOTFOUND { return nil }
        try LMDBError.check(rc, "mdb_cursor_get(\(database.name))", path: path)
        return Entry(key: UnsafeRawBufferPointer(start: k.mv_data, count: k.mv_size),
                     value: UnsafeRawBufferPointer(start: v.mv_data, count: v.mv_size))
    }

    /// The first entry.
    public func first() throws(LMDBError) -> Entry? { try move(MDB_FIRST) }
    /// The last entry.
    public func last() throws(LMDBError) -> Entry? { try move(MDB_LAST) }
    /// The next entry.
    public func next() throws(LMDBError) -> Entry? { try move(MDB_NEXT) }
    /// The previous entry.
    public func previous() throws(LMDBError) -> Entry? { try move(MDB_PREV) }
    /// The entry at the cursor.
    public func current() throws(LMDBError) -> Entry? { try move(MDB_GET_CURRENT) }
    /// The first entry whose key is at least `key` (`MDB_SET_RANGE`).
    public func seek(atLeast key: UnsafeRawBufferPointer) throws(LMDBError) -> Entry? { try move(MDB_SET_RANGE, key: key) }
    /// The first entry whose key is at least `key`.
    public func seek(atLeast key: [UInt8]) throws -> Entry? {
        try key.withUnsafeBytes { k in try seek(atLeast: k) }
    }
    /// The last entry whose key is below `key`, or `nil`.
    public func seek(below key: [UInt8]) throws -> Entry? {
        if try seek(atLeast: key) != nil { return try previous() }
        return try last()
    }

    /// Stores `value` under `key` (write transactions only); the cursor then stands on it. Keys put in
    /// order through one cursor land on the leaf page it stands on without a search from the root
    /// (`mdb_cursor_put` checks the current page first).
    /// - Throws: ``LMDBError`` (`keyExists` with `.noOverwrite`/`.append`, `badValueSize`, `mapFull`).
    public func put(_ value: UnsafeRawBufferPointer, forKey key: UnsafeRawBufferPointer, flags: PutFlags = []) throws(LMDBError) {
        var k = MDB_val(mv_size: key.count, mv_data: UnsafeMutableRawPointer(mutating: key.baseAddress))
        var v = MDB_val(mv_size: value.count, mv_data: UnsafeMutableRawPointer(mutating: value.baseAddress))
        try LMDBError.check(mdb_cursor_put(handle, &k, &v, flags.rawValue), "mdb_cursor_put(\(database.name))", path: path)
    }

    /// Deletes the entry at the cursor (write transactions only); the cursor then stands on the next one.
    public func deleteCurrent() throws(LMDBError) {
        try LMDBError.check(mdb_cursor_del(handle, 0), "mdb_cursor_del(\(database.name))", path: path)
    }
}
