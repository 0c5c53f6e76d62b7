import CLMDB

/// A named database inside an ``Environment``: an ordered map from byte keys (1...511 bytes) to byte
/// values, compared as unsigned bytes (`memcmp`). Get one from ``Environment/database(_:create:)``.
public struct Database: Sendable, Hashable {
    let handle: MDB_dbi
    /// The database's name.
    public let name: String
}

/// Flags for a put.
public struct PutFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Fail with ``LMDBError/Code/keyExists`` if the key exists.
    public static let noOverwrite = PutFlags(rawValue: UInt32(MDB_NOOVERWRITE))
    /// The key sorts after every key in the database: a fast append (fails with `keyExists` if not).
    public static let append = PutFlags(rawValue: UInt32(MDB_APPEND))
}
