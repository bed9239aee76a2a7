import Foundation
import NIOCore
import NIOPosix
import WeftCore
import WeftProtocol

/// The Redis-protocol front end of `weft server` and of cluster nodes
/// (`--redis-port`): RESP2, and RESP3 after `HELLO 3`, on its own listener.
/// Every command becomes a Weft transaction through a `WeftClient`, so MSET,
/// MULTI/EXEC and WATCH are serializable across participants — the cross-key
/// transactions Redis Cluster refuses with CROSSSLOT.
///
/// A connection runs its commands one at a time, in order (pipelined
/// requests are answered in order); different connections run concurrently
/// and their commits share the nodes' group commits.
public final class RedisFrontEnd: @unchecked Sendable {
    let client: WeftClient
    let group: MultiThreadedEventLoopGroup
    let password: String?
    var channel: Channel?
    let lock = NSLock()
    var open = 0
    var served = 0
    var nextConnectionId: Int64 = 1
    let started = wallMillis()
    /// Serializes read-modify-write commands on one key inside this process,
    /// so that concurrent INCRs of a hot key queue instead of aborting each
    /// other's optimistic commits.
    let gate = KeyGate()
    /// Combines concurrent INCRs of one key into one transaction.
    let combiner = IncrementCombiner()
    /// SCAN cursors, shared by every connection (a cursor from one
    /// connection continues on another, as in Redis): id -> last key.
    let cursorLock = NSLock()
    var cursors: [UInt64: Bytes] = [:]
    var cursorOrder: [UInt64] = []

    func saveCursor(_ last: Bytes) -> UInt64 {
        cursorLock.withLock {
            var id: UInt64
            repeat { id = UInt64.random(in: 1...UInt64(Int64.max)) } while cursors[id] != nil
            cursors[id] = last
            cursorOrder.append(id)
            if cursorOrder.count > Limits.respCursorsMax { cursors[cursorOrder.removeFirst()] = nil }
            return id
        }
    }

    func cursor(_ id: UInt64) -> Bytes? { cursorLock.withLock { cursors[id] } }

    /// Lines for INFO's `# Server` section (role, data directory, ...).
    public var infoLines: @Sendable () -> [String] = { [] }

    public init(client: WeftClient, password: String? = nil, threads: Int = 1) {
        self.client = client
        self.password = password.flatMap { $0.isEmpty ? nil : $0 }
        group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
    }

    public func listen(_ endpoint: Endpoint) throws(WeftError) {
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(ChannelOptions.backlog, value: 1024)
            .childChannelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    let admitted: Int64? = lock.withLock {
                        if open >= Limits.respConnectionsMax { return nil }
                        open += 1
                        served += 1
                        defer { nextConnectionId += 1 }
                        return nextConnectionId
                    }
                    guard let id = admitted else {
                        var b = channel.allocator.buffer(capacity: 96)
                        RESPValue.error("ERR max number of clients reached (Limits.respConnectionsMax is \(Limits.respConnectionsMax))").write(to: &b, proto: 2)
                        channel.writeAndFlush(b).whenComplete { _ in channel.close(promise: nil) }
                        return
                    }
                    let session = RedisSession(frontEnd: self, id: id)
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(RESPDecoder()))
                    try channel.pipeline.syncOperations.addHandler(RedisConnection(session: session, mailbox: mailbox(for: channel.eventLoop)))
                    channel.closeFuture.whenComplete { [self] _ in lock.withLock { open -= 1 } }
                }
            }
        do {
            channel = try bootstrap.bind(host: endpoint.host, port: endpoint.port).wait()
        } catch {
            let text = "\(error)"
            if text.contains("Address already in use") || text.contains("EADDRINUSE") || text.contains("errno: 98") {
                throw WeftError(.unavailable, "redis port \(endpoint.port) on \(endpoint.host) is already in use by another process; pick another --redis-port")
            }
            throw WeftError(.unavailable, "cannot listen for Redis clients on \(endpoint): \(text)")
        }
    }

    var mailboxes: [ObjectIdentifier: ReplyMailbox] = [:]

    func mailbox(for loop: EventLoop) -> ReplyMailbox {
        lock.withLock {
            let id = ObjectIdentifier(loop as AnyObject)
            if let m = mailboxes[id] { return m }
            let m = ReplyMailbox(loop: loop, client: client)
            mailboxes[id] = m
            return m
        }
    }

    public var boundPort: Int? { lock.withLock { channel?.localAddress?.port } }
    public var connections: Int { lock.withLock { open } }

    public func close() {
        let c = lock.withLock { channel }
        try? c?.close().wait()
        try? group.syncShutdownGracefully()
    }
}

/// Requests off the wire; a protocol error is thrown to `RedisConnection`,
/// which answers it and closes the connection.
final class RESPDecoder: ByteToMessageDecoder {
    typealias InboundOut = [Bytes]
    var parser = RESPRequestParser()

    func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let args = try parser.next(&buffer) else { return .needMoreData }
        context.fireChannelRead(wrapInboundOut(args))
        return .continue
    }

    func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        while try decode(context: context, buffer: &buffer) == .continue {}
        return .needMoreData
    }
}

/// One client connection: queues requests and runs them one at a time on
/// its session, writing each answer in order. Answers are flushed when the
/// queue is empty or before a command that has to wait for the store, so a
/// pipeline of quick commands goes out in one write.
final class RedisConnection: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = [Bytes]
    let session: RedisSession
    var queue: [[Bytes]] = []
    var head = 0
    var busy = false
    var closing = false
    var paused = false
    var context: ChannelHandlerContext?
    /// Requests buffered before the connection stops reading from its socket.
    static let queuedRequestsMax = 1024
    /// Pipelined SETs or GETs sent together, at most.
    static let batchMax = 256

    let mailbox: ReplyMailbox

    init(session: RedisSession, mailbox: ReplyMailbox) {
        self.session = session
        self.mailbox = mailbox
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if closing || finalError != nil { return }
        queue.append(unwrapInboundIn(data))
        if queue.count - head >= Self.queuedRequestsMax && !paused {
            paused = true
            context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
        }
        pump()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if !busy { flush() }
    }

    /// Bad input: the requests before it are still answered (their commits
    /// may already be running), then the error, then the connection closes.
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if closing || finalError != nil { return }
        if let e = error as? RESPProtocolError { finalError = "ERR Protocol error: \(e.message)" } else { finalError = "ERR \(error)" }
        pump()
    }

    var finalError: String?

    func channelInactive(context: ChannelHandlerContext) {
        closing = true
        session.closed()
        context.fireChannelInactive()
    }

    /// Replies not yet handed to the channel: one buffer per flush.
    var out: ByteBuffer?

    func write(_ v: RESPValue) {
        guard let context else { return }
        if out == nil { out = context.channel.allocator.buffer(capacity: 256) }
        v.write(to: &out!, proto: session.proto)
    }

    func flush() {
        guard let context else { return }
        if let b = out, b.readableBytes > 0 {
            out = nil
            context.writeAndFlush(NIOAny(b), promise: nil)
        }
    }

    /// Runs queued requests until one has to wait for the store.
    func pump() {
        guard let context else { return }
        while !busy && !closing && head < queue.count {
            let args = queue[head]
            head += 1
            if head > 256 && head * 2 > queue.count {
                queue.removeFirst(head)
                head = 0
            }
            switch session.immediate(args) {
            case .reply(let v):
                write(v)
            case .quit(let v):
                closing = true
                write(v)
                flush()
                context.close(promise: nil)
                return
            case .wait:
                busy = true
                flush()
                let session = self.session
                let mailbox = self.mailbox
                // A run of pipelined plain SETs (or GETs) goes out together:
                // SETs as one one-phase commit per participant, GETs all at
                // once; the answers come back in order.
                if let kind = RedisSession.batchKind(args) {
                    var batch = [args]
                    while head < queue.count, batch.count < Self.batchMax, RedisSession.batchKind(queue[head]) == kind,
                          case .wait = session.immediate(queue[head]) {
                        batch.append(queue[head])
                        head += 1
                    }
                    if batch.count > 1 {
                        session.fastBatch(kind, batch, via: mailbox.send) { vs in mailbox.post(self, vs) }
                        return
                    }
                }
                let done: @Sendable (RESPValue) -> Void = { v in mailbox.post(self, v) }
                // Plain GET, SET and MSET answer from callbacks on the
                // nodes' threads; the rest run as a task.
                if !session.fast(args, via: mailbox.send, done) {
                    Task { done(await session.run(args)) }
                }
                return
            }
        }
        if head >= queue.count, !busy, !closing, let text = finalError {
            closing = true
            write(.error(text))
            flush()
            context.channel.close(promise: nil)
            return
        }
        if head >= queue.count {
            queue.removeAll(keepingCapacity: true)
            head = 0
            if paused {
                paused = false
                context.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
            }
        }
        flush()
    }

    /// An answer from the store, back on the event loop.
    func answered(_ vs: [RESPValue]) {
        busy = false
        for v in vs { write(v) }
        pump()
    }
}

/// Answers coming back from the nodes' threads for one event loop's
/// connections: posted under a lock, drained by ONE scheduled task, so a
/// node's round of answers costs one wake-up of the loop, not one each.
///
/// The other way, requests the loop's connections send to the nodes are
/// gathered while the loop handles its ready sockets and sent together
/// after them (`send`), grouped per node: one lock and at most one wake-up
/// of each node per batch.
final class ReplyMailbox: @unchecked Sendable {
    let loop: EventLoop
    let client: WeftClient
    let lock = NSLock()
    var items: [(RedisConnection, [RESPValue])] = []
    var scheduled = false
    /// Requests not yet sent: touched only on `loop`'s thread.
    var requests: [Envelope] = []
    var requestsScheduled = false

    init(loop: EventLoop, client: WeftClient) {
        self.loop = loop
        self.client = client
    }

    /// On the loop's thread: queues `env` for the end of this loop turn.
    func send(_ env: Envelope) {
        requests.append(env)
        if requestsScheduled { return }
        requestsScheduled = true
        loop.execute {
            self.requestsScheduled = false
            let batch = self.requests
            self.requests = []
            self.client.flush(batch)
        }
    }

    func post(_ c: RedisConnection, _ v: RESPValue) { post(c, [v]) }

    /// The answers of a batch of requests, in request order.
    func post(_ c: RedisConnection, _ vs: [RESPValue]) {
        let schedule: Bool = lock.withLock {
            items.append((c, vs))
            if scheduled { return false }
            scheduled = true
            return true
        }
        if schedule { loop.execute { self.drain() } }
    }

    func drain() {
        let batch: [(RedisConnection, [RESPValue])] = lock.withLock {
            scheduled = false
            defer { items.removeAll(keepingCapacity: true) }
            return items
        }
        for (c, v) in batch { c.answered(v) }
    }
}
