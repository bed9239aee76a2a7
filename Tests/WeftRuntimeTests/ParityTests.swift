import Foundation
import XCTest
import WeftCore
import WeftProtocol
@testable import WeftRuntime

/// The simulator's disks (`ParticipantDisk`, `CoordinatorDisk`) stand in
/// for LMDB in 2,000 seeds a run; this checks that they mean the same:
/// random batches of every record kind, applied to both, recover to the
/// same state (issue "Security and integrity", item 7).
final class ParityTests: XCTestCase {
    func testParticipantRecordsMeanTheSameOnBothDisks() throws {
        var rng = SeededGenerator.fromEnvironment("parity")
        let dir = tempDir("weft-parity")
        defer { removeDir(dir) }
        let storage = try ParticipantStorage(directory: dir + "/p")
        defer { storage.close() }
        var disk = ParticipantDisk()
        var nextTs: Timestamp = 1
        var open: [TxnId] = []
        var committed: [Timestamp] = []
        for round in 0..<300 {
            var batch: [ParticipantRecord] = []
            for _ in 0..<Int.random(in: 1...8, using: &rng) {
                nextTs += UInt64.random(in: 1...5, using: &rng)
                // A transaction writes a key at most once.
                let keys = Array((0...20).shuffled(using: &rng).prefix(Int.random(in: 0...3, using: &rng)))
                let writes = keys.map { k in
                    WriteOp(key: [UInt8(k)], value: Bool.random(using: &rng) ? nil : [UInt8.random(in: 0...255, using: &rng)])
                }
                switch Int.random(in: 0..<7, using: &rng) {
                case 0:
                    batch.append(.prepared(PreparedTxn(txn: nextTs, startTs: nextTs, commitTs: nextTs + 1, participants: [0, 1], writes: writes, preparedAtMillis: nextTs)))
                    open.append(nextTs)
                case 1 where !open.isEmpty:
                    let t = open.remove(at: Int.random(in: 0..<open.count, using: &rng))
                    nextTs += 1
                    batch.append(.committed(txn: t, commitTs: nextTs, writes: writes))
                    committed.append(nextTs)
                case 2 where !open.isEmpty:
                    batch.append(.aborted(txn: open.remove(at: Int.random(in: 0..<open.count, using: &rng))))
                case 3 where !committed.isEmpty:
                    batch.append(.releaseCommit(commitTs: committed.remove(at: Int.random(in: 0..<committed.count, using: &rng))))
                case 4:
                    // Any horizon, even one below the last: both keep the highest.
                    batch.append(.gcHorizon(UInt64.random(in: 0...nextTs, using: &rng)))
                case 5:
                    batch.append(.refused(txn: UInt64.random(in: 1...nextTs, using: &rng)))
                default:
                    batch.append(.committed(txn: nextTs, commitTs: nextTs, writes: writes))  // one-phase
                    committed.append(nextTs)
                }
            }
            for r in batch { disk.apply(r) }
            try storage.persist(batch)
            if round % 25 == 24 {
                let lmdb = try storage.recover()
                let sim = disk.recovery
                XCTAssertEqual(lmdb.commits.map(\.commitTs), sim.commits.map(\.commitTs), "round \(round): commit timestamps")
                XCTAssertEqual(lmdb.commits.map(\.record), sim.commits.map(\.record), "round \(round): commit records")
                XCTAssertEqual(lmdb.prepared, sim.prepared, "round \(round): PREPARED")
                XCTAssertEqual(lmdb.gcHorizon, sim.gcHorizon, "round \(round): GC horizon")
                XCTAssertEqual(lmdb.refused, sim.refused, "round \(round): refusals")
                // The machines rebuilt from each hold the same data.
                let a = try storage.recoverMachine(id: 0, readFloor: 0, nowMillis: 0)
                let b = ParticipantMachine(id: 0, recovery: sim, readFloor: 0, nowMillis: 0)
                for key in 0...20 {
                    let x = a.store.read([UInt8(key)], at: .max - 1), y = b.store.read([UInt8(key)], at: .max - 1)
                    XCTAssertEqual(x.value, y.value, "round \(round): key \(key)")
                    XCTAssertEqual(x.version, y.version, "round \(round): key \(key)")
                }
                XCTAssertEqual(a.lockCount, b.lockCount)
            }
        }
    }

    func testCoordinatorRecordsMeanTheSameOnBothDisks() throws {
        var rng = SeededGenerator.fromEnvironment("parity")
        let dir = tempDir("weft-parity")
        defer { removeDir(dir) }
        let storage = try CoordinatorStorage(directory: dir + "/c")
        defer { storage.close() }
        var disk = CoordinatorDisk()
        var open: [TxnId] = []
        for txn in UInt64(1)...400 {
            var batch: [CoordinatorRecord] = []
            switch Int.random(in: 0..<3, using: &rng) {
            case 0: batch.append(.reserveTimestamps(upTo: UInt64.random(in: 0...10_000, using: &rng)))
            case 1:
                batch.append(.decided(Decision(txn: txn, commitTs: txn + 1, participants: [0, Int.random(in: 1...3, using: &rng)])))
                open.append(txn)
            default:
                if !open.isEmpty { batch.append(.ended(txn: open.remove(at: Int.random(in: 0..<open.count, using: &rng)))) }
            }
            for r in batch { disk.apply(r) }
            try storage.persist(batch)
        }
        let lmdb = try storage.recover()
        XCTAssertEqual(lmdb.reservedTs, disk.recovery.reservedTs)
        XCTAssertEqual(lmdb.decisions, disk.recovery.decisions)
    }
}
