import WeftCore

/// What crosses between a driver and the executors in participant nodes.
/// Every message is a `call` frame on the cluster's authenticated
/// connections, its body in this compact binary form (version first), so
/// a node answers a driver of another binary with a clear error.
///
/// Methods:
/// - `exec.task`: run one task (`TaskRequest` → `TaskReply`).
/// - `exec.fetch`: one shuffle bucket of one map output held here
///   (`FetchRequest` → `Payload`).
/// - `exec.blob`: a chunk of a large answer kept here (`BlobRequest` → bytes).
/// - `exec.ping`: the driver's heartbeat; renews the job's lease.
/// - `exec.forget`: the job ended; drop everything it left here.
/// - `exec.kill`: another attempt of a task won; stop this one
///   (action, shuffle or -1, partition, attempt).
public enum ExecutorProtocol {
    public static let version: UInt8 = 3
    /// An answer larger than this is kept by the executor and read in
    /// chunks of this size (`exec.blob`): a frame's body stays well under
    /// `Limits.txnBytesMax`.
    public static let chunkBytesMax = 16 << 20
    /// A task request carries the results of earlier actions the executor
    /// lacks; past this the job cannot be distributed.
    public static let requestBytesMax = 1 << 20
}

/// A job as every process names it: the registry's job, its parameters,
/// and what the driver fixed (snapshot, run id, parallelism, memory).
public struct JobSpec: Sendable, Equatable {
    /// Unique per driver run: executors keep state per key.
    public var key: String
    public var name: String
    public var params: JobParameters
    public var runId: String
    public var parallelism: Int
    public var memoryBytesMax: Int

    public init(key: String, name: String, params: JobParameters, runId: String, parallelism: Int, memoryBytesMax: Int) {
        self.key = key
        self.name = name
        self.params = params
        self.runId = runId
        self.parallelism = parallelism
        self.memoryBytesMax = memoryBytesMax
    }

    func encode(_ w: inout ByteWriter) {
        w.string(key)
        w.string(name)
        w.string(params.input)
        w.bool(params.output != nil)
        w.string(params.output ?? "")
        w.u64(params.at ?? 0)
        w.int(params.iterations)
        w.u64(params.damping.bitPattern)
        w.bool(params.overwrite)
        w.int(params.k)
        w.int(params.words.count)
        for x in params.words { w.string(x) }
        w.bool(params.input2 != nil)
        w.string(params.input2 ?? "")
        w.int(params.reliable)
        w.string(runId)
        w.int(parallelism)
        w.int(memoryBytesMax)
    }

    static func decode(_ r: inout ByteReader) throws(DecodeError) -> JobSpec {
        let key = try r.string(max: 256)
        let name = try r.string(max: 256)
        var p = JobParameters(input: try r.string(max: 4096))
        let hasOut = try r.bool()
        let out = try r.string(max: 4096)
        p.output = hasOut ? out : nil
        let at = try r.u64()
        p.at = at == 0 ? nil : at
        p.iterations = try r.int(max: 1 << 20)
        p.damping = Double(bitPattern: try r.u64())
        p.overwrite = try r.bool()
        p.k = try r.int(max: 1 << 20)
        let n = try r.int(max: 4096)
        for _ in 0..<n { p.words.append(try r.string(max: 4096)) }
        let has2 = try r.bool()
        let in2 = try r.string(max: 4096)
        p.input2 = has2 ? in2 : nil
        p.reliable = try r.int(max: Limits.replicasMax)
        let runId = try r.string(max: 64)
        let par = try r.int(max: 1 << 16)
        let mem = try r.int(max: Int(Int64.max))
        return JobSpec(key: key, name: name, params: p, runId: runId, parallelism: par, memoryBytesMax: mem)
    }
}

/// An earlier action's outcome, as the driver saw it: each partition's
/// result bytes and every accumulator's total after it.
struct ActionResult: Sendable, Equatable {
    var results: [Bytes]
    var accumulators: [Double]

    func encode(_ w: inout ByteWriter) {
        w.int(results.count)
        for b in results { w.blob(b) }
        w.int(accumulators.count)
        for a in accumulators { w.u64(a.bitPattern) }
    }

    static func decode(_ r: inout ByteReader) throws(DecodeError) -> ActionResult {
        let n = try r.int(max: r.remaining)
        var results: [Bytes] = []
        for _ in 0..<n { results.append(try r.blob(max: ExecutorProtocol.requestBytesMax)) }
        let m = try r.int(max: r.remaining / 8)
        var accs: [Double] = []
        for _ in 0..<m { accs.append(Double(bitPattern: try r.u64())) }
        return ActionResult(results: results, accumulators: accs)
    }

    var byteCount: Int { results.reduce(16) { $0 + $1.count + 8 } + accumulators.count * 8 }
}

/// One task: named, never shipped as code. The executor's replica of the
/// job's program holds the lineage it runs.
struct TaskRequest: Sendable, Equatable {
    enum Kind: Sendable, Equatable {
        case map(shuffle: Int)
        case result
    }
    var spec: JobSpec
    var action: Int
    var kind: Kind
    var partition: Int
    var attempt: Int
    /// Where each map output of each shuffle this task may read lives
    /// (node per map partition, -1 for none).
    var mapLocations: [Int: [Int]]
    /// Results of actions `firstResult ..< firstResult + results.count`.
    var firstResult: Int
    var results: [ActionResult]

    func encoded() -> Bytes {
        var w = ByteWriter(capacity: 512)
        w.u8(ExecutorProtocol.version)
        spec.encode(&w)
        w.int(action)
        switch kind {
        case .map(let s):
            w.u8(0)
            w.int(s)
        case .result:
            w.u8(1)
            w.int(0)
        }
        w.int(partition)
        w.int(attempt)
        w.int(mapLocations.count)
        for (s, nodes) in mapLocations.sorted(by: { $0.key < $1.key }) {
            w.int(s)
            w.int(nodes.count)
            for n in nodes { w.u32(UInt32(bitPattern: Int32(n))) }
        }
        w.int(firstResult)
        w.int(results.count)
        for r in results { r.encode(&w) }
        return w.bytes
    }

    static func decode(_ b: Bytes) throws -> TaskRequest {
        try b.withUnsafeBytes { buf in
            var r = ByteReader(buf)
            do {
                try ExecutorCodec.checkVersion(&r)
                let spec = try JobSpec.decode(&r)
                let action = try r.int(max: Int(Int32.max))
                let k = try r.u8()
                let s = try r.int(max: Int(Int32.max))
                let kind: Kind = k == 0 ? .map(shuffle: s) : .result
                let partition = try r.int(max: Int(Int32.max))
                let attempt = try r.int(max: 1 << 20)
                var locs: [Int: [Int]] = [:]
                let n = try r.int(max: r.remaining)
                for _ in 0..<n {
                    let sh = try r.int(max: Int(Int32.max))
                    let m = try r.int(max: r.remaining / 4)
                    var nodes: [Int] = []
                    nodes.reserveCapacity(m)
                    for _ in 0..<m { nodes.append(Int(Int32(bitPattern: try r.u32()))) }
                    locs[sh] = nodes
                }
                let first = try r.int(max: Int(Int32.max))
                let rn = try r.int(max: r.remaining)
                var results: [ActionResult] = []
                for _ in 0..<rn { results.append(try ActionResult.decode(&r)) }
                try r.expectEnd()
                return TaskRequest(spec: spec, action: action, kind: kind, partition: partition, attempt: attempt,
                                   mapLocations: locs, firstResult: first, results: results)
            } catch let e as WeftError {
                throw e
            } catch {
                throw WeftError(.invalidArgument, "malformed task request: \(error)")
            }
        }
    }
}

/// An executor's answer to a task.
enum TaskReply: Sendable, Equatable {
    /// `result`: a result task's bytes (a map task's output stays here).
    /// `computed`: partitions computed (rdd << 32 | partition), for the
    /// driver's count of recomputations; `cached`: those kept in this
    /// executor's block manager, for locality.
    case ok(result: Payload, accumulators: [Int: Double], computed: [Int64], cached: [Int64], metrics: ReplyMetrics, have: Int)
    case failed(String)
    case fetchFailed(shuffle: Int, map: Int, node: Int)
    /// The executor's replica lacks action results before `have`: send them.
    case needResults(have: Int)

    func encoded() -> Bytes {
        var w = ByteWriter(capacity: 128)
        w.u8(ExecutorProtocol.version)
        switch self {
        case let .ok(result, accs, computed, cached, metrics, have):
            w.u8(0)
            result.encode(&w)
            w.int(accs.count)
            for (i, v) in accs.sorted(by: { $0.key < $1.key }) {
                w.int(i)
                w.u64(v.bitPattern)
            }
            w.int(computed.count)
            for c in computed { w.u64(UInt64(bitPattern: c)) }
            w.int(cached.count)
            for c in cached { w.u64(UInt64(bitPattern: c)) }
            metrics.encode(&w)
            w.int(have)
        case .failed(let why):
            w.u8(1)
            w.string(why)
        case let .fetchFailed(s, m, n):
            w.u8(2)
            w.int(s)
            w.int(m)
            w.u32(UInt32(bitPattern: Int32(n)))
        case .needResults(let have):
            w.u8(3)
            w.int(have)
        }
        return w.bytes
    }

    static func decode(_ b: Bytes) throws -> TaskReply {
        try b.withUnsafeBytes { buf in
            var r = ByteReader(buf)
            do {
                try ExecutorCodec.checkVersion(&r)
                let reply: TaskReply
                switch try r.u8() {
                case 0:
                    let result = try Payload.decode(&r)
                    var accs: [Int: Double] = [:]
                    for _ in 0..<(try r.int(max: r.remaining / 9)) { accs[try r.int(max: 1 << 20)] = Double(bitPattern: try r.u64()) }
                    var computed: [Int64] = []
                    for _ in 0..<(try r.int(max: r.remaining / 8)) { computed.append(Int64(bitPattern: try r.u64())) }
                    var cached: [Int64] = []
                    for _ in 0..<(try r.int(max: r.remaining / 8)) { cached.append(Int64(bitPattern: try r.u64())) }
                    let metrics = try ReplyMetrics.decode(&r)
                    reply = .ok(result: result, accumulators: accs, computed: computed, cached: cached, metrics: metrics, have: try r.int(max: Int(Int32.max)))
                case 1: reply = .failed(try r.string(max: 1 << 16))
                case 2: reply = .fetchFailed(shuffle: try r.int(max: Int(Int32.max)), map: try r.int(max: Int(Int32.max)), node: Int(Int32(bitPattern: try r.u32())))
                case 3: reply = .needResults(have: try r.int(max: Int(Int32.max)))
                case let k: throw DecodeError("unknown task reply kind \(k)")
                }
                try r.expectEnd()
                return reply
            } catch let e as WeftError {
                throw e
            } catch {
                throw WeftError(.corrupted, "malformed task reply: \(error)")
            }
        }
    }
}

/// Bytes inline, or the handle of a large answer to read in chunks.
enum Payload: Sendable, Equatable {
    case inline(Bytes)
    case blob(id: UInt64, size: Int)

    func encode(_ w: inout ByteWriter) {
        switch self {
        case .inline(let b):
            w.u8(0)
            w.blob(b)
        case let .blob(id, size):
            w.u8(1)
            w.u64(id)
            w.int(size)
        }
    }

    static func decode(_ r: inout ByteReader) throws(DecodeError) -> Payload {
        switch try r.u8() {
        case 0: return .inline(try r.blob(max: ExecutorProtocol.chunkBytesMax))
        case 1: return .blob(id: try r.u64(), size: try r.int(max: Int(Int64.max)))
        case let k: throw DecodeError("unknown payload kind \(k)")
        }
    }
}

/// A task's counters that only the executor sees, and its run time there.
struct ReplyMetrics: Sendable, Equatable {
    var replicaReads = 0
    var cacheHits = 0
    var bytesSpilled = 0
    var spillFiles = 0
    var diskBlockReads = 0
    var cacheMisses = 0
    var shuffleBytesWritten = 0
    var shuffleBytesFetched = 0
    var taskMicros = 0

    init() {}
    init(_ m: JobMetrics, taskMicros: Int = 0) {
        replicaReads = m.partitionsReadFromReplicas
        cacheHits = m.cacheHits
        bytesSpilled = m.bytesSpilled
        spillFiles = m.spillFiles
        diskBlockReads = m.diskBlockReads
        cacheMisses = m.cacheMisses
        shuffleBytesWritten = m.shuffleBytesWritten
        shuffleBytesFetched = m.shuffleBytesFetched
        self.taskMicros = taskMicros
    }

    var fields: [Int] {
        [replicaReads, cacheHits, bytesSpilled, spillFiles, diskBlockReads, cacheMisses, shuffleBytesWritten, shuffleBytesFetched, taskMicros]
    }

    func encode(_ w: inout ByteWriter) {
        for v in fields { w.int(v) }
    }

    static func decode(_ r: inout ByteReader) throws(DecodeError) -> ReplyMetrics {
        var v: [Int] = []
        for _ in 0..<9 { v.append(try r.int(max: Int(Int64.max))) }
        var m = ReplyMetrics()
        (m.replicaReads, m.cacheHits, m.bytesSpilled, m.spillFiles, m.diskBlockReads) = (v[0], v[1], v[2], v[3], v[4])
        (m.cacheMisses, m.shuffleBytesWritten, m.shuffleBytesFetched, m.taskMicros) = (v[5], v[6], v[7], v[8])
        return m
    }
}

enum ExecutorCodec {
    static func checkVersion(_ r: inout ByteReader) throws {
        let v = try r.u8()
        if v != ExecutorProtocol.version {
            throw WeftError(.invalidArgument, "executor protocol version \(v) is not supported (this node speaks version \(ExecutorProtocol.version)); run the same weft binary on the driver and every node")
        }
    }

    /// A small request of named fields: (job key, integers).
    static func request(_ key: String, _ ints: [Int]) -> Bytes {
        var w = ByteWriter(capacity: 64)
        w.u8(ExecutorProtocol.version)
        w.string(key)
        w.int(ints.count)
        for i in ints { w.u64(UInt64(bitPattern: Int64(i))) }
        return w.bytes
    }

    static func parseRequest(_ b: Bytes) throws -> (key: String, ints: [Int]) {
        try b.withUnsafeBytes { buf in
            var r = ByteReader(buf)
            do {
                try checkVersion(&r)
                let key = try r.string(max: 256)
                let n = try r.int(max: 64)
                var ints: [Int] = []
                for _ in 0..<n { ints.append(Int(Int64(bitPattern: try r.u64()))) }
                try r.expectEnd()
                return (key, ints)
            } catch let e as WeftError {
                throw e
            } catch {
                throw WeftError(.invalidArgument, "malformed executor request: \(error)")
            }
        }
    }
}
