import Foundation
import WeftCore
import WeftLMDB
import WeftRuntime

// The embedded benchmark. Every figure is printed beside two LMDB baselines
// measured in the same run on the same disk:
//   floor   = puts/s when every put is its own durable commit
//   ceiling = puts/s when 100 puts share one durable commit
// Usage: weft-bench [--seconds S] [--dir DIR] [--memory-keys N] [--skip-memory]

var secondsArg = 3.0
var baseDirArg = NSTemporaryDirectory() + "weft-bench-\(getpid())"
var memoryKeys = 1_000_000
var skipMemory = false
var clientCounts = [1, 8, 64]
var args = CommandLine.arguments.dropFirst()
while let a = args.popFirst() {
    switch a {
    case "--seconds": secondsArg = Double(args.popFirst() ?? "") ?? secondsArg
    case "--dir": baseDirArg = args.popFirst() ?? baseDirArg
    case "--memory-keys": memoryKeys = Int(args.popFirst() ?? "") ?? memoryKeys
    case "--skip-memory": skipMemory = true
    case "--clients": clientCounts = (args.popFirst() ?? "").split(separator: ",").compactMap { Int($0) }
    default:
        print("usage: weft-bench [--seconds S] [--dir DIR] [--memory-keys N] [--skip-memory] [--clients 1,8,64]")
        exit(2)
    }
}
let seconds = secondsArg
let baseDir = baseDirArg
try? FileManager.default.removeItem(atPath: baseDir)
try FileManager.default.createDirectory(atPath: baseDir, withIntermediateDirectories: true)
defer { try? FileManager.default.removeItem(atPath: baseDir) }

func monoNanos() -> UInt64 {
    var t = timespec()
    clock_gettime(CLOCK_MONOTONIC, &t)
    return UInt64(t.tv_sec) * 1_000_000_000 + UInt64(t.tv_nsec)
}

func key16(_ i: Int) -> Bytes {
    var k = Array(String(format: "k%015d", i).utf8)
    k = Array(k.prefix(16))
    return k
}

let value100 = Bytes(repeating: 0x61, count: 100)

// MARK: LMDB baselines

func lmdbRate(putsPerCommit: Int, commits: Int) throws -> (putsPerSecond: Double, msPerCommit: Double) {
    let dir = baseDir + "/lmdb-\(putsPerCommit)"
    var o = LMDBEnvironment.Options()
    o.mapSizeBytes = 1 << 30
    let env = try LMDBEnvironment(directory: dir, options: o)
    defer { env.close() }
    let db = try env.database("bench")
    var n = 0
    // Warm the file so growth does not dominate.
    try env.write { t in for i in 0..<1000 { try t.put(db, key16(10_000_000 + i), value100) } }
    let start = monoNanos()
    for _ in 0..<commits {
        try env.write { t in
            for _ in 0..<putsPerCommit {
                try t.put(db, key16(n), value100)
                n += 1
            }
        }
    }
    let secs = Double(monoNanos() - start) / 1e9
    return (Double(n) / secs, secs * 1000 / Double(commits))
}

print("Weft embedded benchmark (\(ProcessInfo.processInfo.activeProcessorCount) cores), data in \(baseDir)")
let floor = try lmdbRate(putsPerCommit: 1, commits: 3000)
let ceiling = try lmdbRate(putsPerCommit: 100, commits: 600)
print(String(format: "LMDB floor   (1 put per durable commit):    %9.0f puts/s  (%.3f ms per commit)", floor.putsPerSecond, floor.msPerCommit))
print(String(format: "LMDB ceiling (100 puts per durable commit): %9.0f puts/s  (%.3f ms per commit)", ceiling.putsPerSecond, ceiling.msPerCommit))

// MARK: Transaction workloads

final class Stats: @unchecked Sendable {
    let lock = NSLock()
    var latenciesNanos: [UInt64] = []
    var aborted = 0
    func add(_ l: [UInt64], aborted a: Int) {
        lock.lock()
        latenciesNanos += l
        aborted += a
        lock.unlock()
    }
}

func percentile(_ sorted: [UInt64], _ p: Double) -> Double {
    guard !sorted.isEmpty else { return 0 }
    return Double(sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]) / 1e6
}

struct Row {
    var workload: String
    var clients: Int
    var txnsPerSecond: Double
    var p50: Double
    var p99: Double
    var aborted: Int
    var commitsPerLMDBCommit: Double
}

func runWorkload(_ name: String, clients: Int, keysPerTxn: Int) async throws -> Row {
    let dir = baseDir + "/\(name)-\(clients)"
    var opts = StorageOptions()
    opts.mapSizeBytes = 1 << 30
    let cluster = try EmbeddedCluster(dataDir: dir, participants: 3, options: opts)
    let client = cluster.client()
    let stats = Stats()
    let deadline = monoNanos() + UInt64(seconds * 1e9)
    let keySpace = 1_000_000
    try await withThrowingTaskGroup(of: Void.self) { group in
        for c in 0..<clients {
            group.addTask {
                var rng = SystemRandomNumberGenerator()
                var lat: [UInt64] = []
                lat.reserveCapacity(100_000)
                var aborted = 0
                var i = 0
                while monoNanos() < deadline {
                    let t0 = monoNanos()
                    do {
                        if keysPerTxn == 1 {
                            try await client.put(key16(Int.random(in: 0..<keySpace, using: &rng)), value100)
                        } else {
                            let t = try await client.begin()
                            var owners = Set<Int>()
                            var written = 0
                            while written < keysPerTxn {
                                let k = key16(Int.random(in: 0..<keySpace, using: &rng))
                                // At least two participants, so every transaction runs 2PC.
                                if written == keysPerTxn - 1 && owners.count == 1 && owners.contains(client.owner(of: k)) { continue }
                                owners.insert(client.owner(of: k))
                                try t.put(k, value100)
                                written += 1
                            }
                            try await t.commit()
                        }
                        lat.append(monoNanos() - t0)
                    } catch let e as WeftError where e.code == .conflict {
                        aborted += 1
                    }
                    i += 1
                    _ = c
                }
                stats.add(lat, aborted: aborted)
            }
        }
        try await group.waitForAll()
    }
    let elapsed = seconds
    let s = cluster.commitStats
    let lmdbCommits = s.reduce(0) { $0 + $1.commits }
    client.close()
    cluster.close()
    let sorted = stats.latenciesNanos.sorted()
    return Row(workload: name, clients: clients, txnsPerSecond: Double(sorted.count) / elapsed,
               p50: percentile(sorted, 0.50), p99: percentile(sorted, 0.99), aborted: stats.aborted,
               commitsPerLMDBCommit: Double(sorted.count) / Double(max(1, lmdbCommits)))
}

var rows: [Row] = []
for (name, keys) in [("single-key", 1), ("4-key-2pc", 4)] {
    for c in clientCounts {
        let r = try await runWorkload(name, clients: c, keysPerTxn: keys)
        rows.append(r)
        print(String(format: "%-11@ clients=%-3d %9.0f txn/s  p50 %7.3f ms  p99 %7.3f ms  aborted %d  %.1f txns per LMDB commit  = %5.1f%% of ceiling, %5.2fx floor",
                     r.workload as NSString, r.clients, r.txnsPerSecond, r.p50, r.p99, r.aborted, r.commitsPerLMDBCommit,
                     100 * r.txnsPerSecond / ceiling.putsPerSecond, r.txnsPerSecond / floor.putsPerSecond))
    }
}

// MARK: Memory

/// (resident, resident minus file-backed shared pages) from /proc/self/statm.
/// The second figure leaves out LMDB's memory-mapped data file, which is the
/// kernel's page cache and can be dropped at any time.
func residentBytes() -> (total: Int, anonymous: Int) {
    guard let s = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return (0, 0) }
    let f = s.split(separator: " ").map { Int($0) ?? 0 }
    let page = Int(sysconf(Int32(_SC_PAGESIZE)))
    return (f[1] * page, (f[1] - f[2]) * page)
}

if !skipMemory {
    let dir = baseDir + "/memory"
    var opts = StorageOptions()
    opts.mapSizeBytes = 1 << 30
    let cluster = try EmbeddedCluster(dataDir: dir, participants: 3, options: opts)
    let client = cluster.client()
    let before = residentBytes()
    let batch = 1000
    let t0 = monoNanos()
    for start in stride(from: 0, to: memoryKeys, by: batch) {
        let t = try await client.begin()
        for i in start..<min(memoryKeys, start + batch) { try t.put(key16(i), value100) }
        try await t.commit()
    }
    let loadSecs = Double(monoNanos() - t0) / 1e9
    // Give freed heap pages (the load's transient transaction buffers) back
    // to the kernel so resident memory shows what the store keeps.
    _ = cMallocTrim(0)
    let after = residentBytes()
    let raw = memoryKeys * (16 + 100)
    let storeBytes = cluster.storeMemoryBytes
    print(String(format: "memory: loaded %d keys (16-byte keys, 100-byte values) in %.1f s (%.0f keys/s)", memoryKeys, loadSecs, Double(memoryKeys) / loadSecs))
    let per = Double(after.total - before.total) / Double(memoryKeys)
    let perAnon = Double(after.anonymous - before.anonymous) / Double(memoryKeys)
    print(String(format: "memory: resident growth %.1f bytes/key = %.2fx raw; without LMDB's mapped file (anonymous) %.1f bytes/key = %.2fx raw (raw = %d bytes/key)",
                 per, per / Double(16 + 100), perAnon, perAnon / Double(16 + 100), 16 + 100))
    print(String(format: "memory: the store's own structures: %.1f bytes/key = %.2fx raw", Double(storeBytes) / Double(memoryKeys), Double(storeBytes) / Double(raw)))
    client.close()
    cluster.close()
}

@_silgen_name("malloc_trim")
func cMallocTrim(_ pad: Int) -> Int32
