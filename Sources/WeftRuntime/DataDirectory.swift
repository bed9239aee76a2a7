import Foundation
import WeftCore

/// An exclusive, process-wide lock on a data directory (`flock` on
/// `DIR/LOCK`). The kernel drops it when the process dies, even by
/// SIGKILL, so a crash never leaves a stale lock. The file names the holder
/// so a second process can say who it is waiting on.
public final class DataDirectoryLock: @unchecked Sendable {
    public let path: String
    let fd: Int32

    /// Takes the lock, waiting up to `waitMillis` for another holder to
    /// let go (0: fail at once).
    public init(directory: String, waitMillis: Int = 0) throws(WeftError) {
        path = directory + "/LOCK"
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        } catch {
            throw Self.openError(directory, errno: errno)
        }
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        if fd < 0 { throw Self.openError(directory, errno: errno) }
        let deadline = wallMillis() + UInt64(max(0, waitMillis))
        while flock(fd, LOCK_EX | LOCK_NB) != 0 && wallMillis() < deadline { usleep(20_000) }
        if flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let holder = (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
            close(fd)
            throw WeftError(.locked, "data directory \(directory) is in use by another process (\(holder.isEmpty ? "holder unknown" : holder))\(waitMillis > 0 ? " after waiting \(waitMillis) ms" : ""); stop it, use another --data-dir, or run `weft server start` so that commands share the directory")
        }
        self.fd = fd
        let me = "pid \(getpid()): \(CommandLine.arguments.joined(separator: " "))\n"
        _ = ftruncate(fd, 0)
        _ = me.withCString { pwrite(fd, $0, strlen($0), 0) }
    }

    static func openError(_ directory: String, errno e: Int32) -> WeftError {
        if e == EACCES || e == EROFS || e == EPERM {
            return WeftError(.readOnly, "data directory \(directory) is not writable (\(String(cString: strerror(e)))); pass a writable --data-dir")
        }
        return WeftError(.storage, "cannot open data directory \(directory): \(String(cString: strerror(e)))")
    }

    /// A shared lock, for a process that only reads (`--read-only`, or a
    /// read command on a directory it may not write): it waits out no
    /// one, and refuses to read while a writer holds the directory. A
    /// directory without `LOCK` has never been opened by a writer.
    public init(readingDirectory directory: String) throws(WeftError) {
        path = directory + "/LOCK"
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDir), isDir.boolValue else {
            throw WeftError(.notFound, "\(directory) is not a Weft data directory (it does not exist)")
        }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd >= 0 && flock(fd, LOCK_SH | LOCK_NB) != 0 {
            let holder = (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
            close(fd)
            throw WeftError(.locked, "data directory \(directory) is being written by another process (\(holder.isEmpty ? "holder unknown" : holder)); read it through that process or after it stops")
        }
        self.fd = fd
    }

    /// Whether this process may write `directory` (and so open it for writing).
    public static func writable(_ directory: String) -> Bool {
        access(directory, W_OK) == 0 && (access(directory + "/LOCK", F_OK) != 0 || access(directory + "/LOCK", W_OK) == 0)
    }

    public func release() { if fd >= 0 { close(fd) } }
    deinit { if fd >= 0 { close(fd) } }
}

/// The layout of an embedded data directory:
/// `LOCK`, `weft.conf` (participant count, format), `coordinator/`,
/// `participant-0/` ... `participant-(n-1)/`, each an LMDB environment.
public struct DataDirectoryLayout: Sendable {
    public static let formatVersion = 1
    public let root: String
    public let participants: Int

    public var coordinator: String { root + "/coordinator" }
    public func participant(_ p: Int) -> String { root + "/participant-\(p)" }
    var confPath: String { root + "/weft.conf" }

    /// Reads `weft.conf`, or (when `create`) writes it with `participants`
    /// (default 3). An explicit count that disagrees with the directory is an error.
    public static func resolve(root: String, participants: Int?, create: Bool) throws(WeftError) -> DataDirectoryLayout {
        let conf = root + "/weft.conf"
        if let text = try? String(contentsOfFile: conf, encoding: .utf8) {
            var n: Int?
            var format: Int?
            for line in text.split(separator: "\n") {
                let kv = line.split(separator: "=", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
                guard kv.count == 2 else { continue }
                if kv[0] == "participants" { n = Int(kv[1]) }
                if kv[0] == "format" { format = Int(kv[1]) }
            }
            guard let n, n > 0, format == formatVersion else {
                throw WeftError(.corrupted, "\(conf) is malformed or from another version (expected format=\(formatVersion) and participants=N)")
            }
            if let p = participants, p != n {
                throw WeftError(.invalidArgument, "data directory \(root) was created with \(n) participants, not \(p)")
            }
            return DataDirectoryLayout(root: root, participants: n)
        }
        guard create else { throw WeftError(.notFound, "\(root) is not a Weft data directory (no weft.conf)") }
        let n = participants ?? 3
        guard (1...64).contains(n) else { throw WeftError(.invalidArgument, "participants must be 1...64, not \(n)") }
        let text = "format=\(formatVersion)\nparticipants=\(n)\n"
        do {
            try text.write(toFile: conf, atomically: true, encoding: .utf8)
            chmod(conf, 0o600)
        } catch {
            throw DataDirectoryLock.openError(root, errno: EACCES)
        }
        return DataDirectoryLayout(root: root, participants: n)
    }
}

/// `DIR/SERVER`: where the `weft server` holding a data directory listens.
/// Written once the server serves, removed when it stops; a server killed
/// with `kill -9` leaves it behind, and the lock tells that it is stale
/// (the kernel dropped the server's `flock`).
///
/// ```
/// pid=4242
/// address=127.0.0.1:39115
/// id=5c1d0e2a9b7f4e31
/// participants=3
/// started=1765098000000
/// ```
public struct ServerFile: Sendable, Equatable {
    public var pid: Int32
    public var endpoint: Endpoint
    /// The cluster id its HELLO expects.
    public var id: String
    public var participants: Int
    public var startedMillis: UInt64
    /// Where it serves Redis clients (`--redis-port`), if it does.
    public var redis: Endpoint?
    /// It speaks TLS (`--tls`; certificates in `DIR/certs`).
    public var tls = false
    /// Its status port (`--http-port`: metrics and pages), if any.
    public var http: Endpoint?

    public static func path(_ dir: String) -> String { dir + "/SERVER" }

    public init(pid: Int32, endpoint: Endpoint, id: String, participants: Int, startedMillis: UInt64) {
        self.pid = pid
        self.endpoint = endpoint
        self.id = id
        self.participants = participants
        self.startedMillis = startedMillis
    }

    public static func read(_ dir: String) -> ServerFile? {
        guard let text = readSmallFile(path(dir)) else { return nil }
        var f: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let kv = line.split(separator: "=", maxSplits: 1)
            if kv.count == 2 { f[String(kv[0])] = String(kv[1]) }
        }
        guard let pid = f["pid"].flatMap({ Int32($0) }), let a = f["address"], let colon = a.lastIndex(of: ":"),
              let port = Int(a[a.index(after: colon)...]), let id = f["id"], let n = f["participants"].flatMap({ Int($0) }), n > 0 else { return nil }
        var file = ServerFile(pid: pid, endpoint: Endpoint(host: String(a[..<colon]), port: port), id: id, participants: n,
                              startedMillis: f["started"].flatMap { UInt64($0) } ?? 0)
        if let r = f["redis"], let c = r.lastIndex(of: ":"), let rp = Int(r[r.index(after: c)...]) {
            file.redis = Endpoint(host: String(r[..<c]), port: rp)
        }
        file.tls = f["tls"] == "1"
        if let r = f["http"], let c = r.lastIndex(of: ":"), let hp = Int(r[r.index(after: c)...]) {
            file.http = Endpoint(host: String(r[..<c]), port: hp)
        }
        return file
    }

    public func write(_ dir: String) throws(WeftError) {
        let text = "pid=\(pid)\naddress=\(endpoint)\nid=\(id)\nparticipants=\(participants)\nstarted=\(startedMillis)\n" + (redis.map { "redis=\($0)\n" } ?? "") + (tls ? "tls=1\n" : "") + (http.map { "http=\($0)\n" } ?? "")
        do { try text.write(toFile: Self.path(dir), atomically: true, encoding: .utf8); chmod(Self.path(dir), 0o600) } catch {
            throw WeftError(.storage, "cannot write \(Self.path(dir)): \(error.localizedDescription)")
        }
    }

    public static func remove(_ dir: String) { try? FileManager.default.removeItem(atPath: path(dir)) }

    public enum Probe: Sendable, Equatable {
        /// No server file: open the directory directly.
        case none
        /// A server holds the directory and listens here.
        case running(ServerFile)
        /// The file names a server that no longer holds the directory.
        case stale(ServerFile)
    }

    /// Is a server serving `dir`? The file alone proves nothing: the
    /// directory's lock must be held (a live server holds it for its whole
    /// life; the kernel drops it when the server dies, even by SIGKILL).
    public static func probe(_ dir: String) -> Probe {
        guard let f = read(dir) else { return .none }
        let fd = open(dir + "/LOCK", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return .stale(f) }
        defer { close(fd) }
        // A shared lock is refused while anyone holds the exclusive one (and
        // never keeps an opener out, as an exclusive test lock would).
        if flock(fd, LOCK_SH | LOCK_NB) == 0 {
            flock(fd, LOCK_UN)
            return .stale(f)
        }
        // Held: by the server if the lock names its pid; otherwise the server
        // died (its pid perhaps reused) and another process holds it now.
        return lockHolder(dir) == f.pid ? .running(f) : .stale(f)
    }

    /// The pid `DIR/LOCK` names (`pid N: <command line>`).
    public static func lockHolder(_ dir: String) -> Int32? {
        guard let text = readSmallFile(dir + "/LOCK"), text.hasPrefix("pid ") else { return nil }
        return Int32(text.dropFirst(4).prefix { $0.isNumber })
    }
}

/// A small file's text (at most 64 KiB) with plain read(2): commands that
/// only look at `SERVER` and `LOCK` start faster without Foundation's file
/// machinery. nil if it cannot be read.
func readSmallFile(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var buf = [UInt8](repeating: 0, count: 1 << 16)
    var n = 0
    while n < buf.count {
        let r = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress! + n, $0.count - n) }
        if r < 0 && errno == EINTR { continue }
        if r <= 0 { break }
        n += r
    }
    return String(decoding: buf[0..<n], as: UTF8.self)
}
