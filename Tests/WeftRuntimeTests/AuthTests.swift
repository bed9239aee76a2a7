import Foundation
import XCTest
import WeftCore
import WeftProtocol
@testable import WeftRuntime

/// Authenticated connections (issue "Security and integrity", items 1 and
/// 3): the attacks of the issue against a participant's real listener.
final class AuthTests: XCTestCase {
    /// What reached the participant's state machine.
    final class Recorder: MessageSink, @unchecked Sendable {
        let lock = NSLock()
        var got: [Envelope] = []
        func enqueue(_ env: Envelope) { lock.withLock { got.append(env) } }
        var count: Int { lock.withLock { got.count } }
    }

    let clusterId = "c0ffee0123456789"

    func participant() throws -> (NetworkTransport, Recorder, Int) {
        let t = NetworkTransport(me: .participant(0), credentials: Credentials(clusterId: clusterId, nodeKey: testNodeKey), directory: [:])
        let r = Recorder()
        t.register(.participant(0), r)
        t.healthInfo = { "{\"role\":\"participant\",\"id\":\"participant-0\",\"pid\":\(getpid())}" }
        try t.listen(Endpoint(host: "127.0.0.1", port: 0))
        return (t, r, t.boundPort!)
    }

    func forgedCommit() -> Frame {
        .envelope(Envelope(from: .coordinator, to: .participant(0),
                           .commitOnePhase(txn: 7, startTs: 7, commitTs: 1 << 62, part: TxnPart(writes: [WriteOp(key: Array("k".utf8), value: Array("v".utf8))]))))
    }

    /// Everything the attacker received, as text: it must not name the
    /// cluster, the node, its role or its pid.
    func assertRevealsNothing(_ got: [UInt8], file: StaticString = #filePath, line: UInt = #line) {
        let text = String(decoding: got, as: UTF8.self)
        for secret in [clusterId, "participant", "role", "\(getpid())"] {
            XCTAssertFalse(text.contains(secret), "an unauthenticated peer learned \(secret): \(text)", file: file, line: line)
        }
    }

    func testAPeerWithoutTheSecretIsRefusedAndLearnsNothing() throws {
        let (t, r, port) = try participant()
        defer { t.close() }
        // The forged coordinator of the issue: the right cluster id, but
        // a secret it does not have.
        let wrong = Credentials(clusterId: clusterId, nodeKey: Array(repeating: 9, count: 32))
        let c = try RawSocket(port: port)
        XCTAssertThrowsError(try c.handshake(wrong, as: .coordinator))
        try? c.send(forgedCommit().encoded())
        let (closed, got) = c.readUntilClosed(timeoutMillis: 3000)
        XCTAssertTrue(closed)
        assertRevealsNothing(got)
        XCTAssertEqual(r.count, 0, "nothing reached the participant")
    }

    func testFramesBeforeTheHandshakeAreRefusedWithoutDetail() throws {
        let (t, r, port) = try participant()
        defer { t.close() }
        for first in [forgedCommit(), .ping(req: 1), .auth(sender: .coordinator, proof: Array(repeating: 0, count: 32)),
                      .call(req: 1, method: "job.run", body: [])] {
            let c = try RawSocket(port: port)
            try c.send(first.encoded())
            let (closed, got) = c.readUntilClosed(timeoutMillis: 3000)
            XCTAssertTrue(closed, "\(first)")
            XCTAssertTrue(String(decoding: got, as: UTF8.self).contains(Handshake.refusal))
            assertRevealsNothing(got)
        }
        // A HELLO gets only a CHALLENGE: a nonce.
        let c = try RawSocket(port: port)
        try c.send(Frame.hello(nonce: Crypto.randomBytes(32)).encoded())
        guard case .challenge(let nonce)? = c.readFrame() else { return XCTFail("no challenge") }
        XCTAssertEqual(nonce.count, 32)
        XCTAssertEqual(r.count, 0)
    }

    func testAClientCannotClaimToBeTheCoordinator() throws {
        let (t, r, port) = try participant()
        defer { t.close() }
        let client = Credentials(clusterId: clusterId, clientKey: ClusterSecret.clientKey(fromNodeKey: testNodeKey))
        // Proving the client secret while claiming the coordinator's name fails.
        let c = try RawSocket(port: port)
        XCTAssertThrowsError(try c.handshake(client, as: .coordinator))
        XCTAssertEqual(r.count, 0)
        // As itself, it is in, but may not order a commit.
        let d = try RawSocket(port: port)
        try d.handshake(client, as: .client(5))
        try d.send(Frame.envelope(Envelope(from: .client(5), to: .participant(0),
                                           .commitOnePhase(txn: 7, startTs: 7, commitTs: 8, part: TxnPart()))).encoded())
        let (closed, got) = d.readUntilClosed(timeoutMillis: 3000)
        XCTAssertTrue(closed)
        XCTAssertTrue(String(decoding: got, as: UTF8.self).contains("may not send commitOnePhase"))
        XCTAssertEqual(r.count, 0, "the forged commit never reached the participant")
        // ...nor speak in the coordinator's name on its own connection.
        let e = try RawSocket(port: port)
        try e.handshake(client, as: .client(6))
        try e.send(forgedCommit().encoded())
        XCTAssertTrue(e.readUntilClosed(timeoutMillis: 3000).0)
        XCTAssertEqual(r.count, 0)
        // A read is what a client may do.
        let f = try RawSocket(port: port)
        try f.handshake(client, as: .client(7))
        try f.send(Frame.envelope(Envelope(from: .client(7), to: .participant(0), .read(req: 1, key: [1], ts: 5))).encoded())
        usleep(200_000)
        XCTAssertEqual(r.count, 1)
        XCTAssertTrue(f.isOpen())
    }

    func testTheCoordinatorWithTheSecretIsAccepted() throws {
        let (t, r, port) = try participant()
        defer { t.close() }
        let c = try RawSocket(port: port)
        try c.handshake(Credentials(clusterId: clusterId, nodeKey: testNodeKey), as: .coordinator)
        try c.send(Frame.envelope(Envelope(from: .coordinator, to: .participant(0), .decide(txn: 1, commit: false))).encoded())
        try c.send(Frame.ping(req: 3).encoded())
        guard case .pong(3, let info)? = c.readFrame() else { return XCTFail("no pong after the handshake") }
        XCTAssertTrue(info.contains("participant"), "health is for authenticated peers")
        XCTAssertEqual(r.count, 1)
    }

    func testAProofFromAnotherConnectionIsUseless() throws {
        let (t, _, port) = try participant()
        defer { t.close() }
        let creds = Credentials(clusterId: clusterId, nodeKey: testNodeKey)
        // Record a genuine AUTH...
        let a = try RawSocket(port: port)
        var h = ConnectorHandshake(credentials: creds, me: .coordinator)
        try a.send(h.hello.encoded())
        guard case .challenge(let n1)? = a.readFrame(), let auth = h.answer(challenge: n1) else { return XCTFail("no challenge") }
        // ...and replay it on a second connection, which has its own nonce.
        let b = try RawSocket(port: port)
        try b.send(h.hello.encoded())
        guard case .challenge(let n2)? = b.readFrame() else { return XCTFail("no challenge") }
        XCTAssertNotEqual(n1, n2)
        try b.send(auth.encoded())
        let (closed, got) = b.readUntilClosed(timeoutMillis: 3000)
        XCTAssertTrue(closed)
        XCTAssertTrue(String(decoding: got, as: UTF8.self).contains(Handshake.refusal))
    }

    func testAConnectorBelievesOnlyAWelcomeMadeWithItsKey() {
        let creds = Credentials(clusterId: clusterId, nodeKey: testNodeKey)
        var h = ConnectorHandshake(credentials: creds, me: .coordinator)
        guard case .hello(let nonceC) = h.hello else { return XCTFail() }
        let nonceA = Crypto.randomBytes(32)
        XCTAssertNotNil(h.answer(challenge: nonceA))
        XCTAssertNil(h.answer(challenge: nonceA), "a second CHALLENGE is refused")
        let good = Handshake.acceptorProof(key: testNodeKey, clusterId: clusterId, nonceA: nonceA, nonceC: nonceC, it: .participant(0))
        XCTAssertTrue(h.accepts(welcome: .participant(0), proof: good))
        XCTAssertFalse(h.accepts(welcome: .participant(1), proof: good), "the proof names who answers")
        let forged = Handshake.acceptorProof(key: Array(repeating: 1, count: 32), clusterId: clusterId, nonceA: nonceA, nonceC: nonceC, it: .participant(0))
        XCTAssertFalse(h.accepts(welcome: .participant(0), proof: forged))
        let otherCluster = Handshake.acceptorProof(key: testNodeKey, clusterId: "other", nonceA: nonceA, nonceC: nonceC, it: .participant(0))
        XCTAssertFalse(h.accepts(welcome: .participant(0), proof: otherCluster))
        // The connector's proof cannot be passed off as the acceptor's.
        let connector = Handshake.connectorProof(key: testNodeKey, clusterId: clusterId, nonceA: nonceA, nonceC: nonceC, me: .participant(0))
        XCTAssertFalse(h.accepts(welcome: .participant(0), proof: connector))
    }

    func testNodesWithDifferentSecretsDoNotTalk() throws {
        // A node that does not hold the secret gets nothing from the
        // coordinator, and cannot be pinged with the real client secret.
        let impostor = NetworkTransport(me: .participant(0), credentials: Credentials(clusterId: clusterId, nodeKey: Array(repeating: 1, count: 32)), directory: [:])
        let r = Recorder()
        impostor.register(.participant(0), r)
        try impostor.listen(Endpoint(host: "127.0.0.1", port: 0))
        defer { impostor.close() }
        let coordinator = NetworkTransport(me: .coordinator, credentials: Credentials(clusterId: clusterId, nodeKey: testNodeKey),
                                           directory: [.participant(0): Endpoint(host: "127.0.0.1", port: impostor.boundPort!)])
        defer { coordinator.close() }
        coordinator.send(Envelope(from: .coordinator, to: .participant(0), .decide(txn: 1, commit: true)))
        usleep(500_000)
        XCTAssertEqual(r.count, 0)
        XCTAssertNil(NetworkTransport.ping(Endpoint(host: "127.0.0.1", port: impostor.boundPort!),
                                           credentials: Credentials(clusterId: clusterId, clientKey: ClusterSecret.clientKey(fromNodeKey: testNodeKey)), timeoutMillis: 500))
    }

    func testSecretFilesAreOwnerOnlyAndRefusedOtherwise() throws {
        let dir = NSTemporaryDirectory() + "weft-secret-\(UInt64.random(in: 1...UInt64.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let key = try ClusterSecret.nodeKey(dir: dir, create: true)
        XCTAssertEqual(key.count, 32)
        for name in [ClusterSecret.nodeFileName, ClusterSecret.clientFileName] {
            let attrs = try FileManager.default.attributesOfItem(atPath: dir + "/" + name)
            XCTAssertEqual((attrs[.posixPermissions] as? NSNumber)?.intValue, 0o600, name)
        }
        XCTAssertEqual(try ClusterSecret.nodeKey(dir: dir, create: false), key, "read back")
        XCTAssertEqual(try ClusterSecret.clientKey(dir: dir, secretFile: nil), ClusterSecret.clientKey(fromNodeKey: key))
        chmod(dir + "/" + ClusterSecret.nodeFileName, 0o644)
        XCTAssertThrowsError(try ClusterSecret.nodeKey(dir: dir, create: false)) { e in
            XCTAssertTrue((e as? WeftError)?.message.contains("chmod 600") == true, "\(e)")
        }
        try "not hex\n".write(toFile: dir + "/bad", atomically: true, encoding: .utf8)
        chmod(dir + "/bad", 0o600)
        XCTAssertThrowsError(try ClusterSecret.read(dir + "/bad"))
        XCTAssertThrowsError(try ClusterSecret.nodeKey(dir: dir + "/none", create: false))
    }
}
