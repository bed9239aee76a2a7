import CoreMetrics
import Foundation
import WeftCore
import WeftProtocol

/// `weft server`: embedded mode kept running behind a TCP listener. One
/// process opens the data directory (its coordinator and participants,
/// recovered once) and keeps it in memory; every CLI command on that
/// directory becomes a thin client speaking the cluster wire protocol.
///
/// Remote clients' envelopes arrive on the listener and are handed to the
/// in-process `Router`; the nodes' replies to a client that is not in this
/// process go back through the listener (`Router.remoteClients`). Where it
/// listens is written to `DIR/SERVER` (see `ServerFile`) once it serves.
public final class WeftServer: @unchecked Sendable {
    public let cluster: EmbeddedCluster
    let transport: NetworkTransport
    public let file: ServerFile
    public let dataDir: String
    /// Milliseconds from the start of `init` until the directory was open (recovery).
    public let openMillis: UInt64

    /// The Redis-protocol listener, when started with `redisListen`.
    public private(set) var redis: RedisFrontEnd?
    /// The status port (metrics and pages), when started with `httpListen`.
    public private(set) var http: StatusServer?

    public init(dataDir: String, listen: Endpoint, participants: Int? = nil, lockWaitMillis: Int = 0,
                redisListen: Endpoint? = nil, redisPassword: String? = nil, tls: Bool = false, httpListen: Endpoint? = nil) throws(WeftError) {
        let started = wallMillis()
        self.dataDir = dataDir
        // A long-lived process: its metrics are recorded (and served with --http-port).
        WeftMetrics.bootstrap()
        // Wait for a one-shot command's lock, but not for another server:
        // one that starts meanwhile is named at once.
        var opened: EmbeddedCluster?
        while opened == nil {
            if case .running(let f) = ServerFile.probe(dataDir) {
                throw WeftError(.locked, "data directory \(dataDir) is already served by weft server pid \(f.pid) at \(f.endpoint); stop it with `weft server stop --data-dir \(dataDir)`")
            }
            do {
                opened = try EmbeddedCluster(dataDir: dataDir, participants: participants, observed: true)
            } catch where error.code == .locked && wallMillis() < started + UInt64(max(0, lockWaitMillis)) {
                usleep(50_000)
            }
        }
        cluster = opened!
        openMillis = wallMillis() - started
        CoreMetrics.Gauge(label: "weft_recovery_seconds", dimensions: [("node", "server")]).record(Double(openMillis) / 1000)
        let id = String(UInt64.random(in: 1...UInt64.max), radix: 16)
        let credentials: Credentials
        let tlsSetup: TLSSetup?
        do {
            credentials = Credentials(clusterId: id, nodeKey: try ClusterSecret.nodeKey(dir: dataDir, create: true))
            tlsSetup = tls ? try TLSSetup(files: CertFiles(dataDir + "/certs"), asNode: true) : nil
        } catch {
            cluster.close()
            throw error
        }
        transport = NetworkTransport(me: .coordinator, credentials: credentials, directory: [:], tls: tlsSetup)
        let forward = ForwardSink(cluster.router)
        transport.register(.coordinator, forward)
        for p in 0..<cluster.layout.participants { transport.register(.participant(p), forward) }
        cluster.router.remoteClients = transport
        do {
            try transport.listen(listen)
        } catch {
            transport.close()
            cluster.close()
            throw error
        }
        var file = ServerFile(pid: getpid(), endpoint: Endpoint(host: listen.host, port: transport.boundPort ?? listen.port), id: id,
                              participants: cluster.layout.participants, startedMillis: started)
        file.tls = tls
        if let redisListen {
            let fe = RedisFrontEnd(client: cluster.client(), password: redisPassword ?? credentials.redisPassword)
            fe.infoLines = { ["weft_role:server", "weft_data_dir:\(dataDir)"] }
            do {
                try fe.listen(redisListen)
            } catch {
                fe.close()
                transport.close()
                cluster.close()
                throw error
            }
            redis = fe
            file.redis = Endpoint(host: redisListen.host, port: fe.boundPort ?? redisListen.port)
        }
        if let httpListen {
            let status = StatusServer(token: credentials.redisPassword)
            do {
                try status.listen(httpListen)
            } catch {
                redis?.close()
                transport.close()
                cluster.close()
                throw error
            }
            http = status
            file.http = Endpoint(host: httpListen.host, port: status.boundPort ?? httpListen.port)
        }
        self.file = file
        http?.source = self
        let (participantCount, dir) = (cluster.layout.participants, dataDir)
        let cluster = self.cluster
        let running = self.running
        transport.healthInfo = {
            var o: [String: Any] = ["role": "server", "pid": Int(getpid()), "participants": participantCount, "data_dir": dir, "started_ms": Int(started)]
            o["state"] = cluster.firstFailure == nil ? "serving" : "failed"
            o["uptime_ms"] = Int(wallMillis() - started)
            o["jobs_running"] = running.value
            let data = (try? JSONSerialization.data(withJSONObject: o, options: [.sortedKeys, .withoutEscapingSlashes])) ?? Data("{}".utf8)
            return String(decoding: data, as: UTF8.self)
        }
        do {
            try file.write(dataDir)
        } catch {
            stop()
            throw error
        }
    }

    /// Stops listening, removes `DIR/SERVER`, and closes the directory
    /// after each node's current round.
    /// Runs clients' calls (`weft job run` through the server): `handler`
    /// gets the method and its JSON body and answers through `reply`.
    public func serveCalls(_ handler: @escaping @Sendable (ServerCall) -> Void) {
        transport.onCall = { [running] call in
            running.add(1)
            handler(ServerCall(method: call.method, body: call.body, clientGone: call.clientGone) { ok, answer in
                running.add(-1)
                call.reply(ok, answer)
            })
        }
    }

    /// Calls (jobs) being served now.
    public let running = CallCount()

    /// Running and recent jobs, for the status pages.
    public let jobs = JobBoard()

    public func stop() {
        http?.close()
        redis?.close()
        transport.close()
        if ServerFile.read(dataDir)?.pid == getpid() { ServerFile.remove(dataDir) }
        cluster.close()
    }
}

extension WeftServer: StatusSource {
    public func statusPage(_ name: String) -> [String: Any]? {
        switch name {
        case "overview":
            var nodes: [[String: Any]] = [["id": "server", "role": "server", "state": cluster.firstFailure == nil ? "serving" : "failed",
                                           "address": "\(file.endpoint)", "uptime_ms": Int(wallMillis() - file.startedMillis),
                                           "pid": Int(getpid()), "data_dir": dataDir]]
            for u in cluster.storageUsage {
                nodes.append(["id": u.node, "role": u.node == "coordinator" ? "coordinator" : "participant", "state": cluster.firstFailure == nil ? "serving" : "failed",
                              "address": "in process \(getpid())", "data_bytes": u.usedBytes, "map_bytes": u.mapSizeBytes])
            }
            return ["nodes": nodes, "recovery_ms": Int(openMillis)]
        case "transactions":
            let now = wallMillis()
            let rows: [[String: Any]] = cluster.inDoubt().map { p, t in
                let decision: String
                switch cluster.coordinatorStatus(t.txn) {
                case .committed: decision = "commit"
                case .pending: decision = "undecided"
                case .aborted, .unknown: decision = "none (presumed abort)"
                }
                return ["txn": String(t.txn), "participant": p, "participants": t.participants.map(String.init).joined(separator: ","),
                        "age_ms": Int(now > t.preparedAtMillis ? now - t.preparedAtMillis : 0), "commit_ts": String(t.commitTs), "coordinator": decision]
            }
            return ["in_doubt": rows, "commit_latency": StatusPages.latency(cluster.coordinatorObserver?.recentQuantiles() ?? [:])]
        case "jobs":
            return ["jobs": jobs.list]
        case _ where name.hasPrefix("job/"):
            return Int(name.dropFirst(4)).flatMap { jobs.job($0) }
        default:
            return nil
        }
    }
}

/// Hands envelopes that arrived over TCP to the in-process router.
final class ForwardSink: MessageSink, @unchecked Sendable {
    let router: Router
    init(_ router: Router) { self.router = router }
    func enqueue(_ env: Envelope) { router.send(env) }
}

/// A client of a running `weft server`: one connection to its address,
/// through which every node is reached.
public final class ServerClient: @unchecked Sendable {
    public let server: ServerFile
    let transport: NetworkTransport
    public let client: WeftClient

    /// `dataDir`: the served directory, whose `client.secret` this client
    /// proves (or `secretFile`).
    public init(_ server: ServerFile, dataDir: String, secretFile: String? = nil, certsDir: String? = nil) throws(WeftError) {
        self.server = server
        let id = UInt64.random(in: 1...UInt64.max)
        var directory: [NodeAddress: Endpoint] = [.coordinator: server.endpoint]
        for p in 0..<server.participants { directory[.participant(p)] = server.endpoint }
        let key = try ClusterSecret.clientKey(dir: dataDir, secretFile: secretFile)
        let tls = server.tls ? try TLSSetup(files: CertFiles(certsDir ?? dataDir + "/certs"), asNode: false) : nil
        transport = NetworkTransport(me: .client(id), credentials: Credentials(clusterId: server.id, clientKey: key), directory: directory, gateway: true, tls: tls)
        client = WeftClient(id: id, router: transport, participantCount: server.participants)
    }

    public func close() {
        client.close()
        transport.close()
    }

    /// Calls `method` on the server with a JSON body; its JSON answer, or
    /// the server's error as a `WeftError`.
    public func call(_ method: String, _ body: Bytes) async throws -> Bytes {
        guard body.count <= Frame.callBodyBytesMax else {
            throw WeftError(.invalidArgument, "a \(method) request of \(body.count) bytes is over Frame.callBodyBytesMax (\(Frame.callBodyBytesMax))")
        }
        _ = try await client.now()   // connects, if not yet
        let (ok, answer) = try await transport.call(method, body)
        if ok { return answer }
        let o = (try? JSONSerialization.jsonObject(with: Data(answer))) as? [String: Any]
        let code = (o?["error"] as? String).flatMap(WeftError.Code.init(rawValue:)) ?? .storage
        throw WeftError(code, o?["message"] as? String ?? String(decoding: answer, as: UTF8.self))
    }
}

/// A counter readable from any thread.
public final class CallCount: @unchecked Sendable {
    let lock = NSLock()
    var n = 0
    func add(_ k: Int) { lock.withLock { n += k } }
    public var value: Int { lock.withLock { n } }
}
