import Foundation
import NIOCore
import XCTest
import WeftCore
@testable import WeftRuntime

/// The RESP parser's bounds, and the front end's semantics over a real TCP
/// socket against an embedded cluster. Real clients (redis-cli,
/// redis-benchmark, redis-py) are exercised by Tests/redis/.
final class RedisTests: XCTestCase {
    // MARK: Parser

    func parseAll(_ chunks: [String]) throws -> [[String]] {
        var p = RESPRequestParser()
        var buf = ByteBuffer()
        var out: [[String]] = []
        for c in chunks {
            buf.writeString(c)
            while let args = try p.next(&buf) { out.append(args.map { String(decoding: $0, as: UTF8.self) }) }
        }
        XCTAssertEqual(buf.readableBytes, 0, "everything consumed")
        return out
    }

    func testParsesArraysInlineAndPipelinesSplitAnywhere() throws {
        let wire = "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\na b\r\n\r\nPING\r\n  echo \"x y\\n\" 'q'\n*0\r\n*1\r\n$0\r\n\r\n"
        let expected = [["SET", "k", "a b\r\n"], ["PING"], ["echo", "x y\n", "'q'"], [""]]
        XCTAssertEqual(try parseAll([wire]), expected)
        // The same bytes one at a time: nothing is lost or re-read.
        XCTAssertEqual(try parseAll(wire.map { String($0) }), expected)
    }

    func assertProtocolError(_ wire: String, _ fragment: String, file: StaticString = #filePath, line: UInt = #line) {
        var p = RESPRequestParser()
        var buf = ByteBuffer(string: wire)
        do {
            while try p.next(&buf) != nil {}
            XCTFail("accepted \(wire.debugDescription)", file: file, line: line)
        } catch {
            XCTAssertTrue(error.message.contains(fragment), "\(error.message) should mention \(fragment)", file: file, line: line)
        }
    }

    func testRefusesOversizedAndMalformedRequestsBeforeBufferingThem() {
        assertProtocolError("*1\r\n$1099511627776\r\n", "invalid bulk length")   // 2^40
        assertProtocolError("*1\r\n$\(Limits.respBulkBytesMax + 1)\r\n", "Limits.respBulkBytesMax")
        assertProtocolError("*1048576\r\n", "Limits.respArgumentsMax")
        assertProtocolError("*1\r\n$3\r\nabcXY", "not followed by CRLF")
        assertProtocolError("*x\r\n", "invalid multibulk length")
        assertProtocolError("*1\r\n$y\r\n", "invalid bulk length")
        assertProtocolError("*1\r\n:5\r\n", "expected '$'")
        assertProtocolError("*99999999999999999999999\r\n", "invalid multibulk length")
        assertProtocolError(String(repeating: "a", count: Limits.respInlineBytesMax + 10), "Limits.respInlineBytesMax")
        // A bulk length announced but not yet sent is waited for, not an error.
        var p = RESPRequestParser()
        var buf = ByteBuffer(string: "*1\r\n$1000000\r\n")
        XCTAssertNil(try p.next(&buf))
    }

    func testRepliesInRESP2AndRESP3() {
        func enc(_ v: RESPValue, _ proto: Int) -> String {
            var b = ByteBuffer()
            v.write(to: &b, proto: proto)
            return String(decoding: b.readableBytesView, as: UTF8.self)
        }
        XCTAssertEqual(enc(.null, 2), "$-1\r\n")
        XCTAssertEqual(enc(.nullArray, 2), "*-1\r\n")
        XCTAssertEqual(enc(.null, 3), "_\r\n")
        XCTAssertEqual(enc(.map([(.bulk("a"), .integer(1))]), 2), "*2\r\n$1\r\na\r\n:1\r\n")
        XCTAssertEqual(enc(.map([(.bulk("a"), .integer(1))]), 3), "%1\r\n$1\r\na\r\n:1\r\n")
        XCTAssertEqual(enc(.error("ERR a\r\nb"), 2), "-ERR a  b\r\n")
    }

    func testGlobPatterns() {
        let cases: [(String, String, Bool)] = [("user:*", "user:1", true), ("user:*", "usr:1", false), ("h?llo", "hello", true),
                                               ("h[ae]llo", "hallo", true), ("h[^e]llo", "hello", false), ("h[a-c]llo", "hbllo", true),
                                               ("*:x", "a:b:x", true), ("a\\*", "a*", true), ("a\\*", "ab", false), ("*", "", true)]
        for (p, s, want) in cases { XCTAssertEqual(Glob.matches(b(p), b(s)), want, "\(p) ~ \(s)") }
        XCTAssertEqual(str(Glob.literalPrefix(b("user:\\*x*y"))), "user:*x")
    }

    // MARK: Over TCP

    var dir = ""
    override func setUp() { dir = tempDir("weft-redis") }
    override func tearDown() { removeDir(dir) }

    func withFrontEnd(password: String? = nil, _ body: (Int, EmbeddedCluster) throws -> Void) throws {
        let cluster = try EmbeddedCluster(dataDir: dir)
        defer { cluster.close() }
        let fe = RedisFrontEnd(client: cluster.client(), password: password)
        try fe.listen(Endpoint(host: "127.0.0.1", port: 0))
        defer { fe.close() }
        try body(fe.boundPort!, cluster)
    }

    func testCommandsAndTransactionsOverTCP() throws {
        try withFrontEnd { port, _ in
            let c = try RawRESP(port: port)
            XCTAssertEqual(try c.call("PING"), "+PONG")
            XCTAssertEqual(try c.call("SET", "a", "10"), "+OK")
            XCTAssertEqual(try c.call("SET", "a", "11", "NX"), "$-1")
            XCTAssertEqual(try c.call("SET", "b", "1", "XX"), "$-1")
            XCTAssertEqual(try c.call("INCRBY", "a", "5"), ":15")
            XCTAssertEqual(try c.call("DECR", "a"), ":14")
            XCTAssertEqual(try c.call("SET", "s", "x"), "+OK")
            XCTAssertEqual(try c.call("INCR", "s"), "-ERR value is not an integer or out of range")
            XCTAssertEqual(try c.call("SET", "m", "9223372036854775807"), "+OK")
            XCTAssertEqual(try c.call("INCR", "m"), "-ERR increment or decrement would overflow")
            XCTAssertEqual(try c.call("MSET", "k1", "v1", "k2", "v2", "k3", "v3"), "+OK")
            XCTAssertEqual(try c.call("MGET", "k1", "nope", "k3"), "*3 $2 v1 $-1 $2 v3")
            XCTAssertEqual(try c.call("EXISTS", "k1", "k1", "nope"), ":2")
            XCTAssertEqual(try c.call("DEL", "k1", "k2", "nope", "k1"), ":2")
            XCTAssertEqual(try c.call("SET", "e", "v", "EX", "10").prefix(45), "-ERR weft does not implement key expiry; SET ")
            XCTAssertTrue(try c.call("GET", String(repeating: "k", count: Limits.keyBytesMax + 1)).contains("Limits.keyBytesMax"))
            XCTAssertEqual(try c.call("FLY", "me"), "-ERR unknown command 'FLY', with args beginning with: 'me' ")
            XCTAssertEqual(try c.call("GET"), "-ERR wrong number of arguments for 'get' command")
            // MULTI/EXEC: queued, then all at once in one transaction.
            XCTAssertEqual(try c.call("MULTI"), "+OK")
            XCTAssertEqual(try c.call("INCR", "ctr"), "+QUEUED")
            XCTAssertEqual(try c.call("SET", "x", "1"), "+QUEUED")
            XCTAssertEqual(try c.call("GET", "x"), "+QUEUED")
            XCTAssertEqual(try c.call("EXEC"), "*3 :1 +OK $1 1")
            // A queueing error discards the whole block.
            XCTAssertEqual(try c.call("MULTI"), "+OK")
            XCTAssertEqual(try c.call("SET", "x", "2"), "+QUEUED")
            XCTAssertTrue(try c.call("NOSUCH").hasPrefix("-ERR unknown command"))
            XCTAssertEqual(try c.call("EXEC"), "-EXECABORT Transaction discarded because of previous errors.")
            XCTAssertEqual(try c.call("GET", "x"), "$1 1")
            XCTAssertEqual(try c.call("EXEC"), "-ERR EXEC without MULTI")
            // WATCH: another client's write in between makes EXEC answer the null array.
            let other = try RawRESP(port: port)
            XCTAssertEqual(try c.call("WATCH", "x"), "+OK")
            XCTAssertEqual(try other.call("SET", "x", "changed"), "+OK")
            XCTAssertEqual(try c.call("MULTI"), "+OK")
            XCTAssertEqual(try c.call("SET", "x", "mine"), "+QUEUED")
            XCTAssertEqual(try c.call("EXEC"), "*-1")
            XCTAssertEqual(try c.call("GET", "x"), "$7 changed")
            // An unchanged watched key lets EXEC through.
            XCTAssertEqual(try c.call("WATCH", "x"), "+OK")
            XCTAssertEqual(try c.call("MULTI"), "+OK")
            XCTAssertEqual(try c.call("SET", "x", "mine"), "+QUEUED")
            XCTAssertEqual(try c.call("EXEC"), "*1 +OK")
            // RESP3 after HELLO 3: nulls are `_`.
            XCTAssertTrue(try c.call("HELLO", "3").hasPrefix("%7"))
            XCTAssertEqual(try c.call("GET", "nope"), "_")
            // SCAN walks every key with a prefix, in pages.
            for i in 0..<25 { _ = try c.call("SET", "scan:\(i)", "v") }
            var cursor = "0", seen: [String] = []
            repeat {
                let r = try c.callParts("SCAN", cursor, "MATCH", "scan:*", "COUNT", "7")
                cursor = r[2]
                seen += r.dropFirst(4).filter { !$0.hasPrefix("$") }
            } while cursor != "0"
            XCTAssertEqual(Set(seen), Set((0..<25).map { "scan:\($0)" }))
            XCTAssertEqual(seen.count, 25)
        }
    }

    func testPipelinedRequestsAreAnsweredInOrder() throws {
        try withFrontEnd { port, _ in
            let c = try RawRESP(port: port)
            var wire = ""
            for i in 0..<200 { wire += RawRESP.encode(["SET", "p\(i)", "\(i)"]) + RawRESP.encode(["GET", "p\(i)"]) + "PING\r\n" }
            try c.send(wire)
            for i in 0..<200 {
                XCTAssertEqual(try c.reply(), "+OK")
                XCTAssertEqual(try c.reply(), "$\(String(i).count) \(i)")
                XCTAssertEqual(try c.reply(), "+PONG")
            }
        }
    }

    /// Runs of pipelined SETs and GETs are sent in batches: answers stay in
    /// order, a repeated key keeps its last value, a bad key fails alone.
    func testPipelinedBatchesKeepOrderAndLastWriteWins() throws {
        try withFrontEnd { port, _ in
            let c = try RawRESP(port: port)
            var wire = ""
            for i in 0..<300 { wire += RawRESP.encode(["SET", "b\(i % 50)", "\(i)"]) }
            wire += RawRESP.encode(["SET", String(repeating: "x", count: Limits.keyBytesMax + 1), "v"])
            for i in 0..<50 { wire += RawRESP.encode(["GET", "b\(i)"]) }
            wire += RawRESP.encode(["GET", "never-set"])
            try c.send(wire)
            for _ in 0..<300 { XCTAssertEqual(try c.reply(), "+OK") }
            XCTAssertTrue(try c.reply().contains("Limits.keyBytesMax"))
            for i in 0..<50 {
                let last = 250 + i   // the last of i, i+50, ..., i+250
                XCTAssertEqual(try c.reply(), "$\(String(last).count) \(last)", "b\(i) holds its last SET")
            }
            XCTAssertEqual(try c.reply(), "$-1")
        }
    }

    /// A run of pipelined INCRs joins the keys' combiners at once; a key
    /// incremented twice in the run gets its values in request order.
    func testPipelinedIncrementsAnswerInOrder() throws {
        try withFrontEnd { port, _ in
            let c = try RawRESP(port: port)
            XCTAssertEqual(try c.call("SET", "word", "x"), "+OK")
            var wire = ""
            for i in 0..<60 { wire += RawRESP.encode(["INCRBY", "n\(i % 3)", "\(i % 3 + 1)"]) }
            wire += RawRESP.encode(["INCR", "word"]) + RawRESP.encode(["DECR", "n0"])
            try c.send(wire)
            var seen = [0, 0, 0]
            for i in 0..<60 {
                seen[i % 3] += i % 3 + 1
                XCTAssertEqual(try c.reply(), ":\(seen[i % 3])", "request \(i)")
            }
            XCTAssertEqual(try c.reply(), "-ERR value is not an integer or out of range")
            XCTAssertEqual(try c.reply(), ":\(seen[0] - 1)")
        }
    }

    func testBadInputClosesOnlyThatConnection() throws {
        try withFrontEnd { port, _ in
            let good = try RawRESP(port: port)
            XCTAssertEqual(try good.call("SET", "keep", "1"), "+OK")
            for bad in ["*1\r\n$1099511627776\r\n", "*1048576\r\n", "*1\r\n$3\r\nabcXY", "*x\r\n"] {
                let c = try RawRESP(port: port)
                try c.send(bad)
                XCTAssertTrue(try c.reply().hasPrefix("-ERR Protocol error"), bad.debugDescription)
                XCTAssertTrue(c.closedByPeer(), "closed after \(bad.debugDescription)")
            }
            XCTAssertEqual(try good.call("GET", "keep"), "$1 1")
            XCTAssertEqual(try RawRESP(port: port).call("PING"), "+PONG")
        }
    }

    func testAuthIsRequiredWhenAPasswordIsSet() throws {
        try withFrontEnd(password: "s3cret") { port, _ in
            let c = try RawRESP(port: port)
            XCTAssertEqual(try c.call("GET", "a"), "-NOAUTH Authentication required.")
            XCTAssertEqual(try c.call("AUTH", "wrong"), "-WRONGPASS invalid username-password pair or user is disabled.")
            XCTAssertEqual(try c.call("AUTH", "s3cret"), "+OK")
            XCTAssertEqual(try c.call("GET", "a"), "$-1")
            let h = try RawRESP(port: port)
            XCTAssertTrue(try h.call("HELLO", "3").hasPrefix("-NOAUTH"))
            XCTAssertTrue(try h.call("HELLO", "3", "AUTH", "default", "s3cret").hasPrefix("%7"))
        }
    }

    func testConcurrentIncrementsOfAHotKeyAreAtomic() throws {
        try withFrontEnd { port, _ in
            let clients = 8, each = 40
            let group = DispatchGroup()
            let errors = ErrorBox(), seen = ErrorBox()
            for _ in 0..<clients {
                group.enter()
                Thread {
                    defer { group.leave() }
                    do {
                        let c = try RawRESP(port: port)
                        for _ in 0..<each {
                            let r = try c.call("INCR", "hot")
                            if !r.hasPrefix(":") { errors.add(r) } else { seen.add(r) }
                        }
                    } catch { errors.add("\(error)") }
                }.start()
            }
            group.wait()
            XCTAssertEqual(errors.all, [])
            XCTAssertEqual(try RawRESP(port: port).call("GET", "hot"), "$3 \(clients * each)")
            // Combined into batches, each INCR still got its own value: 1...N once each.
            XCTAssertEqual(seen.all.sorted(), (1...(clients * each)).map { ":\($0)" }.sorted())
        }
    }
}

final class ErrorBox: @unchecked Sendable {
    let lock = NSLock()
    var all: [String] = []
    func add(_ s: String) { lock.withLock { all.append(s) } }
}

/// A blocking RESP client over a plain socket: replies flattened to one
/// line ("*2 $1 a :1") for easy comparison.
final class RawRESP {
    let fd: Int32
    var buffer: [UInt8] = []

    init(port: Int) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let r = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard r == 0 else { throw WeftError(.unavailable, "connect failed") }
        var tv = timeval(tv_sec: 20, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { close(fd) }

    static func encode(_ args: [String]) -> String {
        "*\(args.count)\r\n" + args.map { "$\($0.utf8.count)\r\n\($0)\r\n" }.joined()
    }

    func send(_ s: String) throws {
        let bytes = Array(s.utf8)
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else { throw WeftError(.unavailable, "send failed") }
            off += n
        }
    }

    func fill() throws {
        var chunk = [UInt8](repeating: 0, count: 65536)
        let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        guard n > 0 else { throw WeftError(.unavailable, "connection closed") }
        buffer += chunk[..<n]
    }

    func line() throws -> String {
        while true {
            if let i = buffer.firstIndex(of: 10), i > 0, buffer[i - 1] == 13 {
                let s = String(decoding: buffer[..<(i - 1)], as: UTF8.self)
                buffer.removeFirst(i + 1)
                return s
            }
            try fill()
        }
    }

    func parts() throws -> [String] {
        let l = try line()
        switch l.first {
        case "$":
            let n = Int(l.dropFirst())!
            if n < 0 { return [l] }
            while buffer.count < n + 2 { try fill() }
            let s = String(decoding: buffer[..<n], as: UTF8.self)
            buffer.removeFirst(n + 2)
            return [l, s]
        case "*", "%":
            let n = Int(l.dropFirst())!
            var out = [l]
            for _ in 0..<max(0, l.first == "%" ? 2 * n : n) { out += try parts() }
            return out
        default:
            return [l]
        }
    }

    func reply() throws -> String { try parts().joined(separator: " ") }
    func call(_ args: String...) throws -> String {
        try send(Self.encode(args))
        return try reply()
    }
    func callParts(_ args: String...) throws -> [String] {
        try send(Self.encode(args))
        return try parts()
    }

    /// True if the peer closed the connection (after any pending bytes).
    func closedByPeer() -> Bool {
        var c: UInt8 = 0
        return recv(fd, &c, 1, 0) == 0
    }
}
