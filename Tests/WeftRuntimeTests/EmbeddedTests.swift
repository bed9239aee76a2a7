import Foundation
import XCTest
import WeftCore
@testable import WeftProtocol
@testable import WeftRuntime

func b(_ s: String) -> Bytes { Array(s.utf8) }
func str(_ v: Bytes?) -> String? { v.map { String(decoding: $0, as: UTF8.self) } }

final class EmbeddedTests: XCTestCase {
    var dir = ""
    override func setUp() { dir = tempDir("weft-embedded") }
    override func tearDown() { removeDir(dir) }

    func testMultiKeyTransactionIsAtomicAcrossParticipants() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        let keys = (0..<30).map { b("k\($0)") }
        XCTAssertEqual(Set(keys.map(c.owner)).count, 3, "keys spread over all participants")
        let t = try await c.begin()
        for k in keys { try t.put(k, b("v")) }
        let before = t.startTs
        let ts = try await t.commit()
        XCTAssertGreaterThan(ts, before)
        for k in keys {
            let now = try await c.get(k).value
            let before = try await c.get(k, at: ts - 1).value
            XCTAssertEqual(str(now), "v")
            XCTAssertNil(before, "invisible before its commit timestamp")
        }
        let (rows, _) = try await c.scan(prefix: b("k"), limit: 1000)
        XCTAssertEqual(rows.map(\.key), keys.sorted { compareBytes($0, $1) < 0 })
        let five = try await c.scan(prefix: b("k"), limit: 5).rows.count
        XCTAssertEqual(five, 5)
        // Group commit: some LMDB commit carried more than one record.
        XCTAssertGreaterThan(cluster.commitStats.reduce(0) { $0 + $1.records }, cluster.commitStats.reduce(0) { $0 + $1.commits } - 1)
    }

    /// A participant's commit record after a decision is held (up to
    /// `NodeRunner.lazyWaitMillis`) and shares the next PREPARE's LMDB
    /// commit: back-to-back two-participant transactions cost each
    /// participant about one commit apiece, not two. Held records are
    /// written before a stop, acknowledgements go out once they are
    /// durable (nothing stays undecided at the coordinator), and every
    /// transaction is there after a restart.
    func testCommitRecordsShareTheNextPreparesCommit() async throws {
        let n = 40
        var a: Bytes = [], z: Bytes = []
        do {
            let cluster = try EmbeddedCluster(dataDir: dir)
            let c = cluster.client()
            let keys = (0..<100).map { b("lazy\($0)") }
            a = try XCTUnwrap(keys.first { c.owner(of: $0) == 0 })
            z = try XCTUnwrap(keys.first { c.owner(of: $0) == 1 })
            let before = cluster.commitStats
            for i in 0..<n {
                let t = try await c.begin()
                try t.put(a, b("\(i)"))
                try t.put(z, b("\(i)"))
                try await t.commit()
            }
            let after = cluster.commitStats
            for p in ["participant-0", "participant-1"] {
                let commits = after.first { $0.node == p }!.commits - before.first { $0.node == p }!.commits
                let records = after.first { $0.node == p }!.records - before.first { $0.node == p }!.records
                XCTAssertGreaterThanOrEqual(records, 2 * n - 1, "\(p): a PREPARED and a commit record per transaction (the last may be held)")
                XCTAssertLessThan(commits, n * 3 / 2, "\(p): \(commits) LMDB commits for \(n) transactions")
            }
            // The acknowledgements arrive: the coordinator forgets every decision.
            var awaitingAcks = -1
            for _ in 0..<200 {
                awaitingAcks = cluster.coordinator.withMachine { m in
                    m.txns.values.filter { if case .committed = $0 { return true } else { return false } }.count
                }
                if awaitingAcks == 0 { break }
                try await Task.sleep(nanoseconds: 10_000_000)
            }
            XCTAssertEqual(awaitingAcks, 0, "decisions still waiting for acknowledgements")
            cluster.close()
        }
        let reopened = try EmbeddedCluster(dataDir: dir)
        defer { reopened.close() }
        XCTAssertTrue(reopened.inDoubt().isEmpty, "held commit records were written before the stop")
        let c = reopened.client()
        let va = try await c.get(a).value, vz = try await c.get(z).value
        XCTAssertEqual(str(va), "\(n - 1)")
        XCTAssertEqual(str(vz), "\(n - 1)")
    }

    func testLostUpdateIsPreventedAndWriteSkewIsAborted() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        try await c.put(b("x"), b("0"))
        try await c.put(b("y"), b("0"))
        // Write skew: each reads both and writes one. Serializable forbids both committing.
        let t1 = try await c.begin(), t2 = try await c.begin()
        _ = try await t1.get(b("x")); _ = try await t1.get(b("y"))
        _ = try await t2.get(b("x")); _ = try await t2.get(b("y"))
        try t1.put(b("x"), b("1"))
        try t2.put(b("y"), b("1"))
        try await t1.commit()
        do {
            try await t2.commit()
            XCTFail("write skew committed")
        } catch let e as WeftError {
            XCTAssertEqual(e.code, .conflict)
            XCTAssertTrue(e.message.contains("conflict on key"), e.message)
        }
    }

    func testConcurrentTransfersConserveTotalAtEverySnapshot() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        let n = 10
        let setup = try await c.begin()
        for i in 0..<n { try setup.put(b("acct/\(i)"), b("100")) }
        try await setup.commit()
        try await withThrowingTaskGroup(of: Int.self) { group in
            for w in 0..<6 {
                group.addTask {
                    var committed = 0
                    for i in 0..<40 {
                        let t = try await c.begin()
                        let a = (w + i) % n, d = (w * 3 + i * 7 + 1) % n
                        if a == d { continue }
                        let va = Int(str(try await t.get(b("acct/\(a)")))!)!
                        let vd = Int(str(try await t.get(b("acct/\(d)")))!)!
                        try t.put(b("acct/\(a)"), b(String(va - 3)))
                        try t.put(b("acct/\(d)"), b(String(vd + 3)))
                        do { try await t.commit(); committed += 1 } catch let e as WeftError where e.code == .conflict {}
                    }
                    return committed
                }
            }
            group.addTask {
                for _ in 0..<30 {
                    let (rows, ts) = try await c.scan(prefix: b("acct/"), limit: 100)
                    XCTAssertEqual(rows.count, n)
                    XCTAssertEqual(rows.reduce(0) { $0 + Int(str($1.value)!)! }, 100 * n, "snapshot \(ts) is consistent")
                }
                return 0
            }
            var total = 0
            for try await x in group { total += x }
            XCTAssertGreaterThan(total, 20)
        }
    }

    func testRecoveryAfterReopenKeepsDataAndTimestampsMoveForward() async throws {
        var lastTs: Timestamp = 0
        do {
            let cluster = try EmbeddedCluster(dataDir: dir)
            let c = cluster.client()
            for i in 0..<50 { lastTs = try await c.put(b("key\(i)"), b("value\(i)")) }
            try await c.delete(b("key7"))
            cluster.close()
        }
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        let now = try await c.now()
        XCTAssertGreaterThan(now, lastTs, "the oracle never goes backwards across restarts")
        for i in 0..<50 where i != 7 {
            let v = try await c.get(b("key\(i)")).value
            XCTAssertEqual(str(v), "value\(i)")
        }
        let deleted = try await c.get(b("key7")).value
        XCTAssertNil(deleted)
    }

    func testSecondOpenOfSameDirectoryIsRefused() throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        XCTAssertThrowsError(try EmbeddedCluster(dataDir: dir)) { e in
            let w = e as! WeftError
            XCTAssertEqual(w.code, .locked)
            XCTAssertTrue(w.message.contains("pid \(getpid())"), w.message)
        }
    }

    func testParticipantCountMismatchIsRefused() throws {
        try EmbeddedCluster(dataDir: dir, participants: 2).close()
        XCTAssertThrowsError(try EmbeddedCluster(dataDir: dir, participants: 5)) { e in
            XCTAssertTrue((e as! WeftError).message.contains("created with 2 participants"))
        }
    }

    func testMapFullAbortsCleanlyAndLosesNothing() async throws {
        var opts = StorageOptions()
        opts.mapSizeBytes = 1 << 20
        opts.mapSizeBytesMax = 1 << 20
        let value = Bytes(repeating: 1, count: 60_000)
        var committed: [Bytes] = []
        var failure: WeftError?
        do {
            let cluster = try EmbeddedCluster(dataDir: dir, participants: 1, options: opts)
            let c = cluster.client()
            c.requestTimeoutMillis = 5_000
            for i in 0..<100 {
                do {
                    try await c.put(b("big\(i)"), value)
                    committed.append(b("big\(i)"))
                } catch let e as WeftError {
                    failure = e
                    break
                }
            }
            cluster.close()
        }
        let f = try XCTUnwrap(failure, "a 1 MiB map cannot hold 6 MB")
        XCTAssertEqual(f.code, .storageFull, f.message)
        XCTAssertTrue(f.message.contains("map full"), f.message)
        XCTAssertGreaterThan(committed.count, 3)
        // Reopen with room to grow: every acknowledged write is there.
        opts.mapSizeBytesMax = 64 << 20
        let cluster = try EmbeddedCluster(dataDir: dir, participants: 1, options: opts)
        defer { cluster.close() }
        let c = cluster.client()
        for k in committed {
            let v = try await c.get(k).value
            XCTAssertEqual(v, value)
        }
        try await c.put(b("after"), value)
    }

    func testMapGrowsPastItsInitialSize() async throws {
        var opts = StorageOptions()
        opts.mapSizeBytes = 1 << 20
        let cluster = try EmbeddedCluster(dataDir: dir, participants: 1, options: opts)
        defer { cluster.close() }
        let c = cluster.client()
        let value = Bytes(repeating: 2, count: 200_000)
        for i in 0..<40 { try await c.put(b("g\(i)"), value) }
        XCTAssertGreaterThanOrEqual(cluster.participantStorages[0].env.mapSizeBytes, 8 << 20)
        let last = try await c.get(b("g39")).value
        XCTAssertEqual(last, value)
    }

    func testTransactionLimitsAreEnforcedBeforeAnythingIsSent() async throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let c = cluster.client()
        let t = try await c.begin()
        XCTAssertThrowsError(try t.put([], b("x"))) { XCTAssertEqual(($0 as! WeftError).code, .invalidArgument) }
        XCTAssertThrowsError(try t.put(Bytes(repeating: 1, count: Limits.keyBytesMax + 1), b("x"))) { XCTAssertEqual(($0 as! WeftError).code, .keyTooLarge) }
        XCTAssertThrowsError(try t.put(b("k"), Bytes(repeating: 1, count: Limits.valueBytesMax + 1))) { XCTAssertEqual(($0 as! WeftError).code, .valueTooLarge) }
        let big = Bytes(repeating: 3, count: Limits.valueBytesMax)
        var err: WeftError?
        for i in 0..<80 {
            do { try t.put(b("big\(i)"), big) } catch let e as WeftError { err = e; break }
        }
        XCTAssertEqual(err?.code, .txnTooLarge)
    }
}
