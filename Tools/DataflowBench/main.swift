import Foundation
import WeftCore
import WeftDataflow

// The dataflow benchmark (COST): each workload runs on the engine with 2
// threads and with 1, and as a hand-written single-threaded Swift loop over
// the same file, in the same run.
//   weft-dataflow-bench [--wordcount-mb 200] [--vertices 1000000] [--edges 10000000]
//                       [--iterations 10] [--repeat 3] [--bound-mb 64]
//                       [--skip-wordcount] [--skip-pagerank] [--dir DIR]
//                       [--profile-threads N]   (the engine only on N threads, or the loop only for 0; for perf)
// Each timing is the best of --repeat runs (the machine is shared and
// noisy), and every run is a fresh process (this program started again
// with --child): the engine and the loop both start cold, as a user's job
// does, with no heap left warm by an earlier run, and peak memory is the
// child's own.

/// Unbuffered output: a long run shows each result as soon as it is known.
func out(_ s: String) { FileHandle.standardOutput.write(Data((s + "\n").utf8)) }
// Set once from the arguments, before anything runs; read by the workloads.
nonisolated(unsafe) var wordcountMB = 200, vertices = 1_000_000, edgeCount = 10_000_000, iterations = 10
nonisolated(unsafe) var skipWordcount = false, skipPagerank = false, repeats = 3, boundMB = 64
nonisolated(unsafe) var profileThreads: Int?
/// Only write the input files (for Tools/server-bench.py), run nothing.
nonisolated(unsafe) var generateOnly = false
nonisolated(unsafe) var child: String?
nonisolated(unsafe) var dirArg = NSTemporaryDirectory() + "weft-dataflow-bench"
var args = CommandLine.arguments.dropFirst()
while let a = args.popFirst() {
    switch a {
    case "--wordcount-mb": wordcountMB = Int(args.popFirst() ?? "") ?? wordcountMB
    case "--vertices": vertices = Int(args.popFirst() ?? "") ?? vertices
    case "--edges": edgeCount = Int(args.popFirst() ?? "") ?? edgeCount
    case "--iterations": iterations = Int(args.popFirst() ?? "") ?? iterations
    case "--repeat": repeats = max(1, Int(args.popFirst() ?? "") ?? repeats)
    case "--bound-mb": boundMB = Int(args.popFirst() ?? "") ?? boundMB
    case "--skip-wordcount": skipWordcount = true
    case "--skip-pagerank": skipPagerank = true
    case "--profile-threads": profileThreads = Int(args.popFirst() ?? "")
    case "--child": child = args.popFirst()
    case "--dir": dirArg = args.popFirst() ?? dirArg
    case "--generate-only": generateOnly = true
    default:
        out("usage: weft-dataflow-bench [--wordcount-mb N] [--vertices N] [--edges N] [--iterations N] [--repeat N] [--bound-mb N] [--skip-wordcount] [--skip-pagerank] [--dir DIR] [--profile-threads N] [--generate-only]")
        exit(2)
    }
}
nonisolated(unsafe) let dir = dirArg
try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)

func now() -> Double {
    var t = timespec()
    clock_gettime(CLOCK_MONOTONIC, &t)
    return Double(t.tv_sec) + Double(t.tv_nsec) / 1e9
}

/// The process's peak resident memory (VmHWM), in MiB.
func peakMiB() -> Double {
    guard let s = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
          let line = s.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }) else { return -1 }
    return (Double(line.split(separator: " ").dropFirst().first { !$0.isEmpty }.map(String.init) ?? "") ?? 0) / 1024
}

/// Runs this program again as `--child what`, with this run's sizes, and
/// returns the fields of the `RESULT` line it prints (time first).
func runChild(_ what: String) -> [String] {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0])
    p.arguments = ["--child", what, "--dir", dir, "--wordcount-mb", "\(wordcountMB)", "--vertices", "\(vertices)", "--edges", "\(edgeCount)",
                   "--iterations", "\(iterations)", "--bound-mb", "\(boundMB)"]
    let pipe = Pipe()
    p.standardOutput = pipe
    do { try p.run() } catch {
        out("cannot start \(what): \(error)")
        exit(1)
    }
    let text = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    p.waitUntilExit()
    guard p.terminationStatus == 0, let line = text.split(separator: "\n").last(where: { $0.hasPrefix("RESULT ") }) else {
        out("\(what) failed (exit \(p.terminationStatus)): \(text)")
        exit(1)
    }
    return line.split(separator: " ").dropFirst().map(String.init)
}

/// The fields of the fastest of `repeats` runs of `--child what`.
func best(_ what: String) -> [String] {
    var fastest = runChild(what)
    for _ in 1..<repeats {
        let r = runChild(what)
        if Double(r[0])! < Double(fastest[0])! { fastest = r }
    }
    return fastest
}

/// A child's answer: its time, its peak memory, then what it computed.
func result(_ time: Double, _ fields: [Any]) {
    out("RESULT " + ([String(format: "%.4f", time), String(format: "%.1f", peakMiB())] + fields.map { "\($0)" }).joined(separator: " "))
}

struct Rng {
    var s: UInt64
    mutating func next() -> UInt64 {
        s &+= 0x9E37_79B9_7F4A_7C15
        var z = s
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func unit() -> Double { Double(next() >> 11) / Double(1 << 53) }
}

func report(_ name: String, _ baseline: Double, _ two: Double, _ one: Double, _ peak2: Double, _ peakBase: Double) {
    out(String(format: "%@: single-threaded loop %.2f s (peak %.0f MiB) | engine 2 threads %.2f s = %.2fx the loop (peak %.0f MiB) | engine 1 thread %.2f s = %.2fx the loop",
                 name as NSString, baseline, peakBase, two, two / baseline, peak2, one, one / baseline))
}

// MARK: Word count over Zipf text

nonisolated(unsafe) let zipfPath = dir + "/zipf-\(wordcountMB)mb.txt"

func generateZipf() throws {
    let path = zipfPath
    if (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? 0 >= wordcountMB << 20 { return }
    let t0 = now()
    var rng = Rng(s: 1)
    let vocab: [String] = (0..<100_000).map { _ in String((0..<(2 + Int(rng.next() % 9))).map { _ in Character(UnicodeScalar(UInt8(97 + rng.next() % 26))) }) }
    // Zipf(s = 1) over the vocabulary.
    var cdf: [Double] = []
    var acc = 0.0
    for i in 1...vocab.count { acc += 1 / Double(i); cdf.append(acc) }
    let fh = FileManager.default.createFile(atPath: path, contents: nil) ? FileHandle(forWritingAtPath: path)! : nil
    var written = 0
    var buf = [UInt8]()
    buf.reserveCapacity(8 << 20)
    while written < wordcountMB << 20 {
        let words = 5 + Int(rng.next() % 12)
        for w in 0..<words {
            let u = rng.unit() * acc
            var lo = 0, hi = cdf.count - 1
            while lo < hi { let m = (lo + hi) / 2; if cdf[m] < u { lo = m + 1 } else { hi = m } }
            if w > 0 { buf.append(32) }
            buf.append(contentsOf: vocab[lo].utf8)
        }
        buf.append(10)
        if buf.count >= 8 << 20 {
            fh!.write(Data(buf))
            written += buf.count
            buf.removeAll(keepingCapacity: true)
        }
    }
    fh!.write(Data(buf))
    try fh!.close()
    out(String(format: "generated %@ (%d MiB) in %.1f s", path, wordcountMB, now() - t0))
}

/// The COST baseline: read the file, split on whitespace, count in a
/// dictionary. Prints (time, peak, words, distinct words).
func wordcountLoop() {
    let t0 = now()
    let data = FileManager.default.contents(atPath: zipfPath)!
    var counts: [String: Int] = [:]
    data.withUnsafeBytes { (buf: UnsafeRawBufferPointer) in
        var start = -1
        for i in 0..<buf.count {
            let b = buf[i]
            if b == 32 || b == 10 || b == 9 || b == 13 {
                if start >= 0 { counts[String(decoding: UnsafeRawBufferPointer(rebasing: buf[start..<i]), as: UTF8.self), default: 0] += 1; start = -1 }
            } else if start < 0 { start = i }
        }
        if start >= 0 { counts[String(decoding: UnsafeRawBufferPointer(rebasing: buf[start...]), as: UTF8.self), default: 0] += 1 }
    }
    result(now() - t0, [counts.values.reduce(0, +), counts.count])
}

/// The engine's word count. Prints (time, peak, words, distinct words,
/// bytes spilled, spill files, merge runs).
func wordcountEngine(_ threads: Int, bound: Int = DataflowContext.memoryBytesMaxDefault, stages: Bool = false) throws {
    let sc = DataflowContext(executor: LocalExecutor(threads: threads), memoryBytesMax: bound)
    let t = now()
    let wc = try BuiltinJobs.wordCount(sc.textFile(zipfPath)).mapPartitions { xs in [(xs.count, xs.reduce(0) { $0 + $1.1 })] }.collect()
    let time = now() - t
    let m = sc.lastJobMetrics
    if stages { for s in m.stageTimes { out("  " + s.description) } }
    result(time, [wc.reduce(0) { $0 + $1.1 }, wc.reduce(0) { $0 + $1.0 }, m.bytesSpilled, m.spillFiles, m.mergeSpillFiles, m.mergePasses])
}

func wordcountBench() {
    let loop = best("wc-loop"), two = best("wc-engine-2"), one = best("wc-engine-1"), bounded = runChild("wc-bounded")
    // Words and distinct words (fields 2 and 3) must agree everywhere.
    guard [two, one, bounded].allSatisfy({ $0[2] == loop[2] && $0[3] == loop[3] }) else {
        out("wordcount: RESULTS DIFFER: loop \(loop), engine 2 threads \(two), 1 thread \(one), bounded \(bounded)")
        exit(1)
    }
    out("wordcount over \(wordcountMB) MiB: \(loop[3]) distinct words, \(loop[2]) words (engine and loop agree)")
    report("wordcount", Double(loop[0])!, Double(two[0])!, Double(one[0])!, Double(two[1])!, Double(loop[1])!)
    out(String(format: "wordcount with a %d MiB memory bound, 2 threads: %.2f s, peak %.0f MiB, %@ bytes spilled in %@ files (%@ of them reduce-side merge runs, %@ from merging runs), same result",
               boundMB, Double(bounded[0])!, Double(bounded[1])!, bounded[4], bounded[5], bounded[6], bounded[7]))
}

// MARK: PageRank over a generated graph

nonisolated(unsafe) let graphPath = dir + "/graph-\(vertices)-\(edgeCount).txt"

func generateGraph() throws {
    let path = graphPath
    if FileManager.default.fileExists(atPath: path) { return }
    let t0 = now()
    var rng = Rng(s: 7)
    _ = FileManager.default.createFile(atPath: path, contents: nil)
    let fh = FileHandle(forWritingAtPath: path)!
    var buf = [UInt8]()
    buf.reserveCapacity(8 << 20)
    for _ in 0..<edgeCount {
        let src = Int(rng.next() % UInt64(vertices))
        // Skewed in-degrees: popular destinations get many links.
        let dst = Int(Double(vertices) * pow(rng.unit(), 2))
        buf.append(contentsOf: "\(src) \(dst)\n".utf8)
        if buf.count >= 8 << 20 { fh.write(Data(buf)); buf.removeAll(keepingCapacity: true) }
    }
    fh.write(Data(buf))
    try fh.close()
    out(String(format: "generated %@ in %.1f s", path, now() - t0))
}

/// The baseline: parse, sort and drop duplicate edges, CSR, iterate
/// (Spark's semantics). Two loops: one sorting the edges with the standard
/// library's sort, one with the engine's radix sort (the stricter
/// baseline: both sides then sort alike). Prints (time, peak, ranked
/// vertices, top vertex, its rank); with `phases`, the time of each phase.
func pagerankLoop(radix: Bool, phases: Bool = false) {
    let t0 = now()
    var marks: [(String, Double)] = []
    func mark(_ name: String) { if phases { marks.append((name, now())) } }
    let data = FileManager.default.contents(atPath: graphPath)!
    var pairs: [UInt64] = []
    pairs.reserveCapacity(edgeCount)
    data.withUnsafeBytes { (buf: UnsafeRawBufferPointer) in
        var a = 0, b = 0, field = 0
        for byte in buf {
            switch byte {
            case 48...57:
                if field == 0 { a = a * 10 + Int(byte - 48) } else { b = b * 10 + Int(byte - 48) }
            case 32: field = 1
            case 10:
                pairs.append(UInt64(a) << 32 | UInt64(b)); a = 0; b = 0; field = 0
            default: break
            }
        }
    }
    mark("read and parse")
    if radix { radixSort(&pairs) } else { pairs.sort() }
    mark("sort")
    var unique: [UInt64] = []
    unique.reserveCapacity(pairs.count)
    for p in pairs where unique.last != p { unique.append(p) }
    pairs = []
    var offsets = [Int](repeating: 0, count: vertices + 1)
    for p in unique { offsets[Int(p >> 32) + 1] += 1 }
    for i in 0..<vertices { offsets[i + 1] += offsets[i] }
    var ranks = [Double](repeating: -1, count: vertices)
    for v in 0..<vertices where offsets[v + 1] > offsets[v] { ranks[v] = 1 }
    mark("distinct edges, CSR")
    var contrib = [Double](repeating: 0, count: vertices)
    var received = [Bool](repeating: false, count: vertices)
    for _ in 0..<iterations {
        for i in 0..<vertices { contrib[i] = 0; received[i] = false }
        for v in 0..<vertices where ranks[v] >= 0 && offsets[v + 1] > offsets[v] {
            let share = ranks[v] / Double(offsets[v + 1] - offsets[v])
            for e in offsets[v]..<offsets[v + 1] { let d = Int(unique[e] & 0xffff_ffff); contrib[d] += share; received[d] = true }
        }
        for v in 0..<vertices { ranks[v] = received[v] ? 0.15 + 0.85 * contrib[v] : -1 }
    }
    let elapsed = now() - t0
    mark("iterations")
    if phases {
        var last = t0
        out(marks.map { m in defer { last = m.1 }; return String(format: "%@ %.2f s", m.0 as NSString, m.1 - last) }.joined(separator: ", "))
    }
    let top = ranks.enumerated().max { $0.element < $1.element }!
    result(elapsed, [ranks.filter { $0 >= 0 }.count, top.offset, String(format: "%.9f", top.element)])
}

/// The engine's PageRank. Prints what `pagerankLoop` does.
func pagerankEngine(_ threads: Int, stages: Bool = false) throws {
    let sc = DataflowContext(executor: LocalExecutor(threads: threads))
    let t = now()
    let edges = BuiltinJobs.integerEdges(try sc.textFile(graphPath))
    let ranks = try BuiltinJobs.pageRank(edges: edges, iterations: iterations, damping: 0.85).collect()
    let time = now() - t
    if stages { for s in sc.lastJobMetrics.stageTimes { out("  " + s.description) } }
    let top = ranks.max { $0.1 < $1.1 }!
    result(time, [ranks.count, top.0, String(format: "%.9f", top.1)])
}

func pagerankBench() {
    let sortLoop = best("pr-loop-sort"), loop = best("pr-loop-radix"), two = best("pr-engine-2"), one = best("pr-engine-1")
    // Ranked vertices and the top vertex agree; its rank to 1e-6.
    guard [sortLoop, two, one].allSatisfy({ $0[2] == loop[2] && $0[3] == loop[3] && abs(Double($0[4])! - Double(loop[4])!) < 1e-6 * Double(loop[4])! }) else {
        out("pagerank: RESULTS DIFFER: loop \(loop), sort loop \(sortLoop), engine 2 threads \(two), 1 thread \(one)")
        exit(1)
    }
    out("pagerank over \(vertices) vertices, \(edgeCount) edges, \(iterations) iterations: \(loop[2]) ranked vertices, top vertex \(loop[3]) rank \(String(format: "%.4f", Double(loop[4])!)) (engine and loop agree)")
    report("pagerank", Double(loop[0])!, Double(two[0])!, Double(one[0])!, Double(two[1])!, Double(loop[1])!)
    let s = Double(sortLoop[0])!
    out(String(format: "pagerank against the loop with the standard library's sort (%.2f s): engine 2 threads %.2fx, 1 thread %.2fx",
               s, Double(two[0])! / s, Double(one[0])! / s))
}

// MARK: Main

// Workloads are plain functions, not top-level code: top-level code runs on
// the main actor, and closures written there must not run on executor threads.
func main() throws {
    if let what = child {
        switch what {
        case "wc-loop": wordcountLoop()
        case "wc-engine-1": try wordcountEngine(1)
        case "wc-engine-2": try wordcountEngine(2)
        case "wc-bounded": try wordcountEngine(2, bound: boundMB << 20)
        case "pr-loop-radix": pagerankLoop(radix: true)
        case "pr-loop-sort": pagerankLoop(radix: false)
        case "pr-engine-1": try pagerankEngine(1)
        case "pr-engine-2": try pagerankEngine(2)
        default:
            out("unknown child \(what)")
            exit(2)
        }
        return
    }
    if !skipWordcount { try generateZipf() }
    if !skipPagerank { try generateGraph() }
    if generateOnly { return }
    if let t = profileThreads {
        // For a profiler: one run in this process, the engine alone on `t`
        // threads with its stage times, or the loop alone for 0.
        if !skipWordcount { if t == 0 { wordcountLoop() } else { try wordcountEngine(t, stages: true) } }
        if !skipPagerank { if t == 0 { pagerankLoop(radix: true, phases: true) } else { try pagerankEngine(t, stages: true) } }
        return
    }
    if !skipWordcount { wordcountBench() }
    if !skipPagerank { pagerankBench() }
}

try main()
