import ArgumentParser
import Foundation
import WeftCore
import WeftRuntime

@main
struct Weft: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "weft",
        abstract: "Weft: a transactional key-value store with two-phase commit over LMDB.",
        discussion: """
        Exit codes: 0 ok, 1 error, 2 usage, 3 transaction aborted (a conflict, or a participant that did not vote in time), 4 key not found, 5 outcome unknown.
        """,
        subcommands: [Demo.self, ServerCommand.self, KV.self, Txn.self, TableCommand.self, JobCommand.self, Admin.self, ClusterCommand.self, NodeCommand.self, CertCommand.self, Check.self, Debug.self]
    )

    /// `kv get`, `kv put` and `table list` through a running server skip
    /// the argument parser (FastPath); everything else parses as usual.
    static func main() async {
        if let code = FastPath.run(CommandLine.arguments) {
            fflush(nil)
            Glibc.exit(code)
        }
        await main(nil)
    }
}

/// Options every command that opens a data directory shares.
struct GlobalOptions: ParsableArguments {
    @Option(name: .customLong("data-dir"), help: "Data directory (default: $WEFT_DATA_DIR, else ./weft-data).")
    var dataDir: String?

    @Flag(help: "Machine-readable JSON output, one object per line.")
    var json = false

    @Option(help: "Participants when creating a new data directory (default 3).")
    var participants: Int?

    @Option(help: "Talk to a running cluster (its directory or cluster file) instead of opening a data directory (default: $WEFT_CLUSTER).")
    var cluster: String?

    @Flag(name: .customLong("read-only"), help: "Open the data directory only to read (automatic for read commands on a directory this process may not write).")
    var readOnly = false

    @Option(name: .customLong("secret-file"), help: "The client secret this client proves to the cluster or server (default: client.secret in the cluster's or data directory).")
    var secretFile: String?

    @Option(name: .customLong("certs-dir"), help: "TLS certificates of this client (ca.crt, client.crt, client.key) for a cluster or server with --tls (default: its certs directory).")
    var certsDir: String?

    var resolvedDataDir: String {
        dataDir ?? ProcessInfo.processInfo.environment["WEFT_DATA_DIR"] ?? "./weft-data"
    }

    var resolvedCluster: String? {
        cluster ?? ProcessInfo.processInfo.environment["WEFT_CLUSTER"].flatMap { $0.isEmpty ? nil : $0 }
    }

    func validate() throws {
        if let p = participants, !(1...64).contains(p) {
            throw ValidationError("--participants must be between 1 and 64")
        }
    }
}

/// How keys and values are typed on the command line and printed back.
struct EncodingOptions: ParsableArguments {
    @Flag(help: "Keys and values are given and printed as hex (binary data).")
    var hex = false

    @Flag(help: "Values are given and printed as base64 (binary data).")
    var base64 = false

    func validate() throws {
        if hex && base64 { throw ValidationError("--hex and --base64 cannot be combined") }
    }

    func key(_ s: String) throws -> Bytes {
        hex ? try decodeHex(s, what: "key") : Array(s.utf8)
    }

    func value(_ s: String) throws -> Bytes {
        if hex { return try decodeHex(s, what: "value") }
        if base64 {
            guard let d = Data(base64Encoded: s) else { throw WeftError(.invalidArgument, "value is not valid base64") }
            return Array(d)
        }
        return Array(s.utf8)
    }

    func show(key: Bytes) -> String { hex ? encodeHex(key) : text(key) }

    func show(value: Bytes) -> String {
        if hex { return encodeHex(value) }
        if base64 { return Data(value).base64EncodedString() }
        return text(value)
    }
}

/// Printable UTF-8 as itself; anything else as 0x-prefixed hex, so binary
/// data never garbles a terminal.
func text(_ b: Bytes) -> String {
    if let s = String(validating: b, as: UTF8.self), !s.unicodeScalars.contains(where: { $0.value < 0x20 && $0 != "\t" || $0.value == 0x7f }) {
        return s
    }
    return "0x" + encodeHex(b)
}

func encodeHex(_ b: Bytes) -> String {
    let digits = Array("0123456789abcdef")
    var s = ""
    s.reserveCapacity(b.count * 2)
    for x in b {
        s.append(digits[Int(x >> 4)])
        s.append(digits[Int(x & 15)])
    }
    return s
}

func decodeHex(_ s: String, what: String) throws -> Bytes {
    let t = s.hasPrefix("0x") ? String(s.dropFirst(2)) : s
    let chars = Array(t.utf8)
    guard chars.count % 2 == 0 else { throw WeftError(.invalidArgument, "\(what) '\(s)' is not valid hex (odd number of digits)") }
    var out = Bytes()
    out.reserveCapacity(chars.count / 2)
    func nib(_ c: UInt8) -> UInt8? {
        switch c {
        case 48...57: return c - 48
        case 97...102: return c - 87
        case 65...70: return c - 55
        default: return nil
        }
    }
    var i = 0
    while i < chars.count {
        guard let h = nib(chars[i]), let l = nib(chars[i + 1]) else { throw WeftError(.invalidArgument, "\(what) '\(s)' is not valid hex") }
        out.append(h << 4 | l)
        i += 2
    }
    return out
}

func jsonLine(_ object: [String: Any]) -> String {
    let data = try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes])
    return String(decoding: data, as: UTF8.self)
}

func printErr(_ s: String) {
    FileHandle.standardError.write(Data((s + "\n").utf8))
}

/// Exit code for an error, as documented in `weft --help`.
func exitCode(for e: WeftError) -> Int32 {
    switch e.code {
    case .conflict, .aborted: return 3
    case .notFound: return 4
    case .outcomeUnknown, .timeout: return 5
    default: return 1
    }
}

/// Runs `body` with a client: of a running cluster when `--cluster` (or
/// `$WEFT_CLUSTER`) names one, else of an embedded cluster on the data
/// directory. Weft errors become a clear message and a documented exit code.
///
/// `reads`: the command writes nothing, so it may open the directory
/// read-only (`--read-only`, or automatically when this process may not
/// write it). A writing command with `--read-only` is refused.
func withCluster<T>(_ g: GlobalOptions, reads: Bool = false, _ body: (WeftClient) async throws -> T) async throws -> T {
    try await withSession(g, reads: reads) { c, _ in try await body(c) }
}

/// Like `withCluster`, also handing over the embedded cluster (nil in
/// cluster mode and through a server) for what only embedded mode offers.
///
/// Without `--cluster`: a data directory held by a running `weft server`
/// is reached through that server (the store is never loaded here, and
/// never `locked`); a server file left by a server that died is reported
/// in one line and removed, and the directory is opened here, one-shot,
/// as with no server at all. A one-shot command waits up to
/// `Limits.dataDirLockWaitMillis` for another one-shot command's lock,
/// and switches to a server that starts meanwhile.
func withSession<T>(_ g: GlobalOptions, reads: Bool = false, _ body: (WeftClient, EmbeddedCluster?) async throws -> T) async throws -> T {
    let client: WeftClient
    let close: () -> Void
    var embedded: EmbeddedCluster?
    do {
        if let c = g.resolvedCluster {
            let remote = try ClusterClient(config: try ClusterConfig.load(c), secretFile: g.secretFile, certsDir: g.certsDir)
            client = remote.client
            close = { remote.close() }
        } else {
            switch try openDataDirectory(g, reads: reads) {
            case .server(let remote):
                client = remote.client
                close = { remote.close() }
            case .embedded(let cluster):
                embedded = cluster
                let c = cluster.client()
                client = c
                close = {
                    c.close()
                    cluster.close()
                }
            }
        }
    } catch {
        fail(error, json: g.json)
    }
    do {
        let r = try await body(client, embedded)
        close()
        return r
    } catch {
        close()
        if let e = error as? WeftError { fail(e, json: g.json) }
        throw error
    }
}

enum DataDirectorySession {
    case server(ServerClient)
    case embedded(EmbeddedCluster)
}

func openDataDirectory(_ g: GlobalOptions, reads: Bool = false) throws(WeftError) -> DataDirectorySession {
    let dir = g.resolvedDataDir
    if g.readOnly && !reads {
        throw WeftError(.readOnly, "this command writes, and --read-only was given")
    }
    // A read on a directory this process may not write (a read-only mount,
    // another user's files) opens it read-only rather than failing.
    let readOnly = g.readOnly || (reads && FileManager.default.fileExists(atPath: dir + "/weft.conf") && !DataDirectoryLock.writable(dir))
    // WEFT_LOCK_WAIT_MS overrides the wait (tests, scripts that prefer to fail fast).
    let wait = ProcessInfo.processInfo.environment["WEFT_LOCK_WAIT_MS"].flatMap { Int($0) } ?? Limits.dataDirLockWaitMillis
    var deadline = wallMillis() + UInt64(max(0, wait))
    var noticed = false
    var waitingForServer = false
    while true {
        switch ServerFile.probe(dir) {
        case .running(let f):
            if let p = g.participants, p != f.participants {
                throw WeftError(.invalidArgument, "data directory \(dir) was created with \(f.participants) participants, not \(p)")
            }
            return .server(try ServerClient(f, dataDir: dir, secretFile: g.secretFile, certsDir: g.certsDir))
        case .stale(let f):
            if !noticed {
                printErr("weft: the server recorded in \(ServerFile.path(dir)) (pid \(f.pid), \(f.endpoint)) is gone; opening the data directory directly")
                noticed = true
            }
            if ServerFile.read(dir) == f { ServerFile.remove(dir) }
        case .none:
            break
        }
        do {
            return .embedded(try EmbeddedCluster(dataDir: dir, participants: g.participants, readOnly: readOnly))
        } catch where error.code == .locked && wallMillis() < deadline {
            // A server still opening the directory (recovering) holds the
            // lock before it writes DIR/SERVER: wait for it to serve.
            if !waitingForServer, let pid = ServerFile.lockHolder(dir),
               let holder = try? String(contentsOfFile: dir + "/LOCK", encoding: .utf8), holder.contains(" server start"), kill(pid, 0) == 0 {
                waitingForServer = true
                deadline = wallMillis() + UInt64(Limits.serverStartMillisMax)
            }
            usleep(50_000)
        }
    }
}

func fail(_ e: WeftError, json: Bool) -> Never {
    if json {
        print(jsonLine(["error": e.code.rawValue, "message": e.message]))
    } else {
        printErr("error: \(e.message)")
    }
    exit(exitCode(for: e))
}
