import ArgumentParser
import Foundation
import Logging
import WeftCore
import WeftDataflow
import WeftProtocol
import WeftRuntime

/// `weft node`: runs one node of a cluster in this process until SIGTERM.
struct NodeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "node",
        abstract: "Run one node (coordinator or participant) of a cluster until SIGTERM or SIGINT."
    )
    @Option(help: "The cluster directory or cluster file.") var cluster: String
    @Option(help: "This node's id in the cluster file.") var id: String
    @Option(name: .customLong("secret-file"), help: "The cluster's node secret (default: DIR/secret beside the cluster file).") var secretFile: String?
    @Option(name: .customLong("certs-dir"), help: "This node's TLS certificates (ca.crt, node.crt, node.key) when the cluster uses TLS (default: DIR/certs).") var certsDir: String?
    @Option(name: .customLong("http-port"), help: "Serve the status pages and /metrics on this port (default: the node's http=PORT in the cluster file, if any).") var httpPort: Int?
    @Option(name: .customLong("redis-port"), help: "Serve Redis clients on this port (default: the node's redis=PORT in the cluster file, if any).") var redisPort: Int?
    @Option(name: .customLong("redis-password"), help: "Password Redis clients must give with AUTH (default: $WEFT_REDIS_PASSWORD, else the cluster's client secret, the hex line in DIR/client.secret).") var redisPassword: String?
    @Flag(name: .customLong("redis-no-auth"), help: "Serve Redis clients without AUTH: anyone who can reach the port reads and writes everything.") var redisNoAuth = false
    @Option(name: .customLong("log-level"), help: "Least severe log line written: trace, debug, info, notice, warning, error or critical (default: $WEFT_LOG_LEVEL, else info).") var logLevel: String?

    func validate() throws {
        if let l = logLevel ?? ProcessInfo.processInfo.environment["WEFT_LOG_LEVEL"], Logger.Level(rawValue: l) == nil {
            throw ValidationError("--log-level must be one of trace, debug, info, notice, warning, error, critical (got \(l))")
        }
    }

    func run() throws {
        let config: ClusterConfig
        let node: ClusterNode
        // One line per event on stderr (the node's log file under `cluster start`).
        let level = Logger.Level(rawValue: logLevel ?? ProcessInfo.processInfo.environment["WEFT_LOG_LEVEL"] ?? "info") ?? .info
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let log = Logger(label: "weft node \(id)")
        log.info("main entered \(wallMillis() - processStartMillis) ms after the process started")
        if let fault = InjectedFault.active { log.warning("running with the injected fault WEFT_FAULT=\(fault); this node is deliberately broken") }
        do {
            config = try ClusterConfig.load(cluster)
            node = try ClusterNode(config: config, id: id, secretFile: secretFile, certsDir: certsDir)
        } catch {
            log.critical("error: \(error.message)")
            throw ExitCode(1)
        }
        node.onFailure = { error in
            log.critical("error: \(error.message); exiting, restart it to recover from disk")
            Glibc.exit(70)
        }
        var redisNote = ""
        if let port = redisPort ?? node.spec.redisPort {
            do {
                let at = try node.startRedis(port: port, password: redisPasswordChoice(redisPassword, noAuth: redisNoAuth))
                redisNote = ", Redis clients at \(at)"
            } catch {
                log.critical("error: \(error.message)")
                node.stop()
                throw ExitCode(1)
            }
        }
        if let port = httpPort ?? node.spec.httpPort {
            do {
                let at = try node.startHTTP(port: port)
                redisNote += ", status page http://\(at)/"
            } catch {
                log.critical("error: \(error.message)")
                node.stop()
                throw ExitCode(1)
            }
        }
        // A participant runs a dataflow executor: drivers (`weft job run
        // --cluster`) send it tasks over the cluster's connections.
        var executor: ExecutorService?
        var executorClient: ClusterClient?
        if case .participant(let p) = node.spec.address {
            let cc = node.makeClient()
            let n = node
            executor = ExecutorService(node: p, client: cc.client) { peer, method, body in
                try await n.call(to: .participant(peer), method, body)
            }
            executorClient = cc
            let e = executor!
            node.onCall = { call in e.handle(call) }
        }
        // The tables page reads the catalog through a client of the cluster.
        var pagesClient: ClusterClient?
        if let status = node.statusServer {
            let cc = node.makeClient()
            let client = cc.client
            status.addPage("tables") { tablesPage(client) }
            pagesClient = cc
        }
        let pidFile = config.clusterDirectory + "/\(id).pid"
        try? "\(getpid())\n".write(toFile: pidFile, atomically: true, encoding: .utf8)
        log.notice("\(node.spec.role.rawValue) pid \(getpid()) listening on \(node.spec.endpoint)\(redisNote), recovered in \(node.recoveryMillis) ms")
        // When it first serves (a participant once the coordinator's clock
        // answered), counted from this process's start.
        let watcher = Thread {
            while node.healthState() == "recovering" { usleep(2_000) }
            log.notice("serving \(wallMillis() - processStartMillis) ms after the process started")
        }
        watcher.start()
        // SIGTERM and SIGINT stop the node gracefully: the current round
        // finishes, LMDB closes, the lock is released.
        let stop = StopSignals()
        stop.done.wait()
        let sig = stop.received.value
        executor?.stop()
        executorClient?.close()
        pagesClient?.close()
        node.stop()
        if (try? String(contentsOfFile: pidFile, encoding: .utf8)) == "\(getpid())\n" { try? FileManager.default.removeItem(atPath: pidFile) }
        log.notice("stopped (signal \(sig))")
        _ = stop
        // Everything durable is closed; skip the runtime's teardown.
        Glibc.exit(0)
    }
}

final class SignalBox: @unchecked Sendable {
    var value: Int32 = 0
}

/// SIGTERM and SIGINT, caught: `done` is signalled with the signal in
/// `received`. Keep the value alive while waiting.
final class StopSignals: @unchecked Sendable {
    let done = DispatchSemaphore(value: 0)
    let received = SignalBox()
    var sources: [DispatchSourceSignal] = []

    init() {
        for s in [SIGTERM, SIGINT] {
            signal(s, SIG_IGN)
            let src = DispatchSource.makeSignalSource(signal: s, queue: .global())
            src.setEventHandler { [done, received] in
                received.value = s
                done.signal()
            }
            src.resume()
            sources.append(src)
        }
    }
}

/// The Redis password a node or server is started with: "" (none) with
/// `--redis-no-auth`; else `--redis-password` or $WEFT_REDIS_PASSWORD;
/// nil for the default, the client secret.
func redisPasswordChoice(_ password: String?, noAuth: Bool) -> String? {
    if noAuth { return "" }
    if let p = password, !p.isEmpty { return p }
    if let p = ProcessInfo.processInfo.environment["WEFT_REDIS_PASSWORD"], !p.isEmpty { return p }
    return nil
}

/// Writes a line to stdout at once (unbuffered), for logs read while the node runs.
func sayNow(_ s: String) { FileHandle.standardOutput.write(Data((s + "\n").utf8)) }

/// True if `pid` runs. A zombie (exited, not yet reaped by its parent,
/// which for detached nodes is init) counts as gone.
func processAlive(_ pid: Int32) -> Bool {
    guard pid > 0, kill(pid, 0) == 0 else { return false }
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = stat.lastIndex(of: ")") else { return true }
    let state = stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).first
    return state != "Z" && state != "X"
}

func readPid(_ path: String) -> Int32? {
    (try? String(contentsOfFile: path, encoding: .utf8)).flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
}

struct ClusterCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cluster",
        abstract: "Start, stop and inspect a local cluster of node processes.",
        subcommands: [Start.self, Stop.self, Status.self]
    )

    struct Start: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "start", abstract: "Write the cluster file (if new), launch every node in the background, and wait until each answers.")
        @Option(help: "Cluster directory (cluster file, node data, logs, pid files).") var dir: String
        @Option(help: "Participants for a new cluster.") var participants = 3
        @Option(name: .customLong("base-port"), help: "Coordinator port; participants use the next ports.") var basePort = 7400
        @Flag(help: "TLS on every connection (recorded in the cluster file); certificates in DIR/certs, made if missing (weft cert).") var tls = false
        @Option(name: .customLong("http-port"), help: "Status pages and /metrics: the coordinator on this port, participants on the next ports (recorded in the cluster file).") var httpPort: Int?
        @Option(name: .customLong("redis-port"), help: "Serve Redis clients too: the coordinator on this port, participants on the next ports (recorded in the cluster file).") var redisPort: Int?
        @Option(name: .customLong("redis-password"), help: "Password Redis clients must give with AUTH (default: $WEFT_REDIS_PASSWORD, else the cluster's client secret, the hex line in DIR/client.secret).") var redisPassword: String?
        @Flag(name: .customLong("redis-no-auth"), help: "Serve Redis clients without AUTH: anyone who can reach the port reads and writes everything.") var redisNoAuth = false

        func validate() throws {
            if !(1...64).contains(participants) { throw ValidationError("--participants must be 1...64") }
            if !(1024...65000).contains(basePort) { throw ValidationError("--base-port must be 1024...65000") }
            if let r = redisPort, !(1024...65000).contains(r) { throw ValidationError("--redis-port must be 1024...65000") }
            if let h = httpPort, !(1024...65000).contains(h) { throw ValidationError("--http-port must be 1024...65000") }
        }

        func run() throws {
            let file = dir + "/" + ClusterConfig.fileName
            var config: ClusterConfig
            do {
                if FileManager.default.fileExists(atPath: file) {
                    config = try ClusterConfig.load(file)
                    // Redis ports asked for a cluster that has none yet are recorded, and so is --tls.
                    var changed = false
                    if let r = redisPort, config.nodes.allSatisfy({ $0.redisPort == nil }) {
                        for i in config.nodes.indices { config.nodes[i].redisPort = r + i }
                        changed = true
                    }
                    if tls && !config.tls {
                        config.tls = true
                        changed = true
                    }
                    if let h = httpPort, config.nodes.allSatisfy({ $0.httpPort == nil }) {
                        for i in config.nodes.indices { config.nodes[i].httpPort = h + i }
                        changed = true
                    }
                    if changed {
                        try config.render().write(toFile: config.path, atomically: true, encoding: .utf8)
                        chmod(config.path, 0o600)
                    }
                } else {
                    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
                    config = ClusterConfig.local(dir: dir, participants: participants, basePort: basePort, redisBasePort: redisPort)
                    config.tls = tls
                    if let h = httpPort { for i in config.nodes.indices { config.nodes[i].httpPort = h + i } }
                    try config.render().write(toFile: config.path, atomically: true, encoding: .utf8)
                    chmod(config.path, 0o600)
                }
            } catch let e as WeftError {
                fail(e, json: false)
            } catch {
                fail(WeftError(.storage, "cannot create cluster directory \(dir): \(error.localizedDescription)"), json: false)
            }
            // The cluster secret every connection proves (DIR/secret for
            // nodes, DIR/client.secret for clients), made once, mode 0600.
            let credentials: Credentials
            let clientTLS: TLSSetup?
            do {
                credentials = Credentials(clusterId: config.clusterId, nodeKey: try ClusterSecret.nodeKey(dir: config.clusterDirectory, create: true))
                if config.tls { try ensureCertificates(config.certsDirectory) }
                clientTLS = try config.clientTLS()
            } catch {
                fail(error, json: false)
            }
            let me = URL(fileURLWithPath: CommandLine.arguments[0]).standardizedFileURL.path
            var launched: [String: Process] = [:]
            for n in config.nodes {
                if let pid = readPid(config.clusterDirectory + "/\(n.id).pid"), processAlive(pid), NetworkTransport.ping(n.endpoint, credentials: credentials, tls: clientTLS) != nil {
                    print("\(n.id): already running (pid \(pid))")
                    continue
                }
                let log = config.clusterDirectory + "/\(n.id).log"
                if !FileManager.default.fileExists(atPath: log) { _ = FileManager.default.createFile(atPath: log, contents: nil, attributes: [.posixPermissions: 0o600]) }
                guard let out = FileHandle(forWritingAtPath: log) else { fail(WeftError(.storage, "cannot write \(log)"), json: false) }
                out.seekToEndOfFile()
                let p = Process()
                p.executableURL = URL(fileURLWithPath: me)
                p.arguments = ["node", "--cluster", config.path, "--id", n.id] + (redisNoAuth ? ["--redis-no-auth"] : [])
                p.standardOutput = out
                p.standardError = out
                p.standardInput = FileHandle.nullDevice
                if let pw = redisPassword {
                    var env = ProcessInfo.processInfo.environment
                    env["WEFT_REDIS_PASSWORD"] = pw
                    p.environment = env
                }
                do { try p.run() } catch { fail(WeftError(.unavailable, "cannot launch \(me): \(error.localizedDescription)"), json: false) }
                launched[n.id] = p
            }
            let deadline = wallMillis() + 20_000
            for n in config.nodes {
                while true {
                    if let info = NetworkTransport.ping(n.endpoint, credentials: credentials, tls: clientTLS, timeoutMillis: 500), info.contains("\"serving\"") || launched[n.id] == nil { break }
                    if let p = launched[n.id], !p.isRunning {
                        let tail = (try? String(contentsOfFile: config.clusterDirectory + "/\(n.id).log", encoding: .utf8))?.split(separator: "\n").suffix(3).joined(separator: "\n") ?? ""
                        fail(WeftError(.unavailable, "node \(n.id) exited with status \(p.terminationStatus):\n\(tail)"), json: false)
                    }
                    if wallMillis() > deadline { fail(WeftError(.timeout, "node \(n.id) did not answer at \(n.endpoint) within 20 s; see \(config.clusterDirectory)/\(n.id).log"), json: false) }
                    usleep(50_000)
                }
            }
            print("cluster \(config.clusterId) is up (\(config.path)):")
            for n in config.nodes { print("  \(n.id)\t\(n.role.rawValue)\t\(n.endpoint)\tpid \(readPid(config.clusterDirectory + "/\(n.id).pid").map(String.init) ?? "?")" + (n.redisPort.map { "\tredis \(n.endpoint.host):\($0)" } ?? "")) }
            print("use it with: --cluster \(config.clusterDirectory)   (or export WEFT_CLUSTER=\(config.clusterDirectory))")
            if config.nodes.contains(where: { $0.redisPort != nil }), !redisNoAuth, redisPasswordChoice(redisPassword, noAuth: false) == nil {
                print("Redis clients AUTH with the client secret: redis-cli -p PORT -a \"$(cat \(config.clusterDirectory)/\(ClusterSecret.clientFileName))\"")
            }
        }
    }

    struct Stop: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "stop", abstract: "Stop every node gracefully (SIGTERM, then SIGKILL after 10 s).")
        @Option(help: "Cluster directory or cluster file.") var dir: String

        func run() throws {
            let config: ClusterConfig
            do { config = try ClusterConfig.load(dir) } catch { fail(error, json: false) }
            for n in config.nodes {
                let pidFile = config.clusterDirectory + "/\(n.id).pid"
                guard let pid = readPid(pidFile), processAlive(pid) else {
                    print("\(n.id): not running")
                    continue
                }
                kill(pid, SIGTERM)
                let deadline = wallMillis() + 10_000
                while processAlive(pid) && wallMillis() < deadline { usleep(20_000) }
                if processAlive(pid) {
                    kill(pid, SIGKILL)
                    print("\(n.id): killed (pid \(pid)) after 10 s")
                } else {
                    print("\(n.id): stopped (pid \(pid))")
                }
                try? FileManager.default.removeItem(atPath: pidFile)
            }
        }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "status", abstract: "Each node's id, role, address, pid and health.")
        @Option(help: "Cluster directory or cluster file.") var dir: String
        @Flag(help: "JSON output, one object per node.") var json = false
        @Option(name: .customLong("secret-file"), help: "The cluster's client secret (default: client.secret beside the cluster file).") var secretFile: String?
        @Option(name: .customLong("certs-dir"), help: "TLS certificates of this client (default: DIR/certs).") var certsDir: String?

        func run() throws {
            let config: ClusterConfig
            let credentials: Credentials
            let clientTLS: TLSSetup?
            do {
                config = try ClusterConfig.load(dir)
                credentials = Credentials(clusterId: config.clusterId, clientKey: try ClusterSecret.clientKey(dir: config.clusterDirectory, secretFile: secretFile))
                clientTLS = try config.clientTLS(certsDir: certsDir)
            } catch { fail(error, json: json) }
            var allUp = true
            for n in config.nodes {
                let pid = readPid(config.clusterDirectory + "/\(n.id).pid").flatMap { processAlive($0) ? $0 : nil }
                var health = "down"
                if let info = NetworkTransport.ping(n.endpoint, credentials: credentials, tls: clientTLS, timeoutMillis: 500),
                   let obj = try? JSONSerialization.jsonObject(with: Data(info.utf8)) as? [String: Any] {
                    health = obj["state"] as? String ?? "up"
                }
                if health != "serving" { allUp = false }
                if json {
                    var o: [String: Any] = ["id": n.id, "role": n.role.rawValue, "address": n.endpoint.description, "health": health]
                    if let pid { o["pid"] = pid }
                    if let r = n.redisPort { o["redis"] = "\(n.endpoint.host):\(r)" }
                    if let h = n.httpPort { o["http"] = "\(n.endpoint.host):\(h)" }
                    print(jsonLine(o))
                } else {
                    print("\(n.id)\t\(n.role.rawValue)\t\(n.endpoint)\tpid \(pid.map(String.init) ?? "-")\t\(health)")
                }
            }
            if !allUp { throw ExitCode(1) }
        }
    }
}

/// When this process started (wall clock, ms), from /proc: the kernel's
/// start time in clock ticks since boot, and the boot time.
let processStartMillis: UInt64 = {
    guard let stat = try? String(contentsOfFile: "/proc/self/stat", encoding: .utf8), let close = stat.lastIndex(of: ")"),
          let uptime = (try? String(contentsOfFile: "/proc/uptime", encoding: .utf8))?.split(separator: " ").first.flatMap({ Double($0) }) else {
        return wallMillis()
    }
    let fields = stat[stat.index(after: close)...].split(separator: " ")
    guard fields.count > 19, let ticks = Double(fields[19]) else { return wallMillis() }
    let hz = Double(sysconf(Int32(_SC_CLK_TCK)))
    let sinceStart = uptime - ticks / hz
    return wallMillis() - UInt64(max(0, sinceStart) * 1000)
}()
