import Foundation
import WeftCore

/// Decides which output partition a key goes to. Two RDDs partitioned by
/// partitioners that are `isSame` are co-partitioned: a join of them needs
/// no shuffle.
public protocol Partitioner: AnyObject {
    var numPartitions: Int { get }
    func isSame(as other: Partitioner) -> Bool
    var description: String { get }
}

public final class HashPartitioner: Partitioner {
    public let numPartitions: Int
    public init(_ n: Int) {
        precondition(n > 0)
        numPartitions = n
    }
    public func isSame(as other: Partitioner) -> Bool { (other as? HashPartitioner)?.numPartitions == numPartitions }
    public var description: String { "hash(\(numPartitions))" }
    /// The same partition for the same key in every process and every run
    /// (Swift's `hashValue` is seeded per process): a map task on one node
    /// and the reducer on another must agree.
    func partition<K: Hashable>(_ k: K) -> Int {
        Int(StableHash.of(k) % UInt64(numPartitions))
    }
}

/// Range partitioning for sorts: `bounds[i]` is the largest key of partition i.
public final class RangePartitioner<K: Comparable>: Partitioner {
    public let bounds: [K]
    public let ascending: Bool
    public var numPartitions: Int { bounds.count + 1 }
    public init(bounds: [K], ascending: Bool) {
        self.bounds = bounds
        self.ascending = ascending
    }
    public func isSame(as other: Partitioner) -> Bool { other === self }
    public var description: String { "range(\(numPartitions))" }
    func partition(_ k: K) -> Int {
        var lo = 0, hi = bounds.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if bounds[mid] < k { lo = mid + 1 } else { hi = mid }
        }
        return ascending ? lo : bounds.count - lo
    }
}

/// How values of a key are combined: Spark's `Aggregator`, with merges that
/// update the combiner in place (so grouping appends rather than copies).
public struct Aggregator<V, C> {
    public let createCombiner: (V) -> C
    public let mergeValue: (inout C, V) -> Void
    public let mergeCombiners: (inout C, C) -> Void
    /// Bytes a combiner holds outside itself (a group's array), for the
    /// memory bound; nil when combiners do not grow as they merge.
    public let combinerBytes: ((C) -> Int)?

    public init(createCombiner: @escaping (V) -> C, mergeValue: @escaping (inout C, V) -> Void,
                mergeCombiners: @escaping (inout C, C) -> Void, combinerBytes: ((C) -> Int)? = nil) {
        self.createCombiner = createCombiner
        self.mergeValue = mergeValue
        self.mergeCombiners = mergeCombiners
        self.combinerBytes = combinerBytes
    }
}

/// A shuffle dependency seen without its types, for the scheduler.
public protocol AnyShuffleDependency: AnyObject {
    var shuffleId: Int { get }
    var parentRDD: AnyRDD { get }
    var outputPartitions: Int { get }
    /// Computes map partition `p` of the parent and returns its buckets.
    func runMapTask(_ p: Int, _ ctx: TaskContext) throws -> ShuffleOutput
    /// Bucket `bucket` of map output `map` held in this process, encoded
    /// for a reducer in another process.
    func encodeBucket(map: Int, bucket: Int) throws -> Bytes
    /// Nil if this shuffle's map outputs can be read from another process
    /// (its rows have a codec and its keys a stable hash); else why not.
    var processBoundRefusal: String? { get }
}

/// One map task's output: a bucket per reduce partition, partly in memory
/// and partly in spill files (runs), each run holding every bucket.
public final class ShuffleOutput: @unchecked Sendable {
    /// In-memory buckets, each an array of (K, C); empty when all spilled.
    let memory: [Any]
    /// Memory taken from the pool for `memory`, released when dropped.
    let memoryBytes: Int
    let runs: [SpillRun]
    let rows: Int
    /// Bytes held: the in-memory estimate and the spill files.
    var bytes: Int {
        runs.reduce(memoryBytes) { $0 + ((try? FileManager.default.attributesOfItem(atPath: $1.file)[.size] as? Int) ?? 0) }
    }
    /// Writes the in-memory buckets as one more run and returns the output
    /// without memory (nil when there is nothing to write or no codec).
    /// Built where the types are known; see `ShuffleManager.demote`.
    let demote: (() throws -> ShuffleOutput?)?
    init(memory: [Any], memoryBytes: Int, runs: [SpillRun], rows: Int, demote: (() throws -> ShuffleOutput?)? = nil) {
        self.memory = memory
        self.memoryBytes = memoryBytes
        self.runs = runs
        self.rows = rows
        self.demote = demote
    }
}

/// A spill file with every bucket of a map task: bucket b is the byte
/// range offsets[b]..<offsets[b+1].
struct SpillRun {
    let file: String
    let offsets: [Int]
}

/// Buckets of one map task, spilled as runs when the memory pool says no.
struct ShuffleWriter<K, C> {
    let buckets: Int
    let codec: BlockCodec<(K, C)>?
    let sc: DataflowContext
    let tag: String
    /// Estimated bytes per row held in memory.
    let rowBytes: Int
    var held = 0
    var runs: [SpillRun] = []

    let shuffle: Int

    init(sc: DataflowContext, shuffle: Int, map: Int, buckets: Int, rowBytes: Int, codec: BlockCodec<(K, C)>?) {
        self.sc = sc
        self.shuffle = shuffle
        self.buckets = buckets
        self.tag = "shuffle-\(shuffle)-map-\(map)"
        self.rowBytes = rowBytes
        self.codec = codec
    }

    /// Asks for memory for `rows` more rows; false means spill now. Older
    /// shuffles' finished outputs move to disk first (oldest first), so a
    /// long chain of shuffles (an iterative job) does not leave each new
    /// map task only crumbs of memory to spill from.
    mutating func reserve(rows: Int, extraBytes: Int = 0) -> Bool {
        let n = rows * rowBytes + extraBytes
        // Demote until the memory is ours or nothing older is left in
        // memory: another task may take what one demotion freed.
        var ok = sc.memory.tryAcquire(n)
        while !ok && sc.shuffles.demote(n, sparing: shuffle) { ok = sc.memory.tryAcquire(n) }
        if ok {
            held += n
            return true
        }
        if codec == nil || unusable {
            // Nothing to spill with: hold it anyway, and say so.
            sc.memory.force(n)
            held += n
            sc.metric { $0.unspillableBytes += n }
            return true
        }
        return false
    }

    /// Set when the codec turns out not to accept these rows.
    var unusable = false

    /// Writes the buckets as one run and frees their memory. Returns false
    /// (and keeps the rows, counted as unspillable) if the codec cannot
    /// encode them.
    mutating func spill(_ data: [[(K, C)]]) throws -> Bool {
        guard let codec, let sample = data.first(where: { !$0.isEmpty })?.first else { return false }
        if !codec.accepts(sample) {
            unusable = true
            _ = reserve(rows: data.reduce(0) { $0 + $1.count })
            return false
        }
        var w = ByteWriter(capacity: 1 << 16)
        var offsets = [0]
        for b in data {
            SpillFormat.encode(b, count: b.count, codec, into: &w)
            offsets.append(w.bytes.count)
        }
        let file = try sc.spillDirectory.write(w.bytes, tag: tag)
        runs.append(SpillRun(file: file, offsets: offsets))
        sc.memory.release(held)
        held = 0
        sc.metric {
            $0.bytesSpilled += w.bytes.count
            $0.spillFiles += 1
        }
        return true
    }

    /// For a task that failed: frees its memory and removes its runs.
    mutating func abort() {
        sc.memory.release(held)
        held = 0
        for r in runs { sc.spillDirectory.remove(r.file) }
        runs = []
    }

    func finish(_ data: [[(K, C)]], rows: Int) -> ShuffleOutput {
        let empty = data.allSatisfy(\.isEmpty)
        var demote: (() throws -> ShuffleOutput?)?
        if !empty, !unusable, let codec, let sample = data.first(where: { !$0.isEmpty })?.first, codec.accepts(sample) {
            // The output lives in the context's shuffle manager: hold the
            // context weakly, or it would never be released.
            let (dir, tag, runs) = (sc.spillDirectory, tag, runs)
            demote = { [weak sc] in
                var w = ByteWriter(capacity: 1 << 16)
                var offsets = [0]
                for b in data {
                    SpillFormat.encode(b, count: b.count, codec, into: &w)
                    offsets.append(w.bytes.count)
                }
                let file = try dir.write(w.bytes, tag: tag)
                sc?.metric {
                    $0.bytesSpilled += w.bytes.count
                    $0.spillFiles += 1
                }
                return ShuffleOutput(memory: [], memoryBytes: 0, runs: runs + [SpillRun(file: file, offsets: offsets)], rows: rows)
            }
        }
        return ShuffleOutput(memory: empty ? [] : data.map { $0 as Any }, memoryBytes: held, runs: runs, rows: rows, demote: demote)
    }
}

final class ShuffleDependency<K: Hashable, V, C>: AnyShuffleDependency {
    let shuffleId: Int
    let parent: RDD<(K, V)>
    let partitioner: Partitioner
    let aggregator: Aggregator<V, C>?
    let mapSideCombine: Bool
    var parentRDD: AnyRDD { parent }
    var outputPartitions: Int { partitioner.numPartitions }
    /// The map task and the reduce-side read, built where K, V and C are
    /// concrete so that their hashing and merging are specialized.
    let mapTask: (Int, TaskContext) throws -> ShuffleOutput
    let readBucket: (ShuffleOutput, Int) throws -> [(K, C)]
    /// The codec of every writer and the reader (and the reduce side's
    /// spilled merge tables).
    let codec: BlockCodec<(K, C)>?

    init(parent: RDD<(K, V)>, partitioner: Partitioner, partitionOf: @escaping (K) -> Int, aggregator: Aggregator<V, C>?, mapSideCombine: Bool) {
        let id = parent.context.newShuffleId()
        shuffleId = id
        self.parent = parent
        self.partitioner = partitioner
        self.aggregator = aggregator
        self.mapSideCombine = mapSideCombine
        // One codec for every writer and the reader: a tuple codec learns
        // its layout from the rows it is given, and the reader must know it.
        let codec = BlockCodec.pair(BlockCodec<K>.automatic(), BlockCodec<C>.automatic())
        self.codec = codec
        mapTask = Self.makeMapTask(parent, id, partitioner.numPartitions, partitionOf, aggregator, mapSideCombine, codec)
        readBucket = Self.makeReader(parent.context, codec)
        manager = parent.context.shuffles
    }

    /// When no RDD can read this shuffle any more, its outputs (memory and
    /// spill files) go: Spark's ContextCleaner, by reference counting.
    weak var manager: ShuffleManager?
    deinit {
        manager?.drop(shuffle: shuffleId)
    }

    func runMapTask(_ p: Int, _ ctx: TaskContext) throws -> ShuffleOutput { try mapTask(p, ctx) }

    func encodeBucket(map m: Int, bucket b: Int) throws -> Bytes {
        if let why = processBoundRefusal { throw WeftError(.invalidArgument, why) }
        // A request from another process is checked before it indexes anything.
        guard (0..<parent.numPartitions).contains(m), (0..<partitioner.numPartitions).contains(b) else {
            throw WeftError(.invalidArgument, "shuffle \(shuffleId) has no map output \(m) bucket \(b)")
        }
        let out = try parent.context.shuffles.output(shuffleId, map: m)
        let rows = try readBucket(out, b)
        var w = ByteWriter(capacity: 64 + rows.count * 16)
        SpillFormat.encode(rows, count: rows.count, codec!, into: &w)
        return w.bytes
    }

    var processBoundRefusal: String? {
        if codec == nil { return "shuffle \(shuffleId) moves rows of type (\(K.self), \(C.self)), which have no codec: they cannot leave the process that made them" }
        if partitioner is HashPartitioner, !StableHash.isStable(K.self) {
            return "shuffle \(shuffleId) hashes keys of type \(K.self), which have no stable hash (conform it to StableHashable)"
        }
        return nil
    }

    static func makeMapTask(_ parent: RDD<(K, V)>, _ id: Int, _ n: Int, _ partitionOf: @escaping (K) -> Int,
                            _ aggregator: Aggregator<V, C>?, _ combine: Bool, _ codec: BlockCodec<(K, C)>?) -> (Int, TaskContext) throws -> ShuffleOutput {
        let sc = parent.context
        let rowBytes = MemoryLayout<K>.stride + MemoryLayout<C>.stride + 32
        if let agg = aggregator, combine, K.self == Int.self {
            // The same map-side combine over `IntMap` or `StringMap` (no
            // SipHash, no Dictionary); the bit casts are identities.
            return combiningMapTask(IntMap<C>.self, parent, id, n, partitionOf, agg, codec)
        }
        if let agg = aggregator, combine, K.self == String.self {
            return combiningMapTask(StringMap<C>.self, parent, id, n, partitionOf, agg, codec)
        }
        if let agg = aggregator, combine {
            let grows = agg.combinerBytes != nil
            return { p, ctx in
                // Map-side combine: one combiner per key, hashed once per row;
                // the bucket of a key is computed once per distinct key.
                var w = ShuffleWriter<K, C>(sc: sc, shuffle: id, map: p, buckets: n, rowBytes: rowBytes, codec: codec)
                // A task that fails gives back its memory and removes its runs.
                var finished = false
                defer { if !finished { w.abort() } }
                var m: [K: C] = [:]
                var sinceReserve = 0
                var rows = 0
                func split(_ m: [K: C]) -> [[(K, C)]] {
                    var out = [[(K, C)]](repeating: [], count: n)
                    for (k, c) in m { out[partitionOf(k)].append((k, c)) }
                    return out
                }
                try parent.push(p, ctx) { kv in
                    rows += 1
                    if let i = m.index(forKey: kv.0) {
                        agg.mergeValue(&m.values[i], kv.1)
                        if !grows { return }
                    } else {
                        m[kv.0] = agg.createCombiner(kv.1)
                    }
                    sinceReserve += 1
                    if sinceReserve == 1024 {
                        sinceReserve = 0
                        if !w.reserve(rows: 1024), try w.spill(split(m)) { m = [:] }
                    }
                }
                if !w.reserve(rows: sinceReserve), try w.spill(split(m)) { m = [:] }
                finished = true
                return w.finish(split(m), rows: rows)
            }
        }
        return { p, ctx in
            var w = ShuffleWriter<K, C>(sc: sc, shuffle: id, map: p, buckets: n, rowBytes: rowBytes, codec: codec)
            // A task that fails gives back its memory and removes its runs.
            var finished = false
            defer { if !finished { w.abort() } }
            var buckets = [[(K, C)]](repeating: [], count: n)
            var sinceReserve = 0
            var rows = 0
            // Rows that hold arrays (partition-level blocks) say how big they are.
            let sized = C.self is MemorySized.Type
            var extra = 0
            try parent.push(p, ctx) { kv in
                let c: C = aggregator.map { $0.createCombiner(kv.1) } ?? (kv.1 as! C)
                buckets[partitionOf(kv.0)].append((kv.0, c))
                rows += 1
                sinceReserve += 1
                if sized { extra += (c as! MemorySized).memoryBytes }
                if sinceReserve == 4096 || extra >= 1 << 20 {
                    let (r, x) = (sinceReserve, extra)
                    sinceReserve = 0
                    extra = 0
                    if !w.reserve(rows: r, extraBytes: x), try w.spill(buckets) { buckets = [[(K, C)]](repeating: [], count: n) }
                }
            }
            if !w.reserve(rows: sinceReserve, extraBytes: extra), try w.spill(buckets) { buckets = [[(K, C)]](repeating: [], count: n) }
            finished = true
            return w.finish(buckets, rows: rows)
        }
    }

    static func combiningMapTask<M: CombineMap>(_: M.Type, _ parent: RDD<(K, V)>, _ id: Int, _ n: Int, _ partitionOf: @escaping (K) -> Int,
                                                _ agg: Aggregator<V, C>, _ codec: BlockCodec<(K, C)>?) -> (Int, TaskContext) throws -> ShuffleOutput where M.Value == C {
        let sc = parent.context
        let rowBytes = MemoryLayout<K>.stride + MemoryLayout<C>.stride + 32
        let grows = agg.combinerBytes != nil
        return { p, ctx in
            var w = ShuffleWriter<K, C>(sc: sc, shuffle: id, map: p, buckets: n, rowBytes: rowBytes, codec: codec)
            // A task that fails gives back its memory and removes its runs.
            var finished = false
            defer { if !finished { w.abort() } }
            var m = M(capacity: 64)
            var sinceReserve = 0
            var rows = 0
            func split(_ m: M) -> [[(K, C)]] {
                var out = [[(K, C)]](repeating: [], count: n)
                for i in 0..<m.count {
                    let k = unsafeBitCast(m.keys[i], to: K.self)
                    out[partitionOf(k)].append((k, m.values[i]))
                }
                return out
            }
            try parent.push(p, ctx) { kv in
                rows += 1
                let added = m.upsert(unsafeBitCast(kv.0, to: M.Key.self), { agg.createCombiner(kv.1) }, { agg.mergeValue(&$0, kv.1) })
                // A growing combiner (a group) counts each value as a row.
                if !added && !grows { return }
                sinceReserve += 1
                if sinceReserve == 1024 {
                    sinceReserve = 0
                    if !w.reserve(rows: 1024), try w.spill(split(m)) { m = M(capacity: 64) }
                }
            }
            if !w.reserve(rows: sinceReserve), try w.spill(split(m)) { m = M(capacity: 64) }
            finished = true
            return w.finish(split(m), rows: rows)
        }
    }

    static func makeReader(_ sc: DataflowContext, _ codec: BlockCodec<(K, C)>?) -> (ShuffleOutput, Int) throws -> [(K, C)] {
        return { out, b in
            var rows = out.memory.isEmpty ? [] : out.memory[b] as! [(K, C)]
            for run in out.runs {
                guard let codec else { break }
                let bytes = try sc.spillDirectory.readRange(run.file, from: run.offsets[b], to: run.offsets[b + 1])
                rows += try SpillFormat.decodeAll(bytes[...], codec)
            }
            return rows
        }
    }

    /// Bucket `b` of map output `m`; FetchFailed if that output is gone.
    func fetch(map m: Int, bucket b: Int) throws -> [(K, C)] {
        let sc = parent.context
        if let remote = sc.remoteShuffles, !sc.shuffles.has(shuffleId, map: m) {
            // Held by another executor: fetched over the network.
            let bytes = try remote.fetch(shuffle: shuffleId, map: m, bucket: b)
            guard let codec else { throw FetchFailed(shuffleId: shuffleId, mapPartition: m) }
            do { return try SpillFormat.decodeAll(bytes[...], codec) } catch { throw FetchFailed(shuffleId: shuffleId, mapPartition: m) }
        }
        let out = try parent.context.shuffles.output(shuffleId, map: m)
        do {
            return try readBucket(out, b)
        } catch {
            // A spill file that cannot be read is lost map output: drop it,
            // and any other output of this shuffle whose files are gone, so
            // the resubmitted stage recomputes them all at once.
            parent.context.shuffles.drop(shuffleId, map: m)
            parent.context.shuffles.dropUnreadable(shuffleId)
            throw FetchFailed(shuffleId: shuffleId, mapPartition: m)
        }
    }
}

/// The reduce side of a shuffle: fetches its bucket from every map output
/// and merges combiners per key (or keeps pairs as they are, for partitionBy).
final class ShuffledRDD<K: Hashable, V, C>: RDD<(K, C)> {
    let dep: ShuffleDependency<K, V, C>
    let reduce: (Int, ((K, C)) throws -> Void) throws -> Void

    init(_ dep: ShuffleDependency<K, V, C>, name: String) {
        self.dep = dep
        reduce = Self.makeReduce(dep)
        super.init(dep.parent.context, partitions: dep.partitioner.numPartitions, dependencies: [.shuffle(dep)], name: name)
        partitioner = dep.partitioner
    }

    override func preferredLocation(_ partition: Int) -> String? { nil }

    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [(K, C)] {
        var out: [(K, C)] = []
        if dep.aggregator == nil {
            // Nothing to merge: the buckets, appended whole.
            for m in 0..<dep.parent.numPartitions { out += try dep.fetch(map: m, bucket: partition) }
            return out
        }
        try reduce(partition) { out.append($0) }
        return out
    }

    /// Streams the merged rows: a consumer that does not keep them (a
    /// map task, a count, a save) never holds the whole partition.
    override func push(_ partition: Int, _ ctx: TaskContext, _ body: ((K, C)) throws -> Void) throws {
        try pushStreaming(partition, ctx, body) { try reduce(partition, $0) }
    }

    static func makeReduce(_ dep: ShuffleDependency<K, V, C>) -> (Int, ((K, C)) throws -> Void) throws -> Void {
        guard let agg = dep.aggregator else {
            let maps = dep.parent.numPartitions
            return { partition, emit in
                // Every bucket first: a lost map output (FetchFailed) then
                // fails the task before it has handed on a single row.
                let buckets = try (0..<maps).map { try dep.fetch(map: $0, bucket: partition) }
                for b in buckets { for kc in b { try emit(kc) } }
            }
        }
        if K.self == Int.self { return mergingReduce(IntMap<C>.self, dep, agg) }
        if K.self == String.self { return mergingReduce(StringMap<C>.self, dep, agg) }
        return mergingReduce(HashedMap<K, C>.self, dep, agg)
    }

    static func mergingReduce<M: CombineMap>(_: M.Type, _ dep: ShuffleDependency<K, V, C>, _ agg: Aggregator<V, C>) -> (Int, ((K, C)) throws -> Void) throws -> Void where M.Value == C {
        let maps = dep.parent.numPartitions
        let sc = dep.parent.context
        return { partition, emit in
            var merged = ExternalMerger<K, C, M>(sc: sc, codec: dep.codec, tag: "shuffle-\(dep.shuffleId)-reduce-\(partition)",
                                                 mergeCombiners: agg.mergeCombiners, combinerBytes: agg.combinerBytes, sparing: dep.shuffleId)
            defer { merged.release() }
            for m in 0..<maps {
                for (k, c) in try dep.fetch(map: m, bucket: partition) { try merged.insert(k, c) }
            }
            try merged.finish(emit)
        }
    }
}

/// A combine within each partition of a parent already partitioned by
/// key (no shuffle), in the same bounded `ExternalMerger` as a reduce.
final class CombinedRDD<K: Hashable, V, C>: RDD<(K, C)> {
    let combine: (Int, TaskContext, ((K, C)) throws -> Void) throws -> Void

    init(parent: RDD<(K, V)>, aggregator agg: Aggregator<V, C>) {
        let sc = parent.context
        let codec = BlockCodec.pair(BlockCodec<K>.automatic(), BlockCodec<C>.automatic())
        func combining<M: CombineMap>(_: M.Type) -> (Int, TaskContext, ((K, C)) throws -> Void) throws -> Void where M.Value == C {
            return { p, ctx, emit in
                var merged = ExternalMerger<K, C, M>(sc: sc, codec: codec, tag: "combine-\(p)", mergeCombiners: agg.mergeCombiners, combinerBytes: agg.combinerBytes)
                defer { merged.release() }
                try parent.push(p, ctx) { kv in try merged.insert(kv.0, kv.1, agg) }
                try merged.finish(emit)
            }
        }
        if K.self == Int.self {
            combine = combining(IntMap<C>.self)
        } else if K.self == String.self {
            combine = combining(StringMap<C>.self)
        } else {
            combine = combining(HashedMap<K, C>.self)
        }
        super.init(parent.context, partitions: parent.numPartitions, dependencies: [.narrow(parent, { [$0] })], name: "combineByKey")
        partitioner = parent.partitioner
    }

    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [(K, C)] {
        var out: [(K, C)] = []
        try combine(partition, ctx) { out.append($0) }
        return out
    }

    override func push(_ partition: Int, _ ctx: TaskContext, _ body: ((K, C)) throws -> Void) throws {
        try pushStreaming(partition, ctx, body) { try combine(partition, ctx, $0) }
    }
}

/// Groups the values of each key from two parents. A parent already
/// partitioned like the result is read through a narrow dependency (no
/// shuffle); any other parent is shuffled (grouped, without map-side combine).
final class CoGroupedRDD<K: Hashable, V, W>: RDD<(K, ([V], [W]))> {

    init(_ a: RDD<(K, V)>, _ b: RDD<(K, W)>, partitioner: HashPartitioner) {
        let (depA, readA) = Self.side(a, partitioner)
        let (depB, readB) = Self.side(b, partitioner)
        if K.self == Int.self {
            group = Self.grouping(IntMap<([V], [W])>.self, a.context, readA, readB)
        } else if K.self == String.self {
            group = Self.grouping(StringMap<([V], [W])>.self, a.context, readA, readB)
        } else {
            group = Self.grouping(HashedMap<K, ([V], [W])>.self, a.context, readA, readB)
        }
        super.init(a.context, partitions: partitioner.numPartitions, dependencies: [depA, depB], name: "cogroup")
        self.partitioner = partitioner
    }

    let group: (Int, TaskContext, ((K, ([V], [W]))) throws -> Void) throws -> Void

    /// Both sides' groups merged in one `ExternalMerger`: bounded by the
    /// memory pool like a reduce-side merge, spilled as sorted runs.
    static func grouping<M: CombineMap>(_: M.Type, _ sc: DataflowContext,
                                        _ readA: @escaping (Int, TaskContext, (K, [V]) throws -> Void) throws -> Void,
                                        _ readB: @escaping (Int, TaskContext, (K, [W]) throws -> Void) throws -> Void)
        -> (Int, TaskContext, ((K, ([V], [W]))) throws -> Void) throws -> Void where M.Value == ([V], [W]) {
        let codec = BlockCodec.pair(BlockCodec<K>.automatic(), BlockCodec.pair(BlockCodec<[V]>.automatic(), BlockCodec<[W]>.automatic()))
        let (strideV, strideW) = (MemoryLayout<V>.stride, MemoryLayout<W>.stride)
        return { p, ctx, emit in
            var merged = ExternalMerger<K, ([V], [W]), M>(
                sc: sc, codec: codec, tag: "cogroup-\(p)",
                mergeCombiners: { $0.0.append(contentsOf: $1.0); $0.1.append(contentsOf: $1.1) },
                combinerBytes: { $0.0.count * strideV + $0.1.count * strideW })
            defer { merged.release() }
            try readA(p, ctx) { k, vs in try merged.insert(k, (vs, [])) }
            try readB(p, ctx) { k, ws in try merged.insert(k, ([], ws)) }
            try merged.finish(emit)
        }
    }

    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [(K, ([V], [W]))] {
        var out: [(K, ([V], [W]))] = []
        try group(partition, ctx) { out.append($0) }
        return out
    }

    override func push(_ partition: Int, _ ctx: TaskContext, _ body: ((K, ([V], [W]))) throws -> Void) throws {
        try pushStreaming(partition, ctx, body) { try group(partition, ctx, $0) }
    }

    /// One parent's dependency, and a reader that hands its values of
    /// partition p to a callback, grouped by key where it can.
    static func side<X>(_ r: RDD<(K, X)>, _ part: HashPartitioner) -> (Dependency, (Int, TaskContext, (K, [X]) throws -> Void) throws -> Void) {
        if let pp = r.partitioner, pp.isSame(as: part) {
            return (.narrow(r, { [$0] }), { p, ctx, emit in try r.push(p, ctx) { try emit($0.0, [$0.1]) } })
        }
        let agg = Aggregator<X, [X]>(createCombiner: { [$0] }, mergeValue: { $0.append($1) }, mergeCombiners: { $0.append(contentsOf: $1) },
                                     combinerBytes: { $0.count * MemoryLayout<X>.stride })
        let d = ShuffleDependency<K, X, [X]>(parent: r, partitioner: part, partitionOf: { part.partition($0) }, aggregator: agg, mapSideCombine: true)
        let maps = r.numPartitions
        return (.shuffle(d), { p, _, emit in
            for m in 0..<maps { for (k, xs) in try d.fetch(map: m, bucket: p) { try emit(k, xs) } }
        })
    }
}

/// An inner join of two parents: one partition of the right side is built
/// into a hash table (flat, chained: no array per key), and the left side
/// streams through it row by row. A parent already partitioned like the
/// result is read through a narrow dependency; any other is shuffled
/// first, without combining (as in Spark's join). The table takes its rows'
/// bytes from the memory pool; if the pool refuses, the partition is
/// joined through a bounded merge instead (`SpillingJoin`, a cogroup that
/// spills), like a sort-merge join in place of a hash join that does not fit.
final class HashJoinedRDD<K: Hashable, V, W>: RDD<(K, (V, W))> {
    let join: (Int, TaskContext, ((K, (V, W))) throws -> Void) throws -> Void

    init(_ a: RDD<(K, V)>, _ b: RDD<(K, W)>, partitioner: HashPartitioner) {
        let (depA, readA) = Self.stream(a, partitioner)
        let (depB, readB) = Self.stream(b, partitioner)
        let sc = a.context
        if K.self == Int.self {
            // The same join over an `IntMap`, `StringMap` or `Dictionary` of chain heads.
            join = Self.hashJoin(IntMap<Int>.self, sc, readA, readB) { SpillingJoin<K, V, W, IntMap<([V], [W])>>(sc, partition: $0) }
        } else if K.self == String.self {
            join = Self.hashJoin(StringMap<Int>.self, sc, readA, readB) { SpillingJoin<K, V, W, StringMap<([V], [W])>>(sc, partition: $0) }
        } else {
            join = Self.hashJoin(HashedMap<K, Int>.self, sc, readA, readB) { SpillingJoin<K, V, W, HashedMap<K, ([V], [W])>>(sc, partition: $0) }
        }
        super.init(a.context, partitions: partitioner.numPartitions, dependencies: [depA, depB], name: "join")
        self.partitioner = partitioner
    }

    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [(K, (V, W))] {
        var out: [(K, (V, W))] = []
        try join(partition, ctx) { out.append($0) }
        return out
    }

    override func push(_ partition: Int, _ ctx: TaskContext, _ body: ((K, (V, W))) throws -> Void) throws {
        try pushStreaming(partition, ctx, body) { try join(partition, ctx, $0) }
    }

    static func hashJoin<M: CombineMap>(_: M.Type, _ sc: DataflowContext,
                                        _ readA: @escaping (Int, TaskContext, (K, V) throws -> Void) throws -> Void,
                                        _ readB: @escaping (Int, TaskContext, (K, W) throws -> Void) throws -> Void,
                                        spilling: @escaping (Int) -> JoinFallback<K, V, W>)
        -> (Int, TaskContext, ((K, (V, W))) throws -> Void) throws -> Void where M.Value == Int {
        // A row of the table: its key and value, its chain link, and its
        // share of the table's slots.
        let rowBytes = MemoryLayout<K>.stride + MemoryLayout<W>.stride + 8 + 32
        return { p, ctx, emit in
            var first = M(capacity: 64)
            var next: [Int] = []
            var values: [W] = []
            var reservation = PoolReservation(sc)
            var fallback: JoinFallback<K, V, W>?
            defer {
                reservation.release()
                fallback?.release()
            }
            try readB(p, ctx) { k, w in
                if let f = fallback {
                    try f.build(k, w)
                    return
                }
                let i = values.count
                var previous = -1
                _ = first.upsert(unsafeBitCast(k, to: M.Key.self), { i }, { previous = $0; $0 = i })
                next.append(previous)
                values.append(w)
                if reservation.add(rowBytes) { return }
                // The pool says no: move what is built into a merge that
                // can spill, and join this partition there.
                let f = spilling(p)
                fallback = f
                for e in 0..<first.count {
                    let key = unsafeBitCast(first.keys[e], to: K.self)
                    var j = first.values[e]
                    while j >= 0 {
                        try f.build(key, values[j])
                        j = next[j]
                    }
                }
                (first, next, values) = (M(capacity: 64), [], [])
                reservation.release()
            }
            if let f = fallback {
                try readA(p, ctx) { k, v in try f.probe(k, v) }
                try f.finish(emit)
                return
            }
            if values.isEmpty { return }
            try readA(p, ctx) { k, v in
                let (e, _) = first.probe(unsafeBitCast(k, to: M.Key.self))
                var i = e >= 0 ? first.values[e] : -1
                while i >= 0 {
                    try emit((k, (v, values[i])))
                    i = next[i]
                }
            }
        }
    }

    /// One parent's dependency, and a reader that hands its rows of
    /// partition p to a callback one at a time.
    static func stream<X>(_ r: RDD<(K, X)>, _ part: HashPartitioner) -> (Dependency, (Int, TaskContext, (K, X) throws -> Void) throws -> Void) {
        if let pp = r.partitioner, pp.isSame(as: part) {
            return (.narrow(r, { [$0] }), { p, ctx, emit in try r.push(p, ctx) { try emit($0.0, $0.1) } })
        }
        let d = ShuffleDependency<K, X, X>(parent: r, partitioner: part, partitionOf: { part.partition($0) }, aggregator: nil, mapSideCombine: false)
        let maps = r.numPartitions
        return (.shuffle(d), { p, _, emit in
            for m in 0..<maps { for (k, x) in try d.fetch(map: m, bucket: p) { try emit(k, x) } }
        })
    }
}

/// Memory taken from the pool in steps as a structure grows (the step of
/// `ExternalMerger`): `add` says false once the pool refuses, after
/// demoting other shuffles' outputs to disk.
struct PoolReservation {
    let sc: DataflowContext
    let step: Int
    private(set) var held = 0
    private var pending = 0

    init(_ sc: DataflowContext) {
        self.sc = sc
        step = Swift.max(4 << 10, Swift.min(256 << 10, sc.memory.capacity / 16))
    }

    mutating func add(_ n: Int) -> Bool {
        pending += n
        if pending < step { return true }
        let m = pending
        pending = 0
        var ok = sc.memory.tryAcquire(m)
        while !ok && sc.shuffles.demote(m, sparing: -1) { ok = sc.memory.tryAcquire(m) }
        if ok { held += m }
        return ok
    }

    mutating func release() {
        sc.memory.release(held)
        held = 0
        pending = 0
    }
}

/// Where a join goes when its hash table does not fit: rows of both sides
/// in, joined pairs out (`SpillingJoin`).
class JoinFallback<K, V, W> {
    func build(_ k: K, _ w: W) throws { fatalError("abstract") }
    func probe(_ k: K, _ v: V) throws { fatalError("abstract") }
    func finish(_ emit: ((K, (V, W))) throws -> Void) throws { fatalError("abstract") }
    func release() {}
}

/// One partition of an inner join through an `ExternalMerger`: both sides
/// grouped by key in a merge bounded by the pool (spilled as sorted runs),
/// then each key's pairs emitted.
final class SpillingJoin<K: Hashable, V, W, M: CombineMap>: JoinFallback<K, V, W> where M.Value == ([V], [W]) {
    private var merged: ExternalMerger<K, ([V], [W]), M>

    init(_ sc: DataflowContext, partition: Int) {
        let codec = BlockCodec.pair(BlockCodec<K>.automatic(), BlockCodec.pair(BlockCodec<[V]>.automatic(), BlockCodec<[W]>.automatic()))
        let (strideV, strideW) = (MemoryLayout<V>.stride, MemoryLayout<W>.stride)
        merged = ExternalMerger(sc: sc, codec: codec, tag: "join-\(partition)",
                                mergeCombiners: { $0.0.append(contentsOf: $1.0); $0.1.append(contentsOf: $1.1) },
                                combinerBytes: { $0.0.count * strideV + $0.1.count * strideW })
        sc.metric { $0.spilledJoins += 1 }
    }

    override func build(_ k: K, _ w: W) throws { try merged.insert(k, ([], [w])) }
    override func probe(_ k: K, _ v: V) throws { try merged.insert(k, ([v], [])) }
    override func finish(_ emit: ((K, (V, W))) throws -> Void) throws {
        try merged.finish { k, group in
            for v in group.0 { for w in group.1 { try emit((k, (v, w))) } }
        }
    }
    override func release() { merged.release() }
}

// MARK: Pair functions

extension RDD {
    /// Shuffles `(K, V)` pairs into `(K, C)` with an aggregator: the one
    /// primitive under reduceByKey, groupByKey, aggregateByKey, combineByKey.
    public func combineByKey<K: Hashable, V, C>(
        _ createCombiner: @escaping (V) -> C, _ mergeValue: @escaping (C, V) -> C, _ mergeCombiners: @escaping (C, C) -> C,
        partitions: Int? = nil, mapSideCombine: Bool = true
    ) -> RDD<(K, C)> where T == (K, V) {
        let agg = Aggregator<V, C>(createCombiner: createCombiner, mergeValue: { $0 = mergeValue($0, $1) }, mergeCombiners: { $0 = mergeCombiners($0, $1) })
        return combine(agg, partitions: partitions, mapSideCombine: mapSideCombine)
    }

    /// The one shuffle-with-aggregation primitive under reduceByKey,
    /// groupByKey, aggregateByKey, foldByKey and combineByKey.
    func combine<K: Hashable, V, C>(_ agg: Aggregator<V, C>, partitions: Int?, mapSideCombine: Bool) -> RDD<(K, C)> where T == (K, V) {
        let part = HashPartitioner(partitions ?? context.defaultParallelism(self))
        if let p = partitioner, p.isSame(as: part) {
            // Already partitioned by key: combine within each partition, no shuffle.
            return CombinedRDD(parent: self, aggregator: agg)
        }
        let dep = ShuffleDependency<K, V, C>(parent: self, partitioner: part, partitionOf: { part.partition($0) }, aggregator: agg, mapSideCombine: mapSideCombine)
        return ShuffledRDD(dep, name: "combineByKey")
    }

    public func reduceByKey<K: Hashable, V>(partitions: Int? = nil, _ f: @escaping (V, V) -> V) -> RDD<(K, V)> where T == (K, V) {
        combine(Aggregator(createCombiner: { $0 }, mergeValue: { $0 = f($0, $1) }, mergeCombiners: { $0 = f($0, $1) }),
                partitions: partitions, mapSideCombine: true).setName("reduceByKey")
    }

    public func foldByKey<K: Hashable, V>(_ zero: V, partitions: Int? = nil, _ f: @escaping (V, V) -> V) -> RDD<(K, V)> where T == (K, V) {
        combine(Aggregator(createCombiner: { f(zero, $0) }, mergeValue: { $0 = f($0, $1) }, mergeCombiners: { $0 = f($0, $1) }),
                partitions: partitions, mapSideCombine: true).setName("foldByKey")
    }

    public func aggregateByKey<K: Hashable, V, U>(_ zero: U, partitions: Int? = nil, _ seqOp: @escaping (U, V) -> U, _ combOp: @escaping (U, U) -> U) -> RDD<(K, U)> where T == (K, V) {
        combine(Aggregator(createCombiner: { seqOp(zero, $0) }, mergeValue: { $0 = seqOp($0, $1) }, mergeCombiners: { $0 = combOp($0, $1) }),
                partitions: partitions, mapSideCombine: true).setName("aggregateByKey")
    }

    /// Groups values by key (no map-side combine, as in Spark). Values are
    /// appended in place, so a giant key costs linear time.
    public func groupByKey<K: Hashable, V>(_ partitions: Int? = nil) -> RDD<(K, [V])> where T == (K, V) {
        combine(Aggregator(createCombiner: { [$0] }, mergeValue: { $0.append($1) }, mergeCombiners: { $0.append(contentsOf: $1) },
                           combinerBytes: { $0.count * MemoryLayout<V>.stride }),
                partitions: partitions, mapSideCombine: false).setName("groupByKey")
    }

    public func partitionBy<K: Hashable, V>(_ p: HashPartitioner) -> RDD<(K, V)> where T == (K, V) {
        if let mine = partitioner, mine.isSame(as: p) { return self }
        let dep = ShuffleDependency<K, V, V>(parent: self, partitioner: p, partitionOf: { p.partition($0) }, aggregator: nil, mapSideCombine: false)
        return ShuffledRDD(dep, name: "partitionBy")
    }

    public func mapValues<K, V, U>(_ f: @escaping (V) throws -> U) -> RDD<(K, U)> where T == (K, V) {
        let r = ElementwiseRDD<(K, V), (K, U)>(parent: self, name: "mapValues") { kv, emit in try emit((kv.0, try f(kv.1))) }
        r.partitioner = partitioner
        return r
    }

    public func flatMapValues<K, V, S: Sequence>(_ f: @escaping (V) throws -> S) -> RDD<(K, S.Element)> where T == (K, V) {
        let r = ElementwiseRDD<(K, V), (K, S.Element)>(parent: self, name: "flatMapValues") { kv, emit in for y in try f(kv.1) { try emit((kv.0, y)) } }
        r.partitioner = partitioner
        return r
    }

    public func keys<K, V>() -> RDD<K> where T == (K, V) { map { $0.0 }.setName("keys") }
    public func values<K, V>() -> RDD<V> where T == (K, V) { map { $0.1 }.setName("values") }

    public func cogroup<K: Hashable, V, W>(_ other: RDD<(K, W)>, partitions: Int? = nil) -> RDD<(K, ([V], [W]))> where T == (K, V) {
        let part = (partitioner as? HashPartitioner) ?? (other.partitioner as? HashPartitioner) ?? HashPartitioner(partitions ?? context.defaultParallelism(self, other))
        return CoGroupedRDD<K, V, W>(self, other, partitioner: part)
    }

    public func join<K: Hashable, V, W>(_ other: RDD<(K, W)>, partitions: Int? = nil) -> RDD<(K, (V, W))> where T == (K, V) {
        let part = (partitioner as? HashPartitioner) ?? (other.partitioner as? HashPartitioner) ?? HashPartitioner(partitions ?? context.defaultParallelism(self, other))
        return HashJoinedRDD<K, V, W>(self, other, partitioner: part)
    }

    public func leftOuterJoin<K: Hashable, V, W>(_ other: RDD<(K, W)>, partitions: Int? = nil) -> RDD<(K, (V, W?))> where T == (K, V) {
        cogroup(other, partitions: partitions).flatMapValues { vs, ws -> [(V, W?)] in
            ws.isEmpty ? vs.map { ($0, nil) } : vs.flatMap { v in ws.map { (v, Optional($0)) } }
        }.setName("leftOuterJoin")
    }

    public func rightOuterJoin<K: Hashable, V, W>(_ other: RDD<(K, W)>, partitions: Int? = nil) -> RDD<(K, (V?, W))> where T == (K, V) {
        cogroup(other, partitions: partitions).flatMapValues { vs, ws -> [(V?, W)] in
            vs.isEmpty ? ws.map { (nil, $0) } : ws.flatMap { w in vs.map { (Optional($0), w) } }
        }.setName("rightOuterJoin")
    }

    public func fullOuterJoin<K: Hashable, V, W>(_ other: RDD<(K, W)>, partitions: Int? = nil) -> RDD<(K, (V?, W?))> where T == (K, V) {
        cogroup(other, partitions: partitions).flatMapValues { vs, ws -> [(V?, W?)] in
            if vs.isEmpty { return ws.map { (nil, $0) } }
            if ws.isEmpty { return vs.map { ($0, nil) } }
            return vs.flatMap { v in ws.map { (Optional(v), Optional($0)) } }
        }.setName("fullOuterJoin")
    }

    /// Sorts by key: a sampling job picks range bounds, a shuffle moves each
    /// key to its range, and each partition sorts locally.
    /// The sampling job runs here, as in Spark; its failure is this call's.
    public func sortByKey<K: Comparable & Hashable, V>(ascending: Bool = true, partitions: Int? = nil) throws -> RDD<(K, V)> where T == (K, V) {
        let n = partitions ?? numPartitions
        let samples = try context.runJob(self) { xs -> [K] in
            let step = Swift.max(1, xs.count / 100)
            return stride(from: 0, to: xs.count, by: step).map { xs[$0].0 }
        }.flatMap { $0 }.sorted()
        var bounds: [K] = []
        if n > 1 && !samples.isEmpty {
            for i in 1..<n {
                let b = samples[Swift.min(samples.count - 1, samples.count * i / n)]
                if bounds.last.map({ $0 < b }) ?? true { bounds.append(b) }
            }
        }
        return sortByKey(bounds: bounds, ascending: ascending)
    }

    /// Sorts with given range bounds (no sampling job): what `sortByKey`
    /// plans once it has sampled, and what `job explain` shows.
    func sortByKey<K: Comparable & Hashable, V>(bounds: [K], ascending: Bool) -> RDD<(K, V)> where T == (K, V) {
        let part = RangePartitioner(bounds: bounds, ascending: ascending)
        let dep = ShuffleDependency<K, V, V>(parent: self, partitioner: part, partitionOf: { part.partition($0) }, aggregator: nil, mapSideCombine: false)
        return ShuffledRDD(dep, name: "sortByKey").mapPartitions(preservesPartitioning: true) { xs in
            xs.sorted { ascending ? $0.0 < $1.0 : $0.0 > $1.0 }
        }.setName("sortByKey")
    }

    public func countByKey<K: Hashable, V>() throws -> [K: Int] where T == (K, V) {
        var out: [K: Int] = [:]
        for (k, c) in try mapValues({ _ in 1 }).reduceByKey(+).collect() { out[k] = c }
        return out
    }

    public func lookup<K: Hashable, V>(_ key: K) throws -> [V] where T == (K, V) {
        if let p = partitioner as? HashPartitioner {
            // Only the partition that can hold the key is computed.
            return try context.runJob(self, partitions: [p.partition(key)]) { $0.filter { $0.0 == key }.map(\.1) }.flatMap { $0 }
        }
        return try filter { $0.0 == key }.values().collect()
    }

    public func collectAsMap<K: Hashable, V>() throws -> [K: V] where T == (K, V) {
        var m: [K: V] = [:]
        for (k, v) in try collect() { m[k] = v }
        return m
    }
}
