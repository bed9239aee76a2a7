import Foundation
import XCTest

/// A fresh directory under /tmp, removed by the caller's `defer`.
func tempDir(_ name: String = "weft-test") -> String {
    let d = NSTemporaryDirectory() + "\(name)-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
    try! FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
    return d
}

func removeDir(_ d: String) { try? FileManager.default.removeItem(atPath: d) }

/// The `weft` binary built by `swift build` (the Makefile builds it before `swift test`).
let weftBinary: String = {
    var url = URL(fileURLWithPath: #filePath)
    for _ in 0..<3 { url.deleteLastPathComponent() }
    return url.path + "/.build/debug/weft"
}()

struct RunResult {
    var status: Int32
    var signaled: Bool
    var stdout: String
    var stderr: String
}

/// Runs the weft binary (or `launcher` + weft) and waits for it.
@discardableResult
func runWeft(_ args: [String], stdin: String? = nil, env: [String: String] = [:], launcher: [String] = []) throws -> RunResult {
    guard FileManager.default.isExecutableFile(atPath: weftBinary) else {
        // A missing binary fails the test: a skipped end-to-end test passes
        // nothing, and CI would look green without having run it.
        throw WeftBinaryMissing(path: weftBinary)
    }
    let p = Process()
    if launcher.isEmpty {
        p.executableURL = URL(fileURLWithPath: weftBinary)
        p.arguments = args
    } else {
        p.executableURL = URL(fileURLWithPath: launcher[0])
        p.arguments = Array(launcher.dropFirst()) + [weftBinary] + args
    }
    var e = ProcessInfo.processInfo.environment
    e["WEFT_DATA_DIR"] = nil
    for (k, v) in env { e[k] = v }
    p.environment = e
    let out = Pipe(), err = Pipe(), inp = Pipe()
    p.standardOutput = out
    p.standardError = err
    p.standardInput = inp
    signal(SIGPIPE, SIG_IGN)
    try p.run()
    if let stdin { inp.fileHandleForWriting.write(Data(stdin.utf8)) }
    try inp.fileHandleForWriting.close()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let r = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return RunResult(status: p.terminationStatus, signaled: p.terminationReason == .uncaughtSignal,
                     stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: r, as: UTF8.self))
}

/// True if `pid` runs; a zombie (exited, not yet reaped) counts as gone.
func processAlive(_ pid: Int32) -> Bool {
    guard pid > 0, kill(pid, 0) == 0 else { return false }
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = stat.lastIndex(of: ")") else { return true }
    let state = stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).first
    return state != "Z" && state != "X"
}

struct WeftBinaryMissing: Error, CustomStringConvertible {
    let path: String
    var description: String { "\(path) is missing; run `swift build --product weft` first (make test does)" }
}

/// A seeded generator, so a random schedule can be replayed: the seed is
/// printed, and `WEFT_TEST_SEED` sets it.
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed == 0 ? 0x9E37_79B9_7F4A_7C15 : seed }
    mutating func next() -> UInt64 {
        // splitmix64
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    static func fromEnvironment(_ test: String) -> SeededGenerator {
        let seed = ProcessInfo.processInfo.environment["WEFT_TEST_SEED"].flatMap { UInt64($0) } ?? UInt64.random(in: 1...UInt64.max)
        print("\(test): seed \(seed) (replay the kill schedule with WEFT_TEST_SEED=\(seed))")
        return SeededGenerator(seed: seed)
    }
}
