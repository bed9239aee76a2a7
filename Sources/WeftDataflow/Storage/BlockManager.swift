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
