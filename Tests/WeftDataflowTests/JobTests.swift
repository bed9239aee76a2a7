import XCTest
import WeftCore
import WeftRuntime
@testable import WeftDataflow

/// Built-in jobs over real committed tables in an embedded cluster, checked
/// against straightforward reference computations.
final class ProgressLog: @unchecked Sendable {
    let lock = NSLock()
    var values: [Int] = []
    func add(_ v: Int) { lock.withLock { values.append(v) } }
}

final class JobTests: XCTestCase {
    var dir = ""
    override func setUp() {
        dir = NSTemporaryDirectory() + "weft-jobs-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
    }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func load(_ c: WeftClient, _ name: String, _ lines: [String]) async throws {
        try await TableStore.write(c, name, rows: lines.enumerated().map { (Array(String(format: "%012d", $0.offset + 1).utf8), Array($0.element.utf8)) }, format: "lines", overwrite: false)
    }

    func testWordCountAndPageRankMatchReferencesAndOutputIsAtomic() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        var rng = SplitMix(seed: 9)
        let vocab = (0..<300).map { "w\($0)" }
        let lines = (0..<400).map { _ in (0..<Int(rng.next() % 12)).map { _ in vocab[Int(rng.next() % UInt64(rng.next() % 2 == 0 ? 10 : 300))] }.joined(separator: rng.next() % 3 == 0 ? "\t " : " ") }
        try await load(c, "corpus", lines)
        var edges: [String] = (0..<600).map { _ in "v\(rng.next() % 60) v\(rng.next() % 60)" }
        edges += ["v1 v2", "v1 v2", "oops"]
        try await load(c, "graph", edges)

        let sc = DataflowContext()
        var p = JobParameters(input: "corpus")
        p.output = "wc"
        let wcParams = p
        let wc = try await onDriverThread { try BuiltinJobs.run("wordcount", wcParams, sc: sc, client: c) }
        var ref: [String: Int] = [:]
        for l in lines { for w in l.split(whereSeparator: { $0.isWhitespace }) { ref[String(w), default: 0] += 1 } }
        XCTAssertEqual(wc.outputRows, ref.count)
        let rows = try await tableRows(c, "wc")
        var got: [String: Int] = [:]
        for r in rows { got[r.0] = Int(String(decoding: r.1, as: UTF8.self)) }
        XCTAssertEqual(got, ref)
        let top = ref.sorted { $0.value != $1.value ? $0.value > $1.value : $0.key < $1.key }.prefix(20).map { "\($0.key) \($0.value)" }.joined(separator: ", ")
        XCTAssertTrue(wc.summary.contains("top 20: " + top), "\(wc.summary)")

        var pp = JobParameters(input: "graph")
        pp.output = "pr"
        pp.iterations = 7
        let prParams = pp
        let pr = try await onDriverThread { try BuiltinJobs.run("pagerank", prParams, sc: sc, client: c) }
        XCTAssertEqual(pr.malformedLines, 1, "the malformed line is counted")
        // Spark's pagerank.py, in plain Swift.
        var links: [String: Set<String>] = [:]
        for e in edges {
            let f = e.split(separator: " ")
            if f.count == 2 { links[String(f[0]), default: []].insert(String(f[1])) }
        }
        var ranks = links.mapValues { _ in 1.0 }
        for _ in 0..<7 {
            var contrib: [String: Double] = [:]
            for (src, dsts) in links { if let r = ranks[src] { for d in dsts { contrib[d, default: 0] += r / Double(dsts.count) } } }
            ranks = contrib.mapValues { 0.15 + 0.85 * $0 }
        }
        let prRows = try await tableRows(c, "pr")
        XCTAssertEqual(prRows.count, ranks.count)
        for r in prRows {
            let v = r.0
            XCTAssertEqual(Double(String(decoding: r.1, as: UTF8.self))!, ranks[v]!, accuracy: 1e-9, v)
        }

        // The output table exists: refused without --overwrite, replaced atomically with it.
        let refused = try await runError("wordcount", p, sc: sc, c)
        XCTAssertTrue(refused.contains("already exists"), refused)
        var again = p
        again.overwrite = true
        again.input = "graph"
        let overwriteParams = again
        _ = try await onDriverThread { try BuiltinJobs.run("wordcount", overwriteParams, sc: sc, client: c) }
        let after = try await tableRows(c, "wc")
        XCTAssertFalse(after.contains { $0.0 == "w1" }, "the new table has none of the old rows")
        XCTAssertTrue(after.contains { $0.0 == "v1" })
        let info = try await TableStore.info(c, "wc")
        let (everything, _) = try await c.scan(prefix: Array("b/t:wc@".utf8), limit: 10_000)
        XCTAssertEqual(everything.count, try XCTUnwrap(info).blockCount, "the old generation's blocks were deleted")
    }

    /// The rows of a table's current generation, keys without the prefix.
    func tableRows(_ c: WeftClient, _ name: String) async throws -> [(String, Bytes)] {
        let infoMaybe = try await TableStore.info(c, name)
        let info = try XCTUnwrap(infoMaybe)
        return try await TableStore.scan(c, info, at: c.now(), limit: 10_000).map { (String(decoding: $0.key, as: UTF8.self), $0.value) }
    }

    func testBigTablesLoadInBatchesAndAppearAtOnce() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        // More rows than one block: several transactions, one visible table.
        let n = 250_000
        let rows = (0..<n).map { (Array(String(format: "%012d", $0).utf8), Array("line \($0)".utf8)) }
        let before = try await c.now()
        let seen = ProgressLog()
        try await TableStore.write(c, "big", rows: rows, format: "lines", overwrite: false, progress: { done, _ in seen.add(done) })
        XCTAssertGreaterThan(seen.values.count, 2, "a progress report per block")
        XCTAssertEqual(seen.values, seen.values.sorted())
        XCTAssertEqual(seen.values.last, n)
        let atBefore = try await TableStore.info(c, "big", at: before)
        XCTAssertNil(atBefore, "invisible before the last batch")
        let maybeInfo = try await TableStore.info(c, "big")
        let info = try XCTUnwrap(maybeInfo)
        XCTAssertEqual(info.rows, n)
        XCTAssertGreaterThan(info.blockCount, 2)
        XCTAssertTrue(info.blocks)
        let sc = DataflowContext()
        let count = try await onDriverThread { try sc.table("big", client: c).count() }
        XCTAssertEqual(count, n)
        // Replacing it: the old snapshot still reads the old rows.
        let oldTs = info.committedTs
        try await TableStore.write(c, "big", rows: Array(rows.prefix(10)), format: "lines", overwrite: true)
        let counts = try await onDriverThread { (try sc.table("big", client: c).count(), try sc.table("big", client: c, at: oldTs).count()) }
        XCTAssertEqual(counts.0, 10)
        XCTAssertEqual(counts.1, n, "a snapshot before the overwrite still sees every old row")
        try await TableStore.drop(c, "big")
        let gone = try await TableStore.info(c, "big")
        XCTAssertNil(gone)
        let left = try await c.scan(prefix: Array("b/t:big@".utf8), limit: 10).rows.count
        XCTAssertEqual(left, 0, "the blocks went with it")
        let markers = try await c.scan(prefix: Array("p/".utf8), limit: 10).rows.count
        XCTAssertEqual(markers, 0, "no generation is left marked pending after a load, an overwrite and a drop")
    }

    /// A batched load killed before its catalog flip leaves rows no table
    /// names, under a pending marker that names its writer: `table gc`
    /// deletes them once that writer has exited, and keeps a live
    /// writer's (and the current generation's rows) untouched.
    func testGarbageCollectionDeletesRowsOfDeadLoads() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        try await load(c, "kept", ["a", "b"])
        let child = Process()
        child.executableURL = URL(fileURLWithPath: "/bin/true")
        try child.run()
        child.waitUntilExit()
        let host = WriterTag.current.split(separator: ":")[0]
        // What a killed load leaves: its first batches and the marker.
        let t = try await c.begin()
        try t.put(Array("p/kept@deadgen".utf8), Array("owner=\(host):\(child.processIdentifier) at=1 loading".utf8))
        for i in 0..<120 { try t.put(TableStore.rowPrefix("kept", generation: "deadgen") + Array(String(format: "%012d", i).utf8), Array("x".utf8)) }
        var b = Blocks.Builder(kind: .lines, firstLine: 1)
        b.appendPiece(ArraySlice([1, 120]))
        for i in 0..<5 { try Blocks.put(t, TableStore.blockSet("kept", "deadgen"), partition: i % 3, index: i / 3, block: b.seal(), replicas: 2, participants: 3) }
        try t.put(Array("p/other@livegen".utf8), Array("owner=\(WriterTag.current) at=\(Int64(Date().timeIntervalSince1970 * 1000)) loading".utf8))
        try t.put(TableStore.rowPrefix("other", generation: "livegen") + Array("000000000001".utf8), Array("y".utf8))
        _ = try await t.commit()

        let listed = try await TableStore.pending(c)
        XCTAssertEqual(Set(listed.map { "\($0.table)@\($0.generation) \($0.state)" }), ["kept@deadgen loading", "other@livegen loading"])
        let (deleted, kept) = try await TableStore.collectGarbage(c)
        XCTAssertEqual(deleted.map(\.generation), ["deadgen"])
        XCTAssertEqual(kept.map(\.generation), ["livegen"])
        let deadRows = try await c.scan(prefix: TableStore.rowPrefix("kept", generation: "deadgen"), limit: 1000).rows.count
        XCTAssertEqual(deadRows, 0)
        let deadBlocks = try await c.scan(prefix: Blocks.setPrefix(TableStore.blockSet("kept", "deadgen")), limit: 1000).rows.count
        XCTAssertEqual(deadBlocks, 0, "the dead load's blocks, every replica, are gone")
        let liveRows = try await c.scan(prefix: TableStore.rowPrefix("other", generation: "livegen"), limit: 1000).rows.count
        XCTAssertEqual(liveRows, 1, "a running writer's rows stay")
        let table = try await tableRows(c, "kept")
        XCTAssertEqual(table.map { String(decoding: $0.1, as: UTF8.self) }, ["a", "b"], "the table itself is untouched")
        // Age never overrules a writer seen running here (its load would
        // lose rows); another host's writer is collected by age.
        let (none0, _) = try await TableStore.collectGarbage(c, olderThanMillis: 0)
        XCTAssertEqual(none0.map(\.generation), [])
        _ = try await c.put(Array("p/other@livegen".utf8), Array("owner=elsewhere:1 at=1 loading".utf8))
        let (old, _) = try await TableStore.collectGarbage(c, olderThanMillis: 0)
        XCTAssertEqual(old.map(\.generation), ["livegen"])
        let markers = try await c.scan(prefix: Array("p/".utf8), limit: 10).rows.count
        XCTAssertEqual(markers, 0)
    }

    func testUnknownTableAndJobAreClearErrors() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        let sc = DataflowContext()
        let noTable = try await runError("wordcount", JobParameters(input: "nothing"), sc: sc, c)
        XCTAssertTrue(noTable.contains("unknown table nothing"), noTable)
        try await load(c, "t1", ["a b"])
        let noJob = try await runError("frobnicate", JobParameters(input: "t1"), sc: sc, c)
        XCTAssertTrue(noJob.contains("unknown job frobnicate"), noJob)
    }

    /// Runs a job on a driver thread (never blocking a Swift-concurrency
    /// thread) and returns its error's text, or "" if it succeeded.
    func runError(_ name: String, _ p: JobParameters, sc: DataflowContext, _ c: WeftClient) async throws -> String {
        try await onDriverThread { () -> String in
            do {
                _ = try BuiltinJobs.run(name, p, sc: sc, client: c)
                return ""
            } catch {
                return "\(error)"
            }
        }
    }

    /// logmining as in the RDD paper: ERROR lines' third field, persisted
    /// reliably, counted per word; a counts table equal to a plain loop.
    func testLogMiningCountsMatchAPlainLoop() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        var rng = SplitMix(seed: 4)
        let kinds = ["ERROR", "WARN", "INFO", "ERRORS"]
        let msgs = ["disk full on sda", "php timeout", "mysql down", "disk slow", "ok"]
        let lines = (0..<500).map { i in "\(kinds[Int(rng.next() % 4)])\t\(i)\t\(msgs[Int(rng.next() % 5)])" } + ["ERROR\tno-third-field"]
        try await load(c, "log", lines)
        var p = JobParameters(input: "log")
        p.words = ["disk", "mysql", "absent"]
        p.output = "counts"
        let params = p
        _ = try await onDriverThread { try BuiltinJobs.run("logmining", params, sc: DataflowContext(), client: c) }
        var ref: [String: Int] = [:]
        for w in params.words {
            ref[w] = lines.filter { $0.hasPrefix("ERROR") }.map { l -> String in
                let f = l.split(separator: "\t", omittingEmptySubsequences: false)
                return f.count > 2 ? String(f[2]) : ""
            }.filter { $0.contains(w) }.count
        }
        let rows = try await tableRows(c, "counts")
        XCTAssertEqual(Dictionary(uniqueKeysWithValues: rows.map { ($0.0, Int(String(decoding: $0.1, as: UTF8.self))!) }), ref)
        XCTAssertEqual(ref["absent"], 0)
        XCTAssertGreaterThan(ref["disk"]!, 0)
    }

    /// `job explain` runs nothing, even for jobs that run actions while
    /// they plan, and shows what they would run.
    func testExplainRunsNoJob() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        try await load(c, "nums", ["1 2 3", "-1 0.5 2", "1 4 4"])
        try await load(c, "logs", ["ERROR\tx\tdisk full", "INFO\tx\tok"])
        try await load(c, "pairs", ["b\t1", "a\t2"])
        let cases: [(String, String, String)] = [("kmeans", "nums", "centreSums"), ("logreg", "nums", "gradient"),
                                                 ("logmining", "logs", "errorMessages"), ("sort", "pairs", "sortByKey")]
        for (job, table, shows) in cases {
            var p = JobParameters(input: table)
            p.words = ["disk"]
            let params = p
            let (text, stages) = try await onDriverThread { () -> (String, Int) in
                let sc = DataflowContext()
                let rdd = try BuiltinJobs.plan(job, params, sc: sc, client: c, malformed: sc.accumulator("m"), explainOnly: true)
                return (rdd.toDebugString(), sc.totalMetrics.stages)
            }
            XCTAssertEqual(stages, 0, "\(job): explain ran a job")
            XCTAssertTrue(text.contains(shows), "\(job): \(text)")
        }
        let blocks = try await c.scan(prefix: Array("d/".utf8), limit: 10).rows.count
        XCTAssertEqual(blocks, 0, "explain logmining wrote no reliable block")
    }

    /// A `kv` table (loaded with `--format kv`, or a job's output) reads as
    /// `key<TAB>value` lines, so join and sort take it like a text table.
    func testJoinAndSortReadKvTablesAndLinesTables() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        let prices = [("10", "apple"), ("2", "pear"), ("33", "fig")].map { (Array($0.0.utf8), Array($0.1.utf8)) }
        try await TableStore.write(c, "prices", rows: prices, format: "kv", overwrite: false)
        try await load(c, "orders", ["2\tbob", "10\tann", "2\tcid", "7\tdan"])
        let sc = DataflowContext()
        var sortP = JobParameters(input: "prices")
        sortP.output = "sorted"
        let sortParams = sortP
        _ = try await onDriverThread { try BuiltinJobs.run("sort", sortParams, sc: sc, client: c) }
        let sorted = try await tableRows(c, "sorted").sorted { $0.0 < $1.0 }.map { String(decoding: $0.1, as: UTF8.self) }
        XCTAssertEqual(sorted, ["2\tpear", "10\tapple", "33\tfig"], "numeric order of a kv table's keys")

        var joinP = JobParameters(input: "orders")
        joinP.input2 = "prices"
        joinP.output = "joined"
        let joinParams = joinP
        let result = try await onDriverThread { try BuiltinJobs.run("join", joinParams, sc: sc, client: c) }
        XCTAssertEqual(result.malformedLines, 0)
        let joined = try await tableRows(c, "joined").map { $0.0.split(separator: "\t")[0] + "=" + String(decoding: $0.1, as: UTF8.self) }.sorted()
        XCTAssertEqual(joined, ["10=ann\tapple", "2=bob\tpear", "2=cid\tpear"])
    }
}

final class AlgorithmTests: XCTestCase {
    func testKMeansMatchesPlainLloyd() throws {
        let sc = DataflowContext()
        var rng = SplitMix(seed: 4)
        let pts: [[Double]] = (0..<300).map { i in
            let c = Double(i % 3) * 10
            return [c + rng.unit(), c - rng.unit()]
        }
        let rows = pts.enumerated().map { (String(format: "%06d", $0.offset), $0.element.map { "\($0)" }.joined(separator: " ")) }
        let got = try BuiltinJobs.kMeans(sc.parallelize(rows, partitions: 4), k: 3, iterations: 6, malformed: sc.accumulator("m"))
        var centres = Array(pts.prefix(3))
        for _ in 0..<6 {
            var sums = [[Double]](repeating: [0, 0, 0], count: 3)
            for p in pts {
                var best = 0
                var bestD = Double.infinity
                for (i, c) in centres.enumerated() {
                    let d = (p[0] - c[0]) * (p[0] - c[0]) + (p[1] - c[1]) * (p[1] - c[1])
                    if d < bestD { best = i; bestD = d }
                }
                sums[best][0] += p[0]; sums[best][1] += p[1]; sums[best][2] += 1
            }
            for i in 0..<3 where sums[i][2] > 0 { centres[i] = [sums[i][0] / sums[i][2], sums[i][1] / sums[i][2]] }
        }
        for i in 0..<3 { for j in 0..<2 { XCTAssertEqual(got[i][j], centres[i][j], accuracy: 1e-9) } }
    }

    func testLogisticRegressionMatchesPlainGradientDescent() throws {
        let sc = DataflowContext()
        var rng = SplitMix(seed: 8)
        let data: [(Double, [Double])] = (0..<200).map { i in
            let y: Double = i % 2 == 0 ? 1 : -1
            return (y, [y * 0.7 + rng.unit() - 0.5, rng.unit()])
        }
        let lines = data.map { "\($0.0) \($0.1[0]) \($0.1[1])" }
        let got = try BuiltinJobs.logisticRegression(sc.parallelize(lines, partitions: 3), iterations: 5, malformed: sc.accumulator("m"))
        var w = [0.0, 0.0]
        for _ in 0..<5 {
            var g = [0.0, 0.0]
            for (y, x) in data {
                let s = (1 / (1 + exp(-y * (w[0] * x[0] + w[1] * x[1]))) - 1) * y
                g[0] += s * x[0]; g[1] += s * x[1]
            }
            w = [w[0] - g[0] / 200, w[1] - g[1] / 200]
        }
        XCTAssertEqual(got[0], w[0], accuracy: 1e-9)
        XCTAssertEqual(got[1], w[1], accuracy: 1e-9)
    }
}
