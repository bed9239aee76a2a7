import Foundation
import WeftCore
import WeftProtocol

/// A command Weft answers over RESP: its arity (Redis's convention:
/// exact when positive, at least |n| when negative), flags for COMMAND,
/// key positions, and how it runs.
struct RedisCommandSpec: Sendable {
    enum Kind: Sendable {
        /// Answered by the connection itself, without the store.
        case connection
        /// Reads at a fresh snapshot; never commits.
        case read
        /// Writes without reading: one blind transaction.
        case write
        /// Reads then writes in one transaction, retried on conflict.
        case readModifyWrite
        /// MULTI/EXEC/WATCH and friends, SCAN, DBSIZE.
        case special
    }
    let arity: Int
    let flags: [String]
    let firstKey: Int
    let lastKey: Int
    let step: Int
    let kind: Kind

    static let table: [String: RedisCommandSpec] = [
        "ping": .init(arity: -1, flags: ["fast", "stale"], firstKey: 0, lastKey: 0, step: 0, kind: .connection),
        "echo": .init(arity: 2, flags: ["fast"], firstKey: 0, lastKey: 0, step: 0, kind: .connection),
        "quit": .init(arity: -1, flags: ["fast", "noauth"], firstKey: 0, lastKey: 0, step: 0, kind: .connection),
        "select": .init(arity: 2, flags: ["fast", "loading"], firstKey: 0, lastKey: 0, step: 0, kind: .connection),
        "auth": .init(arity: -2, flags: ["fast", "noauth", "no-multi"], firstKey: 0, lastKey: 0, step: 0, kind: .connection),
        "hello": .init(arity: -1, flags: ["fast", "noauth", "no-multi"], firstKey: 0, lastKey: 0, step: 0, kind: .connection),
        "client": .init(arity: -2, flags: ["admin"], firstKey: 0, lastKey: 0, step: 0, kind: .connection),
        "command": .init(arity: -1, flags: ["loading", "stale"], firstKey: 0, lastKey: 0, step: 0, kind: .connection),
        "config": .init(arity: -2, flags: ["admin"], firstKey: 0, lastKey: 0, step: 0, kind: .connection),
        "info": .init(arity: -1, flags: ["loading", "stale"], firstKey: 0, lastKey: 0, step: 0, kind: .connection),
        "dbsize": .init(arity: 1, flags: ["readonly"], firstKey: 0, lastKey: 0, step: 0, kind: .special),
        "get": .init(arity: 2, flags: ["readonly", "fast"], firstKey: 1, lastKey: 1, step: 1, kind: .read),
        "mget": .init(arity: -2, flags: ["readonly", "fast"], firstKey: 1, lastKey: -1, step: 1, kind: .read),
        "exists": .init(arity: -2, flags: ["readonly", "fast"], firstKey: 1, lastKey: -1, step: 1, kind: .read),
        "type": .init(arity: 2, flags: ["readonly", "fast"], firstKey: 1, lastKey: 1, step: 1, kind: .read),
        "ttl": .init(arity: 2, flags: ["readonly", "fast"], firstKey: 1, lastKey: 1, step: 1, kind: .read),
        "pttl": .init(arity: 2, flags: ["readonly", "fast"], firstKey: 1, lastKey: 1, step: 1, kind: .read),
        "set": .init(arity: -3, flags: ["write", "denyoom"], firstKey: 1, lastKey: 1, step: 1, kind: .write),
        "mset": .init(arity: -3, flags: ["write", "denyoom"], firstKey: 1, lastKey: -1, step: 2, kind: .write),
        "del": .init(arity: -2, flags: ["write"], firstKey: 1, lastKey: -1, step: 1, kind: .readModifyWrite),
        "incr": .init(arity: 2, flags: ["write", "denyoom", "fast"], firstKey: 1, lastKey: 1, step: 1, kind: .readModifyWrite),
        "decr": .init(arity: 2, flags: ["write", "denyoom", "fast"], firstKey: 1, lastKey: 1, step: 1, kind: .readModifyWrite),
        "incrby": .init(arity: 3, flags: ["write", "denyoom", "fast"], firstKey: 1, lastKey: 1, step: 1, kind: .readModifyWrite),
        "decrby": .init(arity: 3, flags: ["write", "denyoom", "fast"], firstKey: 1, lastKey: 1, step: 1, kind: .readModifyWrite),
        "scan": .init(arity: -2, flags: ["readonly"], firstKey: 0, lastKey: 0, step: 0, kind: .special),
        "multi": .init(arity: 1, flags: ["fast", "no-multi"], firstKey: 0, lastKey: 0, step: 0, kind: .special),
        "exec": .init(arity: 1, flags: ["no-script"], firstKey: 0, lastKey: 0, step: 0, kind: .special),
        "discard": .init(arity: 1, flags: ["fast"], firstKey: 0, lastKey: 0, step: 0, kind: .special),
        "watch": .init(arity: -2, flags: ["fast", "no-multi"], firstKey: 1, lastKey: -1, step: 1, kind: .special),
        "unwatch": .init(arity: 1, flags: ["fast"], firstKey: 0, lastKey: 0, step: 0, kind: .special),
    ]
}

/// One connection's state and the meaning of every command on Weft's
/// transactions. `immediate` runs on the connection's event loop and
/// answers what needs no store; `run` does the rest, one command at a time.
final class RedisSession: @unchecked Sendable {
    enum Immediate {
        case reply(RESPValue)
        case quit(RESPValue)
        case wait
    }

    let fe: RedisFrontEnd
    let id: Int64
    var proto = 2
    var authed: Bool
    var clientName: Bytes?
    /// Commands queued since MULTI; nil outside MULTI.
    var multi: [[Bytes]]?
    var multiDirty = false
    /// WATCHed keys and the version each had when watched (0: absent).
    var watched: [(key: Bytes, version: Timestamp)] = []
    var client: WeftClient { fe.client }

    init(frontEnd: RedisFrontEnd, id: Int64) {
        fe = frontEnd
        self.id = id
        authed = frontEnd.password == nil
    }

    func closed() {}

    static func lower(_ b: Bytes) -> String { String(decoding: b, as: UTF8.self).lowercased() }

    /// Command names as clients send them (lower or upper case) to the
    /// table's name, without building and lowercasing a String per request.
    static let names: [ByteKey: String] = {
        var d: [ByteKey: String] = [:]
        for n in RedisCommandSpec.table.keys {
            d[ByteKey(Bytes(n.utf8))] = n
            d[ByteKey(Bytes(n.uppercased().utf8))] = n
        }
        return d
    }()

    static func commandName(_ b: Bytes) -> String { names[ByteKey(b)] ?? lower(b) }
    static func text(_ b: Bytes) -> String { String(decoding: b, as: UTF8.self) }

    static func unknown(_ args: [Bytes]) -> RESPValue {
        let rest = args.dropFirst().prefix(3).map { "'\(text($0).prefix(128))' " }.joined()
        return .error("ERR unknown command '\(text(args[0]).prefix(128))', with args beginning with: \(rest)")
    }

    static func wrongArity(_ name: String) -> RESPValue { .error("ERR wrong number of arguments for '\(name)' command") }

    // MARK: Immediate commands

    func immediate(_ args: [Bytes]) -> Immediate {
        let name = Self.commandName(args[0])
        guard let spec = RedisCommandSpec.table[name] else {
            if multi != nil { multiDirty = true }
            return .reply(Self.unknown(args))
        }
        if (spec.arity > 0 && args.count != spec.arity) || (spec.arity < 0 && args.count < -spec.arity) {
            if multi != nil { multiDirty = true }
            return .reply(Self.wrongArity(name))
        }
        if !authed && !spec.flags.contains("noauth") {
            return .reply(.error("NOAUTH Authentication required."))
        }
        if multi != nil {
            switch name {
            case "exec", "discard", "quit": break
            case "multi": return .reply(.error("ERR MULTI calls can not be nested"))
            case "watch": return .reply(.error("ERR WATCH inside MULTI is not allowed"))
            case "auth", "hello":
                multiDirty = true
                return .reply(.error("ERR Command not allowed inside a transaction"))
            default:
                if multi!.count >= Limits.respMultiCommandsMax {
                    multiDirty = true
                    return .reply(.error("ERR too many commands queued in MULTI (Limits.respMultiCommandsMax is \(Limits.respMultiCommandsMax))"))
                }
                multi!.append(args)
                return .reply(.simple("QUEUED"))
            }
        }
        switch name {
        case "quit": return .quit(.ok)
        case "multi":
            multi = []
            multiDirty = false
            return .reply(.ok)
        case "discard":
            guard multi != nil else { return .reply(.error("ERR DISCARD without MULTI")) }
            multi = nil
            watched = []
            return .reply(.ok)
        case "unwatch":
            watched = []
            return .reply(.ok)
        case "exec":
            guard multi != nil else { return .reply(.error("ERR EXEC without MULTI")) }
            if multiDirty {
                multi = nil
                watched = []
                return .reply(.error("EXECABORT Transaction discarded because of previous errors."))
            }
            return .wait
        default:
            break
        }
        if spec.kind == .connection { return .reply(connection(name, args)) }
        return .wait
    }

    /// Commands about the connection and the server; no store access.
    func connection(_ name: String, _ args: [Bytes]) -> RESPValue {
        switch name {
        case "ping":
            if args.count > 2 { return Self.wrongArity(name) }
            return args.count == 2 ? .bulk(args[1]) : .simple("PONG")
        case "echo":
            return .bulk(args[1])
        case "select":
            return Self.text(args[1]) == "0" ? .ok : .error("ERR DB index is out of range (weft has one database, 0)")
        case "auth":
            let given = args.count == 2 ? args[1] : args.count == 3 ? args[2] : nil
            guard let given, args.count <= 3 else { return .error("ERR syntax error") }
            if args.count == 3 && Self.text(args[1]) != "default" {
                return .error("WRONGPASS invalid username-password pair or user is disabled.")
            }
            guard let pw = fe.password else {
                return .error("ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?")
            }
            if constantTimeEqual(given, Bytes(pw.utf8)) {
                authed = true
                return .ok
            }
            return .error("WRONGPASS invalid username-password pair or user is disabled.")
        case "hello":
            return hello(args)
        case "client":
            switch Self.lower(args[1]) {
            case "setname":
                guard args.count == 3 else { return Self.wrongArity("client|setname") }
                clientName = args[2].isEmpty ? nil : args[2]
                return .ok
            case "getname": return clientName.map { .bulk($0) } ?? .null
            case "setinfo": return args.count == 4 ? .ok : Self.wrongArity("client|setinfo")
            case "id": return .integer(id)
            case "info": return .bulk("id=\(id) name=\(clientName.map(Self.text) ?? "") resp=\(proto)\n")
            default: return .error("ERR unknown subcommand '\(Self.text(args[1]))'. Try CLIENT SETNAME, GETNAME, SETINFO, ID, INFO.")
            }
        case "command":
            if args.count == 1 { return .array(RedisCommandSpec.table.keys.sorted().map(commandInfo)) }
            switch Self.lower(args[1]) {
            case "count": return .integer(Int64(RedisCommandSpec.table.count))
            case "docs": return .map([])
            case "info": return .array(args.dropFirst(2).map { RedisCommandSpec.table[Self.lower($0)] != nil ? commandInfo(Self.lower($0)) : .nullArray })
            case "list": return .array(RedisCommandSpec.table.keys.sorted().map { .bulk($0) })
            default: return .error("ERR unknown subcommand '\(Self.text(args[1]))'. Try COMMAND COUNT, DOCS, INFO, LIST.")
            }
        case "config":
            switch Self.lower(args[1]) {
            case "get":
                guard args.count >= 3 else { return Self.wrongArity("config|get") }
                // What clients and redis-benchmark ask about; everything else is empty.
                let known: [(String, String)] = [("appendonly", "yes"), ("appendfsync", "always"), ("save", ""), ("databases", "1"), ("maxmemory", "0")]
                let patterns = args.dropFirst(2).map { Bytes(Self.lower($0).utf8) }
                return .map(known.filter { k in patterns.contains { Glob.matches($0, Bytes(k.0.utf8)) } }.map { (.bulk($0.0), .bulk($0.1)) })
            case "resetstat": return .ok
            default: return .error("ERR CONFIG \(Self.text(args[1]).uppercased()) is not supported by weft; only CONFIG GET (which answers nothing)")
            }
        case "info":
            return .bulk(info())
        default:
            return Self.unknown(args)
        }
    }

    func hello(_ args: [Bytes]) -> RESPValue {
        var version = proto
        var i = 1
        if args.count >= 2 {
            guard let v = Int(Self.text(args[1])) else { return .error("ERR Protocol version is not an integer or out of range") }
            guard v == 2 || v == 3 else { return .error("NOPROTO unsupported protocol version") }
            version = v
            i = 2
        }
        var newName: Bytes??
        while i < args.count {
            switch Self.lower(args[i]) {
            case "auth" where i + 2 < args.count:
                guard let pw = fe.password else {
                    return .error("ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?")
                }
                guard Self.text(args[i + 1]) == "default", constantTimeEqual(args[i + 2], Bytes(pw.utf8)) else {
                    return .error("WRONGPASS invalid username-password pair or user is disabled.")
                }
                authed = true
                i += 3
            case "setname" where i + 1 < args.count:
                newName = .some(args[i + 1])
                i += 2
            default:
                return .error("ERR Syntax error in HELLO option '\(Self.text(args[i]))'")
            }
        }
        if !authed {
            return .error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time")
        }
        if let n = newName { clientName = n }
        proto = version
        return .map([
            (.bulk("server"), .bulk("redis")),
            (.bulk("version"), .bulk(Self.redisVersion)),
            (.bulk("proto"), .integer(Int64(version))),
            (.bulk("id"), .integer(id)),
            (.bulk("mode"), .bulk("standalone")),
            (.bulk("role"), .bulk("master")),
            (.bulk("modules"), .array([])),
        ])
    }

    /// The Redis version Weft answers as: the command set it follows.
    static let redisVersion = "7.0.0"

    func commandInfo(_ name: String) -> RESPValue {
        let s = RedisCommandSpec.table[name]!
        return .array([.bulk(name), .integer(Int64(s.arity)), .array(s.flags.map { .simple($0) }),
                       .integer(Int64(s.firstKey)), .integer(Int64(s.lastKey)), .integer(Int64(s.step))])
    }

    func info() -> String {
        var lines = ["# Server", "redis_version:\(Self.redisVersion)", "redis_mode:standalone", "server_name:weft",
                     "process_id:\(getpid())", "uptime_in_seconds:\((wallMillis() - fe.started) / 1000)",
                     "weft_participants:\(client.participantCount)"]
        lines += fe.infoLines()
        lines += ["", "# Clients", "connected_clients:\(fe.connections)", "", "# Persistence", "loading:0",
                  "aof_enabled:1", "weft_durability:every acknowledged write is in an fsynced LMDB commit", "",
                  "# Replication", "role:master", "connected_slaves:0", ""]
        return lines.joined(separator: "\r\n")
    }

    // MARK: Commands that use the store

    func run(_ args: [Bytes]) async -> RESPValue {
        let name = Self.commandName(args[0])
        let spec = RedisCommandSpec.table[name]!
        switch name {
        case "exec": return await exec()
        case "watch": return await watch(Array(args.dropFirst()))
        case "scan": return await scan(args)
        case "dbsize": return await dbsize()
        default: break
        }
        switch spec.kind {
        case .read:
            do {
                // A read-only snapshot never commits: a shared (batched) timestamp will do.
                let t = Transaction(client: client, startTs: try await client.now())
                return try await apply(name, args, in: t)
            } catch {
                return Self.errorReply(error, txn: nil)
            }
        case .write:
            if name == "set", args.count > 3 { return await readModifyWrite(name, args) }
            return await retrying(name, args, blind: true)
        case .readModifyWrite:
            return await readModifyWrite(name, args)
        case .connection, .special:
            return connection(name, args)
        }
    }

    /// Plain GET, SET key value and MSET, answered through callbacks: no
    /// task is created, and the reply is written from the thread that
    /// delivered the store's answer. False: `args` needs `run`. A conflict
    /// hands the command to `run`, which retries it with back-off.
    func fast(_ args: [Bytes], via outbox: @escaping (Envelope) -> Void, _ done: @escaping @Sendable (RESPValue) -> Void) -> Bool {
        let name = Self.commandName(args[0])
        let client = self.client
        switch name {
        case "get":
            let key = args[1]
            do { try WeftError.checkKey(key) } catch { done(.error("ERR \(error.message)")); return true }
            // One key needs no snapshot timestamp: its owner answers with the
            // newest committed version (waiting out a prepared lock).
            client.call(.participant(client.owner(of: key)), { .read(req: $0, key: key, ts: readLatestTs) }, via: outbox) { r in
                switch r {
                case .success(.readResult(_, let value, _)): done(value.map { .bulk($0) } ?? .null)
                case .success: done(.error("ERR unexpected reply"))
                case .failure(let e): done(Self.errorReply(e, txn: nil))
                }
            }
            return true
        case "set", "mset":
            if name == "set" && args.count != 3 { return false }
            if name == "mset" && args.count % 2 == 0 { return false }
            var values: [ByteKey: Bytes] = [:]
            var order: [Bytes] = []
            do {
                for i in stride(from: 1, to: args.count, by: 2) {
                    try WeftError.checkKey(args[i])
                    try WeftError.checkValue(args[i + 1])
                    if values.updateValue(args[i + 1], forKey: ByteKey(args[i])) == nil { order.append(args[i]) }
                }
                // Over a transaction's limits: the general path names the limit.
                if order.count > Limits.txnWritesMax || args.dropFirst().reduce(0, { $0 + $1.count }) > Limits.txnBytesMax { return false }
            } catch {
                done(.error("ERR \(error.message)"))
                return true
            }
            var parts: [ParticipantId: TxnPart] = [:]
            for k in order { parts[client.owner(of: k), default: TxnPart()].writes.append(WriteOp(key: k, value: values[ByteKey(k)]!)) }
            client.call(.coordinator, { .commit(req: $0, txn: 0, startTs: 0, parts: parts) }, via: outbox) { [self] r in
                switch r {
                case .success(.commitResult(_, let txn, let outcome)):
                    switch outcome {
                    case .committed: done(.ok)
                    case .aborted(let e) where e.code == .conflict: Task { done(await self.run(args)) }
                    case .aborted(let e): done(Self.errorReply(e, txn: txn))
                    case .unknown(let e): done(Self.errorReply(e, txn: txn))
                    }
                case .success: done(.error("ERR unexpected reply"))
                case .failure(let e): done(Self.errorReply(e, txn: nil))
                }
            }
            return true
        default:
            return false
        }
    }

    enum BatchKind: Sendable { case set, get, incr }

    /// Whether `args` is a plain `SET k v`, a `GET k` or an INCR-family
    /// command that may join a batch of its kind.
    static func batchKind(_ args: [Bytes]) -> BatchKind? {
        switch args.count {
        case 3 where commandName(args[0]) == "set": return .set
        case 2 where commandName(args[0]) == "get": return .get
        case 2, 3:
            switch commandName(args[0]) {
            case "incr", "decr": return args.count == 2 ? .incr : nil
            case "incrby", "decrby": return args.count == 3 ? .incr : nil
            default: return nil
            }
        default: return nil
        }
    }

    /// An INCR-family command's key and signed increment, or its error reply.
    enum Increment { case ok(Bytes, Int64), bad(RESPValue) }

    static func increment(_ args: [Bytes]) -> Increment {
        let name = commandName(args[0])
        do { try WeftError.checkKey(args[1]) } catch { return .bad(.error("ERR \(error.message)")) }
        var by: Int64 = 1
        if args.count == 3 {
            guard let n = parseInteger(args[2]) else { return .bad(.error("ERR value is not an integer or out of range")) }
            by = n
        }
        if name.hasPrefix("decr") {
            guard by != Int64.min else { return .bad(.error("ERR decrement would overflow")) }
            by = -by
        }
        return .ok(args[1], by)
    }

    /// Pipelined plain SETs or GETs of one connection, answered together in
    /// order. SETs: one blind one-phase commit per participant for its
    /// keys (a repeated key keeps its last value, as running them in order
    /// would), all at once; a conflict reruns that participant's SETs one by
    /// one, in order. GETs: all read at once (each the key's newest
    /// version); they follow every earlier request of the connection, which
    /// was answered first.
    func fastBatch(_ kind: BatchKind, _ batch: [[Bytes]], via outbox: @escaping (Envelope) -> Void,
                   _ done: @escaping @Sendable ([RESPValue]) -> Void) {
        let client = self.client
        let results = BatchResults(count: batch.count, done)
        switch kind {
        case .incr:
            // Each joins its key's combiner queue now, in request order, so a
            // key incremented twice in the run gets its two values in order.
            let fe = self.fe
            for (i, args) in batch.enumerated() {
                switch Self.increment(args) {
                case .bad(let e): results.set(i, e)
                case .ok(let key, let delta):
                    if fe.combiner.add(ByteKey(key), delta, { results.set(i, $0) }) {
                        Task { await fe.combiner.run(key, client: client) }
                    }
                }
            }
        case .get:
            for (i, args) in batch.enumerated() {
                let key = args[1]
                do { try WeftError.checkKey(key) } catch {
                    results.set(i, .error("ERR \(error.message)"))
                    continue
                }
                client.call(.participant(client.owner(of: key)), { .read(req: $0, key: key, ts: readLatestTs) }, via: outbox) { r in
                    switch r {
                    case .success(.readResult(_, let value, _)): results.set(i, value.map { .bulk($0) } ?? .null)
                    case .success: results.set(i, .error("ERR unexpected reply"))
                    case .failure(let e): results.set(i, Self.errorReply(e, txn: nil))
                    }
                }
            }
        case .set:
            var groups: [ParticipantId: (part: TxnPart, slot: [ByteKey: Int], members: [Int])] = [:]
            for (i, args) in batch.enumerated() {
                do {
                    try WeftError.checkKey(args[1])
                    try WeftError.checkValue(args[2])
                } catch {
                    results.set(i, .error("ERR \(error.message)"))
                    continue
                }
                let p = client.owner(of: args[1])
                var g = groups[p] ?? (TxnPart(), [:], [])
                if let at = g.slot[ByteKey(args[1])] {
                    g.part.writes[at] = WriteOp(key: args[1], value: args[2])
                } else {
                    g.slot[ByteKey(args[1])] = g.part.writes.count
                    g.part.writes.append(WriteOp(key: args[1], value: args[2]))
                }
                g.members.append(i)
                groups[p] = g
            }
            for (p, g) in groups {
                let members = g.members
                client.call(.coordinator, { .commit(req: $0, txn: 0, startTs: 0, parts: [p: g.part]) }, via: outbox) { [self] r in
                    switch r {
                    case .success(.commitResult(_, let txn, let outcome)):
                        switch outcome {
                        case .committed: for i in members { results.set(i, .ok) }
                        case .aborted(let e) where e.code == .conflict:
                            // One by one, in order, each retried on its own.
                            Task {
                                for i in members { results.set(i, await self.run(batch[i])) }
                            }
                        case .aborted(let e): for i in members { results.set(i, Self.errorReply(e, txn: txn)) }
                        case .unknown(let e): for i in members { results.set(i, Self.errorReply(e, txn: txn)) }
                        }
                    case .success: for i in members { results.set(i, .error("ERR unexpected reply")) }
                    case .failure(let e): for i in members { results.set(i, Self.errorReply(e, txn: nil)) }
                    }
                }
            }
        }
    }

    /// A single-key read-modify-write command waits its turn for the key
    /// among this process's connections, then runs with retries. INCR and
    /// friends are combined instead (`IncrementCombiner`).
    func readModifyWrite(_ name: String, _ args: [Bytes]) async -> RESPValue {
        if name.hasPrefix("incr") || name.hasPrefix("decr") {
            let key: Bytes, delta: Int64
            switch Self.increment(args) {
            case .bad(let e): return e
            case .ok(let k, let d): (key, delta) = (k, d)
            }
            let fe = self.fe
            return await withCheckedContinuation { (c: CheckedContinuation<RESPValue, Never>) in
                if fe.combiner.add(ByteKey(key), delta, { c.resume(returning: $0) }) {
                    Task { await fe.combiner.run(key, client: fe.client) }
                }
            }
        }
        guard args.count >= 2, name != "del" || args.count == 2 else { return await retrying(name, args, blind: false) }
        let key = ByteKey(args[1])
        await fe.gate.acquire(key)
        defer { fe.gate.release(key) }
        return await retrying(name, args, blind: false)
    }

    /// Runs one command as its own transaction; a conflict reruns it on a
    /// fresh snapshot (nothing was answered yet), with back-off, for up to
    /// `Limits.respConflictRetryMillisMax`.
    func retrying(_ name: String, _ args: [Bytes], blind: Bool) async -> RESPValue {
        var lastConflict: WeftError?
        let deadline = wallMillis() + Limits.respConflictRetryMillisMax
        for attempt in 0... {
            if attempt > 0 {
                if wallMillis() >= deadline { break }
                await Self.backOff(attempt)
            }
            var txn: TxnId?
            do {
                let t = blind ? Transaction(client: client, startTs: 0) : try await client.begin()
                txn = t.id
                let v = try await apply(name, args, in: t)
                if case .error = v { return v }
                if t.hasWrites { try await t.commit() }
                return v
            } catch let e as WeftError where e.code == .conflict {
                lastConflict = e
            } catch {
                return Self.errorReply(error, txn: txn)
            }
        }
        return .error("ERR conflict: \(lastConflict?.message ?? "") (still conflicting after Limits.respConflictRetryMillisMax = \(Limits.respConflictRetryMillisMax) ms of retries)")
    }

    /// Randomized exponential back-off before retry `attempt`: up to
    /// 0.25 ms doubled per attempt, at most 50 ms. A prepared lock is held
    /// for a whole two-phase commit, so retrying at once mostly meets it again.
    static func backOff(_ attempt: Int) async {
        let capMicros = min(50_000, 250 << min(attempt, 10))
        try? await Task.sleep(nanoseconds: UInt64.random(in: UInt64(capMicros / 4)...UInt64(capMicros)) * 1000)
    }

    static func errorReply(_ error: any Error, txn: TxnId?) -> RESPValue {
        guard let e = error as? WeftError else { return .error("ERR \(error)") }
        switch e.code {
        case .outcomeUnknown, .timeout:
            let id = txn.flatMap { $0 == 0 ? nil : $0 }
            let named = id.map { " transaction \($0):" } ?? ""
            let check = id.map { "; check with `weft txn status \($0)`" } ?? ""
            return .error("ERR outcome-unknown\(named) \(e.message)\(check)")
        case .conflict:
            return .error("ERR conflict: \(e.message)")
        default:
            return .error("ERR \(e.message)")
        }
    }

    /// One data command inside transaction `t`. Errors that belong in the
    /// reply (a wrong type, a key over the limit) are returned; a conflict
    /// or a failure of the store is thrown.
    func apply(_ name: String, _ args: [Bytes], in t: Transaction) async throws -> RESPValue {
        func limits(_ body: () throws -> Void) throws -> RESPValue? {
            do { try body() } catch let e as WeftError where [.keyTooLarge, .valueTooLarge, .invalidArgument, .txnTooLarge].contains(e.code) {
                return .error("ERR \(e.message)")
            }
            return nil
        }
        func checkKeys(_ keys: ArraySlice<Bytes>) -> RESPValue? {
            for k in keys {
                do { try WeftError.checkKey(k) } catch { return .error("ERR \(error.message)") }
            }
            return nil
        }
        switch name {
        case "get":
            if let e = checkKeys(args[1...]) { return e }
            return try await t.get(args[1]).map { .bulk($0) } ?? .null
        case "mget":
            if let e = checkKeys(args[1...]) { return e }
            return .array(try await t.getMany(Array(args[1...])).map { $0.map { .bulk($0) } ?? .null })
        case "exists":
            if let e = checkKeys(args[1...]) { return e }
            return .integer(Int64(try await t.getMany(Array(args[1...])).filter { $0 != nil }.count))
        case "type":
            if let e = checkKeys(args[1...]) { return e }
            return .simple(try await t.get(args[1]) == nil ? "none" : "string")
        case "ttl", "pttl":
            if let e = checkKeys(args[1...]) { return e }
            return .integer(try await t.get(args[1]) == nil ? -2 : -1)
        case "set":
            return try await set(args, in: t)
        case "mset":
            guard args.count % 2 == 1 else { return Self.wrongArity("mset") }
            if let e = try limits({ for i in stride(from: 1, to: args.count, by: 2) { try t.put(args[i], args[i + 1]) } }) { return e }
            return .ok
        case "del":
            if let e = checkKeys(args[1...]) { return e }
            var unique: [Bytes] = []
            var seen = Set<ByteKey>()
            for k in args[1...] where seen.insert(ByteKey(k)).inserted { unique.append(k) }
            let values = try await t.getMany(unique)
            var n: Int64 = 0
            for (k, v) in zip(unique, values) where v != nil {
                try t.delete(k)
                n += 1
            }
            return .integer(n)
        case "incr", "decr", "incrby", "decrby":
            if let e = checkKeys(args[1...1]) { return e }
            var by: Int64 = 1
            if args.count == 3 {
                guard let n = Self.parseInteger(args[2]) else { return .error("ERR value is not an integer or out of range") }
                by = n
            }
            if name.hasPrefix("decr") {
                guard by != Int64.min else { return .error("ERR decrement would overflow") }
                by = -by
            }
            let old = try await t.get(args[1])
            var current: Int64 = 0
            if let old {
                guard let n = Self.parseInteger(old) else { return .error("ERR value is not an integer or out of range") }
                current = n
            }
            let (sum, overflow) = current.addingReportingOverflow(by)
            if overflow { return .error("ERR increment or decrement would overflow") }
            try t.put(args[1], Bytes(String(sum).utf8))
            return .integer(sum)
        case "ping", "echo", "select", "client", "command", "config", "info":
            return connection(name, args)
        default:
            return Self.unknown(args)
        }
    }

    /// SET key value [NX|XX] [GET] — expiry options are refused: Weft keeps
    /// no TTLs, and silently keeping a key forever would surprise a cache.
    func set(_ args: [Bytes], in t: Transaction) async throws -> RESPValue {
        var nx = false, xx = false, get = false
        for o in args.dropFirst(3) {
            switch Self.lower(o) {
            case "nx": nx = true
            case "xx": xx = true
            case "get": get = true
            case "ex", "px", "exat", "pxat", "keepttl":
                return .error("ERR weft does not implement key expiry; SET with \(Self.text(o).uppercased()) is refused (set without a TTL)")
            default: return .error("ERR syntax error")
            }
        }
        if nx && xx { return .error("ERR syntax error") }
        do {
            try WeftError.checkKey(args[1])
            try WeftError.checkValue(args[2])
        } catch {
            return .error("ERR \(error.message)")
        }
        var old: Bytes?
        if nx || xx || get { old = try await t.get(args[1]) }
        let write = (!nx || old == nil) && (!xx || old != nil)
        if write { try t.put(args[1], args[2]) }
        if get { return old.map { .bulk($0) } ?? .null }
        return write ? .ok : .null
    }

    /// Redis's integers: optional '-', decimal digits, no leading zeros or
    /// '+', within Int64.
    static func parseInteger(_ b: Bytes) -> Int64? {
        guard !b.isEmpty, b.count <= 20 else { return nil }
        var i = 0
        if b[0] == UInt8(ascii: "-") { i = 1 }
        guard i < b.count else { return nil }
        if b[i] == UInt8(ascii: "0") && (b.count > i + 1 || i == 1) { return nil }
        for c in b[i...] where c < 48 || c > 57 { return nil }
        return Int64(String(decoding: b, as: UTF8.self))
    }

    // MARK: MULTI / EXEC / WATCH

    func watch(_ keys: [Bytes]) async -> RESPValue {
        do {
            for k in keys { try WeftError.checkKey(k) }
            let ts = try await client.now()
            for k in keys where !watched.contains(where: { $0.key == k }) {
                let (_, version) = try await client.read(k, at: ts)
                watched.append((k, version))
            }
            return .ok
        } catch {
            return Self.errorReply(error, txn: nil)
        }
    }

    /// Runs the queued commands as ONE Weft transaction. A WATCHed key whose
    /// version moved since WATCH answers the null array; any other conflict
    /// reruns the whole block on a fresh snapshot, since none of its
    /// replies has been revealed.
    func exec() async -> RESPValue {
        let queued = multi ?? []
        let watching = watched
        multi = nil
        watched = []
        var lastConflict: WeftError?
        let deadline = wallMillis() + Limits.respConflictRetryMillisMax
        for attempt in 0... {
            if attempt > 0 {
                if wallMillis() >= deadline { break }
                await Self.backOff(attempt)
            }
            var txn: TxnId?
            do {
                let t = try await client.begin()
                txn = t.id
                for w in watching {
                    let (_, version) = try await t.getVersioned(w.key)
                    if version != w.version { return .nullArray }
                }
                var replies: [RESPValue] = []
                replies.reserveCapacity(queued.count)
                for args in queued {
                    replies.append(try await apply(Self.commandName(args[0]), args, in: t))
                }
                if t.hasWrites { try await t.commit() }
                return .array(replies)
            } catch let e as WeftError where e.code == .conflict {
                lastConflict = e
            } catch {
                return Self.errorReply(error, txn: txn)
            }
        }
        return .error("ERR conflict: \(lastConflict?.message ?? "") (EXEC still conflicting after Limits.respConflictRetryMillisMax = \(Limits.respConflictRetryMillisMax) ms of retries)")
    }

    // MARK: SCAN, DBSIZE

    /// SCAN cursor [MATCH pattern] [COUNT n]: keys in order from a fresh
    /// snapshot per call. The cursor names the last key returned (kept per
    /// connection); the pattern's literal prefix narrows the scan.
    func scan(_ args: [Bytes]) async -> RESPValue {
        guard let cursor = UInt64(Self.text(args[1])) else { return .error("ERR invalid cursor") }
        var pattern: Bytes?
        var count = 10
        var i = 2
        while i < args.count {
            switch Self.lower(args[i]) {
            case "match" where i + 1 < args.count:
                pattern = args[i + 1]
                i += 2
            case "count" where i + 1 < args.count:
                guard let n = Int(Self.text(args[i + 1])), n >= 1 else { return .error("ERR value is not an integer or out of range") }
                count = min(n, 100_000)
                i += 2
            case "type" where i + 1 < args.count:
                if Self.lower(args[i + 1]) != "string" { return .array([.bulk("0"), .array([])]) }
                i += 2
            default:
                return .error("ERR syntax error")
            }
        }
        var after: Bytes?
        if cursor != 0 {
            guard let k = fe.cursor(cursor) else {
                return .error("ERR cursor \(cursor) is unknown or expired (the server keeps the newest Limits.respCursorsMax = \(Limits.respCursorsMax) cursors)")
            }
            after = k
        }
        let prefix = pattern.map(Glob.literalPrefix) ?? []
        if prefix.count > Limits.keyBytesMax { return .array([.bulk("0"), .array([])]) }
        do {
            let ts = try await client.now()
            let start = after.map { $0 + [0] }
            let client = self.client
            let limit = count
            var rows: [ScanRow] = []
            var more = false
            try await withThrowingTaskGroup(of: ([ScanRow], Bool).self) { group in
                for p in 0..<client.participantCount {
                    group.addTask { try await client.scanParticipant(p, prefix: prefix, from: start, limit: limit, at: ts) }
                }
                for try await (r, m) in group {
                    rows += r
                    if m { more = true }
                }
            }
            rows.sort { compareBytes($0.key, $1.key) < 0 }
            if rows.count > count {
                more = true
                rows.removeLast(rows.count - count)
            }
            var next: UInt64 = 0
            if more, let last = rows.last { next = fe.saveCursor(last.key) }
            let keys = rows.map(\.key).filter { k in pattern.map { Glob.matches($0, k) } ?? true }
            return .array([.bulk(String(next)), .array(keys.map { .bulk($0) })])
        } catch {
            return Self.errorReply(error, txn: nil)
        }
    }

    func dbsize() async -> RESPValue {
        do {
            let ts = try await client.now()
            var total: Int64 = 0
            for p in 0..<client.participantCount {
                var start: Bytes?
                while true {
                    let (rows, more) = try await client.scanParticipant(p, prefix: [], from: start, limit: 100_000, at: ts)
                    total += Int64(rows.count)
                    guard more, let last = rows.last else { break }
                    start = last.key + [0]
                }
            }
            return .integer(total)
        } catch {
            return Self.errorReply(error, txn: nil)
        }
    }
}

func constantTimeEqual(_ a: Bytes, _ b: Bytes) -> Bool {
    guard a.count == b.count else { return false }
    var d: UInt8 = 0
    for i in 0..<a.count { d |= a[i] ^ b[i] }
    return d == 0
}

/// Redis glob patterns: `*`, `?`, `[abc]`, `[^a-z]`, and `\x` for a literal.
enum Glob {
    /// The bytes every match starts with: the pattern up to its first
    /// special character.
    static func literalPrefix(_ p: Bytes) -> Bytes {
        var out: Bytes = []
        var i = 0
        while i < p.count {
            let c = p[i]
            if c == UInt8(ascii: "*") || c == UInt8(ascii: "?") || c == UInt8(ascii: "[") { break }
            if c == UInt8(ascii: "\\") {
                guard i + 1 < p.count else { break }
                out.append(p[i + 1])
                i += 2
                continue
            }
            out.append(c)
            i += 1
        }
        return out
    }

    static func matches(_ p: Bytes, _ s: Bytes) -> Bool {
        var pi = 0, si = 0
        var starP = -1, starS = 0
        while si < s.count {
            if pi < p.count {
                let c = p[pi]
                if c == UInt8(ascii: "*") {
                    starP = pi
                    starS = si
                    pi += 1
                    continue
                }
                if c == UInt8(ascii: "?") {
                    pi += 1
                    si += 1
                    continue
                }
                if c == UInt8(ascii: "[") {
                    if let (ok, next) = matchClass(p, pi, s[si]), ok {
                        pi = next
                        si += 1
                        continue
                    }
                } else {
                    var lit = c
                    var next = pi + 1
                    if c == UInt8(ascii: "\\") && pi + 1 < p.count {
                        lit = p[pi + 1]
                        next = pi + 2
                    }
                    if lit == s[si] {
                        pi = next
                        si += 1
                        continue
                    }
                }
            }
            guard starP >= 0 else { return false }
            pi = starP + 1
            starS += 1
            si = starS
        }
        while pi < p.count && p[pi] == UInt8(ascii: "*") { pi += 1 }
        return pi == p.count
    }

    /// `[...]` at `pi` against `c`: whether it matched and where the
    /// pattern continues; nil for an unterminated class (matches nothing).
    static func matchClass(_ p: Bytes, _ pi: Int, _ c: UInt8) -> (Bool, Int)? {
        var i = pi + 1
        var negate = false
        if i < p.count && p[i] == UInt8(ascii: "^") {
            negate = true
            i += 1
        }
        var hit = false
        var first = true
        while i < p.count && (p[i] != UInt8(ascii: "]") || first) {
            first = false
            var lo = p[i]
            if lo == UInt8(ascii: "\\") && i + 1 < p.count {
                i += 1
                lo = p[i]
            }
            if i + 2 < p.count && p[i + 1] == UInt8(ascii: "-") && p[i + 2] != UInt8(ascii: "]") {
                let hi = p[i + 2]
                if min(lo, hi) <= c && c <= max(lo, hi) { hit = true }
                i += 3
            } else {
                if lo == c { hit = true }
                i += 1
            }
        }
        guard i < p.count else { return nil }
        return (hit != negate, i + 1)
    }
}

/// In-process FIFO locks on keys, held across a read-modify-write
/// transaction so that this process's connections take turns on a hot key.
final class KeyGate: @unchecked Sendable {
    let lock = NSLock()
    var waiters: [ByteKey: [CheckedContinuation<Void, Never>]] = [:]

    func acquire(_ key: ByteKey) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            if enter(key, c) { c.resume() }
        }
    }

    /// Takes the key if free (true), else queues `c` to be resumed by `release`.
    func enter(_ key: ByteKey, _ c: CheckedContinuation<Void, Never>) -> Bool {
        lock.withLock {
            if waiters[key] == nil {
                waiters[key] = []
                return true
            }
            waiters[key]!.append(c)
            return false
        }
    }

    func release(_ key: ByteKey) {
        lock.lock()
        guard var w = waiters[key], !w.isEmpty else {
            waiters[key] = nil
            lock.unlock()
            return
        }
        let next = w.removeFirst()
        waiters[key] = w
        lock.unlock()
        next.resume()
    }
}

/// Concurrent INCRBYs of one key in this process, combined: while one
/// transaction on the key runs, the increments that arrive wait, and the
/// next transaction applies all of them at once (one read, one write, one
/// commit), answering each with the value after its own increment, as if
/// they had run one after another in that order inside the commit. A hot
/// counter then costs one commit per batch instead of one per INCR.
final class IncrementCombiner: @unchecked Sendable {
    typealias Waiter = (delta: Int64, done: @Sendable (RESPValue) -> Void)
    let lock = NSLock()
    /// Keys with a running combiner, and what waits for its next batch.
    var queues: [ByteKey: [Waiter]] = [:]
    /// Increments applied in one transaction, at most.
    static let batchMax = 4096

    /// Queues an increment; true if the caller must start `run` for the key.
    func add(_ key: ByteKey, _ delta: Int64, _ done: @escaping @Sendable (RESPValue) -> Void) -> Bool {
        lock.withLock {
            if queues[key] != nil {
                queues[key]!.append((delta, done))
                return false
            }
            queues[key] = [(delta, done)]
            return true
        }
    }

    func take(_ key: ByteKey) -> [Waiter] {
        lock.withLock {
            let q = queues[key] ?? []
            if q.isEmpty {
                queues[key] = nil
                return []
            }
            let batch = Array(q.prefix(Self.batchMax))
            queues[key] = Array(q.dropFirst(batch.count))
            return batch
        }
    }

    /// Applies batches for `key` until none waits.
    func run(_ key: Bytes, client: WeftClient) async {
        while true {
            let batch = take(ByteKey(key))
            if batch.isEmpty { return }
            let replies = await apply(key, batch.map(\.delta), client: client)
            for (w, r) in zip(batch, replies) { w.done(r) }
        }
    }

    func apply(_ key: Bytes, _ deltas: [Int64], client: WeftClient) async -> [RESPValue] {
        var lastConflict: WeftError?
        let deadline = wallMillis() + Limits.respConflictRetryMillisMax
        for attempt in 0... {
            if attempt > 0 {
                if wallMillis() >= deadline { break }
                await RedisSession.backOff(attempt)
            }
            var txn: TxnId?
            do {
                let t = try await client.begin()
                txn = t.id
                var current: Int64 = 0
                if let old = try await t.get(key) {
                    guard let n = RedisSession.parseInteger(old) else {
                        return deltas.map { _ in .error("ERR value is not an integer or out of range") }
                    }
                    current = n
                }
                var replies: [RESPValue] = []
                replies.reserveCapacity(deltas.count)
                var value = current
                for d in deltas {
                    let (sum, overflow) = value.addingReportingOverflow(d)
                    if overflow {
                        replies.append(.error("ERR increment or decrement would overflow"))
                    } else {
                        value = sum
                        replies.append(.integer(sum))
                    }
                }
                if replies.contains(where: { if case .integer = $0 { return true } else { return false } }) {
                    try t.put(key, Bytes(String(value).utf8))
                    try await t.commit()
                }
                return replies
            } catch let e as WeftError where e.code == .conflict {
                lastConflict = e
            } catch {
                let r = RedisSession.errorReply(error, txn: txn)
                return deltas.map { _ in r }
            }
        }
        let r = RESPValue.error("ERR conflict: \(lastConflict?.message ?? "") (still conflicting after Limits.respConflictRetryMillisMax = \(Limits.respConflictRetryMillisMax) ms of retries)")
        return deltas.map { _ in r }
    }
}

/// Answers of a batch, filled in any order from any thread; `done` gets
/// them in request order once the last one is in.
final class BatchResults: @unchecked Sendable {
    let lock = NSLock()
    var values: [RESPValue?]
    var missing: Int
    let done: @Sendable ([RESPValue]) -> Void

    init(count: Int, _ done: @escaping @Sendable ([RESPValue]) -> Void) {
        values = Array(repeating: nil, count: count)
        missing = count
        self.done = done
    }

    func set(_ i: Int, _ v: RESPValue) {
        let finished: [RESPValue]? = lock.withLock {
            guard values[i] == nil else { return nil }
            values[i] = v
            missing -= 1
            return missing == 0 ? values.map { $0! } : nil
        }
        if let finished { done(finished) }
    }
}
