import WeftCore

/// An in-memory multi-version store for one participant's partition.
///
/// Layout (chosen so that 1M small keys cost well under 2x their raw bytes):
/// - key and value bytes live in an append-only `Arena` of large chunks and are
///   named by a 64-bit reference, so a key costs no per-object header;
/// - `entries[i]` holds a key's newest version inline and links older ones
///   through `older` (newest first);
/// - an open-addressing hash table of entry indices serves point reads;
/// - `chunks`, sorted runs of entry indices (a two-level B-tree: each run
///   holds `chunkMax` to 2 `chunkMax` entries), order entries by key for
///   scans. A new key is inserted into its run, O(log n) comparisons and a
///   short move; a bulk load collects new keys in `pending` and merges them
///   in once.
///
/// Invariants: versions of a key are applied in strictly increasing timestamp
/// order; an entry that garbage collection removed is `dead` and is never
/// returned, and is dropped from the ordered index when enough of them
/// gather (it stays in the hash table so a new version revives it). The arena only
/// counts the bytes of collected versions (`Arena.deadBytes`); it does not
/// reclaim them yet.
/// Empty arena chunks (capacity `MVCCStore.arenaChunkBytes`, count 0)
/// made ready ahead of time: during recovery a runtime thread faults their
/// pages in while the replay copies values into the previous one.
public protocol ArenaChunkSource: AnyObject, Sendable {
    /// A ready chunk, or nil (the caller then allocates one itself).
    func take() -> [UInt8]?
}

public struct MVCCStore: Sendable {
    /// Bytes per arena chunk.
    public static let arenaChunkBytes = 8 << 20
    /// While set, new arena chunks are taken from it (see `ArenaChunkSource`).
    public var chunkSource: ArenaChunkSource? {
        get { arena.source }
        set { arena.source = newValue }
    }

    /// Marks a deletion in `valueRef`.
    static let tombstone = UInt64.max

    struct Entry {
        var keyRef: UInt64
        var ts: Timestamp
        var valueRef: UInt64
        var older: Int32
        var dead: Bool
    }

    struct OldVersion {
        var ts: Timestamp
        var valueRef: UInt64
        var next: Int32
    }

    var arena = Arena()
    var entries: [Entry] = []
    var oldVersions: [OldVersion] = []
    var freeOld: [Int32] = []
    /// Open addressing: each used slot holds the key's 32-bit hash (high
    /// half) and its entry index (low half), so a probe compares hashes
    /// before it touches a key, and growing never reads the keys.
    var slots: [UInt64] = Array(repeating: MVCCStore.emptySlot, count: 1024)
    static let emptySlot = UInt64.max
    /// The ordered index: runs of entry indices, each sorted by key, every
    /// key of a run below every key of the next.
    var chunks: [[Int32]] = []
    /// Entries in `chunks`.
    var indexed = 0
    /// New keys of a bulk load, unsorted, until `endBulkLoad`.
    var pending: [Int32] = []
    /// Whether each entry is in `chunks` or `pending`.
    var ordered: [Bool] = []
    /// Entries per run after a split or a rebuild; a run splits at twice this.
    static let chunkMax = 512
    /// Dead entries still in the ordered index.
    var deadInOrder = 0
    /// True between `beginBulkLoad` and `endBulkLoad`: `pending` is unsorted.
    var bulk = false
    /// What garbage collection must visit: (entry, ts) when the entry got
    /// a version at `ts` over an older one, or a tombstone as its newest
    /// version. A collection at horizon H takes the items up to H and
    /// keeps the rest, so its cost follows the writes of the retention
    /// window, not the size of the store.
    var gcQueue: [(entry: Int32, ts: Timestamp)] = []
    public private(set) var liveKeys = 0
    public private(set) var deadEntries = 0

    public init() {}

    // MARK: Reads

    /// The timestamp of the newest version of `key`, or 0 if it has none.
    public func latestTs(_ key: Bytes) -> Timestamp {
        guard let i = find(key) else { return 0 }
        return entries[Int(i)].ts
    }

    /// The version of `key` visible at `ts`: its value (nil if absent or
    /// deleted) and the timestamp of that version (0 if none).
    public func read(_ key: Bytes, at ts: Timestamp) -> (value: Bytes?, version: Timestamp) {
        guard let i = find(key) else { return (nil, 0) }
        guard let (vts, ref) = visible(entries[Int(i)], at: ts) else { return (nil, 0) }
        return (ref == Self.tombstone ? nil : arena.copy(ref), vts)
    }

    func visible(_ e: Entry, at ts: Timestamp) -> (Timestamp, UInt64)? {
        if e.dead { return nil }
        if e.ts <= ts { return (e.ts, e.valueRef) }
        var j = e.older
        while j >= 0 {
            let o = oldVersions[Int(j)]
            if o.ts <= ts { return (o.ts, o.valueRef) }
            j = o.next
        }
        return nil
    }

    /// Visits live keys in order, starting at the first key >= `start`,
    /// while `visit` returns true. Deleted keys and keys with no version at
    /// `ts` are skipped.
    public mutating func scan(from start: Bytes, at ts: Timestamp, _ visit: (Bytes, Bytes, Timestamp) -> Bool) {
        precondition(!bulk, "scan during a bulk load")
        var (c, pos) = start.withUnsafeBytes { orderedLowerBound($0) }
        while c < chunks.count {
            let chunk = chunks[c]
            while pos < chunk.count {
                let e = entries[Int(chunk[pos])]
                pos += 1
                guard let (vts, ref) = visible(e, at: ts), ref != Self.tombstone else { continue }
                if !visit(arena.copy(e.keyRef), arena.copy(ref), vts) { return }
            }
            c += 1
            pos = 0
        }
    }

    // MARK: Writes

    /// Installs a version. `ts` must be newer than every version of `key`.
    public mutating func apply(key: Bytes, value: Bytes?, ts: Timestamp) {
        key.withUnsafeBytes { k in
            if let value {
                value.withUnsafeBytes { v in apply(key: k, value: v, ts: ts) }
            } else {
                apply(key: k, value: nil, ts: ts)
            }
        }
    }

    /// The same from borrowed bytes (recovery replays records straight
    /// from the LMDB map, copying each key and value once, into the arena).
    public mutating func apply(key: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer?, ts: Timestamp) {
        let newest = applyIfNewer(key: key, value: value, ts: ts)
        precondition(newest == nil, "MVCCStore: version \(ts) is not newer than \(newest ?? 0)")
    }

    /// `apply`, unless the key already has a version at or above `ts`:
    /// then nothing changes and that version is returned (recovery turns
    /// it into an error naming the damaged record, not a trap).
    public mutating func applyIfNewer(key: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer?, ts: Timestamp) -> Timestamp? {
        let found = find(key)
        if let i = found, entries[Int(i)].ts >= ts { return entries[Int(i)].ts }
        let valueRef = value.map { arena.append($0) } ?? Self.tombstone
        if let i = found {
            var e = entries[Int(i)]
            if e.dead {
                e.dead = false
                deadEntries -= 1
                liveKeys += 1
                e.older = -1
                if value == nil { gcQueue.append((i, ts)) }
                // Compaction drops dead entries from the ordered index: put it back.
                if inOrder(i) {
                    deadInOrder -= 1
                } else {
                    ordered[Int(i)] = true
                    if bulk { pending.append(i) } else { insertOrdered(i) }
                }
            } else {
                let slot = allocOld(OldVersion(ts: e.ts, valueRef: e.valueRef, next: e.older))
                e.older = slot
                gcQueue.append((i, ts))
            }
            e.ts = ts
            e.valueRef = valueRef
            entries[Int(i)] = e
            return nil
        }
        let keyRef = arena.append(key)
        let index = Int32(entries.count)
        entries.append(Entry(keyRef: keyRef, ts: ts, valueRef: valueRef, older: -1, dead: false))
        ordered.append(true)
        liveKeys += 1
        if value == nil { gcQueue.append((index, ts)) }
        insertSlot(index, hash: keyHash(key))
        if bulk { pending.append(index) } else { insertOrdered(index) }
        return nil
    }

    /// Installs the writes of one commit at `ts`. A write set of at least
    /// `mergeBound` goes in as a bulk load: its new keys are sorted once and
    /// merged into the order in one pass (a 450,000-row job output took
    /// 19 s to apply one key at a time with the old sorted array). Inside a
    /// bulk load (replay) the writes just join it.
    public mutating func apply(_ writes: [WriteOp], ts: Timestamp) {
        let batch = !bulk && writes.count >= mergeBound
        if batch { beginBulkLoad() }
        for w in writes { apply(key: w.key, value: w.value, ts: ts) }
        if batch { endBulkLoad() }
    }

    /// Bulk loading (recovery): new keys are appended unsorted and ordered
    /// once by `endBulkLoad`, instead of O(sqrt n) merges along the way.
    public mutating func beginBulkLoad() {
        precondition(!bulk)
        bulk = true
    }

    public mutating func endBulkLoad() {
        precondition(bulk)
        bulk = false
        rebuildIndex(merging: pending)
        pending.removeAll(keepingCapacity: false)
    }

    /// The smallest commit applied as a bulk load: 1024 writes, or a 32nd
    /// of the index. A merge costs a comparison per indexed key, an
    /// insertion about 20 and a move within its run, so the merge wins
    /// only for a write set that large.
    var mergeBound: Int { max(1024, indexed / 32) }

    /// Drops versions no read at or after `horizon` can see. Returns, per
    /// commit timestamp, how many versions written at that timestamp were
    /// dropped, so the caller can release durable records nobody needs.
    public mutating func collectGarbage(horizon: Timestamp) -> [Timestamp: Int] {
        var dropped: [Timestamp: Int] = [:]
        var kept = 0
        for q in gcQueue.indices {
            let (i, ts) = gcQueue[q]
            if ts > horizon {
                gcQueue[kept] = (i, ts)
                kept += 1
                continue
            }
            var e = entries[Int(i)]
            if e.dead { continue }
            // Find the newest version with ts <= horizon; everything older goes.
            var keepFrom: Int32 = -1
            if e.ts <= horizon {
                keepFrom = e.older
                e.older = -1
            } else {
                var j = e.older
                while j >= 0 {
                    let o = oldVersions[Int(j)]
                    if o.ts <= horizon {
                        keepFrom = o.next
                        oldVersions[Int(j)].next = -1
                        break
                    }
                    j = o.next
                }
            }
            var j = keepFrom
            while j >= 0 {
                let o = oldVersions[Int(j)]
                dropped[o.ts, default: 0] += 1
                arena.release(o.valueRef)
                freeOld.append(j)
                j = o.next
            }
            // A key whose only version is an old tombstone disappears entirely.
            if e.older < 0 && e.valueRef == Self.tombstone && e.ts <= horizon {
                e.dead = true
                dropped[e.ts, default: 0] += 1
                deadEntries += 1
                deadInOrder += 1
                liveKeys -= 1
            }
            entries[Int(i)] = e
        }
        gcQueue.removeLast(gcQueue.count - kept)
        // Dead entries cost scans a skip each; past an eighth of the
        // index, one pass drops them.
        if !bulk && deadInOrder > 0 && deadInOrder * 8 >= max(indexed, 8192) { rebuildIndex(merging: []) }
        return dropped
    }

    /// Bytes held by keys, values and index structures.
    public var memoryBytes: Int {
        arena.capacityBytes + entries.capacity * MemoryLayout<Entry>.stride
            + oldVersions.capacity * MemoryLayout<OldVersion>.stride
            + slots.capacity * 8 + (indexed + chunks.count * Self.chunkMax / 2 + pending.capacity) * 4 + ordered.capacity
            + gcQueue.capacity * MemoryLayout<(entry: Int32, ts: Timestamp)>.stride
    }

    public var versionCount: Int { liveKeys + oldVersions.count - freeOld.count }

    // MARK: Internals

    mutating func allocOld(_ v: OldVersion) -> Int32 {
        if let s = freeOld.popLast() {
            oldVersions[Int(s)] = v
            return s
        }
        oldVersions.append(v)
        return Int32(oldVersions.count - 1)
    }

    func find(_ key: Bytes) -> Int32? {
        key.withUnsafeBytes { find($0) }
    }

    func find(_ k: UnsafeRawBufferPointer) -> Int32? {
        let mask = slots.count - 1
        let h = keyHash(k)
        var s = Int(h) & mask
        while true {
            let slot = slots[s]
            if slot == Self.emptySlot { return nil }
            if UInt32(truncatingIfNeeded: slot >> 32) == h {
                let i = Int32(truncatingIfNeeded: slot)
                if arena.withBytes(entries[Int(i)].keyRef, { compareBytes($0, k) == 0 }) { return i }
            }
            s = (s + 1) & mask
        }
    }

    mutating func insertSlot(_ index: Int32, hash h: UInt32) {
        if (entries.count) * 4 >= slots.count * 3 { growSlots() }
        let mask = slots.count - 1
        var s = Int(h) & mask
        while slots[s] != Self.emptySlot { s = (s + 1) & mask }
        slots[s] = UInt64(h) << 32 | UInt64(UInt32(bitPattern: index))
    }

    mutating func growSlots() {
        var bigger = [UInt64](repeating: Self.emptySlot, count: slots.count * 2)
        let mask = bigger.count - 1
        for slot in slots where slot != Self.emptySlot {
            var s = Int(slot >> 32) & mask
            while bigger[s] != Self.emptySlot { s = (s + 1) & mask }
            bigger[s] = slot
        }
        slots = bigger
    }

    func lowerBound(_ list: [Int32], _ k: UnsafeRawBufferPointer) -> Int {
        var lo = 0, hi = list.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if keyBelow(list[mid], k) { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    @inline(__always)
    func keyBelow(_ i: Int32, _ k: UnsafeRawBufferPointer) -> Bool {
        arena.withBytes(entries[Int(i)].keyRef) { compareBytes($0, k) < 0 }
    }

    /// The place of the first indexed key >= `k`: (run, position in it).
    /// Past the last key, (chunks.count, 0).
    func orderedLowerBound(_ k: UnsafeRawBufferPointer) -> (Int, Int) {
        // The first run that starts at or after k; the answer is in the run
        // before it, or is that run's start.
        var lo = 0, hi = chunks.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if keyBelow(chunks[mid][0], k) { lo = mid + 1 } else { hi = mid }
        }
        if lo == 0 { return (0, 0) }
        let p = lowerBound(chunks[lo - 1], k)
        return p < chunks[lo - 1].count ? (lo - 1, p) : (lo, 0)
    }

    /// Puts a new (or revived) entry into its run, splitting a full run.
    mutating func insertOrdered(_ i: Int32) {
        indexed += 1
        if chunks.isEmpty {
            chunks = [[i]]
            chunks[0].reserveCapacity(2 * Self.chunkMax)
            return
        }
        var (c, p) = arena.withBytes(entries[Int(i)].keyRef) { orderedLowerBound($0) }
        // A key past every run's end joins the last run.
        if c == chunks.count { (c, p) = (c - 1, chunks[c - 1].count) }
        chunks[c].insert(i, at: p)
        if chunks[c].count >= 2 * Self.chunkMax {
            var tail = Array(chunks[c][Self.chunkMax...])
            tail.reserveCapacity(2 * Self.chunkMax)
            chunks[c].removeSubrange(Self.chunkMax...)
            chunks.insert(tail, at: c + 1)
        }
    }

    /// Rebuilds the runs from the index in order merged with `extra`
    /// (unsorted new keys of a bulk load), dropping dead entries.
    mutating func rebuildIndex(merging extra: [Int32]) {
        let (arena, entries) = (arena, entries)
        var extra = extra
        // Local copies (no element is copied): a closure that captured
        // `self` would copy the whole store for each comparison.
        extra.sort { x, y in
            arena.withBytes(entries[Int(x)].keyRef) { kx in arena.withBytes(entries[Int(y)].keyRef) { ky in compareBytes(kx, ky) < 0 } }
        }
        var runs: [[Int32]] = []
        var run: [Int32] = []
        run.reserveCapacity(2 * Self.chunkMax)
        var count = 0
        func emit(_ i: Int32) {
            if entries[Int(i)].dead {
                ordered[Int(i)] = false
                return
            }
            run.append(i)
            count += 1
            if run.count == Self.chunkMax {
                runs.append(run)
                run = []
                run.reserveCapacity(2 * Self.chunkMax)
            }
        }
        var b = 0
        for chunk in chunks {
            for i in chunk {
                while b < extra.count, arena.withBytes(entries[Int(extra[b])].keyRef, { kb in
                    arena.withBytes(entries[Int(i)].keyRef) { ka in compareBytes(kb, ka) < 0 }
                }) {
                    emit(extra[b])
                    b += 1
                }
                emit(i)
            }
        }
        while b < extra.count {
            emit(extra[b])
            b += 1
        }
        if !run.isEmpty { runs.append(run) }
        chunks = runs
        indexed = count
        deadInOrder = 0
    }

    func inOrder(_ i: Int32) -> Bool { ordered[Int(i)] }
}

/// Append-only storage for byte strings, in chunks that never reallocate, so
/// a reference (chunk << 32 | offset) stays valid. Each blob is stored as a
/// LEB128 length (one byte for blobs under 128 bytes) followed by its bytes.
struct Arena: Sendable {
    static let chunkBytes = MVCCStore.arenaChunkBytes
    var chunks: [[UInt8]] = []
    /// Where new chunks come from while set (recovery: already faulted in).
    var source: ArenaChunkSource?
    var deadBytes = 0
    var capacityBytes = 0

    mutating func append(_ b: UnsafeRawBufferPointer) -> UInt64 {
        let need = b.count + 5
        if chunks.isEmpty || chunks[chunks.count - 1].count + need > chunks[chunks.count - 1].capacity {
            // Past the first chunk the store is big: its chunks ask for huge
            // pages, so filling them (recovery copies every value here)
            // takes one page fault per 2 MiB instead of per 4 KiB.
            let big = !chunks.isEmpty
            // Small stores get smaller chunks (less slack in the last one).
            let size = chunks.count < 4 ? Self.chunkBytes / 2 : Self.chunkBytes
            let c = (need <= Self.chunkBytes && chunks.count >= 4 ? source?.take() : nil)
                ?? [UInt8](unsafeUninitializedCapacity: Swift.max(size, need)) { buf, count in
                    if big, let base = buf.baseAddress { adviseHugePages(UnsafeMutableRawPointer(base), buf.count) }
                    count = 0
                }
            capacityBytes += c.capacity
            chunks.append(c)
        }
        let ci = chunks.count - 1
        let off = chunks[ci].count
        var len = UInt32(b.count)
        while len >= 0x80 {
            chunks[ci].append(UInt8(truncatingIfNeeded: len) | 0x80)
            len >>= 7
        }
        chunks[ci].append(UInt8(len))
        chunks[ci].append(contentsOf: b)
        return UInt64(ci) << 32 | UInt64(off)
    }

    func withBytes<R>(_ ref: UInt64, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        let ci = Int(ref >> 32)
        var off = Int(ref & 0xffff_ffff)
        return try chunks[ci].withUnsafeBytes { buf in
            var len = 0, shift = 0
            while true {
                let byte = buf[off]
                off += 1
                len |= Int(byte & 0x7f) << shift
                if byte < 0x80 { break }
                shift += 7
            }
            return try body(UnsafeRawBufferPointer(rebasing: buf[off..<off + len]))
        }
    }

    func copy(_ ref: UInt64) -> Bytes { withBytes(ref) { Bytes($0) } }

    mutating func release(_ ref: UInt64) {
        if ref == MVCCStore.tombstone { return }
        deadBytes += withBytes(ref) { $0.count } + 1
    }
}

extension MVCCStore {
    /// True if `key` has a version written exactly at `ts`.
    public func hasVersion(_ key: Bytes, at ts: Timestamp) -> Bool {
        guard let i = find(key) else { return false }
        let e = entries[Int(i)]
        if e.dead { return false }
        if e.ts == ts { return true }
        var j = e.older
        while j >= 0 {
            if oldVersions[Int(j)].ts == ts { return true }
            j = oldVersions[Int(j)].next
        }
        return false
    }
}

/// The in-memory hash of a key for the store's table (never stored on
/// disk): a multiply-fold over 8-byte words, 32 bits.
@inline(__always)
func keyHash(_ k: UnsafeRawBufferPointer) -> UInt32 {
    var h: UInt64 = 0x9E37_79B9_7F4A_7C15 ^ UInt64(k.count)
    var i = 0
    let n = k.count
    if let base = k.baseAddress {
        while i + 8 <= n {
            let w = base.loadUnaligned(fromByteOffset: i, as: UInt64.self)
            h = (h ^ w) &* 0xBF58_476D_1CE4_E5B9
            h ^= h >> 31
            i += 8
        }
        if i < n {
            var w: UInt64 = 0
            var shift: UInt64 = 0
            while i < n {
                w |= UInt64(base.load(fromByteOffset: i, as: UInt8.self)) << shift
                shift += 8
                i += 1
            }
            h = (h ^ w) &* 0x94D0_49BB_1331_11EB
        }
    }
    h ^= h >> 29
    h = h &* 0xBF58_476D_1CE4_E5B9
    h ^= h >> 32
    return UInt32(truncatingIfNeeded: h)
}
