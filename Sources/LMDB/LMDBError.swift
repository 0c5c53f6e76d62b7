import CLMDB

#if canImport(Glibc)
import Glibc
#endif

/// The one error type of the LMDB wrapper: every `MDB_*` return code, the operation that produced it,
/// and the environment's path.
///
/// Switch on ``code`` to handle a case; print the error to see everything a person needs.
public struct LMDBError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What went wrong, as a value a caller can switch on. Extensible: new codes may be added.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        fileprivate enum Base: Hashable, Sendable {
            case notFound, keyExists, mapFull, mapResized, readersFull, transactionFull, cursorFull
            case pageFull, databasesFull, corrupted, panic, versionMismatch, invalidFile
            case badTransaction, badValueSize, badDatabase, incompatible, pageNotFound
            case alreadyOpenDifferently, system
        }
        fileprivate let base: Base
        fileprivate init(base: Base) { self.base = base }

        /// `MDB_NOTFOUND`: the key or database does not exist.
        public static let notFound = Code(base: .notFound)
        /// `MDB_KEYEXIST`: the key exists and the put asked for no overwrite.
        public static let keyExists = Code(base: .keyExists)
        /// `MDB_MAP_FULL`: the map is full. ``Environment/write(_:)`` handles it by growing the map.
        public static let mapFull = Code(base: .mapFull)
        /// `MDB_MAP_RESIZED`: another process grew the map. Handled inside the wrapper.
        public static let mapResized = Code(base: .mapResized)
        /// `MDB_READERS_FULL`: every reader slot is taken; raise `maxReaders`.
        public static let readersFull = Code(base: .readersFull)
        /// `MDB_TXN_FULL`: the transaction has too many dirty pages.
        public static let transactionFull = Code(base: .transactionFull)
        /// `MDB_CURSOR_FULL`: internal cursor stack is full.
        public static let cursorFull = Code(base: .cursorFull)
        /// `MDB_PAGE_FULL`: internal page has no more space.
        public static let pageFull = Code(base: .pageFull)
        /// `MDB_DBS_FULL`: more named databases than `maxDatabases`.
        public static let databasesFull = Code(base: .databasesFull)
        /// `MDB_CORRUPTED`: a page has the wrong type; the file is damaged.
        public static let corrupted = Code(base: .corrupted)
        /// `MDB_PANIC`: a fatal error earlier; the environment must be closed.
        public static let panic = Code(base: .panic)
        /// `MDB_VERSION_MISMATCH`: the file was written by another LMDB version.
        public static let versionMismatch = Code(base: .versionMismatch)
        /// `MDB_INVALID`: the file is not an LMDB file.
        public static let invalidFile = Code(base: .invalidFile)
        /// `MDB_BAD_TXN`: the transaction must be aborted (it had an error before).
        public static let badTransaction = Code(base: .badTransaction)
        /// `MDB_BAD_VALSIZE`: a key or value has an unsupported size (keys: 1...511 bytes).
        public static let badValueSize = Code(base: .badValueSize)
        /// `MDB_BAD_DBI`: the database handle was changed or closed.
        public static let badDatabase = Code(base: .badDatabase)
        /// `MDB_INCOMPATIBLE`: the operation does not fit the database's flags.
        public static let incompatible = Code(base: .incompatible)
        /// `MDB_PAGE_NOTFOUND`: a requested page was not found; usually corruption.
        public static let pageNotFound = Code(base: .pageNotFound)
        /// The directory is already open in this process with another configuration.
        public static let alreadyOpenDifferently = Code(base: .alreadyOpenDifferently)
        /// An operating-system error (`errno`), such as `ENOENT` or `EACCES`: see ``LMDBError/returnCode``.
        public static let system = Code(base: .system)

        public var description: String { "\(base)" }

        init(returnCode rc: Int32) {
            switch rc {
            case MDB_NOTFOUND: self = .notFound
            case MDB_KEYEXIST: self = .keyExists
            case MDB_MAP_FULL: self = .mapFull
            case MDB_MAP_RESIZED: self = .mapResized
            case MDB_READERS_FULL: self = .readersFull
            case MDB_TXN_FULL: self = .transactionFull
            case MDB_CURSOR_FULL: self = .cursorFull
            case MDB_PAGE_FULL: self = .pageFull
            case MDB_DBS_FULL: self = .databasesFull
            case MDB_CORRUPTED: self = .corrupted
            case MDB_PANIC: self = .panic
            case MDB_VERSION_MISMATCH: self = .versionMismatch
            case MDB_INVALID: self = .invalidFile
            case MDB_BAD_TXN: self = .badTransaction
            case MDB_BAD_VALSIZE: self = .badValueSize
            case MDB_BAD_DBI: self = .badDatabase
            case MDB_INCOMPATIBLE: self = .incompatible
            case MDB_PAGE_NOTFOUND: self = .pageNotFound
            default: self = .system
            }
        }
    }

    /// The error's kind.
    public let code: Code
    /// The raw return code (`MDB_*` or `errno`).
    public let returnCode: Int32
    /// The operation that failed, such as `mdb_put(log)`.
    public let operation: String
    /// The environment's directory.
    public let path: String
    /// Extra words where the return code alone says too little.
    public let detail: String?

    /// Builds the error for a failed call. Every C call of the wrapper goes through ``check(_:_:path:)``.
    public init(returnCode: Int32, operation: String, path: String, detail: String? = nil) {
        self.code = Code(returnCode: returnCode)
        self.returnCode = returnCode
        self.operation = operation
        self.path = path
        self.detail = detail
    }

    init(code: Code, operation: String, path: String, detail: String) {
        self.code = code
        self.returnCode = 0
        self.operation = operation
        self.path = path
        self.detail = detail
    }

    /// LMDB's own text for the return code.
    public var message: String {
        guard returnCode != 0, let text = mdb_strerror(returnCode) else { return detail ?? "" }
        return String(cString: text)
    }

    public var description: String {
        var text = "LMDB \(code) in \(operation) at '\(path)': \(message) (rc \(returnCode))"
        if let detail, returnCode != 0 { text += " — \(detail)" }
        return text
    }

    /// Throws an ``LMDBError`` for a non-zero return code.
    @inline(__always)
    static func check(_ rc: Int32, _ operation: @autoclosure () -> String, path: String) throws(LMDBError) {
        if rc != 0 { throw LMDBError(returnCode: rc, operation: operation(), path: path) }
    }
}
