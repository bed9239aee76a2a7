import WeftCore

/// One unit on a TCP connection: `u32 LE length` of the body, then the body:
/// `u8 protocol version`, `u8 kind`, and the kind's payload. Every frame
/// carries the version, so a peer speaking another version is detected on
/// its first frame and told so.
public enum Frame: Sendable, Equatable {
    /// The handshake (see `Handshake` in WeftRuntime): the connector's
    /// first frame, a fresh random nonce.
    case hello(nonce: Bytes)
    /// The acceptor's answer to HELLO: its own fresh nonce, nothing more.
    case challenge(nonce: Bytes)
    /// The connector says who it is and proves the key of that role.
    case auth(sender: NodeAddress, proof: Bytes)
    /// The acceptor, once AUTH is checked: who it is, and its own proof.
    case welcome(sender: NodeAddress, proof: Bytes)
    case envelope(Envelope)
    /// The sender is closing the connection because of this problem.
    case error(String)
    case ping(req: UInt64)
    /// Health: role, state (`serving`, `recovering`), pid, in-doubt count.
    case pong(req: UInt64, info: String)
    /// A client asks a `weft server` to run `method` (e.g. `job.run`) with
    /// a JSON `body`; answered by `reply` with the same `req`.
    case call(req: UInt64, method: String, body: Bytes)
    /// `ok`: `body` is the method's JSON answer; else a JSON error
    /// (`{"error": code, "message": text}`).
    case reply(req: UInt64, ok: Bool, body: Bytes)

    public static let headerBytes = 4
    /// Largest `call` body (a `job.run` request is a few hundred bytes).
    public static let callBodyBytesMax = 1 << 20

    /// The whole frame, length prefix included.
    public func encoded() -> Bytes {
        var w = ByteWriter(capacity: 64)
        w.u32(0)
        w.u8(WireCodec.version)
        switch self {
        case .hello(let nonce):
            w.u8(1)
            w.blob(nonce)
        case .challenge(let nonce):
            w.u8(8)
            w.blob(nonce)
        case let .auth(sender, proof):
            w.u8(9)
            WireCodec.address(sender, &w)
            w.blob(proof)
        case let .welcome(sender, proof):
            w.u8(10)
            WireCodec.address(sender, &w)
            w.blob(proof)
        case .envelope(let env):
            w.u8(2)
            WireCodec.encode(env, into: &w)
        case .error(let text):
            w.u8(3)
            w.string(text)
        case .ping(let req):
            w.u8(4)
            w.u64(req)
        case let .pong(req, info):
            w.u8(5)
            w.u64(req)
            w.string(info)
        case let .call(req, method, body):
            w.u8(6)
            w.u64(req)
            w.string(method)
            w.blob(body)
        case let .reply(req, ok, body):
            w.u8(7)
            w.u64(req)
            w.bool(ok)
            w.blob(body)
        }
        var bytes = w.bytes
        let n = UInt32(bytes.count - Self.headerBytes).littleEndian
        withUnsafeBytes(of: n) { for i in 0..<4 { bytes[i] = $0[i] } }
        return bytes
    }

    public enum DecodeFailure: Error, Equatable, CustomStringConvertible {
        case version(UInt8)
        case malformed(String)
        public var description: String {
            switch self {
            case .version(let v): return "protocol version \(v) is not supported (this node speaks version \(WireCodec.version))"
            case .malformed(let why): return "malformed frame: \(why)"
            }
        }
    }

    /// Decodes a frame body (without the length prefix).
    public static func decode(body: UnsafeRawBufferPointer) throws(DecodeFailure) -> Frame {
        var r = ByteReader(body)
        do {
            let v = try r.u8()
            if v != WireCodec.version { throw DecodeFailure.version(v) }
            let frame: Frame
            switch try r.u8() {
            case 1: frame = .hello(nonce: try r.blob(max: 64))
            case 8: frame = .challenge(nonce: try r.blob(max: 64))
            case 9: frame = .auth(sender: try WireCodec.address(&r), proof: try r.blob(max: 64))
            case 10: frame = .welcome(sender: try WireCodec.address(&r), proof: try r.blob(max: 64))
            case 2: frame = .envelope(try WireCodec.decodeEnvelope(&r))
            case 3: frame = .error(try r.string(max: 1 << 16))
            case 4: frame = .ping(req: try r.u64())
            case 5: frame = .pong(req: try r.u64(), info: try r.string(max: 1 << 16))
            case 6: frame = .call(req: try r.u64(), method: try r.string(max: 256), body: try r.blob(max: callBodyBytesMax))
            case 7: frame = .reply(req: try r.u64(), ok: try r.bool(), body: try r.blob(max: Limits.txnBytesMax))
            case let k: throw DecodeError("unknown frame kind \(k)")
            }
            try r.expectEnd()
            return frame
        } catch let e as DecodeFailure {
            throw e
        } catch let e as DecodeError {
            throw .malformed(e.reason)
        } catch {
            throw .malformed("\(error)")
        }
    }
}
