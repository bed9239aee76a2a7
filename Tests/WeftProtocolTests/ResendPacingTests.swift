import XCTest
import WeftCore
@testable import WeftProtocol

/// A coordinator holding a big backlog of unacknowledged COMMIT decisions
/// resends them in slices (never the whole backlog at once) and in turn
/// (every decision is resent; none waits behind the others forever).
final class ResendPacingTests: XCTestCase {
    func testABacklogIsResentInSlicesAndEveryDecisionInTurn() {
        var r = CoordinatorRecovery()
        r.reservedTs = 1_000
        let n = 20_000
        r.decisions = (0..<n).map { Decision(txn: TxnId(10_000 + $0), commitTs: Timestamp(500 + $0), participants: [0, 1]) }
        var m = CoordinatorMachine(recovery: r, nowMillis: 0)
        XCTAssertEqual(m.takeOutput().messages.count, 2 * n, "recovery sends every decision once")
        var resent = Set<TxnId>()
        var largestSlice = 0
        var now: UInt64 = 0
        while now < 3_000 {
            now += 10
            m.tick(nowMillis: now)
            let msgs = m.takeOutput().messages
            largestSlice = max(largestSlice, msgs.count)
            for e in msgs { if case .decide(let txn, true) = e.message { resent.insert(txn) } }
        }
        XCTAssertEqual(resent.count, n, "every decision was resent within 3 s")
        XCTAssertLessThanOrEqual(largestSlice, Limits.decisionResendsPerTickMax * 10 + 2, "a slice, never the backlog")
        XCTAssertGreaterThan(largestSlice, 0)
    }
}

/// A participant that does not vote in time: the transaction is aborted
/// for sure (code `aborted`, the CLI's exit 3), not "outcome unknown".
final class VoteTimeoutTests: XCTestCase {
    func testMissingVoteIsADefiniteAbort() {
        var r = CoordinatorRecovery()
        r.reservedTs = 1_000
        var m = CoordinatorMachine(recovery: r, nowMillis: 0)
        let parts: [ParticipantId: TxnPart] = [0: TxnPart(writes: [WriteOp(key: [1], value: [1])]), 1: TxnPart(writes: [WriteOp(key: [2], value: [2])])]
        m.step(Envelope(from: .client(7), to: .coordinator, .commit(req: 1, txn: 500, startTs: 500, parts: parts)))
        _ = m.takeOutput()
        m.tick(nowMillis: Limits.prepareTimeoutTicks + 10)
        let replies = m.takeOutput().messages.compactMap { e -> CommitOutcome? in
            if case let .commitResult(1, _, outcome) = e.message { return outcome }
            return nil
        }
        guard case .aborted(let e)? = replies.first else { return XCTFail("no abort: \(replies)") }
        XCTAssertEqual(e.code, .aborted)
        XCTAssertTrue(e.message.contains("did not vote"), e.message)
    }
}
