import Foundation
import XCTest

/// Dataflow jobs on a cluster of real `weft node` processes: the CLI is the
/// driver, the participants' executors run the tasks. Nodes and the driver
/// are killed at named points (`WEFT_CRASH_AT`) and with SIGSTOP; every
/// case checks the answer against an undisturbed run, what was recomputed,
/// that a failed job left no output table, and that nothing is in doubt.
final class DistributedJobTests: XCTestCase {
    func json(_ r: RunResult, file: StaticString = #filePath, line: UInt = #line) -> [String: Any] {
        let last = r.stdout.split(separator: "\n").last.map(String.init) ?? ""
        guard let o = try? JSONSerialization.jsonObject(with: Data(last.utf8)) as? [String: Any] else {
            XCTFail("not JSON (exit \(r.status)): \(r.stdout) \(r.stderr)", file: file, line: line)
            return [:]
        }
        return o
    }

    /// The table's rows, sorted, as `key<TAB>value` lines.
    func export(_ c: TestCluster, _ table: String) throws -> [String] {
        let r = try c.weft(["table", "export", table, "--format", "jsonl"])
        XCTAssertEqual(r.status, 0, r.stderr)
        return r.stdout.split(separator: "\n").map(String.init).sorted()
    }

    func write(_ path: String, _ lines: [String]) {
        FileManager.default.createFile(atPath: path, contents: Data((lines.joined(separator: "\n") + "\n").utf8))
    }

    /// Tables for every built-in job, in the cluster's directory.
    func loadInputs(_ c: TestCluster) throws {
        var rng = SeededGenerator(seed: 7)
        let words = ["alpha", "beta", "gamma", "delta"] + (0..<400).map { "w\($0)" }
        // Big enough for blocks (1 MiB) on every participant.
        write(c.dir + "/words.txt", (0..<100_000).map { _ in (0..<8).map { _ in words.randomElement(using: &rng)! }.joined(separator: " ") })
        write(c.dir + "/graph.txt", (0..<300_000).map { _ in "\(Int.random(in: 0..<5000, using: &rng)) \(Int.random(in: 0..<5000, using: &rng))" })
        write(c.dir + "/logs.txt", (0..<120_000).map { i in
            i % 3 == 0 ? "ERROR\tmod\(i % 7)\tfailed \(words.randomElement(using: &rng)!) at \(i)" : "INFO\tmod\(i % 7)\tserved request \(i)"
        })
        write(c.dir + "/pts.txt", (0..<3000).map { i in "\(Double(i % 3) * 5 + Double.random(in: -1...1, using: &rng)) \(Double(i % 2) * 5 + Double.random(in: -1...1, using: &rng))" })
        write(c.dir + "/lr.txt", (0..<3000).map { _ in
            let (a, b) = (Double.random(in: 0...1, using: &rng), Double.random(in: 0...1, using: &rng))
            return "\(a + b > 1 ? 1 : 0) \(a) \(b)"
        })
        write(c.dir + "/l.tsv", (0..<2000).map { "k\($0 * 2)\tL\($0)" })
        write(c.dir + "/r.tsv", (0..<2000).map { "k\($0 * 3)\tR\($0)" })
        write(c.dir + "/nums.tsv", (0..<3000).map { "n\($0)\t\(Int.random(in: 0..<100_000, using: &rng))" })
        for (t, f, extra) in [("corpus", "words.txt", ["--replicas", "2"]), ("logs", "logs.txt", ["--replicas", "2"]), ("graph", "graph.txt", ["--replicas", "2"]), ("pts", "pts.txt", []),
                              ("lr", "lr.txt", []), ("l", "l.tsv", ["--format", "kv"]), ("r", "r.tsv", ["--format", "kv"]),
                              ("nums", "nums.tsv", ["--format", "kv"])] {
            let r = try c.weft(["table", "load", t, c.dir + "/" + f] + extra)
            XCTAssertEqual(r.status, 0, "\(t): \(r.stderr)")
        }
    }

    static let jobs: [(name: String, args: [String])] = [
        ("wordcount", ["--input", "corpus"]),
        ("pagerank", ["--input", "graph", "--iterations", "10"]),
        ("kmeans", ["--input", "pts", "--k", "3"]),
        ("logreg", ["--input", "lr"]),
        ("logmining", ["--input", "logs", "--words", "alpha,w7"]),
        ("join", ["--input", "l", "--input2", "r"]),
        ("sort", ["--input", "nums"]),
    ]

    func testEveryJobOnExecutorsGivesTheLocalAnswer() throws {
        let c = try TestCluster()
        defer { c.stop(keep: (testRun?.failureCount ?? 0) > 0) }
        try loadInputs(c)
        for (name, args) in Self.jobs {
            // The same partition counts on both sides (floating-point sums
            // in the same order): --threads sets the default parallelism.
            let dist = try c.weft(["job", "run", name] + args + ["--output", "\(name)_dist", "--json", "--threads", "6"])
            XCTAssertEqual(dist.status, 0, "\(name): \(dist.stderr)")
            let o = json(dist)
            XCTAssertEqual(o["executors"] as? String, "cluster", name)
            let byExecutor = o["tasks_by_executor"] as? [String: Int] ?? [:]
            XCTAssertEqual(byExecutor.values.reduce(0, +), o["tasks"] as? Int, "\(name): every task ran on an executor")
            let local = try c.weft(["job", "run", name] + args + ["--output", "\(name)_local", "--local", "--threads", "6"])
            XCTAssertEqual(local.status, 0, "\(name): \(local.stderr)")
            XCTAssertEqual(try export(c, "\(name)_dist"), try export(c, "\(name)_local"), "\(name): executors and the driver alone disagree")
            // The executors wrote the output, partition by partition; the
            // driver alone wrote the local run's.
            let list = try c.weft(["table", "list", "--json"]).stdout.split(separator: "\n")
                .compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            XCTAssertEqual(list.first { $0["table"] as? String == "\(name)_dist" }?["written_by"] as? String, "executors", name)
            XCTAssertEqual(list.first { $0["table"] as? String == "\(name)_local" }?["written_by"] as? String, "one writer", name)
            XCTAssertEqual(list.first { $0["table"] as? String == "\(name)_dist" }?["rows"] as? Int, o["output_rows"] as? Int, name)
            if name == "wordcount" || name == "pagerank" {
                XCTAssertEqual(byExecutor.count, 3, "\(name) ran on every participant: \(byExecutor)")
                XCTAssertGreaterThan(o["node_local_tasks"] as? Int ?? 0, 0, name)
            }
        }
    }

    /// Runs `args` in the background while `during` runs; returns the job's result.
    func runDuring(_ c: TestCluster, _ args: [String], env: [String: String] = [:], _ during: () throws -> Void) throws -> RunResult {
        final class Slot: @unchecked Sendable { var result: RunResult? }
        let slot = Slot()
        let done = DispatchSemaphore(value: 0)
        let full = args + ["--cluster", c.dir]
        let t = Thread {
            slot.result = try? runWeft(full, env: env)
            done.signal()
        }
        t.start()
        try during()
        done.wait()
        return try XCTUnwrap(slot.result)
    }

    func waitDead(_ c: TestCluster, _ id: String, pid: Int32?, seconds: Double = 60) -> Bool {
        let deadline = Date(timeIntervalSinceNow: seconds)
        while Date() < deadline {
            if let pid, !processAlive(pid) { return true }
            usleep(20_000)
        }
        return false
    }

    /// A participant dies at a named point of a job and is restarted; the
    /// job gives the undisturbed answer, says which node it lost, and
    /// recomputes only what that node held.
    func testParticipantKilledMidJobOnlyItsPartitionsAreRecomputed() throws {
        let c = try TestCluster()
        defer { c.stop(keep: (testRun?.failureCount ?? 0) > 0) }
        try loadInputs(c)
        let cases: [(job: String, args: [String], victim: String, point: String)] = [
            // PageRank, 10 iterations: killed in iteration 5 (shuffles 1
            // and 2 build the graph; iteration i is shuffle 2 + i).
            ("pagerank", ["--input", "graph", "--iterations", "10"], "participant-2", "executor.map-task-7"),
            ("wordcount", ["--input", "corpus"], "participant-1", "executor.map-task-1"),
            ("wordcount", ["--input", "corpus"], "participant-0", "executor.fetch-1"),
            ("pagerank", ["--input", "graph", "--iterations", "10"], "participant-1", "executor.result-task-0"),
            // Killed in the second word's count: the error messages it
            // held are read back from their reliable replicas.
            ("logmining", ["--input", "logs", "--words", "alpha,w7,w9"], "participant-2", "executor.result-task-1"),
            // The same PageRank kill with the graph and every iteration's
            // ranks persisted reliably: the lost share is read back from
            // replicas, not recomputed back to the first iteration.
            ("pagerank", ["--input", "graph", "--iterations", "10", "--reliable", "2"], "participant-2", "executor.map-task-7"),
        ]
        var lineageRecomputed: Int?
        for (i, k) in cases.enumerated() {
            let ref = try c.weft(["job", "run", k.job] + k.args + ["--output", "ref\(i)", "--json"])
            XCTAssertEqual(ref.status, 0, ref.stderr)
            let refTasks = (json(ref)["tasks_by_executor"] as? [String: Int] ?? [:]).values.reduce(0, +)
            c.kill9(k.victim)
            try c.start(k.victim, env: ["WEFT_CRASH_AT": k.point])
            let armed = c.pid(k.victim)
            let r = try runDuring(c, ["job", "run", k.job] + k.args + ["--output", "out\(i)", "--json"]) {
                XCTAssertTrue(waitDead(c, k.victim, pid: armed), "\(k.point): the victim never reached its crash point")
                try c.start(k.victim)
            }
            XCTAssertEqual(r.status, 0, "\(k.point): \(r.stdout) \(r.stderr)")
            let o = json(r)
            XCTAssertEqual(o["executors_lost"] as? [String], [k.victim], k.point)
            XCTAssertEqual(try export(c, "out\(i)"), try export(c, "ref\(i)"), "\(k.point): a different answer after the loss")
            // Something ran again, but far from the whole job.
            let tasks = (o["tasks_by_executor"] as? [String: Int] ?? [:]).values.reduce(0, +)
            XCTAssertGreaterThan(tasks, refTasks, "\(k.point): the lost node's tasks ran again")
            XCTAssertLessThan(tasks, refTasks * 2, "\(k.point): only what was lost is recomputed, not the whole job")
            // A node killed before it computed anything leaves nothing to
            // recompute; one killed later does.
            let recomputed = o["recomputed_partitions"] as? Int ?? -1
            if k.job == "pagerank" && k.point == "executor.map-task-7" && !k.args.contains("--reliable") { lineageRecomputed = recomputed }
            if k.args.contains("--reliable") {
                XCTAssertGreaterThan(o["replica_reads"] as? Int ?? 0, 0, "the lost share of the graph and ranks is read from replicas")
                XCTAssertLessThan(recomputed, lineageRecomputed ?? 0, "reliable ranks recompute less than lineage back to the first iteration")
            } else if k.job == "logmining" {
                XCTAssertGreaterThan(o["replica_reads"] as? Int ?? 0, 0, "reliable partitions are read from a replica")
                XCTAssertEqual(recomputed, 0, "reliably persisted partitions are not recomputed")
            } else if k.point == "executor.map-task-1" { XCTAssertGreaterThanOrEqual(recomputed, 0) } else {
                XCTAssertGreaterThan(recomputed, 0, "\(k.point): the lost node's partitions were recomputed")
            }
            XCTAssertTrue(try c.waitNoInDoubt(), k.point)
        }
    }

    /// The driver dies: no output table, nothing in doubt, and every
    /// executor drops the job within its lease.
    func testDriverKilledLeavesNoOutputAndExecutorsForgetTheJob() throws {
        let c = try TestCluster()
        defer { c.stop(keep: (testRun?.failureCount ?? 0) > 0) }
        try loadInputs(c)
        for (i, point) in ["driver.stage-5", "table.before-catalog-commit"].enumerated() {
            let r = try c.weft(["job", "run", "pagerank", "--input", "graph", "--iterations", "10", "--output", "never\(i)"],
                               env: ["WEFT_CRASH_AT": point])
            XCTAssertTrue(r.signaled || r.status != 0, "\(point): the driver should have died")
            XCTAssertTrue(r.stderr.contains("crash point \(point)"), r.stderr)
            let info = try c.weft(["table", "export", "never\(i)"])
            XCTAssertNotEqual(info.status, 0, "\(point): a killed job left an output table")
            XCTAssertTrue(try c.waitNoInDoubt(), point)
        }
        // Every executor that ran tasks drops the jobs once their leases end.
        let deadline = Date(timeIntervalSinceNow: 30)
        var dropped = 0
        while Date() < deadline {
            dropped = ["participant-0", "participant-1", "participant-2"].filter { id in
                let log = (try? String(contentsOfFile: c.dir + "/\(id).log", encoding: .utf8)) ?? ""
                return log.components(separatedBy: "dropped job").count - 1 >= 2
            }.count
            if dropped == 3 { break }
            usleep(200_000)
        }
        XCTAssertEqual(dropped, 3, "executors still hold the killed drivers' jobs")
        // The next job runs as if nothing had happened.
        let after = try c.weft(["job", "run", "wordcount", "--input", "corpus", "--json"])
        XCTAssertEqual(after.status, 0, after.stderr)
    }

    /// A node stopped with SIGSTOP (alive but silent): the driver declares
    /// it lost after its heartbeat timeout and the job finishes elsewhere.
    func testStoppedNodeDoesNotStallTheJob() throws {
        let c = try TestCluster()
        defer { c.stop(keep: (testRun?.failureCount ?? 0) > 0) }
        try loadInputs(c)
        let ref = try c.weft(["job", "run", "wordcount", "--input", "corpus", "--output", "ref"])
        XCTAssertEqual(ref.status, 0, ref.stderr)
        c.kill9("participant-1")
        try c.start("participant-1", env: ["WEFT_STOP_AT": "executor.map-task-1"])
        let victim = try XCTUnwrap(c.pid("participant-1"))
        let started = Date()
        let r = try runDuring(c, ["job", "run", "wordcount", "--input", "corpus", "--output", "out", "--json"]) {
            // Stopped by itself in its first map task; left stopped longer
            // than the heartbeat timeout (3 s), then woken, as the output's
            // commit needs every participant.
            let deadline = Date(timeIntervalSinceNow: 30)
            while Date() < deadline && !isStopped(victim) { usleep(20_000) }
            XCTAssertTrue(isStopped(victim), "the node never reached its stop point")
            usleep(6_000_000)
            kill(victim, SIGCONT)
        }
        let seconds = Date().timeIntervalSince(started)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(json(r)["executors_lost"] as? [String], ["participant-1"], "the silent node was declared lost")
        XCTAssertEqual(try export(c, "out"), try export(c, "ref"))
        XCTAssertLessThan(seconds, 60)
    }

    /// A node stopped in its output write task: its attempt is run again
    /// elsewhere, and when the node wakes its stale attempt writes its
    /// blocks late. Only the winners' blocks remain in the store: a late
    /// write is fenced by the flip, an earlier one deleted after it.
    func testLosingOutputAttemptsLeaveNoBlocks() throws {
        let c = try TestCluster()
        defer { c.stop(keep: (testRun?.failureCount ?? 0) > 0) }
        try loadInputs(c)
        let ref = try c.weft(["job", "run", "wordcount", "--input", "corpus", "--output", "ref"])
        XCTAssertEqual(ref.status, 0, ref.stderr)
        c.kill9("participant-1")
        // Stopped with its partition computed, about to write it.
        try c.start("participant-1", env: ["WEFT_STOP_AT": "executor.output-write"])
        let victim = try XCTUnwrap(c.pid("participant-1"))
        let r = try runDuring(c, ["job", "run", "wordcount", "--input", "corpus", "--output", "spec", "--json"]) {
            let deadline = Date(timeIntervalSinceNow: 30)
            while Date() < deadline && !isStopped(victim) { usleep(20_000) }
            XCTAssertTrue(isStopped(victim), "the node never reached its stop point")
            // Past the heartbeat timeout: its result task runs elsewhere.
            usleep(5_000_000)
            kill(victim, SIGCONT)
        }
        XCTAssertEqual(r.status, 0, r.stderr)
        let o = json(r)
        XCTAssertEqual(o["executors_lost"] as? [String], ["participant-1"])
        XCTAssertEqual(try export(c, "spec"), try export(c, "ref"))
        print("losing attempts: \(o["loser_blocks_deleted"] ?? "?") blocks deleted after the flip; tasks by executor \(o["tasks_by_executor"] ?? "?")")
        // The stale attempt has woken; give it time to try its writes.
        usleep(3_000_000)
        let list = try c.weft(["table", "list", "--json"])
        XCTAssertEqual(list.status, 0, list.stderr)
        let entry = list.stdout.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            .first { $0["table"] as? String == "spec" }
        let blocks = try XCTUnwrap(entry?["blocks"] as? Int, list.stdout)
        let scan = try c.weft(["kv", "scan", "--prefix", "b/t:spec@", "--limit", "100000", "--json"])
        XCTAssertEqual(scan.status, 0, scan.stderr)
        let stored = scan.stdout.split(separator: "\n").count
        XCTAssertEqual(stored, blocks, "block keys in the store vs the catalog's blocks (losing attempts' blocks left behind); deleted \(o["loser_blocks_deleted"] ?? "?")")
        // The stale attempt was stopped one way or another: killed by the
        // driver once another attempt won, its blocks deleted after the
        // flip, or fenced by it (its node logs the kill and the fence).
        let log = (try? String(contentsOfFile: c.dir + "/participant-1.log", encoding: .utf8)) ?? ""
        XCTAssertTrue((o["loser_blocks_deleted"] as? Int ?? 0) > 0 || log.contains("is no longer being written") || log.contains("killed: another attempt"),
                      "the stale attempt was neither killed, swept nor fenced:\n\(log.suffix(2000))")
        XCTAssertGreaterThan(o["killed_tasks"] as? Int ?? 0, 0, "the driver killed the stale attempts once their tasks were won")
        XCTAssertTrue(try c.waitNoInDoubt())
    }
}

/// True if `pid` is stopped (SIGSTOP): state T in /proc.
func isStopped(_ pid: Int32) -> Bool {
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") else { return false }
    return stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).first == "T"
}

/// A program's own job (Examples/WordLengths): its binary serves as the
/// participants and as the driver. A node running plain `weft` (which does
/// not know the job) is named before any task runs.
final class UserJobTests: XCTestCase {
    var exampleBinary: String { (weftBinary as NSString).deletingLastPathComponent + "/weft-example-wordlengths" }

    func startExample(_ c: TestCluster, _ id: String) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exampleBinary)
        p.arguments = ["node", "--cluster", c.dir, "--id", id]
        let log = FileHandle(forWritingAtPath: c.dir + "/\(id).log") ?? FileHandle.standardError
        log.seekToEndOfFile()
        p.standardOutput = log
        p.standardError = log
        try p.run()
        let port = c.basePort + (c.ids.firstIndex(of: id) ?? 0)
        let deadline = Date(timeIntervalSinceNow: 10)
        while Date() < deadline && !pingNode(port: port, clusterDir: c.dir).contains("\"serving\"") { usleep(20_000) }
        return p
    }

    func runExample(_ c: TestCluster, _ args: [String]) throws -> RunResult {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exampleBinary)
        p.arguments = args + ["--cluster", c.dir]
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let o = out.fileHandleForReading.readDataToEndOfFile(), e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return RunResult(status: p.terminationStatus, signaled: false, stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: e, as: UTF8.self))
    }

    func testProgramsOwnJobRunsOnItsOwnNodes() throws {
        guard FileManager.default.isExecutableFile(atPath: exampleBinary) else {
            throw WeftBinaryMissing(path: exampleBinary)
        }
        let c = try TestCluster()
        defer { c.stop(keep: (testRun?.failureCount ?? 0) > 0) }
        var rng = SeededGenerator(seed: 11)
        let words = (0..<300).map { i in String(repeating: "x", count: 1 + i % 17) + "\(i)" }
        let lines = (0..<60_000).map { _ in (0..<6).map { _ in words.randomElement(using: &rng)! }.joined(separator: " ") }
        FileManager.default.createFile(atPath: c.dir + "/w.txt", contents: Data((lines.joined(separator: "\n") + "\n").utf8))
        XCTAssertEqual(try c.weft(["table", "load", "corpus", c.dir + "/w.txt"]).status, 0)
        var expected: [Int: Int] = [:]
        for l in lines { for w in l.split(separator: " ") { expected[w.utf8.count, default: 0] += 1 } }

        var children: [Process] = []
        defer { for p in children where p.isRunning { p.terminate(); p.waitUntilExit() } }
        for id in ["participant-0", "participant-1"] {
            c.kill9(id)
            children.append(try startExample(c, id))
        }
        // participant-2 still runs plain `weft node`: refused, naming it.
        let refused = try runExample(c, ["run", "--input", "corpus", "--output", "lengths"])
        XCTAssertNotEqual(refused.status, 0)
        XCTAssertTrue(refused.stderr.contains("participant-2 does not know job wordlengths"), refused.stderr)
        XCTAssertNotEqual(try c.weft(["table", "export", "lengths"]).status, 0, "no output from a refused job")

        c.kill9("participant-2")
        children.append(try startExample(c, "participant-2"))
        let r = try runExample(c, ["run", "--input", "corpus", "--output", "lengths"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("participant-0=") && r.stdout.contains("participant-1=") && r.stdout.contains("participant-2="), r.stdout)
        let exported = try c.weft(["table", "export", "lengths", "--format", "kv"])
        XCTAssertEqual(exported.status, 0, exported.stderr)
        var got: [Int: Int] = [:]
        for line in exported.stdout.split(separator: "\n") {
            let f = line.split(separator: "\t")
            got[Int(f[0])!] = Int(f[1])!
        }
        XCTAssertEqual(got, expected)
    }
}
