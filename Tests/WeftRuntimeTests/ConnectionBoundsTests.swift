import Foundation
import XCTest
import WeftCore
import WeftProtocol
@testable import WeftRuntime

/// Bounds on inbound node connections (issue "Security and integrity",
/// bounded resources): a stranger cannot make a node buffer a big frame,
/// hold a connection without saying HELLO, open connections without end,
/// or pile up partial frames; idle clients are closed.
final class ConnectionBoundsTests: XCTestCase {
    func listening() throws -> (NetworkTransport, Int) {
        let t = NetworkTransport(me: .coordinator, credentials: Credentials(clusterId: "bounds-test", nodeKey: testNodeKey), directory: [:])
        try t.listen(Endpoint(host: "127.0.0.1", port: 0))
        return (t, t.boundPort!)
    }

    func frameHeader(_ length: Int) -> [UInt8] {
        withUnsafeBytes(of: UInt32(length).littleEndian) { Array($0) }
    }

    /// Completes the handshake on `c` as client `id`: afterwards the
    /// connection is authenticated.
    func authenticate(_ c: RawSocket, _ id: UInt64) throws {
        try c.handshake(Credentials(clusterId: "bounds-test", nodeKey: testNodeKey), as: .client(id))
    }

    func testALargeFrameBeforeHelloIsRefusedAtItsHeader() throws {
        let (t, port) = try listening()
        defer { t.close() }
        let c = try RawSocket(port: port)
        try c.send(frameHeader(64 << 20) + [UInt8](repeating: 0, count: 8192))
        let (closed, got) = c.readUntilClosed(timeoutMillis: 3000)
        XCTAssertTrue(closed, "closed")
        XCTAssertTrue(String(decoding: got, as: UTF8.self).contains("Limits.preHelloFrameBytesMax"), "the error frame names the limit")
        XCTAssertEqual(t.inboundBudget.used, 0)
    }

    func testAConnectionWithoutHelloIsClosedAfterTheTimeout() throws {
        let (t, port) = try listening()
        defer { t.close() }
        t.inboundHelloMillis = 200
        let c = try RawSocket(port: port)
        let start = wallMillis()
        let (closed, _) = c.readUntilClosed(timeoutMillis: 5000)
        XCTAssertTrue(closed)
        XCTAssertGreaterThanOrEqual(wallMillis() - start, 150)
        // One that says HELLO stays.
        let ok = try RawSocket(port: port)
        try authenticate(ok, 7)
        usleep(500_000)
        XCTAssertTrue(ok.isOpen(), "a connection that said HELLO is kept")
    }

    func testConnectionsOverTheCapAreRefused() throws {
        let (t, port) = try listening()
        defer { t.close() }
        t.inboundConnectionsMax = 2
        let a = try RawSocket(port: port), b = try RawSocket(port: port)
        try authenticate(a, 1)
        try authenticate(b, 2)
        usleep(200_000)
        let c = try RawSocket(port: port)
        let (closed, got) = c.readUntilClosed(timeoutMillis: 3000)
        XCTAssertTrue(closed, "the third is refused")
        XCTAssertTrue(String(decoding: got, as: UTF8.self).contains("Limits.inboundConnectionsMax"))
        XCTAssertTrue(a.isOpen() && b.isOpen(), "the first two stay")
        // A slot freed is a slot again.
        a.close()
        usleep(200_000)
        let d = try RawSocket(port: port)
        try authenticate(d, 4)
        usleep(200_000)
        XCTAssertTrue(d.isOpen())
    }

    func testAnIdleClientIsClosed() throws {
        let (t, port) = try listening()
        defer { t.close() }
        t.clientIdleMillis = 300
        let c = try RawSocket(port: port)
        try authenticate(c, 9)
        let start = wallMillis()
        let (closed, _) = c.readUntilClosed(timeoutMillis: 5000)
        XCTAssertTrue(closed)
        XCTAssertGreaterThanOrEqual(wallMillis() - start, 250)
    }

    func testPartlyReceivedFramesShareTheNodesBudget() throws {
        let (t, port) = try listening()
        defer { t.close() }
        t.inboundBudget = ByteBudget(limit: 3 << 20)
        let a = try RawSocket(port: port), b = try RawSocket(port: port)
        try authenticate(a, 1)
        try a.send(frameHeader(2 << 20) + [UInt8](repeating: 1, count: 100_000))
        usleep(200_000)
        XCTAssertEqual(t.inboundBudget.used, 2 << 20, "the first partial frame holds its length")
        try authenticate(b, 2)
        try b.send(frameHeader(2 << 20) + [UInt8](repeating: 1, count: 100_000))
        let (closed, got) = b.readUntilClosed(timeoutMillis: 3000)
        XCTAssertTrue(closed, "the second would pass the budget")
        XCTAssertTrue(String(decoding: got, as: UTF8.self).contains("Limits.inboundBufferedBytesMax"))
        XCTAssertTrue(a.isOpen())
        a.close()
        usleep(300_000)
        XCTAssertEqual(t.inboundBudget.used, 0, "a closed connection gives its bytes back")
    }
}

/// A fixed node secret for tests.
let testNodeKey: Bytes = Array(0..<32)

/// A blocking TCP socket for forging frames.
final class RawSocket {
    var fd: Int32

    init(port: Int) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let r = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard r == 0 else { throw WeftError(.unavailable, "connect failed") }
    }

    deinit { close() }

    func close() {
        if fd >= 0 { Glibc.close(fd) }
        fd = -1
    }

    func send(_ bytes: [UInt8]) throws {
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else { throw WeftError(.unavailable, "send failed") }
            off += n
        }
    }

    /// One whole frame, or nil if the peer closed or `timeoutMillis` passed.
    func readFrame(timeoutMillis: Int = 3000) -> Frame? {
        let deadline = wallMillis() + UInt64(timeoutMillis)
        while true {
            if pending.count >= 4 {
                let n = Int(UInt32(pending[0]) | UInt32(pending[1]) << 8 | UInt32(pending[2]) << 16 | UInt32(pending[3]) << 24)
                if pending.count >= 4 + n {
                    let body = Array(pending[4..<(4 + n)])
                    pending.removeFirst(4 + n)
                    return body.withUnsafeBytes { try? Frame.decode(body: $0) }
                }
            }
            guard wallMillis() < deadline else { return nil }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, 50) <= 0 { continue }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { return nil }
            pending += chunk[..<n]
        }
    }
    var pending: [UInt8] = []

    /// The connector's side of the handshake, proving `credentials` as `me`.
    func handshake(_ credentials: Credentials, as me: NodeAddress) throws {
        var h = ConnectorHandshake(credentials: credentials, me: me)
        try send(h.hello.encoded())
        guard case .challenge(let nonce)? = readFrame(), let auth = h.answer(challenge: nonce) else { throw WeftError(.unavailable, "no CHALLENGE") }
        try send(auth.encoded())
        guard case let .welcome(sender, proof)? = readFrame() else { throw WeftError(.unavailable, "no WELCOME") }
        guard h.accepts(welcome: sender, proof: proof) else { throw WeftError(.unavailable, "WELCOME without a valid proof") }
    }

    /// Reads until the peer closes (true) or `timeoutMillis` pass (false).
    func readUntilClosed(timeoutMillis: Int) -> (Bool, [UInt8]) {
        var got: [UInt8] = []
        let deadline = wallMillis() + UInt64(timeoutMillis)
        var chunk = [UInt8](repeating: 0, count: 65536)
        while wallMillis() < deadline {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, 50) <= 0 { continue }
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { return (true, got) }
            got += chunk[..<n]
        }
        return (false, got)
    }

    /// True if the peer has not closed (pending bytes are drained).
    func isOpen() -> Bool {
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, 0) <= 0 { return true }
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { return false }
        }
    }
}
