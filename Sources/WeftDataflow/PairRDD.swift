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
    func partition<K: Hashable>(_ k: K) -> Int {
        let h = k.hashValue % numPartitions
        return h < 0 ? h + numPartitions : h
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

/// How values of a key are combined: Spark's `Aggregator`.
public struct Aggregator<V, C> {
    public let createCombiner: (V) -> C
    public let mergeValue: (C, V) -> C
    public let mergeCombiners: (C, C) -> C
}

/// A shuffle dependency seen without its types, for the scheduler.
public protocol AnyShuffleDependency: AnyObject {
    var shuffleId: Int { get }
    var parentRDD: AnyRDD { get }
    var outputPartitions: Int { get }
    /// Computes map partition `p` of the parent and returns its buckets.
    func runMapTask(_ p: Int, _ ctx: TaskContext) throws -> ShuffleOutput
}

/// One map task's output: a bucket per reduce partition, and its size.
public struct ShuffleOutput {
    let buckets: [Any]
    let rows: Int
}

final class ShuffleDependency<K: Hashable, V, C>: AnyShuffleDependency {
    let shuffleId: Int
    let parent: RDD<(K, V)>
    let partitioner: Partitioner
    let partitionOf: (K) -> Int
    let aggregator: Aggregator<V, C>?
    let mapSideCombine: Bool
    var parentRDD: AnyRDD { parent }
    var outputPartitions: Int { partitioner.numPartitions }

    init(parent: RDD<(K, V)>, partitioner: Partitioner, partitionOf: @escaping (K) -> Int, aggregator: Aggregator<V, C>?, mapSideCombine: Bool) {
        shuffleId = parent.context.newShuffleId()
        self.parent = parent
        self.partitioner = partitioner
        self.partitionOf = partitionOf
        self.aggregator = aggregator
        self.mapSideCombine = mapSideCombine
    }

    func runMapTask(_ p: Int, _ ctx: TaskContext) throws -> ShuffleOutput {
        let data = try parent.iterator(p, ctx)
        let n = partitioner.numPartitions
        if let agg = aggregator, mapSideCombine {
            // Map-side combine: one combiner per key per bucket.
            var maps = [[K: C]](repeating: [:], count: n)
            for (k, v) in data {
                let b = partitionOf(k)
                if let c = maps[b][k] { maps[b][k] = agg.mergeValue(c, v) } else { maps[b][k] = agg.createCombiner(v) }
            }
            return ShuffleOutput(buckets: maps.map { Array($0) as [(K, C)] }, rows: maps.reduce(0) { $0 + $1.count })
        }
        var buckets = [[(K, C)]](repeating: [], count: n)
        for (k, v) in data {
            let c: C = aggregator.map { $0.createCombiner(v) } ?? (v as! C)
            buckets[partitionOf(k)].append((k, c))
        }
        return ShuffleOutput(buckets: buckets, rows: data.count)
    }
}

/// The reduce side of a shuffle: fetches its bucket from every map output
/// and merges combiners per key (or keeps pairs as they are, for partitionBy).
final class ShuffledRDD<K: Hashable, V, C>: RDD<(K, C)> {
    let dep: ShuffleDependency<K, V, C>

    init(_ dep: ShuffleDependency<K, V, C>, name: String) {
        self.dep = dep
        super.init(dep.parent.context, partitions: dep.partitioner.numPartitions, dependencies: [.shuffle(dep)], name: name)
        partitioner = dep.partitioner
    }

    override func preferredLocation(_ partition: Int) -> String? { nil }

    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [(K, C)] {
        let maps = dep.parent.numPartitions
        if let agg = dep.aggregator {
            var merged: [K: C] = [:]
            for m in 0..<maps {
                for (k, c) in try context.shuffles.fetch(dep.shuffleId, map: m, bucket: partition) as [(K, C)] {
                    if let old = merged[k] { merged[k] = agg.mergeCombiners(old, c) } else { merged[k] = c }
                }
            }
            return Array(merged)
        }
        var out: [(K, C)] = []
        for m in 0..<maps { out += try context.shuffles.fetch(dep.shuffleId, map: m, bucket: partition) as [(K, C)] }
        return out
    }
}

/// Groups the values of each key from several parents. A parent already
/// partitioned like the result is read through a narrow dependency (no
/// shuffle); any other parent is shuffled.
final class CoGroupedRDD<K: Hashable>: RDD<(K, [[Any]])> {
    enum Source {
        case narrow(RDD<(K, Any)>)
        case shuffled(ShuffleDependency<K, Any, [Any]>)
    }
    let sources: [Source]

    init(_ parents: [RDD<(K, Any)>], partitioner: HashPartitioner) {
        let ctx = parents[0].context
        var deps: [Dependency] = []
        var srcs: [Source] = []
        for p in parents {
            if let pp = p.partitioner, pp.isSame(as: partitioner) {
                deps.append(.narrow(p, { [$0] }))
                srcs.append(.narrow(p))
            } else {
                let agg = Aggregator<Any, [Any]>(createCombiner: { [$0] }, mergeValue: { $0 + [$1] }, mergeCombiners: { $0 + $1 })
                let d = ShuffleDependency<K, Any, [Any]>(parent: p, partitioner: partitioner, partitionOf: { partitioner.partition($0) }, aggregator: agg, mapSideCombine: false)
                deps.append(.shuffle(d))
                srcs.append(.shuffled(d))
            }
        }
        sources = srcs
        super.init(ctx, partitions: partitioner.numPartitions, dependencies: deps, name: "cogroup")
        self.partitioner = partitioner
    }

    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [(K, [[Any]])] {
        var groups: [K: [[Any]]] = [:]
        let n = sources.count
        for (i, s) in sources.enumerated() {
            switch s {
            case .narrow(let r):
                for (k, v) in try r.iterator(partition, ctx) { groups[k, default: Array(repeating: [], count: n)][i].append(v) }
            case .shuffled(let d):
                for m in 0..<d.parent.numPartitions {
                    for (k, vs) in try context.shuffles.fetch(d.shuffleId, map: m, bucket: partition) as [(K, [Any])] {
                        groups[k, default: Array(repeating: [], count: n)][i] += vs
                    }
                }
            }
        }
        return Array(groups)
    }
}

// MARK: Pair functions

extension RDD {
    /// Shuffles `(K, V)` pairs into `(K, C)` with an aggregator: the one
    /// primitive under reduceByKey, groupByKey, aggregateByKey, combineByKey.
    public func combineByKey<K: Hashable, V, C>(
        _ createCombiner: @escaping (V) -> C, _ mergeValue: @escaping (C, V) -> C, _ mergeCombiners: @escaping (C, C) -> C,
        partitions: Int? = nil, mapSideCombine: Bool = true
    ) -> RDD<(K, C)> where T == (K, V) {
        let part = HashPartitioner(partitions ?? context.defaultParallelism(self))
        let agg = Aggregator(createCombiner: createCombiner, mergeValue: mergeValue, mergeCombiners: mergeCombiners)
        if let p = partitioner, p.isSame(as: part) {
            // Already partitioned by key: combine within each partition, no shuffle.
            return mapPartitions(preservesPartitioning: true) { xs in
                var m: [K: C] = [:]
                for (k, v) in xs { if let c = m[k] { m[k] = mergeValue(c, v) } else { m[k] = createCombiner(v) } }
                return Array(m)
            }.setName("combineByKey")
        }
        let dep = ShuffleDependency<K, V, C>(parent: self, partitioner: part, partitionOf: { part.partition($0) }, aggregator: agg, mapSideCombine: mapSideCombine)
        return ShuffledRDD(dep, name: "combineByKey")
    }

    public func reduceByKey<K: Hashable, V>(partitions: Int? = nil, _ f: @escaping (V, V) -> V) -> RDD<(K, V)> where T == (K, V) {
        combineByKey({ $0 }, f, f, partitions: partitions).setName("reduceByKey")
    }

    public func foldByKey<K: Hashable, V>(_ zero: V, partitions: Int? = nil, _ f: @escaping (V, V) -> V) -> RDD<(K, V)> where T == (K, V) {
        combineByKey({ f(zero, $0) }, f, f, partitions: partitions).setName("foldByKey")
    }

    public func aggregateByKey<K: Hashable, V, U>(_ zero: U, partitions: Int? = nil, _ seqOp: @escaping (U, V) -> U, _ combOp: @escaping (U, U) -> U) -> RDD<(K, U)> where T == (K, V) {
        combineByKey({ seqOp(zero, $0) }, seqOp, combOp, partitions: partitions).setName("aggregateByKey")
    }

    /// Groups values by key (no map-side combine, as in Spark).
    public func groupByKey<K: Hashable, V>(_ partitions: Int? = nil) -> RDD<(K, [V])> where T == (K, V) {
        combineByKey({ [$0] }, { $0 + [$1] }, { $0 + $1 }, partitions: partitions, mapSideCombine: false).setName("groupByKey")
    }

    public func partitionBy<K: Hashable, V>(_ p: HashPartitioner) -> RDD<(K, V)> where T == (K, V) {
        if let mine = partitioner, mine.isSame(as: p) { return self }
        let dep = ShuffleDependency<K, V, V>(parent: self, partitioner: p, partitionOf: { p.partition($0) }, aggregator: nil, mapSideCombine: false)
        return ShuffledRDD(dep, name: "partitionBy")
    }

    public func mapValues<K, V, U>(_ f: @escaping (V) throws -> U) -> RDD<(K, U)> where T == (K, V) {
        mapPartitions(preservesPartitioning: true) { try $0.map { ($0.0, try f($0.1)) } }.setName("mapValues")
    }

    public func flatMapValues<K, V, S: Sequence>(_ f: @escaping (V) throws -> S) -> RDD<(K, S.Element)> where T == (K, V) {
        mapPartitions(preservesPartitioning: true) { xs in try xs.flatMap { kv in try f(kv.1).map { (kv.0, $0) } } }.setName("flatMapValues")
    }

    public func keys<K, V>() -> RDD<K> where T == (K, V) { map { $0.0 }.setName("keys") }
    public func values<K, V>() -> RDD<V> where T == (K, V) { map { $0.1 }.setName("values") }

    public func cogroup<K: Hashable, V, W>(_ other: RDD<(K, W)>, partitions: Int? = nil) -> RDD<(K, ([V], [W]))> where T == (K, V) {
        let part = (partitioner as? HashPartitioner) ?? (other.partitioner as? HashPartitioner) ?? HashPartitioner(partitions ?? context.defaultParallelism(self, other))
        let a: RDD<(K, Any)> = mapPartitions(preservesPartitioning: true) { $0.map { ($0.0, $0.1 as Any) } }
        let b: RDD<(K, Any)> = other.mapPartitions(preservesPartitioning: true) { $0.map { ($0.0, $0.1 as Any) } }
        return CoGroupedRDD<K>([a, b], partitioner: part)
            .mapPartitions(preservesPartitioning: true) { $0.map { ($0.0, ($0.1[0].map { $0 as! V }, $0.1[1].map { $0 as! W })) } }
            .setName("cogroup")
    }

    public func join<K: Hashable, V, W>(_ other: RDD<(K, W)>, partitions: Int? = nil) -> RDD<(K, (V, W))> where T == (K, V) {
        cogroup(other, partitions: partitions).flatMapValues { vs, ws in vs.flatMap { v in ws.map { (v, $0) } } }.setName("join")
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
    public func sortByKey<K: Comparable & Hashable, V>(ascending: Bool = true, partitions: Int? = nil) -> RDD<(K, V)> where T == (K, V) {
        let n = partitions ?? numPartitions
        let samples = ((try? context.runJob(self) { xs -> [K] in
            let step = Swift.max(1, xs.count / 100)
            return stride(from: 0, to: xs.count, by: step).map { xs[$0].0 }
        }) ?? []).flatMap { $0 }.sorted()
        var bounds: [K] = []
        if n > 1 && !samples.isEmpty {
            for i in 1..<n {
                let b = samples[Swift.min(samples.count - 1, samples.count * i / n)]
                if bounds.last.map({ $0 < b }) ?? true { bounds.append(b) }
            }
        }
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
