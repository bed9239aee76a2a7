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
