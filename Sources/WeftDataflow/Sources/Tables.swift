import Foundation
import WeftCore
import WeftRuntime

/// Runs an async call to completion from a task thread (tasks run on
/// executor threads, outside Swift concurrency).
public func blocking<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) throws -> T {
    let sem = DispatchSemaphore(value: 0)
    let box = UncheckedBox(ResultHolder<T>())
    Task {
        do { box.value.result = .success(try await body()) } catch { box.value.result = .failure(error) }
        sem.signal()
    }
    sem.wait()
    return try box.value.result!.get()
}

final class ResultHolder<T>: @unchecked Sendable {
    var result: Result<T, Error>?
}

/// Tables live in the key-value store as blocks (`Blocks`). The catalog
/// entry `c/<t>` describes table `t` and names its current *generation*
/// `g`; the generation's rows are the block set `t:<t>@<g>`: `partitions`
/// partitions, each a sequence of immutable, checksummed blocks of rows
/// (`blocks=` in the entry lists how many per partition), every block on
/// `replicas` participants. A table snapshot is (table, commit timestamp):
/// the catalog entry at that timestamp names the generation and its
/// blocks, and blocks are immutable, so any partition can be read again
/// identically, which is the base case of lineage. A table is thus a
/// checkpointed dataset, stored like a reliably persisted RDD.
///
/// Writing a table writes a NEW generation's blocks (many transactions, in
/// parallel) and then flips the catalog entry to it in one transaction:
/// readers see the old table or the new one, never a mix. Blocks of a
/// generation no catalog entry names are invisible; the old generation's
/// blocks are deleted after the flip (older snapshots still read them, as
/// of their timestamp).
///
/// Rows keep their identity: a `lines` table's row key is its line number
/// (12 digits), kept as the block's first line number; a `kv` table's rows
/// carry their keys. Tables written before blocks existed (one store entry
/// per row, `t/<t>@<g>/<row>`, no `layout=` in the entry) are still read.
public enum TableStore {
    /// Rows per page when reading or deleting a table of the per-row layout.
    public static let rowsPageMax = 50_000

    public static func rowPrefix(_ table: String, generation: String = "") -> Bytes {
        Array((generation.isEmpty ? "t/\(table)/" : "t/\(table)@\(generation)/").utf8)
    }
    public static func blockSet(_ table: String, _ generation: String) -> String { "t:\(table)@\(generation)" }
    public static func catalogKey(_ table: String) -> Bytes { Array("c/\(table)".utf8) }
    /// Marks a generation whose blocks may be in the store without a
    /// catalog entry naming them: a load under way, or a replaced or
    /// dropped generation whose blocks are being deleted. Written before
    /// the first block (or with the catalog change), deleted once the
    /// blocks are visible or gone; `collectGarbage` finishes the job of a
    /// writer that died.
    static func pendingKey(_ table: String, _ generation: String) -> Bytes { Array("p/\(table)@\(generation)".utf8) }
    static func pendingValue(_ what: String) -> Bytes {
        Array("owner=\(WriterTag.current) at=\(Int64(Date().timeIntervalSince1970 * 1000)) \(what)".utf8)
    }

    public static func checkName(_ name: String) throws {
        let ok = !name.isEmpty && name.count <= 200 && name.unicodeScalars.allSatisfy { CharacterSet.alphanumerics.contains($0) || $0 == "_" || $0 == "-" || $0 == "." }
        if !ok { throw WeftError(.invalidArgument, "table name '\(name)' must be 1...200 letters, digits, '_', '-' or '.'") }
    }

    /// The 12-digit key of line `n` (1-based) of a `lines` table.
    public static func lineKey(_ n: UInt64) -> Bytes {
        var out = Bytes(repeating: 48, count: 12)
        var v = n, i = 11
        while v > 0 && i >= 0 {
            out[i] = 48 + UInt8(v % 10)
            v /= 10
            i -= 1
        }
        return v > 0 ? Array(String(n).utf8) : out
    }

    public struct Info: Sendable {
        public var name: String
        public var rows: Int
        public var format: String
        public var committedTs: Timestamp
        public var generation: String
        /// false: the per-row layout of older versions.
        public var blocks = false
        public var replicas = 1
        /// Blocks per partition.
        public var blockCounts: [Int] = []
        /// Written partition by partition (a job's output written by its
        /// tasks): rows are in partition order, not dealt in turn.
        public var partitionMajor = false
        /// Index of each partition's first block (the task attempt that won
        /// wrote from there; see `PartitionedOutput`); 0 when absent.
        public var blockBases: [Int] = []
        public func blockBase(_ partition: Int) -> Int { partition < blockBases.count ? blockBases[partition] : 0 }
        /// Stored bytes of one replica of every block.
        public var bytes = 0
        public var rowPrefix: Bytes { TableStore.rowPrefix(name, generation: generation) }
        public var blockSet: String { TableStore.blockSet(name, generation) }
        public var partitions: Int { blockCounts.count }
        public var blockCount: Int { blockCounts.reduce(0, +) }
        /// Partition and index of the table's `g`-th block in row order
        /// (blocks are dealt to partitions in turn as they are cut, or, for
        /// a table written partition by partition, partition after partition).
        public func block(_ g: Int) -> (partition: Int, index: Int) {
            guard partitionMajor else { return (g % partitions, g / partitions) }
            var g = g
            for (p, n) in blockCounts.enumerated() {
                if g < n { return (p, g) }
                g -= n
            }
            return (max(0, partitions - 1), g)
        }
    }

    public static func list(_ client: WeftClient, at ts: Timestamp? = nil) async throws -> [Info] {
        let (rows, _) = try await client.scan(prefix: Array("c/".utf8), limit: Limits.scanLimitMax, at: ts)
        return rows.map { parseInfo(name: String(decoding: $0.key.dropFirst(2), as: UTF8.self), $0.value, $0.version) }
    }

    public static func parseInfo(name: String, _ v: Bytes, _ version: Timestamp) -> Info {
        var i = Info(name: name, rows: 0, format: "kv", committedTs: version, generation: "")
        for f in String(decoding: v, as: UTF8.self).split(separator: " ") {
            let kv = f.split(separator: "=", maxSplits: 1)
            guard kv.count == 2 else { continue }
            switch kv[0] {
            case "rows": i.rows = Int(kv[1]) ?? 0
            case "format": i.format = String(kv[1])
            case "gen": i.generation = String(kv[1])
            case "layout": i.blocks = kv[1] == "blocks"
            case "replicas": i.replicas = Int(kv[1]) ?? 1
            case "bytes": i.bytes = Int(kv[1]) ?? 0
            case "blocks": i.blockCounts = kv[1].split(separator: ",").map { Int($0) ?? 0 }
            case "order": i.partitionMajor = kv[1] == "partitions"
            case "bases": i.blockBases = kv[1].split(separator: ",").map { Int($0) ?? 0 }
            default: break
            }
        }
        return i
    }

    static func catalogValue(rows: Int, format: String, generation: String, replicas: Int, counts: [Int], bytes: Int, bases: [Int]? = nil) -> Bytes {
        var v = "rows=\(rows) format=\(format) gen=\(generation) layout=blocks replicas=\(replicas) bytes=\(bytes) blocks=\(counts.map(String.init).joined(separator: ","))"
        if let bases { v += " order=partitions bases=\(bases.map(String.init).joined(separator: ","))" }
        return Array(v.utf8)
    }

    public static func info(_ client: WeftClient, _ name: String, at ts: Timestamp? = nil) async throws -> Info? {
        let (v, version) = try await client.get(catalogKey(name), at: ts)
        return v.map { parseInfo(name: name, $0, version) }
    }

    /// Writes a whole table as a new generation and makes it the table in
    /// one transaction: readers see all of it or none. A `lines` table
    /// takes the rows' values in order as its lines (their keys are the
    /// line numbers). An existing table is refused unless `overwrite`, and
    /// then replaced atomically. `progress(rowsWritten, rows)` after blocks.
    @discardableResult
    public static func write(_ client: WeftClient, _ name: String, rows: [(Bytes, Bytes)], format: String, overwrite: Bool,
                             replicas: Int = 1, progress: (@Sendable (Int, Int) -> Void)? = nil) async throws -> Timestamp {
        let w = try TableWriter(client: client, name: name, format: format, overwrite: overwrite, replicas: replicas)
        try await w.start()
        do {
            for (k, v) in rows {
                let sealed = try format == "lines" ? v.withUnsafeBytes { try w.addLine($0) } : w.addRow(k, v)
                if let sealed {
                    try await w.submit(sealed)
                    progress?(w.rowsSubmitted, rows.count)
                }
            }
            let ts = try await w.finish()
            progress?(rows.count, rows.count)
            return ts
        } catch {
            await w.abandon()
            throw error
        }
    }

    /// Makes a fully written generation the table, in one transaction
    /// (replacing the old one when overwriting, whose blocks are then
    /// deleted). `committing` runs just before the commit is sent: from then
    /// on the catalog may name the generation (a commit whose answer is lost
    /// may have happened), so its blocks must be left; if the flip did not
    /// happen, the "loading" marker stays and `table gc` collects them.
    static func flip(_ client: WeftClient, _ name: String, generation: String, overwrite: Bool, catalog: Bytes,
                     committing: () -> Void = {}) async throws -> Timestamp {
        let t = try await client.begin()
        let old = try await t.get(catalogKey(name)).map { parseInfo(name: name, $0, 0) }
        if old != nil && !overwrite {
            throw WeftError(.invalidArgument, "table \(name) already exists; pass --overwrite to replace it atomically")
        }
        // The blocks must all still be there: a `table gc` (with
        // --older-than, for a writer it could not see) may have taken them.
        guard try await t.get(pendingKey(name, generation)) != nil else {
            try? await Blocks.deleteSet(client, blockSet(name, generation))
            throw WeftError(.conflict, "loading table \(name): its blocks were collected by `weft table gc` meanwhile; load it again")
        }
        try t.delete(pendingKey(name, generation))
        try t.put(catalogKey(name), catalog)
        if let old { try t.put(pendingKey(name, old.generation), pendingValue("replaced")) }
        if CrashPoints.armed { CrashPoints.check("table.before-catalog-commit") }
        committing()
        let ts = try await t.commit()
        // The old generation is invisible from now on; deleting its blocks
        // is best effort (its "replaced" marker lets `table gc` finish).
        if let old { try? await retire(client, name, old.generation) }
        return ts
    }

    /// Deletes every row of the per-row layout under `prefix`.
    static func deleteRows(_ client: WeftClient, prefix: Bytes) async throws {
        try await Blocks.deleteKeys(client, prefix: prefix, page: rowsPageMax)
    }

    /// Drops a table: the catalog entry goes in one transaction (the table
    /// is gone for every later snapshot), then its blocks.
    public static func drop(_ client: WeftClient, _ name: String) async throws {
        // The catalog entry is read inside the transaction that deletes it:
        // a concurrent replace makes this commit conflict, not orphan blocks.
        let t = try await client.begin()
        guard let entry = try await t.get(catalogKey(name)) else { throw WeftError(.notFound, "unknown table \(name)") }
        let i = parseInfo(name: name, entry, 0)
        try t.delete(catalogKey(name))
        try t.put(pendingKey(name, i.generation), pendingValue("dropped"))
        try await t.commit()
        try await retire(client, name, i.generation)
    }

    /// Deletes a generation's blocks (and rows of the per-row layout),
    /// then its pending marker.
    static func retire(_ client: WeftClient, _ name: String, _ generation: String) async throws {
        try await deleteData(client, name, generation)
        _ = try await client.delete(pendingKey(name, generation))
    }

    static func deleteData(_ client: WeftClient, _ name: String, _ generation: String) async throws {
        try await Blocks.deleteSet(client, blockSet(name, generation))
        try await deleteRows(client, prefix: rowPrefix(name, generation: generation))
    }

    /// A generation that may have blocks no catalog entry names.
    public struct Pending: Sendable {
        public let table: String
        public let generation: String
        /// `loading`, `replaced` or `dropped`.
        public var state = ""
        public var owner: String?
        public var writtenMillis: Int64?
    }

    public static func pending(_ client: WeftClient) async throws -> [Pending] {
        // Paged per participant: any number of markers.
        let ts = try await client.now()
        var rows: [(key: Bytes, value: Bytes)] = []
        for part in 0..<client.participantCount {
            var from: Bytes? = nil
            while true {
                let (page, more) = try await client.scanParticipant(part, prefix: Array("p/".utf8), from: from, limit: 1000, at: ts)
                rows += page.map { (key: $0.key, value: $0.value) }
                guard more, let last = page.last else { break }
                from = last.key + [0]
            }
        }
        return rows.compactMap { r in
            let key = String(decoding: r.key.dropFirst(2), as: UTF8.self)
            guard let at = key.lastIndex(of: "@") else { return nil }
            var p = Pending(table: String(key[..<at]), generation: String(key[key.index(after: at)...]))
            for f in String(decoding: r.value, as: UTF8.self).split(separator: " ") {
                if f.hasPrefix("owner=") { p.owner = String(f.dropFirst(6)) } else if f.hasPrefix("at=") { p.writtenMillis = Int64(f.dropFirst(3)) } else { p.state = String(f) }
            }
            return p
        }
    }

    /// Deletes the blocks of generations whose writer died: a load killed
    /// before its catalog flip, or a replaced or dropped generation whose
    /// blocks were not all deleted. A generation counts as abandoned when
    /// its writer was a process of this host that has exited or, with
    /// `olderThanMillis`, when it was marked longer ago than that and its
    /// writer is not seen running here (another host's, or unknown). The
    /// generation a table's catalog entry names is never deleted, and a
    /// load whose marker was collected refuses to flip.
    public static func collectGarbage(_ client: WeftClient, olderThanMillis: Int64? = nil) async throws -> (deleted: [Pending], kept: [Pending]) {
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        var deleted: [Pending] = [], kept: [Pending] = []
        for p in try await pending(client) {
            let alive = p.owner.flatMap(WriterTag.isAlive)
            // Age never overrules a writer seen running on this host.
            let dead = alive == false
            let old = alive != true && (olderThanMillis.map { (p.writtenMillis ?? 0) < now - $0 } ?? false)
            guard dead || old else { kept.append(p); continue }
            // First, in one transaction: is the generation the table's now?
            // Remove the marker either way. A load's flip reads the same
            // marker, so the two transactions cannot both commit: either
            // the load published the table (and the blocks stay), or its
            // flip will find no marker and refuse.
            let t = try await client.begin()
            let current = try await t.get(catalogKey(p.table)).map { parseInfo(name: p.table, $0, 0).generation }
            guard try await t.get(pendingKey(p.table, p.generation)) != nil else { continue }
            try t.delete(pendingKey(p.table, p.generation))
            _ = try await t.commit()
            if current != p.generation { try await deleteData(client, p.table, p.generation) }
            deleted.append(p)
        }
        return (deleted, kept)
    }

    /// Reads one block of a table (from the first good replica) and checks it.
    static func readBlock(_ client: WeftClient, _ info: Info, partition: Int, index: Int, at ts: Timestamp) async throws -> Bytes {
        try await Blocks.read(client, info.blockSet, partition: partition, index: info.blockBase(partition) + index, replicas: info.replicas, at: ts,
                              what: "table \(info.name) (generation \(info.generation)) partition \(partition) block \(index)")
    }

    /// Hands every row of a block to `body`: (row key, value). A `lines`
    /// block's key is its line number. The buffers are valid only during
    /// the call.
    public static func forEachRow(_ block: Bytes, what: @autoclosure () -> String,
                           _ body: (_ line: UInt64, _ key: UnsafeRawBufferPointer?, _ value: UnsafeRawBufferPointer) throws -> Void) throws {
        try block.withUnsafeBytes { buf in
            let kind = try Blocks.verify(buf, what: what())
            var r = RawCursor(buf, at: Blocks.headerBytes)
            switch kind {
            case .lines:
                var line = try r.varint()
                while !r.atEnd {
                    let v = try r.slice(length: try r.varint())
                    try body(line, nil, v)
                    line &+= 1
                }
            case .kv:
                while !r.atEnd {
                    let k = try r.slice(length: try r.varint())
                    let v = try r.slice(length: try r.varint())
                    try body(0, k, v)
                }
            case .piece:
                throw WeftError(.corrupted, "\(what()) is a reliable-persist piece, not table rows")
            }
        }
    }

    /// Rows of a table snapshot in scan order, at most `limit`: a `lines`
    /// table in line order (blocks in the order they were cut), a `kv`
    /// table in key order; the per-row layout in key order.
    public static func scan(_ client: WeftClient, _ info: Info, at ts: Timestamp, limit: Int) async throws -> [(key: Bytes, value: Bytes)] {
        guard info.blocks else {
            return try await client.scan(prefix: info.rowPrefix, limit: limit, at: ts).rows.map { (Array($0.key.dropFirst(info.rowPrefix.count)), $0.value) }
        }
        var out: [(key: Bytes, value: Bytes)] = []
        // A kv table's first `limit` keys: with a small limit, only rows that
        // beat the current last one are copied (a sorted window), so a
        // `--limit 5` look at a million-row output keeps five.
        let window = info.format != "lines" && limit <= 10_000
        for g in 0..<info.blockCount {
            if info.format == "lines" && out.count >= limit { break }
            let (p, i) = info.block(g)
            let block = try await readBlock(client, info, partition: p, index: i, at: ts)
            try forEachRow(block, what: "table \(info.name) partition \(p) block \(i)") { line, k, v in
                guard window, let k else { return out.append((k.map { Array($0) } ?? lineKey(line), Array(v))) }
                if out.count >= limit, let last = out.last, last.key.withUnsafeBytes({ compareBytes(k, $0) >= 0 }) { return }
                var lo = 0, hi = out.count
                while lo < hi {
                    let mid = (lo + hi) / 2
                    if out[mid].key.withUnsafeBytes({ compareBytes($0, k) < 0 }) { lo = mid + 1 } else { hi = mid }
                }
                out.insert((Array(k), Array(v)), at: lo)
                if out.count > limit { out.removeLast() }
            }
        }
        if info.format != "lines" && !window { out.sort { compareBytes($0.key, $1.key) < 0 } }
        return Array(out.prefix(limit))
    }
}

/// A read position in a block, bounds-checked.
struct RawCursor {
    let buf: UnsafeRawBufferPointer
    var offset: Int
    init(_ buf: UnsafeRawBufferPointer, at offset: Int) {
        self.buf = buf
        self.offset = offset
    }
    var atEnd: Bool { offset >= buf.count }
    mutating func varint() throws -> UInt64 {
        var v: UInt64 = 0, shift: UInt64 = 0
        while true {
            guard offset < buf.count, shift < 64 else { throw WeftError(.corrupted, "block row length is truncated") }
            let b = buf[offset]
            offset += 1
            v |= UInt64(b & 0x7f) << shift
            if b < 0x80 { return v }
            shift += 7
        }
    }
    /// A length as read from the block: checked against what is left
    /// before it becomes an Int (a forged 2^63 must not trap).
    mutating func slice(length: UInt64) throws -> UnsafeRawBufferPointer {
        guard length <= UInt64(buf.count - offset) else { throw WeftError(.corrupted, "block row runs past the block's end") }
        return try slice(Int(length))
    }
    mutating func slice(_ n: Int) throws -> UnsafeRawBufferPointer {
        guard n >= 0, n <= buf.count - offset else { throw WeftError(.corrupted, "block row runs past the block's end") }
        defer { offset += n }
        return UnsafeRawBufferPointer(rebasing: buf[offset..<offset + n])
    }
}

/// Writes a table generation: rows are cut into blocks of at most
/// `Limits.tableBlockBytesMax`, dealt to partitions in turn, and each
/// block is written (all its replicas, one transaction) while the next is
/// cut, at most `Limits.tableLoadBlocksInFlightMax` at a time; `finish`
/// flips the catalog. Used by `table load` (streaming from a file) and by
/// job outputs.
public final class TableWriter: @unchecked Sendable {
    public let client: WeftClient
    public let name: String
    public let format: String
    public let overwrite: Bool
    public let replicas: Int
    public let partitions: Int
    public let generation: String
    let set: String
    var builder: Blocks.Builder
    var nextLine: UInt64 = 1
    var blocksCut = 0
    var counts: [Int]
    public private(set) var rows = 0
    /// Rows in blocks handed to `submit`.
    public private(set) var rowsSubmitted = 0
    public private(set) var bytes = 0
    var inFlight: [Task<Void, Error>] = []
    var started = false
    /// The catalog flip was sent (see `finish`).
    var flipping = false

    public init(client: WeftClient, name: String, format: String, overwrite: Bool, replicas: Int = 1, partitions: Int? = nil) throws {
        try TableStore.checkName(name)
        guard format == "lines" || format == "kv" else { throw WeftError(.invalidArgument, "table format must be lines or kv, not \(format)") }
        guard (1...Limits.tableReplicasMax).contains(replicas) else {
            throw WeftError(.invalidArgument, "--replicas must be 1...\(Limits.tableReplicasMax) (Limits.tableReplicasMax)")
        }
        guard replicas <= client.participantCount else {
            throw WeftError(.invalidArgument, "--replicas \(replicas) needs at least \(replicas) participants; this store has \(client.participantCount)")
        }
        self.client = client
        self.name = name
        self.format = format
        self.overwrite = overwrite
        self.replicas = replicas
        self.partitions = max(1, partitions ?? client.participantCount)
        generation = String(UInt64.random(in: 1...UInt64.max), radix: 36)
        set = TableStore.blockSet(name, generation)
        counts = Array(repeating: 0, count: self.partitions)
        builder = Blocks.Builder(kind: format == "lines" ? .lines : .kv, firstLine: 1)
    }

    /// Refuses an existing table (unless overwriting) and marks the new
    /// generation as loading, so `table gc` can find its blocks if this
    /// writer dies before the flip.
    public func start() async throws {
        if !overwrite, try await TableStore.info(client, name) != nil {
            throw WeftError(.invalidArgument, "table \(name) already exists; pass --overwrite to replace it atomically")
        }
        _ = try await client.put(TableStore.pendingKey(name, generation), TableStore.pendingValue("loading"))
        started = true
    }

    /// Adds line `rows + 1` of a `lines` table. Returns a sealed block to
    /// `submit` when the line did not fit in the current one.
    public func addLine(_ line: UnsafeRawBufferPointer) throws -> Bytes? {
        guard line.count <= Limits.tableRowBytesMax else {
            throw WeftError(.invalidArgument, "line \(rows + 1) is \(line.count) bytes, over the row limit of \(Limits.tableRowBytesMax) bytes (Limits.tableRowBytesMax)")
        }
        var sealed: Bytes?
        if builder.rows > 0 && builder.byteCount + Blocks.Builder.cost(line.count) > Limits.tableBlockBytesMax {
            sealed = builder.seal()
            builder = Blocks.Builder(kind: .lines, firstLine: nextLine)
        }
        builder.appendLine(line)
        nextLine += 1
        rows += 1
        return sealed
    }

    /// Adds a row of a `kv` table.
    public func addRow(_ key: Bytes, _ value: Bytes) throws -> Bytes? {
        guard key.count + value.count <= Limits.tableRowBytesMax else {
            throw WeftError(.invalidArgument, "row \(rows + 1) is \(key.count + value.count) bytes, over the row limit of \(Limits.tableRowBytesMax) bytes (Limits.tableRowBytesMax)")
        }
        var sealed: Bytes?
        if builder.rows > 0 && builder.byteCount + Blocks.Builder.cost(key.count, value.count) > Limits.tableBlockBytesMax {
            sealed = builder.seal()
            builder = Blocks.Builder(kind: .kv)
        }
        builder.appendRow(key, value)
        rows += 1
        return sealed
    }

    /// Starts writing a sealed block (all replicas, one transaction);
    /// first waits for the oldest write when `Limits.tableLoadBlocksInFlightMax` are running.
    public func submit(_ block: Bytes) async throws {
        precondition(started, "TableWriter.start() first")
        let g = blocksCut
        blocksCut += 1
        let p = g % partitions, i = g / partitions
        counts[p] = i + 1
        bytes += block.count
        rowsSubmitted = rows - builder.rows
        if inFlight.count >= Limits.tableLoadBlocksInFlightMax { try await inFlight.removeFirst().value }
        let (client, set, k) = (self.client, self.set, replicas)
        inFlight.append(Task {
            let t = try await client.begin()
            try Blocks.put(t, set, partition: p, index: i, block: block, replicas: k, participants: client.participantCount)
            try await t.commit()
        })
    }

    /// Writes the last block, waits for every block, and makes the
    /// generation the table in one transaction (replacing the old one when
    /// overwriting, whose blocks are then deleted).
    public func finish() async throws -> Timestamp {
        if builder.rows > 0 { try await submit(builder.seal()) }
        rowsSubmitted = rows
        while !inFlight.isEmpty { try await inFlight.removeFirst().value }
        return try await TableStore.flip(client, name, generation: generation, overwrite: overwrite,
                                         catalog: TableStore.catalogValue(rows: rows, format: format, generation: generation, replicas: replicas, counts: counts, bytes: bytes)) {
            self.flipping = true
        }
    }

    /// After a failure: waits for writes under way, then deletes what was
    /// written and the marker (best effort; `table gc` finishes the job).
    public func abandon() async {
        for t in inFlight { _ = try? await t.value }
        inFlight = []
        guard started, !flipping else { return }
        try? await Blocks.deleteSet(client, set)
        _ = try? await client.delete(TableStore.pendingKey(name, generation))
    }
}

/// A source of text lines as bytes, for parsers that need no String.
protocol LineSource: AnyObject {
    var materializes: Bool { get }
    /// The partition's lines (no newline), valid only during the call.
    func forEachLine(_ partition: Int, _ body: (UnsafeRawBufferPointer) throws -> Void) throws
}

/// A committed table snapshot as an RDD. A block table has one RDD
/// partition per run of up to `Limits.tableBlocksPerTaskMax` blocks of one
/// table partition (its preferred location is the participant holding the
/// partition's first replica); a task fetches its blocks at once and
/// decodes rows straight from them. A per-row table has one partition per
/// participant, read by scans.
final class TableRDD: RDD<(Bytes, Bytes)>, LineSource {
    let client: WeftClient
    let info: TableStore.Info
    let ts: Timestamp
    /// Table partition and block range of each RDD partition.
    let tasks: [(partition: Int, blocks: Range<Int>)]

    var format: String { info.format }

    init(_ ctx: DataflowContext, client: WeftClient, table: TableStore.Info, at ts: Timestamp) {
        self.client = client
        self.info = table
        self.ts = ts
        var tasks: [(partition: Int, blocks: Range<Int>)] = []
        if table.blocks {
            for (p, n) in table.blockCounts.enumerated() {
                for lo in stride(from: 0, to: n, by: Limits.tableBlocksPerTaskMax) {
                    tasks.append((p, lo..<min(n, lo + Limits.tableBlocksPerTaskMax)))
                }
            }
            if tasks.isEmpty { tasks = [(0, 0..<0)] }
        } else {
            tasks = (0..<client.participantCount).map { ($0, 0..<0) }
        }
        self.tasks = tasks
        super.init(ctx, partitions: tasks.count, dependencies: [], name: "table(\(table.name) @ \(ts))")
    }

    override func preferredLocation(_ partition: Int) -> String? {
        "participant-\(tasks[partition].partition % client.participantCount)"
    }

    /// The task's blocks, fetched concurrently, in order.
    func fetchBlocks(_ partition: Int) throws -> [Bytes] {
        let (client, info, ts) = (self.client, self.info, self.ts)
        let task = tasks[partition]
        return try blocking {
            try await withThrowingTaskGroup(of: (Int, Bytes).self) { group in
                for i in task.blocks {
                    group.addTask { (i, try await TableStore.readBlock(client, info, partition: task.partition, index: i, at: ts)) }
                }
                var out: [Int: Bytes] = [:]
                for try await (i, b) in group { out[i] = b }
                return task.blocks.map { out[$0]! }
            }
        }
    }

    func forEachRow(_ partition: Int, _ body: (_ line: UInt64, _ key: UnsafeRawBufferPointer?, _ value: UnsafeRawBufferPointer) throws -> Void) throws {
        let task = tasks[partition]
        for (n, block) in try fetchBlocks(partition).enumerated() {
            try TableStore.forEachRow(block, what: "table \(info.name) partition \(task.partition) block \(task.blocks.lowerBound + n)", body)
        }
    }

    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [(Bytes, Bytes)] {
        guard info.blocks else { return try scanRows(partition) }
        var out: [(Bytes, Bytes)] = []
        try forEachRow(partition) { line, k, v in out.append((k.map { Array($0) } ?? TableStore.lineKey(line), Array(v))) }
        return out
    }

    /// A `lines` table's lines; a `kv` table's rows as `key<TAB>value`.
    func forEachLine(_ partition: Int, _ body: (UnsafeRawBufferPointer) throws -> Void) throws {
        context.noteComputed(rdd: id, partition: partition)
        try lines(partition, body)
    }

    /// The lines, without counting a computation (a look at the data).
    func lines(_ partition: Int, _ body: (UnsafeRawBufferPointer) throws -> Void) throws {
        guard info.blocks else {
            for (k, v) in try scanRows(partition) {
                let line = info.format == "kv" ? k + [9] + v : v
                try line.withUnsafeBytes { try body($0) }
            }
            return
        }
        var joined = Bytes()
        try forEachRow(partition) { _, k, v in
            guard let k else { return try body(v) }
            joined.removeAll(keepingCapacity: true)
            joined.append(contentsOf: k)
            joined.append(9)
            joined.append(contentsOf: v)
            try joined.withUnsafeBytes { try body($0) }
        }
    }

    /// The per-row layout: the participant's rows, by paged scans.
    func scanRows(_ partition: Int) throws -> [(Bytes, Bytes)] {
        let (client, prefix, ts) = (self.client, info.rowPrefix, self.ts)
        let rows = try blocking { () async throws -> [ScanRowBox] in
            var out: [ScanRowBox] = []
            var from: Bytes? = nil
            while true {
                let (rows, more) = try await client.scanParticipant(partition, prefix: prefix, from: from, limit: TableStore.rowsPageMax, at: ts)
                out += rows.map { ScanRowBox(key: Array($0.key.dropFirst(prefix.count)), value: $0.value) }
                guard more, let last = rows.last else { break }
                from = last.key + [0]
            }
            return out
        }
        return rows.map { ($0.key, $0.value) }
    }
}

/// A table's rows as text lines (see `TableRDD.forEachLine`), decoded
/// straight from its blocks into Strings; parsers downstream read the
/// bytes with no String at all.
final class TableLinesRDD: RDD<String>, LineSource {
    let table: TableRDD
    init(_ table: TableRDD) {
        self.table = table
        super.init(table.context, partitions: table.numPartitions, dependencies: [.narrow(table, { [$0] })], name: "lines(\(table.info.name))")
    }
    override func preferredLocation(_ partition: Int) -> String? { table.preferredLocation(partition) }
    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [String] {
        var out: [String] = []
        try table.forEachLine(partition) { out.append(String(decoding: $0, as: UTF8.self)) }
        return out
    }
    override func push(_ partition: Int, _ ctx: TaskContext, _ body: (String) throws -> Void) throws {
        try pushStreaming(partition, ctx, body) { emit in try table.forEachLine(partition) { try emit(String(decoding: $0, as: UTF8.self)) } }
    }
    func forEachLine(_ partition: Int, _ body: (UnsafeRawBufferPointer) throws -> Void) throws {
        context.noteComputed(rdd: id, partition: partition)
        try table.forEachLine(partition, body)
    }
}

struct ScanRowBox: Sendable {
    var key: Bytes
    var value: Bytes
}

extension DataflowContext {
    /// The committed snapshot of `table` at `ts` (now when nil). Fails
    /// clearly for an unknown table or a snapshot older than garbage
    /// collection allows.
    public func table(_ name: String, client: WeftClient, at ts: Timestamp? = nil) throws -> RDD<(Bytes, Bytes)> {
        try TableStore.checkName(name)
        let at = try ts ?? blocking { try await client.now() }
        guard let info = try blocking({ try await TableStore.info(client, name, at: at) }) else {
            throw WeftError(.notFound, "unknown table \(name) (at ts=\(at)); `weft table list` shows the tables")
        }
        return TableRDD(self, client: client, table: info, at: at)
    }
}

extension RDD {
    /// Writes the RDD as table `name` in one transaction (all or nothing).
    @discardableResult
    public func saveAsTable(_ name: String, client: WeftClient, overwrite: Bool = false) throws -> Timestamp where T == (Bytes, Bytes) {
        let rows = try collect().map { RowBox(key: $0.0, value: $0.1) }
        return try blocking { try await TableStore.write(client, name, rows: rows.map { ($0.key, $0.value) }, format: "kv", overwrite: overwrite) }
    }
}

struct RowBox: Sendable {
    var key: Bytes
    var value: Bytes
}

/// Runs blocking driver code (a job) on its own thread, so it never holds
/// one of Swift concurrency's few cooperative threads while it waits.
public func onDriverThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { (cont: CheckedContinuation<T, Error>) in
        let t = Thread { cont.resume(with: Result { try body() }) }
        t.stackSize = DataflowContext.driverStackBytes
        t.start()
    }
}

extension TableStore {
    /// Bytes read from a file at a time by `load`.
    public static let loadChunkBytes = 4 << 20

    /// Loads a file as a table, streaming: the file is read in chunks of
    /// `loadChunkBytes` and never held whole; rows are cut into blocks that
    /// are written while the next are cut (`TableWriter`). `lines`: every
    /// line a row, its bytes kept exactly (invalid UTF-8 included), keyed
    /// by its line number. `kv`: `key<TAB>value` lines; a repeated key, or
    /// a non-empty line without a TAB, fails the load with its line number.
    /// Any failure deletes what was written: the table is whole or absent.
    /// `progress(bytesRead, fileBytes, rows)` after each chunk.
    @discardableResult
    public static func load(_ client: WeftClient, _ name: String, path: String, format: String, overwrite: Bool, replicas: Int = 1,
                            progress: ((Int, Int, Int) -> Void)? = nil) async throws -> (ts: Timestamp, rows: Int, bytes: Int) {
        var st = stat()
        guard stat(path, &st) == 0 else { throw WeftError(.invalidArgument, "cannot read \(path): \(String(cString: strerror(errno)))") }
        if (st.st_mode & S_IFMT) == S_IFDIR { throw WeftError(.invalidArgument, "\(path) is a directory, not a file") }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw WeftError(.invalidArgument, "cannot read \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let fileBytes = Int(st.st_size)
        guard TableExchange.formats.contains(format) else {
            throw WeftError(.invalidArgument, "unknown load format \(format) (one of \(TableExchange.formats.joined(separator: ", ")))")
        }
        // jsonl and csv files hold either kind of table; their first record says which.
        let tableFormat = format == "jsonl" || format == "csv" ? try TableExchange.sniff(path: path, format: format) : format
        let w = try TableWriter(client: client, name: name, format: tableFormat, overwrite: overwrite, replicas: replicas)
        try await w.start()
        do {
            var seen: [ByteKey: Int] = [:]
            var lineNo = 0
            var pending = Bytes()                  // a line carried across chunks
            var buffer = Bytes(repeating: 0, count: loadChunkBytes)
            var read = 0
            var sealed: [Bytes] = []
            // A jsonl line may escape every byte as \u00XX.
            let lineMax = format == "jsonl" ? 6 * Limits.tableRowBytesMax + 1024 : Limits.tableRowBytesMax
            var csv = CSVReader(maxBytes: 2 * Limits.tableRowBytesMax + 16)
            func keyed(_ key: Bytes, _ value: Bytes) throws {
                if let first = seen.updateValue(lineNo, forKey: ByteKey(key)) {
                    throw WeftError(.invalidArgument, "\(path):\(lineNo): key '\(String(decoding: key, as: UTF8.self))' repeats the key of line \(first); nothing was loaded")
                }
                if let b = try w.addRow(key, value) { sealed.append(b) }
            }
            func record(_ fields: [Bytes], _ n: Int) throws {
                lineNo = n
                if n == 1 { return }   // the header
                let want = tableFormat == "kv" ? 2 : 1
                guard fields.count == want else {
                    if fields.count == 1 && fields[0].isEmpty { return }   // a blank line
                    throw WeftError(.invalidArgument, "\(path): record \(n) has \(fields.count) fields, the header \(want); nothing was loaded")
                }
                if want == 2 { return try keyed(fields[0], fields[1]) }
                try fields[0].withUnsafeBytes { if let b = try w.addLine($0) { sealed.append(b) } }
            }
            func row(_ line: UnsafeRawBufferPointer) throws {
                if line.count > lineMax { throw tooLong() }
                lineNo += 1
                if format == "jsonl" {
                    guard let (k, v) = try TableExchange.parseJSONLine(line, kv: tableFormat == "kv", where: "\(path):\(lineNo)") else { return }
                    if let k { return try keyed(k, v) }
                    return try v.withUnsafeBytes { if let b = try w.addLine($0) { sealed.append(b) } }
                }
                if format == "lines" {
                    if let b = try w.addLine(line) { sealed.append(b) }
                    return
                }
                guard let tab = line.firstIndex(of: 9) else {
                    if line.isEmpty { return }
                    throw WeftError(.invalidArgument, "\(path):\(lineNo): line has no TAB (kv lines are key<TAB>value); nothing was loaded")
                }
                let key = Array(line[..<tab])
                if let first = seen.updateValue(lineNo, forKey: ByteKey(key)) {
                    throw WeftError(.invalidArgument, "\(path):\(lineNo): key '\(String(decoding: key, as: UTF8.self))' repeats the key of line \(first); nothing was loaded")
                }
                if let b = try w.addRow(key, Array(line[(tab + 1)...])) { sealed.append(b) }
            }
            func tooLong() -> WeftError {
                WeftError(.invalidArgument, "\(path):\(lineNo + 1): line is longer than the row limit of \(Limits.tableRowBytesMax) bytes (Limits.tableRowBytesMax); nothing was loaded")
            }
            while true {
                let got = buffer.withUnsafeMutableBytes { Foundation.read(fd, $0.baseAddress, loadChunkBytes) }
                if got < 0 {
                    if errno == EINTR { continue }
                    throw WeftError(.storage, "reading \(path): \(String(cString: strerror(errno)))")
                }
                if got == 0 { break }
                read += got
                try buffer.withUnsafeBytes { all in
                    let buf = UnsafeRawBufferPointer(rebasing: all[0..<got])
                    if format == "csv" { return try csv.feed(buf, record) }
                    var i = 0
                    while i < got {
                        guard let found = memchr(buf.baseAddress! + i, 10, got - i) else {
                            if pending.count + (got - i) > lineMax { throw tooLong() }
                            pending.append(contentsOf: buf[i...])
                            break
                        }
                        let nl = buf.baseAddress!.distance(to: UnsafeRawPointer(found))
                        if pending.isEmpty {
                            try row(UnsafeRawBufferPointer(rebasing: buf[i..<nl]))
                        } else {
                            if pending.count + (nl - i) > lineMax { throw tooLong() }
                            pending.append(contentsOf: buf[i..<nl])
                            try pending.withUnsafeBytes { try row($0) }
                            pending.removeAll(keepingCapacity: true)
                        }
                        i = nl + 1
                    }
                }
                for b in sealed { try await w.submit(b) }
                sealed.removeAll()
                progress?(read, fileBytes, w.rows)
            }
            // The last line has no newline.
            if !pending.isEmpty { try pending.withUnsafeBytes { try row($0) } }
            if format == "csv" { try csv.finish(record) }
            for b in sealed { try await w.submit(b) }
            let ts = try await w.finish()
            progress?(read, max(fileBytes, read), w.rows)
            return (ts, w.rows, read)
        } catch {
            await w.abandon()
            throw error
        }
    }
}
