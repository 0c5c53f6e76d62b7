import CLMDB

/// What read-only and write transactions share: gets and cursors.
///
/// Raw buffers handed out (``withValue(forKey:in:_:)``, ``Cursor/Entry``) point into the map and are
/// valid only until the transaction ends or, in a write transaction, until the next write.
public protocol TransactionReading: ~Copyable {
    /// The `MDB_txn` pointer.
    var handle: OpaquePointer { get }
    /// The environment's path, for errors.
    var path: String { get }
}

extension TransactionReading where Self: ~Copyable {
    /// Calls `body` with the value stored under `key`, or `nil` when there is none.
    public func withValue<R>(
        forKey key: UnsafeRawBufferPointer, in database: Database,
        _ body: (UnsafeRawBufferPointer?) throws -> R
    ) throws -> R {
        var k = MDB_val(mv_size: key.count, mv_data: UnsafeMutableRawPointer(mutating: key.baseAddress))
        var v = MDB_val()
        let rc = mdb_get(handle, database.handle, &k, &v)
        if rc == MDB_NOTFOUND { return try body(nil) }
        try LMDBError.check(rc, "mdb_get(\(database.name))", path: path)
        return try body(UnsafeRawBufferPointer(start: v.mv_data, count: v.mv_size))
    }

    /// The value stored under `key`, copied, or `nil`.
    public func value(forKey key: [UInt8], in database: Database) throws -> [UInt8]? {
        try key.withUnsafeBytes { k in
            try withValue(forKey: k, in: database) { $0.map { Array($0) } }
        }
    }

    /// Whether `key` is present.
    public func contains(_ key: [UInt8], in database: Database) throws -> Bool {
        try key.withUnsafeBytes { k in try withValue(forKey: k, in: database) { $0 != nil } }
    }

    /// Calls `body` with a cursor over `database`; the cursor closes when `body` returns.
    public func withCursor<R>(_ database: Database, _ body: (borrowing Cursor) throws -> R) throws -> R {
        var pointer: OpaquePointer?
        try LMDBError.check(mdb_cursor_open(handle, database.handle, &pointer), "mdb_cursor_open(\(database.name))", path: path)
        let cursor = Cursor(handle: pointer!, database: database, path: path)
        return try body(cursor)
    }

    /// The number of entries in `database`.
    public func count(_ database: Database) throws -> Int {
        var stat = MDB_stat()
        try LMDBError.check(mdb_stat(handle, database.handle, &stat), "mdb_stat(\(database.name))", path: path)
        return stat.ms_entries
    }
}

/// A read-only transaction, lent to the body of ``Environment/read(_:)``.
public struct ReadTransaction: ~Copyable, TransactionReading {
    public let handle: OpaquePointer
    public let path: String
}

/// A write transaction, lent to the body of ``Environment/write(_:)``; committed when the body returns.
public struct WriteTransaction: ~Copyable, TransactionReading {
    public let handle: OpaquePointer
    public let path: String

    /// Stores `value` under `key`.
    /// - Throws: ``LMDBError`` (`keyExists` with `.noOverwrite`/`.append`, `badValueSize`, `mapFull`).
    public func put(_ value: UnsafeRawBufferPointer, forKey key: UnsafeRawBufferPointer, in database: Database, flags: PutFlags = []) throws(LMDBError) {
        var k = MDB_val(mv_size: key.count, mv_data: UnsafeMutableRawPointer(mutating: key.baseAddress))
        var v = MDB_val(mv_size: value.count, mv_data: UnsafeMutableRawPointer(mutating: value.baseAddress))
        try LMDBError.check(mdb_put(handle, database.handle, &k, &v, flags.rawValue), "mdb_put(\(database.name))", path: path)
    }

    /// Stores `value` under `key`.
    public func put(_ value: [UInt8], forKey key: [UInt8], in database: Database, flags: PutFlags = []) throws {
        try key.withUnsafeBytes { k in
            try value.withUnsafeBytes { v in
                try put(v, forKey: k, in: database, flags: flags)
            }
        }
    }

    /// Reserves `count` bytes under `key` and lets `fill` write them in place (`MDB_RESERVE`).
    public func put(reserving count: Int, forKey key: UnsafeRawBufferPointer, in database: Database, flags: PutFlags = [], _ fill: (UnsafeMutableRawBufferPointer) -> Void) throws(LMDBError) {
        var k = MDB_val(mv_size: key.count, mv_data: UnsafeMutableRawPointer(mutating: key.baseAddress))
        var v = MDB_val(mv_size: count, mv_data: nil)
        try LMDBError.check(mdb_put(handle, database.handle, &k, &v, flags.rawValue | UInt32(MDB_RESERVE)), "mdb_put(\(database.name))", path: path)
        fill(UnsafeMutableRawBufferPointer(start: v.mv_data, count: count))
    }

    /// Deletes `key`. Returns whether it was there.
    @discardableResult
    public func delete(_ key: UnsafeRawBufferPointer, in database: Database) throws(LMDBError) -> Bool {
        var k = MDB_val(mv_size: key.count, mv_data: UnsafeMutableRawPointer(mutating: key.baseAddress))
        let rc = mdb_del(handle, database.handle, &k, nil)
        if rc == MDB_NOTFOUND { return false }
        try LMDBError.check(rc, "mdb_del(\(database.name))", path: path)
        return true
    }

    /// Deletes `key`. Returns whether it was there.
    @discardableResult
    public func delete(_ key: [UInt8], in database: Database) throws -> Bool {
        try key.withUnsafeBytes { k in try delete(k, in: database) }
    }

    /// Removes every entry of `database` (the database itself stays).
    public func clear(_ database: Database) throws(LMDBError) {
        try LMDBError.check(mdb_drop(handle, database.handle, 0), "mdb_drop(\(database.name))", path: path)
    }
}
