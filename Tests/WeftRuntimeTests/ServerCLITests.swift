import Foundation
import XCTest

/// `weft server` as a user runs it: the real binary, a real background
/// server process, real TCP on loopback, real `kill -9`.
final class ServerCLITests: XCTestCase {
    var dir = ""
    override func setUp() {
        signal(SIGPIPE, SIG_IGN)
        dir = tempDir("weft-server")
    }
    override func tearDown() {
        if let pid = serverPid() { kill(pid, SIGKILL) }
        removeDir(dir)
    }

    func weft(_ args: String..., env: [String: String] = [:]) throws -> RunResult {
        try runWeft(args + ["--data-dir", dir], env: env)
    }

    func serverPid() -> Int32? {
        guard let text = try? String(contentsOfFile: dir + "/SERVER", encoding: .utf8) else { return nil }
        return text.split(separator: "\n").first { $0.hasPrefix("pid=") }.flatMap { Int32($0.dropFirst(4)) }
    }

    func json(_ s: String) throws -> [String: Any] {
        try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(s.utf8)) as? [String: Any], s)
    }

    /// Commands go through the server: 20 started at once all succeed
    /// (none is `locked`), tables load and jobs run through it, a second
    /// server is refused by the first's pid and address, and after `stop`
    /// a one-shot command finds everything.
    func testCommandsGoThroughTheServerAndConcurrentClientsAllSucceed() throws {
        let start = try weft("server", "start")
        XCTAssertEqual(start.status, 0, start.stderr)
        let status = try weft("server", "status", "--json")
        XCTAssertEqual(status.status, 0, status.stderr)
        let s = try json(status.stdout)
        XCTAssertEqual(s["running"] as? Bool, true)
        XCTAssertEqual(s["state"] as? String, "serving")
        let pid = try XCTUnwrap(s["pid"] as? Int)
        let address = try XCTUnwrap(s["address"] as? String)
        XCTAssertEqual(serverPid(), Int32(pid))
        XCTAssertTrue(try String(contentsOfFile: dir + "/LOCK", encoding: .utf8).hasPrefix("pid \(pid):"), "the server holds the directory")

        // 20 writers at once, each its own process.
        let procs = (0..<20).map { i -> Process in
            let p = Process()
            p.executableURL = URL(fileURLWithPath: weftBinary)
            p.arguments = ["kv", "put", "key\(i)", "value\(i)", "--data-dir", dir]
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle.nullDevice
            return p
        }
        for p in procs { try p.run() }
        for p in procs { p.waitUntilExit() }
        XCTAssertEqual(procs.map(\.terminationStatus), Array(repeating: 0, count: 20), "no client fails with `locked`")
        let scan = try weft("kv", "scan", "--prefix", "key", "--limit", "100")
        XCTAssertEqual(scan.stdout.split(separator: "\n").count, 20, scan.stdout)
        // The fast path (kv get/put, table list through a server) answers
        // exactly as the full commands do.
        XCTAssertEqual(try weft("kv", "get", "key3").stdout, "value3\n")
        let missing = try weft("kv", "get", "nope")
        XCTAssertEqual(missing.status, 4)
        XCTAssertEqual(missing.stderr, "error: key nope not found\n")
        let missingJSON = try weft("kv", "get", "nope", "--json")
        XCTAssertEqual(missingJSON.status, 4)
        XCTAssertEqual(try json(missingJSON.stdout)["found"] as? Bool, false)
        let found = try json(try weft("kv", "get", "key3", "--json").stdout)
        XCTAssertEqual(found["value"] as? String, "value3")
        XCTAssertNotNil(found["version"] as? UInt64)
        let put = try weft("kv", "put", "fast", "1", "--json")
        XCTAssertEqual(put.status, 0)
        XCTAssertNotNil(try json(put.stdout)["committed_ts"] as? UInt64)
        let empty = try weft("kv", "put", "", "x")
        XCTAssertEqual(empty.status, 1)
        XCTAssertTrue(empty.stderr.contains("key is empty"), empty.stderr)
        XCTAssertEqual(try weft("table", "list").stdout, "no tables\n")

        let words = dir + "/../words-\(pid).txt"
        try "a b a\n\nb c\n".write(toFile: words, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: words) }
        XCTAssertEqual(try weft("table", "load", "words", words).status, 0)
        let listed = try json(try weft("table", "list", "--json").stdout)
        XCTAssertEqual(listed["table"] as? String, "words")
        XCTAssertEqual(listed["rows"] as? Int, 3)
        XCTAssertEqual(listed["layout"] as? String, "blocks")
        let run = try weft("job", "run", "wordcount", "--input", "words", "--output", "wc", "--json")
        XCTAssertEqual(run.status, 0, run.stderr)
        XCTAssertEqual(try json(run.stdout)["output_rows"] as? Int, 3)
        XCTAssertEqual(try weft("table", "scan", "wc").stdout, "a\t2\nb\t2\nc\t1\n")
        // The job ran in the server; its errors come back with their exit codes.
        let unknown = try weft("job", "run", "wordcount", "--input", "nope")
        XCTAssertEqual(unknown.status, 4, unknown.stderr)
        XCTAssertTrue(unknown.stderr.contains("unknown table nope"), unknown.stderr)
        let exists = try weft("job", "run", "wordcount", "--input", "words", "--output", "wc")
        XCTAssertEqual(exists.status, 1)
        XCTAssertTrue(exists.stderr.contains("already exists"), exists.stderr)

        let second = try weft("server", "start")
        XCTAssertNotEqual(second.status, 0)
        XCTAssertTrue(second.stderr.contains("pid \(pid)") && second.stderr.contains(address), second.stderr)

        let stop = try weft("server", "stop")
        XCTAssertEqual(stop.status, 0, stop.stderr)
        XCTAssertFalse(processAlive(Int32(pid)))
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/SERVER"))
        XCTAssertEqual(try weft("server", "status").status, 1)
        // One-shot, no server: the same data.
        let get = try weft("kv", "get", "key7")
        XCTAssertEqual(get.stdout, "value7\n")
        XCTAssertEqual(get.stderr, "", "no notice when no server was recorded")
        XCTAssertEqual(try weft("table", "scan", "wc").stdout, "a\t2\nb\t2\nc\t1\n")
    }

    /// A job runs in the server; when its client dies (Ctrl-C, kill), the
    /// job stops at its next task instead of running on, and the server
    /// keeps serving. A 10,000-iteration job's deep lineage does not
    /// overflow the driver's stack.
    func testAJobWhoseClientDiesStops() throws {
        XCTAssertEqual(try weft("server", "start").status, 0)
        let graph = dir + "/../graph-\(getpid()).txt"
        var rng = SystemRandomNumberGenerator()
        try (0..<30_000).map { _ in "v\(Int.random(in: 0..<3000, using: &rng)) v\(Int.random(in: 0..<3000, using: &rng))" }.joined(separator: "\n")
            .write(toFile: graph, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: graph) }
        XCTAssertEqual(try weft("table", "load", "g", graph).status, 0)
        let job = Process()
        job.executableURL = URL(fileURLWithPath: weftBinary)
        job.arguments = ["job", "run", "pagerank", "--input", "g", "--iterations", "10000", "--data-dir", dir]
        job.standardOutput = FileHandle.nullDevice
        job.standardError = FileHandle.nullDevice
        try job.run()
        func running() throws -> Int? { try json(try weft("server", "status", "--json").stdout)["jobs_running"] as? Int }
        var started = false
        for _ in 0..<100 where !started {
            started = try running() == 1
            if !started { usleep(50_000) }
        }
        XCTAssertTrue(started, "the job runs in the server")
        kill(job.processIdentifier, SIGKILL)
        job.waitUntilExit()
        var stopped = false
        for _ in 0..<100 where !stopped {
            stopped = try running() == 0
            if !stopped { usleep(50_000) }
        }
        XCTAssertTrue(stopped, "the job stopped within 5 s of its client's death")
        XCTAssertEqual(try weft("kv", "put", "after", "1").status, 0, "the server still serves")
        XCTAssertEqual(try weft("server", "stop").status, 0)
    }

    /// A server killed with `kill -9` leaves its address file; the lock
    /// shows it is stale, and the next command opens the directory itself
    /// with a one-line notice and loses nothing.
    func testStaleServerFileFallsBackToOpeningTheDirectory() throws {
        XCTAssertEqual(try weft("server", "start").status, 0)
        XCTAssertEqual(try weft("kv", "put", "k", "v").status, 0)
        let pid = try XCTUnwrap(serverPid())
        kill(pid, SIGKILL)
        for _ in 0..<200 where processAlive(pid) { usleep(10_000) }
        let get = try weft("kv", "get", "k")
        XCTAssertEqual(get.status, 0, get.stderr)
        XCTAssertEqual(get.stdout, "v\n")
        XCTAssertEqual(get.stderr.split(separator: "\n").count, 1, get.stderr)
        XCTAssertTrue(get.stderr.contains("pid \(pid)") && get.stderr.contains("is gone"), get.stderr)
        XCTAssertEqual(try weft("server", "status").status, 1)
        // And a new server starts on it.
        XCTAssertEqual(try weft("server", "start").status, 0)
        XCTAssertEqual(try weft("kv", "get", "k").stdout, "v\n")
        XCTAssertEqual(try weft("server", "stop").status, 0)
    }

    /// The server killed in the middle of a `table load`: the load fails,
    /// the next command works, the table is absent (never partial), and
    /// `table gc` deletes the blocks the dead load left.
    func testServerKilledMidLoadLeavesNoPartialTableAndGcCollectsOrphans() throws {
        XCTAssertEqual(try weft("server", "start").status, 0)
        let pid = try XCTUnwrap(serverPid())
        let file = dir + "/../big-\(pid).txt"
        let line = String(repeating: "the quick brown fox jumps over the lazy dog ", count: 2) + "\n"
        try String(repeating: line, count: 400_000).write(toFile: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: file) }
        let load = Process()
        load.executableURL = URL(fileURLWithPath: weftBinary)
        load.arguments = ["table", "load", "big", file, "--data-dir", dir]
        let err = Pipe()
        load.standardOutput = FileHandle.nullDevice
        load.standardError = err
        try load.run()
        // Kill the server once the load has written some blocks.
        var sawBlocks = false
        for _ in 0..<500 {
            if let log = try? String(contentsOfFile: dir + "/participant-0/data.mdb", encoding: .isoLatin1), log.contains("b/t:big@") { sawBlocks = true; break }
            usleep(5_000)
        }
        kill(pid, SIGKILL)
        _ = err.fileHandleForReading.readDataToEndOfFile()
        load.waitUntilExit()
        XCTAssertTrue(sawBlocks, "the load had written blocks before the kill")
        XCTAssertNotEqual(load.terminationStatus, 0, "the load cannot have succeeded")
        let list = try weft("table", "list")
        XCTAssertEqual(list.status, 0, list.stderr)
        XCTAssertTrue(list.stdout.contains("no tables"), "no partial table: \(list.stdout)")
        let pending = try weft("table", "gc", "--list")
        XCTAssertTrue(pending.stdout.contains("big@") && pending.stdout.contains("loading"), pending.stdout)
        let gc = try weft("table", "gc")
        XCTAssertEqual(gc.status, 0, gc.stderr)
        XCTAssertTrue(gc.stdout.contains("deleted the blocks of 1 generations"), gc.stdout)
        let left = try weft("kv", "scan", "--prefix", "b/t:big@", "--limit", "10")
        XCTAssertEqual(left.stdout, "", "every orphan block is gone")
    }
}
