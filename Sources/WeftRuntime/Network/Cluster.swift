import CoreMetrics
import Foundation
import WeftCore
import WeftProtocol

/// A cluster file: the cluster's id and, for each node, its role, id,
/// address and data directory. Participants are numbered in file order.
///
/// ```
/// cluster-id 5c1d0e2a9b7f4e31
/// node coordinator coordinator 127.0.0.1:7400 /srv/weft/coordinator
/// node participant participant-0 127.0.0.1:7401 /srv/weft/participant-0 redis=6380
/// ```
///
/// A node line may end with `redis=PORT`: the node also serves Redis
/// clients on that port of its host.
public struct ClusterConfig: Sendable, Equatable {
    public enum Role: String, Sendable { case coordinator, participant }

    public struct Node: Sendable, Equatable {
        public var role: Role
        public var id: String
        public var endpoint: Endpoint
        public var dataDir: String
        public var address: NodeAddress
        /// Where this node serves Redis clients (`redis=PORT` on its line), if it does.
        public var redisPort: Int?
        /// Its status port (`http=PORT`): metrics and pages.
        public var httpPort: Int?
    }

    public var clusterId: String
    public var nodes: [Node]
    public var path: String
    /// Every connection uses TLS (a `tls on` line), with the certificates
    /// in `certsDirectory`.
    public var tls = false
    public var certsDirectory: String { clusterDirectory + "/certs" }

    public var participantCount: Int { nodes.filter { $0.role == .participant }.count }
    public var directory: [NodeAddress: Endpoint] { Dictionary(uniqueKeysWithValues: nodes.map { ($0.address, $0.endpoint) }) }
    public var clusterDirectory: String { (path as NSString).deletingLastPathComponent }

    public static let fileName = "cluster.conf"

    /// Accepts a cluster file or the directory holding `cluster.conf`.
    public static func load(_ dirOrFile: String) throws(WeftError) -> ClusterConfig {
        var isDir: ObjCBool = false
        let path = FileManager.default.fileExists(atPath: dirOrFile, isDirectory: &isDir) && isDir.boolValue ? dirOrFile + "/" + fileName : dirOrFile
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw WeftError(.notFound, "cannot read cluster file \(path); create one with `weft cluster start --dir DIR`")
        }
        return try parse(text, path: path)
    }

    public static func parse(_ text: String, path: String) throws(WeftError) -> ClusterConfig {
        var clusterId: String?
        var tls = false
        var nodes: [Node] = []
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") { continue }
            let f = line.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
            func bad(_ why: String) -> WeftError { WeftError(.invalidArgument, "\(path):\(i + 1): \(why)") }
            switch f[0] {
            case "cluster-id":
                guard f.count == 2 else { throw bad("expected `cluster-id ID`") }
                clusterId = f[1]
            case "tls":
                guard f.count == 2, f[1] == "on" || f[1] == "off" else { throw bad("expected `tls on` or `tls off`") }
                tls = f[1] == "on"
            case "node":
                guard (5...7).contains(f.count), let role = Role(rawValue: f[1]) else { throw bad("expected `node coordinator|participant ID HOST:PORT DATADIR [redis=PORT] [http=PORT]`") }
                var redisPort: Int?
                var httpPort: Int?
                for extra in f.dropFirst(5) {
                    if extra.hasPrefix("redis="), let rp = Int(extra.dropFirst(6)), (1...65535).contains(rp), redisPort == nil {
                        redisPort = rp
                    } else if extra.hasPrefix("http="), let hp = Int(extra.dropFirst(5)), (1...65535).contains(hp), httpPort == nil {
                        httpPort = hp
                    } else {
                        throw bad("expected `redis=PORT` or `http=PORT` after the data directory, not \(extra)")
                    }
                }
                let hp = f[3].split(separator: ":")
                guard hp.count == 2, let port = Int(hp[1]), (1...65535).contains(port) else { throw bad("bad address \(f[3])") }
                if nodes.contains(where: { $0.id == f[2] }) { throw bad("duplicate node id \(f[2])") }
                let address: NodeAddress = role == .coordinator ? .coordinator : .participant(nodes.filter { $0.role == .participant }.count)
                nodes.append(Node(role: role, id: f[2], endpoint: Endpoint(host: String(hp[0]), port: port), dataDir: f[4], address: address, redisPort: redisPort, httpPort: httpPort))
            default:
                throw bad("unknown line `\(f[0])`")
            }
        }
        guard let clusterId else { throw WeftError(.invalidArgument, "\(path): missing `cluster-id`") }
        guard nodes.filter({ $0.role == .coordinator }).count == 1 else { throw WeftError(.invalidArgument, "\(path): needs exactly one coordinator") }
        guard !nodes.filter({ $0.role == .participant }).isEmpty else { throw WeftError(.invalidArgument, "\(path): needs at least one participant") }
        var config = ClusterConfig(clusterId: clusterId, nodes: nodes, path: path)
        config.tls = tls
        return config
    }

    public func render() -> String {
        var s = "# Weft cluster file: node ROLE ID HOST:PORT DATADIR\ncluster-id \(clusterId)\n" + (tls ? "tls on\n" : "")
        for n in nodes { s += "node \(n.role.rawValue) \(n.id) \(n.endpoint) \(n.dataDir)" + (n.redisPort.map { " redis=\($0)" } ?? "") + (n.httpPort.map { " http=\($0)" } ?? "") + "\n" }
        return s
    }

    /// A client's TLS (its `client.crt`), if the cluster uses TLS.
    public func clientTLS(certsDir: String? = nil) throws(WeftError) -> TLSSetup? {
        tls ? try TLSSetup(files: CertFiles(certsDir ?? certsDirectory), asNode: false) : nil
    }

    public func node(_ id: String) throws(WeftError) -> Node {
        guard let n = nodes.first(where: { $0.id == id }) else {
            throw WeftError(.invalidArgument, "node id \(id) is not in cluster file \(path) (its nodes: \(nodes.map(\.id).joined(separator: ", ")))")
        }
        return n
    }

    /// A fresh local cluster: a coordinator and `participants` participants
    /// on consecutive ports of 127.0.0.1, data under `dir`.
    /// With `redisBasePort`, node i (the coordinator first) also serves
    /// Redis clients on `redisBasePort + i`.
    public static func local(dir: String, participants: Int, basePort: Int, redisBasePort: Int? = nil) -> ClusterConfig {
        let abs = URL(fileURLWithPath: dir).standardizedFileURL.path
        var nodes = [Node(role: .coordinator, id: "coordinator", endpoint: Endpoint(host: "127.0.0.1", port: basePort), dataDir: abs + "/coordinator", address: .coordinator,
                          redisPort: redisBasePort)]
        for p in 0..<participants {
            nodes.append(Node(role: .participant, id: "participant-\(p)", endpoint: Endpoint(host: "127.0.0.1", port: basePort + 1 + p), dataDir: abs + "/participant-\(p)", address: .participant(p),
                              redisPort: redisBasePort.map { $0 + 1 + p }))
        }
        let id = String(UInt64.random(in: 1...UInt64.max), radix: 16)
        return ClusterConfig(clusterId: id, nodes: nodes, path: abs + "/" + fileName)
    }
}

/// One node of a cluster, as an OS process: its LMDB environment, its state
/// machine in a `NodeRunner`, and a `NetworkTransport` listening on its port.
public final class ClusterNode: @unchecked Sendable {
    public let config: ClusterConfig
    public let spec: ClusterConfig.Node
    let lock: DataDirectoryLock
    let transport: NetworkTransport
    var coordinatorRunner: NodeRunner<CoordinatorMachine>?
    var participantRunner: NodeRunner<ParticipantMachine>?
    var coordinatorStorage: CoordinatorStorage?
    var participantStorage: ParticipantStorage?
    public let recoveryMillis: UInt64
    let startedMillis = wallMillis()
    /// The Redis front end (`startRedis`) and the cluster client it uses.
    var redis: RedisFrontEnd?
    /// The status port (`startHTTP`).
    var http: StatusServer?
    /// Jobs reported by drivers (on the coordinator), for the jobs pages.
    public let jobs = JobBoard()
    var mapGauges: MapUsageGauges?
    var redisClient: ClusterClient?
    var pagesClientRef: ClusterClient?
    let pagesLock = NSLock()

    /// What this node proves to its peers and checks on every connection.
    public let credentials: Credentials

    /// `secretFile`: the node secret, else `secret` in the cluster's directory.
    /// TLS of this node's connections (the cluster file's `tls on`).
    public let tls: TLSSetup?

    public init(config: ClusterConfig, id: String, options: StorageOptions = .init(), secretFile: String? = nil, certsDir: String? = nil) throws(WeftError) {
        let started = wallMillis()
        WeftMetrics.bootstrap()
        self.config = config
        spec = try config.node(id)
        let nodeKey: Bytes
        if let secretFile { nodeKey = try ClusterSecret.read(secretFile) } else { nodeKey = try ClusterSecret.nodeKey(dir: config.clusterDirectory, create: false) }
        credentials = Credentials(clusterId: config.clusterId, nodeKey: nodeKey)
        tls = config.tls ? try TLSSetup(files: CertFiles(certsDir ?? config.certsDirectory), asNode: true) : nil
        lock = try DataDirectoryLock(directory: spec.dataDir)
        try Self.checkIdentity(dir: spec.dataDir, clusterId: config.clusterId, nodeId: id)
        transport = NetworkTransport(me: spec.address, credentials: credentials, directory: config.directory, tls: tls)
        let now = wallMillis()
        switch spec.role {
        case .coordinator:
            let s = try CoordinatorStorage(directory: spec.dataDir + "/lmdb", options: options)
            coordinatorStorage = s
            let machine = CoordinatorMachine(recovery: try s.recover(), nowMillis: now)
            coordinatorRunner = NodeRunner(address: .coordinator, machine: machine, router: transport) { (r) throws(WeftError) in try s.persist(r) }
            coordinatorRunner!.observer = CoordinatorObserver()
            mapGauges = MapUsageGauges([(.coordinator, s.env)])
            transport.register(.coordinator, coordinatorRunner!)
        case .participant:
            guard case .participant(let p) = spec.address else { preconditionFailure() }
            let s = try ParticipantStorage(directory: spec.dataDir + "/lmdb", options: options)
            participantStorage = s
            // readFloor nil: the participant asks the coordinator's clock
            // before it accepts a PREPARE (see ParticipantMachine).
            let machine = try s.recoverMachine(id: p, readFloor: nil, nowMillis: now)
            let gauges = InDoubtGauges(spec.address)
            participantRunner = NodeRunner(address: spec.address, machine: machine, router: transport,
                                           summarize: { m in
                                               gauges.update(m)
                                               return m.awaitingClock ? "recovering" : "serving"
                                           }) { (r) throws(WeftError) in try s.persist(r) }
            mapGauges = MapUsageGauges([(spec.address, s.env)])
            let t = transport
            participantRunner!.onSent = logFutureTimestampRefusals { t.log($0, .warning) }
            transport.register(spec.address, participantRunner!)
        }
        recoveryMillis = wallMillis() - started
        CoreMetrics.Gauge(label: "weft_recovery_seconds", dimensions: [("node", id)]).record(Double(recoveryMillis) / 1000)
        let role = spec.role.rawValue, nodeId = id
        transport.healthInfo = { [weak self] in
            let state = self?.healthState() ?? "stopping"
            let used = self?.mapGauges?.entries.first?.0.usage()?.usedBytes ?? 0
            return "{\"role\":\"\(role)\",\"id\":\"\(nodeId)\",\"pid\":\(getpid()),\"state\":\"\(state)\",\"started_ms\":\(started),\"data_bytes\":\(used)}"
        }
        if spec.role == .coordinator {
            // Drivers report their jobs here, for the jobs pages.
            transport.onCall = { [weak self] call in
                guard let self else { return call.reply(false, Array("{\"error\":\"unavailable\",\"message\":\"stopping\"}".utf8)) }
                self.handleJobReport(call)
            }
        }
        do {
            try transport.listen(spec.endpoint)
        } catch {
            transport.close()
            throw error
        }
        coordinatorRunner?.start()
        participantRunner?.start()
    }

    public func healthState() -> String {
        if let r = participantRunner {
            if r.failure != nil { return "failed" }
            return r.summary
        }
        if let r = coordinatorRunner, r.failure != nil { return "failed" }
        return "serving"
    }

    /// A data directory remembers which cluster and node it belongs to, so
    /// a node started with the wrong cluster file refuses to touch it.
    static func checkIdentity(dir: String, clusterId: String, nodeId: String) throws(WeftError) {
        let path = dir + "/node.id"
        let want = "cluster-id \(clusterId)\nnode \(nodeId)\n"
        if let have = try? String(contentsOfFile: path, encoding: .utf8) {
            if have != want {
                let lines = have.split(separator: "\n")
                throw WeftError(.invalidArgument, "data directory \(dir) belongs to another cluster or node (\(lines.joined(separator: ", "))), not cluster-id \(clusterId) node \(nodeId)")
            }
            return
        }
        do { try want.write(toFile: path, atomically: true, encoding: .utf8); chmod(path, 0o600) } catch {
            throw WeftError(.readOnly, "cannot write \(path): \(error.localizedDescription)")
        }
    }

    /// Serves Redis clients on `port` of this node's host. Their commands
    /// are transactions of the whole cluster, through a client of it in
    /// this process, so any node answers for every key.
    public func startRedis(port: Int, password: String?) throws(WeftError) -> Endpoint {
        let cc = ClusterClient(config: config, credentials: credentials, tls: tls)
        let fe = RedisFrontEnd(client: cc.client, password: password ?? credentials.redisPassword)
        let (role, nodeId) = (spec.role.rawValue, spec.id)
        fe.infoLines = { ["weft_role:\(role)", "weft_node:\(nodeId)"] }
        do {
            try fe.listen(Endpoint(host: spec.endpoint.host, port: port))
        } catch {
            fe.close()
            cc.close()
            throw error
        }
        redis = fe
        redisClient = cc
        return Endpoint(host: spec.endpoint.host, port: fe.boundPort ?? port)
    }

    /// Serves the status pages and /metrics on `port` of this node's host;
    /// requests show the cluster's client secret.
    public func startHTTP(port: Int) throws(WeftError) -> Endpoint {
        let status = StatusServer(token: credentials.redisPassword)
        try status.listen(Endpoint(host: spec.endpoint.host, port: port))
        status.source = self
        http = status
        return Endpoint(host: spec.endpoint.host, port: status.boundPort ?? port)
    }

    /// A client of the cluster for the status pages, made on first use.
    func pagesClient() -> WeftClient {
        pagesLock.withLock {
            if let c = pagesClientRef { return c.client }
            let c = makeClient()
            pagesClientRef = c
            return c.client
        }
    }

    /// The status pages' server, once `startHTTP` ran.
    public var statusServer: StatusServer? { http }

    /// Answers calls from clients and peers (a participant's executor).
    public var onCall: (@Sendable (ServerCall) -> Void)? {
        get { transport.onCall }
        set { transport.onCall = newValue }
    }

    /// Calls `method` on another node of the cluster (a peer executor).
    public func call(to: NodeAddress, _ method: String, _ body: Bytes, timeoutMillis: Int64? = nil) async throws -> (ok: Bool, body: Bytes) {
        try await transport.call(to: to, method, body, timeoutMillis: timeoutMillis)
    }

    /// A client of this cluster in this process (an executor reads table
    /// blocks through it), proving the client secret.
    public func makeClient() -> ClusterClient {
        ClusterClient(config: config, credentials: Credentials(clusterId: config.clusterId, clientKey: credentials.clientKey), tls: tls)
    }

    /// Stops after the current round and releases the data directory.
    public func stop() {
        http?.close()
        mapGauges?.stop()
        redis?.close()
        redisClient?.close()
        pagesLock.withLock { pagesClientRef?.close() }
        coordinatorRunner?.stop()
        participantRunner?.stop()
        transport.close()
        coordinatorStorage?.close()
        participantStorage?.close()
        lock.release()
    }

    public var failure: WeftError? { coordinatorRunner?.failure ?? participantRunner?.failure }

    /// Called once if the node stops on a storage failure (disk full, map
    /// at its limit): its memory may be ahead of its disk, so the process
    /// should exit and be restarted, which recovers from the disk.
    public var onFailure: @Sendable (WeftError) -> Void {
        get { transport.onNodeFailed }
        set { transport.onNodeFailed = newValue }
    }
}

extension ClusterNode: StatusSource {
    /// `jobs.report` calls from drivers (`weft job run --cluster`), on the
    /// coordinator: JSON `{"event": "start", "job", "input"}` answered with
    /// `{"id", "url"}`; `{"event": "progress", "id", "stage", "stages",
    /// "tasks_done", "tasks"}`; `{"event": "finish", "id", "result",
    /// "error"}` with the job's JSON answer. The jobs pages show them.
    func handleJobReport(_ call: ServerCall) {
        func answer(_ o: [String: Any]) { call.reply(true, Array(StatusPages.json(o))) }
        func refuse(_ code: String, _ message: String) { call.reply(false, Array(StatusPages.json(["error": code, "message": message]))) }
        guard call.method == "jobs.report" else { return refuse("invalid-argument", "unknown call \(call.method) on the coordinator") }
        guard let o = (try? JSONSerialization.jsonObject(with: Data(call.body))) as? [String: Any], let event = o["event"] as? String else {
            return refuse("malformed", "a jobs.report body is a JSON object with an event")
        }
        let n = { (k: String) in (o[k] as? NSNumber)?.intValue ?? 0 }
        switch event {
        case "start":
            guard let id = jobs.startReported(name: String("\(o["job"] ?? "?")".prefix(200)), input: String("\(o["input"] ?? "")".prefix(200))) else {
                return refuse("unavailable", "\(JobBoard.reportedRunningMax) reported jobs are running (JobBoard.reportedRunningMax)")
            }
            var a: [String: Any] = ["id": id]
            if let h = http?.boundPort { a["url"] = "http://\(spec.endpoint.host):\(h)/jobs/\(id)" }
            answer(a)
        case "progress":
            jobs.progress(n("id"), stage: n("stage"), stages: n("stages"), tasksDone: n("tasks_done"), tasks: n("tasks"))
            answer([:])
        case "finish":
            jobs.finish(n("id"), result: o["result"] as? [String: Any], error: o["error"] as? String)
            answer([:])
        default:
            refuse("invalid-argument", "unknown jobs.report event \(event)")
        }
    }

    public func statusPage(_ name: String) -> [String: Any]? {
        switch name {
        case "jobs":
            return ["jobs": jobs.list, "note": spec.role == .coordinator ? "jobs reported by their drivers (weft job run --cluster)" : "jobs are listed on the coordinator's page"]
        case _ where name.hasPrefix("job/"):
            return Int(name.dropFirst(4)).flatMap { jobs.job($0) }
        case "overview":
            // Every node of the cluster file, as its health ping reports it.
            let nodes: [[String: Any]] = config.nodes.map { n in
                var row: [String: Any] = ["id": n.id, "role": n.role.rawValue, "address": "\(n.endpoint)", "state": "down"]
                if n.id == spec.id {
                    row["state"] = healthState()
                    row["pid"] = Int(getpid())
                    if let u = mapGauges?.entries.first?.0.usage() {
                        row["data_bytes"] = u.usedBytes
                        row["map_bytes"] = u.mapSizeBytes
                    }
                } else if let info = NetworkTransport.ping(n.endpoint, credentials: Credentials(clusterId: config.clusterId, clientKey: credentials.clientKey), tls: tls, timeoutMillis: 500),
                          let o = try? JSONSerialization.jsonObject(with: Data(info.utf8)) as? [String: Any] {
                    row["state"] = o["state"] ?? "up"
                    row["pid"] = o["pid"]
                    row["data_bytes"] = o["data_bytes"]
                    if let s = o["started_ms"] as? Int { row["uptime_ms"] = Int(wallMillis()) - s }
                }
                if n.id == spec.id { row["uptime_ms"] = Int(wallMillis() - startedMillis) }
                if let h = n.httpPort { row["http"] = "\(n.endpoint.host):\(h)" }
                return row
            }
            return ["nodes": nodes, "recovery_ms": Int(recoveryMillis), "this_node": spec.id]
        case "transactions":
            // This node's own view: a participant's in-doubt transactions
            // (the coordinator's decision is in the coordinator's page).
            let now = wallMillis()
            var rows: [[String: Any]] = []
            if let r = participantRunner, case .participant(let p) = spec.address {
                let held = r.withMachine { $0.inDoubt }
                // The coordinator's decision, asked of the coordinator only
                // (asking participants could refuse a transaction: a page
                // view must change nothing), for the first 50.
                var decisions: [TxnId: String] = [:]
                if !held.isEmpty {
                    let client = pagesClient()
                    for t in held.prefix(50) {
                        let box = DecisionBox()
                        let done = DispatchSemaphore(value: 0)
                        Task {
                            if case let .statusResult(_, _, s)? = try? await client.call(.coordinator, { .status(req: $0, txn: t.txn) }) {
                                switch s {
                                case .committed: box.value = "commit"
                                case .pending: box.value = "undecided"
                                case .aborted, .unknown: box.value = "none (presumed abort)"
                                }
                            }
                            done.signal()
                        }
                        _ = done.wait(timeout: .now() + .seconds(2))
                        decisions[t.txn] = box.value ?? "coordinator unreachable"
                    }
                }
                rows = held.map { t in
                    ["txn": String(t.txn), "participant": p, "participants": t.participants.map(String.init).joined(separator: ","),
                     "age_ms": Int(now > t.preparedAtMillis ? now - t.preparedAtMillis : 0), "commit_ts": String(t.commitTs),
                     "coordinator": decisions[t.txn] ?? "not asked (over 50 in doubt)"]
                }
            }
            if let c = coordinatorRunner {
                let decided = c.withMachine { m in m.inFlight }
                return ["in_doubt": rows, "coordinator_in_flight": decided,
                        "commit_latency": StatusPages.latency(c.observer?.recentQuantiles() ?? [:])]
            }
            return ["in_doubt": rows, "commit_latency": ["count": 0]]
        default:
            return nil
        }
    }
}

/// A client of a running cluster.
public final class ClusterClient: @unchecked Sendable {
    public let config: ClusterConfig
    let transport: NetworkTransport
    public let client: WeftClient

    public init(config: ClusterConfig, credentials: Credentials, tls: TLSSetup? = nil) {
        self.config = config
        let id = UInt64.random(in: 1...UInt64.max)
        transport = NetworkTransport(me: .client(id), credentials: credentials, directory: config.directory, tls: tls)
        client = WeftClient(id: id, router: transport, participantCount: config.participantCount)
    }

    /// A client proving the cluster's client secret: `secretFile` if
    /// given, else the one in the cluster's directory.
    public convenience init(config: ClusterConfig, secretFile: String?, certsDir: String? = nil) throws(WeftError) {
        let key = try ClusterSecret.clientKey(dir: config.clusterDirectory, secretFile: secretFile)
        self.init(config: config, credentials: Credentials(clusterId: config.clusterId, clientKey: key), tls: try config.clientTLS(certsDir: certsDir))
    }

    /// Calls `method` on a node (a driver's call to an executor).
    public func call(to: NodeAddress, _ method: String, _ body: Bytes, timeoutMillis: Int64? = nil) async throws -> (ok: Bool, body: Bytes) {
        try await transport.call(to: to, method, body, timeoutMillis: timeoutMillis)
    }

    public func close() {
        client.close()
        transport.close()
    }
}

final class DecisionBox: @unchecked Sendable {
    var value: String?
}
