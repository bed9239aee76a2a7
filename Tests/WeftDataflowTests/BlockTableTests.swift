import XCTest
import WeftCore
import WeftRuntime
@testable import WeftDataflow

/// Tables stored as blocks: streaming loads keep bytes exactly, replicas
/// cover a missing or corrupt block, a damaged table is an error naming
/// the block (never wrong rows), and the per-row layout is still read.
final class BlockTableTests: XCTestCase {
    /// Found by the block fuzz target: a row length of 2^63 in a block
    /// with a valid checksum trapped converting it to Int; now an error.
    func testAForgedRowLengthIsAnErrorNotATrap() throws {
        for kind: UInt8 in [1, 2] {
            var body: [UInt8] = kind == 1 ? [0] : []   // a lines block starts with its first line number
            body += [0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01]   // varint 2^63
            var block = Array("WBLK".utf8) + [Blocks.version, kind]
            withUnsafeBytes(of: body.withUnsafeBytes { blockChecksum($0) }.littleEndian) { block += $0 }
            block += body
            XCTAssertThrowsError(try TableStore.forEachRow(block, what: "forged") { _, _, _ in }) { e in
                XCTAssertTrue("\(e)".contains("past the block's end"), "\(e)")
            }
        }
        // A first line number of 2^64 - 1 and two lines: the count wraps, no trap.
        var body: [UInt8] = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 1, 65, 1, 66]
        var block = Array("WBLK".utf8) + [Blocks.version, 1]
        withUnsafeBytes(of: body.withUnsafeBytes { blockChecksum($0) }.littleEndian) { block += $0 }
        block += body
        var lines = 0
        try TableStore.forEachRow(block, what: "wrap") { _, _, _ in lines += 1 }
        XCTAssertEqual(lines, 2)
        body.removeAll()
    }

    var dir = ""
    override func setUp() {
        dir = NSTemporaryDirectory() + "weft-blocks-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func write(_ name: String, _ bytes: Bytes) -> String {
        let path = dir + "/" + name
        FileManager.default.createFile(atPath: path, contents: Data(bytes))
        return path
    }

    /// Many blocks, every line's bytes back exactly (invalid UTF-8, CR,
    /// empty lines, a last line without newline), in line order.
    func testStreamingLoadKeepsBytesAndLineOrderAcrossBlocks() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir + "/data")
        defer { cluster.close() }
        let c = cluster.client()
        var lines: [Bytes] = []
        var g = SystemRandomNumberGenerator()
        for i in 0..<40_001 {
            switch i % 7 {
            case 0: lines.append([0xff, 0xfe, 0x80] + Array("bad \(i)".utf8))
            case 1: lines.append([])
            case 2: lines.append(Array("crlf \(i)\r".utf8))
            default: lines.append((0..<Int.random(in: 1...120, using: &g)).map { _ in UInt8.random(in: 32...126, using: &g) })
            }
        }
        var file = Bytes()
        for l in lines { file += l + [10] }
        file.removeLast()   // no newline after the last line
        let path = write("in.txt", file)
        let r = try await TableStore.load(c, "t", path: path, format: "lines", overwrite: false, replicas: 2)
        XCTAssertEqual(r.rows, lines.count)
        XCTAssertEqual(r.bytes, file.count)
        let infoMaybe = try await TableStore.info(c, "t")
        let info = try XCTUnwrap(infoMaybe)
        XCTAssertTrue(info.blocks)
        XCTAssertEqual(info.replicas, 2)
        XCTAssertGreaterThan(info.blockCount, 1, "a file of \(file.count) bytes is several blocks")
        let scanned = try await TableStore.scan(c, info, at: try await c.now(), limit: Int.max)
        XCTAssertEqual(scanned.map(\.value), lines)
        XCTAssertEqual(scanned.map { String(decoding: $0.key, as: UTF8.self) }, (1...lines.count).map { String(format: "%012d", $0) })
        // A job reads the same rows from the blocks.
        let sc = DataflowContext()
        let fromJob = try await onDriverThread { try sc.table("t", client: c).collect().map { RowBox(key: $0.0, value: $0.1) } }
        XCTAssertEqual(fromJob.sorted { compareBytes($0.key, $1.key) < 0 }.map(\.value), lines)
        let counted = try await onDriverThread { try BuiltinJobs.textLines(try sc.table("t", client: c)).count() }
        XCTAssertEqual(counted, lines.count)
    }

    /// A job's output written by several attempts of one task: after the
    /// flip, a stale attempt's write is refused (the generation's marker
    /// is gone), the blocks an earlier loser wrote are deleted, and the
    /// store holds exactly the winner's blocks, which read back whole.
    func testOutputAttemptsAfterTheFlipAreFencedAndLosersDeleted() throws {
        let cluster = try EmbeddedCluster(dataDir: dir + "/data")
        defer { cluster.close() }
        let c = cluster.client()
        let rows: [(Bytes, Bytes)] = (0..<3000).map { i in (Array(String(format: "k%05d", i).utf8), Bytes(repeating: UInt8(65 + i % 26), count: 1000)) }
        let gen = PartitionedOutput.generation(runId: "fence")
        try PartitionedOutput.begin(c, "out", generation: gen, overwrite: false)
        let base = { (a: Int) in PartitionedOutput.base(action: 0, attempt: a) }
        let loser = try PartitionedOutput.write(c, "out", generation: gen, partition: 0, base: base(0), rows: rows) { _ in [] }
        let winner = try PartitionedOutput.write(c, "out", generation: gen, partition: 0, base: base(1), rows: rows) { _ in [] }
        XCTAssertGreaterThan(winner.blocks, 1, "several blocks per attempt")
        _ = try PartitionedOutput.finish(c, "out", generation: gen, overwrite: false, parts: [winner])
        XCTAssertThrowsError(try PartitionedOutput.write(c, "out", generation: gen, partition: 0, base: base(2), rows: rows) { _ in [] }) { e in
            XCTAssertEqual((e as? WeftError)?.code, .notFound, "\(e)")
            XCTAssertTrue("\(e)".contains("no longer being written"), "\(e)")
        }
        let launched: Set<ResultAttempt> = [ResultAttempt(action: 0, partition: 0, attempt: 0), ResultAttempt(action: 0, partition: 0, attempt: 1),
                                            ResultAttempt(action: 0, partition: 0, attempt: 2)]
        XCTAssertEqual(PartitionedOutput.collectLosers(c, "out", generation: gen, parts: [winner], launched: launched), loser.blocks)
        let stored = try blocking { try await c.scan(prefix: Blocks.setPrefix(TableStore.blockSet("out", gen)), limit: 1000).rows.count }
        XCTAssertEqual(stored, winner.blocks, "only the winner's blocks remain")
        let info = try XCTUnwrap(try blocking { try await TableStore.info(c, "out") })
        let back = try blocking { try await TableStore.scan(c, info, at: try await c.now(), limit: Int.max) }
        XCTAssertEqual(back.map(\.key), rows.map(\.0))
        XCTAssertEqual(back.map(\.value), rows.map(\.1))
    }

    /// A damaged first replica is skipped for the second; with both
    /// damaged the read fails naming the table, partition and block.
    func testCorruptOrMissingReplicaFallsBackElseFailsByName() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir + "/data")
        defer { cluster.close() }
        let c = cluster.client()
        let text = (0..<60_000).map { "line number \($0) of the table" }.joined(separator: "\n")
        let path = write("in.txt", Array(text.utf8))
        try await TableStore.load(c, "t", path: path, format: "lines", overwrite: false, replicas: 2)
        let infoMaybe = try await TableStore.info(c, "t")
        let info = try XCTUnwrap(infoMaybe)
        XCTAssertGreaterThan(info.blockCount, 1)
        func key(_ g: Int, _ j: Int) -> Bytes {
            let (p, i) = info.block(g)
            return Blocks.key(info.blockSet, partition: p, index: i, replica: j, participants: 3)
        }
        // Block 0: a flipped byte in replica 0. Block 1: replica 0 deleted.
        let vMaybe = try await c.get(key(0, 0)).value
        var v = try XCTUnwrap(vMaybe)
        v[v.count / 2] ^= 0x01
        _ = try await c.put(key(0, 0), v)
        _ = try await c.delete(key(1, 0))
        let before = Blocks.fallbacks.value
        let sc = DataflowContext()
        let n = try await onDriverThread { try BuiltinJobs.textLines(try sc.table("t", client: c)).filter { $0.hasPrefix("line number") }.count() }
        XCTAssertEqual(n, 60_000, "every row, from the good replicas")
        XCTAssertGreaterThanOrEqual(Blocks.fallbacks.value - before, 2)
        // Both replicas of block 0 bad: an error naming the block, never rows.
        let wMaybe = try await c.get(key(0, 1)).value
        var w = try XCTUnwrap(wMaybe)
        w[Blocks.headerBytes + 3] ^= 0x40
        _ = try await c.put(key(0, 1), w)
        do {
            _ = try await onDriverThread { try sc.table("t", client: c).count() }
            XCTFail("a block with no good replica must fail the read")
        } catch let e as WeftError {
            XCTAssertEqual(e.code, .corrupted)
            XCTAssertTrue(e.message.contains("table t") && e.message.contains("partition 0 block 0"), e.message)
        }
    }

    /// Refusals lose nothing: a too-long line (by its number), a repeated
    /// kv key and a missing file leave no table and no blocks behind.
    func testRefusedLoadsLeaveNothing() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir + "/data")
        defer { cluster.close() }
        let c = cluster.client()
        var big = Array("short\n".utf8) + Bytes(repeating: 65, count: 3 << 20) + Array("\n".utf8)
        // Enough earlier lines that some blocks were written before the failure.
        big = Bytes(repeating: 66, count: 5 << 20).enumerated().map { $0.offset % 100 == 99 ? 10 : $0.element } + big
        let path = write("long.txt", big)
        do {
            try await TableStore.load(c, "t", path: path, format: "lines", overwrite: false)
            XCTFail("a line over the row limit must be refused")
        } catch let e as WeftError {
            XCTAssertTrue(e.message.contains("long.txt:\((5 << 20) / 100 + 2): line is longer than the row limit"), e.message)
        }
        let dup = write("dup.txt", Array("a\t1\nb\t2\na\t3\n".utf8))
        do {
            try await TableStore.load(c, "k", path: dup, format: "kv", overwrite: false)
            XCTFail("a repeated key must be refused")
        } catch let e as WeftError {
            XCTAssertTrue(e.message.contains("dup.txt:3: key 'a' repeats the key of line 1"), e.message)
        }
        do {
            try await TableStore.load(c, "m", path: dir + "/missing", format: "lines", overwrite: false)
            XCTFail("a missing file must be refused")
        } catch let e as WeftError {
            XCTAssertEqual(e.code, .invalidArgument, "exit 1, not 4 (key not found)")
        }
        let tables = try await TableStore.list(c)
        XCTAssertTrue(tables.isEmpty)
        let blocks = try await c.scan(prefix: Array("b/".utf8), limit: 10).rows.count
        XCTAssertEqual(blocks, 0, "the refused loads' blocks were deleted")
        let markers = try await c.scan(prefix: Array("p/".utf8), limit: 10).rows.count
        XCTAssertEqual(markers, 0)
    }

    /// A kv table scans in key order across blocks, with a small limit (a
    /// sorted window) as with a big one (everything sorted).
    func testKvScanIsInKeyOrderWithAnyLimit() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir + "/data")
        defer { cluster.close() }
        let c = cluster.client()
        var rng = SystemRandomNumberGenerator()
        let rows = (0..<60_000).map { i in (Array("k\(UInt32.random(in: 0...UInt32.max, using: &rng))-\(i)".utf8), Array(String(repeating: "v", count: 20).utf8)) }
        try await TableStore.write(c, "kvs", rows: rows, format: "kv", overwrite: false)
        let infoMaybe = try await TableStore.info(c, "kvs")
        let info = try XCTUnwrap(infoMaybe)
        XCTAssertGreaterThan(info.blockCount, 1)
        let expected = rows.map(\.0).sorted { compareBytes($0, $1) < 0 }
        for limit in [0, 1, 7, 10_000, 10_001, 100_000] {
            let got = try await TableStore.scan(c, info, at: c.now(), limit: limit).map(\.key)
            XCTAssertEqual(got, Array(expected.prefix(limit)), "limit \(limit)")
        }
    }

    /// A table written by an older version, one store entry per row, is
    /// still listed, scanned and read by jobs.
    func testPerRowLayoutIsStillRead() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir + "/data")
        defer { cluster.close() }
        let c = cluster.client()
        let t = try await c.begin()
        let lines = ["a b", "b c", "c"]
        for (i, l) in lines.enumerated() {
            try t.put(TableStore.rowPrefix("old", generation: "g1") + TableStore.lineKey(UInt64(i + 1)), Array(l.utf8))
        }
        try t.put(TableStore.catalogKey("old"), Array("rows=3 format=lines gen=g1".utf8))
        _ = try await t.commit()
        let infoMaybe = try await TableStore.info(c, "old")
        let info = try XCTUnwrap(infoMaybe)
        XCTAssertFalse(info.blocks)
        let rows = try await TableStore.scan(c, info, at: try await c.now(), limit: 10)
        XCTAssertEqual(rows.map { String(decoding: $0.value, as: UTF8.self) }, lines)
        let sc = DataflowContext()
        let counts = try await onDriverThread {
            try BuiltinJobs.wordCount(BuiltinJobs.textLines(try sc.table("old", client: c))).collect().sorted { $0.0 < $1.0 }.map { "\($0.0)=\($0.1)" }
        }
        XCTAssertEqual(counts, ["a=1", "b=2", "c=2"])
        // Dropping it deletes its rows.
        try await TableStore.drop(c, "old")
        let left = try await c.scan(prefix: Array("t/old".utf8), limit: 10).rows.count
        XCTAssertEqual(left, 0)
    }

    /// textFile reads a symlinked file whole (its size, not the link's).
    func testTextFileFollowsSymlinks() throws {
        let path = write("target.txt", Array((0..<5000).map { "row \($0)" }.joined(separator: "\n").utf8))
        let link = dir + "/link.txt"
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: path)
        let sc = DataflowContext()
        XCTAssertEqual(try sc.textFile(link).count(), 5000)
        XCTAssertThrowsError(try sc.textFile(dir)) { XCTAssertTrue("\($0)".contains("not a regular file"), "\($0)") }
    }
}

/// PageRank over a table of integer edges runs on integer vertices; its
/// output table holds the ranks the String job gives. A line that is not
/// two canonical integers (a leading zero) sends the job to String
/// vertices, keeping "01" apart from "1".
final class IntegerPageRankTests: XCTestCase {
    func testIntegerVerticesGiveTheStringJobsRanks() async throws {
        let dir = NSTemporaryDirectory() + "weft-prank-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        var rng = SystemRandomNumberGenerator()
        var lines = (0..<3000).map { _ in "\(Int.random(in: 0..<300, using: &rng)) \(Int.random(in: 0..<300, using: &rng))" }
        lines.append("")
        for (name, ls) in [("ints", lines), ("mixed", lines + ["2 01"])] {
            try await TableStore.write(c, name, rows: ls.map { ([], Array($0.utf8)) }, format: "lines", overwrite: false)
            let sc = DataflowContext()
            var p = JobParameters(input: name)
            p.output = name + "_ranks"
            p.iterations = 5
            let params = p
            let result = try await onDriverThread { try BuiltinJobs.run("pagerank", params, sc: sc, client: c) }
            let reference = try await onDriverThread {
                try BuiltinJobs.pageRank(sc.parallelize(ls, partitions: 3), iterations: 5, damping: 0.85, malformed: sc.accumulator("m")).collect()
            }
            let infoMaybe = try await TableStore.info(c, name + "_ranks")
            let info = try XCTUnwrap(infoMaybe)
            let out = try await TableStore.scan(c, info, at: c.now(), limit: Int.max)
            let got = Dictionary(uniqueKeysWithValues: out.map { (String(decoding: $0.key, as: UTF8.self), Double(String(decoding: $0.value, as: UTF8.self))!) })
            XCTAssertEqual(result.outputRows, reference.count)
            XCTAssertEqual(Set(got.keys), Set(reference.map(\.0)), name)
            for (v, r) in reference { XCTAssertEqual(got[v]!, r, accuracy: 1e-9 * max(1, r), "\(name) vertex \(v)") }
            if name == "mixed" { XCTAssertNotNil(got["01"], "a leading zero keeps its own vertex") }
            let best = reference.max { $0.1 != $1.1 ? $0.1 < $1.1 : $0.0 > $1.0 }!
            XCTAssertTrue(result.summary[1].hasPrefix("top 10: \(best.0) "), result.summary[1])
        }
    }
}
