import Foundation
import WeftCore

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
    /// The participant this context's executor runs in, if any: reliable
    /// partitions are read from its replica first.
    var localParticipant: Int?

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
            let out = out as! ShuffleOutput
            self.metric { $0.shuffleBytesWritten += out.bytes }
            self.shuffles.put(dep.shuffleId, map: p, out)
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
        let before = lock.withLock { jobMetrics }
        let durations = TaskMillis()
        defer {
            let seconds = Double(DispatchTime.now().uptimeNanoseconds - started) / 1e9
            metric {
                var st = StageTime(name: name, tasks: partitions.count, seconds: seconds)
                st.taskMillis = TaskDurations(durations.values)
                st.bytesSpilled = $0.bytesSpilled - before.bytesSpilled
                st.shuffleBytesWritten = $0.shuffleBytesWritten - before.shuffleBytesWritten
                st.shuffleBytesFetched = $0.shuffleBytesFetched - before.shuffleBytesFetched
                st.retries = $0.taskRetries - before.taskRetries
                st.recomputedPartitions = $0.recomputedPartitions - before.recomputedPartitions
                $0.stageTimes.append(st)
            }
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
                ctx.attempt = attempt
                let taskStarted = DispatchTime.now().uptimeNanoseconds
                do {
                    if let fail = failTask, fail(t, attempt) { throw WeftError(.unavailable, "\(t) attempt \(attempt) failed (injected)") }
                    let r = try body(t.partition, ctx)
                    durations.add(Double(DispatchTime.now().uptimeNanoseconds - taskStarted) / 1e6)
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

/// Task durations of one stage, from the threads that ran them.
final class TaskMillis: @unchecked Sendable {
    let lock = NSLock()
    var values: [Double] { lock.withLock { all } }
    private var all: [Double] = []
    func add(_ ms: Double) { lock.withLock { all.append(ms) } }
}
