import XCTest
import WeftCore
import WeftRuntime
@testable import WeftDataflow

final class ReliableTests: XCTestCase {
    var dir = ""
    override func setUp() { dir = NSTemporaryDirectory() + "weft-reliable-\(getpid())-\(UInt64.random(in: 0...UInt64.max))" }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func testLostPartitionsAreReadFromReplicasNotRecomputed() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        let words = (0..<5000).map { "w\($0 % 97)" }
        let result = try await onDriverThread { () -> [String] in
            let sc = DataflowContext()
            let counts = sc.parallelize(words, partitions: 6).map { ($0, 1) }.reduceByKey(+)
                .persistReliable(replicas: 2, codec: .stringInt, client: c)
            let first = try counts.collect().map { "\($0.0)=\($0.1)" }.sorted()
            XCTAssertTrue(counts.toDebugString().contains("reliable x2"), counts.toDebugString())

            // Lose the executor: cached partitions and shuffle outputs.
            sc.loseExecutorState()
            let second = try counts.collect().map { "\($0.0)=\($0.1)" }.sorted()
            XCTAssertEqual(second, first)
            XCTAssertEqual(sc.lastJobMetrics.partitionsReadFromReplicas, 6)
            XCTAssertEqual(sc.lastJobMetrics.recomputedPartitions, 0, "no partition was recomputed")
            XCTAssertEqual(sc.lastJobMetrics.stages, 1, "no parent stage ran")
            return first
        }
        XCTAssertEqual(result.count, 97)
    }

    /// The executor's thread pool is killed mid-job, downstream of a
    /// reliably persisted RDD: the job gives the same answer, and the
    /// reliable partitions come from replicas; no source row is read again.
    func testKillingThePoolMidJobReadsReliablePartitionsFromReplicas() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        let words = (0..<5000).map { "w\($0 % 97)" }
        try await onDriverThread {
            let executor = LocalExecutor(threads: 2)
            let sc = DataflowContext(executor: executor)
            let sourceRuns = Once.Counter()
            let counts = sc.parallelize(words, partitions: 6)
                .mapPartitionsWithIndex { _, xs, _ in sourceRuns.add(); return xs.map { ($0, 1) } }
                .reduceByKey(+)
                .persistReliable(replicas: 2, codec: .stringInt, client: c)
            let first = try counts.collect()
            XCTAssertEqual(sourceRuns.value, 6)
            var expected: [Int: Int] = [:]
            for (w, n) in first { expected[w.count, default: 0] += n }

            let killed = Once()
            let byLength = counts.mapPartitionsWithIndex { i, xs, _ in
                if i == 2 && killed.first() { executor.kill() }
                return xs.map { ($0.0.count, $0.1) }
            }.reduceByKey(partitions: 2, +)
            let got = try byLength.collect()
            XCTAssertEqual(Dictionary(uniqueKeysWithValues: got), expected)
            let m = sc.lastJobMetrics
            XCTAssertEqual(m.executorsLost, 1)
            XCTAssertEqual(sourceRuns.value, 6, "no source partition was computed again")
            XCTAssertGreaterThanOrEqual(m.partitionsReadFromReplicas, 6, "after the kill every partition came from a replica")
        }
    }

    /// A corrupted replica is skipped for the next one; a partition whose
    /// every replica is corrupted is recomputed from lineage (and stored
    /// again), never a failed job.
    func testCorruptReplicasFallBackToTheNextAndThenToLineage() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        let words = (0..<3000).map { "w\($0 % 41)" }
        let sc = DataflowContext()
        let (box, first) = try await onDriverThread { () -> (UncheckedBox<RDD<(String, Int)>>, [String]) in
            let counts = sc.parallelize(words, partitions: 4).map { ($0, 1) }.reduceByKey(+)
                .persistReliable(replicas: 2, codec: .stringInt, client: c)
            return (UncheckedBox(counts), try counts.collect().map { "\($0.0)=\($0.1)" }.sorted())
        }
        let set = try XCTUnwrap(box.value.reliable).set
        func replicaKeys(_ p: Int) async throws -> [[String]] {
            let entry = ReliableBlocks.Entry(try await c.get(ReliableBlocks.directoryKey(set, p)).value!)
            XCTAssertEqual(entry.replicas, 2)
            return (0..<entry.replicas).map { j in
                (0..<entry.blocks).map { String(decoding: Blocks.key(set, partition: p, index: $0, replica: j, participants: 3), as: UTF8.self) }
            }
        }
        // Partition 0: flip the last byte of its first replica. Partition 1: both replicas.
        func corrupt(_ key: String) async throws {
            var v = try await c.get(Array(key.utf8)).value!
            v[v.count - 1] ^= 0xff
            try await c.put(Array(key.utf8), v)
        }
        try await corrupt(try replicaKeys(0)[0].last!)
        for r in try await replicaKeys(1) { try await corrupt(r.last!) }

        let (second, m) = try await onDriverThread { () -> ([String], JobMetrics) in
            sc.loseExecutorState()
            return (try box.value.collect().map { "\($0.0)=\($0.1)" }.sorted(), sc.lastJobMetrics)
        }
        XCTAssertEqual(second, first)
        XCTAssertEqual(m.partitionsReadFromReplicas, 3, "partition 0 from its second replica, 2 and 3 as usual")
        XCTAssertEqual(m.unreadableReplicatedPartitions, 1, "partition 1 had no readable replica")
        XCTAssertGreaterThan(m.recomputedPartitions, 0, "partition 1 came from lineage")
        // Recomputing stored partition 1 again: the next loss reads it from a replica.
        let third = try await onDriverThread { () -> JobMetrics in
            sc.loseExecutorState()
            _ = try box.value.collect()
            return sc.lastJobMetrics
        }
        XCTAssertEqual(third.unreadableReplicatedPartitions, 0, "partition 1 was stored again when it was recomputed")
        XCTAssertEqual(third.partitionsReadFromReplicas, 4)
        XCTAssertEqual(third.recomputedPartitions, 0)
    }

    /// Keys of reliable blocks in the store: pieces (`b/`, tables' blocks aside) and directory entries (`d/`).
    func blockKeys(_ c: WeftClient) async throws -> (chunks: Int, entries: Int) {
        (try await c.scan(prefix: Array("b/".utf8), limit: 10_000).rows.filter { !$0.key.starts(with: Array("b/t:".utf8)) }.count,
         try await c.scan(prefix: Array("d/".utf8), limit: 10_000).rows.count)
    }

    /// unpersist deletes every replica's chunks and the directory entries;
    /// the RDD is then computed from lineage again, with the same result.
    func testUnpersistDeletesEveryReplicaAndEntry() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        let words = (0..<3000).map { "w\($0 % 41)" }
        let box = try await onDriverThread { () -> UncheckedBox<(DataflowContext, RDD<(String, Int)>)> in
            let sc = DataflowContext()
            let counts = sc.parallelize(words, partitions: 5).map { ($0, 1) }.reduceByKey(+)
                .persistReliable(replicas: 2, codec: .stringInt, client: c)
            _ = try counts.collect()
            return UncheckedBox((sc, counts))
        }
        let before = try await blockKeys(c)
        XCTAssertEqual(before.entries, 5)
        XCTAssertGreaterThanOrEqual(before.chunks, 10, "2 replicas of 5 partitions")
        let after = try await onDriverThread { () -> [String] in
            try box.value.1.unpersist()
            return try box.value.1.collect().map { "\($0.0)=\($0.1)" }
        }
        let left = try await blockKeys(c)
        XCTAssertEqual(left.chunks, 0)
        XCTAssertEqual(left.entries, 0)
        XCTAssertEqual(after.count, 41)
        XCTAssertFalse(box.value.1.toDebugString().contains("reliable"))
    }

    /// A job deletes its reliable blocks when it ends. Blocks whose writer
    /// has exited are collected; a live writer's are kept unless older than
    /// `olderThanMillis`.
    func testJobsDeleteTheirBlocksAndGarbageCollectionTakesDeadWriters() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        try await TableStore.write(c, "logs", rows: (0..<50).map { (Array(String(format: "%04d", $0).utf8), Array("ERROR\t\($0)\tdisk \($0)".utf8)) },
                                   format: "lines", overwrite: false)
        var p = JobParameters(input: "logs")
        p.words = ["disk"]
        let params = p
        let r = try await onDriverThread { try BuiltinJobs.run("logmining", params, sc: DataflowContext(), client: c) }
        XCTAssertEqual(r.outputRows, 1)
        let afterJob = try await blockKeys(c)
        XCTAssertEqual(afterJob.entries, 0, "the job deleted its persisted messages")
        XCTAssertEqual(afterJob.chunks, 0)

        // One set by this (live) process, one by a process that has exited.
        let block = ReliableBlocks.encodeBlock(["a", "b"], BlockCodec.string)
        try await ReliableBlocks.write(c, set: "live", partition: 0, block: block, replicas: 2)
        for part in 0..<3 { try await ReliableBlocks.write(c, set: "dead", partition: part, block: block, replicas: 2) }
        let child = Process()
        child.executableURL = URL(fileURLWithPath: "/bin/true")
        try child.run()
        child.waitUntilExit()
        let deadPid = child.processIdentifier
        for part in 0..<3 {
            let key = Array("d/dead/\(part)".utf8)
            let entry = String(decoding: try await c.get(key).value!, as: UTF8.self)
            _ = try await c.put(key, Array(entry.replacingOccurrences(of: "owner=\(WriterTag.current)", with: "owner=\(WriterTag.current.split(separator: ":")[0]):\(deadPid)").utf8))
        }
        let sets = try await ReliableBlocks.list(c)
        XCTAssertEqual(sets.map(\.set), ["dead", "live"])
        XCTAssertEqual(sets[0].partitions, [0, 1, 2])
        XCTAssertEqual(WriterTag.isAlive(sets[0].owner!), false)
        XCTAssertEqual(WriterTag.isAlive(sets[1].owner!), true)

        let (deleted, kept) = try await ReliableBlocks.collectGarbage(c)
        XCTAssertEqual(deleted.map(\.set), ["dead"])
        XCTAssertEqual(kept.map(\.set), ["live"])
        let oneLeft = try await blockKeys(c)
        XCTAssertEqual(oneLeft.entries, 1)
        let live = try await ReliableBlocks.read(c, set: "live", partition: 0)
        XCTAssertNotNil(live, "the live writer's block is intact")
        // Age never overrules a writer seen running here...
        let (none0, _) = try await ReliableBlocks.collectGarbage(c, olderThanMillis: 0)
        XCTAssertEqual(none0.map(\.set), [])
        // ...but a writer on another host is collected by age only.
        let key = Array("d/live/0".utf8)
        let entry = String(decoding: try await c.get(key).value!, as: UTF8.self)
        _ = try await c.put(key, Array(entry.replacingOccurrences(of: "owner=\(WriterTag.current)", with: "owner=elsewhere:1").utf8))
        let (young, _) = try await ReliableBlocks.collectGarbage(c, olderThanMillis: 3_600_000)
        XCTAssertEqual(young.map(\.set), [], "written a moment ago")
        let (old, _) = try await ReliableBlocks.collectGarbage(c, olderThanMillis: 0)
        XCTAssertEqual(old.map(\.set), ["live"])
        let none = try await blockKeys(c)
        XCTAssertEqual(none.chunks, 0)
        XCTAssertEqual(none.entries, 0)
    }

    func testEachBlockHasReplicasOnDistinctParticipantsAndSurvivesLosingOne() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        let block = ReliableBlocks.encodeBlock(["a", "b", "c"], BlockCodec.string)
        try await ReliableBlocks.write(c, set: "t1", partition: 0, block: block, replicas: 2)
        let entry = ReliableBlocks.Entry(try await c.get(Array("d/t1/0".utf8)).value!)
        XCTAssertEqual(entry.replicas, 2)
        XCTAssertEqual(entry.blocks, 1)
        let keys = (0..<2).map { Blocks.key("t1", partition: 0, index: 0, replica: $0, participants: 3) }
        for k in keys { let got = try await c.get(k).value; XCTAssertNotNil(got) }
        XCTAssertEqual(Set(keys.map { c.owner(of: $0) }).count, 2, "replicas on two participants")
        // Lose the first replica: the reader falls back to the second.
        try await c.delete(keys[0])
        let read = try await ReliableBlocks.read(c, set: "t1", partition: 0)
        XCTAssertEqual(try ReliableBlocks.decodeBlock(read!, BlockCodec.string), ["a", "b", "c"])
        // A corrupted block is refused by its checksum.
        var bad = block
        bad[bad.count - 1] ^= 0xff
        XCTAssertThrowsError(try ReliableBlocks.decodeBlock(bad, BlockCodec.string))
    }

    func testCheckpointCutsTheLineage() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        try await onDriverThread {
            let sc = DataflowContext()
            let r = sc.parallelize((0..<100).map { "x\($0)" }, partitions: 4).map { $0 + "!" }.checkpoint(replicas: 2, codec: .string, client: c)
            XCTAssertEqual(try r.count(), 100)
            XCTAssertTrue(r.checkpointed)
            XCTAssertTrue(r.dependencies.isEmpty)
            sc.loseExecutorState()
            XCTAssertEqual(try r.collect().count, 100)
            XCTAssertEqual(sc.lastJobMetrics.partitionsReadFromReplicas, 4)
            XCTAssertTrue(r.toDebugString().contains("lineage cut by checkpoint"))
        }
    }
}
