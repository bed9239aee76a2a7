import Foundation
import WeftCore

/// Cached partitions. Memory comes from the context's pool; when the pool
/// says no, least-recently-used memory blocks are evicted: dropped
/// (`.memory`, recomputed from lineage if needed) or written to disk
/// (`.memoryAndDisk`). `.disk` blocks go straight to a file.
final class BlockManager: @unchecked Sendable {
    enum Place {
        case memory(Any)
        case disk(String)
    }
    struct Entry {
        var place: Place
        var bytes: Int
        var used: UInt64
        let level: StorageLevel
        let encode: ((Any) -> Bytes)?
        let decode: ((Bytes) throws -> Any)?
    }
    let lock = NSLock()
    var blocks: [Int: [Int: Entry]] = [:]
    var clock: UInt64 = 0
    let pool: MemoryPool
    let disk: SpillDirectory
    var report: ((inout JobMetrics) -> Void) -> Void = { _ in }

    init(pool: MemoryPool, disk: SpillDirectory) {
        self.pool = pool
        self.disk = disk
    }

    func get(rdd: Int, partition: Int, _ ctx: TaskContext? = nil) throws -> Any? {
        let found = lock.withLock { () -> Entry? in
            guard var b = blocks[rdd]?[partition] else { return nil }
            clock += 1
            b.used = clock
            blocks[rdd]![partition] = b
            return b
        }
        guard let e = found else { return nil }
        switch e.place {
        case .memory(let data): return data
        case .disk(let file):
            guard let decode = e.decode, let bytes = try? disk.read(file), let data = try? decode(bytes) else {
                // An unreadable block is a lost block: recompute it.
                lock.withLock { blocks[rdd]?[partition] = nil }
                return nil
            }
            report { $0.diskBlockReads += 1 }
            return data
        }
    }

    func put<T>(rdd: Int, partition: Int, _ data: [T], bytes n: Int, level: StorageLevel, codec: BlockCodec<T>?) {
        // A codec that cannot encode these rows (a tuple with a component
        // that has no codec) is no codec.
        let codec = codec.flatMap { c in data.first.map(c.accepts) ?? true ? c : nil }
        let encode: ((Any) -> Bytes)? = codec.map { c in { SpillFormatBlock.encode($0 as! [T], c) } }
        let decode: ((Bytes) throws -> Any)? = codec.map { c in { try SpillFormat.decodeAll($0[...], c) } }
        // Without a codec a disk level can only keep the block in memory.
        let effective: StorageLevel = codec == nil && level != .none ? .memory : level
        if effective == .disk, let encode {
            if let file = writeToDisk(encode(data), rdd: rdd, partition: partition) {
                insert(rdd, partition, Entry(place: .disk(file), bytes: n, used: 0, level: .disk, encode: encode, decode: decode))
            }
            return
        }
        if reserve(n, sparing: rdd) {
            insert(rdd, partition, Entry(place: .memory(data), bytes: n, used: 0, level: effective, encode: encode, decode: decode))
        } else if effective == .memoryAndDisk, let encode, let file = writeToDisk(encode(data), rdd: rdd, partition: partition) {
            insert(rdd, partition, Entry(place: .disk(file), bytes: n, used: 0, level: .memoryAndDisk, encode: encode, decode: decode))
        }
        // Else a `.memory` block that does not fit is not kept (as in Spark).
    }

    private func insert(_ rdd: Int, _ partition: Int, _ e: Entry) {
        lock.withLock {
            clock += 1
            var e = e
            e.used = clock
            if let old = blocks[rdd]?[partition] { release(old) }
            blocks[rdd, default: [:]][partition] = e
        }
    }

    private func release(_ e: Entry) {
        switch e.place {
        case .memory: pool.release(e.bytes)
        case .disk(let f): disk.remove(f)
        }
    }

    private func writeToDisk(_ bytes: Bytes, rdd: Int, partition: Int) -> String? {
        guard let file = try? disk.write(bytes, tag: "rdd-\(rdd)-\(partition)") else { return nil }
        report {
            $0.bytesSpilled += bytes.count
            $0.spillFiles += 1
        }
        return file
    }

    /// Takes `n` bytes from the pool, evicting least-recently-used memory
    /// blocks of other RDDs until it fits. False if it cannot.
    private func reserve(_ n: Int, sparing rdd: Int) -> Bool {
        if n > pool.capacity { return false }
        while !pool.tryAcquire(n) {
            let victim = lock.withLock { () -> (Int, Int, Entry)? in
                var best: (Int, Int, Entry)?
                for (r, ps) in blocks where r != rdd {
                    for (p, e) in ps {
                        if case .memory = e.place, best == nil || e.used < best!.2.used { best = (r, p, e) }
                    }
                }
                if let (r, p, _) = best { blocks[r]![p] = nil }
                return best
            }
            guard let (r, p, e) = victim else { return false }
            pool.release(e.bytes)
            if e.level == .memoryAndDisk, let encode = e.encode, case .memory(let data) = e.place,
               let file = writeToDisk(encode(data), rdd: r, partition: p) {
                lock.withLock {
                    if blocks[r]?[p] == nil {
                        blocks[r, default: [:]][p] = Entry(place: .disk(file), bytes: e.bytes, used: e.used, level: e.level, encode: e.encode, decode: e.decode)
                    } else {
                        disk.remove(file)
                    }
                }
            }
        }
        return true
    }

    func drop(rdd: Int) {
        lock.withLock {
            for e in blocks[rdd]?.values ?? [:].values { release(e) }
            blocks[rdd] = nil
        }
    }

    func dropAll() {
        lock.withLock {
            for ps in blocks.values { for e in ps.values { release(e) } }
            blocks = [:]
        }
    }

    func cachedPartitions(rdd: Int) -> Int { lock.withLock { blocks[rdd]?.count ?? 0 } }
    func contains(rdd: Int, partition: Int) -> Bool { lock.withLock { blocks[rdd]?[partition] != nil } }

    func onDisk(rdd: Int) -> Int {
        lock.withLock { blocks[rdd]?.values.filter { if case .disk = $0.place { return true } else { return false } }.count ?? 0 }
    }
}

/// Block encoding for disk caches: the spill format of a whole partition.
enum SpillFormatBlock {
    static func encode<T>(_ items: [T], _ codec: BlockCodec<T>) -> Bytes {
        var w = ByteWriter(capacity: 64 + items.count * 16)
        SpillFormat.encode(items, count: items.count, codec, into: &w)
        return w.bytes
    }
}

/// Map outputs of shuffles, by (shuffle, map partition).
final class ShuffleManager: @unchecked Sendable {
    let lock = NSLock()
    var outputs: [Int: [Int: ShuffleOutput]] = [:]
    let pool: MemoryPool
    let disk: SpillDirectory

    init(pool: MemoryPool, disk: SpillDirectory) {
        self.pool = pool
        self.disk = disk
    }

    func put(_ shuffle: Int, map: Int, _ out: ShuffleOutput) {
        let old = lock.withLock { () -> ShuffleOutput? in
            let old = outputs[shuffle]?[map]
            outputs[shuffle, default: [:]][map] = out
            return old
        }
        if let old { free(old) }
    }

    func has(_ shuffle: Int, map: Int) -> Bool { lock.withLock { outputs[shuffle]?[map] != nil } }

    func output(_ shuffle: Int, map: Int) throws -> ShuffleOutput {
        guard let out = lock.withLock({ outputs[shuffle]?[map] }) else { throw FetchFailed(shuffleId: shuffle, mapPartition: map) }
        return out
    }

    private func free(_ out: ShuffleOutput) {
        pool.release(out.memoryBytes)
        for r in out.runs { disk.remove(r.file) }
    }

    let demoting = NSLock()

    /// Moves finished map outputs of shuffles other than `sparing` from
    /// memory to disk, oldest shuffle first, until `needed` bytes are free
    /// in the pool. True if anything was freed. A reader holding the old
    /// output keeps reading it from memory; new readers read the file.
    func demote(_ needed: Int, sparing: Int) -> Bool {
        demoting.lock()
        defer { demoting.unlock() }
        let candidates = lock.withLock { () -> [(Int, Int, ShuffleOutput)] in
            var out: [(Int, Int, ShuffleOutput)] = []
            for s in outputs.keys.sorted() where s != sparing {
                for (m, o) in outputs[s]! where o.memoryBytes > 0 && o.demote != nil { out.append((s, m, o)) }
            }
            return out
        }
        var freed = 0
        for (s, m, old) in candidates {
            if freed >= needed { break }
            guard let new = try? old.demote?() else { continue }
            let swapped = lock.withLock { () -> Bool in
                guard outputs[s]?[m] === old else { return false }
                outputs[s]![m] = new
                return true
            }
            if swapped {
                pool.release(old.memoryBytes)
                freed += old.memoryBytes
            } else {
                // Dropped or replaced meanwhile: the new file is nobody's.
                if let f = new.runs.last?.file { disk.remove(f) }
            }
        }
        return freed > 0
    }

    /// Drops the outputs of `shuffle` that have a spill file that is gone.
    func dropUnreadable(_ shuffle: Int) {
        let maps = lock.withLock { outputs[shuffle] ?? [:] }
        for (m, out) in maps where out.runs.contains(where: { !FileManager.default.fileExists(atPath: $0.file) }) {
            drop(shuffle, map: m)
        }
    }

    func drop(_ shuffle: Int, map: Int) {
        if let old = lock.withLock({ outputs[shuffle]?.removeValue(forKey: map) }) { free(old) }
    }

    func drop(shuffle: Int? = nil) {
        let gone = lock.withLock { () -> [ShuffleOutput] in
            if let s = shuffle {
                defer { outputs[s] = nil }
                return Array(outputs[s]?.values ?? [:].values)
            }
            defer { outputs = [:] }
            return outputs.values.flatMap { $0.values }
        }
        for o in gone { free(o) }
    }
}

/// Runs a stage's tasks. Local mode uses a pool of threads, one per core;
/// the protocol is where executors inside participant processes will plug
/// in.
public protocol Executor: Sendable {
    var parallelism: Int { get }
    /// Runs `body` once for each task and returns when every task is done,
    /// or as soon as the executor is lost (its threads die and the blocks
    /// and shuffle outputs it held are gone): then `.lost`. A task makes its
    /// result visible only through `TaskAttempt.publish`, which refuses
    /// once the executor that ran it is lost, so a dead executor's late
    /// result is never counted (nor its accumulator updates).
    func run(_ tasks: [TaskId], _ body: @escaping @Sendable (TaskId, TaskAttempt) -> Void) -> ExecutorOutcome
}

public enum ExecutorOutcome: Sendable { case finished, lost }

/// One batch of tasks on one executor incarnation.
public final class TaskAttempt: @unchecked Sendable {
    let cond = NSCondition()
    var lost = false
    var remaining: Int

    init(tasks: Int) { remaining = tasks }

    /// Runs `f` (which publishes a task's result) unless the executor was
    /// lost; the check and `f` are atomic with respect to the loss.
    @discardableResult
    public func publish(_ f: () -> Void) -> Bool {
        cond.lock()
        defer { cond.unlock() }
        if lost { return false }
        f()
        return true
    }

    var isLost: Bool { cond.withLock { lost } }

    func finishOne() {
        cond.lock()
        remaining -= 1
        if remaining == 0 { cond.broadcast() }
        cond.unlock()
    }

    func markLost() {
        cond.lock()
        lost = true
        cond.broadcast()
        cond.unlock()
    }

    func wait() -> ExecutorOutcome {
        cond.lock()
        defer { cond.unlock() }
        while remaining > 0 && !lost { cond.wait() }
        return lost ? .lost : .finished
    }
}

/// The local executor: a pool of `parallelism` dedicated threads pulling
/// tasks in order. `kill()` loses it the way a crashed executor process is
/// lost: waiting and running tasks are abandoned (a running task's result
/// is refused when it finishes), the scheduler drops what the executor
/// held, and a fresh pool of threads takes the next tasks.
public final class LocalExecutor: Executor, @unchecked Sendable {
    public let parallelism: Int
    let pool: WorkerPool

    public init(threads: Int = ProcessInfo.processInfo.activeProcessorCount) {
        parallelism = max(1, threads)
        pool = WorkerPool(threads: parallelism)
    }

    deinit { pool.shutdown() }

    public func run(_ tasks: [TaskId], _ body: @escaping @Sendable (TaskId, TaskAttempt) -> Void) -> ExecutorOutcome {
        pool.run(tasks, body)
    }

    /// Loses this executor: its threads stop taking tasks (a running task
    /// finishes, but its result is refused), every waiting task is
    /// abandoned, and new threads serve whatever comes next.
    public func kill() { pool.kill() }

    /// How many times `kill()` was called.
    public var kills: Int { pool.cond.withLock { pool.kills } }
}

/// The threads behind a `LocalExecutor`, one generation at a time.
final class WorkerPool: @unchecked Sendable {
    let threads: Int
    let cond = NSCondition()
    var queue: [(TaskAttempt, () -> Void)] = []
    var head = 0
    var generation = 0
    var active: [ObjectIdentifier: TaskAttempt] = [:]
    var kills = 0

    init(threads: Int) {
        self.threads = threads
        startWorkers()
    }

    func startWorkers() {
        let gen = generation
        for i in 0..<threads {
            let t = Thread { [self] in work(gen) }
            t.name = "weft-executor-\(gen)-\(i)"
            t.stackSize = DataflowContext.executorStackBytes
            t.start()
        }
    }

    func work(_ gen: Int) {
        while true {
            cond.lock()
            while head == queue.count && generation == gen { cond.wait() }
            if generation != gen {
                cond.unlock()
                return
            }
            let (attempt, item) = queue[head]
            head += 1
            if head == queue.count {
                queue.removeAll(keepingCapacity: true)
                head = 0
            }
            cond.unlock()
            item()
            attempt.finishOne()
        }
    }

    func run(_ tasks: [TaskId], _ body: @escaping @Sendable (TaskId, TaskAttempt) -> Void) -> ExecutorOutcome {
        if tasks.isEmpty { return .finished }
        let attempt = TaskAttempt(tasks: tasks.count)
        cond.lock()
        active[ObjectIdentifier(attempt)] = attempt
        for t in tasks { queue.append((attempt, { body(t, attempt) })) }
        cond.broadcast()
        cond.unlock()
        let outcome = attempt.wait()
        cond.lock()
        active[ObjectIdentifier(attempt)] = nil
        cond.unlock()
        return outcome
    }

    func kill() {
        cond.lock()
        generation += 1
        kills += 1
        let victims = Array(active.values)
        queue.removeAll()
        head = 0
        cond.broadcast()
        cond.unlock()
        for a in victims { a.markLost() }
        startWorkers()
    }

    /// Lets every thread exit once its current task is done.
    func shutdown() {
        cond.lock()
        generation += 1
        queue.removeAll()
        head = 0
        cond.broadcast()
        cond.unlock()
    }
}

/// Thrown inside the scheduler when the executor running a stage is lost.
struct ExecutorLost: Error {}

/// The executor of a context whose tasks run elsewhere (a distributed
/// driver, an executor's replica): it only states the parallelism that
/// default partition counts come from.
public final class RemoteTasksExecutor: Executor {
    public let parallelism: Int
    public init(parallelism: Int) { self.parallelism = max(1, parallelism) }
    public func run(_ tasks: [TaskId], _ body: @escaping @Sendable (TaskId, TaskAttempt) -> Void) -> ExecutorOutcome {
        preconditionFailure("a distributed context runs no task in process")
    }
}

public final class Counter: @unchecked Sendable {
    let lock = NSLock()
    var n = 0
    public init() {}
    func increment() -> Int { lock.withLock { n += 1; return n } }
    public func add(_ k: Int) { lock.withLock { n += k } }
    public var value: Int { lock.withLock { n } }
}

/// Progress of a running job, for progress bars.
public struct JobProgress: Sendable {
    public var stage: Int
    public var stages: Int
    public var tasksDone: Int
    public var tasks: Int
}

/// The driver: creates RDDs, runs jobs (the DAG scheduler), and owns the
/// cache, the shuffle outputs and the executor.
public final class DataflowContext: @unchecked Sendable {
    let lock = NSLock()
    var nextRDD = 0
    var nextShuffle = 0
    var nextJob = 0
    var nextStage = 0
    let blocks: BlockManager
    let shuffles: ShuffleManager
    /// The one memory bound (`memoryBytesMax`) shared by caches, shuffle
    /// map outputs and map-side combine tables.
    let memory: MemoryPool
    let spillDirectory: SpillDirectory
    public var executor: Executor
    public let maxTaskFailures = 4
    public let maxStageAttempts = 4
    var computed: Set<Int64> = []
    var jobMetrics = JobMetrics()
    public private(set) var lastJobMetrics = JobMetrics()
    public private(set) var totalMetrics = JobMetrics()
    public var onProgress: (@Sendable (JobProgress) -> Void)?
    /// Test hook: called after each stage of a job completes (1-based index).
    public var afterStage: ((Int) -> Void)?
    /// Test hook: a task attempt that this returns true for fails.
    public var failTask: (@Sendable (TaskId, Int) -> Bool)?
    /// Stack of a driver thread (planning walks the lineage recursively; a
    /// 10,000-iteration job's lineage is deep) and of an executor thread
    /// (a task computes a chain of narrow dependencies recursively). Only
    /// the pages used are resident.
    public static let driverStackBytes = 256 << 20
    public static let executorStackBytes = 256 << 20
    /// Asked before each task attempt: true stops the job (no task starts
    /// any more; those running finish) with an `unavailable` error. A
    /// server's job whose client went away stops this way.
    public var shouldStop: (@Sendable () -> Bool)?

    /// Reliably persisted RDDs, for `releaseReliableBlocks`.
    let reliableRegistry = ReliableRegistry()

    /// Names this context's reliable blocks apart from every other run's
    /// (an executor's replica of a job takes its driver's).
    public let runId: String

    /// Where actions run when jobs are distributed: the driver's scheduler
    /// (tasks go to executors) or an executor's replica of the driver's
    /// program (actions wait for the driver's results). Nil: in this
    /// process, on `executor`.
    var actionRunner: ActionRunner?
    var accumulators: [Accumulator] = []
    /// In an executor's replica: where map outputs held by other executors
    /// are fetched from.
    var remoteShuffles: RemoteShuffles?
    var nextAction = 0
    /// False in an executor's replica: the driver deletes the job's
    /// reliable blocks, once, when the job ends.
    var ownsReliableBlocks = true

    /// The default memory bound of a context.
    public static let memoryBytesMaxDefault = 512 << 20
    /// The largest memory bound a context takes (1 TiB).
    public static let memoryBytesMaxLimit = 1 << 40
    /// The most executor threads `weft job run --threads` takes.
    public static let executorThreadsMax = 256

    public init(executor: Executor = LocalExecutor(), memoryBytesMax: Int = DataflowContext.memoryBytesMaxDefault, runId: String? = nil) {
        self.executor = executor
        self.runId = runId ?? String(UInt64.random(in: 1...UInt64.max), radix: 36)
        memory = MemoryPool(capacity: memoryBytesMax)
        spillDirectory = SpillDirectory(runId: String(UInt64.random(in: 1...UInt64.max), radix: 36))
        blocks = BlockManager(pool: memory, disk: spillDirectory)
        shuffles = ShuffleManager(pool: memory, disk: spillDirectory)
        blocks.report = { [unowned self] f in self.metric(f) }
    }

    /// The most memory the pool has had in use (an estimate of the data
    /// the engine holds, not the process's resident size).
    public var peakPoolBytes: Int { memory.peak }

    func newRDDId() -> Int { lock.withLock { nextRDD += 1; return nextRDD } }
    func newShuffleId() -> Int { lock.withLock { nextShuffle += 1; return nextShuffle } }
    func metric(_ f: (inout JobMetrics) -> Void) { lock.withLock { f(&jobMetrics) } }

    func noteComputed(rdd: Int, partition: Int) {
        let key = Int64(rdd) << 32 | Int64(partition)
        lock.withLock {
            if computedLog != nil { computedLog!.append(key) }
            if !computed.insert(key).inserted { jobMetrics.recomputedPartitions += 1 }
        }
    }

    /// In an executor's replica: every partition computed since the last
    /// `takeComputed`, for the driver, which counts recomputations across
    /// every executor.
    var computedLog: [Int64]?

    func takeComputed() -> [Int64] {
        lock.withLock {
            defer { if computedLog != nil { computedLog = [] } }
            return computedLog ?? []
        }
    }

    /// The counters since the last call (an executor reports them with
    /// each task's answer).
    func takeMetrics() -> JobMetrics {
        lock.withLock {
            defer { jobMetrics = JobMetrics() }
            return jobMetrics
        }
    }

    func defaultParallelism(_ rdds: AnyRDD...) -> Int { max(rdds.map(\.numPartitions).max() ?? 1, 1) }

    // MARK: Sources and shared variables

    public func parallelize<T>(_ data: [T], partitions: Int? = nil) -> RDD<T> {
        ParallelCollectionRDD(self, data, partitions ?? executor.parallelism)
    }

    /// Lines of a text file. Partition i reads its own byte range of the
    /// file (from the first line that starts in it), so a partition can be
    /// read again identically and no task holds the whole file.
    public func textFile(_ path: String, partitions: Int? = nil) throws -> RDD<String> {
        // stat follows symlinks (the size of the file, not of the link).
        var st = stat()
        guard stat(path, &st) == 0 else { throw WeftError(.notFound, "cannot read \(path): \(String(cString: strerror(errno)))") }
        guard (st.st_mode & S_IFMT) == S_IFREG else { throw WeftError(.invalidArgument, "\(path) is not a regular file") }
        let size = Int(st.st_size)
        let n = partitions ?? Swift.max(executor.parallelism * 4, size / (32 << 20) + 1)
        return TextFileRDD(self, path: path, size: size, partitions: Swift.max(1, n))
    }

    public func broadcast<T>(_ v: T) -> Broadcast<T> { Broadcast(v) }

    /// A new accumulator, numbered in creation order: a driver and the
    /// executors replaying its program number theirs alike.
    public func accumulator(_ name: String) -> Accumulator {
        lock.withLock {
            let a = Accumulator(name: name, index: accumulators.count)
            accumulators.append(a)
            return a
        }
    }

    /// Drops every cached partition and shuffle output: what losing an
    /// executor does. Jobs recompute what they need from lineage.
    public func loseExecutorState() {
        blocks.dropAll()
        shuffles.drop()
    }

    public func dropShuffleOutputs() { shuffles.drop() }
    public func dropCachedBlocks() { blocks.dropAll() }

    // MARK: The scheduler

    /// Runs `f` over the given partitions of `rdd` (all by default) and
    /// returns the results in partition order.
    public func runJob<T, U>(_ rdd: RDD<T>, partitions: [Int]? = nil, _ f: @escaping ([T]) throws -> U) throws -> [U] {
        try runJob(rdd, partitions: partitions, task: { p, ctx in try f(try rdd.iterator(p, ctx)) })
    }

    /// The number of actions this context has run: a driver and the
    /// executors replaying its program count alike.
    public var actionsRun: Int { lock.withLock { nextAction } }

    /// A job whose result tasks see each partition's rows one at a time
    /// (`each { row in ... }`) rather than as an array, so an action that
    /// folds (count, reduce, foreach) never holds a whole partition.
    public func runStreamingJob<T, U>(_ rdd: RDD<T>, partitions: [Int]? = nil, _ f: @escaping (_ each: (_ body: (T) throws -> Void) throws -> Void) throws -> U) throws -> [U] {
        try runJob(rdd, partitions: partitions, task: { p, ctx in try f { body in try rdd.push(p, ctx, body) } })
    }

    func runJob<T, U>(_ rdd: RDD<T>, partitions: [Int]?, task: @escaping (Int, TaskContext) throws -> U) throws -> [U] {
        let job = lock.withLock { () -> Int in
            nextJob += 1
            jobMetrics = JobMetrics()
            return nextJob
        }
        defer {
            lock.withLock {
                lastJobMetrics = jobMetrics
                totalMetrics.add(jobMetrics)
            }
        }
        let parts = partitions ?? Array(0..<rdd.numPartitions)
        if let runner = actionRunner {
            // Distributed: tasks run in other processes, so results cross
            // as bytes, through the codec of U.
            guard let codec = BlockCodec<U>.forResults() else {
                throw WeftError(.invalidArgument, "an action over \(rdd.name) returns \(U.self), which has no codec: it cannot cross processes (run the job with --local)")
            }
            let action = lock.withLock { () -> Int in
                defer { nextAction += 1 }
                return nextAction
            }
            let bytes = try runner.runAction(self, index: action, rdd: rdd, partitions: parts) { p, ctx in codec.encodeWhole(try task(p, ctx)) }
            return try bytes.map { try codec.decodeWhole($0, what: "a task result of action \(action)") }
        }
        var stageIndex = 0
        for attempt in 0..<maxStageAttempts {
            // Planned again on each attempt: a cached RDD whose stages were
            // skipped may have lost blocks since.
            let plan = stagePlan(rdd)
            do {
                // Parent stages first (topological order), skipping map outputs that exist.
                for dep in plan {
                    if try runMapStage(dep, job: job, stageIndex: &stageIndex, stages: plan.count + 1) {
                        afterStage?(stageIndex)
                    }
                }
                stageIndex += 1
                let results = try runTasks(job: job, stage: stageIndex, stageIndex: stageIndex, stages: plan.count + 1, partitions: parts,
                                           name: "result of \(rdd.name) [rdd \(rdd.id)]", task)
                return results.map { $0 as! U }
            } catch let e as FetchFailed {
                // Lost shuffle output: resubmit the parent stage for what is missing.
                if attempt + 1 == maxStageAttempts {
                    throw WeftError(.unavailable, "job \(job) failed: map output \(e.mapPartition) of shuffle \(e.shuffleId) was lost \(maxStageAttempts) times")
                }
                metric { $0.stageResubmissions += 1 }
                stageIndex = 0
                continue
            } catch is ExecutorLost {
                // Everything the executor held is gone; the next attempt
                // replans and recomputes what lineage says is missing.
                if attempt + 1 == maxStageAttempts {
                    throw WeftError(.unavailable, "job \(job) failed: the executor was lost \(maxStageAttempts) times")
                }
                metric {
                    $0.executorsLost += 1
                    $0.stageResubmissions += 1
                }
                stageIndex = 0
                continue
            }
        }
        throw WeftError(.unavailable, "job \(job) failed after \(maxStageAttempts) stage attempts")
    }

    /// Every shuffle dependency `rdd` needs, parents before children.
    func stagePlan(_ rdd: AnyRDD) -> [AnyShuffleDependency] {
        var order: [AnyShuffleDependency] = []
        var seen: Set<Int> = []
        var visitedRDDs: Set<Int> = []
        func visit(_ r: AnyRDD) {
            guard visitedRDDs.insert(r.id).inserted else { return }
            // An RDD whose every partition is cached or stored reliably needs
            // none of its parents' stages (Spark's missing-parent check).
            if r.storageLevel != .none, blocks.cachedPartitions(rdd: r.id) == r.numPartitions { return }
            if (r as? ReliableMarker)?.reliablyComplete == true { return }
            for d in r.dependencies {
                switch d {
                case .narrow(let p, _): visit(p)
                case .shuffle(let s):
                    visit(s.parentRDD)
                    if seen.insert(s.shuffleId).inserted { order.append(s) }
                }
            }
        }
        visit(rdd)
        return order
    }

    /// Runs the missing map tasks of one shuffle. Returns false if nothing was missing.
    func runMapStage(_ dep: AnyShuffleDependency, job: Int, stageIndex: inout Int, stages: Int) throws -> Bool {
        stageIndex += 1
        let missing = (0..<dep.parentRDD.numPartitions).filter { !shuffles.has(dep.shuffleId, map: $0) }
        if missing.isEmpty { return false }
        _ = try runTasks(job: job, stage: stageIndex, stageIndex: stageIndex, stages: stages, partitions: missing,
                         name: "shuffle \(dep.shuffleId) of \(dep.parentRDD.name) [rdd \(dep.parentRDD.id)]", publish: { p, out in
            self.shuffles.put(dep.shuffleId, map: p, out as! ShuffleOutput)
        }) { p, ctx in
            try dep.runMapTask(p, ctx)
        }
        return true
    }

    /// Runs one task per partition on the executor, retrying a failed task up
    /// to `maxTaskFailures` times. Accumulator updates of an attempt count
    /// only if it succeeds. A FetchFailed goes straight up to the job.
    func runTasks(job: Int, stage: Int, stageIndex: Int, stages: Int, partitions: [Int], name: String, publish: ((Int, Any) -> Void)? = nil,
                  _ body: @escaping (Int, TaskContext) throws -> Any) throws -> [Any] {
        let started = DispatchTime.now().uptimeNanoseconds
        defer {
            let seconds = Double(DispatchTime.now().uptimeNanoseconds - started) / 1e9
            metric { $0.stageTimes.append(StageTime(name: name, tasks: partitions.count, seconds: seconds)) }
        }
        let results = ResultSlots(partitions.count)
        let done = Counter()
        metric {
            $0.stages += 1
            $0.tasks += partitions.count
        }
        let tasks = partitions.map { TaskId(job: job, stage: stage, partition: $0) }
        let index = Dictionary(uniqueKeysWithValues: partitions.enumerated().map { ($1, $0) })
        onProgress?(JobProgress(stage: stageIndex, stages: stages, tasksDone: 0, tasks: tasks.count))
        let box = UncheckedBox((body, publish))
        let outcome = executor.run(tasks) { [self] t, run in
            let (body, publish) = box.value
            var lastError: Error?
            for attempt in 0..<maxTaskFailures {
                if run.isLost { return }
                if let stop = shouldStop, stop() {
                    lastError = WeftError(.unavailable, "job stopped: its client went away")
                    break
                }
                let ctx = TaskContext(task: t)
                do {
                    if let fail = failTask, fail(t, attempt) { throw WeftError(.unavailable, "\(t) attempt \(attempt) failed (injected)") }
                    let r = try body(t.partition, ctx)
                    // Only a live executor's result counts, accumulators included.
                    run.publish {
                        publish?(t.partition, r)
                        for (acc, v) in ctx.pendingAccumulators { acc.commit(v) }
                        results.set(index[t.partition]!, .success(r))
                    }
                    lastError = nil
                    break
                } catch let e as FetchFailed {
                    lastError = e
                    break
                } catch {
                    lastError = error
                    if attempt + 1 < maxTaskFailures { metric { $0.taskRetries += 1 } }
                }
            }
            if let lastError { results.set(index[t.partition]!, .failure(lastError)) }
            let n = done.increment()
            onProgress?(JobProgress(stage: stageIndex, stages: stages, tasksDone: n, tasks: tasks.count))
        }
        if outcome == .lost {
            // What the executor held (cached blocks, shuffle outputs) died with it.
            loseExecutorState()
            throw ExecutorLost()
        }
        var out: [Any] = []
        for r in results.values {
            switch r! {
            case .success(let v): out.append(v)
            case .failure(let e as FetchFailed): throw e
            case .failure(let e): throw e
            }
        }
        return out
    }

    // MARK: Lineage

    func debugString(_ rdd: AnyRDD) -> String {
        var lines: [String] = []
        var shown: Set<Int> = []
        func visit(_ r: AnyRDD, _ depth: Int) {
            let indent = String(repeating: "  ", count: depth)
            var note = ""
            if r.storageLevel != .none {
                note = " [persisted \(r.storageLevel), \(blocks.cachedPartitions(rdd: r.id))/\(r.numPartitions) cached, \(blocks.onDisk(rdd: r.id)) of them on disk]"
            }
            if let rel = (r as? ReliableMarker)?.reliableDescription { note += " [\(rel)]" }
            guard shown.insert(r.id).inserted else {
                lines.append("\(indent)(\(r.numPartitions)) \(r.name) [rdd \(r.id)]\(note) (lineage shown above)")
                return
            }
            lines.append("\(indent)(\(r.numPartitions)) \(r.name) [rdd \(r.id)]\(note)")
            for d in r.dependencies {
                switch d {
                case .narrow(let p, _): visit(p, depth)
                case .shuffle(let s):
                    lines.append("\(indent)+-- shuffle \(s.shuffleId) into \(s.outputPartitions) partitions: stage boundary")
                    visit(s.parentRDD, depth + 1)
                }
            }
        }
        visit(rdd, 0)
        return lines.joined(separator: "\n")
    }
}

/// Lets lineage printing say where reliable blocks live without knowing T.
protocol ReliableMarker {
    var reliableDescription: String? { get }
    var reliablyComplete: Bool { get }
    /// Deletes the RDD's reliable blocks (nothing if it has none).
    func releaseReliable() throws
}

/// The reliable block sets a context has written to (their states, not
/// the RDDs, which may be gone), so a job can delete its blocks when it ends.
final class ReliableRegistry: @unchecked Sendable {
    private let lock = NSLock()
    private var sets: [(id: Int, state: ReliableState, partitions: Int)] = []
    private var next = 0
    func add(_ r: ReliableState, partitions: Int) { lock.withLock { sets.append((next, r, partitions)); next += 1 } }
    /// A position: `take(since:)` returns only sets registered after it.
    func mark() -> Int { lock.withLock { next } }
    func take(since mark: Int) -> [(id: Int, state: ReliableState, partitions: Int)] {
        lock.withLock {
            let taken = sets.filter { $0.id >= mark }
            sets.removeAll { $0.id >= mark }
            return taken
        }
    }
    func putBack(_ s: (id: Int, state: ReliableState, partitions: Int)) { lock.withLock { sets.append(s) } }
}

extension DataflowContext {
    /// A position in the context's reliable block sets, for
    /// `releaseReliableBlocks(since:)`.
    public func reliableMark() -> Int { reliableRegistry.mark() }

    /// Deletes the reliable blocks of the sets registered since `mark` (a
    /// job's: they exist to survive a lost node while it runs, not after).
    /// A set that cannot be deleted stays registered; the first error is thrown.
    public func releaseReliableBlocks(since mark: Int = 0) throws {
        if !ownsReliableBlocks { return }
        var failure: Error?
        for s in reliableRegistry.take(since: mark) {
            do { try s.state.deleteAll(s.partitions) } catch {
                reliableRegistry.putBack(s)
                failure = failure ?? error
            }
        }
        if let failure { throw failure }
    }
}

extension RDD: ReliableMarker {
    func releaseReliable() throws {
        if reliable != nil { try unpersist() }
    }

    var reliablyComplete: Bool { reliable?.allStored(numPartitions) ?? false }

    var reliableDescription: String? {
        guard let r = reliable else { return nil }
        return "reliable x\(r.replicas) replicas in the store as block set \(r.set)\(checkpointed ? ", lineage cut by checkpoint" : "")"
    }
}

/// Lineage closures are not `Sendable`, but an RDD is immutable once built
/// and tasks only read it; this box carries a closure to the executor's threads.
final class UncheckedBox<T>: @unchecked Sendable {
    let value: T
    init(_ v: T) { value = v }
}

final class ResultSlots: @unchecked Sendable {
    let lock = NSLock()
    var values: [Result<Any, Error>?]
    init(_ n: Int) { values = Array(repeating: nil, count: n) }
    func set(_ i: Int, _ r: Result<Any, Error>) { lock.withLock { values[i] = r } }
}
