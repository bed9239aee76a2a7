import XCTest
import WeftCore
import WeftRuntime
@testable import WeftDataflow

/// Built-in jobs over real committed tables in an embedded cluster, checked
/// against straightforward reference computations.
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
        let (rows, _) = try await c.scan(prefix: TableStore.rowPrefix("wc"), limit: 10_000)
        var got: [String: Int] = [:]
        for r in rows { got[String(decoding: r.key.dropFirst(5), as: UTF8.self)] = Int(String(decoding: r.value, as: UTF8.self)) }
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
        let (prRows, _) = try await c.scan(prefix: TableStore.rowPrefix("pr"), limit: 10_000)
        XCTAssertEqual(prRows.count, ranks.count)
        for r in prRows {
            let v = String(decoding: r.key.dropFirst(5), as: UTF8.self)
            XCTAssertEqual(Double(String(decoding: r.value, as: UTF8.self))!, ranks[v]!, accuracy: 1e-9, v)
        }

        // The output table exists: refused without --overwrite, replaced atomically with it.
        XCTAssertThrowsError(try BuiltinJobs.run("wordcount", p, sc: sc, client: c))
        var again = p
        again.overwrite = true
        again.input = "graph"
        let overwriteParams = again
        _ = try await onDriverThread { try BuiltinJobs.run("wordcount", overwriteParams, sc: sc, client: c) }
        let (after, _) = try await c.scan(prefix: TableStore.rowPrefix("wc"), limit: 10_000)
        XCTAssertFalse(after.contains { String(decoding: $0.key, as: UTF8.self) == "t/wc/w1" }, "old rows are gone")
        XCTAssertTrue(after.contains { String(decoding: $0.key, as: UTF8.self) == "t/wc/v1" })
    }

    func testUnknownTableAndJobAreClearErrors() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        let sc = DataflowContext()
        XCTAssertThrowsError(try BuiltinJobs.run("wordcount", JobParameters(input: "nothing"), sc: sc, client: c)) {
            XCTAssertTrue("\($0)".contains("unknown table nothing"), "\($0)")
        }
        try await load(c, "t1", ["a b"])
        XCTAssertThrowsError(try BuiltinJobs.run("frobnicate", JobParameters(input: "t1"), sc: sc, client: c)) {
            XCTAssertTrue("\($0)".contains("unknown job frobnicate"), "\($0)")
        }
    }
}
