import ArgumentParser
import Foundation
import WeftCore
import WeftDataflow
import WeftRuntime

struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "A tour of the embedded store: put, get, a multi-key transaction, a conflict, and a restart.",
        discussion: "Uses a fresh directory under /tmp unless --data-dir is given."
    )
    @Option(name: .customLong("data-dir"), help: "Data directory for the tour (default: a new temporary directory).")
    var dataDir: String?

    func run() async throws {
        let dir = dataDir ?? NSTemporaryDirectory() + "weft-demo-\(getpid())-\(wallMillis())"
        func say(_ s: String) { print(s) }
        func show(_ b: Bytes?) -> String { b.map { String(decoding: $0, as: UTF8.self) } ?? "(nil)" }
        say("== Weft tour: embedded coordinator + 3 participants, data in \(dir)")
        var cluster = try open(dir)
        var client = cluster.client()
        defer { _ = cluster }
        for p in 0..<3 {
            say("   participant-\(p): LMDB environment \(cluster.layout.participant(p))")
        }

        say("\n1. put and get (a single-key write runs one-phase commit on the key's owner)")
        let t1 = try await client.put(b("greeting"), b("hello, weft"))
        say("   put greeting = 'hello, weft'   -> committed at ts=\(t1) on participant-\(client.owner(of: b("greeting")))")
        say("   get greeting                    -> '\(show(try await client.get(b("greeting")).value))'")

        say("\n2. a multi-key transaction across participants (two-phase commit)")
        let setup = try await client.begin()
        for (k, v) in [("alice", "100"), ("bob", "50"), ("carol", "0")] { try setup.put(b(k), b(v)) }
        let ts0 = try await setup.commit()
        say("   open accounts alice=100 bob=50 carol=0 -> committed at ts=\(ts0)")
        say("   owners: alice->participant-\(client.owner(of: b("alice"))), bob->participant-\(client.owner(of: b("bob"))), carol->participant-\(client.owner(of: b("carol")))")
        let transfer = try await client.begin()
        let a = Int(show(try await transfer.get(b("alice"))))!
        let c = Int(show(try await transfer.get(b("carol"))))!
        try transfer.put(b("alice"), b(String(a - 30)))
        try transfer.put(b("carol"), b(String(c + 30)))
        let ts1 = try await transfer.commit()
        say("   transfer 30 alice -> carol       -> committed at ts=\(ts1)")
        say("   snapshot at ts=\(ts0): alice=\(show(try await client.get(b("alice"), at: ts0).value)) carol=\(show(try await client.get(b("carol"), at: ts0).value))   (before)")
        say("   snapshot at ts=\(ts1): alice=\(show(try await client.get(b("alice"), at: ts1).value)) carol=\(show(try await client.get(b("carol"), at: ts1).value))   (after)")

        say("\n3. a conflict: two transactions read bob, both try to write it")
        let x = try await client.begin()
        let y = try await client.begin()
        let bx = Int(show(try await x.get(b("bob"))))!
        let by = Int(show(try await y.get(b("bob"))))!
        try x.put(b("bob"), b(String(bx + 10)))
        try x.put(b("alice"), b("70"))
        try y.put(b("bob"), b(String(by - 10)))
        try y.put(b("carol"), b("30"))
        let tx = try await x.commit()
        say("   first:  bob += 10                -> committed at ts=\(tx)")
        do {
            _ = try await y.commit()
            say("   second: bob -= 10                -> committed (unexpected!)")
        } catch let e as WeftError {
            say("   second: bob -= 10                -> aborted: \(e.message)")
        }
        say("   bob is now \(show(try await client.get(b("bob")).value)): the lost update was prevented")

        say("\n4. restart: close every node, reopen from the LMDB files")
        client.close()
        cluster.close()
        cluster = try open(dir)
        client = cluster.client()
        for k in ["greeting", "alice", "bob", "carol"] {
            say("   after restart: \(k) = \(show(try await client.get(b(k)).value))")
        }
        client.close()
        cluster.close()
        let me = CommandLine.arguments[0]
        if FileManager.default.isExecutableFile(atPath: me) {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: me)
            p.arguments = ["kv", "scan", "--data-dir", dir]
            let pipe = Pipe()
            p.standardOutput = pipe
            p.standardError = FileHandle.nullDevice
            try p.run()
            let out = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            p.waitUntilExit()
            say("\n5. a new process (weft kv scan --data-dir \(dir)) sees:")
            for line in out.split(separator: "\n") { say("   \(line)") }
        }
        say("\n6. dataflow over committed snapshots: a generated corpus and graph, word count and PageRank")
        cluster = try open(dir)
        let jobClient = cluster.client()
        client = jobClient
        var rng = SystemRandomNumberGenerator()
        let words = ["the", "of", "and", "weft", "warp", "loom", "thread", "lineage", "commit", "snapshot", "shuttle", "fabric", "partition", "replica", "stage"]
        let corpus = (0..<2000).map { i -> (Bytes, Bytes) in
            // Zipf-like: low word indexes are much more frequent.
            let line = (0..<(3 + i % 9)).map { _ in words[min(words.count - 1, Int(Double(words.count) * pow(Double.random(in: 0..<1, using: &rng), 3)))] }
            return (Array(String(format: "%012d", i + 1).utf8), Array(line.joined(separator: " ").utf8))
        }
        let graph = (0..<1500).map { i -> (Bytes, Bytes) in
            let src = Int.random(in: 0..<200, using: &rng)
            let dst = Int(200 * pow(Double.random(in: 0..<1, using: &rng), 2))
            return (Array(String(format: "%012d", i + 1).utf8), Array("v\(src) v\(dst)".utf8))
        }
        let cts = try await TableStore.write(jobClient, "corpus", rows: corpus, format: "lines", overwrite: true)
        let gts = try await TableStore.write(jobClient, "graph", rows: graph, format: "lines", overwrite: true)
        say("   table corpus: \(corpus.count) lines, committed at ts=\(cts)")
        say("   table graph:  \(graph.count) edges over 200 vertices, committed at ts=\(gts)")
        let sc = DataflowContext()
        for (job, input, output) in [("wordcount", "corpus", "corpus_counts"), ("pagerank", "graph", "graph_ranks")] {
            var p = JobParameters(input: input)
            p.output = output
            p.overwrite = true
            let params = p
            let r = try await onDriverThread {
                try runLeased(job, params, sc: sc, client: jobClient)
            }
            say("   weft job run \(job) --input \(input) --output \(output)   (snapshot ts=\(r.snapshotTs))")
            for line in r.summary { say("     \(line)") }
        }
        let explain = try await onDriverThread {
            try BuiltinJobs.plan("pagerank", { var p = JobParameters(input: "graph"); p.iterations = 1; return p }(), sc: DataflowContext(), client: jobClient, malformed: sc.accumulator("m")).toDebugString()
        }
        say("   lineage of one PageRank iteration (weft job explain pagerank --input graph --iterations 1):")
        for line in explain.split(separator: "\n") { say("     \(line)") }
        client.close()
        cluster.close()

        say("\n7. weft server: one process holds the directory; each command is a thin client of it")
        let selfPath = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
        for args in [["server", "start", "--redis-port", "0"], ["kv", "get", "alice"], ["table", "list"], ["job", "run", "wordcount", "--input", "corpus"],
                     ["server", "status"]] {
            let (status, text, millis) = runSelf(selfPath, args + ["--data-dir", dir])
            say("   $ weft \(args.joined(separator: " "))   (\(millis) ms, exit \(status))")
            for line in text.split(separator: "\n") where !line.hasPrefix("[stage") { say("     \(line)") }
            if status != 0 { fail(WeftError(.unavailable, "the demo's `weft \(args.joined(separator: " "))` failed"), json: false) }
        }
        say("\n8. The same server speaks the Redis protocol (redis-cli, redis-py, ... work unchanged)")
        // Redis clients AUTH with the directory's client secret (mode 0600).
        let secret = (try? ClusterSecret.clientKey(dir: dir, secretFile: nil)).map(ClusterSecret.hex) ?? ""
        let redisSteps: [[String]] = [["AUTH", secret], ["MSET", "bob", "50", "dave", "10"], ["INCRBY", "alice", "5"], ["MGET", "alice", "bob", "dave"],
                                      ["MULTI"], ["DECRBY", "alice", "25"], ["INCRBY", "dave", "25"], ["EXEC"], ["MGET", "alice", "dave"]]
        // Port 0 asked for any free port; the SERVER file says which.
        let redisPort = ServerFile.read(dir)?.redis?.port ?? 0
        if let answers = DemoRESP.exchange(port: redisPort, redisSteps) {
            for (cmd, answer) in zip(redisSteps, answers) {
                let shown = cmd[0] == "AUTH" ? "AUTH $(cat \(dir)/\(ClusterSecret.clientFileName))" : cmd.joined(separator: " ")
                say("   > \(shown)\n     \(answer)")
            }
        } else {
            say("   (could not reach the Redis port \(redisPort); skipped)")
        }
        let (status, text, millis) = runSelf(selfPath, ["server", "stop", "--data-dir", dir])
        say("   $ weft server stop   (\(millis) ms, exit \(status))\n     \(text.trimmingCharacters(in: .whitespacesAndNewlines))")
        say("\nDone. Try: weft server start --data-dir \(dir)")
        say("      weft kv get alice --data-dir \(dir)")
        say("      weft table scan corpus_counts --data-dir \(dir)")
    }

    /// Runs this binary with `args`; exit status, output, milliseconds.
    func runSelf(_ me: String, _ args: [String]) -> (Int32, String, UInt64) {
        let t0 = wallMillis()
        let p = Process()
        p.executableURL = URL(fileURLWithPath: me)
        p.arguments = args
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        p.standardInput = FileHandle.nullDevice
        do { try p.run() } catch { return (127, "cannot run \(me): \(error)", 0) }
        let text = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        return (p.terminationStatus, text, wallMillis() - t0)
    }

    func open(_ dir: String) throws -> EmbeddedCluster {
        do { return try EmbeddedCluster(dataDir: dir) } catch { fail(error, json: false) }
    }
}

func b(_ s: String) -> Bytes { Array(s.utf8) }

/// A few RESP requests over one socket, for the demo: each answer on one line.
enum DemoRESP {
    static func exchange(port: Int, _ commands: [[String]]) -> [String]? {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let ok = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard ok == 0 else { return nil }
        var tv = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var buffer: [UInt8] = []
        func line() -> String? {
            while true {
                if let i = buffer.firstIndex(of: 10) {
                    let s = String(decoding: buffer[..<i], as: UTF8.self).trimmingCharacters(in: .newlines)
                    buffer.removeFirst(i + 1)
                    return s
                }
                var chunk = [UInt8](repeating: 0, count: 4096)
                let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                if n <= 0 { return nil }
                buffer += chunk[..<n]
            }
        }
        func reply() -> String? {
            guard let l = line(), let first = l.first else { return nil }
            switch first {
            case "+", ":": return String(l.dropFirst())
            case "-": return "(error) " + l.dropFirst()
            case "$": return Int(l.dropFirst()) == -1 ? "(nil)" : line()
            case "*":
                guard let n = Int(l.dropFirst()), n >= 0 else { return "(nil)" }
                var items: [String] = []
                for _ in 0..<n { guard let r = reply() else { return nil }; items.append(r) }
                return "[" + items.joined(separator: ", ") + "]"
            default: return l
            }
        }
        var answers: [String] = []
        for c in commands {
            let wire = "*\(c.count)\r\n" + c.map { "$\($0.utf8.count)\r\n\($0)\r\n" }.joined()
            guard wire.withCString({ send(fd, $0, strlen($0), Int32(MSG_NOSIGNAL)) }) > 0, let r = reply() else { return nil }
            answers.append(r)
        }
        return answers
    }
}
