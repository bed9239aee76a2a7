import ArgumentParser
import Foundation
import WeftCore
import WeftRuntime

/// `weft check`: the crash-recovery test, shipped to users.
struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Test a cluster's crash recovery: transfers under SIGKILL and SIGSTOP, with the invariants checked.",
        subcommands: [Bank.self]
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
            let history = cdir + "/check-bank-\(getpid()).out"
            _ = FileManager.default.createFile(atPath: history, contents: nil)
            let bank = Process()
            bank.executableURL = URL(fileURLWithPath: me)
            bank.arguments = ["debug", "bank", "--cluster", cdir, "--accounts", String(accounts), "--clients", String(clients),
                              "--duration", String(Double(durationMs) / 1000), "--resilient"]
            bank.standardOutput = FileHandle(forWritingAtPath: history)!
            bank.standardError = FileHandle.nullDevice
            do { try bank.run() } catch { fail(WeftError(.unavailable, "cannot start the workload: \(error)"), json: json) }

            // Kills start once the workload has made its accounts.
            let setupDeadline = wallMillis() + 30_000
            while wallMillis() < setupDeadline {
                let r = runSelf(me, ["debug", "bank-check", "--cluster", cdir])
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
                    Glibc.kill(pid, SIGSTOP)
                    usleep(UInt32(min(everyMs / 2, 10_000) * 1000))
                    Glibc.kill(pid, SIGCONT)
                    report.pauses[role, default: 0] += 1
                } else {
                    Glibc.kill(pid, SIGKILL)
                    for _ in 0..<500 where processAlive(pid) { usleep(10_000) }
                    report.kills[role, default: 0] += 1
                    let t0 = wallMillis()
                    let r = runSelf(me, ["cluster", "start", "--dir", cdir])
                    if r.status == 0 { report.recoveryMillis[role, default: []].append(Int(wallMillis() - t0)) } else {
                        report.violations.append("\(victim) did not restart: \(r.stderr.prefix(200))")
                    }
                }
                lastRestart = wallMillis()
                let snap = runSelf(me, ["debug", "bank-check", "--cluster", cdir])
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
            let final = runSelf(me, ["debug", "bank-check", "--cluster", cdir])
            guard final.status == 0, let total = bankTotal(final.stdout) else {
                report.violations.append("the final state cannot be read: \(final.stderr.prefix(200))")
                finish(report, ownCluster: ownCluster, dir: cdir, me: me)
            }
            if total != expectedTotal { report.violations.append("final total \(total), not \(expectedTotal)") }
            let applied = Set(final.stdout.split(separator: "\n").compactMap { $0.hasPrefix("log ") ? String($0.dropFirst(4)) : nil })
            var attempted = Set<String>(), acked: [String] = [], aborted: [String] = [], unknown: [String] = []
            for line in ((try? String(contentsOfFile: history, encoding: .utf8)) ?? "").split(separator: "\n") {
                let f = line.split(separator: " ")
                guard f.count >= 2 else { continue }
                switch f[0] {
                case "attempt": attempted.insert(String(f[1]))
                case "ack": acked.append(String(f[1]))
                case "abort": aborted.append(String(f[1]))
                case "unknown": unknown.append(String(f[1]))
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
                if s.stdout.hasPrefix("pending") { report.violations.append("unknown outcome \(t) is still pending") }
                if committed { report.unknownCommitted += 1 }
                if committed != applied.contains(t) {
                    report.violations.append("unknown outcome \(t): txn status says \(s.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) but the data says \(applied.contains(t) ? "applied" : "not applied")")
                }
            }
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

    init(seed: UInt64) { self.seed = seed }

    static func quantile(_ xs: [Int], _ q: Double) -> Int? {
        guard !xs.isEmpty else { return nil }
        let s = xs.sorted()
        return s[min(s.count - 1, Int(Double(s.count - 1) * q))]
    }

    var json: [String: Any] {
        var recovery: [String: Any] = [:]
        for (role, xs) in recoveryMillis { recovery[role] = ["count": xs.count, "p50_ms": Self.quantile(xs, 0.5) ?? 0, "max_ms": xs.max() ?? 0] }
        return ["seed": seed, "kills": kills, "pauses": pauses, "recovery": recovery, "snapshots_checked": snapshots,
                "commits": commits, "aborts": aborts, "unknown": unknowns, "unknown_committed": unknownCommitted,
                "in_doubt_resolved_ms": inDoubtResolvedMillis ?? -1, "violations": violations, "ok": violations.isEmpty]
    }

    var text: String {
        var lines: [String] = []
        lines.append("kills: \(kills.isEmpty ? "none" : kills.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))"
                     + (pauses.isEmpty ? "" : "; pauses: " + pauses.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")))
        for (role, xs) in recoveryMillis.sorted(by: { $0.key < $1.key }) {
            lines.append("recovery of a killed \(role) (restart until it answers): p50 \(Self.quantile(xs, 0.5) ?? 0) ms, max \(xs.max() ?? 0) ms over \(xs.count)")
        }
        lines.append("transfers: \(commits) committed, \(aborts) aborted, \(unknowns) outcome unknown (\(unknownCommitted) of them committed); \(snapshots) snapshots checked during the run")
        lines.append("in doubt: " + (inDoubtResolvedMillis.map { "none \($0) ms after the last restart" } ?? "NOT resolved"))
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
