import Foundation
import WeftCore
import WeftProtocol
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
var modes: Set<String> = []
var recoveryBytes = 1 << 30
var decisions = 100_000
var args = CommandLine.arguments.dropFirst()
while let a = args.popFirst() {
    switch a {
    case "--seconds": secondsArg = Double(args.popFirst() ?? "") ?? secondsArg
    case "--dir": baseDirArg = args.popFirst() ?? baseDirArg
    case "--memory-keys": memoryKeys = Int(args.popFirst() ?? "") ?? memoryKeys
    case "--skip-memory": skipMemory = true
    case "--clients": clientCounts = (args.popFirst() ?? "").split(separator: ",").compactMap { Int($0) }
    case "--embedded", "--tcp", "--recovery", "--memory": modes.insert(String(a.dropFirst(2)))
    case "--recovery-bytes": recoveryBytes = Int(args.popFirst() ?? "") ?? recoveryBytes
    case "--decisions": decisions = Int(args.popFirst() ?? "") ?? decisions
    default:
        print("""
        usage: weft-bench [--embedded] [--tcp] [--recovery] [--memory]   (default: all four)
                          [--seconds S] [--clients 1,8,64] [--dir DIR]
                          [--memory-keys N] [--recovery-bytes N] [--decisions N]
        """)
        exit(2)
    }
}
if modes.isEmpty { modes = ["embedded", "tcp", "recovery", "memory"] }
if skipMemory { modes.remove("memory") }
let seconds = secondsArg
let baseDir = baseDirArg
try? FileManager.default.removeItem(atPath: baseDir)
try FileManager.default.createDirectory(atPath: baseDir, withIntermediateDirectories: true)
defer { if ProcessInfo.processInfo.environment["WEFT_BENCH_KEEP"] == nil { try? FileManager.default.removeItem(atPath: baseDir) } }

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

/// Where a workload runs: an embedded cluster, or a local cluster of
/// `weft node` processes over TCP.
enum Target {
    case embedded
    case tcp(ClusterConfig)
}

func runWorkload(_ name: String, clients: Int, keysPerTxn: Int, on target: Target) async throws -> Row {
    let client: WeftClient
    let finish: () -> Int
    switch target {
    case .embedded:
        let dir = baseDir + "/\(name)-\(clients)"
        var opts = StorageOptions()
        opts.mapSizeBytes = 1 << 30
        let cluster = try EmbeddedCluster(dataDir: dir, participants: 3, options: opts)
        client = cluster.client()
        finish = {
            let commits = cluster.commitStats.reduce(0) { $0 + $1.commits }
            client.close()
            cluster.close()
            return commits
        }
    case .tcp(let config):
        let remote = try ClusterClient(config: config, secretFile: nil)
        client = remote.client
        finish = {
            remote.close()
            return 0
        }
    }
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
    let lmdbCommits = finish()
    let sorted = stats.latenciesNanos.sorted()
    return Row(workload: name, clients: clients, txnsPerSecond: Double(sorted.count) / elapsed,
               p50: percentile(sorted, 0.50), p99: percentile(sorted, 0.99), aborted: stats.aborted,
               commitsPerLMDBCommit: lmdbCommits == 0 ? 0 : Double(sorted.count) / Double(lmdbCommits))
}

func report(_ r: Row, _ label: String) {
    let perCommit = r.commitsPerLMDBCommit > 0 ? String(format: "  %.1f txns per LMDB commit", r.commitsPerLMDBCommit) : ""
    print(String(format: "%@ %-11@ clients=%-3d %9.0f txn/s  p50 %7.3f ms  p99 %7.3f ms  aborted %d%@  = %5.1f%% of ceiling, %5.2fx floor",
                 label as NSString, r.workload as NSString, r.clients, r.txnsPerSecond, r.p50, r.p99, r.aborted, perCommit as NSString,
                 100 * r.txnsPerSecond / ceiling.putsPerSecond, r.txnsPerSecond / floor.putsPerSecond))
}

if modes.contains("embedded") {
    for (name, keys) in [("single-key", 1), ("4-key-2pc", 4)] {
        for c in clientCounts { report(try await runWorkload(name, clients: c, keysPerTxn: keys, on: .embedded), "embedded") }
    }
}

// MARK: Cluster mode over TCP

/// The `weft` binary beside this one.
let weftPath = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("weft").path

final class LocalCluster {
    let config: ClusterConfig
    let credentials: Credentials
    var procs: [String: Process] = [:]

    init(dir: String, participants: Int = 3, basePort: Int) throws {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        config = ClusterConfig.local(dir: dir, participants: participants, basePort: basePort)
        try config.render().write(toFile: config.path, atomically: true, encoding: .utf8)
        credentials = Credentials(clusterId: config.clusterId, nodeKey: try ClusterSecret.nodeKey(dir: config.clusterDirectory, create: true))
    }

    /// Starts node `id`; returns ms until it answers a ping as serving.
    @discardableResult
    func start(_ id: String, waitFor state: String = "serving") throws -> Double {
        let t0 = monoNanos()
        let p = Process()
        p.executableURL = URL(fileURLWithPath: weftPath)
        p.arguments = ["node", "--cluster", config.path, "--id", id]
        // For a profiler: WEFT_BENCH_WRAP="strace -f -tt -o /tmp/st" runs the node under it.
        if let wrap = ProcessInfo.processInfo.environment["WEFT_BENCH_WRAP"], !wrap.isEmpty {
            let w = wrap.split(separator: " ").map(String.init)
            p.executableURL = URL(fileURLWithPath: w[0].hasPrefix("/") ? w[0] : "/usr/bin/" + w[0])
            p.arguments = Array(w.dropFirst()) + [weftPath] + p.arguments!
        }
        let log = config.clusterDirectory + "/\(id).log"
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        p.standardOutput = FileHandle(forWritingAtPath: log)
        p.standardError = FileHandle.nullDevice
        try p.run()
        procs[id] = p
        let node = try config.node(id)
        while true {
            if let info = NetworkTransport.ping(node.endpoint, credentials: credentials, timeoutMillis: 200), info.contains(state) { break }
            guard p.isRunning else { throw WeftError(.unavailable, "\(id) exited with status \(p.terminationStatus)") }
            usleep(20_000)
        }
        return Double(monoNanos() - t0) / 1e6
    }

    /// The node's own report: "recovered in N ms" (LMDB read and memory rebuilt).
    func recoveredMillis(_ id: String) -> Double? {
        guard let text = try? String(contentsOfFile: config.clusterDirectory + "/\(id).log", encoding: .utf8),
              let r = text.range(of: "recovered in ") else { return nil }
        return Double(text[r.upperBound...].prefix { $0.isNumber })
    }

    func stopAll() {
        for (_, p) in procs where p.isRunning {
            p.terminate()
            p.waitUntilExit()
        }
    }
}

if modes.contains("tcp") {
    guard FileManager.default.isExecutableFile(atPath: weftPath) else {
        print("tcp: \(weftPath) is missing; build it with: swift build -c release --product weft")
        exit(1)
    }
    for (name, keys) in [("single-key", 1), ("4-key-2pc", 4)] {
        for c in clientCounts {
            let cluster = try LocalCluster(dir: baseDir + "/tcp-\(name)-\(c)", basePort: 21_000 + Int.random(in: 0..<500) * 10)
            for n in cluster.config.nodes { try cluster.start(n.id) }
            defer { cluster.stopAll() }
            report(try await runWorkload(name, clients: c, keysPerTxn: keys, on: .tcp(cluster.config)), "tcp     ")
        }
    }
}

// MARK: Recovery

if modes.contains("recovery") {
    let cluster = try LocalCluster(dir: baseDir + "/recovery", basePort: 22_000 + Int.random(in: 0..<500) * 10)
    // A coordinator whose log holds `decisions` COMMIT decisions without END.
    do {
        var o = StorageOptions()
        o.mapSizeBytes = 1 << 30
        let coord = try cluster.config.node("coordinator")
        try FileManager.default.createDirectory(atPath: coord.dataDir, withIntermediateDirectories: true)
        try "cluster-id \(cluster.config.clusterId)\nnode coordinator\n".write(toFile: coord.dataDir + "/node.id", atomically: true, encoding: .utf8)
        let s = try CoordinatorStorage(directory: coord.dataDir + "/lmdb", options: o)
        let base = HLC.timestamp(millis: wallMillis())
        var batch: [CoordinatorRecord] = [.reserveTimestamps(upTo: base + HLC.timestamp(millis: 1000))]
        for i in 0..<decisions {
            batch.append(.decided(Decision(txn: base + UInt64(2 * i), commitTs: base + UInt64(2 * i + 1), participants: [0, 1])))
            if batch.count == 10_000 {
                try s.persist(batch)
                batch = []
            }
        }
        try s.persist(batch)
        s.close()
    }
    let coordMillis = try cluster.start("coordinator")
    print(String(format: "recovery: coordinator with %d decisions without END in its log serves again after %.0f ms (process start to first ping answered; its own recovery took %.0f ms)", decisions, coordMillis, cluster.recoveredMillis("coordinator") ?? -1))
    cluster.stopAll()

    // A participant holding `recoveryBytes` of committed data.
    let part = try cluster.config.node("participant-0")
    do {
        var o = StorageOptions()
        o.mapSizeBytes = 2 << 30
        try FileManager.default.createDirectory(atPath: part.dataDir, withIntermediateDirectories: true)
        try "cluster-id \(cluster.config.clusterId)\nnode participant-0\n".write(toFile: part.dataDir + "/node.id", atomically: true, encoding: .utf8)
        let s = try ParticipantStorage(directory: part.dataDir + "/lmdb", options: o)
        let value = Bytes(repeating: 0x5a, count: 1000)
        let perRecord = 1000
        let records = recoveryBytes / ((16 + value.count) * perRecord)
        var ts = HLC.timestamp(millis: wallMillis() - 1000)
        var key = 0
        let t0 = monoNanos()
        for _ in 0..<records {
            var writes: [WriteOp] = []
            writes.reserveCapacity(perRecord)
            for _ in 0..<perRecord {
                writes.append(WriteOp(key: key16(key), value: value))
                key += 1
            }
            ts += 2
            try s.persist([.committed(txn: ts - 1, commitTs: ts, writes: writes)])
        }
        s.close()
        print(String(format: "recovery: wrote %d keys (%.0f MiB of keys and values) to participant-0 in %.1f s", key, Double(key * (16 + value.count)) / 1048576, Double(monoNanos() - t0) / 1e9))
        try cluster.start("coordinator")
        let partMillis = try cluster.start("participant-0")
        let mib = Double(key * (16 + value.count)) / 1048576
        let own = (cluster.recoveredMillis("participant-0") ?? -1) / 1000
        print(String(format: "recovery: participant with %.0f MiB of committed data serves again after %.2f s (%.0f MiB/s); its own recovery (LMDB scan + memory rebuild) took %.2f s (%.0f MiB/s)",
                     mib, partMillis / 1000, mib / (partMillis / 1000), own, mib / own))
        usleep(100_000)
        let log = (try? String(contentsOfFile: cluster.config.clusterDirectory + "/participant-0.log", encoding: .utf8)) ?? ""
        for line in log.split(separator: "\n") { print("  participant-0: \(line)") }
        cluster.stopAll()
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

if modes.contains("memory") {
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
