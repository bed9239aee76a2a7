import ArgumentParser
import Foundation
import WeftCore
import WeftRuntime

/// One statement of a `weft txn` script.
enum Statement: Equatable {
    case get(Bytes)
    case put(Bytes, Bytes)
    case del(Bytes)
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
        case "commit":
            guard parts.count == 1 else { throw WeftError(.invalidArgument, "line \(lineNumber): 'commit' takes no arguments") }
            return .commit
        case "abort", "rollback":
            guard parts.count == 1 else { throw WeftError(.invalidArgument, "line \(lineNumber): 'abort' takes no arguments") }
            return .abort
        default:
            throw WeftError(.invalidArgument, "line \(lineNumber): unknown statement '\(parts[0])'; expected get, put, del, commit or abort")
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
        let s = try await withCluster(g) { c in try await c.status(id) }
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
        abstract: "Run a transaction: statements from stdin (one per line) or from -e.",
        discussion: """
        Statements: get KEY | put KEY VALUE | del KEY | commit | abort. `commit` ends one
        transaction and the next statement starts another; what is left at the end of the
        input is committed. The whole script is parsed before anything runs, so a script
        with a bad statement commits nothing. A conflict prints `aborted: conflict on key ...`
        and exits 3.
        """
    )
    @OptionGroup var global: GlobalOptions
    @OptionGroup var enc: EncodingOptions
    @Option(name: .short, help: "A statement; repeat for a one-shot batch.") var e: [String] = []

    func run() async throws {
        let g = global, enc = self.enc, given = e
        // The data directory is opened (and locked) first, then the whole
        // script is read and parsed before any statement runs.
        try await withCluster(g) { client in
            let lines: [String]
            if !given.isEmpty {
                lines = given
            } else {
                let data = FileHandle.standardInput.readDataToEndOfFile()
                lines = String(decoding: data, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
            }
            var statements: [Statement] = []
            do {
                for (i, l) in lines.enumerated() {
                    if let s = try Statement.parse(l, lineNumber: i + 1, enc: enc) { statements.append(s) }
                }
            } catch let err as WeftError {
                throw WeftError(err.code, err.message + " (nothing was committed)")
            }
            if statements.last != .commit && statements.last != .abort && !statements.isEmpty { statements.append(.commit) }
            var txn: Transaction?
            for s in statements {
                let t: Transaction
                if let txn { t = txn } else { t = try await client.begin() }
                txn = t
                switch s {
                case .get(let k):
                    let v = try await t.get(k)
                    if g.json {
                        var o: [String: Any] = ["op": "get", "key": enc.show(key: k), "found": v != nil]
                        if let v { o["value"] = enc.show(value: v) }
                        print(jsonLine(o))
                    } else {
                        print(v.map { enc.show(value: $0) } ?? "(nil)")
                    }
                case let .put(k, v):
                    try t.put(k, v)
                    print(g.json ? jsonLine(["op": "put", "ok": true]) : "ok")
                case .del(let k):
                    try t.delete(k)
                    print(g.json ? jsonLine(["op": "del", "ok": true]) : "ok")
                case .commit:
                    txn = nil
                    do {
                        let ts = try await t.commit()
                        print(g.json ? jsonLine(["op": "commit", "committed": true, "txn": t.id, "committed_ts": ts]) : "committed at ts=\(ts) (txn \(t.id))")
                    } catch let err as WeftError where err.code == .outcomeUnknown {
                        print(g.json ? jsonLine(["op": "commit", "committed": false, "txn": t.id, "error": "outcome-unknown", "message": err.message])
                              : "outcome unknown: \(err.message)\n  ask later with: weft txn status \(t.id)")
                        throw ExitCode(5)
                    } catch let err as WeftError where err.code == .conflict || err.code == .timeout || err.code == .unavailable {
                        print(g.json ? jsonLine(["op": "commit", "committed": false, "txn": t.id, "error": err.code.rawValue, "message": err.message]) : "aborted: \(err.message.replacingOccurrences(of: "transaction \(t.id) aborted: ", with: ""))")
                        throw ExitCode(WeftCLI.exitCode(for: err))
                    }
                case .abort:
                    t.abort()
                    txn = nil
                    print(g.json ? jsonLine(["op": "abort", "ok": true]) : "aborted")
                }
            }
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
