import XCTest
import WeftCore
@testable import WeftProtocol

/// Which role may send what (issue "Security and integrity", item 3).
final class AuthorizationTests: XCTestCase {
    let part = TxnPart(writes: [WriteOp(key: [1], value: [2])])

    func allowed(_ from: NodeAddress, _ to: NodeAddress, _ m: Message) -> Bool {
        Authorization.refusal(Envelope(from: from, to: to, m)) == nil
    }

    func testOnlyTheCoordinatorDirectsParticipants() {
        for m: Message in [.prepare(txn: 1, startTs: 1, commitTs: 2, participants: [0, 1], part: part),
                           .commitOnePhase(txn: 1, startTs: 1, commitTs: 2, part: part),
                           .decide(txn: 1, commit: true), .clock(ts: 9)] {
            XCTAssertTrue(allowed(.coordinator, .participant(0), m), "\(m)")
            XCTAssertFalse(allowed(.client(3), .participant(0), m), "\(m)")
            XCTAssertFalse(allowed(.participant(1), .participant(0), m), "\(m)")
        }
    }

    func testParticipantsSpeakOnlyInTheirOwnName() {
        XCTAssertTrue(allowed(.participant(1), .coordinator, .vote(txn: 1, from: 1, vote: .yes)))
        XCTAssertFalse(allowed(.participant(1), .coordinator, .vote(txn: 1, from: 2, vote: .yes)))
        XCTAssertFalse(allowed(.client(1), .coordinator, .vote(txn: 1, from: 0, vote: .yes)))
        XCTAssertTrue(allowed(.participant(1), .coordinator, .onePhaseResult(txn: 1, from: 1, outcome: .committed(5))))
        XCTAssertFalse(allowed(.client(4), .coordinator, .onePhaseResult(txn: 1, from: 1, outcome: .committed(5))))
        XCTAssertTrue(allowed(.participant(0), .participant(2), .peerOutcome(txn: 1, from: 0, committed: true)))
        XCTAssertFalse(allowed(.participant(0), .participant(2), .peerOutcome(txn: 1, from: 1, committed: true)))
        XCTAssertFalse(allowed(.client(9), .participant(2), .peerOutcome(txn: 1, from: 1, committed: true)))
        XCTAssertFalse(allowed(.coordinator, .participant(2), .peerOutcome(txn: 1, from: 1, committed: true)))
        XCTAssertTrue(allowed(.participant(0), .participant(1), .peerQuery(txn: 1, commitTs: 2, from: 0)))
        XCTAssertTrue(allowed(.participant(0), .coordinator, .clockQuery(from: 0)))
        XCTAssertFalse(allowed(.participant(0), .coordinator, .clockQuery(from: 1)))
    }

    func testClientsAskButDoNotAnswer() {
        XCTAssertTrue(allowed(.client(1), .coordinator, .begin(req: 1)))
        XCTAssertTrue(allowed(.client(1), .coordinator, .commit(req: 1, txn: 1, startTs: 1, parts: [0: part])))
        XCTAssertFalse(allowed(.client(1), .participant(0), .commit(req: 1, txn: 1, startTs: 1, parts: [0: part])))
        XCTAssertTrue(allowed(.client(1), .participant(0), .read(req: 1, key: [1], ts: 1)))
        XCTAssertTrue(allowed(.client(1), .participant(0), .scan(req: 1, start: [], end: nil, limit: 5, ts: 1)))
        XCTAssertTrue(allowed(.client(1), .participant(0), .pin(req: 1, ts: 1, leaseMillis: 100)))
        XCTAssertTrue(allowed(.client(1), .participant(0), .status(req: 1, txn: 1)))
        XCTAssertTrue(allowed(.client(1), .coordinator, .status(req: 1, txn: 1)))
        XCTAssertFalse(allowed(.client(1), .client(2), .status(req: 1, txn: 1)))
        XCTAssertFalse(allowed(.client(1), .coordinator, .began(req: 1, ts: 5)))
        XCTAssertFalse(allowed(.client(1), .client(2), .readResult(req: 1, value: nil, version: 0)))
        XCTAssertFalse(allowed(.client(1), .coordinator, .ack(txn: 1, from: 0)))
        XCTAssertTrue(allowed(.coordinator, .client(1), .began(req: 1, ts: 5)))
        XCTAssertTrue(allowed(.participant(0), .client(1), .readResult(req: 1, value: nil, version: 0)))
    }
}
