internal import CLMDB

/// Marks what a transaction may do; only the two modes below exist.
public protocol LMDBAccessMode {}
public enum LMDBReadOnly: LMDBAccessMode {}
public enum LMDBReadWrite: LMDBAccessMode {}

public typealias LMDBReadTransaction = LMDBTransaction<LMDBReadOnly>
public typealias LMDBWriteTransaction = LMDBTransaction<LMDBReadWrite>

/// A live LMDB transaction, lent to the body of `LMDBEnvironment.read` / `write`.
///
/// Invariants: it is noncopyable and only ever borrowed, so it cannot outlive that body, and
/// it is not Sendable, so it stays on the thread that began it (LMDB requires that for write
/// transactions). Buffers it hands out (`withValue`, `forEach`) point into the memory map and
/// are valid only during that call and only until the next write in this transaction.
/// Keys are 1...`maxKeyBytes` bytes; that is checked before LMDB sees them.
public struct LMDBTransaction<Mode: LMDBAccessMode>: ~Copyable {
    let raw: OpaquePointer
    let env: LMDBEnvironment
    /// Write transactions only: records MDB_MAP_FULL even if the body swallows the error.
    let state: WriteState?
}

final class WriteState {
    var hitMapFull = false
}

extension LMDBTransaction {
    /// A copy of the value stored under `key`, or nil when there is none.
    public func get(_ db: LMDBDatabase, _ key: some Collection<UInt8>) throws -> [UInt8]? {
        try withValue(db, key) { $0.map { Array($0) } }
    }

    public func get(_ db: LMDBDatabase, _ key: UnsafeRawBufferPointer) throws -> [UInt8]? {
        try withValue(db, key) { $0.map { Array($0) } }
    }

    /// Lends the stored value without copying (nil when not found); do not let it escape `body`.
    public func withValue<R>(_ db: LMDBDatabase, _ key: some Collection<UInt8>,
                             _ body: (UnsafeRawBufferPointer?) throws -> R) throws -> R {
        try withBytes(key) { try withValue(db, $0, body) }
    }

    public func withValue<R>(_ db: LMDBDatabase, _ key: UnsafeRawBufferPointer,
                             _ body: (UnsafeRawBufferPointer?) throws -> R) throws -> R {
        try checkKey(key, db)
        var k = MDB_val(key), v = MDB_val()
        let rc = mdb_get(raw, db.handle, &k, &v)
        if rc == MDB_NOTFOUND { return try body(nil) }
        try check(rc, "reading from", db)
        return try body(UnsafeRawBufferPointer(v))
    }

    /// Visits entries in key order, starting at the first key >= `startKey` (all when nil or
    /// empty), until `body` returns false.
    public func forEach(_ db: LMDBDatabase, from startKey: [UInt8]? = nil,
                        _ body: (_ key: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer) throws -> Bool) throws {
        try withCursor(db) { cursor in
            var k = MDB_val(), v = MDB_val()
            var rc: Int32
            if let startKey, !startKey.isEmpty {
                rc = try startKey.withUnsafeBytes { bytes in
                    try checkKey(bytes, db)
                    k = MDB_val(bytes)
                    return mdb_cursor_get(cursor, &k, &v, MDB_SET_RANGE)  // k now points at the found key
                }
            } else {
                rc = mdb_cursor_get(cursor, &k, &v, MDB_FIRST)
            }
            while rc == 0 {
                guard try body(UnsafeRawBufferPointer(k), UnsafeRawBufferPointer(v)) else { return }
                rc = mdb_cursor_get(cursor, &k, &v, MDB_NEXT)
            }
            if rc != MDB_NOTFOUND { try check(rc, "scanning", db) }
        }
    }

    /// The entry with the greatest key, or nil when the database is empty.
    public func last(_ db: LMDBDatabase) throws -> (key: [UInt8], value: [UInt8])? {
        try withCursor(db) { cursor in
            var k = MDB_val(), v = MDB_val()
            let rc = mdb_cursor_get(cursor, &k, &v, MDB_LAST)
            if rc == MDB_NOTFOUND { return nil }
            try check(rc, "reading the last entry of", db)
            return (Array(UnsafeRawBufferPointer(k)), Array(UnsafeRawBufferPointer(v)))
        }
    }

    public func count(_ db: LMDBDatabase) throws -> Int { try stat(db).entries }

    public func stat(_ db: LMDBDatabase) throws -> LMDBEnvironment.Stat {
        var s = MDB_stat()
        try check(mdb_stat(raw, db.handle, &s), "reading statistics of", db)
        return .init(entries: s.ms_entries, pageSize: Int(s.ms_psize), depth: Int(s.ms_depth),
                     branchPages: s.ms_branch_pages, leafPages: s.ms_leaf_pages, overflowPages: s.ms_overflow_pages)
    }

    // MARK: Internals

    func withCursor<R>(_ db: LMDBDatabase, _ body: (OpaquePointer) throws -> R) throws -> R {
        var cursor: OpaquePointer?
        try check(mdb_cursor_open(raw, db.handle, &cursor), "opening a cursor on", db)
        defer { mdb_cursor_close(cursor) }
        return try body(cursor!)
    }

    func checkKey(_ key: UnsafeRawBufferPointer, _ db: LMDBDatabase) throws {
        if key.isEmpty { throw LMDBError(.invalidArgument, "empty keys are not allowed in \(place(db))") }
        guard key.count <= env.maxKeyBytes else {
            throw LMDBError(.keyTooLarge, errno: MDB_BAD_VALSIZE, "key of \(key.count) bytes is larger than "
                + "LMDB's maximum key size of \(env.maxKeyBytes) bytes in \(place(db))")
        }
    }

    /// Throws for a non-zero `rc`; MDB_MAP_FULL also marks the transaction for growth and retry.
    func check(_ rc: Int32, _ verb: String, _ db: LMDBDatabase) throws {
        guard rc != 0 else { return }
        if rc == MDB_MAP_FULL {
            state?.hitMapFull = true
            throw env.mapFullError("\(verb) \(place(db))")
        }
        throw LMDBError(rc: rc, "\(verb) \(place(db))")
    }

    func place(_ db: LMDBDatabase) -> String {
        db.name.isEmpty ? "the main database in \(env.directory)" : "database '\(db.name)' in \(env.directory)"
    }
}

extension LMDBTransaction where Mode == LMDBReadWrite {
    /// Stores `value` under `key`, replacing any old value. `append` uses MDB_APPEND: faster bulk
    /// loading, but the caller guarantees `key` is greater than every key already present
    /// (otherwise `.invalidArgument`, MDB_KEYEXIST).
    public func put(_ db: LMDBDatabase, _ key: some Collection<UInt8>, _ value: some Collection<UInt8>,
                    append: Bool = false) throws {
        try withBytes(key) { k in try withBytes(value) { v in try put(db, k, v, append: append) } }
    }

    public func put(_ db: LMDBDatabase, _ key: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer,
                    append: Bool = false) throws {
        try checkKey(key, db)
        var k = MDB_val(key), v = MDB_val(value)
        try check(mdb_put(raw, db.handle, &k, &v, append ? UInt32(MDB_APPEND) : 0),
                  append ? "appending to" : "writing to", db)
    }

    /// Removes `key`; false when it was not there.
    @discardableResult
    public func delete(_ db: LMDBDatabase, _ key: some Collection<UInt8>) throws -> Bool {
        try withBytes(key) { k in
            try checkKey(k, db)
            var mk = MDB_val(k)
            let rc = mdb_del(raw, db.handle, &mk, nil)
            if rc == MDB_NOTFOUND { return false }
            try check(rc, "deleting from", db)
            return true
        }
    }

    /// Removes every entry but keeps the database (`mdb_drop` with del = 0).
    public func drop(_ db: LMDBDatabase) throws {
        try check(mdb_drop(raw, db.handle, 0), "emptying", db)
    }
}

/// Lends `bytes` as one contiguous buffer, copying only when the collection is not contiguous.
func withBytes<C: Collection<UInt8>, R>(_ bytes: C, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
    if let result = try bytes.withContiguousStorageIfAvailable({ try body(UnsafeRawBufferPointer($0)) }) {
        return result
    }
    return try Array(bytes).withUnsafeBytes(body)
}

extension MDB_val {
    /// LMDB never writes through mv_data of an input key/value (no MDB_RESERVE here).
    init(_ bytes: UnsafeRawBufferPointer) {
        self.init(mv_size: bytes.count, mv_data: UnsafeMutableRawPointer(mutating: bytes.baseAddress))
    }
}

extension UnsafeRawBufferPointer {
    init(_ val: MDB_val) { self.init(start: val.mv_data, count: val.mv_size) }
}
