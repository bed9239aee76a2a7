import Foundation
import WeftCore

/// `CombineMap` over any `Hashable` key, for keys that are neither `Int`
/// nor `String`: a `Dictionary` from key to entry index.
struct HashedMap<Key: Hashable, Value>: CombineMap {
    private var index: [Key: Int]
    private(set) var keys: [Key] = []
    var values: [Value] = []

    init(capacity: Int = 64) { index = Dictionary(minimumCapacity: capacity) }

    var count: Int { keys.count }

    @inline(__always)
    func probe(_ k: Key) -> (entry: Int, at: Void) { (index[k] ?? -1, ()) }

    @discardableResult
    mutating func insert(_ k: Key, _ v: Value, at: Void) -> Int {
        index[k] = keys.count
        keys.append(k)
        values.append(v)
        return keys.count - 1
    }
}

/// The reduce side's merge table, bounded by the context's memory pool:
/// Spark's ExternalAppendOnlyMap. Combiners are merged in a `CombineMap`;
/// when the pool refuses the table more memory, the table is written out
/// as a run sorted by key hash, in batches, and emptied. At the end the
/// runs and what is left in memory are merged batch by batch, keys of
/// equal hash gathered and merged by `==`, so memory holds one batch per
/// run rather than the whole partition. Without a codec (types that
/// cannot be written) the table stays in memory, counted as unspillable.
struct ExternalMerger<K: Hashable, C, M: CombineMap> where M.Value == C {
    let sc: DataflowContext
    let codec: BlockCodec<(K, C)>?
    let mergeCombiners: (inout C, C) -> Void
    /// Bytes a combiner holds beyond its inline size (a group's array),
    /// counted as it grows; nil when combiners do not grow.
    let combinerBytes: ((C) -> Int)?
    let tag: String
    let rowBytes = MemoryLayout<K>.stride + MemoryLayout<C>.stride + 32

    /// A batch of a run ends at this many rows or `batchBytes` estimated
    /// bytes, whichever comes first: what a merge holds of each run.
    static var batchRows: Int { 1024 }
    /// A thousandth of the pool, between 4 and 64 KiB: small pools get
    /// small batches, so a merge can still read many runs at once.
    var batchBytes: Int { Swift.max(4 << 10, Swift.min(64 << 10, sc.memory.capacity / 1024)) }
    /// Growth between two requests to the memory pool: 256 KiB, or a
    /// sixteenth of a smaller pool (at least 4 KiB).
    let reserveStep: Int
    /// The shuffle being read, whose outputs are not demoted to make room.
    let sparing: Int

    private var map = M(capacity: 64)
    private var held = 0
    private var pending = 0
    private var runs: [SpillRun] = []
    private var unusable = false

    init(sc: DataflowContext, codec: BlockCodec<(K, C)>?, tag: String, mergeCombiners: @escaping (inout C, C) -> Void,
         combinerBytes: ((C) -> Int)?, sparing: Int = -1) {
        self.sc = sc
        self.sparing = sparing
        reserveStep = Swift.max(4 << 10, Swift.min(256 << 10, sc.memory.capacity / 16))
        self.codec = codec
        self.tag = tag
        self.mergeCombiners = mergeCombiners
        self.combinerBytes = combinerBytes
    }

    var spilledRuns: Int { runs.count }

    mutating func insert(_ k: K, _ c: C) throws {
        let merge = mergeCombiners
        if map.upsert(unsafeBitCast(k, to: M.Key.self), { c }, { merge(&$0, c) }) {
            pending += rowBytes + (combinerBytes?(c) ?? 0)
        } else if let size = combinerBytes {
            pending += size(c)
        }
        if pending >= reserveStep { try reserveOrSpill() }
    }

    /// Merges one value (not a combiner) into its key's combiner.
    mutating func insert<V>(_ k: K, _ v: V, _ agg: Aggregator<V, C>) throws {
        if map.upsert(unsafeBitCast(k, to: M.Key.self), { agg.createCombiner(v) }, { agg.mergeValue(&$0, v) }) {
            pending += rowBytes
        } else if agg.combinerBytes != nil {
            pending += MemoryLayout<V>.stride
        }
        if pending >= reserveStep { try reserveOrSpill() }
    }

    private mutating func reserveOrSpill() throws {
        let n = pending
        pending = 0
        var ok = sc.memory.tryAcquire(n)
        while !ok && sc.shuffles.demote(n, sparing: sparing) { ok = sc.memory.tryAcquire(n) }
        if ok {
            held += n
            return
        }
        if let codec, !unusable, map.count > 0 {
            if codec.accepts((unsafeBitCast(map.keys[0], to: K.self), map.values[0])) {
                try spill(codec)
                return
            }
            unusable = true
        }
        // Nothing to spill with: hold it anyway, and say so.
        sc.memory.force(n)
        held += n
        sc.metric { $0.unspillableBytes += n }
    }

    /// The table's entries in key-hash order.
    private func sortedByHash() -> [(hash: Int, entry: Int)] {
        var order = (0..<map.count).map { (unsafeBitCast(map.keys[$0], to: K.self).hashValue, $0) }
        order.sort { $0.0 < $1.0 }
        return order
    }

    private mutating func spill(_ codec: BlockCodec<(K, C)>) throws {
        let order = sortedByHash()
        var w = ByteWriter(capacity: 1 << 16)
        var offsets = [0]
        var i = 0
        while i < order.count {
            // Up to batchRows rows or batchBytes estimated bytes (a group
            // counts its array), at least one row.
            var end = i, bytes = 0
            while end < order.count && end - i < Self.batchRows && (end == i || bytes < batchBytes) {
                bytes += rowBytes + (combinerBytes?(map.values[order[end].entry]) ?? 0)
                end += 1
            }
            let batch = order[i..<end]
            SpillFormat.encode(batch.lazy.map { [map] in (unsafeBitCast(map.keys[$0.entry], to: K.self), map.values[$0.entry]) }, count: batch.count, codec, into: &w)
            offsets.append(w.bytes.count)
            i = end
        }
        let file = try sc.spillDirectory.write(w.bytes, tag: tag)
        runs.append(SpillRun(file: file, offsets: offsets))
        map = M(capacity: 64)
        sc.memory.release(held)
        held = 0
        sc.metric {
            $0.bytesSpilled += w.bytes.count
            $0.spillFiles += 1
            $0.mergeSpillFiles += 1
        }
    }

    /// Most sources one merge reads at once, each through one batch: a
    /// quarter of the pool in batches, between 2 and 256 (256 for the
    /// default 512 MiB pool, 128 for 2 MiB, 4 for 64 KiB).
    var fanIn: Int { Swift.max(2, Swift.min(256, sc.memory.capacity / (4 * batchBytes))) }

    /// Hands every key with its merged combiner to `emit`, then frees the
    /// table's memory and removes its runs (also when `emit` throws).
    /// With more runs than one merge may read, the oldest are first merged
    /// into one run, `fanIn` at a time, until the runs and the table fit.
    mutating func finish(_ emit: ((K, C)) throws -> Void) throws {
        defer { release() }
        guard let codec, !runs.isEmpty else {
            for i in 0..<map.count { try emit((unsafeBitCast(map.keys[i], to: K.self), map.values[i])) }
            return
        }
        while runs.count + 1 > fanIn {
            // Merging g runs leaves g - 1 fewer: no more than needed. Taken
            // oldest first, merged runs go last, so merges form a tree.
            let group = Array(runs.prefix(Swift.min(fanIn, runs.count + 2 - fanIn)))
            let merged = try mergeRuns(group, codec)
            runs.removeFirst(group.count)
            runs.append(merged)
            for r in group { sc.spillDirectory.remove(r.file) }
        }
        // Sources in hash order: each run, and the table in memory.
        var sources: [MergeSource] = runs.map { MergeSource(run: $0) }
        let order = sortedByHash()
        var memory = MergeSource(run: nil)
        memory.rows = order.map { (unsafeBitCast(map.keys[$0.entry], to: K.self), map.values[$0.entry]) }
        memory.hashes = order.map(\.hash)
        map = M(capacity: 64)   // its rows now live in `memory`
        sources.append(memory)
        try merge(&sources, codec) { _, k, c in try emit((k, c)) }
    }

    /// Merges runs into one new run, written batch by batch.
    private func mergeRuns(_ group: [SpillRun], _ codec: BlockCodec<(K, C)>) throws -> SpillRun {
        var sources = group.map { MergeSource(run: $0) }
        let out = try SpillFileWriter(sc.spillDirectory.newFile(tag: tag))
        var offsets = [0]
        var batch: [(K, C)] = []
        var bytes = 0
        func flush() throws {
            if batch.isEmpty { return }
            var w = ByteWriter(capacity: bytes + 64)
            SpillFormat.encode(batch, count: batch.count, codec, into: &w)
            try out.append(w.bytes)
            offsets.append(out.size)
            batch.removeAll(keepingCapacity: true)
            bytes = 0
        }
        do {
            try merge(&sources, codec) { _, k, c in
                batch.append((k, c))
                bytes += rowBytes + (combinerBytes?(c) ?? 0)
                if batch.count >= Self.batchRows || bytes >= batchBytes { try flush() }
            }
            try flush()
            out.close()
        } catch {
            out.close()
            sc.spillDirectory.remove(out.file)
            throw error
        }
        let size = out.size
        sc.metric {
            $0.bytesSpilled += size
            $0.spillFiles += 1
            $0.mergeSpillFiles += 1
            $0.mergePasses += 1
        }
        return SpillRun(file: out.file, offsets: offsets)
    }

    /// Merges sources that are each in hash order: a heap picks the least
    /// hash, the rows of that hash are gathered from every source holding
    /// it and merged by `==`, and each key goes to `emit` with its hash.
    /// It holds one batch per source, at most `fanIn` batches (a quarter
    /// of the pool, or 8 KiB for the smallest pools), not counted in the
    /// pool.
    private func merge(_ sources: inout [MergeSource], _ codec: BlockCodec<(K, C)>, _ emit: (Int, K, C) throws -> Void) throws {
        var heap = MergeHeap()
        for s in sources.indices {
            try sources[s].fill(sc, codec)
            if sources[s].pos < sources[s].rows.count { heap.push(sources[s].hashes[sources[s].pos], s) }
        }
        var group: [(K, C)] = []
        var holding: [Int] = []
        while let (hash, first) = heap.pop() {
            holding.removeAll(keepingCapacity: true)
            holding.append(first)
            while let top = heap.top, top.hash == hash { holding.append(heap.pop()!.source) }
            group.removeAll(keepingCapacity: true)
            for s in holding {
                while sources[s].pos < sources[s].rows.count && sources[s].hashes[sources[s].pos] == hash {
                    let (k, c) = sources[s].rows[sources[s].pos]
                    if let g = group.firstIndex(where: { $0.0 == k }) { mergeCombiners(&group[g].1, c) } else { group.append((k, c)) }
                    sources[s].pos += 1
                    if sources[s].pos == sources[s].rows.count { try sources[s].fill(sc, codec) }
                }
                if sources[s].pos < sources[s].rows.count { heap.push(sources[s].hashes[sources[s].pos], s) }
            }
            for (k, c) in group { try emit(hash, k, c) }
        }
    }

    /// Frees the memory and spill files; the merger is empty after.
    mutating func release() {
        sc.memory.release(held)
        held = 0
        map = M(capacity: 64)
        for r in runs { sc.spillDirectory.remove(r.file) }
        runs = []
    }

    /// One run (or the in-memory table) being merged: its current batch.
    private struct MergeSource {
        let run: SpillRun?
        var batch = 0
        var rows: [(K, C)] = []
        var hashes: [Int] = []
        var pos = 0
        /// The run's file, open while it is read.
        var reader: SpillFileReader?

        init(run: SpillRun?) { self.run = run }

        /// Loads the next batch once the current one is used up.
        mutating func fill(_ sc: DataflowContext, _ codec: BlockCodec<(K, C)>) throws {
            guard pos == rows.count, let run, batch + 1 < run.offsets.count else {
                if pos == rows.count { reader = nil }
                return
            }
            if reader == nil { reader = try SpillFileReader(run.file) }
            let bytes = try reader!.read(from: run.offsets[batch], to: run.offsets[batch + 1])
            batch += 1
            rows = try SpillFormat.decodeAll(bytes[...], codec)
            hashes = rows.map { $0.0.hashValue }
            pos = 0
        }
    }
}

/// A binary min-heap of (hash, source), for the k-way merge of runs.
struct MergeHeap {
    private var items: [(hash: Int, source: Int)] = []

    var top: (hash: Int, source: Int)? { items.first }

    private static func less(_ a: (hash: Int, source: Int), _ b: (hash: Int, source: Int)) -> Bool {
        a.hash < b.hash || (a.hash == b.hash && a.source < b.source)
    }

    mutating func push(_ hash: Int, _ source: Int) {
        items.append((hash, source))
        var i = items.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            guard Self.less(items[i], items[parent]) else { break }
            items.swapAt(i, parent)
            i = parent
        }
    }

    mutating func pop() -> (hash: Int, source: Int)? {
        guard let first = items.first else { return nil }
        let last = items.removeLast()
        if !items.isEmpty {
            items[0] = last
            var i = 0
            while true {
                let l = 2 * i + 1, r = l + 1
                var m = i
                if l < items.count && Self.less(items[l], items[m]) { m = l }
                if r < items.count && Self.less(items[r], items[m]) { m = r }
                if m == i { break }
                items.swapAt(i, m)
                i = m
            }
        }
        return first
    }
}
