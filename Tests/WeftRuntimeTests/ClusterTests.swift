import Foundation
import XCTest
import WeftCore
import WeftProtocol
import WeftRuntime

/// A local cluster of real `weft node` processes on random loopback ports.
final class TestCluster {
    let dir: String
    let basePort: Int
    var children: [String: Process] = [:]
    let ids = ["coordinator", "participant-0", "participant-1", "participant-2"]

    init() throws {
        // Ports below Linux's ephemeral range (32768+), so no outgoing
        // connection holds one; a few tries in case another test does.
        var attempt = 0
        while true {
            let d = tempDir("weft-cluster")
            let port = 20_000 + Int.random(in: 0..<1_200) * 10
            let r = try runWeft(["cluster", "start", "--dir", d, "--base-port", String(port)])
            if r.status == 0 {
                dir = d
                basePort = port
                return
            }
            _ = try? runWeft(["cluster", "stop", "--dir", d])
            removeDir(d)
            attempt += 1
            if attempt == 3 { throw XCTSkip("cluster did not start: \(r.stdout) \(r.stderr)") }
        }
    }

    func pid(_ id: String) -> Int32? {
        (try? String(contentsOfFile: dir + "/\(id).pid", encoding: .utf8)).flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    func isAlive(_ id: String) -> Bool { pid(id).map(processAlive) ?? false }

    func kill9(_ id: String) {
        guard let p = pid(id) else { return }
        kill(p, SIGKILL)
        children[id]?.waitUntilExit()
        for _ in 0..<200 where processAlive(p) { usleep(10_000) }
    }

    /// Starts node `id` as a child process and waits until it listens.
    @discardableResult
    func start(_ id: String, env: [String: String] = [:]) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: weftBinary)
        p.arguments = ["node", "--cluster", dir, "--id", id]
        var e = ProcessInfo.processInfo.environment
        for (k, v) in env { e[k] = v }
        p.environment = e
        let log = dir + "/\(id).test.log"
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let h = FileHandle(forWritingAtPath: log)!
        p.standardOutput = h
        p.standardError = h
        try p.run()
        children[id] = p
        // Wait until it serves: a participant first hears the coordinator's clock.
        let port = basePort + (ids.firstIndex(of: id) ?? 0)
        let deadline = Date(timeIntervalSinceNow: 10)
        while Date() < deadline {
            if !p.isRunning { break }
            let info = pingNode(port: port, clusterDir: dir)
            if info.contains("\"serving\"") || (info.contains("recovering") && !isAlive("coordinator")) { break }
            usleep(10_000)
        }
        return p
    }

    func weft(_ args: [String], env: [String: String] = [:]) throws -> RunResult {
        try runWeft(args + ["--cluster", dir], env: env)
    }

    /// Polls until no participant holds a PREPARED record.
    func waitNoInDoubt(seconds: Double = 15) throws -> Bool {
        let deadline = Date(timeIntervalSinceNow: seconds)
        while Date() < deadline {
            if try weft(["admin", "in-doubt"]).stdout == "no in-doubt transactions\n" { return true }
            usleep(100_000)
        }
        return false
    }

    /// Stops every node; keeps the directory (logs, data) when `keep`, so a
    /// failed test can be examined.
    func stop(keep: Bool = false) {
        _ = try? runWeft(["cluster", "stop", "--dir", dir])
        for (_, p) in children where p.isRunning { p.terminate(); p.waitUntilExit() }
        if keep {
            print("cluster directory kept for inspection: \(dir)")
        } else {
            removeDir(dir)
        }
    }
}

final class ClusterTests: XCTestCase {
    /// Keys on all three participants (stable hash partitioning).
    let keys = ["alice", "bob", "carol", "dave", "erin", "frank"]

    /// The values of `keys`, read with a snapshot scan, retrying while nodes recover.
    func read(_ c: TestCluster) throws -> [String: String] {
        for _ in 0..<100 {
            let r = try c.weft(["kv", "scan"])
            if r.status == 0 {
                var m: [String: String] = [:]
                for line in r.stdout.split(separator: "\n") {
                    let f = line.split(separator: "\t", maxSplits: 1).map(String.init)
                    if f.count == 2 { m[f[0]] = f[1] }
                }
                return m
            }
            usleep(100_000)
        }
        XCTFail("the cluster did not serve a scan")
        return [:]
    }

    func testCrashMatrixKeepsAtomicityAndDurability() throws {
        let points: [(String, String)] = [
            ("participant-0", "participant.before-prepare-forced"),
            ("participant-0", "participant.after-prepare-forced"),
            ("participant-0", "participant.before-commit-forced"),
            ("participant-0", "participant.after-commit-forced"),
            ("coordinator", "coordinator.before-decision-forced"),
            ("coordinator", "coordinator.after-decision-forced"),
            ("coordinator", "coordinator.before-end-forced"),
            ("coordinator", "coordinator.after-end-forced"),
        ]
        for (node, point) in points {
            let c = try TestCluster()
            defer { c.stop(keep: (testRun?.failureCount ?? 0) > 0) }
            // Relaunch the victim with the crash point armed.
            let victimPid = c.pid(node)
            c.kill9(node)
            let victim = try c.start(node, env: ["WEFT_CRASH_AT": point])
            XCTAssertNotEqual(victimPid, Int32(victim.processIdentifier))
            var txn = try c.weft(["txn"] + keys.flatMap { ["-e", "put \($0) \(point)"] })
            // The victim dies at its crash point. On a loaded machine the
            // first attempt can fail before any commit starts (the restarted
            // node not serving yet): try again while the victim lives.
            for attempt in 0..<1500 where victim.isRunning {
                usleep(10_000)
                if attempt % 300 == 299 && victim.isRunning { txn = try c.weft(["txn"] + keys.flatMap { ["-e", "put \($0) \(point)"] }) }
            }
            XCTAssertFalse(victim.isRunning, "\(point): the node did not reach its crash point")
            if victim.isRunning {
                victim.terminate()
                continue
            }
            XCTAssertEqual(victim.terminationReason, .uncaughtSignal, "\(point): killed by SIGKILL")
            if point == "participant.after-prepare-forced" {
                let offline = try c.weft(["admin", "in-doubt"])
                XCTAssertTrue(offline.stdout.contains("on participant-0"), "\(point): offline listing shows the held transaction: \(offline.stdout)")
            }
            try c.start(node)
            XCTAssertTrue(try c.waitNoInDoubt(), "\(point): in-doubt transactions remain after recovery")
            let values = try read(c)
            let present = keys.filter { values[$0] == point }
            XCTAssertTrue(present.isEmpty || present.count == keys.count, "\(point): partially applied: \(present)")
            if txn.stdout.contains("committed at") {
                XCTAssertEqual(present.count, keys.count, "\(point): an acknowledged commit was lost")
            }
            if txn.stdout.hasPrefix("ok\nok\nok\nok\nok\nok\naborted") {
                XCTAssertTrue(present.isEmpty, "\(point): an aborted transaction is visible")
            }
            if let line = txn.stdout.split(separator: "\n").first(where: { $0.contains("weft txn status") }) {
                let id = String(line.split(separator: " ").last!)
                let s = try c.weft(["txn", "status", id])
                XCTAssertEqual(s.stdout.hasPrefix("committed"), present.count == keys.count, "\(point): txn status agrees with the data: \(s.stdout)")
            }
        }
    }

    func testRandomKillsConserveTotalAndLoseNoAcknowledgedTransfer() throws {
        let c = try TestCluster()
        defer { c.stop(keep: (testRun?.failureCount ?? 0) > 0) }
        let out = c.dir + "/bank.out"
        _ = FileManager.default.createFile(atPath: out, contents: nil)
        let bank = Process()
        bank.executableURL = URL(fileURLWithPath: weftBinary)
        bank.arguments = ["debug", "bank", "--cluster", c.dir, "--accounts", "100", "--clients", "8", "--duration", "10", "--resilient"]
        bank.standardOutput = FileHandle(forWritingAtPath: out)!
        bank.standardError = FileHandle.nullDevice
        try bank.run()
        var kills = 0
        var snapshots = 0
        var rng = SeededGenerator.fromEnvironment("random kills")
        let end = Date(timeIntervalSinceNow: 9)
        while Date() < end {
            usleep(UInt32.random(in: 250_000...500_000, using: &rng))
            let victim = c.ids.randomElement(using: &rng)!
            c.kill9(victim)
            kills += 1
            usleep(UInt32.random(in: 50_000...250_000, using: &rng))
            try c.start(victim)
            // A snapshot during the run, when the cluster answers one.
            let check = try c.weft(["debug", "bank-check"])
            if check.status == 0 {
                snapshots += 1
                XCTAssertTrue(check.stdout.contains("total 100000\n"), "a snapshot during the run is not conserved: \(check.stdout.prefix(40))")
            }
        }
        let t0 = Date()
        bank.waitUntilExit()
        for id in c.ids where !c.isAlive(id) { try c.start(id) }
        let t1 = Date()
        XCTAssertTrue(try c.waitNoInDoubt(seconds: 20), "in-doubt transactions remain")
        print("random kills: workload ended \(t1.timeIntervalSince(t0)) s after the killer; in doubt resolved after \(Date().timeIntervalSince(t1)) s")
        let final = try c.weft(["debug", "bank-check"])
        XCTAssertEqual(final.status, 0, final.stderr)
        XCTAssertTrue(final.stdout.contains("accounts 100\n"))
        XCTAssertTrue(final.stdout.contains("total 100000\n"), "total not conserved: \(final.stdout.prefix(40))")
        let logged = Set(final.stdout.split(separator: "\n").compactMap { $0.hasPrefix("log ") ? String($0.dropFirst(4)) : nil })
        let lines = (try String(contentsOfFile: out, encoding: .utf8)).split(separator: "\n")
        let acked = lines.filter { $0.hasPrefix("ack ") }.map { String($0.split(separator: " ")[1]) }
        let unknown = lines.filter { $0.hasPrefix("unknown ") }.map { String($0.split(separator: " ")[1]) }
        for t in acked { XCTAssertTrue(logged.contains(t), "acknowledged transfer \(t) was lost") }
        // Every "outcome unknown" resolves one way, consistently with the data.
        for t in unknown.prefix(20) {
            let s = try c.weft(["txn", "status", t])
            XCTAssertEqual(s.stdout.hasPrefix("committed"), logged.contains(t), "txn \(t): status \(s.stdout) but logged=\(logged.contains(t))")
            XCTAssertFalse(s.stdout.hasPrefix("pending"), "txn \(t) still pending")
        }
        XCTAssertGreaterThan(acked.count, 20, "the workload made progress through the kills")
        XCTAssertGreaterThanOrEqual(kills, 5)
        print("random kills: \(kills) kills, \(acked.count) acknowledged, \(unknown.count) unknown, \(snapshots) snapshots checked")
    }

    /// Tables and jobs over the network: a load, a job whose snapshot is
    /// leased on every participant over TCP while it runs, and its output.
    func testJobsRunOverTheNetwork() throws {
        let c = try TestCluster()
        defer { c.stop(keep: (testRun?.failureCount ?? 0) > 0) }
        let file = c.dir + "/words.txt"
        try "a b a\nc a b\n\nd".write(toFile: file, atomically: true, encoding: .utf8)
        let load = try c.weft(["table", "load", "words", file])
        XCTAssertEqual(load.status, 0, load.stderr)
        let run = try c.weft(["job", "run", "wordcount", "--input", "words", "--output", "wc"])
        XCTAssertEqual(run.status, 0, run.stderr)
        XCTAssertTrue(run.stdout.contains("4 distinct words"), run.stdout)
        let scan = try c.weft(["table", "scan", "wc"])
        XCTAssertEqual(scan.stdout.split(separator: "\n").sorted(), ["a\t3", "b\t2", "c\t1", "d\t1"])
        // A snapshot the participants have collected is refused clearly.
        let old = try c.weft(["job", "run", "wordcount", "--input", "words", "--at", "1"])
        XCTAssertNotEqual(old.status, 0)
        XCTAssertTrue(old.stderr.contains("snapshot") || old.stderr.contains("unknown table"), old.stderr)
    }

    func testBadInputDoesNotHurtTheCluster() throws {
        let c = try TestCluster()
        defer { c.stop(keep: (testRun?.failureCount ?? 0) > 0) }
        XCTAssertEqual(try c.weft(["kv", "put", "keep", "me"]).status, 0)
        let port = c.basePort + 1
        // Garbage, an oversized length, another protocol version, an HTTP request.
        let replies = [
            rawExchange(port: port, Array((0..<100).map { _ in UInt8.random(in: 0...255) })),
            rawExchange(port: port, [0xff, 0xff, 0xff, 0x7f]),
            rawExchange(port: port, [5, 0, 0, 0, 9, 1, 0, 0, 0]),
            rawExchange(port: port, Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8)),
        ]
        XCTAssertTrue(replies[1].contains("before the handshake exceeds Limits.preHelloFrameBytesMax"), replies[1])
        XCTAssertTrue(replies[2].contains("protocol version 9 is not supported"), replies[2])
        // The forged coordinator: the old HELLO (version 1, naming
        // the cluster id and the coordinator), then a one-phase commit
        // with a poisoned timestamp. Refused, and told nothing.
        let config = try ClusterConfig.load(c.dir)
        var forged = ByteWriter()
        forged.u8(1); forged.u8(1); forged.string(config.clusterId); forged.u8(0)
        let forgedHello = withUnsafeBytes(of: UInt32(forged.bytes.count).littleEndian) { Array($0) } + forged.bytes
        let answer = rawExchange(port: port, forgedHello)
        XCTAssertTrue(answer.contains("not supported"), answer)
        XCTAssertFalse(answer.contains(config.clusterId), "the cluster id leaked: \(answer)")
        let noSecret = rawExchange(port: port, Frame.hello(nonce: Array(repeating: 7, count: 32)).encoded()
                                   + Frame.auth(sender: .coordinator, proof: Array(repeating: 0, count: 32)).encoded())
        XCTAssertTrue(noSecret.contains("authentication failed"), noSecret)
        XCTAssertFalse(noSecret.contains(config.clusterId) || noSecret.contains("participant"), "learned something: \(noSecret)")
        XCTAssertTrue(c.isAlive("participant-0"), "a malformed frame must not crash the node")
        XCTAssertEqual(try c.weft(["kv", "get", "keep"]).stdout, "me\n")

        // A node id the cluster file does not know.
        let wrong = try runWeft(["node", "--cluster", c.dir, "--id", "participant-9"])
        XCTAssertEqual(wrong.status, 1)
        XCTAssertTrue(wrong.stderr.contains("not in cluster file"), wrong.stderr)
        // A second process for a running node: its directory is locked.
        let twice = try runWeft(["node", "--cluster", c.dir, "--id", "participant-1"])
        XCTAssertEqual(twice.status, 1)
        XCTAssertTrue(twice.stderr.contains("in use by another process"), twice.stderr)

        // A port already in use.
        c.kill9("participant-2")
        let blocker = try listenOn(port: c.basePort + 3)
        let busy = try runWeft(["node", "--cluster", c.dir, "--id", "participant-2"])
        // Meanwhile the port accepts connections (in the kernel's backlog)
        // but nothing answers, like a stopped process: a clear error after
        // Limits.handshakeMillisMax, not a hang until the request deadline.
        let hungStart = Date()
        let hung = try c.weft(["kv", "scan"])
        XCTAssertEqual(hung.status, 1)
        XCTAssertTrue(hung.stderr.contains("no handshake within"), hung.stderr)
        XCTAssertLessThan(Date().timeIntervalSince(hungStart), 10)
        close(blocker)
        XCTAssertEqual(busy.status, 1)
        XCTAssertTrue(busy.stderr.contains("already in use"), busy.stderr)
        try c.start("participant-2")

        // A data directory from another cluster.
        let conf = c.dir + "/cluster.conf"
        let original = try String(contentsOfFile: conf, encoding: .utf8)
        let other = original.replacingOccurrences(of: "cluster-id ", with: "cluster-id other")
        try other.write(toFile: c.dir + "/other.conf", atomically: true, encoding: .utf8)
        c.kill9("participant-1")
        let foreign = try runWeft(["node", "--cluster", c.dir + "/other.conf", "--id", "participant-1"])
        XCTAssertEqual(foreign.status, 1)
        XCTAssertTrue(foreign.stderr.contains("belongs to another cluster"), foreign.stderr)
        try c.start("participant-1")

        // A peer that is down: a clear error, fast, never a hang.
        c.kill9("coordinator")
        let t0 = Date()
        let down = try c.weft(["kv", "get", "keep"])
        XCTAssertEqual(down.status, 1)
        XCTAssertTrue(down.stderr.contains("unreachable"), down.stderr)
        XCTAssertLessThan(Date().timeIntervalSince(t0), 5)
        try c.start("coordinator")
        XCTAssertEqual(try c.weft(["kv", "get", "keep"]).stdout, "me\n", "nothing was lost")
    }
}

/// Sends raw bytes to a node and returns what it answers before closing.
func rawExchange(port: Int, _ bytes: [UInt8]) -> String {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = in_port_t(UInt16(port).bigEndian)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    let ok = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    guard ok == 0 else { return "connect failed" }
    _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
    var tv = timeval(tv_sec: 2, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    var out = [UInt8]()
    var buf = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = recv(fd, &buf, buf.count, 0)
        if n <= 0 { break }
        out += buf[0..<n]
    }
    return String(decoding: out, as: UTF8.self)
}

/// The node's health JSON from a PING frame, or "" if it does not answer.
/// A health ping after the handshake, as a client of the cluster in
/// `clusterDir` (its client secret); "" if it does not answer.
func pingNode(port: Int, clusterDir: String) -> String {
    guard let config = try? ClusterConfig.load(clusterDir), let key = try? ClusterSecret.clientKey(dir: config.clusterDirectory, secretFile: nil) else { return "" }
    return NetworkTransport.ping(Endpoint(host: "127.0.0.1", port: port), credentials: Credentials(clusterId: config.clusterId, clientKey: key), timeoutMillis: 1000) ?? ""
}

func listenOn(port: Int) throws -> Int32 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var one: Int32 = 1
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = in_port_t(UInt16(port).bigEndian)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    let r = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    guard r == 0, listen(fd, 1) == 0 else { throw XCTSkip("could not occupy port \(port)") }
    return fd
}
