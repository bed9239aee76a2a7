import Foundation
import WeftCore
import WeftRuntime

/// What one result task wrote of a job's output table (`PartitionedOutput`).
public struct OutputPart: SpillCodable, Sendable {
    public var partition = 0
    /// Index of the partition's first block (`PartitionedOutput.base`).
    public var base = 0
    public var blocks = 0
    public var rows = 0
    public var bytes = 0
    /// Sum of the values that are decimal integers (word count's total).
    public var valueSum = 0
    /// The rows the job's summary needs from this partition (its top rows,
    /// every row of a small output, or none).
    public var kept: [(Bytes, Bytes)] = []

    public init() {}

    public func encode(to w: inout ByteWriter) {
        for v in [partition, base, blocks, rows, bytes, valueSum, kept.count] { w.int(v) }
        for (k, v) in kept {
            w.blob(k)
            w.blob(v)
        }
    }

    public static func decode(from r: inout ByteReader) throws(DecodeError) -> OutputPart {
        var o = OutputPart()
        o.partition = try r.int(max: Int(Int32.max))
        o.base = try r.int(max: Int(Int64.max))
        o.blocks = try r.int(max: Int(Int32.max))
        o.rows = try r.int(max: Int(Int64.max))
        o.bytes = try r.int(max: Int(Int64.max))
        o.valueSum = Int(Int64(bitPattern: UInt64(try r.int(max: Int(Int64.max)))))
        let n = try r.int(max: r.remaining)
        for _ in 0..<n { o.kept.append((try r.blob(max: Limits.tableRowBytesMax), try r.blob(max: Limits.tableRowBytesMax))) }
        return o
    }
}

/// A job's output table written by its result tasks on the executors, where
/// the rows are, instead of by the driver: task p writes RDD partition p's
/// rows, in order, as the blocks of table partition p (partition-major
/// order), and returns what it wrote; the driver then flips the catalog in
/// one transaction (`TableStore.flip`), so the table appears whole or not
/// at all. Each attempt of a task writes from its own block index
/// (`base(action:attempt:)`), so a retry or a speculative copy never
/// mixes its blocks with another attempt's; the catalog names the winner's
/// first index per partition (`bases=`).
///
/// Losing attempts (a speculative copy that finished second, an attempt on
/// a node declared lost that was only stopped, a result stage run again)
/// leave nothing behind. Every block write reads the generation's
/// "loading" marker in its own transaction, and the flip deletes that
/// marker, so a block commits before the flip or not at all: a loser
/// still running afterwards fails at its next block. Once the flip has
/// committed, the driver deletes the blocks of every attempt it launched
/// but did not pick (`collectLosers`). An attempt writes its blocks in
/// order, each committed before the next starts, so its blocks are
/// `base + 0 ..< base + k` and the first missing index ends them.
public enum PartitionedOutput {
    public static let attemptStride = 1 << 24

    /// The generation, the same on the driver and every replica of the job.
    public static func generation(runId: String) -> String { "j" + runId }

    /// On the driver: refuses an existing table (unless `overwrite`) and
    /// marks the generation as loading, so `table gc` finds its blocks if
    /// the job dies before the flip.
    public static func begin(_ client: WeftClient, _ name: String, generation: String, overwrite: Bool) throws {
        try blocking {
            if !overwrite, try await TableStore.info(client, name) != nil {
                throw WeftError(.invalidArgument, "output table \(name) already exists; pass --overwrite to replace it atomically")
            }
            _ = try await client.put(TableStore.pendingKey(name, generation), TableStore.pendingValue("loading"))
        }
    }

    /// The first block index of attempt `attempt` of action `action`'s task:
    /// distinct for every (action, attempt) of a job, so no two attempts,
    /// even of two write actions (PageRank's integer path giving way to the
    /// String one), write the same block.
    public static func base(action: Int, attempt: Int) -> Int {
        (action * attemptsPerAction + attempt % attemptsPerAction) * attemptStride
    }
    public static let attemptsPerAction = 256

    /// In a task: writes `rows` as kv blocks of table partition `partition`,
    /// each block (with its replicas) in one transaction, retrying while a
    /// participant is unreachable, up to `outputWriteRetryMillis`.
    public static func write(_ client: WeftClient, _ name: String, generation: String, partition: Int, base: Int,
                             rows: [(Bytes, Bytes)], killed: () throws -> Void = {},
                             keep: ([(Bytes, Bytes)]) -> [(Bytes, Bytes)]) throws -> OutputPart {
        var part = OutputPart()
        part.partition = partition
        part.base = base
        part.rows = rows.count
        var blocks: [Bytes] = []
        var builder = Blocks.Builder(kind: .kv)
        for (n, (k, v)) in rows.enumerated() {
            guard k.count + v.count <= Limits.tableRowBytesMax else {
                throw WeftError(.invalidArgument, "output row \(n + 1) of partition \(partition) is \(k.count + v.count) bytes, over the row limit of \(Limits.tableRowBytesMax) bytes (Limits.tableRowBytesMax)")
            }
            if builder.rows > 0 && builder.byteCount + Blocks.Builder.cost(k.count, v.count) > Limits.tableBlockBytesMax {
                blocks.append(builder.seal())
                builder = Blocks.Builder(kind: .kv)
            }
            builder.appendRow(k, v)
            if let x = Int(String(decoding: v, as: UTF8.self)) { part.valueSum &+= x }
        }
        if builder.rows > 0 { blocks.append(builder.seal()) }
        let set = TableStore.blockSet(name, generation)
        let n = client.participantCount
        if CrashPoints.armed { CrashPoints.check("executor.output-write") }
        for (i, block) in blocks.enumerated() {
            try killed()
            let deadline = wallMillis() + outputWriteRetryMillis
            var pause: UInt32 = 50_000
            while true {
                do {
                    try blocking {
                        let t = try await client.begin()
                        // The fence: a flip (or an abandon) deletes the marker,
                        // and this transaction then conflicts or finds none.
                        guard try await t.get(TableStore.pendingKey(name, generation)) != nil else {
                            throw WeftError(.notFound, "output table \(name): generation \(generation) is no longer being written (the job committed or gave up its output), so this attempt of partition \(partition) stops")
                        }
                        try Blocks.put(t, set, partition: partition, index: base + i, block: block, replicas: 1, participants: n)
                        try await t.commit()
                    }
                    break
                } catch let e as WeftError where [.unavailable, .outcomeUnknown, .timeout, .aborted, .conflict].contains(e.code) && wallMillis() < deadline {
                    // Written again on an unknown outcome: the same key and
                    // bytes, so at worst a second identical version.
                    usleep(pause)
                    pause = min(pause * 2, 1_000_000)
                }
            }
            part.bytes += block.count
        }
        part.blocks = blocks.count
        part.kept = keep(rows)
        return part
    }

    /// On the driver, once every partition is written: the catalog flip.
    /// `sending` runs just before the flip's commit is sent (after it, the
    /// table may exist even if this throws: its blocks must stay).
    public static func finish(_ client: WeftClient, _ name: String, generation: String, overwrite: Bool, parts: [OutputPart],
                              sending: @escaping @Sendable () -> Void = {}) throws -> Timestamp {
        let ordered = parts.sorted { $0.partition < $1.partition }
        let catalog = TableStore.catalogValue(rows: ordered.reduce(0) { $0 + $1.rows }, format: "kv", generation: generation, replicas: 1,
                                              counts: ordered.map(\.blocks), bytes: ordered.reduce(0) { $0 + $1.bytes }, bases: ordered.map(\.base))
        let deadline = wallMillis() + outputWriteRetryMillis
        var pause: UInt32 = 50_000
        final class Sent: @unchecked Sendable { var value = false }
        let sent = Sent()
        while true {
            do {
                return try blocking { try await TableStore.flip(client, name, generation: generation, overwrite: overwrite, catalog: catalog) {
                    sent.value = true
                    sending()
                } }
            } catch let e as WeftError where [.unavailable, .timeout].contains(e.code) && !sent.value && wallMillis() < deadline {
                // Retried only while the commit was not sent: once it may
                // have happened, a second flip could not tell.
                usleep(pause)
                pause = min(pause * 2, 1_000_000)
            }
        }
    }

    /// On the driver, after the flip committed: deletes the blocks of every
    /// launched attempt other than each partition's winner (the fence in
    /// `write` keeps any from appearing later). Returns how many it
    /// deleted. Best effort: what it cannot reach goes when the table is
    /// replaced or dropped.
    static func collectLosers(_ client: WeftClient, _ name: String, generation: String, parts: [OutputPart],
                              launched: Set<ResultAttempt>) -> Int {
        let winners = Dictionary(parts.map { ($0.partition, $0.base) }, uniquingKeysWith: { a, _ in a })
        let set = TableStore.blockSet(name, generation)
        let n = client.participantCount
        var deleted = 0
        for a in launched.sorted(by: { ($0.action, $0.partition, $0.attempt) < ($1.action, $1.partition, $1.attempt) }) {
            let base = Self.base(action: a.action, attempt: a.attempt)
            if winners[a.partition] == base { continue }
            var i = 0
            while i < attemptStride {
                let key = Blocks.key(set, partition: a.partition, index: base + i, replica: 0, participants: n)
                guard let present = try? blocking({ try await client.get(key).value != nil }), present else { break }
                guard (try? blocking({ _ = try await client.delete(key) })) != nil else { break }
                deleted += 1
                i += 1
            }
        }
        return deleted
    }

    /// On the driver, when the job fails before the flip: its blocks and
    /// marker (best effort; `table gc` finishes the job).
    public static func abandon(_ client: WeftClient, _ name: String, generation: String) {
        _ = try? blocking {
            try await Blocks.deleteSet(client, TableStore.blockSet(name, generation))
            _ = try await client.delete(TableStore.pendingKey(name, generation))
        }
    }
}
