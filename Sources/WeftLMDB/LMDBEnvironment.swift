internal import CLMDB
import Glibc
import Synchronization

/// A named LMDB database inside one `LMDBEnvironment`.
///
/// Invariant: only meaningful for the environment that returned it and only until that
/// environment is closed (LMDB rejects a foreign handle with EINVAL rather than misbehaving).
public struct LMDBDatabase: Sendable, Hashable {
    public let handle: UInt32
    /// "" is LMDB's unnamed main database.
    public let name: String
}

/// One LMDB environment: a directory holding `data.mdb` and `lock.mdb`, shared by all threads.
///
/// Invariants:
/// - Open a directory at most once per process at a time: LMDB's POSIX locks belong to the
///   process, so closing a second handle would silently drop the first one's locks.
/// - Every transaction holds `lock` shared for its whole life. Map growth, adopting a map grown
///   by another process, opening a database handle and `close` hold it exclusively, so
///   `mdb_env_set_mapsize` and `mdb_dbi_open` never overlap another transaction of this process.
/// - glibc's default rwlock prefers readers: shared holds nest, and growth may wait for a gap
///   between readers. Anything needing the lock exclusively (`write`, `database` for a name not
///   opened yet) throws `.invalidArgument` when called inside a transaction body of the same
///   environment on the same thread instead of deadlocking.
public final class LMDBEnvironment: @unchecked Sendable {
    public struct Options: Sendable {
        /// Initial map size; doubled on demand up to `mapSizeBytesMax`.
        public var mapSizeBytes: Int = 16 << 20
        public var mapSizeBytesMax: Int = 64 << 30
        public var databasesMax: Int = 16
        public var readersMax: Int = 126
        public var readOnly = false
        /// false => MDB_NOSYNC: commits are not fsynced (tests and benchmarks only).
        public var durable = true
        public init() {}
    }

    public struct Stat: Sendable, Equatable {
        public var entries: Int
        public var pageSize: Int
        public var depth: Int
        public var branchPages, leafPages, overflowPages: Int
    }

    public let directory: String
    public let readOnly: Bool
    /// Growth never goes beyond this (unless the data file was already bigger when opened).
    public let mapSizeBytesMax: Int
    /// Largest key LMDB accepts (511 bytes with the default build).
    public let maxKeyBytes: Int
    /// Reader slots of dead processes released by `mdb_reader_check` when opening.
    public let staleReadersCleared: Int
    /// Current size of the memory map; only changes under the exclusive lock.
    public var mapSizeBytes: Int { mapSize.load(ordering: .relaxed) }

    private let mapSize: Atomic<Int>
    private let lock: UnsafeMutablePointer<pthread_rwlock_t>
    /// Per-thread count of this environment's transactions open on the current thread.
    private let depthKey: pthread_key_t
    private var env: OpaquePointer?  // guarded by `lock`; nil once closed
    private var databases: [String: LMDBDatabase] = [:]  // guarded by `lock`

    /// Opens (creating the directory unless read-only) with MDB_NOTLS, so read transactions are
    /// not tied to threads, then clears reader slots left behind by killed processes.
    public init(directory: String, options: Options = .init()) throws {
        precondition(options.mapSizeBytes > 0 && options.databasesMax >= 0 && options.readersMax > 0,
                     "LMDBEnvironment.Options out of range: \(options)")
        try prepareDirectory(directory, create: !options.readOnly)
        try checkDataFile(directory)
        var created: OpaquePointer?
        var rc = mdb_env_create(&created)
        guard rc == 0, let env = created else { throw LMDBError(rc: rc, "creating an environment for \(directory)") }
        var flags = UInt32(MDB_NOTLS)
        if options.readOnly {
            flags |= UInt32(MDB_RDONLY)
            // A lock file this process may not write (a read-only
            // directory): read without LMDB's reader table. The caller
            // holds the data directory's shared lock, so no writer runs.
            let lockFile = directory + "/lock.mdb"
            if access(directory, W_OK) != 0 && (access(lockFile, F_OK) != 0 || access(lockFile, W_OK) != 0) { flags |= UInt32(MDB_NOLOCK) }
        }
        if !options.durable { flags |= UInt32(MDB_NOSYNC) }
        rc = mdb_env_set_mapsize(env, options.mapSizeBytes)
        if rc == 0 { rc = mdb_env_set_maxdbs(env, MDB_dbi(options.databasesMax)) }
        if rc == 0 { rc = mdb_env_set_maxreaders(env, UInt32(options.readersMax)) }
        // Owner-only: the data is the user's, not every local account's.
        if rc == 0 { rc = mdb_env_open(env, directory, flags, 0o600) }
        var dead: Int32 = 0
        if rc == 0 && flags & UInt32(MDB_NOLOCK) == 0 { rc = mdb_reader_check(env, &dead) }
        guard rc == 0 else {
            mdb_env_close(env)  // required after a failed mdb_env_open
            throw openError(rc, directory, readOnly: options.readOnly)
        }
        if !options.readOnly { markHeldData(directory) }
        var info = MDB_envinfo()
        mdb_env_info(env, &info)  // the file may dictate a larger map than we asked for
        self.directory = directory
        self.readOnly = options.readOnly
        self.mapSizeBytesMax = max(options.mapSizeBytesMax, options.mapSizeBytes)
        self.maxKeyBytes = Int(mdb_env_get_maxkeysize(env))
        self.staleReadersCleared = Int(dead)
        self.mapSize = Atomic(info.me_mapsize)
        self.env = env
        lock = .allocate(capacity: 1)
        lock.initialize(to: pthread_rwlock_t())
        pthread_rwlock_init(lock, nil)
        var key = pthread_key_t()
        let keyCreated = pthread_key_create(&key, nil)
        precondition(keyCreated == 0, "out of pthread keys (one per open LMDBEnvironment)")
        depthKey = key
    }

    deinit {
        close()
        pthread_rwlock_destroy(lock)
        lock.deallocate()
        pthread_key_delete(depthKey)
    }

    /// Opens a database by name (`MDB_CREATE` when `create` and not read-only) in its own
    /// committed transaction and caches the handle. Typically called once at startup: the first
    /// call for a name waits until no transaction of this environment is running.
    public func database(_ name: String, create: Bool = true) throws -> LMDBDatabase {
        if let db = try shared({ _ in databases[name] }) { return db }
        return try exclusive("opening database '\(name)'") { env in
            if let db = databases[name] { return db }
            let writable = create && !readOnly
            while true {
                var txn: OpaquePointer?
                var dbi = MDB_dbi()
                var rc = mdb_txn_begin(env, nil, writable ? 0 : UInt32(MDB_RDONLY), &txn)
                if rc == 0 {
                    rc = mdb_dbi_open(txn, name.isEmpty ? nil : name, writable ? UInt32(MDB_CREATE) : 0, &dbi)
                    // Commit even a read txn: aborting the opening txn would close the new handle.
                    if rc == 0 { rc = mdb_txn_commit(txn) } else { mdb_txn_abort(txn) }
                }
                switch rc {
                case 0:
                    let db = LMDBDatabase(handle: dbi, name: name)
                    databases[name] = db
                    return db
                case MDB_MAP_RESIZED: try setMapSize(env, 0)
                case MDB_MAP_FULL: try grow(env, from: mapSizeBytes)
                case MDB_NOTFOUND: throw LMDBError(.notFound, errno: rc, "database '\(name)' does not exist in \(directory)")
                default: throw LMDBError(rc: rc, "opening database '\(name)' in \(directory)")
                }
            }
        }
    }

    /// Runs `body` in a read-only snapshot, always aborted afterwards. Nested reads are allowed.
    public func read<T>(_ body: (borrowing LMDBReadTransaction) throws -> T) throws -> T {
        try withTransaction(write: false) { raw in
            defer { mdb_txn_abort(raw) }
            return try body(LMDBReadTransaction(raw: raw, env: self, state: nil))
        }
    }

    /// Runs `body` in a write transaction and commits when it returns (fsynced when `durable`);
    /// aborts when it throws. On MDB_MAP_FULL (from any write or from the commit, even if `body`
    /// swallowed the error) the transaction is aborted, the map doubled up to `mapSizeBytesMax`,
    /// and `body` runs AGAIN from scratch: it must be re-runnable, with no side effects outside
    /// the transaction that a second run would duplicate. At the cap this throws `.mapFull`,
    /// leaving the data exactly as before. Must not be called inside another transaction body of
    /// this environment on the same thread.
    public func write<T>(_ body: (borrowing LMDBWriteTransaction) throws -> T) throws -> T {
        guard !readOnly else { throw LMDBError(.readOnly, "environment was opened read-only, cannot write: \(directory)") }
        guard depth == 0 else { throw nestingError("starting a write transaction") }
        while true {
            let state = WriteState()
            var sizeSeen = 0
            let outcome: T? = try withTransaction(write: true) { raw in
                sizeSeen = mapSizeBytes  // stable: growth needs the lock we hold shared
                let value: T
                do {
                    value = try body(LMDBWriteTransaction(raw: raw, env: self, state: state))
                } catch {
                    mdb_txn_abort(raw)
                    if state.hitMapFull { return nil }
                    throw error
                }
                if state.hitMapFull {
                    mdb_txn_abort(raw)
                    return nil
                }
                let rc = mdb_txn_commit(raw)  // frees the txn whatever the outcome
                if rc == MDB_MAP_FULL { return nil }
                guard rc == 0 else { throw commitError(rc) }
                return value
            }
            if let outcome { return outcome }
            try exclusive("growing the map") { env in try grow(env, from: sizeSeen) }
        }
    }

    /// Flushes buffers to disk (`mdb_env_sync(force: 1)`); a no-op when read-only.
    public func sync() throws {
        guard !readOnly else { return }
        try shared { env in
            let rc = mdb_env_sync(env, 1)
            guard rc == 0 else { throw LMDBError(rc: rc, "syncing \(directory) to disk") }
        }
    }

    /// Idempotent; waits for running transactions. Later calls throw `.invalidArgument`.
    public func close() {
        precondition(depth == 0, "LMDBEnvironment.close() called inside one of its transactions: \(directory)")
        pthread_rwlock_wrlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        if let env { mdb_env_close(env) }
        env = nil
        databases = [:]
    }

    public func stat(_ db: LMDBDatabase) throws -> Stat { try read { try $0.stat(db) } }

    /// Bytes of the map in use (up to the last page written) and the map's
    /// size; nil once closed.
    public func usage() -> (usedBytes: Int, mapSizeBytes: Int)? {
        try? shared { env in
            var info = MDB_envinfo()
            var st = MDB_stat()
            mdb_env_info(env, &info)
            mdb_env_stat(env, &st)
            return ((info.me_last_pgno + 1) * Int(st.ms_psize), info.me_mapsize)
        }
    }

    func mapFullError(_ context: String) -> LMDBError {
        LMDBError(.mapFull, errno: MDB_MAP_FULL, "LMDB map full (map size \(formatBytes(mapSizeBytes)), "
            + "limit \(formatBytes(mapSizeBytesMax))) while \(context)")
    }

    /// A failed commit. A file system that ran out of space can fail the
    /// write-back or the flush with EIO rather than ENOSPC; when the
    /// directory's file system has (almost) no space left, that is what
    /// the user is told.
    func commitError(_ rc: Int32) -> LMDBError {
        if rc == EIO {
            var fs = statvfs()
            if statvfs(directory, &fs) == 0, UInt64(fs.f_bavail) * UInt64(fs.f_frsize) < Self.nearlyFullBytes {
                return LMDBError(.diskFull, errno: ENOSPC, "no space left on device (the commit failed with EIO and \(directory)'s file system has \(UInt64(fs.f_bavail) * UInt64(fs.f_frsize)) bytes free) while committing to \(directory)")
            }
        }
        return LMDBError(rc: rc, "committing to \(directory)")
    }

    /// Free bytes under which an EIO on commit is reported as a full disk.
    static let nearlyFullBytes: UInt64 = 4 << 20

    // MARK: Locking

    private var depth: Int {
        get { Int(bitPattern: pthread_getspecific(depthKey)) }
        set { pthread_setspecific(depthKey, UnsafeRawPointer(bitPattern: newValue)) }
    }

    private func nestingError(_ what: String) -> LMDBError {
        LMDBError(.invalidArgument, "\(what) inside a transaction of the same environment on the same "
            + "thread would deadlock: \(directory)")
    }

    private func shared<R>(_ body: (OpaquePointer) throws -> R) throws -> R {
        pthread_rwlock_rdlock(lock)
        depth += 1
        defer { depth -= 1; pthread_rwlock_unlock(lock) }
        guard let env else { throw LMDBError(.invalidArgument, "environment is closed: \(directory)") }
        return try body(env)
    }

    private func exclusive<R>(_ what: String, _ body: (OpaquePointer) throws -> R) throws -> R {
        guard depth == 0 else { throw nestingError(what) }
        pthread_rwlock_wrlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        guard let env else { throw LMDBError(.invalidArgument, "environment is closed: \(directory)") }
        return try body(env)
    }

    /// Begins a transaction under the shared lock; `body` must commit or abort it. Retries after
    /// adopting the new map size when another process grew the map (MDB_MAP_RESIZED).
    private func withTransaction<R>(write: Bool, _ body: (OpaquePointer) throws -> R) throws -> R {
        while true {
            let result: R? = try shared { env in
                var txn: OpaquePointer?
                let rc = mdb_txn_begin(env, nil, write ? 0 : UInt32(MDB_RDONLY), &txn)
                if rc == MDB_MAP_RESIZED { return nil }
                guard rc == 0, let txn else { throw LMDBError(rc: rc, "beginning a transaction in \(directory)") }
                return try body(txn)
            }
            if let result { return result }
            try exclusive("adopting a map grown by another process") { env in try setMapSize(env, 0) }
        }
    }

    /// Exclusive lock held. Doubles the map up to the cap; a no-op if another thread already
    /// grew it past `seen`.
    private func grow(_ env: OpaquePointer, from seen: Int) throws {
        let current = mapSizeBytes
        guard current <= seen else { return }
        guard current < mapSizeBytesMax else { throw mapFullError("writing to \(directory)") }
        try setMapSize(env, current > mapSizeBytesMax / 2 ? mapSizeBytesMax : current * 2)
    }

    /// Exclusive lock held (LMDB requires no live transaction in this process). 0 adopts the
    /// size recorded in the file.
    private func setMapSize(_ env: OpaquePointer, _ bytes: Int) throws {
        let rc = mdb_env_set_mapsize(env, bytes)
        guard rc == 0 else { throw LMDBError(rc: rc, "resizing the map of \(directory) to \(formatBytes(bytes))") }
        var info = MDB_envinfo()
        mdb_env_info(env, &info)
        mapSize.store(info.me_mapsize, ordering: .relaxed)
    }
}

/// Ensures `path` is an existing directory, creating it and missing parents when `create`.
private func prepareDirectory(_ path: String, create: Bool) throws {
    if create, case let rc = makeDirectories(path), rc != 0 {
        throw LMDBError(rc: rc, "creating directory \(path)")
    }
    var info = stat()
    guard stat(path, &info) == 0 else {
        let rc = errno
        if rc == ENOENT { throw LMDBError(.notFound, errno: rc, "directory does not exist: \(path)") }
        throw LMDBError(rc: rc, "inspecting directory \(path)")
    }
    guard info.st_mode & S_IFMT == S_IFDIR else {
        throw LMDBError(.invalidArgument, errno: ENOTDIR, "not a directory (a file is in the way): \(path)")
    }
}

/// The marker an environment leaves beside its data file once that file
/// exists: from then on an empty or missing `data.mdb` is a lost file, not
/// a new environment.
let heldDataMarker = "weft-held-data"

private func markHeldData(_ directory: String) {
    let path = directory + "/" + heldDataMarker
    if access(path, F_OK) == 0 { return }
    let fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0o600)
    if fd >= 0 {
        _ = "this directory's data.mdb has held data; an empty or missing data.mdb is refused\n".withCString { write(fd, $0, strlen($0)) }
        fsync(fd)
        close(fd)
    }
}

/// Refuses a data file that cannot be what LMDB last committed, before
/// LMDB maps it: missing or empty where data was held (the marker), too
/// short to hold its meta pages, neither meta page valid, or shorter than
/// the last page the newest meta page names (reading past the end of a
/// mapped file is SIGBUS, not an error).
func checkDataFile(_ directory: String) throws {
    let path = directory + "/data.mdb"
    let held = access(directory + "/" + heldDataMarker, F_OK) == 0
    var st = stat()
    guard stat(path, &st) == 0 else {
        if held { throw LMDBError(.corrupted, errno: ENOENT, "data file \(path) is missing, but this environment held data (\(heldDataMarker)); refusing to start empty: restore the file, or remove the directory to start from nothing") }
        return
    }
    let size = Int(st.st_size)
    if size == 0 {
        if held { throw LMDBError(.corrupted, "data file \(path) is empty (0 bytes), but this environment held data (\(heldDataMarker)); refusing to start empty: restore the file, or remove the directory to start from nothing") }
        return
    }
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return }  // LMDB's own open reports why
    defer { close(fd) }
    // MDB_meta after the 16-byte page header: magic u32 @16, version u32
    // @20, address @24, mapsize @32, dbs[2] (48 bytes each) @40 (the free
    // DB's md_pad holds the page size), last_pg @136, txnid @144.
    func meta(at offset: Int) -> (pageSize: Int, lastPage: Int, txn: UInt64)? {
        var page = [UInt8](repeating: 0, count: 152)
        let n = page.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 152, off_t(offset)) }
        guard n == 152 else { return nil }
        func u32(_ o: Int) -> UInt32 { page.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: o, as: UInt32.self) } }
        func u64(_ o: Int) -> UInt64 { page.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: o, as: UInt64.self) } }
        guard u32(16) == 0xBEEF_C0DE else { return nil }
        let pageSize = Int(u32(40))
        guard pageSize >= 512, pageSize <= 1 << 16, pageSize & (pageSize - 1) == 0 else { return nil }
        return (pageSize, Int(clamping: u64(136)), u64(144))
    }
    // LMDB survives one damaged meta page (it uses the other): so do we.
    let first = meta(at: 0)
    let pageSize = first?.pageSize ?? Int(getpagesize())
    guard size >= 2 * pageSize else {
        throw LMDBError(.corrupted, "data file \(path) is truncated (corrupted): \(size) bytes, less than its two \(pageSize)-byte meta pages")
    }
    let second = meta(at: pageSize)
    guard let newest = [first, second].compactMap({ $0 }).max(by: { $0.txn < $1.txn }) else {
        throw LMDBError(.corrupted, "data file \(path) (\(size) bytes) holds no valid LMDB meta page: it is corrupted or not an LMDB file")
    }
    let needed = (newest.lastPage + 1) * newest.pageSize
    if size < needed {
        throw LMDBError(.corrupted, "data file \(path) is truncated (corrupted): \(size) bytes, but its last commit (transaction \(newest.txn)) uses pages up to byte \(needed)")
    }
}

/// `mkdir -p`; returns 0 or the errno of the first failure. An existing path counts as success.
private func makeDirectories(_ path: String) -> Int32 {
    if mkdir(path, 0o700) == 0 { return 0 }
    let rc = errno
    guard rc == ENOENT, let slash = path.lastIndex(of: "/"), slash > path.startIndex else { return rc == EEXIST ? 0 : rc }
    let parent = makeDirectories(String(path[..<slash]))
    if parent != 0 { return parent }
    return mkdir(path, 0o700) == 0 || errno == EEXIST ? 0 : errno
}

private func openError(_ rc: Int32, _ path: String, readOnly: Bool) -> LMDBError {
    if rc == EACCES || rc == EROFS, !readOnly, access(path, W_OK) != 0 {
        return LMDBError(.readOnly, errno: rc, "directory is read-only: \(path)")
    }
    if rc == ENOENT, readOnly {
        return LMDBError(.notFound, errno: rc, "no LMDB environment to open read-only in \(path)")
    }
    return LMDBError(rc: rc, "opening the LMDB environment in \(path)")
}
