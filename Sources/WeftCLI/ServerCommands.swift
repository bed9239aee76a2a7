import ArgumentParser
import Foundation
import Logging
import WeftCore
import WeftDataflow
import WeftRuntime

/// `weft server start|stop|status`: one long-lived process per data
/// directory, so commands do not each load the store.
struct ServerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "server",
        abstract: "Run a server that holds a data directory in memory; commands on that directory go through it.",
        subcommands: [Start.self, Stop.self, Status.self]
    )

    struct Start: ParsableCommand {
        static let configuration = CommandConfiguration(
        commandName: "start",
            abstract: "Start a server for the data directory (in the background, logging to DIR/server.log, unless --foreground).")
        @OptionGroup var global: GlobalOptions
        @Option(help: "Address to listen on, HOST:PORT (port 0: any free port).") var listen = "127.0.0.1:0"
        @Flag(help: "Run in this process until SIGTERM or SIGINT.") var foreground = false
        @Option(name: .customLong("redis-port"), help: "Also serve Redis clients (RESP2/RESP3) on this port of the --listen host (0: any free port).") var redisPort: Int?
        @Option(name: .customLong("redis-password"), help: "Password Redis clients must give with AUTH (default: $WEFT_REDIS_PASSWORD, else the client secret, the hex line in DIR/client.secret).") var redisPassword: String?
        @Flag(name: .customLong("redis-no-auth"), help: "Serve Redis clients without AUTH: anyone who can reach the port reads and writes everything.") var redisNoAuth = false
        @Flag(help: "TLS on every client connection, certificates in DIR/certs (made on first use: a CA, a node and a client certificate).") var tls = false
        @Option(name: .customLong("http-port"), help: "Serve the status pages and /metrics on this port of the --listen host (0: any free port).") var httpPort: Int?

        func validate() throws {
            if let p = redisPort, !(0...65535).contains(p) { throw ValidationError("--redis-port must be 0...65535") }
            if let p = httpPort, !(0...65535).contains(p) { throw ValidationError("--http-port must be 0...65535") }
            if global.cluster != nil { throw ValidationError("weft server serves a data directory, not a cluster (--cluster)") }
            guard parseEndpoint(listen) != nil else { throw ValidationError("--listen must be HOST:PORT, not \(listen)") }
        }

        func run() throws {
            let g = global
            let dir = URL(fileURLWithPath: g.resolvedDataDir).standardizedFileURL.path
            let endpoint = parseEndpoint(listen)!
            if case .running(let f) = ServerFile.probe(dir) {
                fail(WeftError(.locked, "data directory \(dir) is already served by weft server pid \(f.pid) at \(f.endpoint)"), json: g.json)
            }
            if tls {
                do { try ensureCertificates(dir + "/certs") } catch { fail(error, json: g.json) }
            }
            if foreground { runForeground(dir, endpoint, g) }
            do { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700]) } catch {
                fail(WeftError(.readOnly, "cannot create data directory \(dir): \(error.localizedDescription)"), json: g.json)
            }
            let log = dir + "/server.log"
            if !FileManager.default.fileExists(atPath: log) { _ = FileManager.default.createFile(atPath: log, contents: nil, attributes: [.posixPermissions: 0o600]) }
            guard let out = FileHandle(forWritingAtPath: log) else { fail(WeftError(.storage, "cannot write \(log)"), json: g.json) }
            out.seekToEndOfFile()
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
            p.arguments = ["server", "start", "--foreground", "--data-dir", dir, "--listen", listen] + (g.participants.map { ["--participants", String($0)] } ?? [])
                + (redisPort.map { ["--redis-port", String($0)] } ?? []) + (redisNoAuth ? ["--redis-no-auth"] : []) + (tls ? ["--tls"] : []) + (httpPort.map { ["--http-port", String($0)] } ?? [])
            if let pw = redisPassword {
                // Passed in the environment, not argv: other users can read argv.
                var env = ProcessInfo.processInfo.environment
                env["WEFT_REDIS_PASSWORD"] = pw
                p.environment = env
            }
            p.standardOutput = out
            p.standardError = out
            p.standardInput = FileHandle.nullDevice
            do { try p.run() } catch { fail(WeftError(.unavailable, "cannot launch the server: \(error.localizedDescription)"), json: g.json) }
            let deadline = wallMillis() + UInt64(Limits.serverStartMillisMax)
            while true {
                if case .running(let f) = ServerFile.probe(dir), f.pid == p.processIdentifier, let c = try? serverCredentials(f, dir, g),
                   NetworkTransport.ping(f.endpoint, credentials: c, tls: try? serverTLS(f, dir, g), timeoutMillis: 500) != nil {
                    var o: [String: Any] = ["pid": Int(f.pid), "address": "\(f.endpoint)", "data_dir": dir, "participants": f.participants, "log": log, "tls": f.tls]
                    if let r = f.redis { o["redis"] = "\(r)" }
                    if let h = f.http { o["http"] = "\(h)" }
                    print(g.json ? jsonLine(o)
                                 : "weft server pid \(f.pid) serving \(dir) at \(f.endpoint)" + (f.redis.map { ", Redis clients at \($0)" } ?? "")
                                   + (f.http.map { ", status page http://\($0)/" } ?? "") + " (log: \(log))")
                    if !g.json, let r = f.redis, !redisNoAuth, redisPasswordChoice(redisPassword, noAuth: false) == nil {
                        print("Redis clients AUTH with the client secret: redis-cli -p \(r.port) -a \"$(cat \(dir)/\(ClusterSecret.clientFileName))\"")
                    }
                    return
                }
                if !p.isRunning {
                    let tail = (try? String(contentsOfFile: log, encoding: .utf8))?.split(separator: "\n").suffix(3).joined(separator: "\n") ?? ""
                    fail(WeftError(.unavailable, "the server exited with status \(p.terminationStatus):\n\(tail)"), json: g.json)
                }
                if wallMillis() > deadline {
                    fail(WeftError(.timeout, "the server (pid \(p.processIdentifier)) did not serve within \(Limits.serverStartMillisMax) ms (Limits.serverStartMillisMax); see \(log)"), json: g.json)
                }
                usleep(20_000)
            }
        }

        func runForeground(_ dir: String, _ endpoint: Endpoint, _ g: GlobalOptions) -> Never {
            // One line per event on stderr (the server's log file when started in the background).
            let level = Logger.Level(rawValue: ProcessInfo.processInfo.environment["WEFT_LOG_LEVEL"] ?? "info") ?? .info
            LoggingSystem.bootstrap { label in
                var h = StreamLogHandler.standardError(label: label)
                h.logLevel = level
                return h
            }
            let log = Logger(label: "weft server")
            let server: WeftServer
            do {
                let password = redisPasswordChoice(redisPassword, noAuth: redisNoAuth)
                server = try WeftServer(dataDir: dir, listen: endpoint, participants: g.participants, lockWaitMillis: Limits.dataDirLockWaitMillis,
                                        redisListen: redisPort.map { Endpoint(host: endpoint.host, port: $0) }, redisPassword: password, tls: tls,
                                        httpListen: httpPort.map { Endpoint(host: endpoint.host, port: $0) })
            } catch {
                fail(error, json: g.json)
            }
            // Jobs asked of the server run here, beside the data.
            let cluster = server.cluster
            server.http?.addPage("tables") {
                let client = cluster.client()
                defer { client.close() }
                return tablesPage(client)
            }
            let board = server.jobs
            let jobPage = server.file.http.map { "http://\($0)/jobs/" }
            server.serveCalls { call in
                let t = Thread {
                    guard call.method == "job.run" else {
                        return call.reply(false, Array(jsonLine(["error": "invalid-argument", "message": "unknown call \(call.method)"]).utf8))
                    }
                    let client = cluster.client()
                    defer { client.close() }
                    do {
                        // A job whose client went away (Ctrl-C) stops at its next task.
                        call.reply(true, try serveJobRun(call.body, client: client, shouldStop: call.clientGone, board: board, jobPage: jobPage))
                    } catch let e as WeftError {
                        call.reply(false, Array(jsonLine(["error": e.code.rawValue, "message": e.message]).utf8))
                    } catch {
                        call.reply(false, Array(jsonLine(["error": "storage", "message": "\(error)"]).utf8))
                    }
                }
                t.stackSize = DataflowContext.driverStackBytes
                t.start()
            }
            let redisNote = server.file.redis.map { ", Redis clients at \($0)" } ?? ""
            log.notice("pid \(getpid()) serving \(dir) at \(server.file.endpoint)\(redisNote) (\(server.file.participants) participants, opened in \(server.openMillis) ms)")
            let stop = StopSignals()
            // A node whose storage failed (disk or map full) stops; its
            // memory may be ahead of its disk, so the server exits and a
            // restart recovers from the disk.
            while stop.done.wait(timeout: .now() + 1) == .timedOut {
                if let e = server.cluster.firstFailure {
                    log.critical("error: \(e.message); exiting, start it again to recover from disk")
                    server.stop()
                    Glibc.exit(70)
                }
            }
            server.stop()
            log.notice("pid \(getpid()) stopped (signal \(stop.received.value))")
            Glibc.exit(0)
        }
    }

    struct Stop: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "stop", abstract: "Stop the data directory's server gracefully (SIGTERM; SIGKILL after 30 s).")
        @OptionGroup var global: GlobalOptions

        func run() throws {
            let g = global
            let dir = g.resolvedDataDir
            switch ServerFile.probe(dir) {
            case .none:
                fail(WeftError(.unavailable, "no server is running for \(dir)"), json: g.json)
            case .stale(let f):
                if ServerFile.read(dir) == f { ServerFile.remove(dir) }
                fail(WeftError(.unavailable, "no server is running for \(dir) (removed the file left by pid \(f.pid), which is gone)"), json: g.json)
            case .running(let f):
                kill(f.pid, SIGTERM)
                let deadline = wallMillis() + 30_000
                while case .running = ServerFile.probe(dir), processAlive(f.pid) {
                    if wallMillis() > deadline {
                        kill(f.pid, SIGKILL)
                        printErr("weft: the server did not stop within 30 s; killed it (its data is recovered at the next start)")
                        break
                    }
                    usleep(20_000)
                }
                while processAlive(f.pid) && wallMillis() < deadline + 5_000 { usleep(20_000) }
                print(g.json ? jsonLine(["stopped": Int(f.pid), "data_dir": dir]) : "stopped weft server pid \(f.pid) (\(dir))")
            }
        }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "status", abstract: "Is a server serving the data directory, where, and since when. Exit 0 if it serves, 1 if not.")
        @OptionGroup var global: GlobalOptions

        func run() throws {
            let g = global
            let dir = g.resolvedDataDir
            guard case .running(let f) = ServerFile.probe(dir) else {
                print(g.json ? jsonLine(["running": false, "data_dir": dir]) : "no server is running for \(dir)")
                throw ExitCode(1)
            }
            let credentials: Credentials
            let tls: TLSSetup?
            do {
                credentials = try serverCredentials(f, dir, g)
                tls = try serverTLS(f, dir, g)
            } catch { fail(error, json: g.json) }
            let health = NetworkTransport.ping(f.endpoint, credentials: credentials, tls: tls).flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            let state = health?["state"] as? String ?? "not answering"
            let uptime = health?["uptime_ms"] as? Int
            if g.json {
                var o: [String: Any] = ["running": true, "pid": Int(f.pid), "address": "\(f.endpoint)", "data_dir": dir,
                                        "participants": f.participants, "state": state, "tls": f.tls]
                if let uptime { o["uptime_ms"] = uptime }
                if let jobs = health?["jobs_running"] as? Int { o["jobs_running"] = jobs }
                if let r = f.redis { o["redis"] = "\(r)" }
                if let h = f.http { o["http"] = "\(h)" }
                print(jsonLine(o))
            } else {
                print("weft server pid \(f.pid) at \(f.endpoint)" + (f.redis.map { " (Redis \($0))" } ?? "") + ": \(state)" + (uptime.map { ", up \($0 / 1000) s" } ?? "") + ", \(f.participants) participants, data directory \(dir)")
            }
            if health == nil { throw ExitCode(1) }
        }
    }
}

/// What a client of the server at `f` proves: the directory's client secret.
func serverCredentials(_ f: ServerFile, _ dir: String, _ g: GlobalOptions) throws(WeftError) -> Credentials {
    Credentials(clusterId: f.id, clientKey: try ClusterSecret.clientKey(dir: dir, secretFile: g.secretFile))
}

/// A client's TLS for the server at `f`, if it uses TLS.
func serverTLS(_ f: ServerFile, _ dir: String, _ g: GlobalOptions) throws(WeftError) -> TLSSetup? {
    f.tls ? try TLSSetup(files: CertFiles(g.certsDir ?? dir + "/certs"), asNode: false) : nil
}

/// A CA, a node and a client certificate in `dir`, made where missing
/// (`--tls` on a cluster or server that has none yet).
func ensureCertificates(_ dir: String) throws(WeftError) {
    let files = CertFiles(dir)
    if !FileManager.default.fileExists(atPath: files.caCert) { try files.createCA(days: 3650, overwrite: false) }
    if !FileManager.default.fileExists(atPath: files.nodeCert) { try files.createLeaf(.node, hosts: ["127.0.0.1", "localhost"], days: 3650, overwrite: false) }
    if !FileManager.default.fileExists(atPath: files.clientCert) { try files.createLeaf(.client, hosts: [], days: 3650, overwrite: false) }
}

func parseEndpoint(_ s: String) -> Endpoint? {
    guard let colon = s.lastIndex(of: ":"), let port = Int(s[s.index(after: colon)...]), (0...65535).contains(port) else { return nil }
    let host = String(s[..<colon])
    return host.isEmpty ? nil : Endpoint(host: host, port: port)
}
