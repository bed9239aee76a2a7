import CoreMetrics
import Foundation
import Logging
import NIOCore
import NIOPosix
import WeftCore
import WeftProtocol

/// Where a node listens.
public struct Endpoint: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int
    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }
    public var description: String { "\(host):\(port)" }
}

/// Splits a byte stream into frames: a u32 little-endian length, then that
/// many bytes. A length over `Limits.frameBytesMax` or a body that does not
/// decode is an error that closes this one connection.
///
/// Before the peer's HELLO is accepted only `Limits.preHelloFrameBytesMax`
/// is allowed; a large frame still arriving holds its length against the
/// node's `inboundBufferedBytesMax` budget until it is whole.
final class FrameDecoder: ByteToMessageDecoder {
    typealias InboundOut = Frame
    let state: ConnectionState
    let budget: ByteBudget?
    /// Bytes of the frame being received, held against `budget`.
    var held = 0

    init(state: ConnectionState = ConnectionState(), budget: ByteBudget? = nil) {
        self.state = state
        self.budget = budget
    }

    func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let length = buffer.getInteger(at: buffer.readerIndex, endianness: .little, as: UInt32.self) else { return .needMoreData }
        state.lastActivityMillis = wallMillis()
        if !state.helloDone && Int(length) > Limits.preHelloFrameBytesMax {
            throw Frame.DecodeFailure.malformed("frame of \(length) bytes before the handshake exceeds Limits.preHelloFrameBytesMax (\(Limits.preHelloFrameBytesMax))")
        }
        if Int(length) > Limits.frameBytesMax {
            throw Frame.DecodeFailure.malformed("frame of \(length) bytes exceeds Limits.frameBytesMax (\(Limits.frameBytesMax))")
        }
        guard buffer.readableBytes >= 4 + Int(length) else {
            if let budget, held == 0, Int(length) > 64 << 10 {
                guard budget.take(Int(length)) else {
                    throw Frame.DecodeFailure.malformed("a frame of \(length) bytes would pass this node's budget for partly received frames (Limits.inboundBufferedBytesMax, \(budget.limit) bytes)")
                }
                held = Int(length)
            }
            return .needMoreData
        }
        release()
        buffer.moveReaderIndex(forwardBy: 4)
        let body = buffer.readSlice(length: Int(length))!
        let frame = try body.withUnsafeReadableBytes { raw throws(Frame.DecodeFailure) in try Frame.decode(body: raw) }
        context.fireChannelRead(wrapInboundOut(frame))
        return .continue
    }

    func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        while try decode(context: context, buffer: &buffer) == .continue {}
        return .needMoreData
    }

    func decoderRemoved(context: ChannelHandlerContext) { release() }

    func release() {
        if held > 0 { budget?.give(held) }
        held = 0
    }
}

/// What a connection's decoder and handler share: whether the peer's HELLO
/// was accepted, when it last sent or was sent something, and how many of
/// its calls are running. Touched only on the connection's event loop.
final class ConnectionState: @unchecked Sendable {
    var helloDone = false
    var lastActivityMillis = wallMillis()
    var callsRunning = 0
}

/// A node-wide byte budget (`Limits.inboundBufferedBytesMax`).
final class ByteBudget: @unchecked Sendable {
    let lock = NSLock()
    let limit: Int
    var used = 0
    init(limit: Int) { self.limit = limit }
    func take(_ n: Int) -> Bool {
        lock.withLock {
            if used + n > limit { return false }
            used += n
            return true
        }
    }
    func give(_ n: Int) { lock.withLock { used -= n } }
}

/// One connection's protocol: the authenticated handshake first (see
/// `Handshake`), then envelopes, pings, calls and errors. Anything else
/// closes the connection with a logged reason; the node itself is never
/// affected. Before the handshake is done a peer is told nothing but a
/// CHALLENGE or "authentication failed".
final class FrameHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = Frame

    let transport: NetworkTransport
    let outbound: NodeAddress?
    var remote: NodeAddress?
    let state: ConnectionState
    var idleCheck: Scheduled<Void>?
    var connector: ConnectorHandshake?
    var acceptor: AcceptorHandshake?

    init(transport: NetworkTransport, outbound: NodeAddress?, state: ConnectionState = ConnectionState()) {
        self.transport = transport
        self.outbound = outbound
        self.state = state
    }

    func channelActive(context: ChannelHandlerContext) {
        if let to = outbound {
            // Recorded here, on the channel's own loop, so that its
            // channelInactive always finds it (see outboundClosed).
            transport.outboundActive(to, context.channel)
            let c = ConnectorHandshake(credentials: transport.credentials, me: transport.me)
            connector = c
            write(context.channel, c.hello)
        } else {
            acceptor = AcceptorHandshake(credentials: transport.credentials, me: transport.me)
            // A stranger gets `inboundHelloMillis` to prove who it is.
            let channel = context.channel
            context.eventLoop.scheduleTask(in: .milliseconds(transport.inboundHelloMillis)) { [self] in
                if remote == nil && channel.isActive {
                    transport.logRejected("closing connection from \(channel.remoteAddress.map { "\($0)" } ?? "?"): not authenticated within \(transport.inboundHelloMillis) ms (Limits.inboundHelloMillisMax)")
                    channel.close(promise: nil)
                }
            }
        }
        context.fireChannelActive()
    }

    /// The handshake's frames, before `remote` is known.
    func handshake(_ context: ChannelHandlerContext, _ frame: Frame) {
        switch frame {
        case .hello(let nonce) where acceptor != nil:
            guard let challenge = acceptor!.answer(hello: nonce) else { return refuse(context, "bad or repeated HELLO") }
            write(context.channel, challenge)
        case let .auth(sender, proof) where acceptor != nil:
            guard let welcome = acceptor!.answer(auth: sender, proof: proof) else {
                return refuse(context, "AUTH as \(sender) without a valid proof (wrong secret or cluster id)")
            }
            remote = sender
            state.helloDone = true
            write(context.channel, welcome)
            if case .client(let id) = sender {
                transport.registerClientChannel(id, context.channel)
                watchIdle(context.channel)
            } else {
                transport.peerIsUp(sender)
            }
        case .challenge(let nonce) where connector != nil:
            guard let auth = connector!.answer(challenge: nonce) else { return refuse(context, "bad or repeated CHALLENGE") }
            write(context.channel, auth)
        case let .welcome(sender, proof) where connector != nil:
            guard connector!.accepts(welcome: sender, proof: proof) else {
                return refuse(context, "the peer answered as \(sender) without a valid proof: it does not hold this cluster's secret")
            }
            if let expected = outbound, expected != sender {
                return reject(context, "expected \(expected) at this address but \(sender) answered; check the cluster file")
            }
            remote = sender
            state.helloDone = true
            transport.outboundReady(sender)
        case .error(let text):
            transport.log("peer refused the connection: \(text)", .warning)
            context.close(promise: nil)
        default:
            refuse(context, "\(Authorization.kind(frame)) before the handshake was done")
        }
    }

    /// Closes an unauthenticated connection: the peer is told only
    /// `Handshake.refusal`; the reason goes to this node's log.
    func refuse(_ context: ChannelHandlerContext, _ reason: String) {
        transport.logRejected("closing connection from \(context.remoteAddress.map { "\($0)" } ?? "?"): \(Handshake.refusal): \(reason)")
        write(context.channel, .error(Handshake.refusal))
        context.close(promise: nil)
    }

    /// Closes a client's connection idle for `clientIdleMillis` (nothing
    /// read or written, no call running); checked every quarter of it.
    func watchIdle(_ channel: Channel) {
        let every = max(10, transport.clientIdleMillis / 4)
        idleCheck = channel.eventLoop.scheduleTask(in: .milliseconds(every)) { [self] in
            guard channel.isActive else { return }
            if state.callsRunning == 0 && Int64(wallMillis() - state.lastActivityMillis) >= transport.clientIdleMillis {
                transport.logRejected("closing idle connection of \(remote.map { "\($0)" } ?? "?") after \(transport.clientIdleMillis) ms (Limits.clientIdleMillisMax)")
                channel.close(promise: nil)
                return
            }
            watchIdle(channel)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        guard let remote else { return handshake(context, frame) }
        switch (remote, frame) {
        case let (remote, .envelope(env)):
            // Behind a gateway (`weft server`) every node answers on the one connection.
            let viaGateway: Bool
            if transport.gateway, outbound != nil, case .client = env.from { viaGateway = false } else { viaGateway = transport.gateway && outbound != nil }
            guard env.from == remote || viaGateway else { return reject(context, "\(remote) sent an envelope claiming to be from \(env.from)") }
            if let why = Authorization.refusal(env) { return reject(context, why) }
            transport.receive(env)
        case (_, .ping(let req)):
            write(context.channel, .pong(req: req, info: transport.healthInfo()))
        case (_, .pong(let req, let info)):
            transport.pongReceived(req, info)
        case let (.client, .call(req, method, body)), let (.participant, .call(req, method, body)):
            // Clients call a server's methods and executors' tasks; an
            // executor calls another's (shuffle fetches).
            let channel = context.channel
            guard let handler = transport.onCall else {
                return write(channel, .reply(req: req, ok: false, body: Array("{\"error\":\"invalid-argument\",\"message\":\"this node serves no calls\"}".utf8)))
            }
            state.callsRunning += 1
            let loop = context.eventLoop
            handler(ServerCall(method: method, body: body, clientGone: { !channel.isActive }) { [self] ok, answer in
                loop.execute { self.state.callsRunning -= 1 }
                write(channel, .reply(req: req, ok: ok, body: answer))
            })
        case (_, .call):
            reject(context, "only clients may call")
        case let (_, .reply(req, ok, body)):
            transport.replyReceived(req, ok, body)
        case (_, .error(let text)):
            transport.log("\(remote) closed the connection: \(text)")
            context.close(promise: nil)
        case (_, .hello), (_, .challenge), (_, .auth), (_, .welcome):
            reject(context, "handshake frame after the handshake")
        }
    }

    func reject(_ context: ChannelHandlerContext, _ reason: String) {
        transport.logRejected("closing connection from \(context.remoteAddress.map { "\($0)" } ?? "?"): \(reason)")
        write(context.channel, .error(reason))
        context.close(promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        let reason: String
        if let f = error as? Frame.DecodeFailure { reason = f.description } else if error is ByteToMessageDecoderError { reason = "malformed frame stream" } else { reason = "\(error)" }
        transport.logRejected("closing connection from \(context.remoteAddress.map { "\($0)" } ?? "?"): \(reason)")
        if context.channel.isActive { write(context.channel, .error(reason)) }
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        idleCheck?.cancel()
        if case .client(let id)? = remote, outbound == nil { transport.unregisterClientChannel(id, context.channel) }
        if let o = outbound { transport.outboundClosed(o, context.channel) }
        context.fireChannelInactive()
    }

    func write(_ channel: Channel, _ frame: Frame) {
        state.lastActivityMillis = wallMillis()
        let bytes = frame.encoded()
        var buf = channel.allocator.buffer(capacity: bytes.count)
        buf.writeBytes(bytes)
        channel.writeAndFlush(buf, promise: nil)
    }
}

/// TCP transport for cluster mode, used by node processes (which listen)
/// and by clients (which only connect). Node-to-node envelopes ride one
/// outbound connection per peer, opened lazily and reopened with backoff;
/// replies to a client ride the connection the client opened.
///
/// Bounds: at most `Limits.peerQueueMax` envelopes wait for a peer that is
/// connecting; when a peer cannot be reached, client requests queued for it
/// fail at once with a clear error, and node-to-node envelopes are dropped
/// (the protocol resends them).
public final class NetworkTransport: Transport, @unchecked Sendable {
    public let me: NodeAddress
    /// What this process proves on its connections, and checks on others'.
    public let credentials: Credentials
    public var clusterId: String { credentials.clusterId }
    let directory: [NodeAddress: Endpoint]
    let group: MultiThreadedEventLoopGroup
    let ownsGroup: Bool
    let lock = NSLock()
    var sinks: [NodeAddress: MessageSink] = [:]
    var clientChannels: [UInt64: Channel] = [:]
    var peers: [NodeAddress: Peer] = [:]
    var server: Channel?
    var pings: [UInt64: (String?) -> Void] = [:]
    var nextPing: UInt64 = 1
    public var healthInfo: @Sendable () -> String = { "{}" }
    let logPrefix: String
    var closed = false

    struct Peer {
        var channel: Channel?
        var connecting = false
        var queue: [Envelope] = []
        /// `call` frames waiting for the connection's handshake.
        var calls: [(req: UInt64, frame: Frame)] = []
        var failures = 0
        var retryAtMillis: UInt64 = 0
    }

    /// A client of `weft server`: every node is behind the one address in
    /// `directory`, reached over ONE connection (the server answers HELLO
    /// as the coordinator).
    let gateway: Bool

    /// TLS on every connection (`--tls`), or nil for plain TCP.
    public let tls: TLSSetup?

    public init(me: NodeAddress, credentials: Credentials, directory: [NodeAddress: Endpoint], threads: Int = 1, gateway: Bool = false,
                tls: TLSSetup? = nil) {
        self.me = me
        self.credentials = credentials
        self.tls = tls
        self.directory = directory
        self.gateway = gateway
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
        self.ownsGroup = true
        self.logPrefix = "weft \(me)"
        self.logger = Logger(label: "weft \(me)")
    }

    /// One line per event through swift-log (stderr, with time and level).
    let logger: Logger

    func log(_ s: String, _ level: Logger.Level = .info) {
        logger.log(level: level, "\(s)")
    }

    // Bounds on inbound connections (Limits; settable for tests).
    var inboundHelloMillis = Limits.inboundHelloMillisMax
    var clientIdleMillis = Limits.clientIdleMillisMax
    var inboundConnectionsMax = Limits.inboundConnectionsMax
    var inboundBudget = ByteBudget(limit: Limits.inboundBufferedBytesMax)
    var inboundOpen = 0
    lazy var openGauge = CoreMetrics.Gauge(label: "weft_connections_open", dimensions: [("node", me.description)])
    var rejectedCounters: [String: CoreMetrics.Counter] = [:]

    /// `weft_connections_rejected_total{reason}`.
    func rejected(_ reason: String) -> CoreMetrics.Counter {
        lock.withLock {
            if let c = rejectedCounters[reason] { return c }
            let c = CoreMetrics.Counter(label: "weft_connections_rejected_total", dimensions: [("node", me.description), ("reason", reason)])
            rejectedCounters[reason] = c
            return c
        }
    }

    /// The reason of a refusal, as a label: authentication, handshake
    /// timeout, idle, too many connections, budget, TLS, malformed, other.
    func reasonClass(_ s: String) -> String {
        if s.contains(Handshake.refusal) { return "authentication" }
        if s.contains("not authenticated within") { return "handshake_timeout" }
        if s.contains("idle connection") { return "idle" }
        if s.contains("Limits.inboundConnectionsMax") { return "too_many_connections" }
        if s.contains("Limits.inboundBufferedBytesMax") || s.contains("Limits.preHelloFrameBytesMax") || s.contains("Limits.frameBytesMax") { return "too_large" }
        if s.contains("TLS") { return "tls" }
        if s.contains("malformed") || s.contains("protocol version") { return "malformed" }
        if s.contains("may not send") || s.contains("claiming to be") { return "unauthorized" }
        return "other"
    }
    var rejectLogSecond: UInt64 = 0
    var rejectLogLines = 0
    var rejectLogSuppressed = 0

    /// Logs a refused or closed connection, at most
    /// `Limits.rejectLogLinesPerSecondMax` lines a second; the lines left
    /// out are counted in the next one.
    func logRejected(_ s: String) {
        rejected(reasonClass(s)).increment()
        let second = wallMillis() / 1000
        let (write, suppressed): (Bool, Int) = lock.withLock {
            if second != rejectLogSecond {
                rejectLogSecond = second
                rejectLogLines = 0
            }
            guard rejectLogLines < Limits.rejectLogLinesPerSecondMax else {
                rejectLogSuppressed += 1
                return (false, 0)
            }
            rejectLogLines += 1
            defer { rejectLogSuppressed = 0 }
            return (true, rejectLogSuppressed)
        }
        if write { log(s + (suppressed > 0 ? " (\(suppressed) similar lines suppressed)" : ""), .warning) }
    }

    // MARK: Server

    /// Binds the listening socket. A port in use is a clear error.
    public func listen(_ endpoint: Endpoint) throws(WeftError) {
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    let admitted: Bool = lock.withLock {
                        if inboundOpen >= inboundConnectionsMax { return false }
                        inboundOpen += 1
                        openGauge.record(inboundOpen)
                        return true
                    }
                    guard admitted else {
                        logRejected("refusing connection from \(channel.remoteAddress.map { "\($0)" } ?? "?"): \(inboundConnectionsMax) connections open (Limits.inboundConnectionsMax)")
                        let bytes = Frame.error("too many connections (Limits.inboundConnectionsMax is \(inboundConnectionsMax))").encoded()
                        var buf = channel.allocator.buffer(capacity: bytes.count)
                        buf.writeBytes(bytes)
                        channel.writeAndFlush(buf).whenComplete { _ in channel.close(promise: nil) }
                        return
                    }
                    channel.closeFuture.whenComplete { [self] _ in
                        lock.withLock {
                            inboundOpen -= 1
                            openGauge.record(inboundOpen)
                        }
                    }
                    try tls?.addServerHandler(channel)
                    let state = ConnectionState()
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameDecoder(state: state, budget: inboundBudget)))
                    try channel.pipeline.syncOperations.addHandler(FrameHandler(transport: self, outbound: nil, state: state))
                }
            }
        do {
            server = try bootstrap.bind(host: endpoint.host, port: endpoint.port).wait()
        } catch {
            let text = "\(error)"
            if text.contains("Address already in use") || text.contains("EADDRINUSE") || text.contains("errno: 98") {
                throw WeftError(.unavailable, "port \(endpoint.port) on \(endpoint.host) is already in use by another process; pick another --base-port or stop that process")
            }
            throw WeftError(.unavailable, "cannot listen on \(endpoint): \(text)")
        }
    }

    /// The port the listener is bound to (the one the OS chose for port 0).
    public var boundPort: Int? { lock.withLock { server?.localAddress?.port } }

    public func close() {
        lock.lock()
        if closed {
            lock.unlock()
            return
        }
        closed = true
        let chans = peers.values.compactMap(\.channel) + Array(clientChannels.values) + (server.map { [$0] } ?? [])
        lock.unlock()
        for c in chans { try? c.close().wait() }
        if ownsGroup { try? group.syncShutdownGracefully() }
    }

    // MARK: Transport

    public func register(_ address: NodeAddress, _ sink: MessageSink) {
        lock.withLock { sinks[address] = sink }
    }

    public func unregister(_ address: NodeAddress) {
        lock.withLock { _ = sinks.removeValue(forKey: address) }
    }

    public func send(_ env: Envelope) {
        lock.lock()
        if let sink = sinks[env.to] {
            lock.unlock()
            sink.enqueue(env)
            return
        }
        if case .client(let id) = env.to {
            let channel = clientChannels[id]
            lock.unlock()
            if let channel { writeFrame(channel, .envelope(env)) }
            return // the client is gone: its reply has nowhere to go
        }
        guard let endpoint = directory[env.to] else {
            lock.unlock()
            undeliverable(env, WeftError(.invalidArgument, "no address for \(env.to) in the cluster file"))
            return
        }
        let key = peerKey(env.to)
        var peer = peers[key] ?? Peer()
        if let ch = peer.channel, !peer.connecting {
            lock.unlock()
            writeFrame(ch, .envelope(env))
            return
        }
        if peer.queue.count >= Limits.peerQueueMax {
            lock.unlock()
            undeliverable(env, WeftError(.unavailable, "\(env.to) at \(endpoint) has \(Limits.peerQueueMax) messages waiting (Limits.peerQueueMax)"))
            return
        }
        let now = wallMillis()
        if !peer.connecting && now < peer.retryAtMillis {
            lock.unlock()
            undeliverable(env, unreachable(env.to, endpoint, "connection refused recently; retrying in \(peer.retryAtMillis - now) ms"))
            return
        }
        peer.queue.append(env)
        let start = !peer.connecting
        peer.connecting = true
        peers[key] = peer
        lock.unlock()
        if start { connect(key, endpoint) }
    }

    /// The connection an envelope for `to` rides: its own, or the gateway's.
    func peerKey(_ to: NodeAddress) -> NodeAddress {
        if gateway, case .client = to { return to }
        return gateway ? .coordinator : to
    }

    /// Envelopes bound for connected peers and clients are encoded into one
    /// buffer per connection and flushed once: one syscall per connection per
    /// round instead of one per message.
    public func sendAll(_ envs: [Envelope]) {
        if envs.count == 1 { return send(envs[0]) }
        var batches: [ObjectIdentifier: (Channel, ByteWriter)] = [:]
        var rest: [Envelope] = []
        lock.lock()
        for env in envs {
            var channel: Channel?
            if sinks[env.to] == nil {
                if case .client(let id) = env.to {
                    channel = clientChannels[id]
                } else if let peer = peers[peerKey(env.to)], !peer.connecting {
                    channel = peer.channel
                }
            }
            guard let ch = channel else {
                rest.append(env)
                continue
            }
            var entry = batches[ObjectIdentifier(ch)] ?? (ch, ByteWriter(capacity: 256))
            entry.1.raw(Frame.envelope(env).encoded())
            batches[ObjectIdentifier(ch)] = entry
        }
        lock.unlock()
        for (_, (ch, w)) in batches {
            var buf = ch.allocator.buffer(capacity: w.bytes.count)
            buf.writeBytes(w.bytes)
            ch.writeAndFlush(buf, promise: nil)
        }
        for env in rest { send(env) }
    }

    func unreachable(_ to: NodeAddress, _ endpoint: Endpoint, _ why: String) -> WeftError {
        WeftError(.unavailable, "\(to) at \(endpoint) is unreachable (\(why)); is it running? (weft cluster status)")
    }

    func connect(_ to: NodeAddress, _ endpoint: Endpoint) {
        let bootstrap = ClientBootstrap(group: group)
            .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(.seconds(2))
            .channelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    try self.tls?.addClientHandler(channel)
                    let state = ConnectionState()
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameDecoder(state: state)))
                    try channel.pipeline.syncOperations.addHandler(FrameHandler(transport: self, outbound: to, state: state))
                }
            }
        bootstrap.connect(host: endpoint.host, port: endpoint.port).whenFailure { [self] error in
            connectFailed(to, endpoint, "\(error)")
        }
        // On success the handler's channelActive records the channel, and
        // queued envelopes go once the peer's HELLO arrives (outboundReady).
    }

    func outboundActive(_ to: NodeAddress, _ channel: Channel) {
        lock.withLock { peers[to, default: Peer()].channel = channel }
        channel.eventLoop.scheduleTask(in: .milliseconds(Limits.handshakeMillisMax)) { [self] in
            let stuck = lock.withLock { peers[to]?.connecting == true && peers[to]?.channel === channel }
            if stuck {
                log("\(to) accepted a connection but did not complete the handshake within \(Limits.handshakeMillisMax) ms (Limits.handshakeMillisMax); closing it", .warning)
                channel.close(promise: nil)
            }
        }
    }

    func connectFailed(_ to: NodeAddress, _ endpoint: Endpoint, _ why: String) {
        lock.lock()
        var peer = peers[to] ?? Peer()
        let queued = peer.queue
        let pendingCalls = peer.calls
        peer.queue = []
        peer.calls = []
        peer.connecting = false
        peer.channel = nil
        peer.failures += 1
        peer.retryAtMillis = wallMillis() + min(1000, 25 << min(peer.failures, 6))
        peers[to] = peer
        lock.unlock()
        let reason = why.contains("refused") || why.contains("111") ? "connection refused" : why
        for env in queued { undeliverable(env, unreachable(to, endpoint, reason)) }
        for c in pendingCalls { failCall(c.req, unreachable(to, endpoint, reason)) }
    }

    func outboundReady(_ to: NodeAddress) {
        lock.lock()
        var peer = peers[to] ?? Peer()
        let queued = peer.queue
        let pendingCalls = peer.calls
        peer.queue = []
        peer.calls = []
        peer.connecting = false
        peer.failures = 0
        peer.retryAtMillis = 0
        peers[to] = peer
        let ch = peer.channel
        lock.unlock()
        // We run on the channel's loop, so a concurrent send's write is
        // queued behind these: order is kept.
        if let ch {
            for env in queued { writeFrame(ch, .envelope(env)) }
            for c in pendingCalls { sendCall(c.req, c.frame, on: ch, to: to) }
        }
    }

    func outboundClosed(_ to: NodeAddress, _ channel: Channel) {
        lock.lock()
        var peer = peers[to] ?? Peer()
        guard peer.channel === channel || peer.channel == nil else {
            lock.unlock()
            return
        }
        let queued = peer.queue
        let pendingCalls = peer.calls
        let wasConnecting = peer.connecting
        peer = Peer(failures: peer.failures + 1, retryAtMillis: wallMillis() + min(1000, 25 << min(peer.failures + 1, 6)))
        peers[to] = peer
        let local = Array(sinks.values)
        lock.unlock()
        if wasConnecting, let endpoint = directory[to] {
            let why = unreachable(to, endpoint, "connection closed during the handshake, or no handshake within \(Limits.handshakeMillisMax) ms")
            for env in queued { undeliverable(env, why) }
            for c in pendingCalls { failCall(c.req, why) }
        }
        // A client whose node went away fails its waiting requests at once
        // (behind a gateway, every node went with it).
        let gone = gateway ? Array(directory.keys) : [to]
        for case let c as WeftClient in local {
            for t in gone { c.failRequests(to: t, WeftError(.unavailable, "lost the connection to \(t) at \(directory[t].map { "\($0)" } ?? "?")")) }
        }
    }

    /// A node just connected to us, so it is up: forget the backoff of our
    /// own connection to it (a restarted participant's first answers, such
    /// as the clock it asks for, must not wait out a retry delay).
    func peerIsUp(_ peer: NodeAddress) {
        lock.withLock {
            guard var p = peers[peer], p.channel == nil, !p.connecting else { return }
            p.failures = 0
            p.retryAtMillis = 0
            peers[peer] = p
        }
    }

    func registerClientChannel(_ id: UInt64, _ ch: Channel) { lock.withLock { clientChannels[id] = ch } }

    func unregisterClientChannel(_ id: UInt64, _ ch: Channel) {
        lock.withLock { if clientChannels[id] === ch { clientChannels[id] = nil } }
    }

    func receive(_ env: Envelope) {
        lock.lock()
        let sink = sinks[env.to]
        lock.unlock()
        if let sink {
            sink.enqueue(env)
        } else if env.to != me {
            log("dropping an envelope for \(env.to) that arrived at \(me)")
        }
    }

    /// A client request that cannot reach its node is answered with the
    /// reason: a local client's through its sink, a remote client's (whose
    /// node here has stopped) over the connection it came on.
    public func undeliverable(_ env: Envelope, _ error: WeftError) {
        guard case .client = env.from, let req = clientRequestId(env.message) else { return }
        send(Envelope(from: env.to, to: env.from, .failed(req: req, error: error)))
    }

    /// Called when this process's node stops on a storage failure; the
    /// node process exits through it so that a restart recovers from disk.
    public var onNodeFailed: @Sendable (WeftError) -> Void = { _ in }

    public func nodeFailed(_ address: NodeAddress, _ error: WeftError) {
        log("node stopped: \(error.message)", .error)
        onNodeFailed(error)
    }

    func writeFrame(_ channel: Channel, _ frame: Frame) {
        let bytes = frame.encoded()
        var buf = channel.allocator.buffer(capacity: bytes.count)
        buf.writeBytes(bytes)
        channel.writeAndFlush(buf, promise: nil)
    }

    // MARK: Calls (`weft server` only)

    /// Runs a client's call and answers through its `reply`, on any
    /// thread. Set by `weft server`.
    public var onCall: (@Sendable (ServerCall) -> Void)? {
        get { lock.withLock { callHandler } }
        set { lock.withLock { callHandler = newValue } }
    }
    var callHandler: (@Sendable (ServerCall) -> Void)?
    var calls: [UInt64: CheckedContinuation<(ok: Bool, body: Bytes), Error>] = [:]
    var nextCall: UInt64 = 1

    /// Calls `method` on the gateway (a client of `weft server`); waits for
    /// its reply for as long as the method runs, or fails if the
    /// connection is lost. The connection must be up (a request made it).
    public func call(_ method: String, _ body: Bytes) async throws -> (ok: Bool, body: Bytes) {
        guard let ch = lock.withLock({ peers[.coordinator]?.channel }) else {
            throw WeftError(.unavailable, "not connected to the server")
        }
        return try await withCheckedThrowingContinuation { cont in
            let req = lock.withLock { () -> UInt64 in
                defer { nextCall += 1 }
                calls[nextCall] = cont
                return nextCall
            }
            ch.closeFuture.whenComplete { [self] _ in
                if let c = lock.withLock({ calls.removeValue(forKey: req) }) {
                    c.resume(throwing: WeftError(.unavailable, "lost the connection to the server during \(method)"))
                }
            }
            writeFrame(ch, .call(req: req, method: method, body: body))
        }
    }

    /// Calls `method` on the node at `to` (a participant's executor, say),
    /// connecting first if need be. Fails when the connection cannot be
    /// made or is lost before the answer, or after `timeoutMillis`.
    public func call(to: NodeAddress, _ method: String, _ body: Bytes, timeoutMillis: Int64? = nil) async throws -> (ok: Bool, body: Bytes) {
        guard let endpoint = directory[to] else { throw WeftError(.invalidArgument, "no address for \(to) in the cluster file") }
        return try await withCheckedThrowingContinuation { cont in
            lock.lock()
            let req = nextCall
            nextCall += 1
            calls[req] = cont
            let frame = Frame.call(req: req, method: method, body: body)
            let key = peerKey(to)
            var peer = peers[key] ?? Peer()
            if let ch = peer.channel, !peer.connecting {
                lock.unlock()
                sendCall(req, frame, on: ch, to: to)
            } else {
                let now = wallMillis()
                if !peer.connecting && now < peer.retryAtMillis {
                    lock.unlock()
                    failCall(req, unreachable(to, endpoint, "connection refused recently; retrying in \(peer.retryAtMillis - now) ms"))
                    return
                }
                peer.calls.append((req, frame))
                let start = !peer.connecting
                peer.connecting = true
                peers[key] = peer
                lock.unlock()
                if start { connect(key, endpoint) }
            }
            if let timeoutMillis {
                group.next().scheduleTask(in: .milliseconds(timeoutMillis)) { [self] in
                    failCall(req, WeftError(.unavailable, "\(to) did not answer \(method) within \(timeoutMillis) ms"))
                }
            }
        }
    }

    func sendCall(_ req: UInt64, _ frame: Frame, on ch: Channel, to: NodeAddress) {
        ch.closeFuture.whenComplete { [self] _ in
            failCall(req, WeftError(.unavailable, "lost the connection to \(to)"))
        }
        writeFrame(ch, frame)
    }

    func failCall(_ req: UInt64, _ error: WeftError) {
        lock.withLock { calls.removeValue(forKey: req) }?.resume(throwing: error)
    }

    func replyReceived(_ req: UInt64, _ ok: Bool, _ body: Bytes) {
        lock.withLock { calls.removeValue(forKey: req) }?.resume(returning: (ok: ok, body: body))
    }

    // MARK: Health

    func pongReceived(_ req: UInt64, _ info: String) {
        let cb = lock.withLock { pings.removeValue(forKey: req) }
        cb?(info)
    }

    /// Pings `endpoint` on a fresh connection, after the handshake (as a
    /// client proving `credentials`); the node's health JSON, or nil if it
    /// does not answer within `timeoutMillis`.
    public static func ping(_ endpoint: Endpoint, credentials: Credentials, tls: TLSSetup? = nil, timeoutMillis: Int64 = 1000) -> String? {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let box = PingBox()
        let handshake = ConnectorHandshake(credentials: credentials, me: .client(UInt64.random(in: 1...UInt64.max)))
        let bootstrap = ClientBootstrap(group: group)
            .connectTimeout(.milliseconds(timeoutMillis))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try tls?.addClientHandler(channel)
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameDecoder()))
                    try channel.pipeline.syncOperations.addHandler(PingHandler(box: box, handshake: handshake))
                }
            }
        guard let ch = try? bootstrap.connect(host: endpoint.host, port: endpoint.port).wait() else { return nil }
        let info = box.wait(timeoutMillis: timeoutMillis)
        try? ch.close().wait()
        return info
    }
}

final class PingBox: @unchecked Sendable {
    let cond = NSCondition()
    var info: String?
    func set(_ s: String) {
        cond.lock()
        info = s
        cond.signal()
        cond.unlock()
    }
    func wait(timeoutMillis: Int64) -> String? {
        cond.lock()
        defer { cond.unlock() }
        let deadline = Date(timeIntervalSinceNow: Double(timeoutMillis) / 1000)
        while info == nil && cond.wait(until: deadline) {}
        return info
    }
}

/// A health ping's connection: the connector's handshake, then one PING.
final class PingHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = Frame
    let box: PingBox
    var handshake: ConnectorHandshake
    init(box: PingBox, handshake: ConnectorHandshake) {
        self.box = box
        self.handshake = handshake
    }
    func channelActive(context: ChannelHandlerContext) {
        send(context, handshake.hello)
        context.fireChannelActive()
    }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .challenge(let nonce):
            guard let auth = handshake.answer(challenge: nonce) else { return context.close(promise: nil) }
            send(context, auth)
        case let .welcome(sender, proof):
            guard handshake.accepts(welcome: sender, proof: proof) else { return context.close(promise: nil) }
            send(context, .ping(req: 1))
        case .pong(_, let info):
            box.set(info)
        default:
            context.close(promise: nil)
        }
    }
    func send(_ context: ChannelHandlerContext, _ frame: Frame) {
        let bytes = frame.encoded()
        var buf = context.channel.allocator.buffer(capacity: bytes.count)
        buf.writeBytes(bytes)
        context.writeAndFlush(NIOAny(buf), promise: nil)
    }
    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
}

/// A client's `call` as the server's handler sees it.
public struct ServerCall: Sendable {
    public let method: String
    /// JSON.
    public let body: Bytes
    /// True once the calling client's connection is closed (nobody waits
    /// for the answer any more).
    public let clientGone: @Sendable () -> Bool
    /// Answers once: `ok` with the method's JSON answer, else a JSON error.
    public let reply: @Sendable (Bool, Bytes) -> Void

    init(method: String, body: Bytes, clientGone: @escaping @Sendable () -> Bool, reply: @escaping @Sendable (Bool, Bytes) -> Void) {
        self.method = method
        self.body = body
        self.clientGone = clientGone
        self.reply = reply
    }
}
