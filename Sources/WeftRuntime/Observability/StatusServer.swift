import CoreMetrics
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import WeftCore

/// What a status page shows: each page's data as a JSON object.
public protocol StatusSource: AnyObject, Sendable {
    /// `overview` (nodes: role, health, uptime, address, data size) or
    /// `transactions` (in-doubt transactions, recent commit latency); nil
    /// for an unknown page. May block briefly (asks the nodes' threads).
    func statusPage(_ name: String) -> [String: Any]?
}

/// The status port (`--http-port`): `GET /metrics` (Prometheus text
/// format), and pages as HTML (`/`, `/transactions`) and as JSON
/// (`/api/overview`, `/api/transactions`), on SwiftNIO's HTTP/1.
///
/// Every request proves the client secret (the hex line of
/// `client.secret`): `Authorization: Bearer SECRET`, or `?token=SECRET`
/// once (the page then sets an HttpOnly cookie). Bounded by
/// `Limits.httpRequestBytesMax`, `httpIdleMillisMax` and
/// `httpConnectionsMax`.
public final class StatusServer: @unchecked Sendable {
    /// Set once the owner is built; until then pages answer 503.
    public var source: StatusSource? {
        get { lock.withLock { sourceRef } }
        set { lock.withLock { sourceRef = newValue } }
    }
    weak var sourceRef: StatusSource?
    let token: String?
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    var channel: Channel?
    let lock = NSLock()
    var open = 0
    /// Pages built above this layer (e.g. `tables`, from the dataflow
    /// catalog), by name; asked before `source`.
    var pages: [String: @Sendable () -> [String: Any]?] = [:]

    public func addPage(_ name: String, _ build: @escaping @Sendable () -> [String: Any]?) {
        lock.withLock { pages[name] = build }
    }

    /// `token`: the secret every request must show; nil serves anyone
    /// (tests of the server alone).
    public init(token: String?) {
        self.token = token
    }

    public func listen(_ endpoint: Endpoint) throws(WeftError) {
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { [self] channel in
                let admitted: Bool = lock.withLock {
                    if open >= Limits.httpConnectionsMax { return false }
                    open += 1
                    return true
                }
                guard admitted else { return channel.close() }
                channel.closeFuture.whenComplete { [self] _ in lock.withLock { open -= 1 } }
                return channel.pipeline.configureHTTPServerPipeline(withErrorHandling: true).flatMap {
                    channel.pipeline.addHandler(StatusHandler(server: self))
                }
            }
        do {
            channel = try bootstrap.bind(host: endpoint.host, port: endpoint.port).wait()
        } catch {
            let text = "\(error)"
            if text.contains("Address already in use") || text.contains("errno: 98") {
                throw WeftError(.unavailable, "status port \(endpoint.port) on \(endpoint.host) is already in use by another process; pick another --http-port")
            }
            throw WeftError(.unavailable, "cannot listen on \(endpoint) for the status page: \(text)")
        }
    }

    public var boundPort: Int? { channel?.localAddress?.port }

    public func close() {
        try? channel?.close().wait()
        try? group.syncShutdownGracefully()
    }

    let requests = CoreMetrics.Counter(label: "weft_http_requests_total", dimensions: [("path", "all"), ("code", "all")])
}

final class StatusHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let server: StatusServer
    var head: HTTPRequestHead?
    var bytes = 0
    var tooBig = false
    var idle: Scheduled<Void>?

    init(server: StatusServer) { self.server = server }

    func channelActive(context: ChannelHandlerContext) {
        armIdle(context)
        context.fireChannelActive()
    }

    /// A client that sends nothing for `httpIdleMillisMax` is closed.
    func armIdle(_ context: ChannelHandlerContext) {
        idle?.cancel()
        let channel = context.channel
        idle = context.eventLoop.scheduleTask(in: .milliseconds(Limits.httpIdleMillisMax)) { channel.close(promise: nil) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        idle?.cancel()
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        armIdle(context)
        switch unwrapInboundIn(data) {
        case .head(let h):
            head = h
            bytes = h.uri.utf8.count + h.headers.reduce(0) { $0 + $1.name.utf8.count + $1.value.utf8.count + 4 }
            tooBig = bytes > Limits.httpRequestBytesMax
        case .body(let b):
            bytes += b.readableBytes
            if bytes > Limits.httpRequestBytesMax { tooBig = true }
        case .end:
            guard let h = head else { return }
            head = nil
            if tooBig {
                return respond(context, h, .payloadTooLarge, "text/plain", Array("request over Limits.httpRequestBytesMax (\(Limits.httpRequestBytesMax) bytes)\n".utf8), close: true)
            }
            route(context, h)
        }
    }

    func route(_ context: ChannelHandlerContext, _ h: HTTPRequestHead) {
        guard h.method == .GET || h.method == .HEAD else {
            return respond(context, h, .methodNotAllowed, "text/plain", Array("only GET and HEAD\n".utf8))
        }
        let (path, query) = split(h.uri)
        var setCookie: String?
        if let want = server.token {
            let bearer = h.headers["authorization"].first.flatMap { $0.hasPrefix("Bearer ") ? String($0.dropFirst(7)) : nil }
            let cookie = h.headers["cookie"].flatMap { $0.split(separator: ";") }.map { $0.trimmingCharacters(in: .whitespaces) }
                .first { $0.hasPrefix("weft_token=") }.map { String($0.dropFirst("weft_token=".count)) }
            let given = bearer ?? query["token"] ?? cookie
            guard let given, Crypto.equal(Array(given.utf8), Array(want.utf8)) else {
                return respond(context, h, .unauthorized, "text/plain",
                               Array("authentication required: send the client secret (the hex line of client.secret) as `Authorization: Bearer SECRET` or ?token=SECRET\n".utf8),
                               extra: [("WWW-Authenticate", "Bearer")])
            }
            if query["token"] != nil { setCookie = "weft_token=\(given); HttpOnly; SameSite=Strict; Path=/" }
        }
        let extra = setCookie.map { [("Set-Cookie", $0)] } ?? []
        switch path {
        case "/metrics":
            let body = WeftMetrics.exposition()
            respond(context, h, .ok, "text/plain; version=0.0.4; charset=utf-8", body, extra: extra)
        case "/", "/overview", "/transactions", "/api/overview", "/api/transactions", "/jobs", "/api/jobs", "/tables", "/api/tables",
             _ where path.hasPrefix("/jobs/") || path.hasPrefix("/api/jobs/"):
            let json = path.hasPrefix("/api/")
            let page = json ? String(path.dropFirst(4)) : path
            let name: String
            if page.hasPrefix("/jobs/") { name = "job/" + page.dropFirst(6) } else if page == "/jobs" { name = "jobs" } else if page == "/tables" { name = "tables" } else {
                name = page.hasSuffix("transactions") ? "transactions" : "overview"
            }
            let provider = server.lock.withLock { server.pages[name] }
            let loop = context.eventLoop
            let bound = NIOLoopBound(context, eventLoop: loop)
            guard let source = server.source else {
                return respond(context, h, .serviceUnavailable, "text/plain", Array("starting\n".utf8))
            }
            // The nodes' threads are asked off the event loop.
            DispatchQueue.global().async { [self] in
                guard let data = provider?() ?? source.statusPage(name) else {
                    return loop.execute { self.respond(bound.value, h, .notFound, "text/plain", Array("no \(name)\n".utf8)) }
                }
                let body = json ? StatusPages.json(data) : Array(StatusPages.html(name, data).utf8)
                loop.execute {
                    self.respond(bound.value, h, .ok, json ? "application/json" : "text/html; charset=utf-8", body, extra: extra)
                }
            }
        default:
            respond(context, h, .notFound, "text/plain", Array("no page \(path); try /, /transactions, /jobs, /tables, /metrics, /api/overview, /api/transactions, /api/jobs, /api/tables\n".utf8))
        }
    }

    func split(_ uri: String) -> (String, [String: String]) {
        guard let q = uri.firstIndex(of: "?") else { return (uri, [:]) }
        var out: [String: String] = [:]
        for pair in uri[uri.index(after: q)...].split(separator: "&") {
            let kv = pair.split(separator: "=", maxSplits: 1)
            if kv.count == 2 { out[String(kv[0])] = String(kv[1]).removingPercentEncoding ?? String(kv[1]) }
        }
        return (String(uri[..<q]), out)
    }

    func respond(_ context: ChannelHandlerContext, _ h: HTTPRequestHead, _ status: HTTPResponseStatus, _ type: String, _ body: [UInt8],
                 extra: [(String, String)] = [], close: Bool = false) {
        var headers = HTTPHeaders([("Content-Type", type), ("Content-Length", String(body.count)), ("Cache-Control", "no-store")] + extra)
        let keepAlive = h.isKeepAlive && !close
        headers.add(name: "Connection", value: keepAlive ? "keep-alive" : "close")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: status, headers: headers))), promise: nil)
        if h.method != .HEAD {
            var buf = context.channel.allocator.buffer(capacity: body.count)
            buf.writeBytes(body)
            context.write(wrapOutboundOut(.body(.byteBuffer(buf))), promise: nil)
        }
        let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !keepAlive { done.whenComplete { _ in context.close(promise: nil) } }
    }
}

/// Rendering of the pages' data: JSON as is, HTML as plain tables.
enum StatusPages {
    static func json(_ o: [String: Any]) -> [UInt8] {
        Array((try? JSONSerialization.data(withJSONObject: o, options: [.sortedKeys, .withoutEscapingSlashes])) ?? Data("{}".utf8))
    }

    /// Recent commit latency quantiles in ms, for the pages.
    static func latency(_ q: [String: Double]) -> [String: Any] {
        var o: [String: Any] = ["count": Int(q["count"] ?? 0)]
        for k in ["p50", "p95", "p99", "max"] { if let v = q[k] { o[k + "_ms"] = (v * 1e6).rounded() / 1e3 } }
        return o
    }

    static func esc(_ s: Any) -> String {
        "\(s)".replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "\"", with: "&quot;")
    }

    static func jobTable(_ rows: [[String: Any]]) -> String {
        var s = "<table id=\"jobs\"><tr><th>id</th><th>job</th><th>input</th><th>state</th><th>duration_ms</th><th>stages</th><th>tasks</th></tr>\n"
        for r in rows {
            let id = esc(r["id"] ?? "")
            s += "<tr><td><a href=\"/jobs/\(id)\">\(id)</a></td>" + ["job", "input", "state", "duration_ms", "stages", "tasks"].map { "<td>\(esc(r[$0] ?? ""))</td>" }.joined() + "</tr>\n"
        }
        return s + "</table>\n"
    }

    /// The stages as boxes joined by arrows, in the order they ran: each
    /// map stage feeds the stages after it through its shuffle.
    static func dag(_ stages: [[String: Any]]) -> String {
        guard !stages.isEmpty else { return "<p>No stage ran.</p>\n" }
        let w = 230, h = 70, gap = 40
        var s = "<svg id=\"dag\" xmlns=\"http://www.w3.org/2000/svg\" width=\"\(stages.count * (w + gap))\" height=\"\(h + 20)\">\n"
        s += "<defs><marker id=\"arrow\" markerWidth=\"10\" markerHeight=\"7\" refX=\"10\" refY=\"3.5\" orient=\"auto\"><polygon points=\"0 0, 10 3.5, 0 7\"/></marker></defs>\n"
        for (i, st) in stages.enumerated() {
            let x = i * (w + gap) + 5
            let name = "\(st["name"] ?? "")"
            let short = name.count > 34 ? String(name.prefix(33)) + "…" : name
            let secs = (st["seconds"] as? Double).map { String(format: "%.3f s", $0) } ?? ""
            s += "<g class=\"stage\"><rect x=\"\(x)\" y=\"10\" width=\"\(w)\" height=\"\(h)\" rx=\"6\" fill=\"#eef4ff\" stroke=\"#4a6fa5\"/>"
            s += "<text x=\"\(x + 8)\" y=\"30\" font-size=\"12\">stage \(i + 1): \(esc(short))</text>"
            s += "<text x=\"\(x + 8)\" y=\"50\" font-size=\"12\">\(esc(st["tasks"] ?? 0)) tasks · \(esc(secs))</text>"
            s += "<text x=\"\(x + 8)\" y=\"68\" font-size=\"11\">task p50 \(esc(st["task_p50_ms"] ?? 0)) ms · max \(esc(st["task_max_ms"] ?? 0)) ms</text></g>\n"
            if i + 1 < stages.count {
                s += "<line x1=\"\(x + w)\" y1=\"\(10 + h / 2)\" x2=\"\(x + w + gap - 2)\" y2=\"\(10 + h / 2)\" stroke=\"#333\" marker-end=\"url(#arrow)\"/>\n"
            }
        }
        return s + "</svg>\n"
    }

    static func table(_ id: String, _ columns: [String], _ rows: [[String: Any]]) -> String {
        var s = "<table id=\"\(id)\"><tr>" + columns.map { "<th>\(esc($0))</th>" }.joined() + "</tr>\n"
        for r in rows { s += "<tr>" + columns.map { "<td>\(esc(r[$0] ?? ""))</td>" }.joined() + "</tr>\n" }
        return s + "</table>\n"
    }

    static func html(_ name: String, _ o: [String: Any]) -> String {
        var body = "<nav><a href=\"/\">Overview</a> · <a href=\"/transactions\">Transactions</a> · <a href=\"/jobs\">Jobs</a> · <a href=\"/tables\">Tables</a> · <a href=\"/metrics\">Metrics</a></nav>\n"
        switch name {
        case "tables":
            body += "<h1>Tables</h1>\n"
            if let e = o["error"] { body += "<p id=\"tables-error\">\(esc(e))</p>\n" }
            let rows = (o["tables"] as? [[String: Any]] ?? []).map { r -> [String: Any] in
                var r = r
                let per = r["blocks_per_participant"] as? [String: Any] ?? [:]
                r["blocks_per_participant"] = per.keys.sorted().map { "\($0): \(per[$0]!)" }.joined(separator: ", ")
                return r
            }
            body += rows.isEmpty ? "<p id=\"no-tables\">No table is committed.</p>\n"
                : table("tables", ["table", "rows", "format", "layout", "generation", "committed_ts", "partitions", "blocks", "bytes", "replicas",
                                   "blocks_per_participant", "written_by"], rows)
        case "jobs":
            body += "<h1>Jobs</h1>\n"
            let rows = (o["jobs"] as? [[String: Any]] ?? []).map { r -> [String: Any] in
                var r = r
                r["id"] = r["id"] ?? ""
                return r
            }
            body += rows.isEmpty ? "<p id=\"no-jobs\">No job has run in this process yet.</p>\n"
                : jobTable(rows)
        case _ where name.hasPrefix("job/"):
            body += "<h1>Job \(esc(o["id"] ?? "")): \(esc(o["job"] ?? "")) of \(esc(o["input"] ?? ""))</h1>\n"
            body += "<p id=\"job-state\">\(esc(o["state"] ?? "")) · \(esc(o["duration_ms"] ?? 0)) ms · \(esc(o["tasks"] ?? 0)) tasks · \(esc(o["task_retries"] ?? 0)) retries · \(esc(o["recomputed_partitions"] ?? 0)) partitions recomputed · \(esc(o["bytes_spilled"] ?? 0)) bytes spilled</p>\n"
            let stages = o["stage_list"] as? [[String: Any]] ?? []
            body += dag(stages)
            body += table("stages", ["index", "name", "tasks", "seconds", "task_p50_ms", "task_p95_ms", "task_max_ms", "retries",
                                     "recomputed_partitions", "bytes_spilled", "shuffle_bytes_written", "shuffle_bytes_fetched"], stages)
        case "transactions":
            body += "<h1>Transactions</h1>\n<h2>In doubt</h2>\n"
            let rows = o["in_doubt"] as? [[String: Any]] ?? []
            body += rows.isEmpty ? "<p id=\"none-in-doubt\">No transaction is in doubt.</p>\n"
                : table("in-doubt", ["txn", "participant", "participants", "age_ms", "commit_ts", "coordinator"], rows)
            body += "<h2>Recent commit latency</h2>\n"
            let q = o["commit_latency"] as? [String: Any] ?? [:]
            body += table("latency", ["count", "p50_ms", "p95_ms", "p99_ms", "max_ms"], [q])
        default:
            body += "<h1>Weft</h1>\n"
            body += table("nodes", ["id", "role", "state", "address", "uptime_ms", "data_bytes", "map_bytes"], o["nodes"] as? [[String: Any]] ?? [])
        }
        return "<!doctype html><html><head><meta charset=\"utf-8\"><title>Weft · \(esc(name))</title>"
            + "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}</style>"
            + "</head><body>\n" + body + "</body></html>\n"
    }
}
