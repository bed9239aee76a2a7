import Foundation
import WeftCore

/// A resilient distributed dataset: a lazy, typed, partitioned collection
/// defined by its lineage (parents and a compute function per partition).
/// Transformations build new RDDs; actions run jobs through the scheduler.
open class RDD<T>: AnyRDD {
    public let id: Int
    public let context: DataflowContext
    public let numPartitions: Int
    var lineage: [Dependency]
    /// The parents; empty once a checkpoint has cut the lineage.
    public var dependencies: [Dependency] { checkpointed ? [] : lineage }
    public var name: String
    var reliable: ReliableState?
    /// True once every partition is in reliable blocks and the lineage is cut.
    public private(set) var checkpointed = false
    /// Set on pair RDDs whose partitioning is known (after a shuffle).
    public var partitioner: Partitioner?
    public private(set) var storageLevel: StorageLevel = .none

    init(_ context: DataflowContext, partitions: Int, dependencies: [Dependency], name: String) {
        precondition(partitions >= 0)
        self.context = context
        self.id = context.newRDDId()
        self.numPartitions = partitions
        self.lineage = dependencies
        self.name = name
    }

    /// Computes one partition from its parents. Subclasses override.
    open func compute(_ partition: Int, _ ctx: TaskContext) throws -> [T] {
        preconditionFailure("RDD.compute is abstract")
    }

    open func preferredLocation(_ partition: Int) -> String? {
        if case .narrow(let p, let f)? = dependencies.first, let first = f(partition).first { return p.preferredLocation(first) }
        return nil
    }

    /// The partition's data: from the cache if persisted there, else computed.
    public final func iterator(_ partition: Int, _ ctx: TaskContext) throws -> [T] {
        try ctx.checkKilled()
        if storageLevel != .none {
            if let cached = try context.blocks.get(rdd: id, partition: partition, ctx) as? [T] {
                context.metric { $0.cacheHits += 1 }
                return cached
            }
            context.metric { $0.cacheMisses += 1 }
        }
        if let r = reliable {
            do {
                if let stored = try r.read(partition) as? [T] {
                    // Lost from memory but stored reliably: a replica, not a recomputation.
                    context.metric { $0.partitionsReadFromReplicas += 1 }
                    context.blocks.put(rdd: id, partition: partition, stored, bytes: estimateBytes(stored), level: storageLevel, codec: blockCodec)
                    return stored
                }
            } catch {
                // No replica is readable. With the lineage still there, recompute
                // (and store the block again); a checkpoint has nothing to fall back on.
                if checkpointed {
                    throw WeftError(.unavailable, "checkpointed partition \(partition) of \(name) has no readable replica: \(error)")
                }
                context.metric { $0.unreadableReplicatedPartitions += 1 }
                r.forget(partition)
            }
        }
        if checkpointed {
            throw WeftError(.unavailable, "checkpointed partition \(partition) of \(name) has no readable replica")
        }
        context.noteComputed(rdd: id, partition: partition)
        ctx.noteComputed(rdd: id, partition: partition)
        let data = try compute(partition, ctx)
        if let r = reliable {
            try r.write(partition, data)
            if r.cutLineage && r.allStored(numPartitions) { checkpointed = true }
        }
        if storageLevel != .none {
            context.blocks.put(rdd: id, partition: partition, data, bytes: estimateBytes(data), level: storageLevel, codec: blockCodec)
        }
        return data
    }

    /// Hands the partition's rows to `body` one at a time. Chains of
    /// element-wise transformations (map, filter, flatMap...) override this
    /// to run fused, row by row, without building an array between steps;
    /// anything persisted goes through `iterator` so the cache is used.
    func push(_ partition: Int, _ ctx: TaskContext, _ body: (T) throws -> Void) throws {
        for x in try iterator(partition, ctx) { try body(x) }
    }

    /// `push` for an RDD that computes a partition as a stream: through
    /// `iterator` when the partition is (or will be) kept, else straight
    /// from `stream`, fused with the consumer.
    final func pushStreaming(_ partition: Int, _ ctx: TaskContext, _ body: (T) throws -> Void,
                             _ stream: ((T) throws -> Void) throws -> Void) throws {
        if materializes {
            for x in try iterator(partition, ctx) { try body(x) }
            return
        }
        context.noteComputed(rdd: id, partition: partition)
        // `body` goes to `stream` and nowhere else; it does not outlive the call.
        try withoutActuallyEscaping(body) { try stream($0) }
    }

    /// True when `push` must go through `iterator` (the partition is or
    /// will be kept somewhere) rather than recompute in a fused pipeline.
    final var materializes: Bool { storageLevel != .none || reliable != nil || checkpointed }

    func estimateBytes(_ data: [T]) -> Int {
        var n = 64 + data.count * Swift.max(8, MemoryLayout<T>.stride)
        if T.self is MemorySized.Type { for x in data { n += (x as! MemorySized).memoryBytes } }
        return n
    }

    /// How this RDD's partitions become bytes for disk-level caching.
    var blockCodec: BlockCodec<T>?

    /// Keeps computed partitions for reuse. `.memory` blocks are dropped
    /// least-recently-used past the memory bound (and recomputed from
    /// lineage when needed again); `.memoryAndDisk` blocks move to disk
    /// instead; `.disk` blocks never take memory. Disk levels need a codec:
    /// the element type's `SpillCodable` conformance (found at run time),
    /// or pairs of such types; without one, the block stays in memory.
    @discardableResult
    public final func persist(_ level: StorageLevel = .memory) -> Self {
        persist(level, codec: BlockCodec<T>.automatic())
    }

    @discardableResult
    public final func persist(_ level: StorageLevel, codec: BlockCodec<T>?) -> Self {
        storageLevel = level
        blockCodec = codec
        return self
    }

    @discardableResult
    public final func cache() -> Self { persist(.memory) }

    /// Drops the cached partitions, and deletes the RDD's reliable blocks
    /// from the store (each partition's replicas and directory entry in one
    /// transaction); a checkpointed RDD gets its lineage back. Throws only
    /// if the store cannot be reached to delete blocks.
    @discardableResult
    public final func unpersist() throws -> Self {
        storageLevel = .none
        context.blocks.drop(rdd: id)
        if let r = reliable {
            try r.deleteAll(numPartitions)
            reliable = nil
            checkpointed = false
        }
        return self
    }

    @discardableResult
    public final func setName(_ n: String) -> Self {
        name = n
        return self
    }

    // MARK: Narrow transformations

    public final func mapPartitionsWithIndex<U>(preservesPartitioning: Bool = false, _ f: @escaping (Int, [T], TaskContext) throws -> [U]) -> RDD<U> {
        let r = MapPartitionsRDD<T, U>(parent: self, f: f, name: "mapPartitions")
        if preservesPartitioning { r.partitioner = partitioner }
        return r
    }

    public final func mapPartitions<U>(preservesPartitioning: Bool = false, _ f: @escaping ([T]) throws -> [U]) -> RDD<U> {
        mapPartitionsWithIndex(preservesPartitioning: preservesPartitioning) { _, xs, _ in try f(xs) }.setName("mapPartitions")
    }

    public final func map<U>(_ f: @escaping (T) throws -> U) -> RDD<U> {
        ElementwiseRDD(parent: self, name: "map") { x, emit in try emit(try f(x)) }
    }

    public final func filter(_ f: @escaping (T) throws -> Bool) -> RDD<T> {
        let r = ElementwiseRDD<T, T>(parent: self, name: "filter") { x, emit in if try f(x) { try emit(x) } }
        r.partitioner = partitioner
        return r
    }

    /// map and keep the non-nil results.
    public final func compactMap<U>(_ f: @escaping (T) throws -> U?) -> RDD<U> {
        ElementwiseRDD(parent: self, name: "compactMap") { x, emit in if let y = try f(x) { try emit(y) } }
    }

    public final func flatMap<S: Sequence>(_ f: @escaping (T) throws -> S) -> RDD<S.Element> {
        ElementwiseRDD(parent: self, name: "flatMap") { x, emit in for y in try f(x) { try emit(y) } }
    }

    public final func glom() -> RDD<[T]> { mapPartitions { [$0] }.setName("glom") }

    /// Bernoulli sample (without replacement) or Poisson-like with
    /// replacement, seeded per partition so a recomputation gives the same rows.
    public final func sample(withReplacement: Bool, fraction: Double, seed: UInt64 = 42) -> RDD<T> {
        mapPartitionsWithIndex(preservesPartitioning: true) { i, xs, _ in
            var rng = SplitMix(seed: seed &+ UInt64(i) &* 0x9E37_79B9)
            var out: [T] = []
            for x in xs {
                if withReplacement {
                    // Knuth's Poisson draw with mean `fraction`.
                    let l = exp(-fraction)
                    var k = 0
                    var p = 1.0
                    repeat { k += 1; p *= rng.unit() } while p > l
                    for _ in 0..<(k - 1) { out.append(x) }
                } else if rng.unit() < fraction {
                    out.append(x)
                }
            }
            return out
        }.setName("sample")
    }

    public final func union(_ other: RDD<T>) -> RDD<T> { UnionRDD([self, other]) }

    /// One small job counts each partition to find its offset; it runs
    /// here, as in Spark, and its failure is this call's.
    public final func zipWithIndex() throws -> RDD<(T, Int)> {
        let counts = try context.runJob(self) { $0.count }
        var offsets: [Int] = []
        var acc = 0
        for c in counts {
            offsets.append(acc)
            acc += c
        }
        return mapPartitionsWithIndex { i, xs, _ in xs.enumerated().map { ($0.element, offsets[i] + $0.offset) } }.setName("zipWithIndex")
    }

    public final func zip<U>(_ other: RDD<U>) -> RDD<(T, U)> { ZippedRDD(self, other) }

    public final func cartesian<U>(_ other: RDD<U>) -> RDD<(T, U)> { CartesianRDD(self, other) }

    /// Fewer partitions without a shuffle: each new partition concatenates a
    /// run of parent partitions.
    public final func coalesce(_ n: Int) -> RDD<T> {
        precondition(n > 0, "coalesce to at least one partition")
        if n >= numPartitions { return self }
        return CoalescedRDD(self, n)
    }

    /// Any number of partitions, through a shuffle that spreads rows evenly.
    public final func repartition(_ n: Int) -> RDD<T> {
        mapPartitionsWithIndex { i, xs, _ in xs.enumerated().map { ((i * 7919 + $0.offset) % Swift.max(n, 1), $0.element) } }
            .partitionBy(HashPartitioner(n))
            .values()
            .setName("repartition")
    }

    public final func keyBy<K: Hashable>(_ f: @escaping (T) throws -> K) -> RDD<(K, T)> { map { (try f($0), $0) } }

    // MARK: Actions

    public final func collect() throws -> [T] { try context.runJob(self) { $0 }.flatMap { $0 } }

    public final func count() throws -> Int {
        try context.runStreamingJob(self, { each in
            var n = 0
            try each { _ in n += 1 }
            return n
        }).reduce(0, +)
    }

    public final func foreach(_ f: @escaping (T) throws -> Void) throws { _ = try context.runStreamingJob(self, { each in try each(f) }) }

    public final func reduce(_ f: @escaping (T, T) throws -> T) throws -> T {
        let partials = try context.runStreamingJob(self, { each -> T? in
            var acc: T?
            try each { x in acc = try acc.map { try f($0, x) } ?? x }
            return acc
        }).compactMap { $0 }
        guard var acc = partials.first else { throw WeftError(.invalidArgument, "reduce of an empty RDD") }
        for p in partials.dropFirst() { acc = try f(acc, p) }
        return acc
    }

    public final func fold(_ zero: T, _ f: @escaping (T, T) throws -> T) throws -> T {
        try aggregate(zero, f, f)
    }

    public final func aggregate<U>(_ zero: U, _ seqOp: @escaping (U, T) throws -> U, _ combOp: @escaping (U, U) throws -> U) throws -> U {
        try context.runStreamingJob(self, { each in
            var acc = zero
            try each { acc = try seqOp(acc, $0) }
            return acc
        }).reduce(zero, combOp)
    }

    /// The first `n` rows in partition order, scanning as few partitions as it can.
    public final func take(_ n: Int) throws -> [T] {
        var out: [T] = []
        var next = 0
        var batch = 1
        while out.count < n && next < numPartitions {
            let parts = Array(next..<Swift.min(numPartitions, next + batch))
            let need = n - out.count
            // Each task stops reading once it has `need` rows: a fused
            // chain (a text file, a merge) is not computed to its end.
            let chunks = try context.runStreamingJob(self, partitions: parts, { each -> [T] in
                var kept: [T] = []
                if need == 0 { return kept }
                do {
                    try each { x in
                        kept.append(x)
                        if kept.count >= need { throw EnoughRows() }
                    }
                } catch is EnoughRows {}
                return kept
            })
            for chunk in chunks {
                out += chunk.prefix(n - out.count)
            }
            next += parts.count
            batch *= 4
        }
        return out
    }

    public final func first() throws -> T {
        guard let x = try take(1).first else { throw WeftError(.invalidArgument, "first() of an empty RDD") }
        return x
    }

    public final func takeOrdered(_ n: Int, by less: @escaping (T, T) -> Bool) throws -> [T] {
        // Each task keeps at most about 2n rows: past that it sorts and
        // keeps the first n.
        let keepMax = n > (Int.max - 1024) / 2 ? Int.max : 2 * n + 1024
        let partials = try context.runStreamingJob(self, { each -> [T] in
            var kept: [T] = []
            try each { x in
                kept.append(x)
                if kept.count >= keepMax {
                    kept.sort(by: less)
                    kept.removeLast(kept.count - n)
                }
            }
            return Array(kept.sorted(by: less).prefix(n))
        })
        return Array(partials.flatMap { $0 }.sorted(by: less).prefix(n))
    }

    public final func top(_ n: Int, by less: @escaping (T, T) -> Bool) throws -> [T] {
        try takeOrdered(n) { less($1, $0) }
    }

    public final func takeSample(withReplacement: Bool, _ n: Int, seed: UInt64 = 42) throws -> [T] {
        let all = try collect()
        var rng = SplitMix(seed: seed)
        if withReplacement { return all.isEmpty ? [] : (0..<n).map { _ in all[Int(rng.next() % UInt64(all.count))] } }
        var xs = all
        for i in stride(from: xs.count - 1, to: 0, by: -1) { xs.swapAt(i, Int(rng.next() % UInt64(i + 1))) }
        return Array(xs.prefix(n))
    }

    /// The lineage, one RDD per line, indented at each shuffle (a stage
    /// boundary), with what is persisted.
    public final func toDebugString() -> String { context.debugString(self) }
}

extension RDD where T: Hashable {
    public func distinct(_ partitions: Int? = nil) -> RDD<T> {
        map { ($0, true) }.reduceByKey(partitions: partitions) { a, _ in a }.keys().setName("distinct")
    }

    public func countByValue() throws -> [T: Int] {
        try map { ($0, 1) }.countByKey()
    }
}

extension RDD where T: Comparable {
    public func sortBy<K: Comparable & Hashable>(ascending: Bool = true, partitions: Int? = nil, _ key: @escaping (T) -> K) throws -> RDD<T> {
        try keyBy(key).sortByKey(ascending: ascending, partitions: partitions).values()
    }
    public func top(_ n: Int) throws -> [T] { try top(n, by: <) }
    public func takeOrdered(_ n: Int) throws -> [T] { try takeOrdered(n, by: <) }
    public func max() throws -> T { try reduce { Swift.max($0, $1) } }
    public func min() throws -> T { try reduce { Swift.min($0, $1) } }
}

/// Thrown inside a streaming task to stop reading (`take`).
struct EnoughRows: Error {}

/// SplitMix64: small, seedable, and the same on every run.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func unit() -> Double { Double(next() >> 11) / Double(1 << 53) }
}

// MARK: Concrete RDDs

final class ParallelCollectionRDD<T>: RDD<T> {
    let slices: [[T]]
    init(_ ctx: DataflowContext, _ data: [T], _ n: Int) {
        let n = Swift.max(1, n)
        slices = (0..<n).map { i in Array(data[(data.count * i / n)..<(data.count * (i + 1) / n)]) }
        super.init(ctx, partitions: n, dependencies: [], name: "parallelize")
    }
    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [T] { slices[partition] }
}

final class MapPartitionsRDD<T, U>: RDD<U> {
    let parent: RDD<T>
    let f: (Int, [T], TaskContext) throws -> [U]
    init(parent: RDD<T>, f: @escaping (Int, [T], TaskContext) throws -> [U], name: String) {
        self.parent = parent
        self.f = f
        super.init(parent.context, partitions: parent.numPartitions, dependencies: [.narrow(parent, { [$0] })], name: name)
    }
    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [U] {
        try f(partition, try parent.iterator(partition, ctx), ctx)
    }
}

/// A row-by-row transformation (map, filter, flatMap, mapValues...).
/// Chains of these run fused: a row goes through every step before the
/// next row is read, and no array is built between steps.
final class ElementwiseRDD<T, U>: RDD<U> {
    let parent: RDD<T>
    let f: (T, (U) throws -> Void) throws -> Void
    init(parent: RDD<T>, name: String, _ f: @escaping (T, (U) throws -> Void) throws -> Void) {
        self.parent = parent
        self.f = f
        super.init(parent.context, partitions: parent.numPartitions, dependencies: [.narrow(parent, { [$0] })], name: name)
    }
    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [U] {
        var out: [U] = []
        try parent.push(partition, ctx) { x in try f(x) { out.append($0) } }
        return out
    }
    override func push(_ partition: Int, _ ctx: TaskContext, _ body: (U) throws -> Void) throws {
        try pushStreaming(partition, ctx, body) { emit in try parent.push(partition, ctx) { x in try f(x, emit) } }
    }
}

final class UnionRDD<T>: RDD<T> {
    let parents: [RDD<T>]
    let offsets: [Int]
    init(_ parents: [RDD<T>]) {
        self.parents = parents
        var offs: [Int] = []
        var acc = 0
        for p in parents {
            offs.append(acc)
            acc += p.numPartitions
        }
        offsets = offs
        let deps: [Dependency] = parents.enumerated().map { i, p in
            let start = offs[i]
            return .narrow(p, { j in (start..<start + p.numPartitions).contains(j) ? [j - start] : [] })
        }
        super.init(parents[0].context, partitions: acc, dependencies: deps, name: "union")
    }
    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [T] {
        let i = offsets.lastIndex { $0 <= partition }!
        return try parents[i].iterator(partition - offsets[i], ctx)
    }
}

final class CoalescedRDD<T>: RDD<T> {
    let parent: RDD<T>
    let groups: [[Int]]
    init(_ parent: RDD<T>, _ n: Int) {
        self.parent = parent
        let m = parent.numPartitions
        let gs = (0..<n).map { i in Array((m * i / n)..<(m * (i + 1) / n)) }
        groups = gs
        super.init(parent.context, partitions: n, dependencies: [.narrow(parent, { gs[$0] })], name: "coalesce")
    }
    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [T] {
        try groups[partition].flatMap { try parent.iterator($0, ctx) }
    }
}

final class ZippedRDD<T, U>: RDD<(T, U)> {
    let a: RDD<T>
    let b: RDD<U>
    init(_ a: RDD<T>, _ b: RDD<U>) {
        precondition(a.numPartitions == b.numPartitions, "zip needs the same number of partitions")
        self.a = a
        self.b = b
        super.init(a.context, partitions: a.numPartitions, dependencies: [.narrow(a, { [$0] }), .narrow(b, { [$0] })], name: "zip")
    }
    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [(T, U)] {
        let xs = try a.iterator(partition, ctx), ys = try b.iterator(partition, ctx)
        guard xs.count == ys.count else {
            throw WeftError(.invalidArgument, "zip: partition \(partition) has \(xs.count) rows on one side and \(ys.count) on the other")
        }
        return Array(Swift.zip(xs, ys))
    }
}

final class CartesianRDD<T, U>: RDD<(T, U)> {
    let a: RDD<T>
    let b: RDD<U>
    init(_ a: RDD<T>, _ b: RDD<U>) {
        self.a = a
        self.b = b
        let nb = b.numPartitions
        super.init(a.context, partitions: a.numPartitions * nb,
                   dependencies: [.narrow(a, { [$0 / Swift.max(nb, 1)] }), .narrow(b, { [$0 % Swift.max(nb, 1)] })], name: "cartesian")
    }
    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [(T, U)] {
        let nb = b.numPartitions
        let xs = try a.iterator(partition / nb, ctx), ys = try b.iterator(partition % nb, ctx)
        var out: [(T, U)] = []
        out.reserveCapacity(xs.count * ys.count)
        for x in xs { for y in ys { out.append((x, y)) } }
        return out
    }
}

/// Lines of a file by byte ranges: a partition owns the lines that start
/// inside its range [start, end).
final class TextFileRDD: RDD<String>, LineSource {
    let path: String
    let size: Int

    init(_ ctx: DataflowContext, path: String, size: Int, partitions: Int) {
        self.path = path
        self.size = size
        super.init(ctx, partitions: partitions, dependencies: [], name: "textFile(\(path))")
    }

    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [String] {
        var lines: [String] = []
        try push(partition, ctx) { lines.append($0) }
        return lines
    }

    /// Bytes read from the file at a time: a task never holds more of it.
    var readChunkBytes = 4 << 20

    override func push(_ partition: Int, _ ctx: TaskContext, _ body: (String) throws -> Void) throws {
        if materializes {
            for x in try iterator(partition, ctx) { try body(x) }
            return
        }
        try forEachLine(partition) { try body(String(decoding: $0, as: UTF8.self)) }
    }

    /// The partition's lines as bytes (no newline), for parsers that need
    /// no String: valid only during the call.
    func forEachLine(_ partition: Int, _ body: (UnsafeRawBufferPointer) throws -> Void) throws {
        context.noteComputed(rdd: id, partition: partition)
        let start = size * partition / numPartitions, end = size * (partition + 1) / numPartitions
        guard start < end else { return }
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw WeftError(.notFound, "cannot read \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        // Partitions were cut by the size seen when the RDD was made: a
        // file that changed since would be read short or twice.
        var st = stat()
        guard fstat(fd, &st) == 0, Int(st.st_size) == size else {
            throw WeftError(.invalidArgument, "\(path) changed size since the job started (was \(size) bytes); its lines cannot be read consistently")
        }
        // A line belongs to this partition if it starts at an offset in
        // [start, end). Read one byte before `start` to know whether a line
        // starts there, and go past `end` to finish the last line.
        var offset = Swift.max(0, start - 1)
        var pending = Bytes()          // an unfinished line carried across chunks
        var lineStart = -1             // absolute offset where `pending` starts; -1: skipping
        if start == 0 { lineStart = 0 }
        var atFirstByte = start > 0
        // One buffer, reused for every chunk.
        var buffer = Bytes(repeating: 0, count: readChunkBytes)
        while true {
            let got = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, readChunkBytes, off_t(offset)) }
            if got < 0 { throw WeftError(.storage, "reading \(path): \(String(cString: strerror(errno)))") }
            if got == 0 { break }
            let chunk = buffer[0..<got]
            var done = false
            try chunk.withUnsafeBytes { (buf: UnsafeRawBufferPointer) in
                var i = 0
                if atFirstByte {
                    // The byte before `start`: a newline there means a line starts at `start`.
                    if buf[0] == 10 { lineStart = start }
                    i = 1
                    atFirstByte = false
                }
                while i < buf.count {
                    guard let found = memchr(buf.baseAddress! + i, 10, buf.count - i) else {
                        if lineStart >= 0 { pending.append(contentsOf: buf[i...]) }
                        i = buf.count
                        break
                    }
                    let nl = buf.baseAddress!.distance(to: UnsafeRawPointer(found))
                    if lineStart >= 0 {
                        if pending.isEmpty {
                            try body(UnsafeRawBufferPointer(rebasing: buf[i..<nl]))
                        } else {
                            pending.append(contentsOf: buf[i..<nl])
                            try pending.withUnsafeBytes { try body($0) }
                            pending.removeAll(keepingCapacity: true)
                        }
                    }
                    // The next line starts after this newline; it is ours if it starts before `end`.
                    let next = offset + nl + 1
                    if next >= end { done = true; return }
                    lineStart = next
                    i = nl + 1
                }
            }
            if done { return }
            offset += got
        }
        // The file's last line has no newline.
        if lineStart >= 0 && lineStart < end && !pending.isEmpty { try pending.withUnsafeBytes { try body($0) } }
    }
}

/// Rows parsed from lines, handed on as they are parsed (fused like an
/// element-wise step). Over a text file that nothing keeps, the parser
/// reads the file's bytes with no String per line.
final class LineParserRDD<U>: RDD<U> {
    let parent: RDD<String>
    let parse: (UnsafeRawBufferPointer, TaskContext, (U) throws -> Void) throws -> Void
    init(parent: RDD<String>, name: String, _ parse: @escaping (UnsafeRawBufferPointer, TaskContext, (U) throws -> Void) throws -> Void) {
        self.parent = parent
        self.parse = parse
        super.init(parent.context, partitions: parent.numPartitions, dependencies: [.narrow(parent, { [$0] })], name: name)
    }
    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [U] {
        // (`iterator` has counted this computation.)
        var out: [U] = []
        try run(partition, ctx) { out.append($0) }
        return out
    }
    override func push(_ partition: Int, _ ctx: TaskContext, _ body: (U) throws -> Void) throws {
        try pushStreaming(partition, ctx, body) { try run(partition, ctx, $0) }
    }
    private func run(_ partition: Int, _ ctx: TaskContext, _ body: (U) throws -> Void) throws {
        if let source = parent as? LineSource, !source.materializes {
            try source.forEachLine(partition) { try parse($0, ctx, body) }
        } else {
            try parent.push(partition, ctx) { line in
                var line = line
                try line.withUTF8 { try parse(UnsafeRawBufferPointer($0), ctx, body) }
            }
        }
    }
}

/// Maximal runs of non-whitespace, like Python's `str.split()`: ASCII
/// whitespace (and 0x1c-0x1f) by byte, other Unicode whitespace by scalar.
public func whitespaceTokens(_ line: String) -> [String] {
    var out: [String] = []
    forEachWhitespaceToken(line) { out.append($0) }
    return out
}

/// The tokens of `whitespaceTokens`, handed to `body` one at a time.
public func forEachWhitespaceToken(_ line: String, _ body: (String) throws -> Void) rethrows {
    var line = line
    line.makeContiguousUTF8()
    try line.utf8.withContiguousStorageIfAvailable { try forEachWhitespaceToken($0, body) }
}

/// The same over a line's UTF-8 bytes.
func forEachWhitespaceToken(_ buf: UnsafeBufferPointer<UInt8>, _ body: (String) throws -> Void) rethrows {
    do {
        func token(_ a: Int, _ b: Int) -> String { String(decoding: UnsafeBufferPointer(rebasing: buf[a..<b]), as: UTF8.self) }
        var i = 0, start = -1
        let n = buf.count
        while i < n {
            let b = buf[i]
            var ws = false
            var width = 1
            if b < 0x80 {
                ws = b == 32 || (b >= 9 && b <= 13) || (b >= 28 && b <= 31)
            } else {
                width = b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : 2
                // Only real continuation bytes belong to the character
                // (raw file bytes may be invalid UTF-8).
                var k = 1
                while k < width && i + k < n && buf[i + k] & 0xC0 == 0x80 { k += 1 }
                if k < width { width = 1 }
                if width > 1, let s = String(decoding: UnsafeBufferPointer(rebasing: buf[i..<i + width]), as: UTF8.self).unicodeScalars.first {
                    ws = s.properties.isWhitespace
                }
            }
            if ws {
                if start >= 0 { try body(token(start, i)); start = -1 }
            } else if start < 0 {
                start = i
            }
            i += width
        }
        if start >= 0 { try body(token(start, n)) }
    }
}
