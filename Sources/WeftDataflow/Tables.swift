import Foundation
import WeftCore
import WeftRuntime

/// Runs an async call to completion from a task thread (tasks run on
/// executor threads, outside Swift concurrency).
func blocking<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) throws -> T {
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

/// Tables live in the key-value store: row `k` of table `t` is the key
/// `t/<t>/<k>`, and the catalog entry `c/<t>` describes the table. A table
/// snapshot is (table, commit timestamp): immutable, so any partition of it
/// can be read again identically, which is the base case of lineage.
public enum TableStore {
    public static let rowsPageMax = 50_000

    public static func rowPrefix(_ table: String) -> Bytes { Array("t/\(table)/".utf8) }
    public static func catalogKey(_ table: String) -> Bytes { Array("c/\(table)".utf8) }

    public static func checkName(_ name: String) throws {
        let ok = !name.isEmpty && name.count <= 200 && name.unicodeScalars.allSatisfy { CharacterSet.alphanumerics.contains($0) || $0 == "_" || $0 == "-" || $0 == "." }
        if !ok { throw WeftError(.invalidArgument, "table name '\(name)' must be 1...200 letters, digits, '_', '-' or '.'") }
    }

    public struct Info: Sendable {
        public var name: String
        public var rows: Int
        public var format: String
        public var committedTs: Timestamp
    }

    public static func list(_ client: WeftClient, at ts: Timestamp? = nil) async throws -> [Info] {
        let (rows, _) = try await client.scan(prefix: Array("c/".utf8), limit: Limits.scanLimitMax, at: ts)
        return rows.map { parseInfo(name: String(decoding: $0.key.dropFirst(2), as: UTF8.self), $0.value, $0.version) }
    }

    static func parseInfo(name: String, _ v: Bytes, _ version: Timestamp) -> Info {
        var rows = 0, format = "kv"
        for f in String(decoding: v, as: UTF8.self).split(separator: " ") {
            let kv = f.split(separator: "=", maxSplits: 1)
            if kv.count == 2 && kv[0] == "rows" { rows = Int(kv[1]) ?? 0 }
            if kv.count == 2 && kv[0] == "format" { format = String(kv[1]) }
        }
        return Info(name: name, rows: rows, format: format, committedTs: version)
    }

    public static func info(_ client: WeftClient, _ name: String, at ts: Timestamp? = nil) async throws -> Info? {
        let (v, version) = try await client.get(catalogKey(name), at: ts)
        return v.map { parseInfo(name: name, $0, version) }
    }

    /// Writes a whole table in ONE transaction, with its catalog entry:
    /// readers see all of it or none. An existing table is refused unless
    /// `overwrite`, and then replaced atomically (old rows deleted in the
    /// same transaction).
    @discardableResult
    public static func write(_ client: WeftClient, _ name: String, rows: [(Bytes, Bytes)], format: String, overwrite: Bool) async throws -> Timestamp {
        try checkName(name)
        let t = try await client.begin()
        if try await t.get(catalogKey(name)) != nil {
            guard overwrite else { throw WeftError(.invalidArgument, "table \(name) already exists; pass --overwrite to replace it atomically") }
            let p = rowPrefix(name)
            for part in 0..<client.participantCount {
                var from: Bytes? = nil
                while true {
                    let (old, more) = try await client.scanParticipant(part, prefix: p, from: from, limit: rowsPageMax, at: t.startTs)
                    for r in old { try t.delete(r.key) }
                    guard more, let last = old.last else { break }
                    from = last.key + [0]
                }
            }
        }
        for (k, v) in rows { try t.put(rowPrefix(name) + k, v) }
        try t.put(catalogKey(name), Array("rows=\(rows.count) format=\(format)".utf8))
        return try await t.commit()
    }

    /// Drops a table (rows and catalog entry) in one transaction.
    public static func drop(_ client: WeftClient, _ name: String) async throws {
        guard try await info(client, name) != nil else { throw WeftError(.notFound, "unknown table \(name)") }
        let t = try await client.begin()
        for part in 0..<client.participantCount {
            var from: Bytes? = nil
            while true {
                let (old, more) = try await client.scanParticipant(part, prefix: rowPrefix(name), from: from, limit: rowsPageMax, at: t.startTs)
                for r in old { try t.delete(r.key) }
                guard more, let last = old.last else { break }
                from = last.key + [0]
            }
        }
        try t.delete(catalogKey(name))
        try await t.commit()
    }
}

/// A committed table snapshot as an RDD: one partition per participant
/// (its preferred location), every partition read at the same timestamp.
final class TableRDD: RDD<(Bytes, Bytes)> {
    let client: WeftClient
    let table: String
    let ts: Timestamp

    init(_ ctx: DataflowContext, client: WeftClient, table: String, at ts: Timestamp) {
        self.client = client
        self.table = table
        self.ts = ts
        super.init(ctx, partitions: client.participantCount, dependencies: [], name: "table(\(table) @ \(ts))")
    }

    override func preferredLocation(_ partition: Int) -> String? { "participant-\(partition)" }

    override func compute(_ partition: Int, _ ctx: TaskContext) throws -> [(Bytes, Bytes)] {
        let (client, prefix, ts) = (self.client, TableStore.rowPrefix(table), self.ts)
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
        guard try blocking({ try await TableStore.info(client, name, at: at) }) != nil else {
            throw WeftError(.notFound, "unknown table \(name) (at ts=\(at)); `weft table list` shows the tables")
        }
        return TableRDD(self, client: client, table: name, at: at)
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
