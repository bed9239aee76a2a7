import XCTest
import WeftCore
@testable import WeftDataflow

/// The partitioned-graph PageRank against Spark's semantics computed with
/// plain dictionaries, and against the same job written row by row
/// (`pageRankByJoin`), on random graphs with repeated edges, self-loops,
/// sinks, skewed in-degrees and empty partitions.
final class GraphTests: XCTestCase {

    /// Spark's pagerank.py in plain Swift.
    func reference<V: Hashable>(_ edges: [(V, V)], iterations: Int, damping: Double) -> [V: Double] {
        var links: [V: Set<V>] = [:]
        for (s, d) in edges { links[s, default: []].insert(d) }
        var ranks = links.mapValues { _ in 1.0 }
        for _ in 0..<iterations {
            var contrib: [V: Double] = [:]
            for (src, dsts) in links { if let r = ranks[src] { for d in dsts { contrib[d, default: 0] += r / Double(dsts.count) } } }
            ranks = contrib.mapValues { (1 - damping) + damping * $0 }
        }
        return ranks
    }

    func randomEdges(_ seed: UInt64, vertices: Int, edges: Int, base: Int = 0) -> [(Int, Int)] {
        var rng = SplitMix(seed: seed)
        var out: [(Int, Int)] = []
        for _ in 0..<edges {
            let s = base + Int(rng.next() % UInt64(vertices))
            // Skewed destinations: a few vertices get most links.
            let u = Double(rng.next() % 1_000_000) / 1_000_000
            let d = base + Int(Double(vertices) * u * u * u)
            out.append((s, d))
            if rng.next() % 10 == 0 { out.append((s, d)) }      // a repeated edge
            if rng.next() % 50 == 0 { out.append((s, s)) }      // a self-loop
        }
        return out
    }

    func assertClose<V: Hashable>(_ got: [(V, Double)], _ want: [V: Double], _ what: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(got.count, want.count, what, file: file, line: line)
        XCTAssertEqual(Set(got.map(\.0)).count, got.count, "\(what): one row per vertex", file: file, line: line)
        for (v, r) in got {
            guard let w = want[v] else { XCTFail("\(what): \(v) should not be ranked", file: file, line: line); return }
            XCTAssertEqual(r, w, accuracy: 1e-9 * max(1, w), "\(what): \(v)", file: file, line: line)
        }
    }

    func testIntegerGraphsMatchSparkSemanticsAtEveryPartitionCount() throws {
        let sc = DataflowContext(executor: LocalExecutor(threads: 2))
        for (seed, vertices, edges) in [(1 as UInt64, 50, 400), (2, 2000, 12_000), (3, 7, 30)] {
            let es = randomEdges(seed, vertices: vertices, edges: edges)
            let want = reference(es, iterations: 6, damping: 0.85)
            for parts in [1, 3, 8] {
                // Half the input partitions are empty.
                let input = sc.parallelize(es, partitions: 4).union(sc.parallelize([(Int, Int)](), partitions: 4))
                let got = try GraphPageRank.run(edges: input, iterations: 6, damping: 0.85, partitions: parts).collect()
                assertClose(got, want, "seed \(seed), \(parts) partitions")
            }
            let byJoin = try BuiltinJobs.pageRankByJoin(edges: sc.parallelize(es, partitions: 5), iterations: 6, damping: 0.85).collect()
            assertClose(byJoin, want, "the row-by-row plan, seed \(seed)")
        }
    }

    /// Vertices outside [0, 2^32) (negative, huge) take the hashed path
    /// instead of the packed one, and String vertices the generic one.
    func testHashedAndStringVerticesGiveTheSameRanks() throws {
        let sc = DataflowContext(executor: LocalExecutor(threads: 2))
        let es = randomEdges(9, vertices: 300, edges: 2500, base: -100)
            + [(Int.max, 5), (5, Int.max), (Int.min, -1), (1 << 40, 1 << 40)]
        let want = reference(es, iterations: 5, damping: 0.7)
        assertClose(try GraphPageRank.run(edges: sc.parallelize(es, partitions: 6), iterations: 5, damping: 0.7).collect(), want, "hashed Int vertices")

        let strings = es.map { ("v\($0.0)", "v\($0.1)") }
        let wantS = reference(strings, iterations: 5, damping: 0.7)
        assertClose(try GraphPageRank.run(edges: sc.parallelize(strings, partitions: 6), iterations: 5, damping: 0.7).collect(), wantS, "String vertices")
    }

    /// The three ways integer links are built: destinations small enough
    /// for bitmaps (the dense path, sources as large as 2^32 - 1 included),
    /// destinations spread up to 2^32 (the sparse packed path), and both in
    /// one graph, whose partitions then take different paths.
    func testDenseAndSparseIntegerVerticesGiveTheSameRanks() throws {
        let sc = DataflowContext(executor: LocalExecutor(threads: 2))
        let base = randomEdges(11, vertices: 900, edges: 6000)
        let top = Int(UInt32.max)
        let cases: [(String, [(Int, Int)])] = [
            ("dense, with the largest source", base + [(top, 3), (top, 5), (top, 3), (3, top - 1)]),
            ("sparse", base.map { ($0.0 * 4_000_037, $0.1 * 4_000_037) }),
            // Far destinations only from sources of partition 0 (of 3).
            ("mixed", base + base.filter { vertexPartition($0.0, 3) == 0 }.prefix(300).map { ($0.0, $0.1 * 4_000_037 + 1) }),
        ]
        for (what, es) in cases {
            let want = reference(es, iterations: 5, damping: 0.85)
            for parts in [1, 3] {
                let got = try GraphPageRank.run(edges: sc.parallelize(es, partitions: 4), iterations: 5, damping: 0.85, partitions: parts).collect()
                assertClose(got, want, "\(what), \(parts) partitions")
            }
        }
    }

    func testEmptyAndTinyGraphs() throws {
        let sc = DataflowContext(executor: LocalExecutor(threads: 2))
        XCTAssertEqual(try GraphPageRank.run(edges: sc.parallelize([(Int, Int)](), partitions: 3), iterations: 3, damping: 0.85).count(), 0)
        // One edge a -> b: b gets 0.15 + 0.85 * 1; a receives nothing and drops out.
        let one = try GraphPageRank.run(edges: sc.parallelize([(1, 2)], partitions: 2), iterations: 1, damping: 0.85).collect()
        XCTAssertEqual(one.map(\.0), [2])
        XCTAssertEqual(one[0].1, 1.0, accuracy: 1e-12)
        // A self-loop keeps its vertex ranked.
        let loop = try GraphPageRank.run(edges: sc.parallelize([(7, 7), (7, 7)], partitions: 2), iterations: 4, damping: 0.85).collect()
        XCTAssertEqual(loop.map(\.0), [7])
        XCTAssertEqual(loop[0].1, 1.0, accuracy: 1e-12)
    }

    /// Under a tiny memory bound the edge and message shuffles go to disk
    /// (whole blocks, through their codecs) and the answer is the same.
    func testATinyMemoryBoundSpillsBlocksAndGivesTheSameRanks() throws {
        let es = randomEdges(4, vertices: 3000, edges: 20_000)
        let want = reference(es, iterations: 5, damping: 0.85)
        let sc = DataflowContext(executor: LocalExecutor(threads: 2), memoryBytesMax: 256 << 10)
        let got = try GraphPageRank.run(edges: sc.parallelize(es, partitions: 4), iterations: 5, damping: 0.85).collect()
        assertClose(got, want, "bounded")
        XCTAssertGreaterThan(sc.totalMetrics.bytesSpilled, 0, "blocks were written to disk")
    }

    /// Kills the executor's pool in the middle of the iterations: the
    /// persisted links and vertices and every shuffle output die with it,
    /// the scheduler replans, and the ranks are the same.
    func testKillingThePoolMidIterationGivesTheSameRanks() throws {
        let es = randomEdges(5, vertices: 1500, edges: 9000)
        let want = reference(es, iterations: 6, damping: 0.85)
        let executor = LocalExecutor(threads: 2)
        let sc = DataflowContext(executor: executor)
        let once = Once()
        let stages = Once.Counter()
        sc.afterStage = { _ in stages.add() }
        sc.failTask = { _, _ in
            // After the set-up stages and two iterations.
            if stages.value >= 4, once.first() { executor.kill() }
            return false
        }
        let got = try GraphPageRank.run(edges: sc.parallelize(es, partitions: 4), iterations: 6, damping: 0.85).collect()
        assertClose(got, want, "after the kill")
        XCTAssertEqual(executor.kills, 1)
        XCTAssertEqual(sc.lastJobMetrics.executorsLost, 1)
        XCTAssertGreaterThan(sc.lastJobMetrics.recomputedPartitions, 0, "lost partitions were recomputed from lineage")
    }

    func testRadixSortMatchesSort() {
        var rng = SplitMix(seed: 8)
        for n in [0, 1, 2, 1000, 70_000] {
            var xs = (0..<n).map { i in i % 3 == 0 ? rng.next() : rng.next() % 5000 }
            let want = xs.sorted()
            // In chunks of uneven sizes, some empty.
            var chunks: [[UInt64]] = [[]]
            for x in xs {
                if rng.next() % 97 == 0 { chunks.append([]) }
                chunks[chunks.count - 1].append(x)
            }
            chunks.append([])
            XCTAssertEqual(radixSorted(chunks), want, "\(chunks.count) chunks, n = \(n)")
            radixSort(&xs)
            XCTAssertEqual(xs, want, "n = \(n)")
        }
        // Keys that differ in one bit only (one pass), or not at all (none).
        var high = (0..<5000).map { _ in rng.next() % 2 == 0 ? UInt64(7) : 7 | 1 << 63 }
        let wantHigh = high.sorted()
        XCTAssertEqual(radixSorted([Array(high[..<100]), Array(high[100...])]), wantHigh)
        radixSort(&high)
        XCTAssertEqual(high, wantHigh)
        var same = [UInt64](repeating: 42, count: 300)
        radixSort(&same)
        XCTAssertEqual(same, [UInt64](repeating: 42, count: 300))
        XCTAssertEqual(radixSorted([[42], [42, 42]]), [42, 42, 42])
    }

    func testBlockCodecsRoundTrip() throws {
        let words: [Int] = [0, -1, Int.max, Int.min, 42]
        var w = ByteWriter()
        words.encode(to: &w)
        [1.5, -0.0, .infinity].encode(to: &w)
        MessageBlock(from: 3, sum: [1, 2.5, 0], got: [true, false, true]).encode(to: &w)
        EdgeBlock(srcs: ["a", "b"], dsts: ["c", "d"]).encode(to: &w)
        try w.bytes.withUnsafeBytes { buf in
            var r = ByteReader(buf)
            XCTAssertEqual(try [Int].decode(from: &r), words)
            XCTAssertEqual(try [Double].decode(from: &r), [1.5, -0.0, .infinity])
            let m = try MessageBlock.decode(from: &r)
            XCTAssertEqual(m.from, 3)
            XCTAssertEqual(m.sum, [1, 2.5, 0])
            XCTAssertEqual(m.got, [true, false, true])
            let e = try EdgeBlock<String>.decode(from: &r)
            XCTAssertEqual(e.srcs, ["a", "b"])
            XCTAssertEqual(e.dsts, ["c", "d"])
            XCTAssertTrue(r.isAtEnd)
        }
        // A word array that claims more than the bytes hold is refused.
        var bad = ByteWriter()
        bad.int(1000)
        bad.u64(1)
        try bad.bytes.withUnsafeBytes { buf in
            var r = ByteReader(buf)
            XCTAssertThrowsError(try [Int].decode(from: &r))
        }
    }

    /// `src dst` lines parsed from a text file's bytes: blank, three-field,
    /// non-numeric and overlong lines are counted, never dropped silently.
    func testIntegerEdgesFromAFileCountMalformedLines() throws {
        let path = NSTemporaryDirectory() + "weft-graph-\(UInt64.random(in: 0...UInt64.max)).txt"
        defer { try? FileManager.default.removeItem(atPath: path) }
        let text = "1 2\n3\t4\n\n5 6 7\nx 1\n  8   9  \n1234567890123456789 1\n12 13\r\n10 11"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        let sc = DataflowContext(executor: LocalExecutor(threads: 2))
        let bad = sc.accumulator("malformed")
        let edges = try BuiltinJobs.integerEdges(sc.textFile(path, partitions: 3), malformed: bad).collect()
        XCTAssertEqual(edges.map { "\($0.0)>\($0.1)" }.sorted(), ["1>2", "10>11", "12>13", "3>4", "8>9"].sorted())
        XCTAssertEqual(bad.value, 3, "three fields, a letter, 19 digits; the blank line is skipped, CRLF is fine")
        // Rows that are not a file's lines may hold a newline: it is not
        // whitespace, so such a row is malformed, not an edge.
        let bad2 = sc.accumulator("malformed rows")
        let fromRows = try BuiltinJobs.integerEdges(sc.parallelize(["1 2\n", "\n", "3 4", " \t"], partitions: 2), malformed: bad2).collect()
        XCTAssertEqual(fromRows.map { "\($0.0)>\($0.1)" }, ["3>4"])
        XCTAssertEqual(bad2.value, 2)
    }

    /// Raw bytes that are not UTF-8 (Latin-1) do not swallow the next
    /// characters: a lead byte takes only real continuation bytes.
    func testTokensOfInvalidUTF8() {
        let bytes: [UInt8] = Array("caf".utf8) + [0xE9] + Array(" au\u{3000}lait".utf8)
        var tokens: [String] = []
        bytes.withUnsafeBufferPointer { forEachWhitespaceToken($0) { tokens.append($0) } }
        XCTAssertEqual(tokens, ["caf\u{FFFD}", "au", "lait"], "an ideographic space still separates")
    }

    /// The packed edge 2^32-1 -> 2^32-1, alone in its partition.
    func testTheLargestPackedEdge() throws {
        let sc = DataflowContext(executor: LocalExecutor(threads: 2))
        let v = Int(UInt32.max)
        let got = try GraphPageRank.run(edges: sc.parallelize([(v, v), (v, v)], partitions: 1), iterations: 2, damping: 0.85, partitions: 1).collect()
        XCTAssertEqual(got.map(\.0), [v])
        XCTAssertEqual(got[0].1, 1.0, accuracy: 1e-12)
    }

    /// The lineage shows the persisted links and vertices and one shuffle
    /// per set-up step and per iteration.
    func testLineageShowsTheGraphPlan() {
        let sc = DataflowContext(executor: LocalExecutor(threads: 2))
        let text = GraphPageRank.run(edges: sc.parallelize([(1, 2)], partitions: 2), iterations: 2, damping: 0.85).toDebugString()
        XCTAssertTrue(text.contains("links(CSR, distinct edges)") && text.contains("persisted memory"), text)
        XCTAssertTrue(text.contains("vertices(slots, routing)"), text)
        XCTAssertTrue(text.contains("shuffle 4 into 2 partitions: stage boundary"), "two set-up shuffles and two iterations: \(text)")
        XCTAssertFalse(text.contains("shuffle 5"), text)
    }
}
