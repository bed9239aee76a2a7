import Foundation
import NIOCore
import WeftCore
import CWeftTLS

/// Where a cluster's (or a server's) certificates live: `ca.crt`, the CA
/// every peer is verified against; `node.crt`/`node.key`, what a node
/// presents, as server and as client; `client.crt`/`client.key`, what a
/// client presents. Made by `weft cert` (or `cluster start --tls`).
public struct CertFiles: Sendable {
    public let dir: String
    public init(_ dir: String) { self.dir = dir }
    public var caCert: String { dir + "/ca.crt" }
    public var caKey: String { dir + "/ca.key" }
    public var nodeCert: String { dir + "/node.crt" }
    public var nodeKey: String { dir + "/node.key" }
    public var clientCert: String { dir + "/client.crt" }
    public var clientKey: String { dir + "/client.key" }
}

/// TLS on a transport's connections, with the system's OpenSSL (libssl,
/// through the `CWeftTLS` C target over memory buffers; no second TLS
/// library to build): TLS 1.2 or later, both sides present a certificate
/// signed by the cluster's CA and verify the other's chain to it (mutual
/// verification; host names are not checked, the CA is the cluster's own).
/// The HMAC handshake still runs inside, and still decides who may act as
/// a node.
public final class TLSSetup: @unchecked Sendable {
    let context: OpaquePointer
    let acceptsConnections: Bool

    /// `asNode`: present `node.crt` (and accept connections); otherwise
    /// `client.crt`, connecting only.
    public init(files: CertFiles, asNode: Bool) throws(WeftError) {
        let (certPath, keyPath) = asNode ? (files.nodeCert, files.nodeKey) : (files.clientCert, files.clientKey)
        for f in [files.caCert, certPath, keyPath] where !FileManager.default.fileExists(atPath: f) {
            throw WeftError(.notFound, "TLS needs \(f); create the certificates with `weft cert create-ca|create-node|create-client --certs-dir \(files.dir)`")
        }
        var err = [CChar](repeating: 0, count: 512)
        guard let c = weft_tls_ctx_new(files.caCert, certPath, keyPath, &err, err.count) else {
            throw WeftError(.invalidArgument, "cannot load the TLS certificates in \(files.dir): \(String(cString: err))")
        }
        context = c
        acceptsConnections = asNode
    }

    deinit { weft_tls_ctx_free(context) }

    func addServerHandler(_ channel: Channel) throws {
        guard acceptsConnections else { return }
        try channel.pipeline.syncOperations.addHandler(TLSHandler(setup: self, isServer: true))
    }

    func addClientHandler(_ channel: Channel) throws {
        try channel.pipeline.syncOperations.addHandler(TLSHandler(setup: self, isServer: false))
    }
}

/// Why a TLS connection was closed.
struct TLSFailure: Error, CustomStringConvertible {
    let reason: String
    var description: String { reason }
}

/// One connection's TLS, first in its pipeline: ciphertext below,
/// plaintext above. Writes made before the handshake is done (the HMAC
/// HELLO) wait for it.
final class TLSHandler: ChannelDuplexHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let setup: TLSSetup  // keeps the context alive
    let tls: OpaquePointer
    let isServer: Bool
    var handshakeDone = false
    var failed = false
    var waiting: [(ByteBuffer, EventLoopPromise<Void>?)] = []
    var scratch = [UInt8](repeating: 0, count: 16 << 10)
    var err = [CChar](repeating: 0, count: 512)

    init(setup: TLSSetup, isServer: Bool) {
        self.setup = setup
        self.isServer = isServer
        tls = weft_tls_new(setup.context, isServer ? 1 : 0)
    }

    deinit { weft_tls_free(tls) }

    func channelActive(context: ChannelHandlerContext) {
        if !isServer { advance(context) }  // the ClientHello
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        let buf = unwrapInboundIn(data)
        let ok = buf.withUnsafeReadableBytes { weft_tls_feed(tls, $0.baseAddress?.assumingMemoryBound(to: UInt8.self), $0.count) }
        guard ok == 0 else { return fail(context, "TLS: cannot buffer received bytes") }
        advance(context)
    }

    func advance(_ context: ChannelHandlerContext) {
        if !handshakeDone {
            let r = weft_tls_handshake(tls, &err, err.count)
            sendOut(context)
            if r < 0 { return fail(context, String(cString: err)) }
            if r == 0 { return }
            handshakeDone = true
            let queued = waiting
            waiting = []
            for (b, p) in queued { encrypt(context, b, p) }
            context.flush()
        }
        while true {
            let n = scratch.withUnsafeMutableBytes { weft_tls_read(tls, $0.baseAddress!.assumingMemoryBound(to: UInt8.self), $0.count, &err, err.count) }
            if n > 0 {
                var b = context.channel.allocator.buffer(capacity: Int(n))
                scratch.withUnsafeBytes { b.writeBytes(UnsafeRawBufferPointer(rebasing: $0[0..<Int(n)])) }
                context.fireChannelRead(wrapInboundOut(b))
                continue
            }
            if n == -2 {
                context.close(promise: nil)
                return
            }
            if n < 0 { return fail(context, String(cString: err)) }
            break
        }
        sendOut(context)  // anything TLS answers on its own (tickets, alerts)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let buf = unwrapOutboundIn(data)
        if failed {
            promise?.fail(TLSFailure(reason: "TLS connection failed"))
            return
        }
        if !handshakeDone {
            waiting.append((buf, promise))
            return
        }
        encrypt(context, buf, promise)
    }

    func flush(context: ChannelHandlerContext) { context.flush() }

    func encrypt(_ context: ChannelHandlerContext, _ buf: ByteBuffer, _ promise: EventLoopPromise<Void>?) {
        let r = buf.withUnsafeReadableBytes { weft_tls_write(tls, $0.baseAddress?.assumingMemoryBound(to: UInt8.self), $0.count, &err, err.count) }
        guard r == 0 else {
            promise?.fail(TLSFailure(reason: String(cString: err)))
            return fail(context, String(cString: err))
        }
        sendOut(context, promise: promise)
    }

    /// Sends what TLS produced; `promise` completes with it.
    func sendOut(_ context: ChannelHandlerContext, promise: EventLoopPromise<Void>? = nil) {
        let n = weft_tls_pending_out(tls)
        guard n > 0 else {
            promise?.succeed(())
            return
        }
        var b = context.channel.allocator.buffer(capacity: n)
        b.writeWithUnsafeMutableBytes(minimumWritableBytes: n) { raw in
            Int(weft_tls_drain(tls, raw.baseAddress!.assumingMemoryBound(to: UInt8.self), raw.count))
        }
        context.write(wrapOutboundOut(b), promise: promise)
        if promise == nil { context.flush() }
    }

    func fail(_ context: ChannelHandlerContext, _ reason: String) {
        guard !failed else { return }
        failed = true
        for (_, p) in waiting { p?.fail(TLSFailure(reason: reason)) }
        waiting = []
        context.fireErrorCaught(TLSFailure(reason: reason))
        context.close(promise: nil)
    }
}
