import ArgumentParser
import Foundation
import WeftCore
import WeftRuntime

/// `weft check`: the crash-recovery test, shipped to users.
struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Test a cluster's crash recovery: transfers under SIGKILL and SIGSTOP, with the invariants checked.",
        subcommands: [Bank.self, CrashPointsCheck.self]
    )

    /// `weft check bank`: read-modify-write transfers between accounts from
    /// `--clients` connections while a seeded schedule kills (SIGKILL) or
    /// pauses (SIGSTOP) nodes and restarts them. Checked:
    /// - every snapshot read during the run, and the final state, holds the
    ///   same total;
    /// - every acknowledged transfer is in the data;
    /// - every transfer in the data was attempted, and none that was
    ///   definitely aborted is;
    /// - every "outcome unknown" resolves one way through `txn status`, and
    ///   the data agrees;
    /// - nothing is in doubt `--settle` after the last restart.
    struct Bank: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "bank", abstract: "Transfers under kills and pauses; checks totals, acknowledged commits, unknown outcomes and in-doubt transactions.")
        @Option(help: "A running cluster to test (default: start a local one in a temporary directory).") var cluster: String?
        @Option(help: "Participants of the local cluster started when --cluster is not given.") var participants = 3
        @Option var accounts = 100
        @Option var clients = 8
        @Option(help: "How long transfers run (e.g. 60s, 500ms).") var duration = "60s"
        @Option(help: "Which nodes to kill or pause: coordinator, participant, any or none.") var kill = "any"
        @Option(name: .customLong("kill-every"), help: "Time between kills (jittered by the seed).") var killEvery = "500ms"
        @Option(name: .customLong("pause-every"), help: "Pause (SIGSTOP, then SIGCONT) a node this often instead of killing.") var pauseEvery: String?
        @Option(help: "Time allowed after the last restart for every in-doubt transaction to resolve.") var settle = "30s"
        @Option(help: "Seed of the kill schedule (printed; the same seed replays the same schedule).") var seed: UInt64?
        @Option(help: "Write the history here as JSON lines: invoke, ok, fail and info events (format in docs/cli.md).") var history: String?
        @Flag(help: "Print the report as one JSON object.") var json = false

        func validate() throws {
            for (name, v) in [("duration", duration), ("kill-every", killEvery), ("settle", settle)] + (pauseEvery.map { [("pause-every", $0)] } ?? []) {
                guard let ms = parseMillis(v), ms > 0 else { throw ValidationError("--\(name) must be a duration such as 60s or 500ms") }
            }
            if !["coordinator", "participant", "any", "none"].contains(kill) { throw ValidationError("--kill must be coordinator, participant, any or none") }
            if !(2...10_000).contains(accounts) { throw ValidationError("--accounts must be 2...10000") }
            if !(1...256).contains(clients) { throw ValidationError("--clients must be 1...256") }
            if !(1...16).contains(participants) { throw ValidationError("--participants must be 1...16") }
        }

        func run() throws {
            let me = URL(fileURLWithPath: CommandLine.arguments[0]).standardizedFileURL.path
            let seed = self.seed ?? UInt64.random(in: 1...UInt64.max >> 1)
            var rng = CheckRandom(seed: seed)
            let durationMs = parseMillis(duration)!, everyMs = parseMillis(pauseEvery ?? killEvery)!, settleMs = parseMillis(settle)!
            let pausing = pauseEvery != nil
            var report = CheckReport(seed: seed)
            say("weft check bank: seed \(seed) (--seed \(seed) replays this schedule)")

            // The cluster: the user's, or a fresh local one.
            var dir = cluster
            var ownCluster = false
            if dir == nil {
                for attempt in 0..<3 {
                    let d = NSTemporaryDirectory() + "weft-check-\(getpid())-\(attempt)"
                    let port = 20_000 + Int(rng.next() % 1_000) * 10
                    let r = runSelf(me, ["cluster", "start", "--dir", d, "--participants", String(participants), "--base-port", String(port)])
                    if r.status == 0 {
                        dir = d
                        ownCluster = true
                        break
                    }
                    _ = runSelf(me, ["cluster", "stop", "--dir", d])
                    try? FileManager.default.removeItem(atPath: d)
                }
                guard dir != nil else { fail(WeftError(.unavailable, "could not start a local cluster"), json: json) }
                say("local cluster in \(dir!)")
            }
            let config: ClusterConfig
            do { config = try ClusterConfig.load(dir!) } catch { fail(error, json: json) }
            let cdir = config.clusterDirectory
            let expectedTotal = accounts * 1000

            // The workload, in its own process: its output is the history.
            let workloadOut = cdir + "/check-bank-\(getpid()).jsonl"
            _ = FileManager.default.createFile(atPath: workloadOut, contents: nil, attributes: [.posixPermissions: 0o600])
            let origin = wallNanos()
            // Keys of this run only: a cluster may hold earlier runs' accounts.
            let namespace = "check/bank-\(origin)/"
            var nemesis: [[String: Any]] = []
            func nemesisEvent(_ type: String, _ f: String, _ value: String) {
                nemesis.append(["type": type, "f": f, "process": "nemesis", "time": wallNanos() &- origin, "value": value])
            }
            let bank = Process()
            bank.executableURL = URL(fileURLWithPath: me)
            bank.arguments = ["debug", "bank", "--cluster", cdir, "--accounts", String(accounts), "--clients", String(clients),
                              "--duration", String(Double(durationMs) / 1000), "--resilient", "--jsonl", "--time-origin-ns", String(origin), "--namespace", namespace]
            bank.standardOutput = FileHandle(forWritingAtPath: workloadOut)!
            bank.standardError = FileHandle.nullDevice
            do { try bank.run() } catch { fail(WeftError(.unavailable, "cannot start the workload: \(error)"), json: json) }

            // Kills start once the workload has made its accounts.
            let setupDeadline = wallMillis() + 30_000
            while wallMillis() < setupDeadline {
                let r = runSelf(me, ["debug", "bank-check", "--cluster", cdir, "--namespace", namespace])
                if r.status == 0, r.stdout.contains("accounts \(accounts)\n") { break }
                if !bank.isRunning { break }
                usleep(100_000)
            }

            // The schedule: kill or pause a node, restart it, read a snapshot.
            let victims = config.nodes.filter { kill == "any" || $0.role.rawValue == kill }.map(\.id)
            let end = wallMillis() + durationMs
            var lastRestart = wallMillis()
            while wallMillis() + everyMs / 2 < end && !victims.isEmpty && kill != "none" {
                usleep(UInt32(min(everyMs / 2 + rng.next() % max(1, everyMs), 10_000) * 1000))
                let victim = victims[Int(rng.next() % UInt64(victims.count))]
                guard let pid = readPid(cdir + "/\(victim).pid"), processAlive(pid) else { continue }
                let role = victim == "coordinator" ? "coordinator" : "participant"
                if pausing {
                    nemesisEvent("info", "pause", victim)
                    Glibc.kill(pid, SIGSTOP)
                    usleep(UInt32(min(everyMs / 2, 10_000) * 1000))
                    Glibc.kill(pid, SIGCONT)
                    nemesisEvent("info", "resume", victim)
                    report.pauses[role, default: 0] += 1
                } else {
                    nemesisEvent("info", "kill", victim)
                    Glibc.kill(pid, SIGKILL)
                    for _ in 0..<500 where processAlive(pid) { usleep(10_000) }
                    report.kills[role, default: 0] += 1
                    let t0 = wallMillis()
                    let r = runSelf(me, ["cluster", "start", "--dir", cdir])
                    nemesisEvent("info", "restart", victim)
                    if r.status == 0 { report.recoveryMillis[role, default: []].append(Int(wallMillis() - t0)) } else {
                        report.violations.append("\(victim) did not restart: \(r.stderr.prefix(200))")
                    }
                }
                lastRestart = wallMillis()
                let snap = runSelf(me, ["debug", "bank-check", "--cluster", cdir, "--namespace", namespace])
                if snap.status == 0, let total = bankTotal(snap.stdout) {
                    report.snapshots += 1
                    if total != expectedTotal { report.violations.append("a snapshot after killing \(victim) holds total \(total), not \(expectedTotal)") }
                }
            }
            bank.waitUntilExit()
            _ = runSelf(me, ["cluster", "start", "--dir", cdir])
            lastRestart = max(lastRestart, wallMillis())

            // Nothing may stay in doubt.
            var settled = false
            while wallMillis() < lastRestart + settleMs {
                let r = runSelf(me, ["admin", "in-doubt", "--cluster", cdir])
                if r.status == 0 && r.stdout.contains("no in-doubt transactions") {
                    settled = true
                    break
                }
                usleep(200_000)
            }
            report.inDoubtResolvedMillis = settled ? Int(wallMillis() - lastRestart) : nil
            if !settled { report.violations.append("transactions still in doubt \(settleMs) ms after the last restart (weft admin in-doubt)") }

            // The final state against the history.
            let final = runSelf(me, ["debug", "bank-check", "--cluster", cdir, "--namespace", namespace])
            guard final.status == 0, let total = bankTotal(final.stdout) else {
                report.violations.append("the final state cannot be read: \(final.stderr.prefix(200))")
                finish(report, ownCluster: ownCluster, dir: cdir, me: me)
            }
            if total != expectedTotal { report.violations.append("final total \(total), not \(expectedTotal)") }
            let applied = Set(final.stdout.split(separator: "\n").compactMap { $0.hasPrefix("log ") ? String($0.dropFirst(4)) : nil })
            var attempted = Set<String>(), acked: [String] = [], aborted: [String] = [], unknown: [String] = []
            var events: [[String: Any]] = []
            for line in ((try? String(contentsOfFile: workloadOut, encoding: .utf8)) ?? "").split(separator: "\n") {
                guard let o = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
                    report.violations.append("the workload wrote a history line that is not JSON: \(line.prefix(120))")
                    continue
                }
                events.append(o)
                guard let txn = (o["txn"] as? NSNumber).map({ String($0.uint64Value) }) else { continue }
                switch o["type"] as? String {
                case "invoke": attempted.insert(txn)
                case "ok": acked.append(txn)
                case "fail":
                    // Only a conflict or an abort answered by the coordinator is a
                    // definite "not applied" after the commit was asked for.
                    let e = o["error"] as? String ?? ""
                    if e.hasPrefix("conflict") || e.hasPrefix("aborted") { aborted.append(txn) }
                case "info": unknown.append(txn)
                default: break
                }
            }
            report.commits = acked.count
            report.aborts = aborted.count
            report.unknowns = unknown.count
            for t in acked where !applied.contains(t) { report.violations.append("acknowledged transfer \(t) is not in the data") }
            for t in applied where !attempted.contains(t) { report.violations.append("transfer \(t) is in the data but was never attempted") }
            for t in aborted where applied.contains(t) { report.violations.append("transfer \(t) was reported aborted but is in the data") }
            for t in unknown {
                let s = runSelf(me, ["txn", "status", t, "--cluster", cdir])
                let committed = s.stdout.hasPrefix("committed")
                let answer = s.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
                if s.stdout.hasPrefix("pending") { report.violations.append("unknown outcome \(t) is still pending") }
                if committed { report.unknownCommitted += 1 }
                if committed != applied.contains(t) {
                    report.violations.append("unknown outcome \(t): txn status says \(answer) but the data says \(applied.contains(t) ? "applied" : "not applied")")
                }
                nemesis.append(["type": "resolution", "process": "checker", "time": wallNanos() &- origin, "txn": UInt64(t) ?? 0,
                                "committed": committed, "status": answer, "applied": applied.contains(t)])
            }
            if let path = history {
                // The workload's events and the kills, in time order (stable, so
                // each process's events keep their order).
                let merged = (events + nemesis).enumerated().sorted {
                    let (a, b) = (($0.element["time"] as? NSNumber)?.uint64Value ?? 0, ($1.element["time"] as? NSNumber)?.uint64Value ?? 0)
                    return a != b ? a < b : $0.offset < $1.offset
                }.map { jsonLine($0.element) }
                do {
                    try (merged.joined(separator: "\n") + "\n").write(toFile: path, atomically: true, encoding: .utf8)
                    report.historyPath = path
                } catch {
                    report.violations.append("cannot write the history to \(path): \(error.localizedDescription)")
                }
            }
            try? FileManager.default.removeItem(atPath: workloadOut)
            finish(report, ownCluster: ownCluster, dir: cdir, me: me)
        }

        func finish(_ report: CheckReport, ownCluster: Bool, dir: String, me: String) -> Never {
            if json { print(jsonLine(report.json)) } else { print(report.text) }
            if ownCluster {
                _ = runSelf(me, ["cluster", "stop", "--dir", dir])
                if report.violations.isEmpty { try? FileManager.default.removeItem(atPath: dir) } else { printErr("cluster directory kept for inspection: \(dir)") }
            }
            Glibc.exit(report.violations.isEmpty ? 0 : 1)
        }

        func say(_ s: String) { if !json { print(s) } }
    }
}

/// `weft check crash-points`: every 2PC crash point (`WEFT_CRASH_AT`,
/// docs/protocol.md) against a fresh local cluster. For each point the
/// victim (the coordinator, or participant-0) is restarted with the point
/// armed, a transaction that reaches it runs, the victim dies there by
/// SIGKILL, and it is restarted. Checked per point:
/// - the victim died at that point (its log says so);
/// - the transaction is all or nothing across participants;
/// - acknowledged ⇒ applied; definitely aborted ⇒ not applied; otherwise
///   `txn status` resolves it one way, agreeing with the data;
/// - nothing is in doubt `--settle` after the restart;
/// - the cluster then commits again, at a later timestamp than any before.
struct CrashPointsCheck: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "crash-points", abstract: "Kill a node at every 2PC crash point in turn; check atomicity, durability and recovery after each.")
    @Option(help: "Participants of the local cluster (at least 2).") var participants = 3
    @Option(help: "Only these points (comma-separated; default: all \(CrashPoints.all.count)).") var points: String?
    @Option(help: "Time allowed after each restart for in-doubt transactions to resolve.") var settle = "30s"
    @Flag(help: "Print one JSON object per point, then a summary object.") var json = false

    /// A point's victim and the transaction that reaches it.
    static func plan(_ point: String) -> (victim: String, kind: String) {
        let victim = point.hasPrefix("coordinator.") ? "coordinator" : "participant-0"
        if point.contains("-abort-") { return (victim, "abort") }
        if point.contains("-refusal-") { return (victim, "refusal") }
        return (victim, "commit")
    }

    func validate() throws {
        guard (2...16).contains(participants) else { throw ValidationError("--participants must be 2...16 (a two-phase commit needs two)") }
        guard let ms = parseMillis(settle), ms > 0 else { throw ValidationError("--settle must be a duration such as 30s") }
        for p in selected where !CrashPoints.all.contains(p) {
            throw ValidationError("unknown crash point '\(p)'; the points are: \(CrashPoints.all.joined(separator: ", "))")
        }
    }

    var selected: [String] {
        points.map { $0.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty } } ?? CrashPoints.all
    }

    func run() throws {
        let me = URL(fileURLWithPath: CommandLine.arguments[0]).standardizedFileURL.path
        let settleMs = parseMillis(settle)!
        var dir: String?
        for attempt in 0..<3 {
            let d = NSTemporaryDirectory() + "weft-crash-points-\(getpid())-\(attempt)"
            let port = 20_000 + Int((UInt64(getpid()) &* 7 &+ UInt64(attempt) &* 131) % 1_000) * 10
            if runSelf(me, ["cluster", "start", "--dir", d, "--participants", String(participants), "--base-port", String(port)]).status == 0 {
                dir = d
                break
            }
            _ = runSelf(me, ["cluster", "stop", "--dir", d])
            try? FileManager.default.removeItem(atPath: d)
        }
        guard let dir else { fail(WeftError(.unavailable, "could not start a local cluster"), json: json) }
        if !json { print("local cluster in \(dir); \(selected.count) crash points") }
        var lastTs: UInt64 = 0
        var failed = 0
        var results: [[String: Any]] = []
        for point in selected {
            let r = runPoint(point, dir: dir, me: me, settleMs: settleMs, lastTs: &lastTs)
            if !r.ok { failed += 1 }
            results.append(r.json)
            if json { print(jsonLine(r.json)) } else { print(r.line) }
        }
        _ = runSelf(me, ["cluster", "stop", "--dir", dir])
        if failed == 0 { try? FileManager.default.removeItem(atPath: dir) }
        if json {
            print(jsonLine(["points": results.count, "passed": results.count - failed, "failed": failed, "ok": failed == 0,
                            "kept_dir": failed == 0 ? NSNull() : dir]))
        } else {
            print(failed == 0 ? "OK: \(results.count) crash points passed" : "\(failed) of \(results.count) crash points FAILED; cluster directory kept: \(dir)")
        }
        Glibc.exit(failed == 0 ? 0 : 1)
    }

    struct PointResult {
        var point: String
        var victim: String
        var reached = false
        var outcome = "none"
        var txn: UInt64 = 0
        var checks: [String] = []
        var violations: [String] = []
        var recoveryMillis = 0
        var attempts = 0
        var ok: Bool { reached && violations.isEmpty }
        var line: String {
            let head = "\(ok ? "PASS" : "FAIL") \(point) (\(victim)): "
            if !violations.isEmpty { return head + violations.joined(separator: "; ") }
            return head + checks.joined(separator: "; ")
        }
        var json: [String: Any] {
            ["point": point, "victim": victim, "reached": reached, "outcome": outcome, "txn": txn, "transactions": attempts, "checked": checks,
             "violations": violations, "recovery_ms": recoveryMillis, "ok": ok]
        }
    }

    func runPoint(_ point: String, dir: String, me: String, settleMs: UInt64, lastTs: inout UInt64) -> PointResult {
        let (victim, kind) = Self.plan(point)
        var r = PointResult(point: point, victim: victim)
        let tag = point.replacingOccurrences(of: ".", with: "-")
        let log = dir + "/\(victim).log"
        // Restart the victim with the point armed.
        if let pid = readPid(dir + "/\(victim).pid"), processAlive(pid) {
            Glibc.kill(pid, SIGKILL)
            for _ in 0..<500 where processAlive(pid) { usleep(10_000) }
        }
        let logStart = (try? FileManager.default.attributesOfItem(atPath: log)[.size] as? Int) ?? 0
        let node = Process()
        node.executableURL = URL(fileURLWithPath: me)
        node.arguments = ["node", "--cluster", dir, "--id", victim]
        var env = ProcessInfo.processInfo.environment
        env["WEFT_CRASH_AT"] = point
        node.environment = env
        if let out = FileHandle(forWritingAtPath: log) {
            out.seekToEndOfFile()
            node.standardOutput = out
            node.standardError = out
        }
        node.standardInput = FileHandle.nullDevice
        do { try node.run() } catch {
            r.violations.append("cannot start \(victim): \(error)")
            return r
        }
        // Transactions that reach the point, one after another while the
        // victim lives (a restarting node refuses or aborts at first, and a
        // transaction can end without reaching the point): each with its own
        // keys (`check/TAG-N/`), each checked below.
        struct Attempt {
            var tag: String
            var keys: [String] = []
            var answer: [Substring] = []
        }
        var attempts: [Attempt] = []
        let deadline = wallMillis() + 30_000
        while node.isRunning && wallMillis() < deadline {
            var a = Attempt(tag: "\(tag)-\(attempts.count + 1)")
            let w = runSelf(me, ["debug", "crash-txn", "--cluster", dir, "--tag", a.tag, "--kind", kind, "--victim", "0"])
            let lines = w.stdout.split(separator: "\n")
            a.keys = lines.first { $0.hasPrefix("keys ") }.map { $0.split(separator: " ").dropFirst().map(String.init) } ?? []
            if let line = lines.last(where: { ["ack", "abort", "unknown", "fail"].contains($0.split(separator: " ").first ?? "") }) {
                a.answer = line.split(separator: " ", maxSplits: 2)
            }
            attempts.append(a)
            // The point may come just after the answer (an END record, a GC round).
            for _ in 0..<25 where node.isRunning { usleep(20_000) }
        }
        let logText = (try? String(contentsOfFile: log, encoding: .utf8)).map { String($0.utf8.dropFirst(logStart)) ?? "" } ?? ""
        if node.isRunning {
            node.terminate()
            node.waitUntilExit()
            r.violations.append("the victim did not reach \(point) within 30 s (\(attempts.count) transactions)")
        } else {
            node.waitUntilExit()
            r.reached = node.terminationReason == .uncaughtSignal && logText.contains("crash point \(point) reached")
            if !r.reached { r.violations.append("the victim exited (status \(node.terminationStatus)) without reaching \(point)") }
        }
        r.attempts = attempts.count
        if let last = attempts.last, last.answer.count >= 2 {
            r.outcome = String(last.answer[0])
            r.txn = UInt64(last.answer[1]) ?? 0
        }
        if r.reached && r.txn == 0 { r.checks.append("reached before the transaction began (recovering an earlier one)") }
        // Restart the victim; nothing may stay in doubt.
        let t0 = wallMillis()
        let start = runSelf(me, ["cluster", "start", "--dir", dir])
        if start.status != 0 { r.violations.append("\(victim) did not restart: \(start.stderr.prefix(200))") }
        r.recoveryMillis = Int(wallMillis() - t0)
        var settled = false
        while wallMillis() < t0 + settleMs {
            let d = runSelf(me, ["admin", "in-doubt", "--cluster", dir])
            if d.status == 0 && d.stdout.contains("no in-doubt transactions") {
                settled = true
                break
            }
            usleep(200_000)
        }
        if settled { r.checks.append("nothing in doubt \(wallMillis() - t0) ms after the restart") } else {
            r.violations.append("transactions still in doubt \(settleMs) ms after the restart (weft admin in-doubt)")
        }
        // Each transaction: all or nothing, and consistent with what its
        // client was told.
        var values: [String: String] = [:]
        let scan = runSelf(me, ["kv", "scan", "--prefix", "check/\(tag)-", "--limit", "10000", "--cluster", dir])
        if scan.status != 0 { r.violations.append("cannot read the keys: \(scan.stderr.prefix(200))") }
        for line in scan.stdout.split(separator: "\n") {
            let f = line.split(separator: "\t", maxSplits: 1).map(String.init)
            if f.count == 2 { values[f[0]] = f[1] }
        }
        var said: [String: Int] = [:]
        for a in attempts where !a.keys.isEmpty {
            let txn = a.answer.count >= 2 ? String(a.answer[1]) : "?"
            let present = a.keys.filter { values[$0] == a.tag }
            let applied = present.count == a.keys.count
            if !present.isEmpty && !applied {
                r.violations.append("partially applied: \(present.count) of \(a.keys.count) keys of transaction \(txn) hold its value")
                continue
            }
            switch a.answer.first.map(String.init) ?? "none" {
            case "ack":
                if let ts = a.answer.count > 2 ? UInt64(a.answer[2]) : nil { lastTs = max(lastTs, ts) }
                if applied { said["acknowledged and kept", default: 0] += 1 } else { r.violations.append("transaction \(txn) was acknowledged but is not in the data") }
            case "abort":
                if !present.isEmpty { r.violations.append("transaction \(txn) was reported aborted but is in the data") } else { said["aborted and absent", default: 0] += 1 }
            default:
                guard a.answer.count >= 2, UInt64(a.answer[1]) ?? 0 != 0 else {
                    // No transaction began: nothing may be there.
                    if !present.isEmpty { r.violations.append("keys of \(a.tag) hold a value although no transaction began") } else { said["not begun and absent", default: 0] += 1 }
                    continue
                }
                let s = runSelf(me, ["txn", "status", txn, "--cluster", dir])
                let status = s.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
                if status.hasPrefix("pending") { r.violations.append("transaction \(txn) is still pending") }
                if status.hasPrefix("committed") != applied {
                    r.violations.append("transaction \(txn): txn status says '\(status)' but the data says \(applied ? "applied" : "not applied")")
                } else {
                    said["outcome \(a.answer[0]): txn status '\(status.split(separator: " ").first ?? "")' agrees with the data (\(applied ? "applied" : "absent"))", default: 0] += 1
                }
            }
        }
        for (what, n) in said.sorted(by: { $0.key < $1.key }) { r.checks.append(n == 1 ? what : "\(what) ×\(n)") }
        // The cluster commits again, later than everything before.
        var after = ""
        for _ in 0..<50 {
            let w = runSelf(me, ["debug", "crash-txn", "--cluster", dir, "--tag", tag + "-after", "--kind", "commit"])
            if let a = w.stdout.split(separator: "\n").first(where: { $0.hasPrefix("ack ") }) {
                after = String(a)
                break
            }
            usleep(200_000)
        }
        let f = after.split(separator: " ")
        if f.count == 3, let ts = UInt64(f[2]) {
            if ts <= lastTs { r.violations.append("a commit after recovery got timestamp \(ts), not after \(lastTs)") } else {
                r.checks.append("a new transaction commits at a later timestamp")
            }
            lastTs = ts
        } else {
            r.violations.append("no transaction could commit after the restart")
        }
        return r
    }
}

/// What `weft check bank` found.
struct CheckReport {
    let seed: UInt64
    var kills: [String: Int] = [:]
    var pauses: [String: Int] = [:]
    var recoveryMillis: [String: [Int]] = [:]
    var snapshots = 0
    var commits = 0
    var aborts = 0
    var unknowns = 0
    var unknownCommitted = 0
    var inDoubtResolvedMillis: Int?
    var violations: [String] = []
    var historyPath: String?

    init(seed: UInt64) { self.seed = seed }

    static func quantile(_ xs: [Int], _ q: Double) -> Int? {
        guard !xs.isEmpty else { return nil }
        let s = xs.sorted()
        return s[min(s.count - 1, Int(Double(s.count - 1) * q))]
    }

    var json: [String: Any] {
        var recovery: [String: Any] = [:]
        for (role, xs) in recoveryMillis {
            recovery[role] = ["count": xs.count, "min_ms": xs.min() ?? 0, "p50_ms": Self.quantile(xs, 0.5) ?? 0, "p90_ms": Self.quantile(xs, 0.9) ?? 0,
                              "p99_ms": Self.quantile(xs, 0.99) ?? 0, "max_ms": xs.max() ?? 0, "samples_ms": xs]
        }
        return ["seed": seed, "kills": kills, "pauses": pauses, "recovery": recovery, "snapshots_checked": snapshots,
                "commits": commits, "aborts": aborts, "unknown": unknowns, "unknown_committed": unknownCommitted,
                "in_doubt_resolved_ms": inDoubtResolvedMillis ?? -1, "violations": violations, "ok": violations.isEmpty,
                "history": historyPath ?? NSNull()]
    }

    var text: String {
        var lines: [String] = []
        lines.append("kills: \(kills.isEmpty ? "none" : kills.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))"
                     + (pauses.isEmpty ? "" : "; pauses: " + pauses.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")))
        for (role, xs) in recoveryMillis.sorted(by: { $0.key < $1.key }) {
            lines.append("recovery of a killed \(role) (restart until it answers): p50 \(Self.quantile(xs, 0.5) ?? 0) ms, p90 \(Self.quantile(xs, 0.9) ?? 0) ms, max \(xs.max() ?? 0) ms over \(xs.count)")
        }
        lines.append("transfers: \(commits) committed, \(aborts) aborted, \(unknowns) outcome unknown (\(unknownCommitted) of them committed); \(snapshots) snapshots checked during the run")
        lines.append("in doubt: " + (inDoubtResolvedMillis.map { "none \($0) ms after the last restart" } ?? "NOT resolved"))
        if let historyPath { lines.append("history: \(historyPath) (JSON lines; see docs/cli.md)") }
        if violations.isEmpty {
            lines.append("OK: totals conserved, every acknowledged transfer kept, every unknown outcome resolved consistently (seed \(seed))")
        } else {
            lines.append("\(violations.count) VIOLATIONS (seed \(seed)):")
            lines += violations.prefix(50).map { "  " + $0 }
        }
        return lines.joined(separator: "\n")
    }
}

/// `60s`, `500ms`, `2m` or plain seconds, in milliseconds.
func parseMillis(_ s: String) -> UInt64? {
    let t = s.trimmingCharacters(in: .whitespaces)
    if t.hasSuffix("ms"), let v = Double(t.dropLast(2)) { return v >= 0 ? UInt64(v) : nil }
    if t.hasSuffix("s"), let v = Double(t.dropLast()) { return v >= 0 ? UInt64(v * 1000) : nil }
    if t.hasSuffix("m"), let v = Double(t.dropLast()) { return v >= 0 ? UInt64(v * 60_000) : nil }
    if let v = Double(t) { return v >= 0 ? UInt64(v * 1000) : nil }
    return nil
}

func bankTotal(_ out: String) -> Int? {
    out.split(separator: "\n").first { $0.hasPrefix("total ") }.flatMap { Int($0.dropFirst(6)) }
}

/// SplitMix64: the kill schedule's generator.
struct CheckRandom {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

struct SelfRun {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// Runs this binary with `args` and waits.
func runSelf(_ me: String, _ args: [String]) -> SelfRun {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: me)
    p.arguments = args
    var env = ProcessInfo.processInfo.environment
    env["WEFT_CRASH_AT"] = nil
    env["WEFT_STOP_AT"] = nil
    p.environment = env
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    do { try p.run() } catch { return SelfRun(status: -1, stdout: "", stderr: "\(error)") }
    let o = out.fileHandleForReading.readDataToEndOfFile(), e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return SelfRun(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: e, as: UTF8.self))
}
