import Foundation
import XCTest
import WeftCore
import WeftProtocol
@testable import WeftRuntime

/// The status port (issue "Observability"): /metrics in the Prometheus
/// text format moving with a known workload, the pages' JSON matching the
/// state the test made, authentication, and bad requests.
final class ObservabilityTests: XCTestCase {
    var dir = ""
    override func setUp() { dir = tempDir("weft-obs") }
    override func tearDown() { removeDir(dir) }

    /// One HTTP/1.1 request on a fresh connection: (status, body).
    func get(_ port: Int, _ path: String, token: String?, extra: String = "") throws -> (Int, String) {
        let s = try RawSocket(port: port)
        var req = "GET \(path) HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        if let token { req += "Authorization: Bearer \(token)\r\n" }
        req += extra + "\r\n"
        try s.send(Array(req.utf8))
        let (_, got) = s.readUntilClosed(timeoutMillis: 5000)
        let text = String(decoding: got, as: UTF8.self)
        let code = Int(text.split(separator: " ").dropFirst().first ?? "") ?? 0
        let body = text.range(of: "\r\n\r\n").map { String(text[$0.upperBound...]) } ?? ""
        return (code, body)
    }

    /// Prometheus text format: sample name with labels -> value; checks
    /// that every family has HELP and TYPE before its samples.
    func parse(_ text: String) -> [String: Double] {
        var samples: [String: Double] = [:]
        var described: Set<String> = []
        var typed: Set<String> = []
        for line in text.split(separator: "\n") {
            if line.hasPrefix("# HELP ") { described.insert(String(line.split(separator: " ")[2])) }
            else if line.hasPrefix("# TYPE ") { typed.insert(String(line.split(separator: " ")[2])) }
            else if !line.hasPrefix("#") {
                guard let sp = line.lastIndex(of: " "), let v = Double(line[line.index(after: sp)...]) else {
                    XCTFail("not a sample line: \(line)")
                    continue
                }
                let name = String(line[..<sp])
                samples[name] = v
                let family = String(name.prefix { $0 != "{" })
                let base = ["_bucket", "_sum", "_count"].reduce(family) { f, s in f.hasSuffix(s) ? String(f.dropLast(s.count)) : f }
                XCTAssertTrue(base.hasPrefix("weft_"), "\(base) is not named weft_*")
                XCTAssertTrue(described.contains(base) && typed.contains(base), "\(base) has no HELP or TYPE line before its samples")
            }
        }
        return samples
    }

    func testMetricsMoveWithAWorkloadAndPagesShowTheState() throws {
        let server = try WeftServer(dataDir: dir + "/data", listen: Endpoint(host: "127.0.0.1", port: 0), httpListen: Endpoint(host: "127.0.0.1", port: 0))
        defer { server.stop() }
        let port = try XCTUnwrap(server.http?.boundPort)
        let token = try ClusterSecret.clientKey(dir: dir + "/data", secretFile: nil)
        let secret = ClusterSecret.hex(token)
        let committed = "weft_transactions_total{outcome=\"committed\",path=\"one_phase\"}"
        let (c0, m0) = try get(port, "/metrics", token: secret)
        XCTAssertEqual(c0, 200)
        let before = parse(m0)[committed] ?? 0
        let client = server.cluster.client()
        defer { client.close() }
        let done = expectation(description: "10 commits")
        Task {
            for i in 0..<10 { _ = try await client.put(Array("k\(i)".utf8), Array("v".utf8)) }
            done.fulfill()
        }
        wait(for: [done], timeout: 30)
        let (_, m1) = try get(port, "/metrics", token: secret)
        let after = parse(m1)
        XCTAssertEqual((after[committed] ?? 0) - before, 10, "10 commits give +10")
        XCTAssertGreaterThanOrEqual(after["weft_commit_latency_seconds_count"] ?? 0, 10)
        XCTAssertNotNil(after["weft_in_doubt_transactions{node=\"participant-0\"}"])
        XCTAssertGreaterThan(after["weft_lmdb_map_used_bytes{node=\"coordinator\"}"] ?? 0, 0)

        // An in-doubt transaction: participant 0 prepares one the
        // coordinator never decided; the page names it and its participants.
        server.cluster.participants[0].enqueue(Envelope(from: .coordinator, to: .participant(0),
            .prepare(txn: 4242, startTs: 4242, commitTs: HLC.timestamp(millis: wallMillis()), participants: [0, 1], part: TxnPart(writes: [WriteOp(key: [9], value: [9])]))))
        usleep(20_000)
        let (c2, tx) = try get(port, "/api/transactions", token: secret)
        XCTAssertEqual(c2, 200)
        let o = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(tx.utf8)) as? [String: Any])
        let rows = o["in_doubt"] as? [[String: Any]] ?? []
        let row = try XCTUnwrap(rows.first { $0["txn"] as? String == "4242" }, "\(tx)")
        XCTAssertEqual(row["participants"] as? String, "0,1")
        XCTAssertEqual(row["participant"] as? Int, 0)
        XCTAssertEqual(row["coordinator"] as? String, "none (presumed abort)")
        XCTAssertGreaterThanOrEqual((o["commit_latency"] as? [String: Any])?["count"] as? Int ?? 0, 10)

        let (c3, ov) = try get(port, "/api/overview", token: secret)
        XCTAssertEqual(c3, 200)
        let nodes = (try JSONSerialization.jsonObject(with: Data(ov.utf8)) as? [String: Any])?["nodes"] as? [[String: Any]] ?? []
        XCTAssertEqual(Set(nodes.compactMap { $0["id"] as? String }), ["server", "coordinator", "participant-0", "participant-1", "participant-2"])
        let (c4, html) = try get(port, "/?token=\(secret)", token: nil)
        XCTAssertEqual(c4, 200)
        XCTAssertTrue(html.contains("<table id=\"nodes\">") && html.contains("participant-2"), html)
    }

    /// The overview and transactions pages in a real browser (Debian's
    /// chromium, headless): the DOM has the node rows. Skipped, saying so,
    /// where chromium is not installed (`make client-deps` installs it).
    func testPagesRenderInHeadlessChromium() throws {
        guard let browser = ["/usr/bin/chromium", "/usr/bin/chromium-browser"].first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            throw XCTSkip("chromium is not installed: the browser check did not run (make client-deps installs it)")
        }
        let server = try WeftServer(dataDir: dir + "/data", listen: Endpoint(host: "127.0.0.1", port: 0), httpListen: Endpoint(host: "127.0.0.1", port: 0))
        defer { server.stop() }
        let port = try XCTUnwrap(server.http?.boundPort)
        let secret = ClusterSecret.hex(try ClusterSecret.clientKey(dir: dir + "/data", secretFile: nil))
        func dom(_ path: String, screenshot: String? = nil) throws -> String {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: browser)
            var args = ["--headless", "--no-sandbox", "--disable-gpu", "--user-data-dir=\(dir)/chromium"]
            if let screenshot { args += ["--screenshot=\(screenshot)", "--window-size=1000,500"] } else { args.append("--dump-dom") }
            p.arguments = args + ["http://127.0.0.1:\(port)\(path)?token=\(secret)"]
            let out = Pipe()
            p.standardOutput = out
            p.standardError = FileHandle.nullDevice
            try p.run()
            let data = out.fileHandleForReading.readDataToEndOfFile()
            p.waitUntilExit()
            return String(decoding: data, as: UTF8.self)
        }
        let overview = try dom("/")
        XCTAssertTrue(overview.contains("<table id=\"nodes\">"), overview)
        for node in ["server", "coordinator", "participant-0", "participant-1", "participant-2"] {
            XCTAssertTrue(overview.contains("<td>\(node)</td>"), "the browser's DOM lists \(node)")
        }
        let tx = try dom("/transactions")
        XCTAssertTrue(tx.contains("id=\"none-in-doubt\"") && tx.contains("<table id=\"latency\">"), tx)
        _ = try dom("/", screenshot: dir + "/overview.png")
        XCTAssertGreaterThan((try? FileManager.default.attributesOfItem(atPath: dir + "/overview.png")[.size] as? Int) ?? 0, 1000, "a screenshot was taken")
    }

    /// `job run` through a server with a status port prints its job page;
    /// the page's JSON has the job's stages, and a browser renders them as
    /// a DAG.
    func testAJobRunThroughTheServerHasItsPage() throws {
        let d = dir + "/data"
        let start = try runWeft(["server", "start", "--data-dir", d, "--http-port", "0", "--json"])
        XCTAssertEqual(start.status, 0, start.stderr)
        defer { _ = try? runWeft(["server", "stop", "--data-dir", d]) }
        let info = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(start.stdout.utf8)) as? [String: Any])
        let http = try XCTUnwrap(info["http"] as? String, "server start --json lists http")
        let port = try XCTUnwrap(Int(http.split(separator: ":").last!))
        try "to be or not to be\nthat is the question\n".write(toFile: dir + "/words.txt", atomically: true, encoding: .utf8)
        XCTAssertEqual(try runWeft(["table", "load", "words", dir + "/words.txt", "--data-dir", d]).status, 0)
        let run = try runWeft(["job", "run", "wordcount", "--input", "words", "--data-dir", d])
        XCTAssertEqual(run.status, 0, run.stderr)
        XCTAssertTrue(run.stdout.contains("job page: http://\(http)/jobs/1"), run.stdout)
        let secret = ClusterSecret.hex(try ClusterSecret.clientKey(dir: d, secretFile: nil))
        let (code, body) = try get(port, "/api/jobs/1", token: secret)
        XCTAssertEqual(code, 200)
        let job = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any])
        XCTAssertEqual(job["job"] as? String, "wordcount")
        XCTAssertEqual(job["state"] as? String, "succeeded")
        XCTAssertEqual(job["output_rows"] as? Int, 8, "distinct words")
        let stages = job["stage_list"] as? [[String: Any]] ?? []
        XCTAssertEqual(stages.count, job["stages"] as? Int, "one row per stage run")
        checkStages(stages, job: job)
        XCTAssertEqual(try get(port, "/api/jobs/99", token: secret).0, 404)
        // The tables page: the loaded table and the job's output, with their blocks.
        let (tc, tb) = try get(port, "/api/tables", token: secret)
        XCTAssertEqual(tc, 200)
        let tables = (try JSONSerialization.jsonObject(with: Data(tb.utf8)) as? [String: Any])?["tables"] as? [[String: Any]] ?? []
        let words = try XCTUnwrap(tables.first { $0["table"] as? String == "words" }, tb)
        XCTAssertEqual(words["rows"] as? Int, 2)
        XCTAssertEqual(words["layout"] as? String, "blocks")
        let per = words["blocks_per_participant"] as? [String: Int] ?? [:]
        XCTAssertEqual(per.values.reduce(0, +), (words["blocks"] as? Int ?? -1) * (words["replicas"] as? Int ?? -1), tb)
        let (_, metrics) = try get(port, "/metrics", token: secret)
        let m = parse(metrics)
        XCTAssertEqual(m["weft_jobs_total{result=\"succeeded\"}"], 1)
        XCTAssertEqual(m["weft_tasks_total"], Double(job["tasks"] as? Int ?? -1))
        let (_, list) = try get(port, "/api/jobs", token: secret)
        XCTAssertTrue(list.contains("\"id\":1"), list)
        if let browser = ["/usr/bin/chromium", "/usr/bin/chromium-browser"].first(where: { FileManager.default.isExecutableFile(atPath: $0) }) {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: browser)
            p.arguments = ["--headless", "--no-sandbox", "--disable-gpu", "--user-data-dir=\(dir)/chromium", "--dump-dom", "http://\(http)/jobs/1?token=\(secret)"]
            let out = Pipe()
            p.standardOutput = out
            p.standardError = FileHandle.nullDevice
            try p.run()
            let dom = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            p.waitUntilExit()
            XCTAssertTrue(dom.contains("<svg id=\"dag\""), dom)
            XCTAssertEqual(dom.components(separatedBy: "class=\"stage\"").count - 1, stages.count, "one box per stage in the DAG")
        } else {
            print("chromium is not installed: the job page's browser check did not run")
        }
    }

    /// Each stage row: its tasks' duration quantiles over all its tasks,
    /// and per-stage counters that add up to the job's.
    func checkStages(_ stages: [[String: Any]], job: [String: Any]) {
        let n = { (o: [String: Any], k: String) in (o[k] as? NSNumber)?.doubleValue ?? -1 }
        for st in stages {
            XCTAssertGreaterThan(n(st, "task_p50_ms"), 0, "\(st)")
            XCTAssertLessThanOrEqual(n(st, "task_p50_ms"), n(st, "task_p95_ms"), "\(st)")
            XCTAssertLessThanOrEqual(n(st, "task_p95_ms"), n(st, "task_max_ms"), "\(st)")
            XCTAssertLessThanOrEqual(n(st, "task_max_ms"), n(st, "seconds") * 1000 + 1, "a task is no longer than its stage: \(st)")
        }
        XCTAssertEqual(stages.map { n($0, "shuffle_bytes_written") }.reduce(0, +), n(job, "shuffle_bytes_written"))
        XCTAssertEqual(stages.map { n($0, "shuffle_bytes_fetched") }.reduce(0, +), n(job, "shuffle_bytes_fetched"))
        XCTAssertGreaterThan(n(stages.first ?? [:], "shuffle_bytes_written"), 0, "the map stage wrote its shuffle")
    }

    /// A job run on a cluster (this process the driver, the participants'
    /// executors the tasks) appears on the coordinator's jobs pages; the
    /// participants' /metrics count its tasks and shuffle bytes; every
    /// node's tables page lists the tables with their blocks.
    func testAClusterJobIsReportedToTheCoordinatorsPages() throws {
        var d = ""
        var base = 0
        for attempt in 0..<3 {
            d = tempDir("weft-obs-cluster")
            base = 20_000 + Int.random(in: 0..<1_200) * 10
            let r = try runWeft(["cluster", "start", "--dir", d, "--base-port", String(base), "--http-port", String(base + 5)])
            if r.status == 0 { break }
            _ = try? runWeft(["cluster", "stop", "--dir", d])
            removeDir(d)
            if attempt == 2 { throw XCTSkip("cluster did not start: \(r.stderr)") }
        }
        defer {
            _ = try? runWeft(["cluster", "stop", "--dir", d])
            removeDir(d)
        }
        let secret = ClusterSecret.hex(try ClusterSecret.clientKey(dir: d, secretFile: nil))
        // About 3.6 MB: several blocks, so several map tasks on different
        // nodes and buckets fetched over the network.
        var lines = ""
        for i in 0..<60_000 { lines += "a-rather-long-word-number-\(i % 97) a-rather-long-word-number-\(i % 13)\n" }
        try lines.write(toFile: d + "/words.txt", atomically: true, encoding: .utf8)
        XCTAssertEqual(try runWeft(["table", "load", "words", d + "/words.txt", "--cluster", d, "--replicas", "2"]).status, 0)
        let run = try runWeft(["job", "run", "wordcount", "--input", "words", "--cluster", d, "--json"])
        XCTAssertEqual(run.status, 0, run.stderr)
        let answer = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data((run.stdout.split(separator: "\n").last ?? "").utf8)) as? [String: Any], run.stdout)
        // The coordinator is node 0 (port base, status port base + 5).
        XCTAssertEqual(answer["job_url"] as? String, "http://127.0.0.1:\(base + 5)/jobs/1", "\(answer)")
        let (code, body) = try get(base + 5, "/api/jobs/1", token: secret)
        XCTAssertEqual(code, 200, body)
        let job = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any])
        XCTAssertEqual(job["state"] as? String, "succeeded")
        XCTAssertEqual(job["driver"] as? String, "remote")
        XCTAssertEqual(job["executors"] as? String, "cluster")
        XCTAssertEqual(job["output_rows"] as? Int, 97, "distinct words")
        let stages = job["stage_list"] as? [[String: Any]] ?? []
        XCTAssertEqual(stages.count, job["stages"] as? Int)
        checkStages(stages, job: job)
        XCTAssertGreaterThan(job["shuffle_bytes_fetched"] as? Int ?? 0, 0, "reducers fetched buckets over the network")
        let (_, list) = try get(base + 5, "/api/jobs", token: secret)
        XCTAssertTrue(list.contains("\"job\":\"wordcount\""), list)
        // The participants' executors count what they ran.
        var tasks = 0.0, written = 0.0
        for i in 1...3 {
            let (_, text) = try get(base + 5 + i, "/metrics", token: secret)
            let m = parse(text)
            tasks += m["weft_executor_tasks_total{result=\"succeeded\"}"] ?? 0
            written += m["weft_shuffle_bytes_written_total"] ?? 0
        }
        XCTAssertEqual(tasks, Double(job["tasks"] as? Int ?? -1), "every task the driver counted ran on an executor")
        XCTAssertEqual(written, Double(job["shuffle_bytes_written"] as? Int ?? -1))
        // Any node's tables page reads the catalog.
        let (tc, tb) = try get(base + 7, "/api/tables", token: secret)
        XCTAssertEqual(tc, 200, tb)
        let tables = (try JSONSerialization.jsonObject(with: Data(tb.utf8)) as? [String: Any])?["tables"] as? [[String: Any]] ?? []
        let words = try XCTUnwrap(tables.first { $0["table"] as? String == "words" }, tb)
        XCTAssertEqual(words["replicas"] as? Int, 2)
        let per = words["blocks_per_participant"] as? [String: Int] ?? [:]
        XCTAssertEqual(per.count, 3, tb)
        XCTAssertEqual(per.values.reduce(0, +), 2 * (words["blocks"] as? Int ?? -1), tb)
        if let browser = ["/usr/bin/chromium", "/usr/bin/chromium-browser"].first(where: { FileManager.default.isExecutableFile(atPath: $0) }) {
            for (path, want) in [("/jobs/1", "<table id=\"stages\">"), ("/tables", "<table id=\"tables\">")] {
                let p = Process()
                p.executableURL = URL(fileURLWithPath: browser)
                p.arguments = ["--headless", "--no-sandbox", "--disable-gpu", "--user-data-dir=\(d)/chromium", "--dump-dom", "http://127.0.0.1:\(base + 5)\(path)?token=\(secret)"]
                let out = Pipe()
                p.standardOutput = out
                p.standardError = FileHandle.nullDevice
                try p.run()
                let dom = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
                p.waitUntilExit()
                XCTAssertTrue(dom.contains(want), "\(path): \(dom.prefix(400))")
                if path == "/tables" { XCTAssertTrue(dom.contains("<td>words</td>"), dom) }
            }
        } else {
            print("chromium is not installed: the cluster pages' browser check did not run")
        }
    }

    /// A transaction left in doubt by a crash point (the coordinator killed
    /// before forcing its decision) is on every participant's transactions
    /// page with its participants; the decision column says the coordinator
    /// cannot be asked; once the coordinator is back, it is gone.
    func testAnInDoubtTransactionFromACrashPointIsOnTheParticipantsPages() throws {
        var d = ""
        var base = 0
        for attempt in 0..<3 {
            d = tempDir("weft-obs-indoubt")
            base = 20_000 + Int.random(in: 0..<1_200) * 10
            let r = try runWeft(["cluster", "start", "--dir", d, "--base-port", String(base), "--http-port", String(base + 5)])
            if r.status == 0 { break }
            _ = try? runWeft(["cluster", "stop", "--dir", d])
            removeDir(d)
            if attempt == 2 { throw XCTSkip("cluster did not start: \(r.stderr)") }
        }
        defer {
            _ = try? runWeft(["cluster", "stop", "--dir", d])
            removeDir(d)
        }
        let secret = ClusterSecret.hex(try ClusterSecret.clientKey(dir: d, secretFile: nil))
        // The coordinator again, with the crash point armed.
        let pid = try XCTUnwrap(Int32((try String(contentsOfFile: d + "/coordinator.pid", encoding: .utf8)).trimmingCharacters(in: .whitespacesAndNewlines)))
        kill(pid, SIGKILL)
        usleep(200_000)
        let coordinator = Process()
        coordinator.executableURL = URL(fileURLWithPath: weftBinary)
        coordinator.arguments = ["node", "--cluster", d, "--id", "coordinator"]
        coordinator.environment = ProcessInfo.processInfo.environment.merging(["WEFT_CRASH_AT": "coordinator.before-decision-forced"]) { $1 }
        coordinator.standardOutput = FileHandle.nullDevice
        coordinator.standardError = FileHandle.nullDevice
        try coordinator.run()
        var txn = ""
        for _ in 0..<50 where coordinator.isRunning {
            let r = try runWeft(["debug", "crash-txn", "--cluster", d, "--tag", "indoubt", "--kind", "commit"])
            if let line = r.stdout.split(separator: "\n").first(where: { $0.hasPrefix("unknown ") }) { txn = String(line.split(separator: " ")[1]) }
            usleep(100_000)
        }
        coordinator.waitUntilExit()
        XCTAssertEqual(coordinator.terminationReason, .uncaughtSignal, "the coordinator died at its crash point")
        XCTAssertFalse(txn.isEmpty, "the client was told the outcome is unknown")
        for i in 0..<3 {
            let (code, body) = try get(base + 6 + i, "/api/transactions", token: secret)
            XCTAssertEqual(code, 200, body)
            let rows = (try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any])?["in_doubt"] as? [[String: Any]] ?? []
            let row = try XCTUnwrap(rows.first { $0["txn"] as? String == txn }, "participant-\(i): \(body)")
            XCTAssertEqual(row["participants"] as? String, "0,1,2")
            XCTAssertEqual(row["participant"] as? Int, i)
            XCTAssertEqual(row["coordinator"] as? String, "coordinator unreachable")
        }
        XCTAssertEqual(try runWeft(["cluster", "start", "--dir", d]).status, 0)
        var cleared = false
        for _ in 0..<100 where !cleared {
            let (_, body) = try get(base + 6, "/api/transactions", token: secret)
            cleared = ((try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any])?["in_doubt"] as? [[String: Any]])?.isEmpty == true
            if !cleared { usleep(100_000) }
        }
        XCTAssertTrue(cleared, "the restarted coordinator resolves it (presumed abort)")
    }

    func testRequestsAreAuthenticatedAndBounded() throws {
        let server = try WeftServer(dataDir: dir + "/data", listen: Endpoint(host: "127.0.0.1", port: 0), httpListen: Endpoint(host: "127.0.0.1", port: 0))
        defer { server.stop() }
        let port = try XCTUnwrap(server.http?.boundPort)
        let secret = ClusterSecret.hex(try ClusterSecret.clientKey(dir: dir + "/data", secretFile: nil))
        XCTAssertEqual(try get(port, "/metrics", token: nil).0, 401)
        XCTAssertEqual(try get(port, "/api/overview", token: "0123").0, 401)
        let nodeSecret = ClusterSecret.hex(try ClusterSecret.read(dir + "/data/secret"))
        XCTAssertEqual(try get(port, "/metrics", token: nodeSecret).0, 401, "the client secret, not the node secret")
        XCTAssertEqual(try get(port, "/nope", token: secret).0, 404)
        let big = "X-Pad: " + String(repeating: "a", count: Limits.httpRequestBytesMax) + "\r\n"
        XCTAssertEqual(try get(port, "/metrics", token: secret, extra: big).0, 413)
        // A peer without the secret on the cluster port is counted by reason.
        let forged = try RawSocket(port: server.file.endpoint.port)
        try forged.send(Frame.hello(nonce: Array(repeating: 7, count: 32)).encoded() + Frame.auth(sender: .coordinator, proof: Array(repeating: 0, count: 32)).encoded())
        XCTAssertTrue(forged.readUntilClosed(timeoutMillis: 3000).0)
        // The server goes on serving.
        let (code, text) = try get(port, "/metrics", token: secret)
        XCTAssertEqual(code, 200)
        XCTAssertGreaterThanOrEqual(parse(text)["weft_connections_rejected_total{node=\"coordinator\",reason=\"authentication\"}"] ?? 0, 1, text)
    }
}
