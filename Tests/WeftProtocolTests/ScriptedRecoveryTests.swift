import XCTest
import WeftCore
@testable import WeftProtocol

/// Scripted runs of the pure machines (issue "Security and integrity",
/// item 7): cooperative termination, the coordinator's vote timeout, and a
/// participant restarted with a PREPARED record. Inputs in, actions out;
/// no simulator randomness.
final class ScriptedRecoveryTests: XCTestCase {
    let k = Array("k".utf8)

    func participant(_ id: ParticipantId, prepared: [PreparedTxn] = [], now: UInt64 = 0) -> ParticipantMachine {
        var r = ParticipantRecovery()
        r.prepared = prepared
        var m = ParticipantMachine(id: id, recovery: r, readFloor: 0, nowMillis: now)
        _ = m.takeOutput()
        return m
    }

    func prepare(_ txn: TxnId, commitTs: Timestamp, to p: ParticipantId, participants: [ParticipantId] = [0, 1]) -> Envelope {
        Envelope(from: .coordinator, to: .participant(p), .prepare(txn: txn, startTs: txn, commitTs: commitTs, participants: participants,
                                                                   part: TxnPart(writes: [WriteOp(key: k, value: [UInt8(p)])])))
    }

    /// P0 voted YES and its coordinator went silent. After
    /// `peerQueryAfterTicks` it asks P1, which never prepared the
    /// transaction: P1 refuses it for good (forcing a REFUSED record before
    /// answering), so P0 may abort, and P1 later votes NO if the PREPARE
    /// arrives after all.
    func testCooperativeTerminationAbortsThroughAPeerThatNeverPrepared() {
        var p0 = participant(0), p1 = participant(1)
        p0.step(prepare(10, commitTs: 20, to: 0))
        XCTAssertEqual(p0.takeOutput().messages.map(\.message), [.vote(txn: 10, from: 0, vote: .yes)])
        XCTAssertEqual(p0.lockCount, 1)
        guard case .prepared = p0.state(of: 10) else { return XCTFail("P0 holds it prepared") }
        XCTAssertEqual(p1.state(of: 10), .unknown)
        // Before the peer delay, only the coordinator is asked.
        p0.tick(nowMillis: 300)
        XCTAssertEqual(p0.takeOutput().messages.map(\.to), [.coordinator])
        p0.tick(nowMillis: Limits.peerQueryAfterTicks + 300)
        let asks = p0.takeOutput().messages
        XCTAssertTrue(asks.contains(Envelope(from: .participant(0), to: .participant(1), .peerQuery(txn: 10, commitTs: 20, from: 0))), "\(asks)")
        p1.step(Envelope(from: .participant(0), to: .participant(1), .peerQuery(txn: 10, commitTs: 20, from: 0)))
        let answer = p1.takeOutput()
        XCTAssertEqual(answer.records, [.refused(txn: 10)], "the refusal is forced before the answer leaves")
        XCTAssertEqual(p1.state(of: 10), .refused)
        XCTAssertEqual(answer.messages.map(\.message), [.peerOutcome(txn: 10, from: 1, committed: false)])
        p0.step(answer.messages[0])
        let resolved = p0.takeOutput()
        XCTAssertEqual(resolved.records, [.aborted(txn: 10)])
        XCTAssertEqual(p0.state(of: 10), .unknown, "aborted: presumed from here on")
        XCTAssertEqual(p0.lockCount, 0)
        XCTAssertTrue(p0.inDoubt.isEmpty)
        // The late PREPARE at P1 is refused: the coordinator cannot commit.
        p1.step(prepare(10, commitTs: 20, to: 1))
        guard case .vote(10, 1, .no)? = p1.takeOutput().messages.first?.message else { return XCTFail("P1 must vote NO after refusing") }
    }

    /// A peer that committed the transaction says so, and the in-doubt
    /// participant commits with the same timestamp.
    func testCooperativeTerminationCommitsThroughAPeerThatCommitted() {
        var p0 = participant(0), p1 = participant(1)
        p0.step(prepare(10, commitTs: 20, to: 0))
        p1.step(prepare(10, commitTs: 20, to: 1))
        _ = p0.takeOutput()
        _ = p1.takeOutput()
        p1.step(Envelope(from: .coordinator, to: .participant(1), .decide(txn: 10, commit: true)))
        _ = p1.takeOutput()
        p0.tick(nowMillis: Limits.peerQueryAfterTicks + 300)
        _ = p0.takeOutput()
        p1.step(Envelope(from: .participant(0), to: .participant(1), .peerQuery(txn: 10, commitTs: 20, from: 0)))
        let answer = p1.takeOutput()
        XCTAssertEqual(answer.records, [], "a committed peer forces nothing to answer")
        XCTAssertEqual(answer.messages.map(\.message), [.peerOutcome(txn: 10, from: 1, committed: true)])
        p0.step(answer.messages[0])
        XCTAssertEqual(p0.takeOutput().records, [.committed(txn: 10, commitTs: 20, writes: [WriteOp(key: k, value: [0])])])
        XCTAssertEqual(p0.state(of: 10), .committed(20))
        // A peer itself in doubt knows nothing.
        var p2 = participant(2)
        p2.step(prepare(11, commitTs: 21, to: 2, participants: [0, 2]))
        _ = p2.takeOutput()
        p2.step(Envelope(from: .participant(0), to: .participant(2), .peerQuery(txn: 11, commitTs: 21, from: 0)))
        XCTAssertEqual(p2.takeOutput().messages.map(\.message), [.peerOutcome(txn: 11, from: 2, committed: nil)])
    }

    /// The coordinator waits `prepareTimeoutTicks` for votes, then aborts:
    /// nothing is forced (presumed abort), the participants are told, the
    /// client hears `aborted`; a late YES changes nothing.
    func testCoordinatorTimeoutAbortsWithoutForcingAnything() {
        var c = CoordinatorMachine(recovery: CoordinatorRecovery(), nowMillis: 1)
        _ = c.takeOutput()
        c.step(Envelope(from: .client(1), to: .coordinator, .commit(req: 7, txn: 100, startTs: 100,
                                                                     parts: [0: TxnPart(writes: [WriteOp(key: [1], value: [1])]), 1: TxnPart(writes: [WriteOp(key: [2], value: [2])])])))
        XCTAssertEqual(c.takeOutput().messages.count, 2)
        c.step(Envelope(from: .participant(0), to: .coordinator, .vote(txn: 100, from: 0, vote: .yes)))
        XCTAssertTrue(c.takeOutput().messages.isEmpty)
        c.tick(nowMillis: 1 + Limits.prepareTimeoutTicks - 1)
        XCTAssertTrue(c.takeOutput().messages.isEmpty, "not yet")
        c.tick(nowMillis: 1 + Limits.prepareTimeoutTicks + 1)
        let out = c.takeOutput()
        XCTAssertEqual(out.records, [], "an abort is never forced")
        let ms = out.messages.map(\.message)
        XCTAssertTrue(ms.contains(.decide(txn: 100, commit: false)))
        guard let result = ms.first(where: { if case .commitResult = $0 { return true } else { return false } }),
              case .commitResult(7, 100, .aborted(let e)) = result else { return XCTFail("the client hears aborted: \(ms)") }
        XCTAssertEqual(e.code, .aborted)
        XCTAssertTrue(e.message.contains("participants [1] did not vote"), e.message)
        c.step(Envelope(from: .participant(1), to: .coordinator, .vote(txn: 100, from: 1, vote: .yes)))
        XCTAssertFalse(c.takeOutput().messages.contains { if case .commitResult = $0.message { return true } else { return false } })
        // Asked later, it presumes abort.
        c.step(Envelope(from: .participant(1), to: .coordinator, .queryOutcome(txn: 100, from: 1)))
        XCTAssertEqual(c.takeOutput().messages.map(\.message), [.decide(txn: 100, commit: false)])
    }

    /// A participant restarted with a PREPARED record re-takes the locks
    /// before serving, asks the coordinator at once, parks readers at or
    /// above the commit timestamp, refuses conflicting writers, and applies
    /// the outcome when it arrives.
    func testRestartedParticipantRetakesLocksAndAsksForTheOutcome() {
        var before = participant(0)
        before.step(prepare(10, commitTs: 20, to: 0))
        guard case .prepared(let record)? = before.takeOutput().records.first else { return XCTFail("PREPARED forced") }
        // Crash; recover from the record alone.
        var r = ParticipantRecovery()
        r.prepared = [record]
        var m = ParticipantMachine(id: 0, recovery: r, readFloor: 0, nowMillis: 5)
        XCTAssertEqual(m.takeOutput().messages.map(\.message), [.queryOutcome(txn: 10, from: 0)])
        XCTAssertEqual(m.lockCount, 1)
        m.step(prepare(11, commitTs: 22, to: 0))
        guard case .vote(11, 0, .no(let e))? = m.takeOutput().messages.first?.message else { return XCTFail("the lock holds after restart") }
        XCTAssertEqual(e.code, .conflict)
        m.step(Envelope(from: .client(3), to: .participant(0), .read(req: 1, key: k, ts: 25)))
        XCTAssertTrue(m.takeOutput().messages.isEmpty, "a read above the commit timestamp waits")
        m.step(Envelope(from: .coordinator, to: .participant(0), .decide(txn: 10, commit: true)))
        let done = m.takeOutput()
        XCTAssertEqual(done.records, [.committed(txn: 10, commitTs: 20, writes: record.writes)])
        XCTAssertTrue(done.messages.map(\.message).contains(.readResult(req: 1, value: [0], version: 20)))
        XCTAssertTrue(done.messages.map(\.message).contains(.ack(txn: 10, from: 0)))
        XCTAssertEqual(m.lockCount, 0)
    }
}
