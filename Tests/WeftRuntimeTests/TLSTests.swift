import Foundation
import XCTest
import WeftCore
import WeftProtocol
@testable import WeftRuntime

/// TLS on node and client connections (issue "Security and integrity",
/// item 2): certificates from `weft cert`, mutual verification against
/// the cluster's CA, plaintext and foreign certificates refused.
final class TLSTests: XCTestCase {
    var dir = ""
    override func setUp() { dir = tempDir("weft-tls") }
    override func tearDown() { removeDir(dir) }

    func certs(_ name: String) throws -> CertFiles {
        let d = dir + "/" + name
        for sub in ["create-ca", "create-node", "create-client"] {
            let r = try runWeft(["cert", sub, "--certs-dir", d])
            XCTAssertEqual(r.status, 0, r.stderr)
        }
        return CertFiles(d)
    }

    let clusterId = "7150cafe"

    func node(_ files: CertFiles) throws -> (NetworkTransport, AuthTests.Recorder, Int) {
        let t = NetworkTransport(me: .participant(0), credentials: Credentials(clusterId: clusterId, nodeKey: testNodeKey), directory: [:],
                                 tls: try TLSSetup(files: files, asNode: true))
        let r = AuthTests.Recorder()
        t.register(.participant(0), r)
        try t.listen(Endpoint(host: "127.0.0.1", port: 0))
        return (t, r, t.boundPort!)
    }

    func client(_ files: CertFiles, port: Int) throws -> NetworkTransport {
        NetworkTransport(me: .client(42), credentials: Credentials(clusterId: clusterId, clientKey: ClusterSecret.clientKey(fromNodeKey: testNodeKey)),
                         directory: [.participant(0): Endpoint(host: "127.0.0.1", port: port)], tls: try TLSSetup(files: files, asNode: false))
    }

    func waitFor(_ cond: () -> Bool) -> Bool {
        for _ in 0..<300 where !cond() { usleep(10_000) }
        return cond()
    }

    func testCertificatesAreMadeOwnerOnlyAndRefuseToOverwrite() throws {
        let files = try certs("a")
        for (f, mode) in [(files.caKey, 0o600), (files.nodeKey, 0o600), (files.clientKey, 0o600), (files.caCert, 0o644)] {
            let attrs = try FileManager.default.attributesOfItem(atPath: f)
            XCTAssertEqual((attrs[.posixPermissions] as? NSNumber)?.intValue, mode, f)
        }
        let again = try runWeft(["cert", "create-ca", "--certs-dir", files.dir])
        XCTAssertEqual(again.status, 1)
        XCTAssertTrue(again.stderr.contains("--overwrite"), again.stderr)
        let noCA = try runWeft(["cert", "create-node", "--certs-dir", dir + "/empty"])
        XCTAssertNotEqual(noCA.status, 0)
        XCTAssertTrue(noCA.stderr.contains("create-ca"), noCA.stderr)
    }

    func testMutualTLSCarriesTheProtocolAndRefusesPlaintextAndStrangers() throws {
        let files = try certs("a")
        let (t, r, port) = try node(files)
        defer { t.close() }
        // A client with the cluster's certificates is served.
        let c = try client(files, port: port)
        defer { c.close() }
        c.send(Envelope(from: .client(42), to: .participant(0), .read(req: 1, key: [1], ts: 5)))
        XCTAssertTrue(waitFor { r.count == 1 }, "a read over TLS arrived")
        // Plain TCP: the first bytes are not a TLS ClientHello; closed, nothing delivered.
        let raw = try RawSocket(port: port)
        try raw.send(Frame.hello(nonce: Array(repeating: 7, count: 32)).encoded())
        let (closed, got) = raw.readUntilClosed(timeoutMillis: 3000)
        XCTAssertTrue(closed)
        XCTAssertFalse(String(decoding: got, as: UTF8.self).contains(clusterId))
        // A client whose certificate another CA signed: refused in the TLS handshake.
        let foreign = try certs("b")
        let s = try client(foreign, port: port)
        defer { s.close() }
        s.send(Envelope(from: .client(42), to: .participant(0), .read(req: 2, key: [1], ts: 5)))
        usleep(500_000)
        XCTAssertEqual(r.count, 1, "nothing from a stranger's certificate")
        // And a node with a foreign certificate is not believed by a client either.
        let (u, ur, uport) = try node(foreign)
        defer { u.close() }
        let d = try client(files, port: uport)
        defer { d.close() }
        d.send(Envelope(from: .client(42), to: .participant(0), .read(req: 3, key: [1], ts: 5)))
        usleep(500_000)
        XCTAssertEqual(ur.count, 0)
        // Health pings go over TLS too.
        let creds = Credentials(clusterId: clusterId, clientKey: ClusterSecret.clientKey(fromNodeKey: testNodeKey))
        XCTAssertNotNil(NetworkTransport.ping(Endpoint(host: "127.0.0.1", port: port), credentials: creds, tls: try TLSSetup(files: files, asNode: false)))
        XCTAssertNil(NetworkTransport.ping(Endpoint(host: "127.0.0.1", port: port), credentials: creds, timeoutMillis: 500), "no plaintext ping")
    }

    func testAServerWithTLSServesTheCLI() throws {
        let d = dir + "/data"
        let start = try runWeft(["server", "start", "--data-dir", d, "--tls", "--json"])
        XCTAssertEqual(start.status, 0, start.stderr)
        defer { _ = try? runWeft(["server", "stop", "--data-dir", d]) }
        XCTAssertTrue(start.stdout.contains("\"tls\":true"), start.stdout)
        XCTAssertEqual(try runWeft(["kv", "put", "k", "v", "--data-dir", d]).status, 0)
        XCTAssertEqual(try runWeft(["kv", "get", "k", "--data-dir", d]).stdout, "v\n")
        let status = try runWeft(["server", "status", "--data-dir", d, "--json"])
        XCTAssertTrue(status.stdout.contains("\"state\":\"serving\"") && status.stdout.contains("\"tls\":true"), status.stdout)
        // A client holding another CA's certificates is refused.
        _ = try certs("b")
        let foreign = try runWeft(["kv", "get", "k", "--data-dir", d, "--certs-dir", dir + "/b"])
        XCTAssertNotEqual(foreign.status, 0)
        XCTAssertFalse(foreign.stdout.contains("v"), foreign.stdout)
    }
}
