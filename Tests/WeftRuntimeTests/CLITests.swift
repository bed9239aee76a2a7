import Foundation
import XCTest

/// End-to-end: the real `weft` binary, real LMDB files, real processes.
final class CLITests: XCTestCase {
    var dir = ""
    override func setUp() {
        // A child that exits early must not kill the test runner when we write to its stdin.
        signal(SIGPIPE, SIG_IGN)
        dir = tempDir("weft-cli")
    }
    override func tearDown() { removeDir(dir) }

    func weft(_ args: String..., stdin: String? = nil, env: [String: String] = [:]) throws -> RunResult {
        try runWeft(args + ["--data-dir", dir], stdin: stdin, env: env)
    }

    func testPutGetDeleteScanSurviveProcessRestarts() throws {
        XCTAssertEqual(try weft("kv", "put", "k1", "hello world").status, 0)
        XCTAssertEqual(try weft("kv", "put", "k2", "two").status, 0)
        let g = try weft("kv", "get", "k1")
        XCTAssertEqual(g.status, 0)
        XCTAssertEqual(g.stdout, "hello world\n")
        XCTAssertEqual(try weft("kv", "del", "k1").status, 0)
        let missing = try weft("kv", "get", "k1")
        XCTAssertEqual(missing.status, 4)
        XCTAssertTrue(missing.stderr.contains("not found"), missing.stderr)
        let scan = try weft("kv", "scan", "--prefix", "k")
        XCTAssertEqual(scan.stdout, "k2\ttwo\n")
    }

    /// `weft table` and `weft job` as a user runs them: loads (lines and
    /// kv, with a repeated key refused by line number), a job with JSON
    /// output, an existing output refused then replaced, errors by name.
    func testTablesAndJobsFromTheCommandLine() throws {
        let text = dir + "/words.txt", kv = dir + "/kv.txt", dup = dir + "/dup.txt"
        try "a b a\n\nb c\n".write(toFile: text, atomically: true, encoding: .utf8)
        try "x\t1\ny\t2\n".write(toFile: kv, atomically: true, encoding: .utf8)
        try "x\t1\ny\t2\nx\t3\n".write(toFile: dup, atomically: true, encoding: .utf8)
        XCTAssertEqual(try weft("table", "load", "words", text).status, 0)
        XCTAssertEqual(try weft("table", "load", "pairs", kv, "--format", "kv").status, 0)
        let repeated = try weft("table", "load", "bad", dup, "--format", "kv")
        XCTAssertNotEqual(repeated.status, 0)
        XCTAssertTrue(repeated.stderr.contains("dup.txt:3: key 'x' repeats the key of line 1"), repeated.stderr)
        XCTAssertEqual(try weft("table", "scan", "words").stdout.split(separator: "\n").count, 3, "the empty line is a row too")

        let run = try weft("job", "run", "wordcount", "--input", "words", "--output", "wc", "--json")
        XCTAssertEqual(run.status, 0, run.stderr)
        let o = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any])
        XCTAssertEqual(o["output_rows"] as? Int, 3)
        XCTAssertEqual(o["output"] as? String, "wc")
        XCTAssertNotNil(o["committed_ts"] as? UInt64)
        XCTAssertEqual(try weft("table", "scan", "wc").stdout, "a\t2\nb\t2\nc\t1\n")

        let again = try weft("job", "run", "wordcount", "--input", "pairs", "--output", "wc")
        XCTAssertNotEqual(again.status, 0)
        XCTAssertTrue(again.stderr.contains("already exists"), again.stderr)
        XCTAssertEqual(try weft("job", "run", "wordcount", "--input", "pairs", "--output", "wc", "--overwrite").status, 0)
        XCTAssertEqual(try weft("table", "scan", "wc").stdout, "1\t1\n2\t1\nx\t1\ny\t1\n", "a kv table reads as key<TAB>value lines")

        // One thread and a 1 MiB bound: the same counts.
        let small = try weft("job", "run", "wordcount", "--input", "words", "--threads", "1", "--memory-mb", "1", "--json")
        XCTAssertEqual(small.status, 0, small.stderr)
        let so = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(small.stdout.utf8)) as? [String: Any])
        XCTAssertEqual(so["output_rows"] as? Int, 3)
        XCTAssertEqual(so["threads"] as? Int, 1)
        XCTAssertEqual(so["memory_bytes_max"] as? Int, 1 << 20)
        // One entry per stage run: word count is a map stage and a result stage.
        let stageTimes = try XCTUnwrap(so["stage_times"] as? [[String: Any]])
        XCTAssertEqual(stageTimes.count, so["stages"] as? Int)
        XCTAssertEqual(stageTimes.compactMap { $0["stage"] as? String }.filter { $0.hasPrefix("shuffle ") }.count, 1, "\(stageTimes)")
        XCTAssertTrue(stageTimes.allSatisfy { ($0["seconds"] as? Double ?? -1) >= 0 && ($0["tasks"] as? Int ?? 0) > 0 }, "\(stageTimes)")
        let badThreads = try weft("job", "run", "wordcount", "--input", "words", "--threads", "0")
        XCTAssertNotEqual(badThreads.status, 0)
        XCTAssertTrue(badThreads.stderr.contains("--threads must be 1...256"), badThreads.stderr)
        let badMemory = try weft("job", "run", "wordcount", "--input", "words", "--memory-mb", "0")
        XCTAssertTrue(badMemory.stderr.contains("--memory-mb must be"), badMemory.stderr)

        let unknownJob = try weft("job", "run", "frobnicate", "--input", "words")
        XCTAssertNotEqual(unknownJob.status, 0)
        XCTAssertTrue(unknownJob.stderr.contains("unknown job 'frobnicate'"), unknownJob.stderr)
        let unknownTable = try weft("job", "run", "wordcount", "--input", "nothing")
        XCTAssertTrue(unknownTable.stderr.contains("unknown table nothing"), unknownTable.stderr)
        XCTAssertEqual(try weft("table", "drop", "wc").status, 0)
        XCTAssertFalse(try weft("table", "list").stdout.contains("wc"))
    }

    /// A participant whose data file was emptied (or cut short) makes the
    /// command fail and say so, instead of answering with a third of the
    /// keys missing; files and directories are the owner's only.
    func testAnEmptiedOrTruncatedDataFileIsRefusedNotServedEmpty() throws {
        let d = dir + "/data"
        let statements = ["begin"] + (1...300).map { "put k\($0) v\($0)" } + ["commit"]
        XCTAssertEqual(try runWeft(["txn", "--data-dir", d], stdin: statements.joined(separator: "\n") + "\n").status, 0)
        XCTAssertEqual(try runWeft(["kv", "scan", "--data-dir", d, "--limit", "1000"]).stdout.split(separator: "\n").count, 300)
        var st = stat()
        for path in [d, d + "/participant-1", d + "/participant-1/data.mdb", d + "/weft.conf", d + "/LOCK"] {
            XCTAssertEqual(stat(path, &st), 0, path)
            XCTAssertEqual(st.st_mode & 0o077, 0, "\(path) is owner-only")
        }
        XCTAssertEqual(stat(d + "/participant-1/data.mdb", &st), 0)
        let size = st.st_size
        XCTAssertEqual(truncate(d + "/participant-1/data.mdb", size / 2), 0)
        var r = try runWeft(["kv", "scan", "--data-dir", d, "--limit", "1000"])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertFalse(r.signaled, "no SIGBUS")
        XCTAssertTrue(r.stderr.contains("participant-1/data.mdb is truncated"), r.stderr)
        XCTAssertEqual(r.stdout, "", "no partial answer")
        XCTAssertEqual(truncate(d + "/participant-1/data.mdb", 0), 0)
        r = try runWeft(["kv", "get", "k1", "--data-dir", d])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("is empty (0 bytes), but this environment held data"), r.stderr)
    }

    /// The "flipped byte": a byte flipped inside a stored value is
    /// an error naming the damaged record, never the wrong value.
    func testAFlippedByteInAStoredValueIsAnErrorNotAWrongValue() throws {
        let d = dir + "/data"
        let value = "balance-0123456789-abcdefghij"
        XCTAssertEqual(try runWeft(["kv", "put", "acct", value, "--data-dir", d]).status, 0)
        XCTAssertEqual(try runWeft(["kv", "get", "acct", "--data-dir", d]).stdout, value + "\n")
        // Flip one bit of every copy of the value in whichever participant holds it.
        var flipped = 0
        for p in 0..<3 {
            let path = d + "/participant-\(p)/data.mdb"
            guard var bytes = FileManager.default.contents(atPath: path).map(Array.init) else { continue }
            let needle = Array(value.utf8)
            var i = 0
            while i + needle.count <= bytes.count {
                if bytes[i] == needle[0] && Array(bytes[i..<(i + needle.count)]) == needle {
                    bytes[i + 8] ^= 0x01   // "balance-0..." becomes "balance-1..."
                    flipped += 1
                    i += needle.count
                } else {
                    i += 1
                }
            }
            try Data(bytes).write(to: URL(fileURLWithPath: path))
        }
        XCTAssertGreaterThan(flipped, 0, "the value is somewhere on disk")
        let r = try runWeft(["kv", "get", "acct", "--data-dir", d])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertFalse(r.stdout.contains("balance-1"), "a damaged value was returned: \(r.stdout)")
        XCTAssertTrue(r.stderr.contains("checksum mismatch") && r.stderr.contains("commit record commitTs="), r.stderr)
    }

    /// The full disk: reported as "no space left on device" (the
    /// file system fails LMDB's write-back with EIO), and what was
    /// committed before is intact. Needs root to mount a small tmpfs.
    func testAFullDiskSaysNoSpaceLeftAndLosesNothing() throws {
        let mnt = dir + "/small"
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        guard geteuid() == 0, mount("tmpfs", mnt, "tmpfs", 0, "size=3m") == 0 else { throw XCTSkip("cannot mount a small tmpfs here") }
        defer { umount(mnt) }
        let d = mnt + "/data"
        XCTAssertEqual(try runWeft(["kv", "put", "keep", "me", "--data-dir", d]).status, 0)
        let file = dir + "/big.txt"
        var rng = SystemRandomNumberGenerator()
        let text = (0..<8000).map { _ in String((0..<100).map { _ in "abcdefghijklmnopqrstuvwxyz0123456789".randomElement(using: &rng)! }) }.joined(separator: "\n") + "\n"
        try text.write(toFile: file, atomically: true, encoding: .utf8)
        var failure: RunResult?
        for i in 0..<8 {
            let r = try runWeft(["table", "load", "t\(i)", file, "--data-dir", d])
            if r.status != 0 {
                failure = r
                break
            }
        }
        let f = try XCTUnwrap(failure, "3 MiB filled up")
        XCTAssertTrue(f.stderr.contains("no space left on device"), f.stderr)
        XCTAssertFalse(f.stderr.contains("Input/output error"), f.stderr)
        XCTAssertEqual(try runWeft(["kv", "get", "keep", "--data-dir", d]).stdout, "me\n", "committed data is intact")
    }

    func testGetAtOldTimestampSeesOldVersion() throws {
        let first = try weft("kv", "put", "v", "old", "--json")
        let ts = try XCTUnwrap((try JSONSerialization.jsonObject(with: Data(first.stdout.utf8)) as? [String: Any])?["committed_ts"] as? UInt64)
        XCTAssertEqual(try weft("kv", "put", "v", "new").status, 0)
        XCTAssertEqual(try weft("kv", "get", "v", "--at", String(ts)).stdout, "old\n")
        XCTAssertEqual(try weft("kv", "get", "v", "--at", String(ts - 1)).status, 4)
        XCTAssertEqual(try weft("kv", "get", "v").stdout, "new\n")
    }

    func testEmptyAndOversizedKeysAndValuesAreRefusedAndLoseNothing() throws {
        XCTAssertEqual(try weft("kv", "put", "keep", "me").status, 0)
        let empty = try weft("kv", "put", "", "x")
        XCTAssertEqual(empty.status, 1)
        XCTAssertTrue(empty.stderr.contains("key is empty"), empty.stderr)
        let bigKey = try weft("kv", "put", String(repeating: "k", count: 4097), "x")
        XCTAssertEqual(bigKey.status, 1)
        XCTAssertTrue(bigKey.stderr.contains("Limits.keyBytesMax"), bigKey.stderr)
        XCTAssertEqual(try weft("kv", "put", String(repeating: "k", count: 4096), "max-key").status, 0)
        let file = dir + "-value"
        defer { removeDir(file) }
        _ = FileManager.default.createFile(atPath: file, contents: Data(repeating: 7, count: (1 << 20) + 1))
        let bigValue = try weft("kv", "put", "big", "--value-file", file)
        XCTAssertEqual(bigValue.status, 1)
        XCTAssertTrue(bigValue.stderr.contains("Limits.valueBytesMax"), bigValue.stderr)
        _ = FileManager.default.createFile(atPath: file, contents: Data(repeating: 7, count: 1 << 20))
        XCTAssertEqual(try weft("kv", "put", "big", "--value-file", file).status, 0)
        let got = try weft("kv", "get", "big", "--base64").stdout
        XCTAssertEqual(Data(base64Encoded: got.trimmingCharacters(in: .newlines)), Data(repeating: 7, count: 1 << 20))
        XCTAssertEqual(try weft("kv", "get", "keep").stdout, "me\n")
    }

    func testBinaryValuesThroughHexAndBase64() throws {
        XCTAssertEqual(try weft("kv", "put", "--hex", "00ff10", "00010203fffe").status, 0)
        XCTAssertEqual(try weft("kv", "get", "--hex", "00ff10").stdout, "00010203fffe\n")
        XCTAssertEqual(try weft("kv", "put", "b64", "--base64", "AAEC/w==").status, 0)
        XCTAssertEqual(try weft("kv", "get", "b64", "--base64").stdout, "AAEC/w==\n")
        let bad = try weft("kv", "put", "--hex", "zz", "00")
        XCTAssertEqual(bad.status, 1)
        XCTAssertTrue(bad.stderr.contains("not valid hex"), bad.stderr)
    }

    func testTxnScriptCommitsAtomicallyAndUnknownStatementCommitsNothing() throws {
        // Statements run as they are read: the first transaction commits;
        // the error aborts the open one, and on a pipe the command exits.
        let bad = try weft("txn", stdin: "put a 1\nput b 2\ncommit\nput c 3\nfrobnicate x\nput d 4\ncommit\n")
        XCTAssertEqual(bad.status, 1)
        XCTAssertTrue(bad.stderr.contains("line 5: unknown statement 'frobnicate'"), bad.stderr)
        XCTAssertTrue(bad.stderr.contains("aborted, nothing of it was committed"), bad.stderr)
        for k in ["a", "b"] { XCTAssertEqual(try weft("kv", "get", k).status, 0, "\(k) was committed before the error") }
        for k in ["c", "d"] { XCTAssertEqual(try weft("kv", "get", k).status, 4, "\(k) must not exist") }
        _ = try weft("txn", "-e", "del a", "-e", "del b")
        // A bad statement in a -e batch commits nothing of the batch.
        let badBatch = try weft("txn", "-e", "put e 1", "-e", "frobnicate")
        XCTAssertEqual(badBatch.status, 1)
        XCTAssertTrue(badBatch.stderr.contains("nothing was committed"), badBatch.stderr)
        XCTAssertEqual(try weft("kv", "get", "e").status, 4)
        // End of input with writes open: aborted, said, exit 1.
        let open = try weft("txn", stdin: "put f 1\n")
        XCTAssertEqual(open.status, 1)
        XCTAssertTrue(open.stderr.contains("end of input") && open.stderr.contains("aborted"), open.stderr)
        XCTAssertEqual(try weft("kv", "get", "f").status, 4)

        let ok = try weft("txn", stdin: "put a 1\nput b two words\nget a\ncommit\nget b\n")
        XCTAssertEqual(ok.status, 0, ok.stderr)
        let lines = ok.stdout.split(separator: "\n").map(String.init)
        XCTAssertEqual(lines[0], "ok")
        XCTAssertEqual(lines[1], "ok")
        XCTAssertEqual(lines[2], "1", "a transaction reads its own writes")
        XCTAssertTrue(lines[3].hasPrefix("committed at ts="), lines[3])
        XCTAssertEqual(lines[4], "two words")

        let batch = try weft("txn", "-e", "put x 10", "-e", "del a", "--json")
        XCTAssertEqual(batch.status, 0, batch.stderr)
        XCTAssertEqual(try weft("kv", "get", "x").stdout, "10\n")
        XCTAssertEqual(try weft("kv", "get", "a").status, 4)
    }

    /// A program reads a balance, then writes the new one, in ONE
    /// transaction through a pipe: each answer arrives before the next
    /// statement is written.
    func testInteractiveTxnReadModifyWriteThroughAPipe() throws {
        XCTAssertEqual(try weft("kv", "put", "alice", "100").status, 0)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: weftBinary)
        p.arguments = ["txn", "--data-dir", dir]
        let inp = Pipe(), out = Pipe()
        p.standardInput = inp
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        func readLine() -> String {
            var line = Data()
            while true {
                let b = out.fileHandleForReading.readData(ofLength: 1)
                if b.isEmpty || b[b.startIndex] == 10 { break }
                line.append(b)
            }
            return String(decoding: line, as: UTF8.self)
        }
        inp.fileHandleForWriting.write(Data("get alice\n".utf8))
        let balance = Int(readLine())
        XCTAssertEqual(balance, 100, "the answer arrives before the input ends")
        inp.fileHandleForWriting.write(Data("put alice \(balance! - 30)\n".utf8))
        XCTAssertEqual(readLine(), "ok")
        inp.fileHandleForWriting.write(Data("commit\n".utf8))
        XCTAssertTrue(readLine().hasPrefix("committed at ts="))
        try inp.fileHandleForWriting.close()
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 0)
        XCTAssertEqual(try weft("kv", "get", "alice").stdout, "70\n")
    }

    func testSecondProcessOnSameDataDirectoryGetsClearError() throws {
        XCTAssertEqual(try weft("kv", "put", "a", "1").status, 0)
        // A `weft txn` waiting for its script holds the directory.
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: weftBinary)
        holder.arguments = ["txn", "--data-dir", dir]
        let inp = Pipe()
        holder.standardInput = inp
        holder.standardOutput = FileHandle.nullDevice
        try holder.run()
        defer {
            try? inp.fileHandleForWriting.close()
            holder.waitUntilExit()
        }
        // Wait until the holder has the lock (its pid is in DIR/LOCK).
        for _ in 0..<500 {
            if let text = try? String(contentsOfFile: dir + "/LOCK", encoding: .utf8), text.hasPrefix("pid \(holder.processIdentifier):") { break }
            usleep(10_000)
        }
        let second = try weft("kv", "get", "a", env: ["WEFT_LOCK_WAIT_MS": "300"])
        XCTAssertEqual(second.status, 1)
        XCTAssertTrue(second.stderr.contains("in use by another process"), second.stderr)
        XCTAssertTrue(second.stderr.contains("pid \(holder.processIdentifier)"), "the error names the holder: \(second.stderr)")
        inp.fileHandleForWriting.write(Data("put b 2\ncommit\n".utf8))
        try inp.fileHandleForWriting.close()
        holder.waitUntilExit()
        XCTAssertEqual(holder.terminationStatus, 0)
        XCTAssertEqual(try weft("kv", "get", "b").stdout, "2\n")
        XCTAssertEqual(try weft("kv", "get", "a").stdout, "1\n")
    }

    func testReadOnlyDataDirectoryGivesClearError() throws {
        XCTAssertEqual(try weft("kv", "put", "a", "1").status, 0)
        if geteuid() == 0 {
            // Root ignores permissions: run the second command as nobody.
            guard FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv") else { throw XCTSkip("needs setpriv to drop root") }
            // Readable by others, writable by root only: to nobody it is a
            // read-only directory, which it can read but not write.
            chmod(dir, 0o755)
            for sub in FileManager.default.enumerator(atPath: dir)?.compactMap({ $0 as? String }) ?? [] {
                var isDir: ObjCBool = false
                _ = FileManager.default.fileExists(atPath: dir + "/" + sub, isDirectory: &isDir)
                chmod(dir + "/" + sub, isDir.boolValue ? 0o755 : 0o644)
            }
            let nobody = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            let r = try runWeft(["kv", "put", "b", "2", "--data-dir", dir], launcher: nobody)
            XCTAssertEqual(r.status, 1)
            XCTAssertTrue(r.stderr.contains("not writable") || r.stderr.contains("read-only") || r.stderr.contains("ermission"), r.stderr)
            let read = try runWeft(["kv", "get", "a", "--data-dir", dir], launcher: nobody)
            XCTAssertEqual(read.status, 0, read.stderr)
            XCTAssertEqual(read.stdout, "1\n", "a read-only directory can be read")
            let scan = try runWeft(["kv", "scan", "--data-dir", dir], launcher: nobody)
            XCTAssertEqual(scan.stdout.split(separator: "\n").first, "a\t1", scan.stderr)
        } else {
            chmod(dir, 0o555)
            defer { chmod(dir, 0o755) }
            let r = try weft("kv", "put", "b", "2")
            XCTAssertEqual(r.status, 1)
            XCTAssertTrue(r.stderr.contains("not writable") || r.stderr.contains("read-only"), r.stderr)
        }
        XCTAssertEqual(try weft("kv", "get", "a").stdout, "1\n", "nothing was lost")
        // --read-only: reads work, writes are refused before anything opens.
        XCTAssertEqual(try weft("kv", "get", "a", "--read-only").stdout, "1\n")
        let put = try weft("kv", "put", "c", "3", "--read-only")
        XCTAssertEqual(put.status, 1)
        XCTAssertTrue(put.stderr.contains("--read-only"), put.stderr)
    }

    func testKillNineMidWorkloadLosesNoAcknowledgedTransferAndConservesTotal() throws {
        var acked: [String] = []
        for round in 0..<3 {
            let r = try weft("debug", "bank", "--transfers", "400", "--kill-after", String(20 + 15 * round))
            XCTAssertTrue(r.signaled, "the workload must die by SIGKILL (status \(r.status)): \(r.stderr)")
            acked += r.stdout.split(separator: "\n").compactMap { $0.hasPrefix("ack ") ? String($0.split(separator: " ")[1]) : nil }
            let check = try weft("debug", "bank-check")
            XCTAssertEqual(check.status, 0, check.stderr)
            XCTAssertTrue(check.stdout.contains("accounts 20\n"), check.stdout)
            XCTAssertTrue(check.stdout.contains("total 20000\n"), "total conserved after kill -9: \(check.stdout.prefix(80))")
            let logged = Set(check.stdout.split(separator: "\n").compactMap { $0.hasPrefix("log ") ? String($0.dropFirst(4)) : nil })
            for t in acked { XCTAssertTrue(logged.contains(t), "acknowledged transfer \(t) was lost") }
            let doubt = try weft("admin", "in-doubt")
            XCTAssertEqual(doubt.stdout, "no in-doubt transactions\n", "reopening resolved every in-doubt transaction")
        }
        XCTAssertGreaterThan(acked.count, 50)
    }

    /// Keys chosen to live on different participants (hash partitioning over 3).
    let spread = ["alice", "bob", "carol", "dave", "erin", "frank"]

    func testCrashAfterPrepareLeavesInDoubtThatRecoveryAborts() throws {
        let script = spread.map { "put \($0) 1" }
        let r = try runWeft(["txn", "--data-dir", dir] + script.flatMap { ["-e", $0] }, env: ["WEFT_CRASH_AT": "participant.after-prepare-forced"])
        XCTAssertTrue(r.signaled, r.stderr)
        let doubt = try weft("admin", "in-doubt")
        XCTAssertTrue(doubt.stdout.contains("txn "), "the offline listing shows the prepared transaction: \(doubt.stdout)")
        XCTAssertTrue(doubt.stdout.contains("undecided"), doubt.stdout)
        // No COMMIT decision was forced: presumed abort, everywhere.
        for k in spread { XCTAssertEqual(try weft("kv", "get", k).status, 4, "\(k) must be absent") }
        XCTAssertEqual(try weft("admin", "in-doubt").stdout, "no in-doubt transactions\n")
    }

    func testCrashAfterDecisionCommitsEverywhereOnRecovery() throws {
        let script = spread.map { "put \($0) 7" }
        let r = try runWeft(["txn", "--data-dir", dir] + script.flatMap { ["-e", $0] }, env: ["WEFT_CRASH_AT": "coordinator.after-decision-forced"])
        XCTAssertTrue(r.signaled, r.stderr)
        XCTAssertFalse(r.stdout.contains("committed"), "the client never heard the outcome")
        let doubt = try weft("admin", "in-doubt")
        XCTAssertTrue(doubt.stdout.contains("commit (decided by coordinator)"), doubt.stdout)
        for k in spread { XCTAssertEqual(try weft("kv", "get", k).stdout, "7\n", "\(k) must be committed") }
        XCTAssertEqual(try weft("admin", "in-doubt").stdout, "no in-doubt transactions\n")
    }

    func testCrashBeforeDecisionAbortsEverywhere() throws {
        let script = spread.map { "put \($0) 9" }
        let r = try runWeft(["txn", "--data-dir", dir] + script.flatMap { ["-e", $0] }, env: ["WEFT_CRASH_AT": "coordinator.before-decision-forced"])
        XCTAssertTrue(r.signaled, r.stderr)
        for k in spread { XCTAssertEqual(try weft("kv", "get", k).status, 4) }
    }

    func testCrashAfterParticipantCommitKeepsAllOrNothing() throws {
        let script = spread.map { "put \($0) 5" }
        let r = try runWeft(["txn", "--data-dir", dir] + script.flatMap { ["-e", $0] }, env: ["WEFT_CRASH_AT": "participant.after-commit-forced"])
        XCTAssertTrue(r.signaled, r.stderr)
        // The decision was forced before any participant committed: all present.
        for k in spread { XCTAssertEqual(try weft("kv", "get", k).stdout, "5\n") }
    }
}
