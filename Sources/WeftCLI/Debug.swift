import ArgumentParser
import Foundation
import WeftCore
import WeftRuntime

/// Test workloads used by the crash-recovery tests (hidden from help).
struct Debug: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "debug",
        abstract: "Test workloads for crash-recovery tests.",
        shouldDisplay: false,
        subcommands: [Bank.self, BankCheck.self, CrashTxn.self]
    )

    static func account(_ i: Int, _ namespace: String = "") -> Bytes { Array("\(namespace)acct/\(String(format: "%04d", i))".utf8) }

    /// Concurrent transfers; prints `attempt TXN` as each begins, `ack TXN
    /// COMMIT_TS` for every transfer acknowledged as committed, `abort TXN`
    /// for a definite abort and `unknown TXN` for an unknown outcome. `--kill-after N` SIGKILLs the process after
    /// the N-th acknowledgement, with other transfers in flight.
    /// `--jsonl` prints the history instead, one JSON object per event, in
    /// the form `weft check bank --history` documents (docs/cli.md).
    struct Bank: AsyncParsableCommand {
        @OptionGroup var global: GlobalOptions
        @Option var accounts = 20
        @Option var clients = 8
        @Option var transfers = 200
        @Option(name: .customLong("kill-after")) var killAfter: Int?
        @Option var balance = 1000
        @Option(help: "Run for this many seconds instead of a fixed number of transfers.") var duration: Double?
        @Flag(help: "Keep going through node failures (for random-kill tests).") var resilient = false
        @Flag(help: "Print the history as JSON lines (invoke, ok, fail, info).") var jsonl = false
        @Option(name: .customLong("time-origin-ns"), help: "Wall-clock nanoseconds that history times count from.") var timeOrigin: UInt64?
        @Option(help: "A prefix for every key (acct/ and log/ keys live under it).") var namespace = ""

        func run() async throws {
            let (accounts, clients, transfers, killAfter, balance) = (self.accounts, self.clients, self.transfers, self.killAfter, self.balance)
            let (durationSeconds, resilient) = (duration, self.resilient)
            let history = BankHistory(jsonl: jsonl, origin: timeOrigin ?? wallNanos(), namespace: namespace)
            let ns = namespace
            try await withCluster(global) { client in
                var ready = false
                for attempt in 0..<50 where !ready {
                    do {
                        ready = try await client.get(Debug.account(0, ns)).value != nil
                        break
                    } catch let e as WeftError where resilient && attempt < 49 {
                        _ = e
                        try await Task.sleep(nanoseconds: 100_000_000)
                    }
                }
                if !ready {
                    let t = try await client.begin()
                    for i in 0..<accounts { try t.put(Debug.account(i, ns), Array(String(balance).utf8)) }
                    try await t.commit()
                }
                let acks = Counter()
                let deadline = durationSeconds.map { wallMillis() + UInt64($0 * 1000) }
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for c in 0..<clients {
                        group.addTask {
                            var rng = SystemRandomNumberGenerator()
                            var done = 0
                            // Jepsen's convention: a process whose operation ended
                            // in doubt is retired, and the client continues as a new one.
                            var process = c
                            while done < transfers / clients || (deadline.map { wallMillis() < $0 } ?? false) {
                                if let d = deadline, wallMillis() >= d { break }
                                done += 1
                                let a = Int.random(in: 0..<accounts, using: &rng)
                                var b = Int.random(in: 0..<(accounts - 1), using: &rng)
                                if b >= a { b += 1 }
                                let (ka, kb) = (String(decoding: Debug.account(a, ns), as: UTF8.self), String(decoding: Debug.account(b, ns), as: UTF8.self))
                                var op = BankOp(process: process, invokedAt: history.now(), keys: (ka, kb))
                                op.logPrefix = ns + "log/"
                                var committing = false
                                do {
                                    let t = try await client.begin()
                                    op.txn = t.id
                                    history.invoke(op)
                                    let va = Int(String(decoding: try await t.get(Debug.account(a, ns)) ?? [], as: UTF8.self))
                                    let vb = Int(String(decoding: try await t.get(Debug.account(b, ns)) ?? [], as: UTF8.self))
                                    op.reads = (va, vb)
                                    let amount = Int.random(in: 1...10, using: &rng)
                                    op.writes = ((va ?? 0) - amount, (vb ?? 0) + amount, "\(a) \(b) \(amount) client-\(c)")
                                    try t.put(Debug.account(a, ns), Array(String(op.writes!.0).utf8))
                                    try t.put(Debug.account(b, ns), Array(String(op.writes!.1).utf8))
                                    try t.put(Array("\(ns)log/\(t.id)".utf8), Array(op.writes!.2.utf8))
                                    committing = true
                                    let ts = try await t.commit()
                                    history.complete(op, "ok", commitTs: ts)
                                    if let k = killAfter, acks.increment() >= k { kill(getpid(), SIGKILL) }
                                } catch let e as WeftError where e.code == .conflict || e.code == .aborted {
                                    // A definite abort: it must never be applied.
                                    history.complete(op, "fail", error: e)
                                    continue
                                } catch let e as WeftError where resilient && (e.code == .outcomeUnknown || committing) {
                                    // The commit request may have reached the coordinator:
                                    // in doubt until `txn status` says.
                                    history.complete(op, "info", error: e)
                                    process += clients
                                } catch let e as WeftError where resilient {
                                    // A node is down before the commit was asked for:
                                    // nothing can have been applied. Back off.
                                    history.complete(op, "fail", error: e)
                                    try await Task.sleep(nanoseconds: 50_000_000)
                                }
                            }
                        }
                    }
                    try await group.waitForAll()
                }
            }
        }
    }

    /// One transaction of a `weft check crash-points` case, its keys under
    /// `check/TAG/`. Prints `keys K...` (the keys transaction A writes), then
    /// `ack TXN TS`, `abort TXN`, `unknown TXN` or `fail TXN MESSAGE` for A.
    /// - commit: A writes one key on every participant (two-phase commit).
    /// - abort: A reads a key on another participant, writes it and a key on
    ///   `--victim`; B commits that read key first, so the other participant
    ///   votes no and the victim, prepared, must record the abort.
    /// - refusal: A reads and writes a key on the victim only; B commits it
    ///   first, so the victim refuses A's one-phase commit.
    struct CrashTxn: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "crash-txn")
        @OptionGroup var global: GlobalOptions
        @Option var tag: String
        @Option var kind = "commit"
        @Option var victim = 0

        func run() async throws {
            let (tag, kind, victim) = (self.tag, self.kind, self.victim)
            try await withCluster(global) { client in
                let n = client.participantCount
                // A key owned by each participant.
                var keyOf: [ParticipantId: Bytes] = [:]
                var i = 0
                while keyOf.count < n && i < 10_000 {
                    let k = Array("check/\(tag)/\(i)".utf8)
                    if keyOf[client.owner(of: k)] == nil { keyOf[client.owner(of: k)] = k }
                    i += 1
                }
                let other = (victim + 1) % n
                guard let kv = keyOf[victim], let ko = keyOf[other] else { throw WeftError(.invalidArgument, "no key found for participant \(victim)") }
                let aKeys: [Bytes]
                switch kind {
                case "commit": aKeys = keyOf.keys.sorted().map { keyOf[$0]! }
                case "abort": aKeys = n > 1 ? [ko, kv] : [kv]
                case "refusal": aKeys = [kv]
                default: throw WeftError(.invalidArgument, "--kind must be commit, abort or refusal")
                }
                let show = { (k: Bytes) in String(decoding: k, as: UTF8.self) }
                Debug.say("keys " + aKeys.map(show).joined(separator: " "))
                var txn: TxnId = 0
                var committing = false
                do {
                    let a = try await client.begin()
                    txn = a.id
                    if kind != "commit" {
                        let contested = kind == "abort" && n > 1 ? ko : kv
                        _ = try await a.get(contested)
                        let b = try await client.begin()
                        try b.put(contested, Array("\(tag)-B".utf8))
                        let ts = try await b.commit()
                        Debug.say("b-ack \(b.id) \(ts)")
                    }
                    for k in aKeys { try a.put(k, Array(tag.utf8)) }
                    committing = true
                    let ts = try await a.commit()
                    Debug.say("ack \(txn) \(ts)")
                } catch let e as WeftError where e.code == .conflict || e.code == .aborted {
                    Debug.say("abort \(txn) \(e.message)")
                } catch let e as WeftError where e.code == .outcomeUnknown || committing {
                    Debug.say("unknown \(txn) \(e.message)")
                } catch let e as WeftError {
                    Debug.say("fail \(txn) \(e.message)")
                }
            }
        }
    }

    static func say(_ s: String) { FileHandle.standardOutput.write(Data((s + "\n").utf8)) }

    /// Prints `total N`, `accounts N` and `log TXN` for every transfer log key.
    struct BankCheck: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "bank-check")
        @OptionGroup var global: GlobalOptions
        @Option var namespace = ""

        func run() async throws {
            let ns = namespace
            try await withCluster(global) { client in
                let (rows, _) = try await client.scan(prefix: Array("\(ns)acct/".utf8), limit: Limits.scanLimitMax)
                let total = rows.reduce(0) { $0 + (Int(String(decoding: $1.value, as: UTF8.self)) ?? 0) }
                print("accounts \(rows.count)")
                print("total \(total)")
                let (logs, _) = try await client.scan(prefix: Array("\(ns)log/".utf8), limit: Limits.scanLimitMax)
                for l in logs { print("log \(String(decoding: l.key.dropFirst(ns.utf8.count + 4), as: UTF8.self))") }
            }
        }
    }
}

final class Counter: @unchecked Sendable {
    let lock = NSLock()
    var n = 0
    func increment() -> Int { lock.withLock { n += 1; return n } }
}

func wallNanos() -> UInt64 {
    var t = timespec()
    clock_gettime(CLOCK_REALTIME, &t)
    return UInt64(t.tv_sec) * 1_000_000_000 + UInt64(t.tv_nsec)
}

/// One transfer as the history records it.
struct BankOp {
    var process: Int
    var invokedAt: UInt64
    var keys: (String, String)
    var logPrefix = "log/"
    var txn: UInt64 = 0
    var reads: (Int?, Int?)?
    var writes: (Int, Int, String)?

    init(process: Int, invokedAt: UInt64, keys: (String, String)) {
        self.process = process
        self.invokedAt = invokedAt
        self.keys = keys
    }

    /// Jepsen's micro-operations: `["r", key, value]` and `["w", key, value]`,
    /// with null for a value not (yet) known.
    var value: [[Any]] {
        let logKey = "\(logPrefix)\(txn)"
        return [["r", keys.0, reads?.0 ?? NSNull()], ["r", keys.1, reads?.1 ?? NSNull()],
                ["w", keys.0, writes?.0 ?? NSNull()], ["w", keys.1, writes?.1 ?? NSNull()],
                ["w", logKey, writes?.2 ?? NSNull()]]
    }
}

/// The bank workload's output: the short text lines (`attempt`, `ack`,
/// `abort`, `unknown`) or, with `--jsonl`, the history as JSON lines.
final class BankHistory: @unchecked Sendable {
    let jsonl: Bool
    let origin: UInt64
    let lock = NSLock()

    let namespace: String

    init(jsonl: Bool, origin: UInt64, namespace: String) {
        self.jsonl = jsonl
        self.origin = origin
        self.namespace = namespace
    }

    func now() -> UInt64 { wallNanos() &- origin }

    func write(_ line: String) {
        lock.withLock { FileHandle.standardOutput.write(Data((line + "\n").utf8)) }
    }

    func invoke(_ op: BankOp) {
        if !jsonl { return write("attempt \(op.txn)") }
        write(jsonLine(["type": "invoke", "f": "txn", "process": op.process, "time": op.invokedAt, "txn": op.txn, "value": op.value]))
    }

    /// `type` is ok, fail (definitely not applied) or info (outcome unknown).
    func complete(_ op: BankOp, _ type: String, commitTs: UInt64? = nil, error: WeftError? = nil) {
        if !jsonl {
            if op.txn == 0 { return }
            switch type {
            case "ok": write("ack \(op.txn) \(commitTs ?? 0)")
            case "info": write("unknown \(op.txn)")
            default: if error?.code == .conflict || error?.code == .aborted { write("abort \(op.txn)") }
            }
            return
        }
        if op.txn == 0 {
            // begin itself failed: no transaction, nothing attempted.
            write(jsonLine(["type": "invoke", "f": "txn", "process": op.process, "time": op.invokedAt, "txn": NSNull(), "value": op.value]))
        }
        var o: [String: Any] = ["type": type, "f": "txn", "process": op.process, "time": now(), "txn": op.txn == 0 ? NSNull() : op.txn, "value": op.value]
        if let commitTs { o["commit_ts"] = commitTs }
        if let error { o["error"] = "\(error.code.rawValue): \(error.message)" }
        write(jsonLine(o))
    }
}
