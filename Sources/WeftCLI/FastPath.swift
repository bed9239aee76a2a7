import Foundation
import WeftCore
import WeftDataflow
import WeftProtocol
import WeftRuntime

/// The commands scripts run in loops (`kv get KEY`, `kv put KEY VALUE`,
/// `table list`, with only `--data-dir` and `--json`) against a running
/// `weft server`, without the argument parser's start-up (half of a
/// command's time is its reflection over the option types) or an event
/// loop: one blocking socket, the same wire protocol, the same output
/// and exit codes as the full commands. Anything else, or no server,
/// returns nil and goes the usual way.
enum FastPath {
    static func run(_ argv: [String]) -> Int32? {
        var args = Array(argv.dropFirst())
        var dataDir: String?
        var json = false
        var positional: [String] = []
        while !args.isEmpty {
            let a = args.removeFirst()
            switch a {
            case "--data-dir":
                guard !args.isEmpty else { return nil }
                dataDir = args.removeFirst()
            case "--json": json = true
            default:
                if a.hasPrefix("-") { return nil }
                positional.append(a)
            }
        }
        // getenv, not ProcessInfo's dictionary of the whole environment.
        func env(_ name: String) -> String? { getenv(name).map { String(cString: $0) } }
        if let c = env("WEFT_CLUSTER"), !c.isEmpty { return nil }
        let op: Op
        switch positional {
        case let p where p.count == 3 && p[0] == "kv" && p[1] == "get": op = .get(Array(p[2].utf8))
        case let p where p.count == 4 && p[0] == "kv" && p[1] == "put": op = .put(Array(p[2].utf8), Array(p[3].utf8))
        case ["table", "list"]: op = .tableList
        default: return nil
        }
        let dir = dataDir ?? env("WEFT_DATA_DIR") ?? "./weft-data"
        // TLS needs the full client; the fast path speaks plain TCP only.
        guard case .running(let server) = ServerFile.probe(dir), !server.tls, let key = try? ClusterSecret.clientKey(dir: dir, secretFile: nil),
              let conn = BlockingConnection(server, credentials: Credentials(clusterId: server.id, clientKey: key)) else { return nil }
        defer { conn.close() }
        do {
            return try op.run(conn, json: json)
        } catch let e as WeftError {
            if json {
                print(jsonLine(["error": e.code.rawValue, "message": e.message]))
            } else {
                printErr("error: \(e.message)")
            }
            return exitCode(for: e)
        } catch {
            printErr("error: \(error)")
            return 1
        }
    }

    enum Op {
        case get(Bytes)
        case put(Bytes, Bytes)
        case tableList

        func run(_ c: BlockingConnection, json: Bool) throws -> Int32 {
            switch self {
            case .get(let key):
                try WeftError.checkKey(key)
                let ts = try c.now()
                guard case let .readResult(_, value, version) = try c.call(.participant(c.owner(key)), { .read(req: $0, key: key, ts: ts) }) else {
                    throw WeftError(.malformed, "unexpected reply")
                }
                guard let value else {
                    if json {
                        print(jsonLine(["key": text(key), "found": false]))
                        return 4
                    }
                    throw WeftError(.notFound, "key \(text(key)) not found")
                }
                print(json ? jsonLine(["key": text(key), "found": true, "value": text(value), "value_hex": encodeHex(value), "version": version]) : text(value))
            case let .put(key, value):
                try WeftError.checkKey(key)
                try WeftError.checkValue(value)
                let part = TxnPart(writes: [WriteOp(key: key, value: value)])
                let reply: Message
                do {
                    reply = try c.call(.coordinator, { .commit(req: $0, txn: 0, startTs: 0, parts: [c.owner(key): part]) })
                } catch let e as WeftError where e.code == .unavailable || e.code == .malformed {
                    // The commit was sent: it may have happened (as the full client says).
                    throw WeftError(.outcomeUnknown, "\(e.message); the commit may or may not have happened")
                }
                guard case let .commitResult(_, _, outcome) = reply else { throw WeftError(.malformed, "unexpected reply") }
                switch outcome {
                case .committed(let ts): print(json ? jsonLine(["ok": true, "committed_ts": ts]) : "ok (committed at ts=\(ts))")
                case .aborted(let e), .unknown(let e): throw e
                }
            case .tableList:
                let ts = try c.now()
                let prefix = Array("c/".utf8)
                var rows: [ScanRow] = []
                // Every participant at once: one round trip, not one each.
                let calls = (0..<c.server.participants).map { p in (NodeAddress.participant(p), { (req: UInt64) in Message.scan(req: req, start: prefix, end: prefixEnd(prefix), limit: Limits.scanLimitMax, ts: ts) }) }
                for reply in try c.callAll(calls) {
                    guard case let .scanResult(_, page, _) = reply else { throw WeftError(.malformed, "unexpected reply") }
                    rows += page
                }
                rows.sort { compareBytes($0.key, $1.key) < 0 }
                let infos = rows.map { TableStore.parseInfo(name: String(decoding: $0.key.dropFirst(2), as: UTF8.self), $0.value, $0.version) }
                printTables(infos, json: json)
            }
            return 0
        }
    }
}

/// One blocking TCP connection to a `weft server`: the handshake (proving
/// the directory's client secret), then one request at a time, each
/// answered before the next is sent.
final class BlockingConnection {
    let server: ServerFile
    let fd: Int32
    let me: NodeAddress = .client(UInt64.random(in: 1...UInt64.max))
    var nextReq: UInt64 = 1

    /// nil if the server cannot be reached this way (the caller then takes
    /// the usual path, which reports errors in full).
    init?(_ server: ServerFile, credentials: Credentials) {
        self.server = server
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(server.endpoint.port).bigEndian)
        guard inet_pton(AF_INET, server.endpoint.host, &addr.sin_addr) == 1 else { return nil }
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        self.fd = fd
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        // Every reply has a deadline, like the full client's.
        var tv = timeval(tv_sec: 30, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let ok = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        var handshake = ConnectorHandshake(credentials: credentials, me: me)
        guard ok == 0, send(handshake.hello), case .challenge(let nonce)? = try? readFrame(), let auth = handshake.answer(challenge: nonce), send(auth),
              case let .welcome(sender, proof)? = try? readFrame(), handshake.accepts(welcome: sender, proof: proof) else {
            Glibc.close(fd)
            return nil
        }
    }

    func close() { Glibc.close(fd) }

    func owner(_ key: Bytes) -> ParticipantId { Partitioner.participant(for: key, count: server.participants) }

    func now() throws -> Timestamp {
        guard case let .began(_, ts) = try call(.coordinator, { .begin(req: $0) }) else { throw WeftError(.malformed, "unexpected reply") }
        return ts
    }

    func call(_ to: NodeAddress, _ build: (UInt64) -> Message) throws -> Message {
        let req = nextReq
        nextReq += 1
        guard send(.envelope(Envelope(from: me, to: to, build(req)))) else {
            throw WeftError(.unavailable, "lost the connection to the server at \(server.endpoint)")
        }
        while true {
            guard case .envelope(let env) = try readFrame() else { continue }
            guard replyRequest(env.message) == req else { continue }
            if case .failed(_, let error) = env.message { throw error }
            return env.message
        }
    }

    /// Sends every request, then waits for all their replies (in any order).
    func callAll(_ calls: [(NodeAddress, (UInt64) -> Message)]) throws -> [Message] {
        var waiting: [UInt64: Int] = [:]
        for (i, (to, build)) in calls.enumerated() {
            let req = nextReq
            nextReq += 1
            waiting[req] = i
            guard send(.envelope(Envelope(from: me, to: to, build(req)))) else {
                throw WeftError(.unavailable, "lost the connection to the server at \(server.endpoint)")
            }
        }
        var replies = [Message?](repeating: nil, count: calls.count)
        while !waiting.isEmpty {
            guard case .envelope(let env) = try readFrame(), let req = replyRequest(env.message), let i = waiting.removeValue(forKey: req) else { continue }
            if case .failed(_, let error) = env.message { throw error }
            replies[i] = env.message
        }
        return replies.map { $0! }
    }

    func replyRequest(_ m: Message) -> UInt64? {
        switch m {
        case let .began(r, _), let .commitResult(r, _, _), let .readResult(r, _, _), let .scanResult(r, _, _), let .failed(r, _):
            return r
        default:
            return nil
        }
    }

    func send(_ frame: Frame) -> Bool {
        let bytes = frame.encoded()
        var done = 0
        while done < bytes.count {
            // MSG_NOSIGNAL: a server that closed the connection is an error here, not SIGPIPE.
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            done += n
        }
        return true
    }

    func readExactly(_ n: Int) throws -> Bytes {
        var buf = Bytes(repeating: 0, count: n)
        var got = 0
        while got < n {
            let r = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + got, n - got) }
            if r < 0 && errno == EINTR { continue }
            if r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { throw WeftError(.timeout, "no reply from the server at \(server.endpoint) within 30 s") }
            if r <= 0 { throw WeftError(.unavailable, "lost the connection to the server at \(server.endpoint)") }
            got += r
        }
        return buf
    }

    func readFrame() throws -> Frame {
        let header = try readExactly(4)
        let length = Int(header.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }.littleEndian)
        guard length <= Limits.frameBytesMax else { throw WeftError(.malformed, "the server sent a frame of \(length) bytes") }
        let body = try readExactly(length)
        do {
            return try body.withUnsafeBytes { raw throws(Frame.DecodeFailure) in try Frame.decode(body: raw) }
        } catch {
            throw WeftError(.malformed, "the server sent a bad frame: \(error)")
        }
    }
}

/// `table list`'s output, for the full command and the fast path alike.
func printTables(_ infos: [TableStore.Info], json: Bool) {
    for i in infos {
        print(json ? jsonLine(["table": i.name, "rows": i.rows, "format": i.format, "committed_ts": i.committedTs,
                               "layout": i.blocks ? "blocks" : "rows", "partitions": i.partitions, "blocks": i.blockCount,
                               "bytes": i.bytes, "replicas": i.replicas, "written_by": i.partitionMajor ? "executors" : "one writer"])
              : "\(i.name)\t\(i.rows) rows\t\(i.format)\t" + (i.blocks ? "\(i.blockCount) blocks, \(i.bytes) bytes, \(i.replicas) replica\(i.replicas == 1 ? "" : "s")\t" : "per-row layout\t") + "committed at ts=\(i.committedTs)")
    }
    if infos.isEmpty && !json { print("no tables") }
}

/// The status port's `tables` page: every committed table, its generation
/// and blocks, and how many blocks (replicas included) each participant holds.
func tablesPage(_ client: WeftClient) -> [String: Any]? {
    let infos: [TableStore.Info]
    do { infos = try blocking { try await TableStore.list(client) } } catch let e as WeftError {
        return ["tables": [], "error": "cannot read the catalog: \(e.message)"]
    } catch {
        return ["tables": [], "error": "cannot read the catalog: \(error)"]
    }
    let n = client.participantCount
    let rows: [[String: Any]] = infos.map { i in
        var perParticipant: [String: Int] = [:]
        for (p, count) in i.blockCounts.enumerated() where count > 0 {
            for r in 0..<max(1, min(i.replicas, n)) { perParticipant["participant-\(Blocks.target(partition: p, replica: r, participants: n))", default: 0] += count }
        }
        return ["table": i.name, "rows": i.rows, "format": i.format, "layout": i.blocks ? "blocks" : "rows", "generation": i.generation,
                "committed_ts": String(i.committedTs), "partitions": i.partitions, "blocks": i.blockCount, "bytes": i.bytes,
                "replicas": i.replicas, "blocks_per_participant": perParticipant, "written_by": i.partitionMajor ? "executors" : "one writer"]
    }
    return ["tables": rows, "participants": n]
}
