import XCTest
import WeftCore
@testable import WeftProtocol

/// Reads at `readLatestTs` (the Redis front end's GET): the newest
/// committed version, waiting out a prepared lock, and never recorded, so
/// they cannot make later writes conflict.
final class ReadLatestTests: XCTestCase {
    func read(_ m: inout ParticipantMachine, _ key: Bytes, req: UInt64) -> [Envelope] {
        m.step(Envelope(from: .client(9), to: .participant(0), .read(req: req, key: key, ts: readLatestTs)))
        return m.takeOutput().messages.filter { $0.to == .client(9) }
    }

    func value(_ out: [Envelope]) -> Bytes?? {
        guard out.count == 1, case .readResult(_, let v, _) = out[0].message else { return .none }
        return .some(v)
    }

    func testNewestVersionWaitsForAPreparedLockAndIsNotRecorded() {
        var m = ParticipantMachine(id: 0, recovery: ParticipantRecovery(), readFloor: 0, nowMillis: 0)
        _ = m.takeOutput()
        let k: Bytes = [7]
        XCTAssertEqual(value(read(&m, k, req: 1)), .some(nil), "absent")
        m.step(Envelope(from: .coordinator, to: .participant(0), .commitOnePhase(txn: 100, startTs: 0, commitTs: 100, part: TxnPart(writes: [WriteOp(key: k, value: [1])]))))
        _ = m.takeOutput()
        XCTAssertEqual(value(read(&m, k, req: 2)), .some([1]), "a one-phase commit is visible at once")
        // A prepared write locks the key: the read waits for the decision.
        m.step(Envelope(from: .coordinator, to: .participant(0), .prepare(txn: 200, startTs: 150, commitTs: 200, participants: [0, 1], part: TxnPart(writes: [WriteOp(key: k, value: [2])]))))
        _ = m.takeOutput()
        XCTAssertEqual(read(&m, k, req: 3).count, 0, "parked behind the prepared lock")
        m.step(Envelope(from: .coordinator, to: .participant(0), .decide(txn: 200, commit: true)))
        XCTAssertEqual(value(m.takeOutput().messages.filter { $0.to == .client(9) }), .some([2]), "answered with the decided write")
        // Not recorded: a blind write with a commit timestamp below any
        // clock reading still commits (a read at a real timestamp would
        // have raised the read cache and refused it).
        m.step(Envelope(from: .coordinator, to: .participant(0), .commitOnePhase(txn: 300, startTs: 0, commitTs: 300, part: TxnPart(writes: [WriteOp(key: k, value: [3])]))))
        let out = m.takeOutput().messages
        guard case .onePhaseResult(_, _, .committed(300))? = out.first?.message else { return XCTFail("\(out)") }
        XCTAssertEqual(value(read(&m, k, req: 4)), .some([3]))
    }
}

/// A commit timestamp far ahead of the participant's clock (a forged
/// `commitOnePhase` with ts 2^62) is refused, so it cannot make a key
/// unwritable for good.
final class FutureCommitTests: XCTestCase {
    func testACommitTimestampFarAheadOfTheClockIsRefused() {
        let now: UInt64 = 1_000_000
        var m = ParticipantMachine(id: 0, recovery: ParticipantRecovery(), readFloor: 0, nowMillis: now)
        _ = m.takeOutput()
        let k: Bytes = [1]
        m.step(Envelope(from: .coordinator, to: .participant(0), .commitOnePhase(txn: 1 << 62, startTs: 0, commitTs: 1 << 62, part: TxnPart(writes: [WriteOp(key: k, value: [9])]))))
        guard case .onePhaseResult(_, _, .aborted(let e))? = m.takeOutput().messages.first?.message else { return XCTFail("not refused") }
        XCTAssertTrue(e.message.contains("Limits.futureCommitSlackMillis"), e.message)
        // An ordinary timestamp still commits afterwards: the key is not poisoned.
        let ts = HLC.timestamp(millis: now + 500)
        m.step(Envelope(from: .coordinator, to: .participant(0), .commitOnePhase(txn: ts, startTs: 0, commitTs: ts, part: TxnPart(writes: [WriteOp(key: k, value: [1])]))))
        guard case .onePhaseResult(_, _, .committed)? = m.takeOutput().messages.first?.message else { return XCTFail("ordinary commit refused") }
        // A prepare far ahead is refused too (a NO vote).
        m.step(Envelope(from: .coordinator, to: .participant(0), .prepare(txn: 7, startTs: 5, commitTs: 1 << 62, participants: [0, 1], part: TxnPart(writes: [WriteOp(key: [2], value: [2])]))))
        guard case .vote(_, _, .no)? = m.takeOutput().messages.first?.message else { return XCTFail("prepare not refused") }
    }
}
