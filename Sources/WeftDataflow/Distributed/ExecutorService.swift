import CoreMetrics
import Foundation
import Logging
import WeftCore
import WeftRuntime

/// Runs what a distributed context's actions need: on the driver the
/// scheduler (`ClusterDriver`), in an executor the replica (`JobReplica`).
protocol ActionRunner: AnyObject {
    /// Each partition's result bytes, in the order of `partitions`.
    func runAction(_ sc: DataflowContext, index: Int, rdd: AnyRDD, partitions: [Int],
                   encodeTask: @escaping (Int, TaskContext) throws -> Bytes) throws -> [Bytes]
    /// Every result task attempt launched so far (the driver's; none on an
    /// executor's replica).
    func launchedResultAttempts() -> Set<ResultAttempt>
}

extension ActionRunner {
    func launchedResultAttempts() -> Set<ResultAttempt> { [] }
}

/// One attempt of one task on an executor: its action, its shuffle (-1
/// for a result task), its partition and attempt number.
struct TaskKey: Hashable, Sendable {
    let action: Int
    let shuffle: Int
    let partition: Int
    let attempt: Int
}

/// One attempt of one result task of one action.
struct ResultAttempt: Hashable, Sendable {
    let action: Int
    let partition: Int
    let attempt: Int
}

/// Where a replica reads map outputs that other executors hold.
protocol RemoteShuffles: AnyObject {
    /// The bucket's bytes (`SpillFormat`); FetchFailed if its holder is gone.
    func fetch(shuffle: Int, map: Int, bucket: Int) throws -> Bytes
}

/// The executor inside a participant node. It keeps one replica of each
/// job's program (`JobReplica`), runs the tasks the driver names, keeps
/// map outputs and cached partitions, serves shuffle buckets to reducers
/// on other nodes, and forgets a job when its driver says so or stops
/// renewing it (`jobLeaseMillis`).
public final class ExecutorService: @unchecked Sendable {
    public let node: Int
    let client: WeftClient
    /// A call to another participant's executor.
    let callPeer: @Sendable (Int, String, Bytes) async throws -> (ok: Bool, body: Bytes)
    let lock = NSLock()
    var replicas: [String: JobReplica] = [:]
    var blobs: [UInt64: (bytes: Bytes, touched: UInt64)] = [:]
    var nextBlob: UInt64 = 1
    let tasks: ThreadQueue
    var janitor: Thread?
    var stopped = false
    let log: Logger

    /// A job whose driver has not called for this long is dropped, with
    /// its map outputs, cached blocks and spill files.
    public static let jobLeaseMillis: UInt64 = 10_000
    /// How long a task waits for this executor's replica of the program to
    /// reach the task's action (it may still be reading what it needs).
    public static let replayWaitMillis: UInt64 = 60_000
    /// Tasks this executor runs at once (the driver's slots per executor).
    public let slots: Int

    public init(node: Int, client: WeftClient, slots: Int = max(2, ProcessInfo.processInfo.activeProcessorCount),
                callPeer: @escaping @Sendable (Int, String, Bytes) async throws -> (ok: Bool, body: Bytes)) {
        self.node = node
        self.client = client
        self.callPeer = callPeer
        log = Logger(label: "weft executor participant-\(node)")
        self.slots = slots
        tasks = ThreadQueue(threads: slots, name: "weft-executor")
        let t = Thread { [weak self] in
            while let s = self, !s.lock.withLock({ s.stopped }) {
                s.expire()
                usleep(500_000)
            }
        }
        t.name = "weft-executor-janitor"
        janitor = t
        t.start()
    }

    public func stop() {
        let all = lock.withLock { () -> [JobReplica] in
            stopped = true
            defer { replicas = [:] }
            return Array(replicas.values)
        }
        for r in all { r.stop() }
        tasks.shutdown()
    }

    /// Jobs this executor holds state for (for status and tests).
    public var jobKeys: [String] { lock.withLock { Array(replicas.keys).sorted() } }

    func expire() {
        let now = wallMillis()
        let dead = lock.withLock { () -> [JobReplica] in
            let gone = replicas.values.filter { now &- $0.lastContact > Self.jobLeaseMillis }
            for r in gone { replicas[r.spec.key] = nil }
            blobs = blobs.filter { now &- $0.value.touched <= Self.jobLeaseMillis }
            return gone
        }
        for r in dead {
            r.stop()
            log.notice("dropped job \(r.spec.key) (\(r.spec.name)): its driver did not call for \(Self.jobLeaseMillis) ms (ExecutorService.jobLeaseMillis)")
        }
    }

    /// Answers one call from a driver or a peer executor.
    public func handle(_ call: ServerCall) {
        let reply = call.reply
        @Sendable func fail(_ why: String) { reply(false, Array(why.utf8)) }
        switch call.method {
        case "exec.task":
            tasks.submit { [self] in
                do { reply(true, try runTask(TaskRequest.decode(call.body)).encoded()) } catch { fail(describe(error)) }
            }
        case "exec.fetch", "exec.blob", "exec.ping", "exec.forget", "exec.knows", "exec.kill":
            DispatchQueue.global().async { [self] in
                do { reply(true, try small(call.method, call.body)) } catch { fail(describe(error)) }
            }
        default:
            fail("this node serves no method \(call.method)")
        }
    }

    func small(_ method: String, _ body: Bytes) throws -> Bytes {
        let (key, ints) = try ExecutorCodec.parseRequest(body)
        switch method {
        case "exec.ping":
            let r = lock.withLock { replicas[key] }
            r?.touch()
            return ExecutorCodec.request("", [r?.have ?? 0, slots])
        case "exec.knows":
            // Does this node's binary have the job (a node running an older
            // binary may not)? The key field carries the job's name.
            return ExecutorCodec.request("", [BuiltinJobs.knows(key) ? 1 : 0])
        case "exec.kill":
            // (action, shuffle or -1 for a result task, partition, attempt)
            guard ints.count == 4 else { throw WeftError(.invalidArgument, "malformed kill") }
            lock.withLock { replicas[key] }?.kill(TaskKey(action: ints[0], shuffle: ints[1], partition: ints[2], attempt: ints[3]))
            return ExecutorCodec.request("", [])
        case "exec.forget":
            if let r = lock.withLock({ replicas.removeValue(forKey: key) }) {
                r.stop()
                log.info("job \(key) (\(r.spec.name)) ended: its driver forgot it")
            }
            return ExecutorCodec.request("", [])
        case "exec.fetch":
            guard ints.count == 3 else { throw WeftError(.invalidArgument, "malformed fetch") }
            guard let r = lock.withLock({ replicas[key] }) else { throw WeftError(.notFound, "no job \(key) on node \(node)") }
            r.touch()
            var w = ByteWriter(capacity: 32)
            keep(try r.encodeBucket(shuffle: ints[0], map: ints[1], bucket: ints[2])).encode(&w)
            return w.bytes
        default: // exec.blob
            guard ints.count == 2 else { throw WeftError(.invalidArgument, "malformed blob request") }
            let id = UInt64(bitPattern: Int64(ints[0])), offset = ints[1]
            return try lock.withLock { () throws -> Bytes in
                guard let b = blobs[id] else { throw WeftError(.notFound, "no answer \(id) kept on node \(node) (expired?)") }
                guard offset >= 0 && offset <= b.bytes.count else { throw WeftError(.invalidArgument, "offset \(offset) outside answer \(id)") }
                let end = min(b.bytes.count, offset + ExecutorProtocol.chunkBytesMax)
                if end == b.bytes.count { blobs[id] = nil } else { blobs[id]!.touched = wallMillis() }
                return Array(b.bytes[offset..<end])
            }
        }
    }

    /// Inline when small; else kept for `exec.blob`.
    func keep(_ bytes: Bytes) -> Payload {
        if bytes.count <= ExecutorProtocol.chunkBytesMax { return .inline(bytes) }
        return lock.withLock {
            let id = nextBlob
            nextBlob += 1
            blobs[id] = (bytes, wallMillis())
            return .blob(id: id, size: bytes.count)
        }
    }

    func runTask(_ req: TaskRequest) -> TaskReply {
        let replica = lock.withLock { () -> JobReplica in
            if let r = replicas[req.spec.key] { return r }
            let r = JobReplica(spec: req.spec, service: self)
            replicas[req.spec.key] = r
            log.info("job \(req.spec.key) (\(req.spec.name)) started: a driver sent its first task")
            r.start()
            return r
        }
        return replica.run(req)
    }

    /// A payload's bytes, pulling a large one from `node` in chunks.
    static func bytes(of payload: Payload, from node: Int, call: @Sendable (Int, String, Bytes) async throws -> (ok: Bool, body: Bytes)) async throws -> Bytes {
        switch payload {
        case .inline(let b): return b
        case let .blob(id, size):
            var out = Bytes()
            out.reserveCapacity(size)
            while out.count < size {
                let (ok, chunk) = try await call(node, "exec.blob", ExecutorCodec.request("", [Int(id), out.count]))
                guard ok, !chunk.isEmpty else { throw WeftError(.unavailable, "node \(node) lost answer \(id): \(String(decoding: chunk, as: UTF8.self))") }
                out += chunk
            }
            return out
        }
    }
}

func describe(_ error: Error) -> String {
    if let e = error as? WeftError { return e.message }
    return "\(error)"
}

/// This executor's copy of one job's program. It runs the same registry
/// job as the driver, in a context whose actions do not run tasks but wait
/// for the driver's results (sent with later tasks), so it builds the very
/// lineage the driver built, with the same RDD, shuffle and accumulator
/// numbers. A task names an action and a partition; the replica runs it on
/// the lineage its program published for that action.
final class JobReplica: ActionRunner, RemoteShuffles, @unchecked Sendable {
    let spec: JobSpec
    let sc: DataflowContext
    unowned let service: ExecutorService
    let cond = NSCondition()
    struct Published {
        let rdd: AnyRDD
        let encode: (Int, TaskContext) throws -> Bytes
    }
    var published: [Int: Published] = [:]
    var results: [ActionResult] = []
    /// Every shuffle the program has built, for fetches of older outputs.
    var shuffles: [Int: WeakShuffle] = [:]
    var mapLocations: [Int: [Int]] = [:]
    var stopped = false
    var failure: String?
    private(set) var lastContact = wallMillis()
    /// The attempts running here, to kill on the driver's word, and kills
    /// that came before their attempt started (a queued task).
    var running: [TaskKey: TaskContext] = [:]
    var killedEarly: Set<TaskKey> = []

    init(spec: JobSpec, service: ExecutorService) {
        self.spec = spec
        self.service = service
        sc = DataflowContext(executor: RemoteTasksExecutor(parallelism: spec.parallelism), memoryBytesMax: spec.memoryBytesMax, runId: spec.runId)
        sc.ownsReliableBlocks = false
        sc.localParticipant = service.node
        sc.computedLog = []
        sc.actionRunner = self
        sc.remoteShuffles = self
    }

    var have: Int { cond.withLock { results.count } }
    func touch() { cond.withLock { lastContact = wallMillis() } }

    /// Kills one attempt: it stops at its next check (`TaskContext.checkKilled`).
    func kill(_ k: TaskKey) {
        cond.withLock {
            if let ctx = running[k] { ctx.kill() } else if killedEarly.count < 4096 { killedEarly.insert(k) }
        }
    }

    func start() {
        // The output stays in the parameters, so the replica builds the same
        // write action as the driver; its side effects (the loading marker,
        // the catalog flip) happen only on the driver (`ownsReliableBlocks`).
        let (name, client, sc, replay) = (spec.name, service.client, self.sc, spec.params)
        let t = Thread { [self] in
            do {
                _ = try BuiltinJobs.run(name, replay, sc: sc, client: client)
                cond.withLock { failure = failure ?? "the job's program ended on node \(service.node) before the driver's" }
            } catch {
                cond.withLock { failure = failure ?? "the job's program failed on node \(service.node): \(describe(error))" }
            }
            cond.broadcast()
        }
        t.name = "weft-replica-\(spec.key)"
        t.stackSize = DataflowContext.driverStackBytes
        t.start()
    }

    func stop() {
        cond.withLock {
            stopped = true
            failure = failure ?? "stopped"
            published = [:]
        }
        cond.broadcast()
        sc.loseExecutorState()
    }

    struct Stopped: Error {}

    func runAction(_ sc: DataflowContext, index: Int, rdd: AnyRDD, partitions: [Int],
                   encodeTask: @escaping (Int, TaskContext) throws -> Bytes) throws -> [Bytes] {
        cond.lock()
        published = published.filter { $0.key >= index - 1 }
        published[index] = Published(rdd: rdd, encode: encodeTask)
        for s in Self.shuffles(of: rdd) where shuffles[s.shuffleId]?.dep == nil { shuffles[s.shuffleId] = WeakShuffle(s) }
        cond.broadcast()
        while results.count <= index && !stopped { cond.wait() }
        if stopped {
            cond.unlock()
            throw Stopped()
        }
        let r = results[index]
        cond.unlock()
        let accs = sc.lock.withLock { sc.accumulators }
        for (i, v) in r.accumulators.enumerated() where i < accs.count { accs[i].set(v) }
        return r.results
    }

    static func shuffles(of rdd: AnyRDD) -> [AnyShuffleDependency] {
        var out: [AnyShuffleDependency] = []
        var seen: Set<Int> = []
        var stack = [rdd]
        while let r = stack.popLast() {
            guard seen.insert(r.id).inserted else { continue }
            for d in r.dependencies {
                if case .shuffle(let s) = d { out.append(s) }
                stack.append(d.parent)
            }
        }
        return out
    }

    func run(_ req: TaskRequest) -> TaskReply {
        cond.lock()
        lastContact = wallMillis()
        if req.firstResult > results.count {
            defer { cond.unlock() }
            return .needResults(have: results.count)
        }
        let skip = results.count - req.firstResult
        if skip < req.results.count { results += req.results[skip...] }
        for (s, nodes) in req.mapLocations { mapLocations[s] = nodes }
        cond.broadcast()
        let deadline = Date(timeIntervalSinceNow: Double(ExecutorService.replayWaitMillis) / 1000)
        while published[req.action] == nil && failure == nil {
            if !cond.wait(until: deadline) { break }
        }
        guard let pub = published[req.action] else {
            let why = failure ?? "the job's program did not reach action \(req.action) on node \(service.node) within \(ExecutorService.replayWaitMillis) ms"
            cond.unlock()
            return .failed(why)
        }
        cond.unlock()

        let ctx = TaskContext(task: TaskId(job: req.action, stage: 0, partition: req.partition))
        ctx.attempt = req.attempt
        let key: TaskKey = {
            if case .map(let s) = req.kind { return TaskKey(action: req.action, shuffle: s, partition: req.partition, attempt: req.attempt) }
            return TaskKey(action: req.action, shuffle: -1, partition: req.partition, attempt: req.attempt)
        }()
        cond.withLock {
            running[key] = ctx
            if killedEarly.remove(key) != nil { ctx.kill() }
        }
        defer { cond.withLock { running[key] = nil } }
        let started = DispatchTime.now().uptimeNanoseconds
        do {
            let payload: Payload
            switch req.kind {
            case .map(let s):
                if CrashPoints.armed { CrashPoints.check("executor.map-task-\(s)") }
                guard let dep = Self.shuffles(of: pub.rdd).first(where: { $0.shuffleId == s }) else {
                    return .failed("action \(req.action) of job \(spec.name) has no shuffle \(s) on node \(service.node): is the driver running another binary?")
                }
                guard req.partition >= 0 && req.partition < dep.parentRDD.numPartitions else { return .failed("no map partition \(req.partition) in shuffle \(s)") }
                let out = try dep.runMapTask(req.partition, ctx)
                sc.metric { $0.shuffleBytesWritten += out.bytes }
                sc.shuffles.put(s, map: req.partition, out)
                payload = .inline([])
            case .result:
                if CrashPoints.armed { CrashPoints.check("executor.result-task-\(req.action)") }
                guard req.partition >= 0 && req.partition < pub.rdd.numPartitions else { return .failed("no partition \(req.partition) in action \(req.action)") }
                payload = service.keep(try pub.encode(req.partition, ctx))
            }
            var accs: [Int: Double] = [:]
            for (a, v) in ctx.pendingAccumulators { accs[a.index, default: 0] += v }
            let computed = sc.takeComputed()
            // This task's own partitions: the shared log may hold another
            // thread's partition still being computed, not yet cached.
            let cached = Array(Set(ctx.computedHere)).filter { sc.blocks.contains(rdd: Int($0 >> 32), partition: Int($0 & 0xffff_ffff)) }
            let metrics = ReplyMetrics(sc.takeMetrics(), taskMicros: Int((DispatchTime.now().uptimeNanoseconds - started) / 1000))
            ExecutorMetrics.record(metrics, result: "succeeded")
            return .ok(result: payload, accumulators: accs, computed: computed, cached: cached, metrics: metrics, have: have)
        } catch let f as FetchFailed {
            ExecutorMetrics.record(ReplyMetrics(sc.takeMetrics()), result: "fetch_failed")
            let node = cond.withLock { mapLocations[f.shuffleId].flatMap { f.mapPartition < $0.count ? $0[f.mapPartition] : nil } ?? -1 }
            return .fetchFailed(shuffle: f.shuffleId, map: f.mapPartition, node: node)
        } catch let k as TaskKilled {
            ExecutorMetrics.record(ReplyMetrics(sc.takeMetrics()), result: "killed")
            service.log.info("job \(spec.key) (\(spec.name)): task of action \(req.action), partition \(req.partition), attempt \(req.attempt) \(k.description)")
            return .failed(k.description)
        } catch {
            ExecutorMetrics.record(ReplyMetrics(sc.takeMetrics()), result: "failed")
            let why = describe(error)
            service.log.warning("job \(spec.key) (\(spec.name)): task of action \(req.action), partition \(req.partition), attempt \(req.attempt) failed: \(why)")
            return .failed(why)
        }
    }

    func encodeBucket(shuffle: Int, map: Int, bucket: Int) throws -> Bytes {
        if CrashPoints.armed { CrashPoints.check("executor.fetch-\(shuffle)") }
        guard let dep = cond.withLock({ shuffles[shuffle]?.dep }) else {
            throw WeftError(.notFound, "shuffle \(shuffle) of job \(spec.key) is not known on node \(service.node)")
        }
        return try dep.encodeBucket(map: map, bucket: bucket)
    }

    func fetch(shuffle: Int, map: Int, bucket: Int) throws -> Bytes {
        let holder = cond.withLock { mapLocations[shuffle].flatMap { map < $0.count ? $0[map] : nil } ?? -1 }
        guard holder >= 0, holder != service.node else { throw FetchFailed(shuffleId: shuffle, mapPartition: map) }
        let (call, key) = (service.callPeer, spec.key)
        do {
            let bytes = try blocking {
                let (ok, body) = try await call(holder, "exec.fetch", ExecutorCodec.request(key, [shuffle, map, bucket]))
                guard ok else { throw WeftError(.unavailable, String(decoding: body, as: UTF8.self)) }
                let payload = try body.withUnsafeBytes { buf -> Payload in
                    var r = ByteReader(buf)
                    return try Payload.decode(&r)
                }
                return try await ExecutorService.bytes(of: payload, from: holder, call: call)
            }
            sc.metric { $0.shuffleBytesFetched += bytes.count }
            return bytes
        } catch {
            throw FetchFailed(shuffleId: shuffle, mapPartition: map)
        }
    }
}

struct WeakShuffle {
    weak var dep: AnyShuffleDependency?
    init(_ d: AnyShuffleDependency) { dep = d }
}

/// Threads with large stacks (a task computes a chain of narrow
/// dependencies recursively) taking closures in order.
final class ThreadQueue: @unchecked Sendable {
    let cond = NSCondition()
    var queue: [() -> Void] = []
    var done = false

    init(threads: Int, name: String) {
        for i in 0..<threads {
            let t = Thread { [self] in work() }
            t.name = "\(name)-\(i)"
            t.stackSize = DataflowContext.executorStackBytes
            t.start()
        }
    }

    func submit(_ f: @escaping () -> Void) {
        cond.withLock {
            queue.append(f)
            cond.signal()
        }
    }

    func work() {
        while true {
            cond.lock()
            while queue.isEmpty && !done { cond.wait() }
            if done {
                cond.unlock()
                return
            }
            let f = queue.removeFirst()
            cond.unlock()
            f()
        }
    }

    func shutdown() {
        cond.withLock {
            done = true
            cond.broadcast()
        }
    }
}

/// The executor's counters on this node's `/metrics`, counted per task as
/// it ends (docs/observability: weft_executor_*).
enum ExecutorMetrics {
    static func record(_ m: ReplyMetrics, result: String) {
        CoreMetrics.Counter(label: "weft_executor_tasks_total", dimensions: [("result", result)]).increment()
        if m.taskMicros > 0 { CoreMetrics.Timer(label: "weft_executor_task_duration_seconds").recordNanoseconds(Int64(m.taskMicros) * 1000) }
        let counts: [(String, Int)] = [
            ("weft_shuffle_bytes_written_total", m.shuffleBytesWritten), ("weft_shuffle_bytes_fetched_total", m.shuffleBytesFetched),
            ("weft_block_cache_hits_total", m.cacheHits), ("weft_block_cache_misses_total", m.cacheMisses),
            ("weft_partitions_read_from_replicas_total", m.replicaReads), ("weft_bytes_spilled_total", m.bytesSpilled),
        ]
        for (label, n) in counts where n > 0 { CoreMetrics.Counter(label: label).increment(by: n) }
    }
}
