import ArgumentParser
import Foundation
import WeftCore
import WeftRuntime

/// One statement of a `weft txn` script.
enum Statement: Equatable {
    case get(Bytes)
    case put(Bytes, Bytes)
    case del(Bytes)
    case begin
    case commit
    case abort

    /// Parses `get K`, `put K V` (V is the rest of the line), `del K`,
    /// `commit`, `abort`. Blank lines and `#` comments give nil.
    static func parse(_ line: String, lineNumber: Int, enc: EncodingOptions) throws -> Statement? {
        let trimmed = line.trimmingCharacters(in: .whitespaces)
        if trimmed.isEmpty || trimmed.hasPrefix("#") { return nil }
        let parts = trimmed.split(separator: " ", maxSplits: 2, omittingEmptySubsequences: true).map(String.init)
        func arg(_ i: Int, _ name: String) throws -> String {
            guard i < parts.count else { throw WeftError(.invalidArgument, "line \(lineNumber): '\(parts[0])' needs a \(name)") }
            return parts[i]
        }
        func key() throws -> Bytes {
            let k = try enc.key(try arg(1, "key"))
            try WeftError.checkKey(k)
            return k
        }
        switch parts[0].lowercased() {
        case "get":
            guard parts.count == 2 else { throw WeftError(.invalidArgument, "line \(lineNumber): usage: get KEY") }
            return .get(try key())
        case "put":
            let k = try key()
            let v = try enc.value(try arg(2, "value"))
            try WeftError.checkValue(v)
            return .put(k, v)
        case "del", "delete":
            guard parts.count == 2 else { throw WeftError(.invalidArgument, "line \(lineNumber): usage: del KEY") }
            return .del(try key())
        case "begin":
            guard parts.count == 1 else { throw WeftError(.invalidArgument, "line \(lineNumber): 'begin' takes no arguments") }
            return .begin
        case "commit":
            guard parts.count == 1 else { throw WeftError(.invalidArgument, "line \(lineNumber): 'commit' takes no arguments") }
            return .commit
        case "abort", "rollback":
            guard parts.count == 1 else { throw WeftError(.invalidArgument, "line \(lineNumber): 'abort' takes no arguments") }
            return .abort
        default:
            throw WeftError(.invalidArgument, "line \(lineNumber): unknown statement '\(parts[0])'; expected begin, get, put, del, commit or abort")
        }
    }
}

struct Txn: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "txn",
        abstract: "Run transactions, or ask what became of one.",
        subcommands: [TxnRun.self, TxnStatusCommand.self],
        defaultSubcommand: TxnRun.self
    )
}

struct TxnStatusCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Ask what became of transaction ID (committed, aborted, pending), e.g. after an 'outcome unknown'."
    )
    @OptionGroup var global: GlobalOptions
    @Argument(help: "The transaction id printed by `weft txn`.") var id: UInt64

    func run() async throws {
        let g = global, id = self.id
        let s = try await withCluster(g, reads: true) { c in try await c.status(id) }
        switch s {
        case .committed(let ts): print(g.json ? jsonLine(["txn": id, "status": "committed", "committed_ts": ts]) : "committed at ts=\(ts)")
        case .aborted: print(g.json ? jsonLine(["txn": id, "status": "aborted"]) : "aborted")
        case .pending: print(g.json ? jsonLine(["txn": id, "status": "pending"]) : "pending (still being decided; ask again)")
        case .unknown: print(g.json ? jsonLine(["txn": id, "status": "unknown"]) : "unknown (no node remembers it; older than the retention window)")
        }
    }
}

struct TxnRun: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run transactions: statements from stdin, each run as it is read, or a one-shot batch from -e.",
        discussion: """
        Statements: begin | get KEY | put KEY VALUE | del KEY | commit | abort. A statement
        runs as soon as it is read and its answer is printed at once, so a program (or a
        person) can read a value and then write within the same transaction. `begin` is
        optional: the first statement opens a transaction. An error inside a transaction
        aborts it (nothing of it is committed) and, when stdin is not a terminal, ends the
        command with its exit code. At the end of stdin an open transaction is aborted, with
        a message (exit 1 if it had writes). With -e, the statements are one batch: parsed
        first, and what is open at the end is committed. A conflict prints `aborted: ...`
        and exits 3; an unknown outcome prints the transaction id and exits 5.
        """
    )
    @OptionGroup var global: GlobalOptions
    @OptionGroup var enc: EncodingOptions
    @Option(name: .short, help: "A statement; repeat for a one-shot batch.") var e: [String] = []

    func run() async throws {
        let g = global, enc = self.enc, given = e
        // A -e batch is parsed whole before anything runs.
        var batch: [Statement]?
        if !given.isEmpty {
            var statements: [Statement] = []
            do {
                for (i, l) in given.enumerated() {
                    if let s = try Statement.parse(l, lineNumber: i + 1, enc: enc) { statements.append(s) }
                }
            } catch let err as WeftError {
                fail(WeftError(err.code, err.message + " (nothing was committed)"), json: g.json)
            }
            batch = statements
        }
        let tty = batch == nil && isatty(0) == 1
        try await withCluster(g) { client in
            var txn: Transaction?
            var wrote = false
            var lineNumber = 0
            var next = 0
            func say(_ text: String) {
                print(text)
                fflush(nil)
            }
            func statement() throws -> Statement?? {
                if let batch {
                    guard next < batch.count else { return .none }
                    next += 1
                    return .some(batch[next - 1])
                }
                // On a terminal the prompt names the open transaction, and
                // lines are edited with libedit when it is installed.
                let input = tty ? LineEditor.readLine(prompt: txn.map { "weft txn \($0.id)> " } ?? "weft> ") : readLine(strippingNewline: true)
                guard let line = input else { return .none }
                lineNumber += 1
                return .some(try Statement.parse(line, lineNumber: lineNumber, enc: enc))
            }
            func open() async throws -> Transaction {
                if let txn { return txn }
                let t = try await client.begin()
                txn = t
                wrote = false
                return t
            }
            func commit(_ t: Transaction) async throws {
                txn = nil
                do {
                    let ts = try await t.commit()
                    say(g.json ? jsonLine(["op": "commit", "committed": true, "txn": t.id, "committed_ts": ts]) : "committed at ts=\(ts) (txn \(t.id))")
                } catch let err as WeftError where err.code == .outcomeUnknown || err.code == .timeout || err.code == .malformed {
                    // No answer (or no sense of one) after the commit was sent: it may have happened.
                    say(g.json ? jsonLine(["op": "commit", "committed": false, "txn": t.id, "error": "outcome-unknown", "message": err.message])
                        : "outcome unknown for txn \(t.id): \(err.message)\n  ask later with: weft txn status \(t.id)")
                    throw ExitCode(5)
                } catch let err as WeftError {
                    // The coordinator's answer: aborted for sure (a conflict, a
                    // missing vote, a refused snapshot...), or never sent.
                    say(g.json ? jsonLine(["op": "commit", "committed": false, "txn": t.id, "error": err.code.rawValue, "message": err.message])
                        : "aborted: \(err.message.replacingOccurrences(of: "transaction \(t.id) aborted: ", with: "")) (txn \(t.id))")
                    throw ExitCode(WeftCLI.exitCode(for: err))
                }
            }
            while true {
                do {
                    guard let parsed = try statement() else { break }
                    guard let s = parsed else { continue }
                    switch s {
                    case .begin:
                        if let t = txn {
                            // Still one answer line per statement: a program waits for it.
                            say(g.json ? jsonLine(["op": "begin", "txn": t.id, "already_open": true]) : "begin (txn \(t.id) already open)")
                        } else {
                            let t = try await open()
                            say(g.json ? jsonLine(["op": "begin", "txn": t.id]) : "begin (txn \(t.id))")
                        }
                    case .get(let k):
                        let t = try await open()
                        let v = try await t.get(k)
                        if g.json {
                            var o: [String: Any] = ["op": "get", "key": enc.show(key: k), "found": v != nil]
                            if let v { o["value"] = enc.show(value: v) }
                            say(jsonLine(o))
                        } else {
                            say(v.map { enc.show(value: $0) } ?? "(nil)")
                        }
                    case let .put(k, v):
                        let t = try await open()
                        try t.put(k, v)
                        wrote = true
                        say(g.json ? jsonLine(["op": "put", "ok": true]) : "ok")
                    case .del(let k):
                        let t = try await open()
                        try t.delete(k)
                        wrote = true
                        say(g.json ? jsonLine(["op": "del", "ok": true]) : "ok")
                    case .commit:
                        guard let t = txn else {
                            say(g.json ? jsonLine(["op": "commit", "committed": false, "message": "no transaction open; nothing committed"]) : "no transaction open; nothing committed")
                            continue
                        }
                        do { try await commit(t) } catch let code as ExitCode {
                            if !tty { throw code }
                        }
                    case .abort:
                        txn?.abort()
                        txn = nil
                        say(g.json ? jsonLine(["op": "abort", "ok": true]) : "aborted")
                    }
                } catch let err as WeftError {
                    // An error inside a transaction aborts it: nothing of it is committed.
                    let open = txn
                    open?.abort()
                    txn = nil
                    let what = open.map { "transaction \($0.id) aborted, nothing of it was committed" } ?? "nothing was committed"
                    if g.json {
                        say(jsonLine(["error": err.code.rawValue, "message": err.message, "txn": open?.id ?? 0, "aborted": open != nil]))
                    } else {
                        printErr("error: \(err.message) (\(what))")
                    }
                    if !tty { throw ExitCode(WeftCLI.exitCode(for: err)) }
                }
            }
            guard let t = txn else { return }
            if batch != nil { return try await commit(t) }
            // End of stdin with a transaction open: abort it, as psql does.
            t.abort()
            let why = "end of input: transaction \(t.id) aborted (no commit); \(wrote ? "its writes were not committed" : "it only read")"
            if g.json { say(jsonLine(["op": "end", "txn": t.id, "aborted": true, "message": why])) } else { printErr("weft: " + why) }
            if wrote { throw ExitCode(1) }
        }
    }
}

struct Admin: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "admin",
        abstract: "Operator tools.",
        subcommands: [InDoubt.self]
    )

    struct InDoubt: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "in-doubt",
            abstract: "List prepared but undecided transactions by reading the LMDB files directly (works with no process running)."
        )
        @OptionGroup var global: GlobalOptions

        func run() async throws {
            let g = global
            let entries: [OfflineInspector.InDoubtEntry]
            do {
                if let c = g.resolvedCluster {
                    entries = try OfflineInspector.inDoubt(cluster: try ClusterConfig.load(c))
                } else {
                    entries = try OfflineInspector.inDoubt(dataDir: g.resolvedDataDir)
                }
            } catch { fail(error, json: g.json) }
            let now = wallMillis()
            for e in entries {
                let age = now > e.txn.preparedAtMillis ? now - e.txn.preparedAtMillis : 0
                let fate = e.coordinatorDecidedCommit ? "commit (decided by coordinator)" : "undecided (aborts unless the coordinator decided)"
                if g.json {
                    print(jsonLine(["txn": e.txn.txn, "participant": e.participant, "participants": e.txn.participants, "commit_ts": e.txn.commitTs,
                                    "writes": e.txn.writes.count, "age_ms": age, "coordinator_decided_commit": e.coordinatorDecidedCommit]))
                } else {
                    print("txn \(e.txn.txn) on participant-\(e.participant): participants \(e.txn.participants), \(e.txn.writes.count) writes, age \(formatAge(age)), outcome: \(fate)")
                }
            }
            if !g.json && entries.isEmpty { print("no in-doubt transactions") }
        }
    }
}

func formatAge(_ ms: UInt64) -> String {
    ms < 10_000 ? "\(ms) ms" : ms < 600_000 ? "\(ms / 1000) s" : "\(ms / 60_000) min"
}
