import NIOCore
import WeftCore

/// A reply in the Redis serialization protocol. One value is written as
/// RESP2 or RESP3 depending on what the connection negotiated with HELLO.
public indirect enum RESPValue: Sendable, Equatable {
    case simple(String)
    case error(String)
    case integer(Int64)
    case bulk(Bytes)
    /// The null bulk string (RESP2 `$-1`, RESP3 `_`).
    case null
    /// The null array (RESP2 `*-1`, RESP3 `_`): EXEC after a WATCHed key changed.
    case nullArray
    case array([RESPValue])
    /// A map in RESP3 (`%`), a flat array of pairs in RESP2.
    case map([(RESPValue, RESPValue)])

    public static let ok = RESPValue.simple("OK")

    public static func bulk(_ s: String) -> RESPValue { .bulk(Bytes(s.utf8)) }

    public static func == (a: RESPValue, b: RESPValue) -> Bool {
        switch (a, b) {
        case let (.simple(x), .simple(y)), let (.error(x), .error(y)): return x == y
        case let (.integer(x), .integer(y)): return x == y
        case let (.bulk(x), .bulk(y)): return x == y
        case (.null, .null), (.nullArray, .nullArray): return true
        case let (.array(x), .array(y)): return x == y
        case let (.map(x), .map(y)): return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: return false
        }
    }

    /// Appends this value to `out` in protocol version `proto` (2 or 3).
    public func write(to out: inout ByteBuffer, proto: Int) {
        switch self {
        case .simple(let s):
            out.writeInteger(UInt8(ascii: "+"))
            out.writeString(Self.oneLine(s))
            out.writeStaticString("\r\n")
        case .error(let s):
            out.writeInteger(UInt8(ascii: "-"))
            out.writeString(Self.oneLine(s))
            out.writeStaticString("\r\n")
        case .integer(let n):
            out.writeInteger(UInt8(ascii: ":"))
            out.writeString(String(n))
            out.writeStaticString("\r\n")
        case .bulk(let b):
            out.writeInteger(UInt8(ascii: "$"))
            out.writeString(String(b.count))
            out.writeStaticString("\r\n")
            out.writeBytes(b)
            out.writeStaticString("\r\n")
        case .null:
            out.writeStaticString(proto >= 3 ? "_\r\n" : "$-1\r\n")
        case .nullArray:
            out.writeStaticString(proto >= 3 ? "_\r\n" : "*-1\r\n")
        case .array(let items):
            out.writeInteger(UInt8(ascii: "*"))
            out.writeString(String(items.count))
            out.writeStaticString("\r\n")
            for i in items { i.write(to: &out, proto: proto) }
        case .map(let pairs):
            out.writeInteger(UInt8(ascii: proto >= 3 ? "%" : "*"))
            out.writeString(String(proto >= 3 ? pairs.count : 2 * pairs.count))
            out.writeStaticString("\r\n")
            for (k, v) in pairs {
                k.write(to: &out, proto: proto)
                v.write(to: &out, proto: proto)
            }
        }
    }

    /// Simple strings and errors cannot hold CR or LF.
    static func oneLine(_ s: String) -> String {
        // Bytes, not Characters: "\r\n" is one Character in Swift.
        s.utf8.contains(where: { $0 == 13 || $0 == 10 }) ? String(decoding: s.utf8.map { $0 == 13 || $0 == 10 ? 32 : $0 }, as: UTF8.self) : s
    }
}

/// Why a RESP request could not be read. The connection answers
/// `-ERR Protocol error: ...` and is closed.
public struct RESPProtocolError: Error, Equatable, Sendable {
    public let message: String
}

/// Splits a byte stream into requests, each an array of arguments: the
/// `*N` array of `$len` bulk strings every client sends, or an inline
/// command (a line of words, as typed into telnet). Arguments are consumed
/// as they complete, so a large request is never re-parsed from its start;
/// every length is checked against its `Limits.resp…` bound before any
/// byte of it is buffered as an argument.
public struct RESPRequestParser: Sendable {
    var remaining = 0
    var args: [Bytes] = []
    var bytes = 0

    public init() {}

    /// The next complete request in `buffer`, or nil if more bytes are needed.
    public mutating func next(_ buffer: inout ByteBuffer) throws(RESPProtocolError) -> [Bytes]? {
        while true {
            if remaining == 0 {
                guard let first = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return nil }
                if first != UInt8(ascii: "*") {
                    guard let line = try inlineLine(&buffer) else { return nil }
                    let words = Self.splitInline(line)
                    if words.isEmpty { continue }
                    if words.count > Limits.respArgumentsMax { throw RESPProtocolError(message: "too many arguments (Limits.respArgumentsMax is \(Limits.respArgumentsMax))") }
                    return words
                }
                guard let (n, used) = try header(buffer, what: "multibulk length") else { return nil }
                buffer.moveReaderIndex(forwardBy: used)
                if n <= 0 { continue }  // `*0` and `*-1`: nothing to run
                if n > Limits.respArgumentsMax {
                    throw RESPProtocolError(message: "invalid multibulk length \(n) (Limits.respArgumentsMax is \(Limits.respArgumentsMax))")
                }
                remaining = n
                args = []
                args.reserveCapacity(min(n, 64))
                bytes = 0
            }
            while remaining > 0 {
                guard let first = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return nil }
                if first != UInt8(ascii: "$") {
                    throw RESPProtocolError(message: "expected '$', got '\(Self.printable(first))'")
                }
                guard let (len, used) = try header(buffer, what: "bulk length") else { return nil }
                if len < 0 || len > Limits.respBulkBytesMax {
                    throw RESPProtocolError(message: "invalid bulk length \(len) (Limits.respBulkBytesMax is \(Limits.respBulkBytesMax))")
                }
                if bytes + len > Limits.respRequestBytesMax {
                    throw RESPProtocolError(message: "request larger than Limits.respRequestBytesMax (\(Limits.respRequestBytesMax) bytes)")
                }
                guard buffer.readableBytes >= used + len + 2 else { return nil }
                let at = buffer.readerIndex + used + len
                guard buffer.getInteger(at: at, as: UInt8.self) == 13, buffer.getInteger(at: at + 1, as: UInt8.self) == 10 else {
                    throw RESPProtocolError(message: "bulk string of \(len) bytes is not followed by CRLF")
                }
                buffer.moveReaderIndex(forwardBy: used)
                args.append(buffer.readBytes(length: len)!)
                buffer.moveReaderIndex(forwardBy: 2)
                bytes += len
                remaining -= 1
            }
            let done = args
            args = []
            return done
        }
    }

    /// `<prefix><integer>\r\n` at the reader index: the integer and the
    /// bytes it spans, nil if incomplete.
    func header(_ buffer: ByteBuffer, what: String) throws(RESPProtocolError) -> (Int, Int)? {
        let view = buffer.readableBytesView
        let limit = min(view.count, 24)
        var i = view.startIndex + 1
        var value = 0
        var negative = false
        var digits = 0
        while i < view.startIndex + limit {
            let c = view[i]
            if c == 13 {
                guard i + 1 < view.endIndex else { return nil }
                guard view[i + 1] == 10, digits > 0 else { throw RESPProtocolError(message: "invalid \(what)") }
                return (negative ? -value : value, i + 2 - view.startIndex)
            }
            if c == UInt8(ascii: "-") && digits == 0 && !negative {
                negative = true
            } else if c >= 48 && c <= 57 {
                // 18 digits at most: the value never overflows.
                if digits == 18 { throw RESPProtocolError(message: "invalid \(what)") }
                value = value * 10 + Int(c - 48)
                digits += 1
            } else {
                throw RESPProtocolError(message: "invalid \(what)")
            }
            i += 1
        }
        if view.count >= 24 { throw RESPProtocolError(message: "invalid \(what)") }
        return nil
    }

    /// One inline line without its line end, consumed; nil if incomplete.
    func inlineLine(_ buffer: inout ByteBuffer) throws(RESPProtocolError) -> Bytes? {
        let view = buffer.readableBytesView
        guard let nl = view.firstIndex(of: 10) else {
            if view.count > Limits.respInlineBytesMax {
                throw RESPProtocolError(message: "too big inline request (Limits.respInlineBytesMax is \(Limits.respInlineBytesMax) bytes)")
            }
            return nil
        }
        let n = nl - view.startIndex
        if n > Limits.respInlineBytesMax {
            throw RESPProtocolError(message: "too big inline request (Limits.respInlineBytesMax is \(Limits.respInlineBytesMax) bytes)")
        }
        var line = buffer.readBytes(length: n)!
        buffer.moveReaderIndex(forwardBy: 1)
        if line.last == 13 { line.removeLast() }
        return line
    }

    /// Words separated by spaces or tabs; "double quoted" words may hold
    /// spaces and the escapes \n \r \t \" \\ \xHH, as in redis-cli.
    static func splitInline(_ line: Bytes) -> [Bytes] {
        var words: [Bytes] = []
        var i = 0
        while i < line.count {
            while i < line.count && (line[i] == 32 || line[i] == 9) { i += 1 }
            if i >= line.count { break }
            var w: Bytes = []
            if line[i] == UInt8(ascii: "\"") {
                i += 1
                while i < line.count && line[i] != UInt8(ascii: "\"") {
                    if line[i] == UInt8(ascii: "\\") && i + 1 < line.count {
                        let e = line[i + 1]
                        switch e {
                        case UInt8(ascii: "n"): w.append(10); i += 2
                        case UInt8(ascii: "r"): w.append(13); i += 2
                        case UInt8(ascii: "t"): w.append(9); i += 2
                        case UInt8(ascii: "x") where i + 3 < line.count:
                            if let v = UInt8(String(decoding: line[(i + 2)...(i + 3)], as: UTF8.self), radix: 16) {
                                w.append(v); i += 4
                            } else {
                                w.append(e); i += 2
                            }
                        default: w.append(e); i += 2
                        }
                    } else {
                        w.append(line[i]); i += 1
                    }
                }
                i += 1
            } else {
                while i < line.count && line[i] != 32 && line[i] != 9 { w.append(line[i]); i += 1 }
            }
            words.append(w)
        }
        return words
    }

    static func printable(_ b: UInt8) -> String { b >= 32 && b < 127 ? String(UnicodeScalar(b)) : "\\x" + String(b, radix: 16) }
}
