import CCrypto
import Foundation
import WeftCore
import WeftProtocol

/// HMAC-SHA256, random bytes and constant-time comparison, from OpenSSL's
/// libcrypto (Debian's libssl-dev).
public enum Crypto {
    public static func hmacSHA256(key: Bytes, _ parts: [Bytes]) -> Bytes {
        var data: Bytes = []
        for p in parts {
            // Every part is length-prefixed, so no two inputs concatenate alike.
            withUnsafeBytes(of: UInt32(p.count).littleEndian) { data.append(contentsOf: $0) }
            data += p
        }
        var out = Bytes(repeating: 0, count: Int(EVP_MAX_MD_SIZE))
        var n: UInt32 = 0
        let ok = key.withUnsafeBytes { k in
            data.withUnsafeBytes { d in
                out.withUnsafeMutableBytes { o in
                    HMAC(EVP_sha256(), k.baseAddress, Int32(k.count), d.baseAddress?.assumingMemoryBound(to: UInt8.self), d.count,
                         o.baseAddress!.assumingMemoryBound(to: UInt8.self), &n)
                }
            }
        }
        precondition(ok != nil && n == 32, "HMAC-SHA256 failed in libcrypto")
        return Array(out.prefix(32))
    }

    public static func randomBytes(_ n: Int) -> Bytes {
        var out = Bytes(repeating: 0, count: n)
        let ok = out.withUnsafeMutableBytes { RAND_bytes($0.baseAddress!.assumingMemoryBound(to: UInt8.self), Int32(n)) }
        precondition(ok == 1, "RAND_bytes failed in libcrypto")
        return out
    }

    /// Equal contents, in time that depends only on the length.
    public static func equal(_ a: Bytes, _ b: Bytes) -> Bool {
        guard a.count == b.count else { return false }
        if a.isEmpty { return true }
        return a.withUnsafeBytes { x in b.withUnsafeBytes { y in CRYPTO_memcmp(x.baseAddress, y.baseAddress, a.count) == 0 } }
    }
}

/// What a connection proves, and with which key. A cluster (and a `weft
/// server`) has one random 32-byte *node secret*; nodes prove it to each
/// other. Clients hold the *client secret*, derived from it
/// (HMAC(node secret, "weft client secret v1")), so a client can be given
/// its file without the power to act as the coordinator or a participant.
public struct Credentials: Sendable {
    public let clusterId: String
    /// The node secret: present in node processes and `weft server`, nil in clients.
    let nodeKey: Bytes?
    let clientKey: Bytes

    public init(clusterId: String, nodeKey: Bytes) {
        self.clusterId = clusterId
        self.nodeKey = nodeKey
        self.clientKey = ClusterSecret.clientKey(fromNodeKey: nodeKey)
    }

    public init(clusterId: String, clientKey: Bytes) {
        self.clusterId = clusterId
        self.nodeKey = nil
        self.clientKey = clientKey
    }

    /// The key a connection claiming to be `who` proves: a client's proves
    /// the client secret, a node's the node secret (nil: this process
    /// cannot check or make it).
    func key(for who: NodeAddress) -> Bytes? {
        if case .client = who { return clientKey }
        return nodeKey
    }

    /// The password a Redis client sends with AUTH unless another is set:
    /// the client secret in hex, as in its file.
    public var redisPassword: String { ClusterSecret.hex(clientKey) }
}

/// The handshake that opens every connection, before any other frame:
///
/// ```
/// connector                                   acceptor
///   HELLO(nonceC)              ------------>
///                              <------------  CHALLENGE(nonceA)
///   AUTH(me, proofC)           ------------>  checks proofC with the key of `me`'s role
///                              <------------  WELCOME(it, proofA)
///   checks proofA, and that `it` is the node it dialled
/// ```
///
/// proofC = HMAC(key, "weft-auth-connector-v1", clusterId, nonceA, nonceC, me)
/// proofA = HMAC(key, "weft-auth-acceptor-v1", clusterId, nonceC, nonceA, it)
///
/// Both nonces are fresh random 32 bytes, so a recorded proof is useless
/// on another connection, and the labels differ, so a node cannot be used
/// to compute a connector's proof. Until AUTH is checked the acceptor
/// answers nothing but a CHALLENGE or "authentication failed": no cluster
/// id, role, pid or node id.
public enum Handshake {
    public static let nonceBytes = 32

    public static func connectorProof(key: Bytes, clusterId: String, nonceA: Bytes, nonceC: Bytes, me: NodeAddress) -> Bytes {
        Crypto.hmacSHA256(key: key, [Array("weft-auth-connector-v1".utf8), Array(clusterId.utf8), nonceA, nonceC, addressBytes(me)])
    }

    public static func acceptorProof(key: Bytes, clusterId: String, nonceA: Bytes, nonceC: Bytes, it: NodeAddress) -> Bytes {
        Crypto.hmacSHA256(key: key, [Array("weft-auth-acceptor-v1".utf8), Array(clusterId.utf8), nonceC, nonceA, addressBytes(it)])
    }

    static func addressBytes(_ a: NodeAddress) -> Bytes {
        var w = ByteWriter(capacity: 16)
        WireCodec.address(a, &w)
        return w.bytes
    }

    /// The words every refusal before authentication uses: nothing about
    /// this node or its cluster.
    public static let refusal = "authentication failed"
}

/// The secret files: one line of 64 hex digits, mode 0600.
/// A cluster directory and a `weft server` data directory hold
/// `secret` (the node secret) and `client.secret` (the client secret).
public enum ClusterSecret {
    public static let nodeFileName = "secret"
    public static let clientFileName = "client.secret"
    public static let keyBytes = 32

    public static func clientKey(fromNodeKey k: Bytes) -> Bytes {
        Crypto.hmacSHA256(key: k, [Array("weft client secret v1".utf8)])
    }

    public static func hex(_ b: Bytes) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var s = Bytes()
        s.reserveCapacity(b.count * 2)
        for x in b { s.append(digits[Int(x >> 4)]); s.append(digits[Int(x & 15)]) }
        return String(decoding: s, as: UTF8.self)
    }

    static func unhex(_ s: Substring) -> Bytes? {
        let u = Array(s.utf8)
        guard u.count == keyBytes * 2 else { return nil }
        func v(_ c: UInt8) -> UInt8? {
            switch c {
            case 48...57: return c - 48
            case 97...102: return c - 87
            case 65...70: return c - 55
            default: return nil
            }
        }
        var out = Bytes()
        for i in stride(from: 0, to: u.count, by: 2) {
            guard let hi = v(u[i]), let lo = v(u[i + 1]) else { return nil }
            out.append(hi << 4 | lo)
        }
        return out
    }

    /// Reads a secret file. Refuses one that others may read (like ssh's
    /// private keys), or that is not one line of 64 hex digits.
    public static func read(_ path: String) throws(WeftError) -> Bytes {
        var st = stat()
        guard stat(path, &st) == 0 else {
            throw WeftError(.notFound, "cannot read the secret file \(path): \(String(cString: strerror(errno)))")
        }
        if st.st_mode & 0o077 != 0 {
            throw WeftError(.invalidArgument, "the secret file \(path) has mode \(String(st.st_mode & 0o777, radix: 8)); it must be readable by its owner only (chmod 600 \(path))")
        }
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw WeftError(.notFound, "cannot read the secret file \(path)")
        }
        guard let key = unhex(text.trimmingCharacters(in: .whitespacesAndNewlines)[...]) else {
            throw WeftError(.invalidArgument, "the secret file \(path) must hold one line of \(keyBytes * 2) hex digits")
        }
        return key
    }

    /// Writes `key` to `path` with mode 0600 (created that way, never
    /// readable by others for a moment), forced to disk.
    public static func write(_ key: Bytes, to path: String) throws(WeftError) {
        let tmp = path + ".tmp.\(getpid())"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw WeftError(.readOnly, "cannot write \(tmp): \(String(cString: strerror(errno)))") }
        let line = Array((hex(key) + "\n").utf8)
        let n = line.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        let synced = fsync(fd) == 0
        close(fd)
        guard n == line.count, synced, rename(tmp, path) == 0 else {
            unlink(tmp)
            throw WeftError(.readOnly, "cannot write \(path): \(String(cString: strerror(errno)))")
        }
    }

    /// The node secret of `dir` (a cluster directory or a server's data
    /// directory), created with its client secret if `create` and missing.
    public static func nodeKey(dir: String, create: Bool) throws(WeftError) -> Bytes {
        let path = dir + "/" + nodeFileName
        if !FileManager.default.fileExists(atPath: path) {
            guard create else {
                throw WeftError(.notFound, "no cluster secret at \(path); `weft cluster start` creates one (or pass --secret-file)")
            }
            let key = Crypto.randomBytes(keyBytes)
            try write(key, to: path)
            try write(clientKey(fromNodeKey: key), to: dir + "/" + clientFileName)
            return key
        }
        let key = try read(path)
        if !FileManager.default.fileExists(atPath: dir + "/" + clientFileName) {
            try write(clientKey(fromNodeKey: key), to: dir + "/" + clientFileName)
        }
        return key
    }

    /// A client's key: `--secret-file` (a client secret) if given, else
    /// `dir/client.secret`, else derived from `dir/secret`.
    public static func clientKey(dir: String, secretFile: String?) throws(WeftError) -> Bytes {
        if let secretFile { return try read(secretFile) }
        let path = dir + "/" + clientFileName
        if FileManager.default.fileExists(atPath: path) { return try read(path) }
        let node = dir + "/" + nodeFileName
        if FileManager.default.fileExists(atPath: node) { return clientKey(fromNodeKey: try read(node)) }
        throw WeftError(.notFound, "no client secret at \(path); pass --secret-file with the cluster's client.secret")
    }
}

/// The connector's side of the handshake (`Handshake`): HELLO, then AUTH
/// in answer to CHALLENGE, then the acceptor's WELCOME checked.
public struct ConnectorHandshake: Sendable {
    let credentials: Credentials
    let me: NodeAddress
    let nonceC = Crypto.randomBytes(Handshake.nonceBytes)
    var nonceA: Bytes?

    public init(credentials: Credentials, me: NodeAddress) {
        self.credentials = credentials
        self.me = me
    }

    public var hello: Frame { .hello(nonce: nonceC) }

    /// AUTH, or nil if the challenge is malformed or came twice, or this
    /// process holds no key for its own role.
    public mutating func answer(challenge nonce: Bytes) -> Frame? {
        guard nonceA == nil, nonce.count == Handshake.nonceBytes, let key = credentials.key(for: me) else { return nil }
        nonceA = nonce
        return .auth(sender: me, proof: Handshake.connectorProof(key: key, clusterId: credentials.clusterId, nonceA: nonce, nonceC: nonceC, me: me))
    }

    /// Whether WELCOME proves that `sender` holds the key this side proved.
    public func accepts(welcome sender: NodeAddress, proof: Bytes) -> Bool {
        guard let nonceA, let key = credentials.key(for: me) else { return false }
        return Crypto.equal(proof, Handshake.acceptorProof(key: key, clusterId: credentials.clusterId, nonceA: nonceA, nonceC: nonceC, it: sender))
    }
}

/// The acceptor's side: CHALLENGE in answer to HELLO, then AUTH checked
/// against the key of the role it claims, answered by WELCOME.
struct AcceptorHandshake {
    let credentials: Credentials
    let me: NodeAddress
    let nonceA = Crypto.randomBytes(Handshake.nonceBytes)
    var nonceC: Bytes?

    mutating func answer(hello nonce: Bytes) -> Frame? {
        guard nonceC == nil, nonce.count == Handshake.nonceBytes else { return nil }
        nonceC = nonce
        return .challenge(nonce: nonceA)
    }

    /// WELCOME if `proof` shows that the peer holds the key of `sender`'s
    /// role; nil otherwise.
    func answer(auth sender: NodeAddress, proof: Bytes) -> Frame? {
        guard let nonceC, let key = credentials.key(for: sender) else { return nil }
        let want = Handshake.connectorProof(key: key, clusterId: credentials.clusterId, nonceA: nonceA, nonceC: nonceC, me: sender)
        guard Crypto.equal(proof, want) else { return nil }
        return .welcome(sender: me, proof: Handshake.acceptorProof(key: key, clusterId: credentials.clusterId, nonceA: nonceA, nonceC: nonceC, it: me))
    }
}
