import Foundation
import WeftCore
import WeftRuntime

// A partitioned graph for iterative vertex programs, in the manner of
// Spark's GraphX: edges are kept per partition in compressed arrays (local
// integer indices, not vertex values), and the messages of an iteration
// cross the shuffle as one flat block per (sender partition, receiver
// partition) pair instead of one (vertex, value) tuple per edge. All of it
// is ordinary RDDs: the links and the vertex routing are persisted RDDs,
// each iteration is a shuffle, and a lost partition is recomputed from
// lineage like any other.
//
// Set-up (once):
//   edges ──route by source──▶ [shuffle] ──▶ links (CSR, deduplicated, persisted)
//   links ──each partition's distinct destinations──▶ [shuffle] ──▶ vertices (persisted)
// Each iteration:
//   links ⋈ ranks (co-partitioned: narrow) ──sums per destination──▶ [shuffle] ──▶ vertices ⋈ messages ──▶ ranks

/// Rows keyed by a partition number go to that partition: the shuffle of
/// partition-level blocks.
public final class DirectPartitioner: Partitioner {
    public let numPartitions: Int
    public init(_ n: Int) {
        precondition(n > 0)
        numPartitions = n
    }
    public func isSame(as other: Partitioner) -> Bool { (other as? DirectPartitioner)?.numPartitions == numPartitions }
    public var description: String { "direct(\(numPartitions))" }
}

/// The memory an element holds beyond its inline size (arrays inside it),
/// for the memory bound's accounting of shuffle rows and cached blocks.
public protocol MemorySized {
    var memoryBytes: Int { get }
}

extension RDD {
    /// Spark's zipPartitions: partition i of the result is `f` of partition
    /// i of both parents (which must have as many partitions).
    public final func zipPartitions<U, R>(_ other: RDD<U>, preservesPartitioning: Bool = false,
                                          _ f: @escaping (Int, [T], [U], TaskContext) throws -> [R]) -> RDD<R> {
        let r = ZippedPartitionsRDD(self, other, f)
        if preservesPartitioning { r.partitioner = partitioner }
        return r
    }

    /// Rows keyed by their partition number, shuffled there (no combining).
    func partitionByIndex<V>(_ n: Int) -> RDD<(Int, V)> where T == (Int, V) {
        let p = DirectPartitioner(n)
        if let mine = partitioner, mine.isSame(as: p) { return self }
        let dep = ShuffleDependency<Int, V, V>(parent: self, partitioner: p, partitionOf: { $0 }, aggregator: nil, mapSideCombine: false)
        return ShuffledRDD(dep, name: "partitionByIndex")
    }

    /// A whole partition's rows, streamed to `f` without an array between.
    func streamPartitions<U>(name: String, _ f: @escaping (Int, TaskContext, ((T) throws -> Void) throws -> Void) throws -> [U]) -> RDD<U> {
        StreamPartitionsRDD(parent: self, name: name, f)
    }
}

final class ZippedPartitionsRDD<A, B, R>: RDD<R> {
    let a: RDD<A>
    let b: RDD<B>
    let f: (Int, [A], [B], TaskContext) throws -> [R]
    init(_ a: RDD<A>, _ b: RDD<B>, _ f: @escaping (Int, [A], [B], TaskContext) throws -> [R]) {
        precondition(a.numPartitions == b.numPartitions, "zipPartitions needs the same number of partitions")
        self.a = a
        self.b = b
        self.f = f
        super.init(a.context, partitions: a.numPartitions, dependencies: [.narrow(a, { [$0] }), .narrow(b, { [$0] })], name: "zipPartitions")
    }
    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [R] {
        try f(partition, try a.iterator(partition, ctx), try b.iterator(partition, ctx), ctx)
    }
}

final class StreamPartitionsRDD<T, U>: RDD<U> {
    let parent: RDD<T>
    let f: (Int, TaskContext, ((T) throws -> Void) throws -> Void) throws -> [U]
    init(parent: RDD<T>, name: String, _ f: @escaping (Int, TaskContext, ((T) throws -> Void) throws -> Void) throws -> [U]) {
        self.parent = parent
        self.f = f
        super.init(parent.context, partitions: parent.numPartitions, dependencies: [.narrow(parent, { [$0] })], name: name)
    }
    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [U] {
        try f(partition, ctx) { body in try parent.push(partition, ctx, body) }
    }
}

// MARK: Blocks

/// Edges whose sources belong to one partition.
/// Integer edges whose ends fit in 32 bits travel packed, one word each
/// (source in the high half).
struct EdgeBlock<V>: MemorySized {
    var srcs: [V] = []
    var dsts: [V] = []
    var packed: [UInt64] = []
    var isEmpty: Bool { srcs.isEmpty && packed.isEmpty }
    var memoryBytes: Int { 2 * srcs.count * MemoryLayout<V>.stride + packed.count * 8 }
}

extension EdgeBlock: SpillCodable where V: SpillCodable {
    func encode(to w: inout ByteWriter) {
        srcs.encode(to: &w)
        dsts.encode(to: &w)
        packed.encode(to: &w)
    }
    static func decode(from r: inout ByteReader) throws(DecodeError) -> EdgeBlock<V> {
        EdgeBlock(srcs: try [V].decode(from: &r), dsts: try [V].decode(from: &r), packed: try [UInt64].decode(from: &r))
    }
}

/// One partition's out-links, deduplicated, in local indices. Source i is
/// slot i of the partition's vertices. `dsts[q]` are the distinct
/// destinations it links to in vertex partition q (ascending, for integer
/// vertices on the packed paths); the edges to q are
/// `edgeStart[q]..<edgeStart[q + 1]` of `edgeSrc` (source slot) and
/// `edgeDst` (index into `dsts[q]`), grouped by source.
struct LinkPartition<V>: MemorySized {
    var srcs: [V] = []
    var outDegree: [Int32] = []
    var dsts: [[V]] = []
    var edgeStart: [Int] = []
    var edgeSrc: [Int32] = []
    var edgeDst: [Int32] = []
    var edges: Int { edgeSrc.count }
    var memoryBytes: Int {
        srcs.count * (MemoryLayout<V>.stride + 4) + dsts.reduce(0) { $0 + $1.count * MemoryLayout<V>.stride } + edgeSrc.count * 8
    }

    /// Per-q edge lists (source slot, destination index) made flat.
    init(srcs: [V], outDegree: [Int32], dsts: [[V]], edgeSrc: [[Int32]], edgeDst: [[Int32]]) {
        self.srcs = srcs
        self.outDegree = outDegree
        self.dsts = dsts
        edgeStart = [0]
        for q in edgeSrc.indices { edgeStart.append(edgeStart[q] + edgeSrc[q].count) }
        self.edgeSrc = Array(edgeSrc.joined())
        self.edgeDst = Array(edgeDst.joined())
    }

    init() {}
}

/// One partition's vertices: slot -> vertex, and for each link partition p,
/// the slot of each of p's distinct destinations here.
struct VertexPartition<V>: MemorySized {
    var ids: [V] = []
    var srcCount = 0
    var inSlots: [[Int32]] = []
    var memoryBytes: Int { ids.count * MemoryLayout<V>.stride + inSlots.reduce(0) { $0 + $1.count * 4 } }
}

/// Values per vertex slot; `has[i]` is false for a vertex without a value.
struct RankBlock: MemorySized, SpillCodable {
    var rank: [Double] = []
    var has: [Bool] = []
    var memoryBytes: Int { rank.count * 9 }
    func encode(to w: inout ByteWriter) {
        rank.encode(to: &w)
        has.withUnsafeBytes { w.raw($0) }
    }
    static func decode(from r: inout ByteReader) throws(DecodeError) -> RankBlock {
        let rank = try [Double].decode(from: &r)
        return RankBlock(rank: rank, has: try decodeFlags(rank.count, &r))
    }
}

/// `n` booleans stored a byte each (`[Bool]`'s memory).
func decodeFlags(_ n: Int, _ r: inout ByteReader) throws(DecodeError) -> [Bool] {
    guard n <= r.remaining else { throw DecodeError("\(n) flags in \(r.remaining) bytes") }
    var out: [Bool] = []
    out.reserveCapacity(n)
    for _ in 0..<n { out.append(try r.u8() != 0) }
    return out
}

/// Arrays of 32-bit slots, four bytes each.
extension Array where Element == Int32 {
    func encodeSlots(to w: inout ByteWriter) {
        w.int(count)
        withUnsafeBytes { w.raw($0) }
    }
    static func decodeSlots(from r: inout ByteReader) throws(DecodeError) -> [Int32] {
        let n = try r.int(max: r.remaining / 4)
        var out = [Int32](repeating: 0, count: n)
        var failure: DecodeError?
        out.withUnsafeMutableBytes { buf in
            do throws(DecodeError) { try r.raw(into: buf) } catch { failure = error }
        }
        if let failure { throw failure }
        return out
    }
}

// The graph's partitions as bytes, for reliable persistence (`run(reliable:)`).
extension LinkPartition: SpillCodable where V: SpillCodable {
    func encode(to w: inout ByteWriter) {
        srcs.encode(to: &w)
        outDegree.encodeSlots(to: &w)
        w.int(dsts.count)
        for d in dsts { d.encode(to: &w) }
        edgeStart.encode(to: &w)
        edgeSrc.encodeSlots(to: &w)
        edgeDst.encodeSlots(to: &w)
    }
    static func decode(from r: inout ByteReader) throws(DecodeError) -> LinkPartition<V> {
        var l = LinkPartition<V>()
        l.srcs = try [V].decode(from: &r)
        l.outDegree = try [Int32].decodeSlots(from: &r)
        let n = try r.int(max: r.remaining)
        for _ in 0..<n { l.dsts.append(try [V].decode(from: &r)) }
        l.edgeStart = try [Int].decode(from: &r)
        l.edgeSrc = try [Int32].decodeSlots(from: &r)
        l.edgeDst = try [Int32].decodeSlots(from: &r)
        guard l.outDegree.count == l.srcs.count, l.edgeStart.count == l.dsts.count + 1, l.edgeSrc.count == l.edgeDst.count,
              l.edgeStart.last == l.edgeSrc.count else { throw DecodeError("link partition arrays disagree") }
        return l
    }
}

extension VertexPartition: SpillCodable where V: SpillCodable {
    func encode(to w: inout ByteWriter) {
        ids.encode(to: &w)
        w.int(srcCount)
        w.int(inSlots.count)
        for s in inSlots { s.encodeSlots(to: &w) }
    }
    static func decode(from r: inout ByteReader) throws(DecodeError) -> VertexPartition<V> {
        var v = VertexPartition<V>()
        v.ids = try [V].decode(from: &r)
        v.srcCount = try r.int(max: v.ids.count)
        let n = try r.int(max: r.remaining)
        for _ in 0..<n { v.inSlots.append(try [Int32].decodeSlots(from: &r)) }
        return v
    }
}

/// Sums sent by link partition `from` to one vertex partition, aligned
/// with `from`'s distinct destinations there.
struct MessageBlock: MemorySized, SpillCodable {
    var from = 0
    var sum: [Double] = []
    var got: [Bool] = []
    var memoryBytes: Int { sum.count * 9 }
    func encode(to w: inout ByteWriter) {
        from.encode(to: &w)
        sum.encode(to: &w)
        got.withUnsafeBytes { w.raw($0) }
    }
    static func decode(from r: inout ByteReader) throws(DecodeError) -> MessageBlock {
        var b = MessageBlock(from: try Int.decode(from: &r), sum: try [Double].decode(from: &r))
        b.got = try decodeFlags(b.sum.count, &r)
        return b
    }
}

// MARK: Indexing vertices

/// Dense indices for vertex values in first-seen order: `IntMap` for Int
/// vertices, `StringMap` for String vertices, a Dictionary otherwise.
struct VertexIndexer<V: Hashable> {
    private var ints: IntMap<UInt8>
    private var strings: StringMap<UInt8>
    private var dict: [V: Int32] = [:]
    private(set) var ids: [V] = []
    init(capacity: Int = 64) {
        ints = IntMap(capacity: V.self == Int.self ? capacity : 1)
        strings = StringMap(capacity: V.self == String.self ? capacity : 1)
        if V.self != Int.self && V.self != String.self { dict.reserveCapacity(capacity) }
    }
    var count: Int { ids.count }

    @inline(__always)
    mutating func index(_ v: V) -> Int32 {
        if V.self == Int.self {
            let k = unsafeBitCast(v, to: Int.self)
            let (e, slot) = ints.find(k)
            if e >= 0 { return Int32(truncatingIfNeeded: e) }
            ids.append(v)
            return Int32(truncatingIfNeeded: ints.insert(k, 0, at: slot))
        }
        if V.self == String.self {
            let k = unsafeBitCast(v, to: String.self)
            let (e, at) = strings.probe(k)
            if e >= 0 { return Int32(truncatingIfNeeded: e) }
            ids.append(v)
            return Int32(truncatingIfNeeded: strings.insert(k, 0, at: at))
        }
        if let i = dict[v] { return i }
        let i = Int32(truncatingIfNeeded: ids.count)
        dict[v] = i
        ids.append(v)
        return i
    }
}

/// The vertex partition of `v` among `n`: a multiplicative hash for Int
/// (the same in every process), `StableHash` otherwise.
@inline(__always)
func vertexPartition<V: Hashable>(_ v: V, _ n: Int) -> Int {
    if V.self == Int.self {
        // Murmur3's finalizer: not IntMap's multiplicative hash, whose top
        // bits would then be the same for every vertex of a partition (and
        // its probes would pile up in one corner of the table).
        var h = UInt64(bitPattern: Int64(unsafeBitCast(v, to: Int.self)))
        h = (h ^ (h >> 33)) &* 0xFF51_AFD7_ED55_8CCD
        h = (h ^ (h >> 33)) &* 0xC4CE_B9FE_1A85_EC53
        h ^= h >> 33
        return Int(((h >> 32) &* UInt64(n)) >> 32)
    }
    // Stable across processes: executors on other nodes route alike.
    return Int(StableHash.of(v) % UInt64(n))
}

// MARK: PageRank

public enum GraphPageRank {
    /// Spark's pagerank.py over a partitioned graph: the same answer as
    /// `BuiltinJobs.pageRankByJoin` (up to the order floating-point sums are
    /// taken in), with the links as compressed arrays and each iteration's
    /// messages as flat blocks.
    ///
    /// With `reliable`, the graph (links and vertex routing) and every
    /// iteration's ranks are persisted reliably, `replicas` copies on as
    /// many participants (Spark's checkpointing of an iterative job): a
    /// node lost in iteration i costs rereading its share of the graph and
    /// of iteration i-1's ranks, not recomputing the shuffles of every
    /// iteration before. Without it they are cached in memory only.
    @_specialize(where V == Int)
    @_specialize(where V == String)
    public static func run<V: Hashable>(edges: RDD<(V, V)>, iterations: Int, damping: Double, partitions: Int? = nil,
                                        reliable: (replicas: Int, client: WeftClient)? = nil) -> RDD<(V, Double)> {
        let n = max(1, partitions ?? min(edges.numPartitions, max(2, edges.context.executor.parallelism)))
        let links = self.links(edges, n)
        let vertices = self.vertices(links, n)
        keepReliably(links, reliable)
        keepReliably(vertices, reliable)
        var ranks: RDD<RankBlock> = links.mapPartitions(preservesPartitioning: true) { ls in
            ls.map { RankBlock(rank: [Double](repeating: 1, count: $0.srcs.count), has: [Bool](repeating: true, count: $0.srcs.count)) }
        }.setName("ranks(1.0 per source)")
        for _ in 0..<max(1, iterations) {
            ranks = step(links, vertices, ranks, n, damping)
            keepReliably(ranks, reliable)
        }
        return vertices.zipPartitions(ranks) { _, vs, rs, _ in
            guard let v = vs.first, let r = rs.first else { return [] }
            var out: [(V, Double)] = []
            out.reserveCapacity(r.has.count)
            for i in 0..<r.has.count where r.has[i] { out.append((v.ids[i], r.rank[i])) }
            return out
        }.setName("ranks(vertex, rank)")
    }

    /// Persists `rdd` reliably when asked and its elements have a codec.
    static func keepReliably<T>(_ rdd: RDD<T>, _ reliable: (replicas: Int, client: WeftClient)?) {
        guard let reliable, reliable.replicas > 0, let codec = BlockCodec<T>.automatic() else { return }
        rdd.persistReliable(replicas: reliable.replicas, codec: codec, client: reliable.client)
    }

    /// Packed edges per routed chunk (512 KiB).
    static let edgeChunk = 1 << 16

    /// Edges routed to the partition of their source, deduplicated, as CSR.
    static func links<V: Hashable>(_ edges: RDD<(V, V)>, _ n: Int) -> RDD<LinkPartition<V>> {
        let routed: RDD<(Int, EdgeBlock<V>)> = edges.streamPartitions(name: "edgesBySource") { _, _, source in
            // Packed edges go out in chunks of a fixed size, so none is
            // copied as an array grows.
            var out: [(Int, EdgeBlock<V>)] = []
            var chunks = [[UInt64]](repeating: [], count: n)
            var blocks = [EdgeBlock<V>](repeating: EdgeBlock(), count: n)
            try source { e in
                let q = vertexPartition(e.0, n)
                if V.self == Int.self {
                    let s = UInt(bitPattern: unsafeBitCast(e.0, to: Int.self)), d = UInt(bitPattern: unsafeBitCast(e.1, to: Int.self))
                    if s >> 32 == 0 && d >> 32 == 0 {
                        if chunks[q].count == chunks[q].capacity {
                            if !chunks[q].isEmpty { out.append((q, EdgeBlock(packed: chunks[q]))) }
                            chunks[q] = []
                            chunks[q].reserveCapacity(edgeChunk)
                        }
                        chunks[q].append(UInt64(s) << 32 | UInt64(d))
                        return
                    }
                }
                blocks[q].srcs.append(e.0)
                blocks[q].dsts.append(e.1)
            }
            for q in 0..<n where !chunks[q].isEmpty { out.append((q, EdgeBlock(packed: chunks[q]))) }
            for q in 0..<n where !blocks[q].isEmpty { out.append((q, blocks[q])) }
            return out
        }
        let shuffled: RDD<(Int, EdgeBlock<V>)> = routed.partitionByIndex(n)
        return shuffled.mapPartitionsWithIndex(preservesPartitioning: true) { _, blocks, _ in
            [buildLinks(blocks.map(\.1), n)]
        }.persist().setName("links(CSR, distinct edges)")
    }

    static func buildLinks<V: Hashable>(_ blocks: [EdgeBlock<V>], _ n: Int) -> LinkPartition<V> {
        if V.self == Int.self {
            if blocks.allSatisfy({ $0.srcs.isEmpty }) {
                var keys = radixSorted(blocks.map(\.packed))
                return unsafeBitCast(buildPackedLinks(&keys, n), to: LinkPartition<V>.self)
            }
            // Some vertex does not fit in 32 bits: unpack and hash them all.
            var blocks = blocks
            for i in blocks.indices {
                for k in blocks[i].packed {
                    blocks[i].srcs.append(unsafeBitCast(Int(k >> 32), to: V.self))
                    blocks[i].dsts.append(unsafeBitCast(Int(k & 0xffff_ffff), to: V.self))
                }
                blocks[i].packed = []
            }
            return buildHashedLinks(blocks, n)
        }
        return buildHashedLinks(blocks, n)
    }

    static func buildHashedLinks<V: Hashable>(_ blocks: [EdgeBlock<V>], _ n: Int) -> LinkPartition<V> {
        let total = blocks.reduce(0) { $0 + $1.srcs.count }
        var srcIndex = VertexIndexer<V>(capacity: total / 4 + 16)
        var dstIndex = (0..<n).map { _ in VertexIndexer<V>(capacity: total / (4 * n) + 16) }
        // Per edge: its source's index, and its destination as (vertex
        // partition, index among that partition's destinations), packed.
        var eSrc = [Int32](), eDst = [UInt64]()
        eSrc.reserveCapacity(total)
        eDst.reserveCapacity(total)
        for b in blocks {
            for i in 0..<b.srcs.count {
                let d = b.dsts[i]
                let q = vertexPartition(d, n)
                eSrc.append(srcIndex.index(b.srcs[i]))
                eDst.append(UInt64(q) << 32 | UInt64(UInt32(dstIndex[q].index(d))))
            }
        }
        // Counting sort by source (stable: first occurrences stay first),
        // moving the packed destinations themselves.
        let sources = srcIndex.count
        var start = [Int](repeating: 0, count: sources + 1)
        for s in eSrc { start[Int(s) + 1] += 1 }
        for i in 0..<sources { start[i + 1] += start[i] }
        var sorted = [UInt64](repeating: 0, count: total)
        var fill = start
        sorted.withUnsafeMutableBufferPointer { sorted in
            fill.withUnsafeMutableBufferPointer { fill in
                for e in 0..<total {
                    let s = Int(eSrc[e])
                    sorted[fill[s]] = eDst[e]
                    fill[s] += 1
                }
            }
        }
        eSrc = []
        eDst = []
        // Drop repeated edges: a destination already seen for this source.
        var lastSource = dstIndex.map { [Int32](repeating: -1, count: $0.count) }
        var outDegree = [Int32](repeating: 0, count: sources)
        var edgeSrc = [[Int32]](repeating: [], count: n), edgeDst = [[Int32]](repeating: [], count: n)
        for q in 0..<n {
            edgeSrc[q].reserveCapacity(total / n + 16)
            edgeDst[q].reserveCapacity(total / n + 16)
        }
        for s in 0..<sources {
            var degree: Int32 = 0
            for k in start[s]..<start[s + 1] {
                let packed = sorted[k]
                let q = Int(packed >> 32), d = Int(packed & 0xffff_ffff)
                if lastSource[q][d] == Int32(s) { continue }
                lastSource[q][d] = Int32(s)
                degree += 1
                edgeSrc[q].append(Int32(s))
                edgeDst[q].append(Int32(d))
            }
            outDegree[s] = degree
        }
        return LinkPartition(srcs: srcIndex.ids, outDegree: outDegree, dsts: dstIndex.map(\.ids), edgeSrc: edgeSrc, edgeDst: edgeDst)
    }

    /// `buildLinks` for integer vertices in [0, 2^32), the common case:
    /// each edge packed into one 64-bit key and radix-sorted (`keys` come
    /// sorted), so grouping by source, dropping repeats and numbering
    /// destinations are sequential passes instead of a hash probe per edge.
    static func buildPackedLinks(_ keys: inout [UInt64], _ n: Int) -> LinkPartition<Int> {
        var maxDst: UInt64 = 0
        for k in keys { maxDst = max(maxDst, k & 0xffff_ffff) }
        // Bitmaps (n of them, a bit per possible destination) no bigger
        // than the keys themselves, or 512 KiB.
        if maxDst < UInt64(max(1 << 22, 2 * keys.count)), n * (Int(maxDst) >> 6 + 1) <= max(1 << 16, keys.count) {
            return buildDenseLinks(keys, Int(maxDst), n)
        }
        var srcs: [Int] = [], outDegree: [Int32] = []
        // Per vertex partition: (destination, edge ordinal there), packed.
        var byDst = [[UInt64]](repeating: [], count: n)
        var edgeSrc = [[Int32]](repeating: [], count: n)
        var previous: UInt64 = 0, first = true
        for k in keys where first || k != previous {
            (previous, first) = (k, false)
            let src = Int(k >> 32), dst = Int(k & 0xffff_ffff)
            if srcs.last != src {
                srcs.append(src)
                outDegree.append(0)
            }
            outDegree[srcs.count - 1] += 1
            let q = vertexPartition(dst, n)
            byDst[q].append(UInt64(dst) << 32 | UInt64(edgeSrc[q].count))
            edgeSrc[q].append(Int32(srcs.count - 1))
        }
        keys = []
        var dsts = [[Int]](repeating: [], count: n), edgeDst = [[Int32]](repeating: [], count: n)
        for q in 0..<n {
            radixSort(&byDst[q])
            edgeDst[q] = [Int32](repeating: 0, count: byDst[q].count)
            var last: UInt64 = ~0
            edgeDst[q].withUnsafeMutableBufferPointer { edgeDst in
                for x in byDst[q] {
                    if x >> 32 != last {
                        last = x >> 32
                        dsts[q].append(Int(last))
                    }
                    edgeDst[Int(x & 0xffff_ffff)] = Int32(dsts[q].count - 1)
                }
            }
            byDst[q] = []
        }
        return LinkPartition(srcs: srcs, outDegree: outDegree, dsts: dsts, edgeSrc: edgeSrc, edgeDst: edgeDst)
    }

    /// `buildPackedLinks` when destinations are small numbers (below
    /// 2^22, or twice the edge count). Two passes over the sorted edges:
    /// the first counts sources and edges per vertex partition and marks
    /// each destination in a bitmap per vertex partition; the second writes
    /// the edges, numbering each destination by its rank in that bitmap
    /// (so `dsts[q]` is ascending). The bitmaps take one bit per possible
    /// destination, small enough to stay in cache, where a table of slots
    /// indexed by destination would miss it on every edge.
    static func buildDenseLinks(_ keys: [UInt64], _ maxDst: Int, _ n: Int) -> LinkPartition<Int> {
        let words = maxDst >> 6 + 1
        var bits = [UInt64](repeating: 0, count: n * words)
        var perPartition = [Int](repeating: 0, count: n)
        var sources = 0
        keys.withUnsafeBufferPointer { keys in
            bits.withUnsafeMutableBufferPointer { bits in
                for i in keys.indices where i == 0 || keys[i] != keys[i - 1] {
                    let k = keys[i]
                    if i == 0 || k >> 32 != keys[i - 1] >> 32 { sources += 1 }
                    let dst = Int(k & 0xffff_ffff), q = vertexPartition(dst, n)
                    perPartition[q] += 1
                    bits[q * words + dst >> 6] |= 1 << UInt64(dst & 63)
                }
            }
        }
        // Ranks: set bits before each word, and the destinations in order.
        var below = [Int32](repeating: 0, count: n * words)
        var dsts = [[Int]](repeating: [], count: n)
        for q in 0..<n {
            var count: Int32 = 0
            for w in 0..<words {
                below[q * words + w] = count
                var word = bits[q * words + w]
                count += Int32(word.nonzeroBitCount)
                while word != 0 {
                    dsts[q].append(w << 6 | word.trailingZeroBitCount)
                    word &= word - 1
                }
            }
        }
        var edgeStart = [0]
        for q in 0..<n { edgeStart.append(edgeStart[q] + perPartition[q]) }
        let total = edgeStart[n]
        var srcs = [Int](repeating: 0, count: sources), outDegree = [Int32](repeating: 0, count: sources)
        var edgeSrc = [Int32](repeating: 0, count: total), edgeDst = [Int32](repeating: 0, count: total)
        var fill = Array(edgeStart.dropLast())
        keys.withUnsafeBufferPointer { keys in
            bits.withUnsafeBufferPointer { bits in
                below.withUnsafeBufferPointer { below in
                    srcs.withUnsafeMutableBufferPointer { srcs in
                        outDegree.withUnsafeMutableBufferPointer { outDegree in
                            edgeSrc.withUnsafeMutableBufferPointer { edgeSrc in
                                edgeDst.withUnsafeMutableBufferPointer { edgeDst in
                                    fill.withUnsafeMutableBufferPointer { fill in
                                        var s = -1
                                        for i in keys.indices where i == 0 || keys[i] != keys[i - 1] {
                                            let k = keys[i]
                                            if i == 0 || k >> 32 != keys[i - 1] >> 32 {
                                                s += 1
                                                srcs[s] = Int(k >> 32)
                                            }
                                            outDegree[s] += 1
                                            let dst = Int(k & 0xffff_ffff), q = vertexPartition(dst, n)
                                            let w = q * words + dst >> 6
                                            let rank = below[w] + Int32((bits[w] & ((1 << UInt64(dst & 63)) &- 1)).nonzeroBitCount)
                                            edgeSrc[fill[q]] = Int32(s)
                                            edgeDst[fill[q]] = rank
                                            fill[q] += 1
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        var out = LinkPartition<Int>()
        (out.srcs, out.outDegree, out.dsts) = (srcs, outDegree, dsts)
        (out.edgeStart, out.edgeSrc, out.edgeDst) = (edgeStart, edgeSrc, edgeDst)
        return out
    }

    /// Each partition's vertices: its sources, then the destinations the
    /// link partitions send it, with the slots each link partition's
    /// messages land in. Incoming lists are taken in link partition order,
    /// so a recomputed partition numbers its vertices as before.
    static func vertices<V: Hashable>(_ links: RDD<LinkPartition<V>>, _ n: Int) -> RDD<VertexPartition<V>> {
        let lists: RDD<(Int, (Int, [V]))> = links.mapPartitionsWithIndex { p, ls, _ in
            guard let l = ls.first else { return [] }
            return l.dsts.enumerated().compactMap { q, dsts in dsts.isEmpty ? nil : (q, (p, dsts)) }
        }.setName("destinationsByPartition")
        let routed: RDD<(Int, (Int, [V]))> = lists.partitionByIndex(n)
        return links.zipPartitions(routed, preservesPartitioning: true) { _, ls, incoming, _ in
            guard let l = ls.first else { return [] }
            let incoming = incoming.map(\.1).sorted { $0.0 < $1.0 }
            if V.self == Int.self, let v = denseVertices(unsafeBitCast(l.srcs, to: [Int].self), unsafeBitCast(incoming, to: [(Int, [Int])].self), n) {
                return [unsafeBitCast(v, to: VertexPartition<V>.self)]
            }
            var index = VertexIndexer<V>(capacity: l.srcs.count * 2 + 16)
            for s in l.srcs { _ = index.index(s) }
            var inSlots = [[Int32]](repeating: [], count: n)
            for (p, dsts) in incoming { inSlots[p] = dsts.map { index.index($0) } }
            return [VertexPartition(ids: index.ids, srcCount: l.srcs.count, inSlots: inSlots)]
        }.persist().setName("vertices(slots, routing)")
    }

    /// `vertices` for integer vertices in [0, max(2^22, 4 * entries)): a
    /// direct table from vertex to slot instead of a hash index. The lists
    /// of the packed paths are ascending, so the table is walked in order.
    static func denseVertices(_ srcs: [Int], _ incoming: [(Int, [Int])], _ n: Int) -> VertexPartition<Int>? {
        var lo = 0, hi = -1, entries = srcs.count
        for v in srcs { (lo, hi) = (min(lo, v), max(hi, v)) }
        for (_, dsts) in incoming {
            entries += dsts.count
            for v in dsts { (lo, hi) = (min(lo, v), max(hi, v)) }
        }
        guard lo >= 0, hi < max(1 << 22, 4 * entries) else { return nil }
        var slotOf = [Int32](repeating: -1, count: hi + 1)
        var ids = srcs
        var inSlots = [[Int32]](repeating: [], count: n)
        slotOf.withUnsafeMutableBufferPointer { slotOf in
            for (i, v) in srcs.enumerated() { slotOf[v] = Int32(i) }
            for (p, dsts) in incoming {
                inSlots[p] = dsts.map { v in
                    if slotOf[v] < 0 {
                        slotOf[v] = Int32(ids.count)
                        ids.append(v)
                    }
                    return slotOf[v]
                }
            }
        }
        return VertexPartition(ids: ids, srcCount: srcs.count, inSlots: inSlots)
    }

    /// One iteration: each source sends rank/outdegree along its links,
    /// summed per destination within the sending partition; each vertex
    /// that received something gets (1 - d) + d * sum.
    static func step<V>(_ links: RDD<LinkPartition<V>>, _ vertices: RDD<VertexPartition<V>>, _ ranks: RDD<RankBlock>, _ n: Int, _ damping: Double) -> RDD<RankBlock> {
        let messages: RDD<(Int, MessageBlock)> = links.zipPartitions(ranks) { p, ls, rs, _ in
            guard let l = ls.first, let r = rs.first else { return [] }
            var share = [Double](repeating: 0, count: l.srcs.count)
            var sends = [Bool](repeating: false, count: l.srcs.count)
            for s in 0..<l.srcs.count where s < r.has.count && r.has[s] {
                share[s] = r.rank[s] / Double(l.outDegree[s])
                sends[s] = true
            }
            var out: [(Int, MessageBlock)] = []
            for q in l.dsts.indices where !l.dsts[q].isEmpty {
                var sum = [Double](repeating: 0, count: l.dsts[q].count)
                var got = [Bool](repeating: false, count: l.dsts[q].count)
                share.withUnsafeBufferPointer { share in
                    sends.withUnsafeBufferPointer { sends in
                        l.edgeSrc.withUnsafeBufferPointer { edgeSrc in
                            l.edgeDst.withUnsafeBufferPointer { edgeDst in
                                sum.withUnsafeMutableBufferPointer { sum in
                                    got.withUnsafeMutableBufferPointer { got in
                                        for k in l.edgeStart[q]..<l.edgeStart[q + 1] {
                                            let s = Int(edgeSrc[k])
                                            if sends[s] {
                                                let d = Int(edgeDst[k])
                                                sum[d] += share[s]
                                                got[d] = true
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                out.append((q, MessageBlock(from: p, sum: sum, got: got)))
            }
            return out
        }.setName("contributions(summed per destination)")
        let received: RDD<(Int, MessageBlock)> = messages.partitionByIndex(n)
        return vertices.zipPartitions(received, preservesPartitioning: true) { _, vs, msgs, _ in
            guard let v = vs.first else { return [] }
            var acc = [Double](repeating: 0, count: v.ids.count)
            var has = [Bool](repeating: false, count: v.ids.count)
            acc.withUnsafeMutableBufferPointer { acc in
                has.withUnsafeMutableBufferPointer { has in
                    for (_, m) in msgs.sorted(by: { $0.1.from < $1.1.from }) {
                        let slots = v.inSlots[m.from]
                        for k in 0..<m.sum.count where m.got[k] {
                            let i = Int(slots[k])
                            acc[i] += m.sum[k]
                            has[i] = true
                        }
                    }
                }
            }
            for i in 0..<acc.count where has[i] { acc[i] = (1 - damping) + damping * acc[i] }
            return [RankBlock(rank: acc, has: has)]
        }.setName("ranks")
    }
}

/// Bits per digit of the radix sorts: 2^11 counters per digit stay in
/// cache, and 40 significant bits (two 20-bit vertex numbers) sort in
/// four passes instead of five or six by bytes.
let radixBits = 11

/// The digits an LSD radix sort of some keys needs (bit ranges of at most
/// `radixBits` that together cover every bit in which two keys differ),
/// and each digit's counts.
struct RadixPlan {
    var shifts: [UInt64] = []
    var counts: [Int] = []

    init(_ chunks: [[UInt64]]) {
        var all: UInt64 = ~0, any: UInt64 = 0
        for chunk in chunks { chunk.withUnsafeBufferPointer { c in for x in c { all &= x; any |= x } } }
        let varying = all ^ any
        var b = 0
        while b < 64, varying >> UInt64(b) != 0 {
            b += (varying >> UInt64(b)).trailingZeroBitCount
            shifts.append(UInt64(b))
            b += radixBits
        }
        let mask = UInt64(1 << radixBits - 1)
        counts = [Int](repeating: 0, count: shifts.count << radixBits)
        counts.withUnsafeMutableBufferPointer { counts in
            for chunk in chunks {
                chunk.withUnsafeBufferPointer { c in
                    for x in c {
                        for (j, shift) in shifts.enumerated() { counts[j << radixBits | Int((x >> shift) & mask)] += 1 }
                    }
                }
            }
        }
    }

    /// One stable pass on digit `j`: every key of `sources`, in order, to
    /// its place in `to`.
    func scatter(_ j: Int, _ sources: [[UInt64]], to: UnsafeMutableBufferPointer<UInt64>) {
        var offsets = [Int](repeating: 0, count: 1 << radixBits)
        var sum = 0
        for v in 0..<(1 << radixBits) {
            offsets[v] = sum
            sum += counts[j << radixBits | v]
        }
        let shift = shifts[j], mask = UInt64(1 << radixBits - 1)
        offsets.withUnsafeMutableBufferPointer { off in
            for source in sources {
                source.withUnsafeBufferPointer { src in
                    for x in src {
                        let v = Int((x >> shift) & mask)
                        to[off[v]] = x
                        off[v] += 1
                    }
                }
            }
        }
    }
}

/// LSD radix sort of 64-bit keys, `radixBits` a pass, skipping bits that
/// every key shares (small vertex numbers sort in few passes).
public func radixSort(_ a: inout [UInt64]) {
    let n = a.count
    if n < 2 { return }
    let plan = RadixPlan([a])
    if plan.shifts.isEmpty { return }
    var buffer = [UInt64](unsafeUninitializedCapacity: n) { _, count in count = n }
    for j in plan.shifts.indices {
        let source = [a]
        buffer.withUnsafeMutableBufferPointer { plan.scatter(j, source, to: $0) }
        swap(&a, &buffer)
    }
}

/// The keys of all `chunks`, sorted: `radixSort` of their concatenation,
/// whose first pass reads the chunks where they are instead of copying
/// them into one array first.
func radixSorted(_ chunks: [[UInt64]]) -> [UInt64] {
    let n = chunks.reduce(0) { $0 + $1.count }
    let plan = RadixPlan(chunks)
    if n < 2 || plan.shifts.isEmpty { return Array(chunks.joined()) }
    var a = [UInt64](unsafeUninitializedCapacity: n) { _, count in count = n }
    a.withUnsafeMutableBufferPointer { plan.scatter(0, chunks, to: $0) }
    if plan.shifts.count == 1 { return a }
    var buffer = [UInt64](unsafeUninitializedCapacity: n) { _, count in count = n }
    for j in plan.shifts.indices.dropFirst() {
        let source = [a]
        buffer.withUnsafeMutableBufferPointer { plan.scatter(j, source, to: $0) }
        swap(&a, &buffer)
    }
    return a
}
