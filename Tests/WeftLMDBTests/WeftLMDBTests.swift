import Foundation
import Glibc
import Synchronization
import XCTest
@testable import WeftLMDB

/// Big-endian, so byte order == numeric order.
func key(_ i: Int) -> [UInt8] { withUnsafeBytes(of: UInt64(i).bigEndian) { Array($0) } }

/// Distinct per `i` (its key first, then a fill byte derived from it).
func value(_ i: Int, size: Int) -> [UInt8] {
    Array((key(i) + [UInt8](repeating: UInt8(truncatingIfNeeded: i &* 31), count: max(0, size - 8))).prefix(size))
}

final class WeftLMDBTests: XCTestCase {
    // MARK: Helpers

    /// A fresh path under the temp directory (not created), removed after the test.
    func tempPath(create: Bool = false) throws -> String {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("weft-lmdb-\(UUID().uuidString)")
        if create { try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true) }
        addTeardownBlock {
            chmod(url.path, 0o755)
            try? FileManager.default.removeItem(at: url)
        }
        return url.path
    }

    func open(_ path: String, _ tweak: (inout LMDBEnvironment.Options) -> Void = { _ in }) throws -> LMDBEnvironment {
        var options = LMDBEnvironment.Options()
        options.durable = false
        tweak(&options)
        return try LMDBEnvironment(directory: path, options: options)
    }

    /// Runs `body`, expecting an LMDBError with `code` whose text is words (not a bare number)
    /// and mentions every string in `mentions`.
    func assertError(_ code: LMDBError.Code, mentions: [String] = [], file: StaticString = #filePath,
                     line: UInt = #line, _ body: () throws -> Void) {
        do {
            try body()
            XCTFail("expected \(code), nothing thrown", file: file, line: line)
        } catch let error as LMDBError {
            XCTAssertEqual(error.code, code, "\(error)", file: file, line: line)
            assertWords(error, file: file, line: line)
            for text in mentions {
                XCTAssertTrue(error.description.contains(text), "'\(error)' lacks '\(text)'", file: file, line: line)
            }
        } catch {
            XCTFail("expected LMDBError, got \(error)", file: file, line: line)
        }
    }

    func assertWords(_ error: LMDBError, file: StaticString = #filePath, line: UInt = #line) {
        let words = error.description.split(whereSeparator: { !$0.isLetter }).filter { $0.count >= 3 }
        XCTAssertGreaterThanOrEqual(words.count, 3, "not words: '\(error)'", file: file, line: line)
    }

    // MARK: Basics

    func testPutGetDeleteRoundTrip() throws {
        let env = try open(try tempPath())
        XCTAssertEqual(env.staleReadersCleared, 0)
        XCTAssertEqual(env.maxKeyBytes, 511)
        let db = try env.database("things")
        XCTAssertEqual(try env.database("things"), db, "handles are cached")

        try env.write { txn in
            try txn.put(db, Array("alpha".utf8), [1, 2, 3])
            try txn.put(db, "beta".utf8, [4])
            try [UInt8]("gamma".utf8).withUnsafeBytes { k in
                try [UInt8](repeating: 9, count: 5000).withUnsafeBytes { v in try txn.put(db, k, v) }
            }
            XCTAssertEqual(try txn.get(db, "alpha".utf8), [1, 2, 3], "a txn sees its own writes")
        }
        try env.read { txn in
            XCTAssertEqual(try txn.get(db, Array("alpha".utf8)), [1, 2, 3])
            XCTAssertEqual(try txn.get(db, "beta".utf8), [4])
            XCTAssertEqual(try txn.withValue(db, "gamma".utf8) { $0?.count }, 5000)
            XCTAssertNil(try txn.get(db, "delta".utf8))
            XCTAssertTrue(try txn.withValue(db, "delta".utf8) { $0 == nil })
            XCTAssertEqual(try txn.count(db), 3)
        }
        try env.write { txn in
            try txn.put(db, "alpha".utf8, [7])
            XCTAssertTrue(try txn.delete(db, "beta".utf8))
            XCTAssertFalse(try txn.delete(db, "beta".utf8))
        }
        try env.read { txn in
            XCTAssertEqual(try txn.get(db, "alpha".utf8), [7])
            XCTAssertNil(try txn.get(db, "beta".utf8))
        }
        XCTAssertEqual(try env.stat(db).entries, 2)
        XCTAssertGreaterThanOrEqual(try env.stat(db).overflowPages, 1, "a 5000-byte value overflows a page")
        try env.write { try $0.drop(db) }
        XCTAssertEqual(try env.read { try $0.count(db) }, 0)
        XCTAssertNil(try env.read { try $0.last(db) })
    }

    func testCursorOrderAndRangeStart() throws {
        let env = try open(try tempPath())
        let db = try env.database("ordered")
        let numbers = Array(stride(from: 0, to: 200, by: 2)).shuffled()
        try env.write { txn in for i in numbers { try txn.put(db, key(i), value(i, size: 8)) } }

        func scan(from start: [UInt8]?, limit: Int = .max) throws -> [Int] {
            try env.read { txn in
                var seen: [Int] = []
                try txn.forEach(db, from: start) { k, v in
                    let n = Int(k.loadUnaligned(as: UInt64.self).bigEndian)
                    XCTAssertEqual(Array(v), value(n, size: 8))
                    seen.append(n)
                    return seen.count < limit
                }
                return seen
            }
        }
        XCTAssertEqual(try scan(from: nil), Array(stride(from: 0, to: 200, by: 2)))
        XCTAssertEqual(try scan(from: []), Array(stride(from: 0, to: 200, by: 2)))
        XCTAssertEqual(try scan(from: key(100)), Array(stride(from: 100, to: 200, by: 2)), "exact start key")
        XCTAssertEqual(try scan(from: key(101)), Array(stride(from: 102, to: 200, by: 2)), "starts at next greater")
        XCTAssertEqual(try scan(from: key(500)), [], "past the end")
        XCTAssertEqual(try scan(from: key(10), limit: 3), [10, 12, 14], "returning false stops")
        let last = try env.read { try $0.last(db) }
        XCTAssertEqual(last?.key, key(198))
        XCTAssertEqual(last?.value, value(198, size: 8))
    }

    func testAppend() throws {
        let env = try open(try tempPath())
        let db = try env.database("log")
        try env.write { txn in for i in 0..<1000 { try txn.put(db, key(i), value(i, size: 16), append: true) } }
        try env.read { txn in
            XCTAssertEqual(try txn.count(db), 1000)
            XCTAssertEqual(try txn.get(db, key(500)), value(500, size: 16))
        }
        assertError(.invalidArgument, mentions: ["append", "log"]) {
            try env.write { txn in try txn.put(db, key(5), [0], append: true) }
        }
        XCTAssertEqual(try env.read { try $0.get(db, key(5)) }, value(5, size: 16), "failed append changed nothing")
    }

    func testReopenAfterCloseKeepsData() throws {
        let path = try tempPath()
        do {
            let env = try open(path) { $0.durable = true }
            let db = try env.database("durable")
            try env.write { txn in for i in 0..<100 { try txn.put(db, key(i), value(i, size: 100)) } }
            try env.sync()
            env.close()
            env.close()  // idempotent
            assertError(.invalidArgument, mentions: ["closed", path]) { _ = try env.read { _ in 0 } }
        }
        let env = try open(path)
        let db = try env.database("durable", create: false)
        try env.read { txn in
            XCTAssertEqual(try txn.count(db), 100)
            for i in 0..<100 { XCTAssertEqual(try txn.get(db, key(i)), value(i, size: 100)) }
        }
        env.close()

        let reader = try open(path) { $0.readOnly = true }
        let readerDB = try reader.database("durable")
        XCTAssertEqual(try reader.read { try $0.get(readerDB, key(7)) }, value(7, size: 100))
        assertError(.notFound, mentions: ["missing", path]) { _ = try reader.database("missing") }
        assertError(.readOnly, mentions: ["read-only", path]) { try reader.write { _ in } }
    }

    // MARK: Map size

    func testMapGrowsAndRetriesBody() throws {
        let env = try open(try tempPath()) { $0.mapSizeBytes = 1 << 20 }
        let db = try env.database("bulk")
        XCTAssertEqual(env.mapSizeBytes, 1 << 20)
        var bodyRuns = 0
        for batch in 0..<20 {  // 20 x 1000 x 1000 bytes ~ 20 MB
            try env.write { txn in
                bodyRuns += 1
                for i in batch * 1000..<(batch + 1) * 1000 { try txn.put(db, key(i), value(i, size: 1000)) }
            }
        }
        XCTAssertGreaterThan(bodyRuns, 20, "map-full retries re-ran the body")
        XCTAssertGreaterThanOrEqual(env.mapSizeBytes, 20 << 20)
        XCTAssertLessThanOrEqual(env.mapSizeBytes, env.mapSizeBytesMax)
        try env.read { txn in
            XCTAssertEqual(try txn.count(db), 20_000)
            for i in 0..<20_000 { XCTAssertEqual(try txn.get(db, key(i)), value(i, size: 1000)) }
        }
    }

    func testMapFullAtCapLeavesCommittedDataIntact() throws {
        let env = try open(try tempPath()) { $0.mapSizeBytes = 1 << 20; $0.mapSizeBytesMax = 1 << 20 }
        let db = try env.database("capped")
        var committed = 0, failedBodyRuns = 0
        var failure: LMDBError?
        while failure == nil {
            failedBodyRuns = 0
            do {
                try env.write { txn in
                    failedBodyRuns += 1
                    for i in committed..<committed + 20 { try txn.put(db, key(i), value(i, size: 1000)) }
                }
                committed += 20
            } catch let error as LMDBError {
                failure = error
            }
            XCTAssertLessThan(committed, 2000, "1 MiB cannot hold 2 MB")
        }
        XCTAssertEqual(failure?.code, .mapFull)
        XCTAssertEqual(failedBodyRuns, 1, "no retry at the cap")
        XCTAssertTrue(failure!.description.contains("map full (map size 1 MiB, limit 1 MiB)"), "\(failure!)")
        assertWords(failure!)
        XCTAssertGreaterThan(committed, 0)
        XCTAssertEqual(env.mapSizeBytes, 1 << 20)
        try env.read { txn in
            XCTAssertEqual(try txn.count(db), committed, "the failed txn left nothing")
            for i in 0..<committed { XCTAssertEqual(try txn.get(db, key(i)), value(i, size: 1000)) }
            XCTAssertNil(try txn.get(db, key(committed)))
        }
        try env.write { txn in try txn.put(db, key(0), value(0, size: 10)) }  // still writable
    }

    func testConcurrentReadersWhileMapGrows() throws {
        let env = try open(try tempPath()) { $0.mapSizeBytes = 1 << 20 }
        let db = try env.database("shared")
        try env.write { txn in try txn.put(db, key(1_000_000), [42]) }
        let failures = Mutex<[String]>([])
        let writerDone = Atomic<Bool>(false), reads = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 4) { worker in
            do {
                if worker == 0 {
                    defer { writerDone.store(true, ordering: .releasing) }
                    for batch in 0..<10 {
                        try env.write { txn in
                            for i in batch * 500..<(batch + 1) * 500 { try txn.put(db, key(i), value(i, size: 1000)) }
                        }
                    }
                } else {
                    while !writerDone.load(ordering: .acquiring) {  // readers overlap every growth
                        let seen = try env.read { try $0.get(db, key(1_000_000)) }
                        reads.add(1, ordering: .relaxed)
                        if seen != [42] { failures.withLock { $0.append("reader saw \(String(describing: seen))") } }
                    }
                }
            } catch {
                failures.withLock { $0.append("worker \(worker): \(error)") }
            }
        }
        XCTAssertGreaterThan(reads.load(ordering: .relaxed), 0)
        XCTAssertEqual(failures.withLock { $0 }, [])
        XCTAssertGreaterThan(env.mapSizeBytes, 1 << 20)
        XCTAssertEqual(try env.read { try $0.count(db) }, 5001)
    }

    /// Another process (mdb_load) grows the map past ours: the next transaction must adopt the
    /// new size (MDB_MAP_RESIZED) instead of failing.
    func testAdoptsMapGrownByAnotherProcess() throws {
        let loader = "/usr/bin/mdb_load"
        guard FileManager.default.isExecutableFile(atPath: loader) else { throw XCTSkip("lmdb-utils not installed") }
        let path = try tempPath()
        let env = try open(path) { $0.mapSizeBytes = 1 << 20 }
        let db = try env.database("mine")
        try env.write { txn in try txn.put(db, key(1), [1]) }

        let digits = Array("0123456789abcdef".utf8)
        let hex = { (bytes: [UInt8]) in String(decoding: bytes.flatMap { [digits[Int($0 >> 4)], digits[Int($0 & 15)]] }, as: UTF8.self) }
        var dump = "VERSION=3\nformat=bytevalue\ndatabase=theirs\ntype=btree\nmapsize=\(64 << 20)\nHEADER=END\n"
        for i in 0..<4000 { dump += " \(hex(key(i)))\n \(hex(value(i, size: 1000)))\n" }
        dump += "DATA=END\n"
        let process = Process()
        process.executableURL = URL(fileURLWithPath: loader)
        process.arguments = ["-s", "theirs", path]
        let input = Pipe()
        process.standardInput = input
        try process.run()
        input.fileHandleForWriting.write(Data(dump.utf8))
        try input.fileHandleForWriting.close()
        process.waitUntilExit()
        XCTAssertEqual(process.terminationStatus, 0)

        XCTAssertEqual(try env.read { try $0.get(db, key(1)) }, [1])
        XCTAssertGreaterThanOrEqual(env.mapSizeBytes, 4 << 20, "adopted the other process's map size")
        let theirs = try env.database("theirs", create: false)
        XCTAssertEqual(try env.read { try $0.get(theirs, key(3999)) }, value(3999, size: 1000))
        try env.write { txn in try txn.put(db, key(2), [2]) }
    }

    // MARK: Errors

    func testReadOnlyDirectoryGivesClearError() throws {
        if geteuid() == 0 {
            // Root ignores permission bits; check the read-only paths that still fail for root.
            let missing = try tempPath()
            assertError(.notFound, mentions: ["does not exist", missing]) { _ = try self.open(missing) { $0.readOnly = true } }
            let empty = try tempPath(create: true)
            assertError(.notFound, mentions: ["read-only", empty]) { _ = try self.open(empty) { $0.readOnly = true } }
        } else {
            let dir = try tempPath(create: true)
            XCTAssertEqual(chmod(dir, 0o555), 0)
            assertError(.readOnly, mentions: ["directory is read-only", dir]) { _ = try self.open(dir) }
            assertError(.permissionDenied, mentions: [dir]) { _ = try self.open(dir + "/sub") }
        }
    }

    func testKeyTooLarge() throws {
        let env = try open(try tempPath())
        let db = try env.database("keys")
        let big = [UInt8](repeating: 1, count: env.maxKeyBytes + 1)
        assertError(.keyTooLarge, mentions: ["\(env.maxKeyBytes + 1) bytes", "maximum key size", "keys"]) {
            try env.write { txn in try txn.put(db, big, [1]) }
        }
        assertError(.keyTooLarge) { _ = try env.read { try $0.get(db, big) } }
        assertError(.invalidArgument, mentions: ["empty key"]) { try env.write { try $0.put(db, [], [1]) } }
        let maxKey = [UInt8](repeating: 2, count: env.maxKeyBytes)
        try env.write { txn in try txn.put(db, maxKey, [2]) }
        XCTAssertEqual(try env.read { try $0.get(db, maxKey) }, [2])
    }

    func testRegularFileAsDirectoryGivesClearError() throws {
        let path = try tempPath()
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data("x".utf8)))
        assertError(.invalidArgument, mentions: ["not a directory", path]) { _ = try self.open(path) }
        assertError(.invalidArgument, mentions: ["not a directory", path]) { _ = try self.open(path) { $0.readOnly = true } }
        assertError(.invalidArgument, mentions: ["not a directory"]) { _ = try self.open(path + "/env") }
    }

    func testCorruptedDataFileGivesClearError() throws {
        let dir = try tempPath(create: true)
        let garbage = Data((0..<16384).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) })
        XCTAssertTrue(FileManager.default.createFile(atPath: dir + "/data.mdb", contents: garbage))
        assertError(.corrupted, mentions: ["corrupted", dir]) { _ = try self.open(dir) }
    }

    func testNestedTransactionsThrowInsteadOfDeadlocking() throws {
        let env = try open(try tempPath())
        let db = try env.database("nest")
        try env.write { txn in
            try txn.put(db, [1], [1])
            XCTAssertEqual(try env.database("nest"), db, "cached lookups work inside a body")
            assertError(.invalidArgument, mentions: ["deadlock"]) { try env.write { _ in } }
            assertError(.invalidArgument, mentions: ["deadlock"]) { _ = try env.database("new") }
            XCTAssertNil(try env.read { try $0.get(db, [1]) }, "a nested read sees the last commit, not this txn")
        }
        try env.read { _ in
            assertError(.invalidArgument, mentions: ["deadlock"]) { try env.write { _ in } }
            XCTAssertEqual(try env.read { try $0.get(db, [1]) }, [1], "nested reads are fine")
        }
        try env.write { txn in try txn.put(db, [2], [2]) }  // the lock state is clean afterwards
    }

    func testEveryErrorCodeIsDescribedInWords() {
        let codes: [Int32] = Array(-30799 ... -30780) + [ENOSPC, EACCES, EROFS, EINVAL, ENOMEM, EIO, ENOTDIR]
        for rc in codes {
            let error = LMDBError(rc: rc, "committing to /tmp/x")
            assertWords(error)
            XCTAssertTrue(error.description.contains("while committing to /tmp/x"), error.description)
        }
        XCTAssertEqual(LMDBError(rc: ENOSPC, "committing to /d").description, "no space left on device (ENOSPC) while committing to /d")
        XCTAssertEqual(LMDBError(rc: ENOSPC, "x").code, .diskFull)
        XCTAssertEqual(LMDBError(rc: -30796, "x").code, .corrupted)
        XCTAssertEqual(LMDBError(rc: -30790, "x").code, .readersFull)
        XCTAssertEqual(LMDBError(rc: -30788, "x").code, .txnFull)
        XCTAssertEqual(LMDBError(rc: -30794, "x").code, .versionMismatch)
        XCTAssertEqual(formatBytes(16 << 20), "16 MiB")
        XCTAssertEqual(formatBytes(64 << 30), "64 GiB")
        XCTAssertEqual(formatBytes(3 << 19), "1.5 MiB")
        XCTAssertEqual(formatBytes(900), "900 bytes")
    }
}
