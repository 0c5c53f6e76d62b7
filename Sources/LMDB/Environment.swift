import CLMDB
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// One LMDB environment: a directory holding `data.mdb` and `lock.mdb`, its memory map, and its
/// named databases.
///
/// Open it with ``open(_:)``. LMDB forbids opening one environment twice in one process (its locks are
/// per process), so a second ``open(_:)`` of the same directory returns the instance already open,
/// counted, or throws ``LMDBError/Code/alreadyOpenDifferently`` if the configuration differs.
/// Each ``open(_:)`` is balanced by one ``close()``.
///
/// Transactions are synchronous closures (``read(_:)``, ``write(_:)``) and cannot span an `await`:
/// LMDB's write lock belongs to a thread.
///
/// `@unchecked Sendable`: the C handle is used under LMDB's own rules (`MDB_NOTLS` read transactions on
/// any thread, one writer at a time by LMDB's mutex), and map growth is fenced by ``ReadWriteLock``.
public final class Environment: @unchecked Sendable {
    /// How much LMDB syncs at commit.
    public enum Durability: Sendable, Hashable {
        /// `fsync` at every commit: a committed transaction survives power loss.
        case durable
        /// `MDB_NOMETASYNC`: data is synced, the meta page is not; a system crash may undo the last
        /// commit but never corrupts.
        case noMetaSync
        /// `MDB_NOSYNC`: no `fsync` at commit. Survives a process crash, not a system crash.
        /// Named for what it is: acknowledgements precede durability.
        case relaxed
    }

    /// Options for ``Environment/open(_:)``.
    public struct Configuration: Sendable, Hashable {
        /// The directory; created when missing.
        public var directory: String
        /// The initial map size in bytes. The map grows by itself when full (see ``maxMapSize``).
        public var mapSize: Int
        /// The largest the map may grow to.
        public var maxMapSize: Int
        /// The most named databases.
        public var maxDatabases: Int
        /// The most concurrent read transactions.
        public var maxReaders: Int
        /// Sync policy at commit.
        public var durability: Durability
        /// `MDB_WRITEMAP`: write through the map instead of `pwrite`. Faster commits; a stray
        /// pointer write in this process could damage the file.
        public var writeMap: Bool

        public init(
            directory: String,
            mapSize: Int = 1 << 30,
            maxMapSize: Int = 1 << 40,
            maxDatabases: Int = 16,
            maxReaders: Int = 510,
            durability: Durability = .durable,
            writeMap: Bool = false
        ) {
            self.directory = directory
            self.mapSize = mapSize
            self.maxMapSize = maxMapSize
            self.maxDatabases = maxDatabases
            self.maxReaders = maxReaders
            self.durability = durability
            self.writeMap = writeMap
        }
    }

    /// The directory's canonical path.
    public let path: String
    /// The configuration it was opened with.
    public let configuration: Configuration
    /// How many stale reader slots (left by dead processes) `mdb_reader_check` cleared at open.
    ///
    /// When no other process has the environment open, LMDB rebuilds the whole reader table before
    /// that check, so dead readers are dropped then and this counts 0; it counts them when another
    /// live process keeps the environment open.
    public let staleReadersCleared: Int

    let handle: OpaquePointer
    let resizeLock = ReadWriteLock()
    private let state: Mutex<State>
    private let databaseLock = Mutex<[String: Database]>([:])

    private struct State {
        var openCount = 1
        var closed = false
        var mapGrowths = 0
    }

    /// A read-only transaction that was reset (``mdb_txn_reset``): it keeps its reader slot and its
    /// allocation, pins no snapshot, and is renewed by the next ``read(_:)``.
    /// `@unchecked Sendable`: with `MDB_NOTLS` a read transaction may move between threads while no
    /// one uses it; the pool hands each to one reader at a time.
    private struct IdleReader: @unchecked Sendable {
        let handle: OpaquePointer
    }

    /// Reset read transactions kept for reuse, at most ``maxIdleReaders``. Renewing one costs a
    /// snapshot update; beginning a new one costs an allocation and the reader table's lock (which
    /// `mdb_txn_abort` takes again to free the slot). Measured in `saga-transfer`, begin and abort were
    /// ~3% of the process's CPU.
    private let idleReaders = Mutex<[IdleReader]>([])
    /// How many reset read transactions an environment keeps for reuse; each holds one of the
    /// ``Configuration/maxReaders`` slots while it waits.
    public static let maxIdleReaders = 16

    private init(handle: OpaquePointer, path: String, configuration: Configuration, staleReadersCleared: Int) {
        self.handle = handle
        self.path = path
        self.configuration = configuration
        self.staleReadersCleared = staleReadersCleared
        self.state = Mutex(State())
    }

    /// Opens (or joins) the environment in `configuration.directory`.
    ///
    /// Stale reader slots left by dead processes are cleared. If opening fails, the handle is closed.
    /// - Throws: ``LMDBError``, naming the path and the failed call.
    public static func open(_ configuration: Configuration) throws(LMDBError) -> Environment {
        let directory = configuration.directory
        if mkdir(directory, 0o755) != 0 && errno != EEXIST {
            throw LMDBError(returnCode: errno, operation: "mkdir", path: directory)
        }
        guard let resolved = realpath(directory, nil) else {
            throw LMDBError(returnCode: errno, operation: "realpath", path: directory)
        }
        let path = String(cString: resolved)
        free(resolved)

        return try openEnvironments.withLock { (open: inout [String: Environment]) throws(LMDBError) -> Environment in
            if let existing = open[path] {
                var wanted = configuration
                wanted.directory = existing.configuration.directory
                guard wanted == existing.configuration else {
                    throw LMDBError(
                        code: .alreadyOpenDifferently, operation: "open", path: path,
                        detail: "the directory is already open in this process with another configuration")
                }
                existing.state.withLock { $0.openCount += 1 }
                return existing
            }
            let environment = try makeEnvironment(path: path, configuration: configuration)
            open[path] = environment
            return environment
        }
    }

    private static func makeEnvironment(path: String, configuration: Configuration) throws(LMDBError) -> Environment {
        var pointer: OpaquePointer?
        try LMDBError.check(mdb_env_create(&pointer), "mdb_env_create", path: path)
        guard let env = pointer else {
            throw LMDBError(returnCode: ENOMEM, operation: "mdb_env_create", path: path)
        }
        do {
            try LMDBError.check(mdb_env_set_mapsize(env, configuration.mapSize), "mdb_env_set_mapsize", path: path)
            try LMDBError.check(mdb_env_set_maxdbs(env, MDB_dbi(configuration.maxDatabases)), "mdb_env_set_maxdbs", path: path)
            try LMDBError.check(mdb_env_set_maxreaders(env, UInt32(configuration.maxReaders)), "mdb_env_set_maxreaders", path: path)
            var flags = UInt32(MDB_NOTLS)
            switch configuration.durability {
            case .durable: break
            case .noMetaSync: flags |= UInt32(MDB_NOMETASYNC)
            case .relaxed: flags |= UInt32(MDB_NOSYNC)
            }
            if configuration.writeMap { flags |= UInt32(MDB_WRITEMAP) }
            try LMDBError.check(mdb_env_open(env, path, flags, 0o644), "mdb_env_open", path: path)
            var dead: Int32 = 0
            try LMDBError.check(mdb_reader_check(env, &dead), "mdb_reader_check", path: path)
            return Environment(handle: env, path: path, configuration: configuration, staleReadersCleared: Int(dead))
        } catch {
            mdb_env_close(env)
            throw error
        }
    }

    /// Releases this opener's share; the last ``close()`` closes the environment.
    ///
    /// Waits for running transactions to end. Calling it more often than ``open(_:)`` has no effect.
    public func close() {
        openEnvironments.withLock { open in
            let last = state.withLock { state -> Bool in
                guard !state.closed else { return false }
                state.openCount -= 1
                return state.openCount == 0
            }
            guard last else { return }
            resizeLock.lockExclusive()
            state.withLock { $0.closed = true }
            for idle in idleReaders.withLock({ idle in defer { idle.removeAll() }; return idle }) {
                mdb_txn_abort(idle.handle)
            }
            mdb_env_close(handle)
            resizeLock.unlock()
            open[path] = nil
        }
    }

    /// Whether ``close()`` has closed the environment.
    public var isClosed: Bool { state.withLock { $0.closed } }

    /// How many times the map has grown since open.
    public var mapGrowthCount: Int { state.withLock { $0.mapGrowths } }

    /// The current map size in bytes (0 once closed).
    public var mapSize: Int {
        resizeLock.lockShared()
        defer { resizeLock.unlock() }
        guard !isClosed else { return 0 }
        var info = MDB_envinfo()
        mdb_env_info(handle, &info)
        return info.me_mapsize
    }

    /// Opens (creating when asked) a named database. Handles are cached and valid until close.
    /// - Throws: ``LMDBError`` (`notFound` when `create` is false and it does not exist).
    public func database(_ name: String, create: Bool = true) throws(LMDBError) -> Database {
        if let cached = databaseLock.withLock({ $0[name] }) { return cached }
        let database: Database
        do {
            database = try write { txn in
                var dbi: MDB_dbi = 0
                try LMDBError.check(
                    mdb_dbi_open(txn.handle, name, create ? UInt32(MDB_CREATE) : 0, &dbi),
                    "mdb_dbi_open(\(name))", path: path)
                return Database(handle: dbi, name: name)
            }
        } catch let error as LMDBError {
            throw error
        } catch {
            throw LMDBError(code: .system, operation: "mdb_dbi_open(\(name))", path: path, detail: "\(error)")
        }
        databaseLock.withLock { $0[name] = database }
        return database
    }

    /// Runs `body` in a read-only transaction and returns its result.
    ///
    /// The transaction sees the last commit made before it began. Anything read from it (raw buffers,
    /// cursor entries) is valid only inside `body`.
    /// - Throws: ``LMDBError``, or what `body` throws.
    // Swift 6.3.1's generic specializer crashes ("Cannot initialize a nonCopyable type with a guaranteed
    // value") when it specializes a function that lends a ~Copyable transaction to a generic closure.
    // Transactions are begun once per closure call, so not specializing costs nothing measurable.
    @_semantics("optimize.sil.specialize.generic.never")
    @available(*, noasync, message: "LMDB transactions cannot span an await; call from synchronous code")
    public func read<R>(_ body: (borrowing ReadTransaction) throws -> R) throws -> R {
        let txn = try beginRead()
        defer { endRead(txn) }
        return try body(ReadTransaction(handle: txn, path: path))
    }

    /// A read transaction — an idle one renewed, or a new one — with the resize lock held shared.
    private func beginRead() throws(LMDBError) -> OpaquePointer {
        while true {
            resizeLock.lockShared()
            // Taken under the lock: close() aborts the idle transactions under it exclusively.
            guard let idle = idleReaders.withLock({ $0.popLast() }) else {
                resizeLock.unlock()
                return try beginTransaction(readOnly: true)
            }
            let rc = mdb_txn_renew(idle.handle)
            if rc == 0 { return idle.handle }
            mdb_txn_abort(idle.handle)
            resizeLock.unlock()
            if rc == MDB_MAP_RESIZED {
                try adoptResizedMap()
                continue
            }
            throw LMDBError(returnCode: rc, operation: "mdb_txn_renew", path: path)
        }
    }

    /// Ends a read transaction from ``beginRead()``: reset and kept for the next reader, or aborted
    /// when the pool is full; then releases the resize lock.
    private func endRead(_ txn: OpaquePointer) {
        mdb_txn_reset(txn)
        let kept = idleReaders.withLock { idle in
            guard idle.count < Self.maxIdleReaders else { return false }
            idle.append(IdleReader(handle: txn))
            return true
        }
        if !kept { mdb_txn_abort(txn) }
        resizeLock.unlock()
    }

    /// Begins a transaction and returns it with the resize lock held shared: the caller ends the
    /// transaction, then unlocks. Adopts a map another process grew (`MDB_MAP_RESIZED`).
    private func beginTransaction(readOnly: Bool) throws(LMDBError) -> OpaquePointer {
        let operation = readOnly ? "mdb_txn_begin(read)" : "mdb_txn_begin(write)"
        while true {
            resizeLock.lockShared()
            if state.withLock({ $0.closed }) {
                resizeLock.unlock()
                throw LMDBError(code: .badTransaction, operation: operation, path: path, detail: "environment is closed")
            }
            var pointer: OpaquePointer?
            let rc = mdb_txn_begin(handle, nil, readOnly ? UInt32(MDB_RDONLY) : 0, &pointer)
            if rc == MDB_MAP_RESIZED {
                resizeLock.unlock()
                try adoptResizedMap()
                continue
            }
            guard rc == 0, let txn = pointer else {
                resizeLock.unlock()
                throw LMDBError(returnCode: rc, operation: operation, path: path)
            }
            return txn
        }
    }

    /// Runs `body` in a write transaction and commits it when `body` returns.
    ///
    /// Any error thrown aborts the transaction: nothing of it becomes visible. When the map is full
    /// (in a put or at commit), the transaction is aborted, the map grows, and `body` runs again from
    /// the start: so `body` must not change anything outside the transaction until it returns.
    /// Only one write transaction runs at a time (LMDB's writer lock, held by the calling thread).
    /// - Throws: ``LMDBError``, or what `body` throws.
    @available(*, noasync, message: "LMDB transactions cannot span an await; call from synchronous code")
    public func write<R>(_ body: (borrowing WriteTransaction) throws -> R) throws -> R {
        while true {
            let generation = mapGrowthCount
            do {
                return try writeTransaction(body)
            } catch {
                guard let full = error as? LMDBError, full.code == .mapFull else { throw error }
                try growMap(after: full, seenGeneration: generation)
            }
        }
    }

    // Swift 6.3.1's generic specializer crashes ("Cannot initialize a nonCopyable type with a guaranteed
    // value") when it specializes a function that lends a ~Copyable transaction to a generic closure.
    // Transactions are begun once per closure call, so not specializing costs nothing measurable.
    @_semantics("optimize.sil.specialize.generic.never")
    private func writeTransaction<R>(_ body: (borrowing WriteTransaction) throws -> R) throws -> R {
        let txn = try beginTransaction(readOnly: false)
        defer { resizeLock.unlock() }
        let result: R
        do {
            result = try body(WriteTransaction(handle: txn, path: path))
        } catch {
            mdb_txn_abort(txn)
            throw error
        }
        // mdb_txn_commit frees the transaction whether it succeeds or not.
        try LMDBError.check(mdb_txn_commit(txn), "mdb_txn_commit", path: path)
        return result
    }

    /// Grows the map, unless another writer grew it since this one's attempt began (then the caller
    /// just retries): concurrent writers that all hit a full map grow it once, not once each.
    private func growMap(after error: LMDBError, seenGeneration: Int) throws(LMDBError) {
        resizeLock.lockExclusive()
        defer { resizeLock.unlock() }
        guard state.withLock({ $0.mapGrowths }) == seenGeneration else { return }
        var info = MDB_envinfo()
        mdb_env_info(handle, &info)
        let current = info.me_mapsize
        guard current < configuration.maxMapSize else {
            throw LMDBError(returnCode: MDB_MAP_FULL, operation: error.operation, path: path,
                            detail: "the map reached maxMapSize (\(configuration.maxMapSize) bytes)")
        }
        let next = min(configuration.maxMapSize, max(current * 2, current + (64 << 20)))
        try LMDBError.check(mdb_env_set_mapsize(handle, next), "mdb_env_set_mapsize(\(next))", path: path)
        state.withLock { $0.mapGrowths += 1 }
    }

    private func adoptResizedMap() throws(LMDBError) {
        resizeLock.lockExclusive()
        defer { resizeLock.unlock() }
        try LMDBError.check(mdb_env_set_mapsize(handle, 0), "mdb_env_set_mapsize(0)", path: path)
    }

    /// Flushes the data file to disk; useful after commits made in ``Durability/relaxed`` mode.
    public func sync() throws(LMDBError) {
        resizeLock.lockShared()
        defer { resizeLock.unlock() }
        guard !isClosed else {
            throw LMDBError(code: .badTransaction, operation: "mdb_env_sync", path: path, detail: "environment is closed")
        }
        try LMDBError.check(mdb_env_sync(handle, 1), "mdb_env_sync", path: path)
    }
}

/// Directories open in this process, by canonical path (LMDB must not open one twice per process).
private let openEnvironments = Mutex<[String: Environment]>([:])
