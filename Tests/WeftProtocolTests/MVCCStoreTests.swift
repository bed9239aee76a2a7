import XCTest
import WeftCore
@testable import WeftProtocol
import WeftSimulation

final class MVCCStoreTests: XCTestCase {
    /// Random puts, deletes, reads at random snapshots and scans, checked
    /// against a plain dictionary of version lists.
    func testMatchesReferenceModel() {
        var rng = SeededRandom(seed: 7)
        var store = MVCCStore()
        var model: [Bytes: [(Timestamp, Bytes?)]] = [:]
        var ts: Timestamp = 10
        for step in 0..<20_000 {
            let key = Array("k\(rng.int(0...800))".utf8)
            ts += UInt64(rng.int(1...3))
            let value: Bytes? = rng.chance(0.15) ? nil : Array("v\(step)".utf8)
            store.apply(key: key, value: value, ts: ts)
            model[key, default: []].append((ts, value))
            if step % 97 == 0 {
                let at = UInt64(rng.int(0...Int(ts)))
                for (k, versions) in model {
                    let expect = versions.last { $0.0 <= at }
                    let got = store.read(k, at: at)
                    XCTAssertEqual(got.value, expect?.1, "key \(k) at \(at)")
                    XCTAssertEqual(got.version, expect?.0 ?? 0)
                }
                var scanned: [Bytes] = []
                store.scan(from: Array("k4".utf8), at: at) { k, _, _ in scanned.append(k); return true }
                let expected = model.filter { compareBytes($0.key, Array("k4".utf8)) >= 0 && ($0.value.last { $0.0 <= at }?.1 ?? nil) != nil }
                    .keys.sorted { compareBytes($0, $1) < 0 }
                XCTAssertEqual(scanned, expected)
            }
        }
    }

    /// Enough keys that the ordered index splits its runs many times, with
    /// deletes collected (dead entries dropped from the index, then
    /// revived by new versions), checked by full and partial scans against
    /// a sorted model of the live keys.
    func testOrderedIndexThroughSplitsCollectionAndRevival() {
        var rng = SeededRandom(seed: 19)
        var store = MVCCStore()
        var live: [Bytes: Bytes] = [:]
        var ts: Timestamp = 1
        var rebuilds = 0
        for round in 0..<12 {
            for _ in 0..<6_000 {
                ts += 1
                let key = Array("key-\(rng.int(0...40_000))".utf8)
                if rng.chance(0.25) {
                    store.apply(key: key, value: nil, ts: ts)
                    live[key] = nil
                } else {
                    let v = Array("v\(ts)".utf8)
                    store.apply(key: key, value: v, ts: ts)
                    live[key] = v
                }
            }
            let before = store.chunks.count
            _ = store.collectGarbage(horizon: ts)
            if store.chunks.count < before { rebuilds += 1 }
            XCTAssertEqual(store.liveKeys, live.count, "round \(round)")
            let expected = live.keys.sorted { compareBytes($0, $1) < 0 }
            var all: [Bytes] = []
            store.scan(from: [], at: ts) { k, v, _ in
                XCTAssertEqual(live[k], v)
                all.append(k)
                return true
            }
            XCTAssertEqual(all, expected, "round \(round)")
            let from = Array("key-2".utf8)
            var part: [Bytes] = []
            store.scan(from: from, at: ts) { k, _, _ in part.append(k); return part.count < 700 }
            XCTAssertEqual(part, Array(expected.filter { compareBytes($0, from) >= 0 }.prefix(700)))
        }
        XCTAssertGreaterThan(store.chunks.count, 20, "the index split into many runs")
        XCTAssertTrue(store.chunks.allSatisfy { $0.count < 2 * MVCCStore.chunkMax })
        XCTAssertGreaterThan(rebuilds, 0, "collected deletes were dropped from the index")
    }

    func testGarbageCollectionKeepsWhatSnapshotsAtOrAfterTheHorizonSee() {
        var store = MVCCStore()
        let k = Array("k".utf8), gone = Array("gone".utf8)
        for t in 1...10 { store.apply(key: k, value: Array("\(t)".utf8), ts: Timestamp(t * 10)) }
        store.apply(key: gone, value: [1], ts: 15)
        store.apply(key: gone, value: nil, ts: 25)
        let dropped = store.collectGarbage(horizon: 55)
        // Versions 10...40 are invisible at >= 55; 50 is what 55 sees.
        XCTAssertEqual(dropped[10], 1)
        XCTAssertEqual(dropped[40], 1)
        XCTAssertNil(dropped[50])
        XCTAssertEqual(store.read(k, at: 55).value, Array("5".utf8))
        XCTAssertEqual(store.read(k, at: 100).value, Array("10".utf8))
        XCTAssertNil(store.read(gone, at: 100).value)
        XCTAssertEqual(store.liveKeys, 1, "a key deleted before the horizon disappears")
        store.apply(key: gone, value: [2], ts: 200)
        XCTAssertEqual(store.read(gone, at: 200).value, [2])
        XCTAssertEqual(store.liveKeys, 2)
    }

    func testMemoryPerKeyStaysCompact() {
        var store = MVCCStore()
        let n = 100_000
        for i in 0..<n {
            var key = Array("key-\(i)".utf8)
            key += Bytes(repeating: 0x2e, count: 16 - key.count)
            store.apply(key: key, value: Bytes(repeating: UInt8(i & 0xff), count: 100), ts: Timestamp(i + 1))
        }
        let perKey = Double(store.memoryBytes) / Double(n)
        XCTAssertLessThan(perKey, 2 * 116, "\(perKey) bytes per 16+100-byte key")
    }
}

final class CodecTests: XCTestCase {
    func testRecordsRoundTrip() throws {
        let p = PreparedTxn(txn: 5, startTs: 5, commitTs: 9, participants: [0, 2], writes: [WriteOp(key: [1], value: [2, 3]), WriteOp(key: [4], value: nil)], preparedAtMillis: 123)
        XCTAssertEqual(try PreparedTxn.decode(p.encoded()), p)
        let d = Decision(txn: 1, commitTs: 2, participants: [1, 2, 3])
        XCTAssertEqual(try Decision.decode(d.encoded()), d)
        let c = CommitRecord(txn: 3, writes: p.writes)
        XCTAssertEqual(try c.encoded().withUnsafeBytes { try CommitRecord.decode($0) }, c)
    }

    func testTruncatedAndHostileInputIsRejectedNotTrusted() {
        let p = PreparedTxn(txn: 5, startTs: 5, commitTs: 9, participants: [0], writes: [WriteOp(key: [1], value: [2])], preparedAtMillis: 1).encoded()
        for cut in 0..<p.count {
            XCTAssertThrowsError(try PreparedTxn.decode(Array(p.prefix(cut))), "prefix \(cut)")
        }
        XCTAssertThrowsError(try PreparedTxn.decode(p + [0]), "trailing bytes")
        var huge = ByteWriter()
        huge.u8(RecordFormat.unchecked); huge.u64(1); huge.u64(1); huge.u64(2); huge.int(1); huge.int(0); huge.u64(0)
        huge.varint(UInt64(Int32.max)) // a write count far over Limits.txnWritesMax
        XCTAssertThrowsError(try PreparedTxn.decode(huge.bytes))
        var wrongVersion = p
        wrongVersion[0] = 99
        XCTAssertThrowsError(try PreparedTxn.decode(wrongVersion)) { XCTAssertTrue("\($0)".contains("format 99")) }
    }

    /// Issue "Security and integrity", item 5: every byte of a PREPARED,
    /// commit or decision record is covered by its checksum; a flipped
    /// one is an error, never a different value.
    func testEveryFlippedByteOfARecordIsDetected() {
        let writes = [WriteOp(key: Array("balance".utf8), value: Array("100".utf8)), WriteOp(key: [4], value: nil)]
        let records: [(String, Bytes, (Bytes) throws -> Void)] = [
            ("prepared", PreparedTxn(txn: 5, startTs: 5, commitTs: 9, participants: [0, 1], writes: writes, preparedAtMillis: 7).encoded(), { _ = try PreparedTxn.decode($0) }),
            ("commit", CommitRecord(txn: 3, writes: writes).encoded(), { b in _ = try b.withUnsafeBytes { try CommitRecord.decode($0) } }),
            ("decision", Decision(txn: 1, commitTs: 2, participants: [1, 2]).encoded(), { _ = try Decision.decode($0) }),
        ]
        for (name, bytes, decode) in records {
            XCTAssertEqual(bytes[0], RecordFormat.checksummed, name)
            XCTAssertNoThrow(try decode(bytes), name)
            for i in 1..<bytes.count {
                for bit in [0, 3, 7] {
                    var bad = bytes
                    bad[i] ^= UInt8(1 << bit)
                    XCTAssertThrowsError(try decode(bad), "\(name): byte \(i) bit \(bit)") { e in
                        XCTAssertTrue("\(e)".contains("checksum mismatch"), "\(name) byte \(i): \(e)")
                    }
                }
            }
        }
        // Replay, the path recovery takes, checks it too.
        var m = ParticipantMachine(id: 0, recovery: ParticipantRecovery(), readFloor: 0, nowMillis: 0)
        var bad = CommitRecord(txn: 3, writes: writes).encoded()
        bad[12] ^= 1
        XCTAssertThrowsError(try bad.withUnsafeBytes { try m.replayCommit(9, encoded: $0) })
    }

    /// Found by the records fuzz target: a (format 1, unchecked) commit
    /// record writing one key twice made replay trap on the store's
    /// precondition; now recovery reports the damaged record.
    func testReplayOfARecordWritingAKeyTwiceIsAnError() {
        var w = ByteWriter()
        w.u8(RecordFormat.unchecked); w.u64(3); w.writes([WriteOp(key: [1], value: [2]), WriteOp(key: [1], value: [3])])
        var m = ParticipantMachine(id: 0, recovery: ParticipantRecovery(), readFloor: 0, nowMillis: 0)
        XCTAssertThrowsError(try w.bytes.withUnsafeBytes { try m.replayCommit(9, encoded: $0) }) { e in
            XCTAssertTrue("\(e)".contains("newest version is already 9"), "\(e)")
        }
        // Out of order (an older record after a newer one) is refused too.
        var ok = ByteWriter()
        ok.u8(RecordFormat.unchecked); ok.u64(4); ok.writes([WriteOp(key: [7], value: [1])])
        XCTAssertNoThrow(try ok.bytes.withUnsafeBytes { try m.replayCommit(20, encoded: $0) })
        XCTAssertThrowsError(try ok.bytes.withUnsafeBytes { try m.replayCommit(15, encoded: $0) })
    }

    /// Records written before checksums (format 1) are still read.
    func testFormatOneRecordsAreStillRead() throws {
        var w = ByteWriter()
        w.u8(RecordFormat.unchecked); w.u64(1); w.u64(2); w.participants([1, 2])
        XCTAssertEqual(try Decision.decode(w.bytes), Decision(txn: 1, commitTs: 2, participants: [1, 2]))
        var c = ByteWriter()
        c.u8(RecordFormat.unchecked); c.u64(3); c.writes([WriteOp(key: [1], value: [2])])
        XCTAssertEqual(try c.bytes.withUnsafeBytes { try CommitRecord.decode($0) }, CommitRecord(txn: 3, writes: [WriteOp(key: [1], value: [2])]))
    }
}

/// Scripted steps of the pure machines: inputs in, actions out.
final class MachineScriptTests: XCTestCase {
    let k = Array("k".utf8)

    func participant() -> ParticipantMachine {
        var m = ParticipantMachine(id: 0, recovery: ParticipantRecovery(), readFloor: 0, nowMillis: 0)
        _ = m.takeOutput()
        return m
    }

    func testPrepareForcesRecordThenVotesAndLocksBlockOthers() {
        var m = participant()
        m.step(Envelope(from: .coordinator, to: .participant(0), .prepare(txn: 10, startTs: 10, commitTs: 20, participants: [0, 1], part: TxnPart(writes: [WriteOp(key: k, value: [1])]))))
        let o = m.takeOutput()
        guard case .prepared(let p) = o.records.first else { return XCTFail("PREPARED must be forced") }
        XCTAssertEqual(p.txn, 10)
        XCTAssertEqual(o.messages.map(\.message), [.vote(txn: 10, from: 0, vote: .yes)])
        // A second writer on the locked key is refused at once (no-wait).
        m.step(Envelope(from: .coordinator, to: .participant(0), .prepare(txn: 11, startTs: 11, commitTs: 21, participants: [0, 1], part: TxnPart(writes: [WriteOp(key: k, value: [2])]))))
        guard case .vote(_, _, .no(let e)) = m.takeOutput().messages.first?.message else { return XCTFail() }
        XCTAssertEqual(e.code, .conflict)
        // A read at ts >= the prepared commitTs waits for the outcome...
        m.step(Envelope(from: .client(1), to: .participant(0), .read(req: 1, key: k, ts: 25)))
        XCTAssertTrue(m.takeOutput().messages.isEmpty)
        // ...and a read below it does not.
        m.step(Envelope(from: .client(1), to: .participant(0), .read(req: 2, key: k, ts: 15)))
        XCTAssertEqual(m.takeOutput().messages.map(\.message), [.readResult(req: 2, value: nil, version: 0)])
        m.step(Envelope(from: .coordinator, to: .participant(0), .decide(txn: 10, commit: true)))
        let done = m.takeOutput()
        XCTAssertEqual(done.records, [.committed(txn: 10, commitTs: 20, writes: [WriteOp(key: k, value: [1])])])
        XCTAssertTrue(done.messages.map(\.message).contains(.ack(txn: 10, from: 0)))
        XCTAssertTrue(done.messages.map(\.message).contains(.readResult(req: 1, value: [1], version: 20)), "the waiting read sees the commit")
        XCTAssertEqual(m.lockCount, 0)
    }

    /// A client's lease on a snapshot holds garbage collection below it
    /// while renewed, lets go when released or run out, and is refused on a
    /// snapshot already collected.
    func testSnapshotLeaseHoldsGarbageCollectionUntilReleasedOrRunOut() {
        var m = participant()
        m.retentionMillis = 1_000
        m.tick(nowMillis: 5_000)
        let ts = HLC.timestamp(millis: 5_000)
        let pin = { (req: UInt64, lease: UInt64) in Envelope(from: .client(7), to: .participant(0), .pin(req: req, ts: ts, leaseMillis: lease)) }
        m.step(pin(1, 3_000))
        XCTAssertEqual(m.takeOutput().messages.map(\.message), [.pinned(req: 1, ts: ts)])
        m.tick(nowMillis: 7_500)
        XCTAssertLessThanOrEqual(m.gcHorizon, ts, "retention alone would have collected it")
        m.step(pin(2, 3_000)) // renewed until 10,500
        _ = m.takeOutput()
        m.tick(nowMillis: 10_000)
        XCTAssertLessThanOrEqual(m.gcHorizon, ts)
        m.tick(nowMillis: 11_100)
        XCTAssertGreaterThan(m.gcHorizon, ts, "the lease ran out")
        m.step(pin(3, 3_000))
        guard case .failed(3, let e) = m.takeOutput().messages.first?.message else { return XCTFail("a collected snapshot cannot be leased") }
        XCTAssertEqual(e.code, .snapshotTooOld)

        // Released explicitly: collection moves on at the next round.
        let ts2 = HLC.timestamp(millis: 11_100)
        m.step(Envelope(from: .client(8), to: .participant(0), .pin(req: 4, ts: ts2, leaseMillis: 60_000)))
        _ = m.takeOutput()
        m.tick(nowMillis: 13_000)
        XCTAssertLessThanOrEqual(m.gcHorizon, ts2)
        m.step(Envelope(from: .client(8), to: .participant(0), .pin(req: 5, ts: ts2, leaseMillis: 0)))
        XCTAssertEqual(m.takeOutput().messages.map(\.message), [.pinned(req: 5, ts: ts2)])
        m.tick(nowMillis: 14_100)
        XCTAssertGreaterThan(m.gcHorizon, ts2)
    }

    func testReadCacheStopsAWriterFromCommittingBeneathARead() {
        var m = participant()
        m.step(Envelope(from: .client(1), to: .participant(0), .read(req: 1, key: k, ts: 50)))
        _ = m.takeOutput()
        m.step(Envelope(from: .coordinator, to: .participant(0), .commitOnePhase(txn: 40, startTs: 40, commitTs: 45, part: TxnPart(writes: [WriteOp(key: k, value: [9])]))))
        guard case .onePhaseResult(_, _, .aborted(let e)) = m.takeOutput().messages.first?.message else { return XCTFail() }
        XCTAssertTrue(e.message.contains("read at a later timestamp"), e.message)
    }

    func testDuplicateOnePhaseCommitIsIdempotent() {
        var m = participant()
        let msg = Envelope(from: .coordinator, to: .participant(0), .commitOnePhase(txn: 5, startTs: 0, commitTs: 6, part: TxnPart(writes: [WriteOp(key: k, value: [1])])))
        m.step(msg)
        XCTAssertEqual(m.takeOutput().messages.map(\.message), [.onePhaseResult(txn: 5, from: 0, outcome: .committed(6))])
        m.step(msg)
        let again = m.takeOutput()
        XCTAssertTrue(again.records.isEmpty)
        XCTAssertEqual(again.messages.map(\.message), [.onePhaseResult(txn: 5, from: 0, outcome: .committed(6))])
    }

    func testCoordinatorForcesDecisionBeforeAnyCommitAndPresumesAbort() {
        var c = CoordinatorMachine(recovery: CoordinatorRecovery(), nowMillis: 1)
        c.step(Envelope(from: .client(1), to: .coordinator, .commit(req: 1, txn: 100, startTs: 100, parts: [0: TxnPart(writes: [WriteOp(key: [1], value: [1])]), 1: TxnPart(writes: [WriteOp(key: [2], value: [2])])])))
        let prep = c.takeOutput()
        let commitTs: Timestamp = prep.messages.compactMap { if case let .prepare(_, _, ts, _, _) = $0.message { return ts } else { return nil } }.first!
        XCTAssertEqual(prep.messages.count, 2)
        c.step(Envelope(from: .participant(0), to: .coordinator, .vote(txn: 100, from: 0, vote: .yes)))
        XCTAssertTrue(c.takeOutput().messages.isEmpty)
        c.step(Envelope(from: .participant(1), to: .coordinator, .vote(txn: 100, from: 1, vote: .yes)))
        let decided = c.takeOutput()
        XCTAssertEqual(decided.records, [.decided(Decision(txn: 100, commitTs: commitTs, participants: [0, 1]))])
        XCTAssertTrue(decided.messages.map(\.message).contains(.commitResult(req: 1, txn: 100, outcome: .committed(commitTs))))
        // A transaction it never heard of is aborted by presumption.
        c.step(Envelope(from: .participant(0), to: .coordinator, .queryOutcome(txn: 999, from: 0)))
        XCTAssertEqual(c.takeOutput().messages.map(\.message), [.decide(txn: 999, commit: false)])
        // A decided one is re-sent until acknowledged, then ENDed lazily.
        c.tick(nowMillis: 10_000)
        XCTAssertEqual(c.takeOutput().messages.count, 2)
        c.step(Envelope(from: .participant(0), to: .coordinator, .ack(txn: 100, from: 0)))
        c.step(Envelope(from: .participant(1), to: .coordinator, .ack(txn: 100, from: 1)))
        XCTAssertEqual(c.takeOutput().records, [.ended(txn: 100)])
    }

    func testOracleNeverRepeatsAcrossRestart() {
        var disk = CoordinatorDisk()
        var c = CoordinatorMachine(recovery: disk.recovery, nowMillis: 5)
        var last: Timestamp = 0
        for _ in 0..<100 { last = c.allocateTimestamp() }
        for r in c.takeOutput().records { disk.apply(r) }
        var again = CoordinatorMachine(recovery: disk.recovery, nowMillis: 1) // the clock even went backwards
        XCTAssertGreaterThan(again.allocateTimestamp(), last)
    }
}

final class BulkLoadTests: XCTestCase {
    /// Commits of every size, one key at a time or as a batch (a batch past
    /// the merge bound goes in as a bulk load), with deletes and keys put
    /// again after a delete: reads and scans match applying each write alone.
    func testLargeCommitsApplyLikeSingleWrites() {
        var rng = SeededRandom(seed: 11)
        var batched = MVCCStore(), single = MVCCStore()
        var ts: Timestamp = 1
        var bulkCommits = 0
        for _ in 0..<60 {
            ts += 1
            let n = rng.chance(0.3) ? rng.int(300...3_000) : rng.int(1...40)
            if n >= batched.mergeBound { bulkCommits += 1 }
            var seen = Set<Bytes>()
            var writes: [WriteOp] = []
            for _ in 0..<n {
                let key = Array("k\(rng.int(0...20_000))".utf8)
                guard seen.insert(key).inserted else { continue }
                writes.append(WriteOp(key: key, value: rng.chance(0.2) ? nil : Array("v\(ts)".utf8)))
            }
            batched.apply(writes, ts: ts)
            for w in writes { single.apply(key: w.key, value: w.value, ts: ts) }
        }
        XCTAssertGreaterThan(bulkCommits, 5, "some commits went in as bulk loads")
        for at in [ts / 3, ts / 2, ts] {
            var a: [Bytes] = [], b: [Bytes] = []
            batched.scan(from: [], at: at) { k, v, _ in a.append(k + [0] + v); return true }
            single.scan(from: [], at: at) { k, v, _ in b.append(k + [0] + v); return true }
            XCTAssertEqual(a, b, "at \(at)")
            XCTAssertFalse(a.isEmpty)
        }
        var from: [Bytes] = []
        batched.scan(from: Array("k5".utf8), at: ts) { k, _, _ in from.append(k); return from.count < 100 }
        XCTAssertEqual(from, from.sorted { compareBytes($0, $1) < 0 })
        XCTAssertTrue(from.allSatisfy { compareBytes($0, Array("k5".utf8)) >= 0 })
    }

    func testBulkLoadOrdersKeysLikeIncrementalApply() {
        var rng = SeededRandom(seed: 3)
        var bulk = MVCCStore(), plain = MVCCStore()
        bulk.beginBulkLoad()
        for ts in 1...5_000 {
            let key = Array("k\(rng.int(0...2_000))".utf8)
            let value: Bytes? = rng.chance(0.1) ? nil : Array("v\(ts)".utf8)
            bulk.apply(key: key, value: value, ts: Timestamp(ts))
            plain.apply(key: key, value: value, ts: Timestamp(ts))
        }
        bulk.endBulkLoad()
        for at: Timestamp in [100, 2_500, 5_000] {
            var a: [Bytes] = [], b: [Bytes] = []
            bulk.scan(from: [], at: at) { k, _, _ in a.append(k); return true }
            plain.scan(from: [], at: at) { k, _, _ in b.append(k); return true }
            XCTAssertEqual(a, b)
            XCTAssertEqual(a, a.sorted { compareBytes($0, $1) < 0 })
        }
    }
}
