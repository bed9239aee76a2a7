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

/// Tables live in the key-value store. The catalog entry `c/<t>` describes
/// table `t` and names its current *generation* `g`; row `k` of that
/// generation is the key `t/<t>@<g>/<k>` (tables written before
/// generations existed have `g` empty and rows at `t/<t>/<k>`). A table
/// snapshot is (table, commit timestamp): the catalog entry at that
/// timestamp says which generation to read, and rows are immutable, so any
/// partition of it can be read again identically, which is the base case
/// of lineage.
///
/// Writing a table writes a NEW generation and then flips the catalog entry
/// to it in one transaction: readers see the old table or the new one,
/// never a mix, however many transactions the rows took. Rows of a
/// generation no catalog entry names are invisible; the old generation's
/// rows are deleted after the flip (older snapshots still read them, as of
/// their timestamp).
public enum TableStore {
    public static let rowsPageMax = 50_000
    /// Rows per load transaction for big tables (`LoadBatchRowsMax`).
    public static let loadBatchRowsMax = 50_000
    /// Key and value bytes per load transaction (`LoadBatchBytesMax`).
    public static let loadBatchBytesMax = 32 << 20

    public static func rowPrefix(_ table: String, generation: String = "") -> Bytes {
        Array((generation.isEmpty ? "t/\(table)/" : "t/\(table)@\(generation)/").utf8)
    }
    public static func catalogKey(_ table: String) -> Bytes { Array("c/\(table)".utf8) }
    /// Marks a generation whose rows may be in the store without a catalog
    /// entry naming them: a batched load under way, or a replaced or
    /// dropped generation whose rows are being deleted. Written in the same
    /// transaction as the first batch (or the catalog change), deleted once
    /// the rows are visible or gone; `collectGarbage` finishes the job of a
    /// writer that died.
    static func pendingKey(_ table: String, _ generation: String) -> Bytes { Array("p/\(table)@\(generation)".utf8) }
    static func pendingValue(_ what: String) -> Bytes {
        Array("owner=\(WriterTag.current) at=\(Int64(Date().timeIntervalSince1970 * 1000)) \(what)".utf8)
    }

    public static func checkName(_ name: String) throws {
        let ok = !name.isEmpty && name.count <= 200 && name.unicodeScalars.allSatisfy { CharacterSet.alphanumerics.contains($0) || $0 == "_" || $0 == "-" || $0 == "." }
        if !ok { throw WeftError(.invalidArgument, "table name '\(name)' must be 1...200 letters, digits, '_', '-' or '.'") }
    }

    public struct Info: Sendable {
        public var name: String
        public var rows: Int
        public var format: String
        public var committedTs: Timestamp
        public var generation: String
        public var rowPrefix: Bytes { TableStore.rowPrefix(name, generation: generation) }
    }

    public static func list(_ client: WeftClient, at ts: Timestamp? = nil) async throws -> [Info] {
        let (rows, _) = try await client.scan(prefix: Array("c/".utf8), limit: Limits.scanLimitMax, at: ts)
        return rows.map { parseInfo(name: String(decoding: $0.key.dropFirst(2), as: UTF8.self), $0.value, $0.version) }
    }

    static func parseInfo(name: String, _ v: Bytes, _ version: Timestamp) -> Info {
        var rows = 0, format = "kv", gen = ""
        for f in String(decoding: v, as: UTF8.self).split(separator: " ") {
            let kv = f.split(separator: "=", maxSplits: 1)
            if kv.count == 2 && kv[0] == "rows" { rows = Int(kv[1]) ?? 0 }
            if kv.count == 2 && kv[0] == "format" { format = String(kv[1]) }
            if kv.count == 2 && kv[0] == "gen" { gen = String(kv[1]) }
        }
        return Info(name: name, rows: rows, format: format, committedTs: version, generation: gen)
    }

    public static func info(_ client: WeftClient, _ name: String, at ts: Timestamp? = nil) async throws -> Info? {
        let (v, version) = try await client.get(catalogKey(name), at: ts)
        return v.map { parseInfo(name: name, $0, version) }
    }

    /// Writes a whole table as a new generation and makes it the table in
    /// one transaction (with the catalog entry): readers see all of it or
    /// none. Up to `loadBatchRowsMax` rows this is ONE transaction; bigger
    /// tables are written in batches first (`progress(rowsWritten, rows)`
    /// after each), and a writer that dies midway leaves only invisible
    /// rows. An existing table is refused unless `overwrite`, and then
    /// replaced atomically.
    @discardableResult
    public static func write(_ client: WeftClient, _ name: String, rows: [(Bytes, Bytes)], format: String, overwrite: Bool,
                             progress: (@Sendable (Int, Int) -> Void)? = nil) async throws -> Timestamp {
        try checkName(name)
        if !overwrite, try await info(client, name) != nil {
            throw WeftError(.invalidArgument, "table \(name) already exists; pass --overwrite to replace it atomically")
        }
        let gen = String(UInt64.random(in: 1...UInt64.max), radix: 36)
        let prefix = rowPrefix(name, generation: gen)
        // Every batch but the last commits on its own; the last goes with the catalog flip.
        var start = 0
        var batches: [Range<Int>] = []
        while start < rows.count {
            var end = start, bytes = 0
            while end < rows.count && end - start < loadBatchRowsMax && (end == start || bytes + rows[end].0.count + rows[end].1.count <= loadBatchBytesMax) {
                bytes += prefix.count + rows[end].0.count + rows[end].1.count
                end += 1
            }
            batches.append(start..<end)
            start = end
        }
        if batches.isEmpty { batches = [0..<0] }
        for (n, b) in batches.dropLast().enumerated() {
            let t = try await client.begin()
            if n == 0 { try t.put(pendingKey(name, gen), pendingValue("loading")) }
            for i in b { try t.put(prefix + rows[i].0, rows[i].1) }
            try await t.commit()
            progress?(b.upperBound, rows.count)
        }
        let t = try await client.begin()
        let old = try await t.get(catalogKey(name)).map { parseInfo(name: name, $0, 0) }
        if old != nil && !overwrite {
            throw WeftError(.invalidArgument, "table \(name) already exists; pass --overwrite to replace it atomically")
        }
        for i in batches.last! { try t.put(prefix + rows[i].0, rows[i].1) }
        if batches.count > 1 {
            // Its earlier batches must all still be there: a `table gc`
            // (with --older-than, for a writer it could not see) may have
            // taken them.
            guard try await t.get(pendingKey(name, gen)) != nil else {
                try? await deleteRows(client, prefix: prefix)
                throw WeftError(.conflict, "loading table \(name): the earlier batches were collected by `weft table gc` meanwhile; load it again")
            }
            try t.delete(pendingKey(name, gen))
        }
        try t.put(catalogKey(name), Array("rows=\(rows.count) format=\(format) gen=\(gen)".utf8))
        if let old { try t.put(pendingKey(name, old.generation), pendingValue("replaced")) }
        let ts = try await t.commit()
        progress?(rows.count, rows.count)
        if let old { try await retire(client, name, old.generation) }
        return ts
    }

    /// Deletes every row under `prefix`, in transactions of at most
    /// `rowsPageMax` deletes (the rows are invisible already).
    static func deleteRows(_ client: WeftClient, prefix: Bytes) async throws {
        for part in 0..<client.participantCount {
            while true {
                let at = try await client.now()
                let (old, more) = try await client.scanParticipant(part, prefix: prefix, from: nil, limit: rowsPageMax, at: at)
                if old.isEmpty { break }
                let t = try await client.begin()
                for r in old { try t.delete(r.key) }
                try await t.commit()
                if !more { break }
            }
        }
    }

    /// Drops a table: the catalog entry goes in one transaction (the table
    /// is gone for every later snapshot), then its rows in batches.
    public static func drop(_ client: WeftClient, _ name: String) async throws {
        // The catalog entry is read inside the transaction that deletes it:
        // a concurrent replace makes this commit conflict, not orphan rows.
        let t = try await client.begin()
        guard let entry = try await t.get(catalogKey(name)) else { throw WeftError(.notFound, "unknown table \(name)") }
        let i = parseInfo(name: name, entry, 0)
        try t.delete(catalogKey(name))
        try t.put(pendingKey(name, i.generation), pendingValue("dropped"))
        try await t.commit()
        try await retire(client, name, i.generation)
    }

    /// Deletes a generation's rows, then its pending marker.
    static func retire(_ client: WeftClient, _ name: String, _ generation: String) async throws {
        try await deleteRows(client, prefix: rowPrefix(name, generation: generation))
        _ = try await client.delete(pendingKey(name, generation))
    }

    /// A generation that may have rows no catalog entry names.
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

    /// Deletes the rows of generations whose writer died: a batched load
    /// killed before its catalog flip, or a replaced or dropped generation
    /// whose rows were not all deleted. A generation counts as abandoned
    /// when its writer was a process of this host that has exited or, with
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
            // the load published the table (and the rows stay), or its flip
            // will find no marker and refuse.
            let t = try await client.begin()
            let current = try await t.get(catalogKey(p.table)).map { parseInfo(name: p.table, $0, 0).generation }
            guard try await t.get(pendingKey(p.table, p.generation)) != nil else { continue }
            try t.delete(pendingKey(p.table, p.generation))
            _ = try await t.commit()
            if current != p.generation {
                try await deleteRows(client, prefix: rowPrefix(p.table, generation: p.generation))
            }
            deleted.append(p)
        }
        return (deleted, kept)
    }
}

/// A committed table snapshot as an RDD: one partition per participant
/// (its preferred location), every partition read at the same timestamp.
final class TableRDD: RDD<(Bytes, Bytes)> {
    let client: WeftClient
    let table: String
    let ts: Timestamp

    let prefix: Bytes
    /// `lines` (key = line number, value = the line) or `kv`.
    let format: String

    init(_ ctx: DataflowContext, client: WeftClient, table: TableStore.Info, at ts: Timestamp) {
        self.client = client
        self.table = table.name
        self.format = table.format
        self.prefix = table.rowPrefix
        self.ts = ts
        super.init(ctx, partitions: client.participantCount, dependencies: [], name: "table(\(table.name) @ \(ts))")
    }

    override func preferredLocation(_ partition: Int) -> String? { "participant-\(partition)" }

    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [(Bytes, Bytes)] {
        let (client, prefix, ts) = (self.client, self.prefix, self.ts)
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
        t.stackSize = 16 << 20
        t.start()
    }
}
