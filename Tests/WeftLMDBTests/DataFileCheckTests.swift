import Foundation
import Glibc
import XCTest
@testable import WeftLMDB

/// A data file that cannot be what LMDB last committed is refused before
/// it is mapped: no silently empty store, no SIGBUS (issue "Security and
/// integrity", storage).
final class DataFileCheckTests: XCTestCase {
    var dir = ""

    override func setUp() {
        dir = NSTemporaryDirectory() + "weft-datafile-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    /// An environment with enough data to span many pages, closed.
    func filled() throws -> Int {
        let env = try LMDBEnvironment(directory: dir)
        let db = try env.database("d")
        try env.write { txn in
            for i in 0..<2000 { try txn.put(db, Array("key-\(i)".utf8), [UInt8](repeating: UInt8(i % 251), count: 200)) }
        }
        env.close()
        var st = stat()
        XCTAssertEqual(stat(dir + "/data.mdb", &st), 0)
        return Int(st.st_size)
    }

    func assertRefused(_ fragment: String, file: StaticString = #filePath, line: UInt = #line) {
        do {
            _ = try LMDBEnvironment(directory: dir)
            XCTFail("opened", file: file, line: line)
        } catch let e as LMDBError {
            XCTAssertEqual(e.code, .corrupted, file: file, line: line)
            XCTAssertTrue(e.message.contains(fragment), "\(e.message) should say \(fragment)", file: file, line: line)
        } catch {
            XCTFail("\(error)", file: file, line: line)
        }
    }

    func testAnEmptiedFileIsRefusedNotStartedEmpty() throws {
        _ = try filled()
        XCTAssertEqual(truncate(dir + "/data.mdb", 0), 0)
        assertRefused("is empty (0 bytes), but this environment held data")
    }

    func testAMissingFileIsRefused() throws {
        _ = try filled()
        XCTAssertEqual(unlink(dir + "/data.mdb"), 0)
        assertRefused("is missing, but this environment held data")
    }

    func testAHalfTruncatedFileIsRefusedInsteadOfCrashing() throws {
        let size = try filled()
        XCTAssertGreaterThan(size, 100_000)
        XCTAssertEqual(truncate(dir + "/data.mdb", off_t(size / 2)), 0)
        assertRefused("is truncated")
        XCTAssertEqual(truncate(dir + "/data.mdb", 4096), 0)
        assertRefused("is truncated")
    }

    func testGarbageIsNotAnLMDBFile() throws {
        _ = try filled()
        let junk = [UInt8](repeating: 0x5a, count: 64 << 10)
        let fd = open(dir + "/data.mdb", O_WRONLY | O_TRUNC)
        _ = junk.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
        assertRefused("holds no valid LMDB meta page")
    }

    func testAFreshDirectoryStillStartsAndFilesAreOwnerOnly() throws {
        let size = try filled()
        XCTAssertGreaterThan(size, 0)
        let env = try LMDBEnvironment(directory: dir)  // reopens fine
        env.close()
        var st = stat()
        XCTAssertEqual(stat(dir + "/data.mdb", &st), 0)
        XCTAssertEqual(st.st_mode & 0o077, 0, "data.mdb is not readable by others")
        XCTAssertEqual(stat(dir, &st), 0)
        XCTAssertEqual(st.st_mode & 0o077, 0, "the directory is owner-only")
    }
}
