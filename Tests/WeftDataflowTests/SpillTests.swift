import XCTest
import WeftCore
@testable import WeftDataflow

/// Past the memory bound, shuffle data and caches go to disk and come back
/// unchanged; results equal a plain-Swift reference.
final class SpillTests: XCTestCase {
    /// Random words with a skewed distribution and one giant key.
    func words(_ n: Int, seed: UInt64) -> [String] {
        var rng = SplitMix(seed: seed)
        return (0..<n).map { _ in
            let r = rng.next() % 100
            return r < 30 ? "giant" : r < 60 ? "w\(rng.next() % 50)" : "w\(rng.next() % 20_000)"
        }
    }

    func reference(_ ws: [String]) -> [String: Int] {
        var m: [String: Int] = [:]
        for w in ws { m[w, default: 0] += 1 }
        return m
    }

    func testShuffleSpillsPastTheBoundAndGivesTheSameCounts() throws {
        let ws = words(60_000, seed: 5)
        let expected = reference(ws)
        // 64 KiB: far less than the map-side combine tables need.
        let sc = DataflowContext(executor: LocalExecutor(threads: 2), memoryBytesMax: 64 << 10)
        let counts = try sc.parallelize(ws, partitions: 6).map { ($0, 1) }.reduceByKey(partitions: 4, +).collect()
        XCTAssertEqual(counts.count, expected.count, "one row per distinct word")
        XCTAssertEqual(Dictionary(uniqueKeysWithValues: counts), expected)
        let m = sc.lastJobMetrics
        XCTAssertGreaterThan(m.bytesSpilled, 0, "the combine tables did not fit and must have spilled")
        XCTAssertGreaterThan(m.spillFiles, 1)
        XCTAssertLessThanOrEqual(sc.peakPoolBytes, 64 << 10, "the pool never goes past its bound")
        // The same job with room to spare spills nothing.
        let roomy = DataflowContext(executor: LocalExecutor(threads: 2))
        XCTAssertEqual(Dictionary(uniqueKeysWithValues: try roomy.parallelize(ws, partitions: 6).map { ($0, 1) }.reduceByKey(partitions: 4, +).collect()), expected)
        XCTAssertEqual(roomy.lastJobMetrics.bytesSpilled, 0)
    }

    /// An iterative job (a chain of shuffles) under a bound that holds only
    /// a few shuffles' outputs: older outputs move to disk whole, one file
    /// per map output, oldest first, while the newest stay in memory.
    func testOlderShuffleOutputsMoveToDiskWholeForNewerOnes() throws {
        let keys = 2_000, rounds = 8
        let sc = DataflowContext(executor: LocalExecutor(threads: 2), memoryBytesMax: 256 << 10)
        var x = sc.parallelize((0..<20_000).map { ($0 % keys, 1) }, partitions: 4)
        var ref: [Int: Int] = [:]
        for i in 0..<20_000 { ref[i % keys, default: 0] += 1 }
        for _ in 0..<rounds {
            x = x.map { (($0.0 * 7 + 3) % keys, $0.1) }.reduceByKey(partitions: 4, +)
            var next: [Int: Int] = [:]
            for (k, v) in ref { next[(k * 7 + 3) % keys, default: 0] += v }
            ref = next
        }
        XCTAssertEqual(Dictionary(uniqueKeysWithValues: try x.collect()), ref)
        XCTAssertLessThanOrEqual(sc.peakPoolBytes, 256 << 10)
        let outputs = sc.shuffles.outputs
        let ids = outputs.keys.sorted()
        XCTAssertEqual(ids.count, rounds)
        let first = outputs[ids[0]]!.values, last = outputs[ids.last!]!.values
        XCTAssertTrue(first.allSatisfy { $0.memoryBytes == 0 && !$0.runs.isEmpty }, "the oldest shuffle went to disk")
        XCTAssertTrue(last.allSatisfy { $0.memoryBytes > 0 && $0.runs.isEmpty }, "the newest stayed in memory, unspilled")
        // One file per demoted output, plus the first stage's own spills
        // (its four combine tables alone need more than the bound).
        XCTAssertLessThanOrEqual(sc.lastJobMetrics.spillFiles, rounds * 4 + 4, "no map task left spilling crumbs")
    }

    /// Spill directories of processes that are gone are removed; a live
    /// process's are kept.
    func testOrphanedSpillDirectoriesOfDeadProcessesAreRemoved() throws {
        var dead: Int32 = 4_000_000
        while kill(dead, 0) == 0 || errno != ESRCH { dead -= 1 }
        let tmp = NSTemporaryDirectory()
        let orphan = tmp + "weft-spill-\(dead)-orphantest", mine = tmp + "weft-spill-\(getpid())-minetest"
        for d in [orphan, mine] { try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true) }
        defer { try? FileManager.default.removeItem(atPath: mine) }
        SpillDirectory.removeOrphans(force: true)
        XCTAssertFalse(FileManager.default.fileExists(atPath: orphan), "a dead process's directory is removed")
        XCTAssertTrue(FileManager.default.fileExists(atPath: mine), "a live process's directory is kept")
    }

    /// Shuffled values that are tuples spill through a codec that learns
    /// the tuple's layout from the rows written; the reader shares it.
    /// (Before, the reader had a codec of its own that had never seen a
    /// row, and every spilled bucket failed to decode.)
    func testTupleValuesSpillAndReadBack() throws {
        let rows = (0..<20_000).map { ($0 % 997, ($0, "v\($0)")) }
        let sc = DataflowContext(executor: LocalExecutor(threads: 2), memoryBytesMax: 32 << 10)
        let got = try sc.parallelize(rows, partitions: 4).partitionBy(HashPartitioner(3)).collect()
        XCTAssertGreaterThan(sc.lastJobMetrics.bytesSpilled, 0)
        XCTAssertEqual(got.map { "\($0.0) \($0.1.0) \($0.1.1)" }.sorted(), rows.map { "\($0.0) \($0.1.0) \($0.1.1)" }.sorted())
    }

    /// A shuffle's outputs, in memory and in spill files, go when the last
    /// RDD that can read it is released; a live RDD's stay for reuse.
    func testShuffleOutputsGoWithTheirLastRDD() throws {
        let sc = DataflowContext(executor: LocalExecutor(threads: 2), memoryBytesMax: 32 << 10)
        let kept = sc.parallelize((0..<5000).map { ($0 % 300, $0) }, partitions: 4).reduceByKey(+)
        XCTAssertEqual(try kept.count(), 300)
        func filesInSpillDir() -> Int { (try? FileManager.default.contentsOfDirectory(atPath: sc.spillDirectory.path).count) ?? 0 }
        do {
            let dropped = sc.parallelize((0..<20_000).map { ("k\($0 % 2000)", $0) }, partitions: 4).groupByKey()
            XCTAssertEqual(try dropped.count(), 2000)
            XCTAssertEqual(sc.shuffles.outputs.count, 2)
            XCTAssertGreaterThan(filesInSpillDir(), 0, "the groupByKey spilled")
        }
        XCTAssertEqual(sc.shuffles.outputs.count, 1, "the released RDD's shuffle is gone")
        XCTAssertEqual(try kept.count(), 300)
        XCTAssertEqual(sc.lastJobMetrics.stages, 1, "the live RDD's shuffle output was reused")
    }

    func testGroupByKeyWithAGiantKeySpillsAndKeepsEveryValue() throws {
        let ws = words(40_000, seed: 9)
        let sc = DataflowContext(executor: LocalExecutor(threads: 2), memoryBytesMax: 32 << 10)
        let groups = try sc.parallelize(Array(ws.enumerated()), partitions: 5).map { ($0.element, $0.offset) }.groupByKey(3).collect()
        var expected: [String: [Int]] = [:]
        for (i, w) in ws.enumerated() { expected[w, default: []].append(i) }
        XCTAssertEqual(groups.count, expected.count)
        for (k, vs) in groups { XCTAssertEqual(vs.sorted(), expected[k], "values of \(k)") }
        XCTAssertGreaterThan(sc.lastJobMetrics.bytesSpilled, 0)
    }

    /// Many distinct keys per reduce partition under a small bound: the
    /// reduce side's merge tables go to disk as sorted runs and are merged
    /// back, for Int, String and other keys, and for keys whose hashes
    /// collide (merged by ==). Counting streams the merged rows.
    func testReduceSideMergeTablesSpillAndMergeBack() throws {
        let bound = 256 << 10
        var rng = SplitMix(seed: 17)
        let ints = (0..<50_000).map { _ in (Int(rng.next() % 25_000) - 12_500, Int(rng.next() % 100)) }
        var ref: [Int: Int] = [:]
        for (k, v) in ints { ref[k, default: 0] += v }

        func check<K: Hashable>(_ name: String, _ key: @escaping (Int) -> K) throws {
            let sc = DataflowContext(executor: LocalExecutor(threads: 2), memoryBytesMax: bound)
            let sums = sc.parallelize(ints, partitions: 4).map { (key($0.0), $0.1) }.reduceByKey(partitions: 2, +)
            let got = try sums.collect()
            XCTAssertEqual(got.count, ref.count, name)
            let byKey = Dictionary(uniqueKeysWithValues: got)
            for (k, v) in ref { XCTAssertEqual(byKey[key(k)], v, "\(name) \(k)") }
            XCTAssertGreaterThan(sc.lastJobMetrics.mergeSpillFiles, 0, "\(name): the merge tables must have spilled")
            XCTAssertLessThanOrEqual(sc.peakPoolBytes, bound, name)
            XCTAssertEqual(try sums.count(), ref.count, name)
            XCTAssertEqual(try sums.map(\.1).reduce(+), ref.values.reduce(0, +), name)
        }
        try check("Int") { $0 }
        try check("String") { "key-\($0)" }
        try check("UInt64") { UInt64(bitPattern: Int64($0)) }
        try check("colliding") { CollidingKey(v: $0) }
    }

    /// More runs than one merge may read (a 64 KiB pool merges 4 at a
    /// time): runs are merged into runs first, and every sum is right.
    func testManyRunsAreMergedInPassesWithinTheFanIn() throws {
        let bound = 64 << 10
        var rng = SplitMix(seed: 41)
        let pairs = (0..<60_000).map { _ in ("w\(rng.next() % 20_000)", 1) }
        var ref: [String: Int] = [:]
        for (k, v) in pairs { ref[k, default: 0] += v }
        let sc = DataflowContext(executor: LocalExecutor(threads: 2), memoryBytesMax: bound)
        let counts = try sc.parallelize(pairs, partitions: 4).reduceByKey(partitions: 1, +).collect()
        XCTAssertEqual(Dictionary(uniqueKeysWithValues: counts), ref)
        let m = sc.lastJobMetrics
        XCTAssertGreaterThan(m.mergeSpillFiles, 4, "more runs than the fan-in")
        XCTAssertGreaterThan(m.mergePasses, 0, "runs were merged into runs")
        let left = (try? FileManager.default.contentsOfDirectory(atPath: sc.spillDirectory.path)) ?? []
        XCTAssertEqual(left.filter { $0.contains("-reduce-") }, [], "merged and final runs are removed")
    }

    /// An inner join whose hash table the pool refuses is joined through a
    /// bounded merge instead: every pair, as with room, for Int, String and
    /// colliding keys (the Dictionary path).
    func testJoinsWhoseTableDoesNotFitSpillAndKeepEveryPair() throws {
        var rng = SplitMix(seed: 53)
        let a = (0..<12_000).map { _ in (Int(rng.next() % 3000), Int(rng.next() % 1000)) }
        let b = (0..<12_000).map { _ in (Int(rng.next() % 3000), Int(rng.next() % 1000)) }
        var byKey: [Int: [Int]] = [:]
        for (k, w) in b { byKey[k, default: []].append(w) }
        var want: [String] = []
        for (k, v) in a { for w in byKey[k] ?? [] { want.append("\(k) \(v) \(w)") } }
        want.sort()

        func check<K: Hashable>(_ name: String, _ key: @escaping (Int) -> K, _ back: @escaping (K) -> Int) throws {
            for (bound, spills) in [(512 << 20, false), (128 << 10, true)] {
                let sc = DataflowContext(executor: LocalExecutor(threads: 2), memoryBytesMax: bound)
                let left = sc.parallelize(a, partitions: 3).map { (key($0.0), $0.1) }
                let right = sc.parallelize(b, partitions: 3).map { (key($0.0), $0.1) }
                let got = try left.join(right, partitions: 2).collect().map { "\(back($0.0)) \($0.1.0) \($0.1.1)" }.sorted()
                XCTAssertEqual(got.count, want.count, "\(name), bound \(bound)")
                XCTAssertTrue(got == want, "\(name), bound \(bound): the pairs differ")
                let m = sc.lastJobMetrics
                XCTAssertEqual(m.spilledJoins > 0, spills, "\(name), bound \(bound): \(m.spilledJoins) spilled joins")
                if spills { XCTAssertGreaterThan(m.mergeSpillFiles, 0, "\(name): the merge wrote runs") }
            }
        }
        try check("Int", { $0 }, { $0 })
        try check("String", { "key-\($0)" }, { Int($0.dropFirst(4))! })
        try check("colliding", { CollidingKey(v: $0) }, { $0.v })
    }

    func testMergeHeapPopsInOrder() {
        var heap = MergeHeap()
        var rng = SplitMix(seed: 3)
        var want: [(Int, Int)] = []
        for s in 0..<500 {
            let h = Int(rng.next() % 50)
            heap.push(h, s)
            want.append((h, s))
        }
        want.sort { $0.0 < $1.0 || ($0.0 == $1.0 && $0.1 < $1.1) }
        var got: [(Int, Int)] = []
        while let x = heap.pop() { got.append((x.hash, x.source)) }
        XCTAssertEqual(got.map(\.0), want.map(\.0))
        XCTAssertEqual(got.map(\.1), want.map(\.1))
    }

    /// groupByKey's arrays count against the bound as they grow, on both
    /// sides of the shuffle.
    func testGroupsCountAgainstTheBoundAsTheyGrow() throws {
        let bound = 128 << 10
        let sc = DataflowContext(executor: LocalExecutor(threads: 2), memoryBytesMax: bound)
        // Few keys, many values each: no new keys, only growing groups.
        let pairs = (0..<200_000).map { ($0 % 40, $0) }
        let groups = try sc.parallelize(pairs, partitions: 4).groupByKey(2).collect()
        XCTAssertEqual(groups.count, 40)
        for (k, vs) in groups { XCTAssertEqual(vs.sorted(), Array(stride(from: k, to: 200_000, by: 40))) }
        XCTAssertGreaterThan(sc.lastJobMetrics.mergeSpillFiles, 0)
        XCTAssertLessThanOrEqual(sc.peakPoolBytes, bound)
    }

    /// cogroup (and the outer joins built on it) groups both sides in the
    /// same bounded merge: many keys under a small bound spill and come
    /// back with every value of both sides.
    func testCogroupSpillsItsGroupsAndKeepsEveryValue() throws {
        let bound = 128 << 10
        var rng = SplitMix(seed: 29)
        let a = (0..<30_000).map { _ in ("k\(rng.next() % 12_000)", Int(rng.next() % 1000)) }
        let b = (0..<20_000).map { _ in ("k\(rng.next() % 15_000)", Int(rng.next() % 1000)) }
        var ref: [String: ([Int], [Int])] = [:]
        for (k, v) in a { ref[k, default: ([], [])].0.append(v) }
        for (k, w) in b { ref[k, default: ([], [])].1.append(w) }
        let sc = DataflowContext(executor: LocalExecutor(threads: 2), memoryBytesMax: bound)
        let groups = try sc.parallelize(a, partitions: 3).cogroup(sc.parallelize(b, partitions: 2), partitions: 2).collect()
        XCTAssertEqual(groups.count, ref.count)
        for (k, (vs, ws)) in groups {
            XCTAssertEqual(vs.sorted(), ref[k]!.0.sorted(), k)
            XCTAssertEqual(ws.sorted(), ref[k]!.1.sorted(), k)
        }
        XCTAssertGreaterThan(sc.lastJobMetrics.mergeSpillFiles, 0)
        XCTAssertLessThanOrEqual(sc.peakPoolBytes, bound)
        let outer = try sc.parallelize(a, partitions: 3).fullOuterJoin(sc.parallelize(b, partitions: 2)).count()
        XCTAssertEqual(outer, ref.values.reduce(0) { $0 + Swift.max($1.0.count, 1) * Swift.max($1.1.count, 1) })
    }

    /// A combine over an RDD already partitioned by key needs no shuffle,
    /// and its table is bounded like a reduce's.
    func testCombineWithoutAShuffleIsBoundedToo() throws {
        let bound = 128 << 10
        var rng = SplitMix(seed: 31)
        let pairs = (0..<40_000).map { _ in ("k\(rng.next() % 20_000)", Int(rng.next() % 100)) }
        var sums: [String: Int] = [:], groups: [String: [Int]] = [:]
        for (k, v) in pairs {
            sums[k, default: 0] += v
            groups[k, default: []].append(v)
        }
        let sc = DataflowContext(executor: LocalExecutor(threads: 2), memoryBytesMax: bound)
        let byKey = sc.parallelize(pairs, partitions: 3).partitionBy(HashPartitioner(2)).persist(.disk)
        _ = try byKey.count()
        let reduced = byKey.reduceByKey(partitions: 2, +)
        XCTAssertEqual(Dictionary(uniqueKeysWithValues: try reduced.collect()), sums)
        XCTAssertEqual(sc.lastJobMetrics.stages, 1, "no shuffle: the parent is partitioned like the result")
        XCTAssertGreaterThan(sc.lastJobMetrics.mergeSpillFiles, 0)
        let grouped = try byKey.groupByKey(2).collect()
        XCTAssertEqual(grouped.count, groups.count)
        for (k, vs) in grouped { XCTAssertEqual(vs.sorted(), groups[k]!.sorted(), k) }
        XCTAssertLessThanOrEqual(sc.peakPoolBytes, bound)
    }

    /// A task that fails after it spilled gives back its memory and
    /// removes its files: map tasks (their writer) and reduce tasks (their
    /// merge table) alike. Once the job's RDDs are gone, the pool is empty
    /// and no spill file is left.
    func testFailedTasksGiveBackTheirMemoryAndFiles() throws {
        struct Boom: Error {}
        let sc = DataflowContext(executor: LocalExecutor(threads: 2), memoryBytesMax: 128 << 10)
        func files() -> Int { (try? FileManager.default.contentsOfDirectory(atPath: sc.spillDirectory.path).count) ?? 0 }
        do {
            // Map side: every attempt fails after 30,000 rows, well past its first spill.
            let failing = sc.parallelize(Array(0..<80_000), partitions: 2).map { x -> (Int, Int) in
                if x % 40_000 == 30_000 { throw Boom() }
                return (x, 1)
            }.reduceByKey(partitions: 2, +)
            XCTAssertThrowsError(try failing.count())
            XCTAssertGreaterThan(sc.lastJobMetrics.spillFiles, 0, "the failed attempts had spilled")
            // Reduce side: the merge fails in the consumer after its tables spilled.
            let sums = sc.parallelize(Array(0..<60_000), partitions: 2).map { ($0, 1) }.reduceByKey(partitions: 2, +)
            XCTAssertThrowsError(try sums.foreach { kv in if kv.0 == 59_999 { throw Boom() } })
            XCTAssertGreaterThan(sc.lastJobMetrics.mergeSpillFiles, 0, "the merge had spilled")
        }
        XCTAssertEqual(sc.memory.inUse, 0, "every byte went back to the pool")
        XCTAssertEqual(files(), 0, "no spill file is left")
    }

    func testLostSpillFilesResubmitTheMapStage() throws {
        let ws = words(30_000, seed: 3)
        let sc = DataflowContext(executor: LocalExecutor(threads: 2), memoryBytesMax: 16 << 10)
        let counts = sc.parallelize(ws, partitions: 4).map { ($0, 1) }.reduceByKey(partitions: 3, +)
        var removed = false
        sc.afterStage = { [unowned sc] stage in
            if stage == 1 && !removed {
                // The disk under the shuffle is lost between the stages.
                removed = true
                try? FileManager.default.removeItem(atPath: sc.spillDirectory.path)
            }
        }
        XCTAssertEqual(Dictionary(uniqueKeysWithValues: try counts.collect()), reference(ws))
        XCTAssertTrue(removed)
        XCTAssertGreaterThan(sc.lastJobMetrics.stageResubmissions, 0, "unreadable map output is lost output: the map stage runs again")
    }

    func testDiskLevelBlocksAreReadBackNotRecomputed() throws {
        let sc = DataflowContext(executor: LocalExecutor(threads: 2))
        let r = sc.parallelize(Array(0..<5000), partitions: 8).map { "row-\($0)" }.persist(.disk)
        XCTAssertEqual(try r.count(), 5000)
        XCTAssertEqual(sc.memory.inUse, 0, "disk blocks take no memory")
        XCTAssertGreaterThan(sc.lastJobMetrics.bytesSpilled, 0)
        let all = try r.collect()
        XCTAssertEqual(all, (0..<5000).map { "row-\($0)" })
        XCTAssertEqual(sc.lastJobMetrics.diskBlockReads, 8)
        XCTAssertEqual(sc.lastJobMetrics.recomputedPartitions, 0)
        XCTAssertTrue(r.toDebugString().contains("8 of them on disk"), r.toDebugString())
    }

    func testMemoryAndDiskMovesEvictedBlocksToDisk() throws {
        // Room for about two of the eight partitions.
        let sc = DataflowContext(executor: LocalExecutor(threads: 1), memoryBytesMax: 40 << 10)
        let pairs = sc.parallelize(Array(0..<8000), partitions: 8).map { ($0 % 97, Double($0)) }.persist(.memoryAndDisk)
        let expected = (0..<8000).reduce(0.0) { $0 + Double($1) }
        XCTAssertEqual(try pairs.values().reduce(+), expected)
        XCTAssertGreaterThan(sc.blocks.onDisk(rdd: pairs.id), 0, "evicted blocks went to disk")
        XCTAssertEqual(sc.blocks.cachedPartitions(rdd: pairs.id), 8, "and none was dropped")
        XCTAssertEqual(try pairs.values().reduce(+), expected)
        XCTAssertEqual(sc.lastJobMetrics.recomputedPartitions, 0, "every partition came from memory or disk")
        XCTAssertGreaterThan(sc.lastJobMetrics.diskBlockReads, 0)

        // The same with `.memory`: evicted blocks are gone and recomputed.
        let sc2 = DataflowContext(executor: LocalExecutor(threads: 1), memoryBytesMax: 40 << 10)
        let pairs2 = sc2.parallelize(Array(0..<8000), partitions: 8).map { ($0 % 97, Double($0)) }.persist(.memory)
        XCTAssertEqual(try pairs2.values().reduce(+), expected)
        XCTAssertEqual(try pairs2.values().reduce(+), expected)
        XCTAssertGreaterThan(sc2.lastJobMetrics.recomputedPartitions, 0)
    }

    func testTypesWithoutACodecStayInMemoryAndSaySo() throws {
        struct Opaque { let n: Int }
        let sc = DataflowContext(executor: LocalExecutor(threads: 1), memoryBytesMax: 8 << 10)
        let r = sc.parallelize(Array(0..<20_000), partitions: 2).map { ($0 % 1000, Opaque(n: $0)) }
            .combineByKey({ [$0] }, { $0 + [$1] }, { $0 + $1 }, partitions: 2)
        let rows = try r.collect()
        XCTAssertEqual(rows.count, 1000)
        XCTAssertEqual(rows.reduce(0) { $0 + $1.1.count }, 20_000)
        XCTAssertEqual(sc.lastJobMetrics.bytesSpilled, 0)
        XCTAssertGreaterThan(sc.lastJobMetrics.unspillableBytes, 0, "memory held past the bound is reported")
    }

    func testCodecsRoundTrip() throws {
        func roundTrip<T: SpillCodable & Equatable>(_ x: T) throws {
            var w = ByteWriter()
            x.encode(to: &w)
            let back = try w.bytes.withUnsafeBytes { buf -> T in
                var r = ByteReader(buf)
                return try T.decode(from: &r)
            }
            XCTAssertEqual(back, x)
        }
        try roundTrip(-42)
        try roundTrip(3.25)
        try roundTrip("héllo wörld")
        try roundTrip([[1, 2], [], [3]])
        try roundTrip([Optional("a"), nil])
        try roundTrip(Array("bytes".utf8))
        // Tuples of codable components, found by reflection.
        let c = try XCTUnwrap(BlockCodec<(String, Double, [Int]?)>.automatic())
        let rows: [(String, Double, [Int]?)] = [("a", 1.5, [1, 2]), ("héllo", -0.0, nil), ("", 3, [])]
        XCTAssertTrue(c.accepts(rows[0]))
        let bytes = SpillFormatBlock.encode(rows, c)
        let back = try SpillFormat.decodeAll(bytes[...], c)
        XCTAssertEqual(back.map(\.0), rows.map(\.0))
        XCTAssertEqual(back.map(\.1), rows.map(\.1))
        XCTAssertEqual(back.map(\.2), rows.map(\.2))
        struct Opaque { let n: Int }
        XCTAssertFalse(BlockCodec<(Int, Opaque)>.automatic()!.accepts((1, Opaque(n: 2))), "a component without a codec")
        XCTAssertFalse(BlockCodec<Opaque>.automatic()!.accepts(Opaque(n: 1)), "not a tuple")
    }
}

/// A key whose hashes collide often: the spilled merge must still keep
/// keys apart by `==`.
struct CollidingKey: Hashable, SpillCodable {
    let v: Int
    func hash(into h: inout Hasher) { h.combine(v % 4093) }
    func encode(to w: inout ByteWriter) { v.encode(to: &w) }
    static func decode(from r: inout ByteReader) throws(DecodeError) -> CollidingKey { CollidingKey(v: try Int.decode(from: &r)) }
}
