internal import CLMDB
import Glibc

/// A failure of LMDB or of the file system under it, in words a user understands.
///
/// Invariants: `message` always says what went wrong and where (a path and/or a database
/// name) and is never a bare number; `errno` keeps the raw return code for logs and tests
/// (negative for `MDB_*` codes, positive for POSIX errno values, 0 when this wrapper itself
/// detected the problem).
public struct LMDBError: Error, Equatable, CustomStringConvertible, Sendable {
    /// A closed set of failure classes callers may branch on.
    public enum Code: Sendable, Equatable {
        case mapFull, diskFull, notFound, corrupted, readOnly, readersFull, txnFull
        case keyTooLarge, versionMismatch, invalidArgument, permissionDenied, other
    }

    public let code: Code
    public let errno: Int32
    public let message: String
    public var description: String { message }

    public init(_ code: Code, errno: Int32 = 0, _ message: String) {
        self.code = code
        self.errno = errno
        self.message = message
    }

    /// Maps a non-zero LMDB or POSIX return code; `context` completes "… while <context>",
    /// e.g. "committing to /data/env".
    init(rc: Int32, _ context: String) {
        let text = String(cString: mdb_strerror(rc))  // e.g. "MDB_CORRUPTED: Located page was wrong type"
        let detail = (text.firstIndex(of: ":").map { String(text[$0...].dropFirst(2)) } ?? text).lowercased()
        let (code, words, advice): (Code, String, String?) = switch rc {
        case MDB_NOTFOUND: (.notFound, "not found", nil)
        case MDB_MAP_FULL: (.mapFull, "LMDB map full (MDB_MAP_FULL)", nil)
        case ENOSPC: (.diskFull, "no space left on device (ENOSPC)", nil)
        case EDQUOT: (.diskFull, "disk quota exceeded (EDQUOT)", nil)
        case MDB_CORRUPTED: (.corrupted, "data file is corrupted (MDB_CORRUPTED: \(detail))", nil)
        case MDB_PAGE_NOTFOUND: (.corrupted, "data file is corrupted (MDB_PAGE_NOTFOUND: \(detail))", nil)
        case MDB_INVALID: (.corrupted, "data file is corrupted or not an LMDB file (MDB_INVALID)", nil)
        case MDB_PANIC: (.corrupted, "LMDB hit a fatal error (MDB_PANIC)", "close and reopen the environment")
        case MDB_VERSION_MISMATCH:
            (.versionMismatch, "data file was written by an incompatible LMDB version (MDB_VERSION_MISMATCH)", nil)
        case MDB_READERS_FULL: (.readersFull, "too many concurrent readers (MDB_READERS_FULL)", "raise Options.readersMax")
        case MDB_TXN_FULL: (.txnFull, "transaction has too many dirty pages (MDB_TXN_FULL)", "split it up")
        case MDB_BAD_VALSIZE: (.keyTooLarge, "key or value has an unsupported size (MDB_BAD_VALSIZE)", nil)
        case MDB_DBS_FULL: (.other, "too many named databases (MDB_DBS_FULL)", "raise Options.databasesMax")
        case MDB_KEYEXIST: (.invalidArgument, "key exists or is out of order for an append (MDB_KEYEXIST)", nil)
        case ENOTDIR: (.invalidArgument, "a path component is not a directory (ENOTDIR)", nil)
        case EROFS: (.readOnly, "file system is read-only (EROFS)", nil)
        case EACCES, EPERM: (.permissionDenied, "permission denied", nil)
        case EINVAL, MDB_INCOMPATIBLE, MDB_BAD_DBI, MDB_BAD_TXN: (.invalidArgument, "invalid use of LMDB (\(text))", nil)
        default: (.other, text, nil)
        }
        self.init(code, errno: rc, "\(words) while \(context)" + (advice.map { "; \($0)" } ?? ""))
    }
}

/// "16 MiB", "64 GiB", "1.5 MiB" or "900 bytes": map sizes for humans.
func formatBytes(_ bytes: Int) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] where bytes >= 1 << shift {
        let whole = bytes >> shift, tenths = ((bytes & ((1 << shift) - 1)) * 10) >> shift
        return tenths == 0 ? "\(whole) \(unit)" : "\(whole).\(tenths) \(unit)"
    }
    return "\(bytes) bytes"
}
