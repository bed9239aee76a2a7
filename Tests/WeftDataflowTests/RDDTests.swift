import XCTest
@testable import WeftDataflow

/// Every transformation and action against a plain-Swift reference, on
/// random input with empty partitions, skewed keys and one giant key.
final class RDDTests: XCTestCase {
    var sc = DataflowContext(executor: LocalExecutor(threads: 2))
    var pairs: [(String, Int)] = []
    var other: [(String, Int)] = []

    override func setUp() {
        sc = DataflowContext(executor: LocalExecutor(threads: 2))
        var rng = SplitMix(seed: 11)
        pairs = (0..<3000).map { i in
            let r = rng.next() % 100
            let key = r < 40 ? "giant" : r < 70 ? "k\(rng.next() % 5)" : "k\(rng.next() % 200)"
            return (key, Int(rng.next() % 1000))
        }
        other = (0..<500).map { _ in ("k\(rng.next() % 300)", Int(rng.next() % 10)) }
    }

    /// 16 partitions for 3000 rows, several of them empty.
    func rdd<T>(_ xs: [T]) -> RDD<T> {
        let withGaps = sc.parallelize(xs, partitions: 8).union(sc.parallelize([T](), partitions: 8))
        return withGaps
    }

    func sortedPairs<V: Comparable>(_ xs: [(String, V)]) -> [String] { xs.map { "\($0.0)=\($0.1)" }.sorted() }

    func testNarrowTransformations() throws {
        let xs = Array(0..<1000)
        let r = rdd(xs)
        XCTAssertEqual(try r.map { $0 * 2 }.collect(), xs.map { $0 * 2 })
        XCTAssertEqual(try r.filter { $0 % 3 == 0 }.collect(), xs.filter { $0 % 3 == 0 })
        XCTAssertEqual(try r.flatMap { [$0, $0] }.collect(), xs.flatMap { [$0, $0] })
        XCTAssertEqual(try r.mapPartitionsWithIndex { i, p, _ in p.map { _ in i } }.collect().count, 1000)
        XCTAssertEqual(try r.glom().collect().count, 16)
        XCTAssertEqual(try r.glom().collect().flatMap { $0 }, xs)
        XCTAssertEqual(try r.union(r).count(), 2000)
        XCTAssertEqual(try r.coalesce(3).collect(), xs)
        XCTAssertEqual(r.coalesce(3).numPartitions, 3)
        XCTAssertEqual(try r.repartition(5).collect().sorted(), xs)
        XCTAssertEqual(try r.zipWithIndex().collect().map { $0.1 }, Array(0..<1000))
        XCTAssertEqual(try r.zip(r.map { $0 + 1 }).collect().map { $0.1 - $0.0 }, Array(repeating: 1, count: 1000))
        XCTAssertEqual(try sc.parallelize([1, 2, 3], partitions: 2).cartesian(sc.parallelize(["a", "b"], partitions: 2)).collect().map { "\($0.0)\($0.1)" }.sorted(),
                       ["1a", "1b", "2a", "2b", "3a", "3b"])
        let s1 = try r.sample(withReplacement: false, fraction: 0.1, seed: 5).collect()
        XCTAssertEqual(s1, try r.sample(withReplacement: false, fraction: 0.1, seed: 5).collect(), "a sample is reproducible")
        XCTAssertTrue((50...150).contains(s1.count), "\(s1.count)")
        XCTAssertEqual(try r.map { $0 % 10 }.distinct().collect().sorted(), Array(0..<10))
    }

    func testActions() throws {
        let xs = Array(1...500)
        let r = rdd(xs)
        XCTAssertEqual(try r.count(), 500)
        XCTAssertEqual(try r.reduce(+), xs.reduce(0, +))
        XCTAssertEqual(try r.fold(0, +), xs.reduce(0, +))
        XCTAssertEqual(try r.aggregate(0, { $0 + $1 }, { $0 + $1 }), xs.reduce(0, +))
        XCTAssertEqual(try r.take(7), Array(xs.prefix(7)))
        XCTAssertEqual(try r.take(0), [])
        XCTAssertEqual(try r.first(), 1)
        XCTAssertEqual(try r.top(3), [500, 499, 498])
        XCTAssertEqual(try r.takeOrdered(3), [1, 2, 3])
        XCTAssertEqual(try r.max(), 500)
        XCTAssertEqual(try r.takeSample(withReplacement: false, 10, seed: 1).count, 10)
        XCTAssertEqual(Set(try r.takeSample(withReplacement: false, 10, seed: 1)).count, 10)
        XCTAssertThrowsError(try sc.parallelize([Int](), partitions: 3).reduce(+))
        XCTAssertThrowsError(try sc.parallelize([Int](), partitions: 3).first())
        XCTAssertEqual(try r.map { $0 % 3 }.countByValue(), [0: 166, 1: 167, 2: 167])
        let acc = sc.accumulator("seen")
        try r.mapPartitionsWithIndex { _, p, ctx in acc.add(Double(p.count), in: ctx); return p }.foreach { _ in }
        XCTAssertEqual(acc.value, 500)
    }

    /// take reads only what it needs: a fused chain stops after n rows
    /// instead of computing its partition to the end.
    func testTakeStopsReadingOnceItHasEnough() throws {
        let seen = Once.Counter()
        let r = sc.parallelize(Array(0..<10_000), partitions: 2).map { x -> Int in
            seen.add()
            return x * 2
        }
        XCTAssertEqual(try r.take(3), [0, 2, 4])
        XCTAssertEqual(seen.value, 3, "only the rows take returned were computed")
        XCTAssertEqual(try r.take(5_002).suffix(2), [10_000, 10_002], "across partitions, in order")
        XCTAssertEqual(try r.filter { $0 % 1_000 == 0 }.take(4), [0, 1_000, 2_000, 3_000])
        XCTAssertEqual(try r.takeOrdered(Int.max).count, 10_000, "no overflow in the bound on kept rows")
        XCTAssertEqual(try r.top(3), [19_998, 19_996, 19_994])
    }

    func testKeyedTransformationsMatchReference() throws {
        let r = rdd(pairs)
        var sums: [String: Int] = [:], groups: [String: [Int]] = [:], maxes: [String: Int] = [:]
        for (k, v) in pairs {
            sums[k, default: 0] += v
            groups[k, default: []].append(v)
            maxes[k] = Swift.max(maxes[k] ?? Int.min, v)
        }
        XCTAssertEqual(sortedPairs(try r.reduceByKey(+).collect()), sortedPairs(Array(sums)))
        XCTAssertEqual(sortedPairs(try r.reduceByKey(partitions: 3, +).collect()), sortedPairs(Array(sums)))
        XCTAssertEqual(sortedPairs(try r.foldByKey(0, +).collect()), sortedPairs(Array(sums)))
        XCTAssertEqual(sortedPairs(try r.aggregateByKey(Int.min, { Swift.max($0, $1) }, { Swift.max($0, $1) }).collect()), sortedPairs(Array(maxes)))
        XCTAssertEqual(sortedPairs(try r.combineByKey({ $0 }, +, +).collect()), sortedPairs(Array(sums)))
        let grouped = try r.groupByKey().collect()
        XCTAssertEqual(grouped.count, groups.count)
        for (k, vs) in grouped { XCTAssertEqual(vs.sorted(), groups[k]!.sorted(), k) }
        XCTAssertEqual(sortedPairs(try r.mapValues { $0 + 1 }.collect()), sortedPairs(pairs.map { ($0.0, $0.1 + 1) }))
        XCTAssertEqual(try r.flatMapValues { [$0, $0] }.count(), 6000)
        XCTAssertEqual(try r.keys().collect().sorted(), pairs.map(\.0).sorted())
        XCTAssertEqual(try r.values().collect().sorted(), pairs.map(\.1).sorted())
        XCTAssertEqual(try r.countByKey(), groups.mapValues(\.count))
        XCTAssertEqual(try r.lookup("giant").sorted(), groups["giant"]!.sorted())
        XCTAssertEqual(try r.partitionBy(HashPartitioner(4)).lookup("giant").sorted(), groups["giant"]!.sorted())
        let sorted = try r.sortByKey().collect()
        XCTAssertEqual(sorted.map(\.0), pairs.map(\.0).sorted())
        XCTAssertEqual(try r.sortByKey(ascending: false, partitions: 4).collect().map(\.0), pairs.map(\.0).sorted(by: >))
        XCTAssertEqual(try rdd(Array(0..<300).shuffled()).sortBy { $0 }.collect(), Array(0..<300))
    }

    func testJoinsMatchReference() throws {
        let a = rdd(pairs), b = rdd(other)
        var ref: [String] = [], left: [String] = [], right: [String] = [], full: [String] = []
        let bByKey = Dictionary(grouping: other, by: \.0)
        let aByKey = Dictionary(grouping: pairs, by: \.0)
        for (k, v) in pairs {
            if let ws = bByKey[k] {
                for (_, w) in ws { ref.append("\(k)=\(v),\(w)"); left.append("\(k)=\(v),\(w)"); full.append("\(k)=\(v),\(w)") }
            } else {
                left.append("\(k)=\(v),nil"); full.append("\(k)=\(v),nil")
            }
        }
        for (k, w) in other {
            if let vs = aByKey[k] { for (_, v) in vs { right.append("\(k)=\(v),\(w)") } } else { right.append("\(k)=nil,\(w)"); full.append("\(k)=nil,\(w)") }
        }
        func show<V, W>(_ xs: [(String, (V?, W?))]) -> [String] {
            xs.map { "\($0.0)=\($0.1.0.map { "\($0)" } ?? "nil"),\($0.1.1.map { "\($0)" } ?? "nil")" }.sorted()
        }
        XCTAssertEqual(try a.join(b).collect().map { "\($0.0)=\($0.1.0),\($0.1.1)" }.sorted(), ref.sorted())
        XCTAssertEqual(show(try a.leftOuterJoin(b).collect().map { ($0.0, (Optional($0.1.0), $0.1.1)) }), left.sorted())
        XCTAssertEqual(show(try a.rightOuterJoin(b).collect().map { ($0.0, ($0.1.0, Optional($0.1.1))) }), right.sorted())
        XCTAssertEqual(show(try a.fullOuterJoin(b).collect()), full.sorted())
        let cg = try a.cogroup(b).collect()
        XCTAssertEqual(cg.count, Set(pairs.map(\.0) + other.map(\.0)).count)
    }

    func testCoPartitionedJoinSkipsTheShuffle() throws {
        let p = HashPartitioner(4)
        let a = rdd(pairs).partitionBy(p).persist()
        let b = rdd(other).partitionBy(p).persist()
        let joined = a.join(b)
        // Two shuffles (the partitionBy calls), none for the join itself.
        XCTAssertEqual(sc.stagePlan(joined).count, 2)
        XCTAssertEqual(try joined.count(), try rdd(pairs).join(rdd(other)).count())
        XCTAssertTrue(joined.toDebugString().contains("stage boundary"))
    }

    func testLostShuffleOutputAndCacheAreRecomputedFromLineage() throws {
        let base = rdd(pairs).mapValues { $0 * 2 }
        let counts = base.reduceByKey(+).mapValues { $0 + 1 }.reduceByKey(partitions: 3, +)
        let expected = sortedPairs(try counts.collect())
        // A fresh context, and lose every shuffle output after the first stage.
        sc = DataflowContext(executor: LocalExecutor(threads: 2))
        let base2 = rdd(pairs).mapValues { $0 * 2 }
        let counts2 = base2.reduceByKey(+).mapValues { $0 + 1 }.reduceByKey(partitions: 3, +)
        var dropped = false
        sc.afterStage = { [unowned sc] stage in
            if stage == 2 && !dropped {
                dropped = true
                sc.loseExecutorState()
            }
        }
        XCTAssertEqual(sortedPairs(try counts2.collect()), expected, "the same result after losing executor state")
        XCTAssertTrue(dropped)
        XCTAssertGreaterThan(sc.lastJobMetrics.stageResubmissions, 0)
        XCTAssertGreaterThan(sc.lastJobMetrics.recomputedPartitions, 0)
    }

    /// Kills the executor's thread pool from inside a running task of the
    /// second stage: the killed attempt's result and accumulator update are
    /// refused, waiting tasks are abandoned, the cache and shuffle outputs
    /// die with the pool, and the job still returns exactly the same result
    /// on a fresh pool, recomputing the lost cache from lineage.
    func testKillingTheExecutorPoolMidJobGivesTheSameResult() throws {
        func job(_ cached: RDD<(String, Int)>, _ hook: @escaping (Int, TaskContext) -> Void) -> RDD<(String, Int)> {
            cached.mapPartitionsWithIndex { i, xs, ctx in
                hook(i, ctx)
                return xs.map { ($0.0, $0.1 + 1) }
            }.reduceByKey(partitions: 3, +)
        }
        let expected = sortedPairs(try job(rdd(pairs).mapValues { $0 * 2 }.reduceByKey(+), { _, _ in }).collect())

        let executor = LocalExecutor(threads: 2)
        sc = DataflowContext(executor: executor)
        let cached = rdd(pairs).mapValues { $0 * 2 }.reduceByKey(+).persist()
        XCTAssertGreaterThan(try cached.count(), 0)
        let attempts = sc.accumulator("attempts of partition 1")
        let killed = Once()
        let out = job(cached) { i, ctx in
            guard i == 1 else { return }
            attempts.add(1, in: ctx)
            if killed.first() { executor.kill() }
        }
        XCTAssertEqual(sortedPairs(try out.collect()), expected, "the same result after the pool was killed")
        let m = sc.lastJobMetrics
        XCTAssertEqual(executor.kills, 1)
        XCTAssertEqual(m.executorsLost, 1)
        XCTAssertEqual(attempts.value, 1, "the killed attempt's accumulator update does not count")
        // The cache died with the pool: its lineage ran again (two sources
        // of 8, union, mapValues and the cached RDD: 16 partitions each),
        // plus the killed stage's tasks that had started; nothing else.
        let lineage = 4 * 16
        XCTAssertGreaterThan(m.recomputedPartitions, lineage, "the killed task ran again")
        XCTAssertLessThanOrEqual(m.recomputedPartitions, lineage + 16)
        XCTAssertEqual(sc.blocks.cachedPartitions(rdd: cached.id), cached.numPartitions, "the cache is whole again")
    }

    /// The Int-keyed shuffle table against a Dictionary: negative and
    /// colliding keys, growth past many doublings, in-place updates.
    func testIntMapMatchesDictionary() {
        var rng = SplitMix(seed: 3)
        var m = IntMap<Int>()
        var ref: [Int: Int] = [:]
        for _ in 0..<200_000 {
            let r = rng.next()
            let k = r % 3 == 0 ? Int(bitPattern: UInt(r)) : Int(r % 50_000) - 25_000 // a few huge, most clustered
            let (e, slot) = m.find(k)
            if e >= 0 { m.values[e] += 1 } else { m.insert(k, 1, at: slot) }
            ref[k, default: 0] += 1
        }
        XCTAssertEqual(m.count, ref.count)
        for i in 0..<m.count { XCTAssertEqual(m.values[i], ref[m.keys[i]]) }
        XCTAssertEqual(Set(m.keys), Set(ref.keys))
        XCTAssertEqual(m.find(Int.min).entry, ref[Int.min] == nil ? -1 : m.find(Int.min).entry)
    }

    /// The String-keyed shuffle table against a Dictionary: every length
    /// from 0 to 40 bytes, non-ASCII keys, and keys that are equal (`==`)
    /// with different bytes, which must land on one entry.
    func testStringMapMatchesDictionary() {
        var rng = SplitMix(seed: 5)
        let alphabet: [String] = ["a", "b", "K", ";", "`", "\u{212A}", "\u{37E}", "\u{1FEF}", "é", "e\u{301}", "日", " ", "z"]
        var m = StringMap<Int>()
        var ref: [String: Int] = [:]
        for i in 0..<60_000 {
            let k: String
            if i % 3 == 0 {
                k = String((0..<Int(rng.next() % 41)).map { _ in Character(UnicodeScalar(UInt8(97 + rng.next() % 3))) })
            } else {
                k = (0..<Int(rng.next() % 6)).map { _ in alphabet[Int(rng.next() % UInt64(alphabet.count))] }.joined()
            }
            let (e, at) = m.probe(k)
            if e >= 0 { m.values[e] += 1 } else { m.insert(k, 1, at: at) }
            ref[k, default: 0] += 1
        }
        XCTAssertEqual(m.count, ref.count)
        for i in 0..<m.count { XCTAssertEqual(m.values[i], ref[m.keys[i]], m.keys[i]) }
        XCTAssertEqual(StringMap<Int>.hash("\u{212A}"), StringMap<Int>.hash("K"))
        XCTAssertEqual(StringMap<Int>.hash("x\u{37E}"), StringMap<Int>.hash("x;"))
        XCTAssertEqual(StringMap<Int>.hash("café"), StringMap<Int>.hash("cafe\u{301}"))
        XCTAssertNotEqual(StringMap<Int>.hash("abcdefghijklmnopq"), StringMap<Int>.hash("abcdefghijklmnopr"))
    }

    /// Int keys take the IntMap paths of join, reduceByKey and the map-side
    /// combine: the same answers as plain loops, repeated keys included.
    func testIntKeyedShufflesMatchReference() throws {
        var rng = SplitMix(seed: 21)
        let a = (0..<3000).map { _ in (Int(rng.next() % 400) - 200, Int(rng.next() % 100)) }
        let b = (0..<800).map { _ in (Int(rng.next() % 500) - 250, Int(rng.next() % 100)) }
        var ref: [String] = []
        for (k, v) in a { for (k2, w) in b where k2 == k { ref.append("\(k)=\(v),\(w)") } }
        XCTAssertEqual(try rdd(a).join(rdd(b)).collect().map { "\($0.0)=\($0.1.0),\($0.1.1)" }.sorted(), ref.sorted())
        var sums: [Int: Int] = [:]
        for (k, v) in a { sums[k, default: 0] += v }
        XCTAssertEqual(Dictionary(uniqueKeysWithValues: try rdd(a).reduceByKey(partitions: 5, +).collect()), sums)
    }

    func testFailedTasksAreRetriedAndAccumulatorsCountOnce() throws {
        let acc = sc.accumulator("rows")
        sc.failTask = { t, attempt in attempt == 0 && t.partition % 2 == 0 }
        let n = try rdd(Array(0..<1000)).mapPartitionsWithIndex { _, xs, ctx in
            acc.add(Double(xs.count), in: ctx)
            return xs
        }.count()
        XCTAssertEqual(n, 1000)
        XCTAssertEqual(acc.value, 1000, "a failed attempt's updates do not count")
        XCTAssertGreaterThan(sc.lastJobMetrics.taskRetries, 0)
    }

    func testPersistedPartitionsAreReusedAndEvictionRecomputes() throws {
        let r = rdd(Array(0..<1000)).map { $0 * 3 }.persist()
        XCTAssertEqual(try r.count(), 1000)
        XCTAssertEqual(try r.reduce(+), 3 * 999 * 1000 / 2)
        XCTAssertEqual(sc.lastJobMetrics.cacheHits, 16)
        XCTAssertEqual(sc.lastJobMetrics.recomputedPartitions, 0)
        sc.dropCachedBlocks()
        XCTAssertEqual(try r.count(), 1000)
        XCTAssertEqual(sc.lastJobMetrics.recomputedPartitions, 48, "the persisted RDD and its two ancestors, 16 partitions each")
        XCTAssertTrue(r.toDebugString().contains("persisted"))
    }
}

final class SourceTests: XCTestCase {
    func testTextFilePartitionsCoverEveryLineExactlyOnce() throws {
        let path = NSTemporaryDirectory() + "weft-text-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: path) }
        var rng = SplitMix(seed: 2)
        let lines = (0..<2000).map { i in i % 97 == 0 ? "" : String(repeating: "x", count: Int(rng.next() % 80)) + " \(i)" }
        for trailingNewline in [true, false] {
            let text = lines.joined(separator: "\n") + (trailingNewline ? "\n" : "")
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            for parts in [1, 2, 7, 64, 5000] {
                // Small read chunks put line ends at every position relative to a chunk boundary.
                for chunk in parts > 100 ? [7, 4 << 20] : [1, 2, 5, 64, 4 << 20] {
                    let rdd = try DataflowContext().textFile(path, partitions: parts)
                    (rdd as! TextFileRDD).readChunkBytes = chunk
                    let got = try rdd.collect()
                    XCTAssertEqual(got.count, lines.count, "\(parts) partitions, chunk \(chunk), trailing newline \(trailingNewline)")
                    XCTAssertTrue(got == lines, "\(parts) partitions, chunk \(chunk), trailing newline \(trailingNewline): lines differ")
                }
            }
        }
    }

    func testTokensAreMaximalRunsOfNonWhitespace() {
        XCTAssertEqual(whitespaceTokens("  a bb\tc\u{00A0}d\u{2003}e\r\nf  "), ["a", "bb", "c", "d", "e", "f"])
        XCTAssertEqual(whitespaceTokens("héllo wörld 日本"), ["héllo", "wörld", "日本"])
        XCTAssertEqual(whitespaceTokens(""), [])
        XCTAssertEqual(whitespaceTokens("   "), [])
    }
}

/// True the first time only, from any thread.
final class Once: @unchecked Sendable {
    let lock = NSLock()
    var done = false
    func first() -> Bool { lock.withLock { defer { done = true }; return !done } }

    /// A counter any thread may bump.
    final class Counter: @unchecked Sendable {
        let lock = NSLock()
        var n = 0
        func add() { lock.withLock { n += 1 } }
        var value: Int { lock.withLock { n } }
    }
}
