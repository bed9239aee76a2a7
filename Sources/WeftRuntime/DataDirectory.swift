import Foundation
import WeftCore

/// An exclusive, process-wide lock on a data directory (`flock` on
/// `DIR/LOCK`). The kernel drops it when the process dies, even by
/// SIGKILL, so a crash never leaves a stale lock. The file names the holder
/// so a second process can say who it is waiting on.
public final class DataDirectoryLock: @unchecked Sendable {
    public let path: String
    let fd: Int32

    public init(directory: String) throws(WeftError) {
        path = directory + "/LOCK"
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        } catch {
            throw Self.openError(directory, errno: errno)
        }
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        if fd < 0 { throw Self.openError(directory, errno: errno) }
        if flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let holder = (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
            close(fd)
            throw WeftError(.locked, "data directory \(directory) is in use by another process (\(holder.isEmpty ? "holder unknown" : holder)); stop it or use another --data-dir")
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

    public func release() { close(fd) }
    deinit { close(fd) }
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
        } catch {
            throw DataDirectoryLock.openError(root, errno: EACCES)
        }
        return DataDirectoryLayout(root: root, participants: n)
    }
}
