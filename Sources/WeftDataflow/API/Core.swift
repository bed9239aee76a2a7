import Foundation
import WeftCore

/// A dependency of an RDD on a parent: narrow (each child partition reads a
/// known few parent partitions, pipelined in one task) or shuffle (every
/// child partition may read every parent partition: a stage boundary).
public enum Dependency {
    case narrow(AnyRDD, (Int) -> [Int])
    case shuffle(AnyShuffleDependency)

    public var parent: AnyRDD {
        switch self {
        case .narrow(let r, _): return r
        case .shuffle(let s): return s.parentRDD
        }
    }
}

/// What the scheduler needs from any RDD, whatever its element type.
public protocol AnyRDD: AnyObject {
    var id: Int { get }
    var name: String { get }
    var numPartitions: Int { get }
    var dependencies: [Dependency] { get }
    var storageLevel: StorageLevel { get }
    var context: DataflowContext { get }
    /// Where a partition's data lives (a participant), for placement.
    func preferredLocation(_ partition: Int) -> String?
}

/// Where a persisted partition is kept.
public enum StorageLevel: Equatable, Sendable {
    case none
    /// In memory, evicted least-recently-used past the context's memory bound
    /// (an evicted partition is recomputed from lineage).
    case memory
    /// In memory while it fits; past the bound, least-recently-used blocks
    /// move to disk (serialized) instead of being dropped.
    case memoryAndDisk
    /// Serialized on disk only; takes no memory from the bound.
    case disk
}

/// Thrown by a reduce task whose shuffle input is missing: the scheduler
/// resubmits the parent stage's lost map tasks and retries.
public struct FetchFailed: Error {
    public let shuffleId: Int
    public let mapPartition: Int
}

/// A task is named, never a closure: (job, stage, partition).
public struct TaskId: Hashable, Sendable, CustomStringConvertible {
    public let job: Int
    public let stage: Int
    public let partition: Int
    public var description: String { "task(job \(job), stage \(stage), partition \(partition))" }
}

/// Passed to every compute call: who is running, and counters.
public final class TaskContext: @unchecked Sendable {
    public let task: TaskId
    /// Which attempt of the task this is (retries and speculative copies
    /// count up from 0); unique per partition within a stage.
    public internal(set) var attempt = 0
    let accumulatorUpdates = NSLock()
    var pendingAccumulators: [(Accumulator, Double)] = []
    /// (rdd << 32 | partition) of every partition this task computed (not
    /// read from a cache or a replica): an executor reports those it
    /// then cached, so the driver knows where they live.
    private(set) var computedHere: [Int64] = []
    /// Set when the driver kills this attempt (another attempt of the task
    /// won): the task stops at its next `checkKilled`, at the start of
    /// every partition it computes and before every output block.
    private var killed = false
    init(task: TaskId) { self.task = task }

    func kill() { accumulatorUpdates.withLock { killed = true } }

    public var isKilled: Bool { accumulatorUpdates.withLock { killed } }

    /// Throws `TaskKilled` once the driver has killed this attempt.
    public func checkKilled() throws {
        if isKilled { throw TaskKilled() }
    }

    func noteComputed(rdd: Int, partition: Int) {
        accumulatorUpdates.withLock { computedHere.append(Int64(rdd) << 32 | Int64(partition)) }
    }

    func add(_ acc: Accumulator, _ v: Double) {
        accumulatorUpdates.withLock { pendingAccumulators.append((acc, v)) }
    }
}

/// A task attempt stopped by the driver because another attempt of the
/// same task finished first.
public struct TaskKilled: Error, CustomStringConvertible {
    public var description: String { "killed: another attempt of this task finished first" }
}

/// A counter updated inside tasks and read by the driver. An update counts
/// once per successful task: a failed or re-run attempt's updates are dropped.
public final class Accumulator: @unchecked Sendable {
    let lock = NSLock()
    var total: Double = 0
    public let name: String
    /// Creation order in its context (see `DataflowContext.accumulator`).
    public let index: Int
    init(name: String, index: Int) {
        self.name = name
        self.index = index
    }
    public var value: Double { lock.withLock { total } }
    public func add(_ v: Double, in ctx: TaskContext) { ctx.add(self, v) }
    func commit(_ v: Double) { lock.withLock { total += v } }
    /// An executor's replica takes the driver's total after each action.
    func set(_ v: Double) { lock.withLock { total = v } }
}

/// A read-only value shared with every task.
public final class Broadcast<T>: @unchecked Sendable {
    public let value: T
    init(_ v: T) { value = v }
}

/// One stage run: a shuffle map stage is named after the shuffle and the
/// RDD it reads, a result stage after the RDD the action runs on. With its
/// tasks' durations (each task's successful attempt) and what the stage
/// spilled, shuffled and ran again.
public struct StageTime: Sendable, CustomStringConvertible {
    public let name: String
    public let tasks: Int
    public let seconds: Double
    public var taskMillis = TaskDurations()
    public var bytesSpilled = 0
    public var shuffleBytesWritten = 0
    /// Shuffle bytes read from other executors over the network (0 in one process).
    public var shuffleBytesFetched = 0
    public var retries = 0
    public var recomputedPartitions = 0

    public init(name: String, tasks: Int, seconds: Double) {
        self.name = name
        self.tasks = tasks
        self.seconds = seconds
    }

    public var description: String { String(format: "%@: %d tasks, %.3f s", name, tasks, seconds) }

    public var json: [String: Any] {
        ["stage": name, "tasks": tasks, "seconds": seconds, "task_ms": taskMillis.json, "bytes_spilled": bytesSpilled,
         "shuffle_bytes_written": shuffleBytesWritten, "shuffle_bytes_fetched": shuffleBytesFetched,
         "retries": retries, "recomputed_partitions": recomputedPartitions]
    }
}

/// Quantiles of a stage's task durations, in milliseconds.
public struct TaskDurations: Sendable {
    public var count = 0
    public var p50 = 0.0
    public var p95 = 0.0
    public var max = 0.0

    public init() {}

    public init(_ millis: [Double]) {
        guard !millis.isEmpty else { return }
        let s = millis.sorted()
        count = s.count
        p50 = s[(s.count - 1) / 2]
        p95 = s[Swift.min(s.count - 1, Int((Double(s.count - 1) * 0.95).rounded(.up)))]
        max = s[s.count - 1]
    }

    public var json: [String: Any] {
        ["count": count, "p50": (p50 * 1000).rounded() / 1000, "p95": (p95 * 1000).rounded() / 1000, "max": (max * 1000).rounded() / 1000]
    }
}

/// Counters a job reports.
public struct JobMetrics: Sendable, CustomStringConvertible {
    public var stages = 0
    public var tasks = 0
    public var taskRetries = 0
    public var stageResubmissions = 0
    /// Times the executor was lost mid-job (its threads killed).
    public var executorsLost = 0
    /// Partitions computed again although they had been computed before in
    /// this context (after cache eviction or lost shuffle output).
    public var recomputedPartitions = 0
    public var cacheHits = 0
    /// Partitions of persisted RDDs not found in the cache (computed, or read from a replica).
    public var cacheMisses = 0
    /// Shuffle map output held by executors: in memory (estimated) and in spill files.
    public var shuffleBytesWritten = 0
    /// Shuffle buckets read from another executor over the network.
    public var shuffleBytesFetched = 0
    /// Partitions of reliably persisted RDDs read back from a replica block.
    public var partitionsReadFromReplicas = 0
    /// Reliably persisted partitions none of whose replicas could be read
    /// (recomputed from lineage instead).
    public var unreadableReplicatedPartitions = 0
    /// Cached partitions read back from disk (memory-and-disk or disk level).
    public var diskBlockReads = 0
    /// Bytes written to spill files (shuffle data and cache blocks).
    public var bytesSpilled = 0
    public var spillFiles = 0
    /// Of `spillFiles`, reduce-side merge tables written out as sorted runs
    /// (and runs merged from other runs).
    public var mergeSpillFiles = 0
    /// Merges of runs into one run, done because a merge had more runs
    /// than its fan-in (`ExternalMerger.fanIn`).
    public var mergePasses = 0
    /// Join partitions whose hash table the memory pool refused, joined
    /// through a bounded merge instead.
    public var spilledJoins = 0
    /// Memory held past the bound because the data has no codec to spill with.
    public var unspillableBytes = 0
    /// Each stage run, in order: what it computed, its tasks and its wall time.
    public var stageTimes: [StageTime] = []
    public var description: String {
        "\(stages) stages, \(tasks) tasks, \(taskRetries) retries, \(stageResubmissions) stage resubmissions, \(executorsLost) executors lost, \(recomputedPartitions) partitions recomputed, \(partitionsReadFromReplicas) read from replicas, \(cacheHits) cache hits (\(diskBlockReads) from disk), \(bytesSpilled) bytes spilled in \(spillFiles) files"
    }

    mutating func add(_ o: JobMetrics) {
        stages += o.stages
        tasks += o.tasks
        taskRetries += o.taskRetries
        stageResubmissions += o.stageResubmissions
        executorsLost += o.executorsLost
        recomputedPartitions += o.recomputedPartitions
        cacheHits += o.cacheHits
        cacheMisses += o.cacheMisses
        shuffleBytesWritten += o.shuffleBytesWritten
        shuffleBytesFetched += o.shuffleBytesFetched
        partitionsReadFromReplicas += o.partitionsReadFromReplicas
        unreadableReplicatedPartitions += o.unreadableReplicatedPartitions
        diskBlockReads += o.diskBlockReads
        bytesSpilled += o.bytesSpilled
        spillFiles += o.spillFiles
        mergeSpillFiles += o.mergeSpillFiles
        mergePasses += o.mergePasses
        spilledJoins += o.spilledJoins
        unspillableBytes += o.unspillableBytes
        stageTimes += o.stageTimes
    }
}
