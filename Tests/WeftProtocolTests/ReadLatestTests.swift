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
