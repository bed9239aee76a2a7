import Foundation
import WeftCore
import WeftProtocol
import WeftRuntime

/// How elements of a reliably persisted RDD become bytes and back.
public struct BlockCodec<T>: @unchecked Sendable {
    public let encode: (T, inout ByteWriter) -> Void
    public let decode: (inout ByteReader) throws(DecodeError) -> T
    /// False for a value this codec cannot encode (checked on a block's
    /// first row before it is spilled).
    public let accepts: (T) -> Bool
    public init(encode: @escaping (T, inout ByteWriter) -> Void, decode: @escaping (inout ByteReader) throws(DecodeError) -> T,
                accepts: @escaping (T) -> Bool = { _ in true }) {
        self.encode = encode
        self.decode = decode
        self.accepts = accepts
    }
}

extension BlockCodec where T == String {
    public static var string: BlockCodec<String> { BlockCodec(encode: { $1.string($0) }, decode: { (r: inout ByteReader) throws(DecodeError) in try r.string(max: Limits.valueBytesMax) }) }
}

extension BlockCodec where T == (String, Int) {
    public static var stringInt: BlockCodec<(String, Int)> {
        BlockCodec(encode: { $1.string($0.0); $1.u64(UInt64(bitPattern: Int64($0.1))) },
                   decode: { (r: inout ByteReader) throws(DecodeError) in (try r.string(max: Limits.valueBytesMax), Int(Int64(bitPattern: try r.u64()))) })
    }
}

extension BlockCodec where T == (String, Double) {
    public static var stringDouble: BlockCodec<(String, Double)> {
        BlockCodec(encode: { $1.string($0.0); $1.u64($0.1.bitPattern) },
                   decode: { (r: inout ByteReader) throws(DecodeError) in (try r.string(max: Limits.valueBytesMax), Double(bitPattern: try r.u64())) })
    }
}

/// Reliably persisted partitions, stored as blocks (`Blocks`): the same
/// keys, checksums, replica placement and fallback as a table's. A
/// partition's encoded rows are cut into pieces of at most
/// `Limits.tableBlockBytesMax` bytes, each piece a block, and every
/// replica of every piece is written with the partition's directory entry
/// `d/<set>/<p>` in ONE transaction (two-phase commit across the
/// participants): after the commit every replica and the entry exist,
/// before it none does.
public enum ReliableBlocks {
    /// Payload bytes per stored piece.
    public static let chunkBytesMax = Limits.tableBlockBytesMax - Blocks.headerBytes
    static let magic: [UInt8] = Array("WBLK".utf8)

    static func directoryKey(_ set: String, _ p: Int) -> Bytes { Array("d/\(set)/\(p)".utf8) }

    public static func encodeBlock<T>(_ items: [T], _ codec: BlockCodec<T>) -> Bytes {
        var payload = ByteWriter(capacity: 64 + items.count * 16)
        payload.int(items.count)
        for x in items { codec.encode(x, &payload) }
        var w = ByteWriter(capacity: payload.bytes.count + 24)
        w.raw(magic)
        w.u8(1)
        w.u64(stableHash(payload.bytes))
        w.raw(payload.bytes)
        return w.bytes
    }

    public static func decodeBlock<T>(_ bytes: Bytes, _ codec: BlockCodec<T>) throws -> [T] {
        try bytes.withUnsafeBytes { buf throws -> [T] in
            var r = ByteReader(buf)
            guard buf.count >= 13, Array(buf[0..<4]) == magic else { throw WeftError(.corrupted, "block has no WBLK header") }
            _ = try r.u32()
            guard try r.u8() == 1 else { throw WeftError(.corrupted, "block format is not 1") }
            let sum = try r.u64()
            let payload = UnsafeRawBufferPointer(rebasing: buf[r.offset...])
            guard stableHash(payload) == sum else { throw WeftError(.corrupted, "block checksum mismatch") }
            var pr = ByteReader(payload)
            let n = try pr.int(max: Int(Int32.max))
            var out: [T] = []
            out.reserveCapacity(n)
            for _ in 0..<n { out.append(try codec.decode(&pr)) }
            try pr.expectEnd()
            return out
        }
    }

    /// Writes one partition's encoded rows to `replicas` participants in one transaction.
    public static func write(_ client: WeftClient, set: String, partition: Int, block: Bytes, replicas: Int) async throws {
        let n = client.participantCount
        let k = max(1, min(replicas, n))
        let pieces = stride(from: 0, to: max(block.count, 1), by: chunkBytesMax).map { block[$0..<min(block.count, $0 + chunkBytesMax)] }
        let t = try await client.begin()
        for (i, piece) in pieces.enumerated() {
            var b = Blocks.Builder(kind: .piece, capacity: piece.count + Blocks.headerBytes)
            b.appendPiece(piece)
            try Blocks.put(t, set, partition: partition, index: i, block: b.seal(), replicas: k, participants: n)
        }
        let entry = "owner=\(WriterTag.current) at=\(Int64(Date().timeIntervalSince1970 * 1000)) blocks=\(pieces.count) bytes=\(block.count) replicas=\(k)"
        try t.put(directoryKey(set, partition), Array(entry.utf8))
        try await t.commit()
    }

    struct Entry {
        var blocks = 0
        var replicas = 1
        init(_ v: Bytes) {
            for f in String(decoding: v, as: UTF8.self).split(separator: " ") {
                if f.hasPrefix("blocks="), let b = Int(f.dropFirst(7)) { blocks = b }
                if f.hasPrefix("replicas="), let r = Int(f.dropFirst(9)) { replicas = r }
            }
        }
    }

    /// Deletes one partition's blocks: every replica of every piece and the
    /// directory entry, in one transaction (all of them go, or none).
    /// False if there was no block.
    @discardableResult
    public static func delete(_ client: WeftClient, set: String, partition: Int) async throws -> Bool {
        let n = client.participantCount
        let t = try await client.begin()
        guard let dir = try await t.get(directoryKey(set, partition)) else { return false }
        let e = Entry(dir)
        for i in 0..<e.blocks {
            for j in 0..<max(1, min(e.replicas, n)) { try t.delete(Blocks.key(set, partition: partition, index: i, replica: j, participants: n)) }
        }
        // Entries written before blocks list their chunk keys (`replica=P:key,key`).
        for f in String(decoding: dir, as: UTF8.self).split(separator: " ") where f.hasPrefix("replica=") {
            for k in f.split(separator: ":", maxSplits: 1).dropFirst().first?.split(separator: ",") ?? [] { try t.delete(Array(k.utf8)) }
        }
        try t.delete(directoryKey(set, partition))
        _ = try await t.commit()
        return true
    }

    /// A block set as its directory entries describe it.
    public struct SetInfo: Sendable {
        public let set: String
        public var partitions: [Int] = []
        public var bytes = 0
        /// `host:pid` of the writer; nil for entries written before owners were recorded.
        public var owner: String?
        /// When the newest partition was written (ms since 1970); nil if unknown.
        public var writtenMillis: Int64?
    }

    /// Every block set in the store, from the directory entries of every
    /// participant (paged, at one timestamp).
    public static func list(_ client: WeftClient) async throws -> [SetInfo] {
        let ts = try await client.now()
        let prefix = Array("d/".utf8)
        var sets: [String: SetInfo] = [:]
        for p in 0..<client.participantCount {
            var from: Bytes? = nil
            while true {
                let (rows, more) = try await client.scanParticipant(p, prefix: prefix, from: from, limit: 1000, at: ts)
                for r in rows {
                    let key = String(decoding: r.key.dropFirst(2), as: UTF8.self)
                    guard let slash = key.lastIndex(of: "/"), let part = Int(key[key.index(after: slash)...]) else { continue }
                    let name = String(key[..<slash])
                    var info = sets[name] ?? SetInfo(set: name)
                    info.partitions.append(part)
                    for f in String(decoding: r.value, as: UTF8.self).split(separator: " ") {
                        if f.hasPrefix("owner=") { info.owner = String(f.dropFirst(6)) }
                        if f.hasPrefix("at="), let at = Int64(f.dropFirst(3)) { info.writtenMillis = max(info.writtenMillis ?? 0, at) }
                        if f.hasPrefix("bytes="), let b = Int(f.dropFirst(6)) { info.bytes += b }
                    }
                    sets[name] = info
                }
                guard more, let last = rows.last else { break }
                from = last.key + [0]
            }
        }
        return sets.values.map { var i = $0; i.partitions.sort(); return i }.sorted { $0.set < $1.set }
    }

    /// Deletes block sets nobody will read again: those whose writer is a
    /// process of this host that has exited (a job killed mid-run), and,
    /// with `olderThanMillis`, any set older than that whose writer is not
    /// seen running here (another host's, or one with no recorded owner).
    /// Each partition goes in its own
    /// transaction. Returns what was deleted and what was kept.
    public static func collectGarbage(_ client: WeftClient, olderThanMillis: Int64? = nil) async throws -> (deleted: [SetInfo], kept: [SetInfo]) {
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        var deleted: [SetInfo] = [], kept: [SetInfo] = []
        for info in try await list(client) {
            let alive = info.owner.flatMap(WriterTag.isAlive)
            // Age never overrules a writer seen running on this host.
            let dead = alive == false
            let old = alive != true && (olderThanMillis.map { limit in (info.writtenMillis ?? 0) < now - limit } ?? false)
            if dead || old {
                for p in info.partitions { try await delete(client, set: info.set, partition: p) }
                deleted.append(info)
            } else {
                kept.append(info)
            }
        }
        return (deleted, kept)
    }

    /// Pieces of one partition read at once.
    public static let readAhead = 8

    /// Reads a partition's encoded rows: each piece from the first
    /// replica that is present and passes its checksum (`Blocks.read`),
    /// then `accept` (the caller decodes there, which checks the rows'
    /// own checksum). nil if the partition was never written; an error
    /// naming the piece if no replica of it is readable. `prefer`: the
    /// participant whose replica of each piece is tried first.
    public static func read(_ client: WeftClient, set: String, partition: Int, prefer: ParticipantId? = nil,
                            accept: (Bytes) throws -> Void = { _ in }) async throws -> Bytes? {
        let ts = try await client.now()
        guard let dir = try await client.get(directoryKey(set, partition), at: ts).value else { return nil }
        let e = Entry(dir)
        // Pieces are read `readAhead` at a time, at the directory entry's
        // timestamp (one clock read, not one per piece).
        var pieces = [Bytes](repeating: [], count: e.blocks)
        var next = 0
        while next < e.blocks {
            let batch = next..<min(e.blocks, next + readAhead)
            try await withThrowingTaskGroup(of: (Int, Bytes).self) { g in
                for i in batch {
                    g.addTask {
                        (i, try await Blocks.read(client, set, partition: partition, index: i, replicas: e.replicas, at: ts,
                                                  what: "block \(i) of partition \(partition) of \(set)", prefer: prefer))
                    }
                }
                for try await (i, piece) in g { pieces[i] = piece }
            }
            next = batch.upperBound
        }
        var bytes = Bytes()
        bytes.reserveCapacity(pieces.reduce(0) { $0 + $1.count })
        for piece in pieces { bytes += piece[Blocks.headerBytes...] }
        guard bytes.count >= 13, Array(bytes[0..<4]) == magic else { throw WeftError(.corrupted, "partition \(partition) of \(set) is not an encoded partition") }
        try accept(bytes)
        return bytes
    }
}

extension RDD {
    /// Persists partitions as reliable blocks: each computed partition is
    /// written, with a checksum, to `replicas` participants in one 2PC
    /// transaction with its directory entry. A partition that is lost from
    /// memory is read back from a surviving replica instead of recomputed.
    @discardableResult
    public func persistReliable(replicas: Int, codec: BlockCodec<T>, client: WeftClient) -> Self {
        let state = ReliableState(replicas: replicas, client: client, set: "\(context.runId)-\(id)", rdd: id, prefer: context.localParticipant,
                                  encode: { ReliableBlocks.encodeBlock($0 as! [T], codec) },
                                  decode: { try ReliableBlocks.decodeBlock($0, codec) })
        reliable = state
        context.reliableRegistry.add(state, partitions: numPartitions)
        return persist(.memory)
    }

    /// Reliable persist that also cuts the lineage once every partition is
    /// stored: after `checkpoint` and one action, the RDD has no parents.
    @discardableResult
    public func checkpoint(replicas: Int, codec: BlockCodec<T>, client: WeftClient) -> Self {
        persistReliable(replicas: replicas, codec: codec, client: client)
        reliable?.cutLineage = true
        return self
    }
}

/// Who writes from this process, `host:pid`: recorded with reliable
/// blocks and unfinished table loads, so garbage collection can tell a
/// writer that has exited (killed mid-run) from one still at work.
public enum WriterTag {
    public static let current: String = {
        var name = [CChar](repeating: 0, count: 256)
        gethostname(&name, name.count - 1)
        return "\(String(cString: name)):\(getpid())"
    }()

    /// True if `tag` is a process running on this host; nil if it is on
    /// another host (this host cannot tell). A reused pid counts as alive.
    public static func isAlive(_ tag: String) -> Bool? {
        guard let colon = tag.lastIndex(of: ":"), let pid = Int32(tag[tag.index(after: colon)...]) else { return nil }
        guard tag[..<colon] == current[..<current.lastIndex(of: ":")!] else { return nil }
        return kill(pid, 0) == 0 || errno != ESRCH
    }
}

/// What a reliably persisted RDD needs to store and find its blocks.
final class ReliableState: @unchecked Sendable {
    let replicas: Int
    let client: WeftClient
    let set: String
    /// The RDD whose partitions these are.
    let rdd: Int
    /// The participant whose replica is read first (the executor's own).
    let prefer: Int?
    let encode: (Any) -> Bytes
    let decode: (Bytes) throws -> Any
    var cutLineage = false
    let lock = NSLock()
    var stored: Set<Int> = []
    var unreadable: Set<Int> = []

    init(replicas: Int, client: WeftClient, set: String, rdd: Int, prefer: Int? = nil,
         encode: @escaping (Any) -> Bytes, decode: @escaping (Bytes) throws -> Any) {
        self.replicas = replicas
        self.client = client
        self.set = set
        self.rdd = rdd
        self.prefer = prefer
        self.encode = encode
        self.decode = decode
    }

    /// The partition from the first readable replica (decoded, checksum
    /// checked); nil if it was never stored; throws if no replica is readable.
    func read(_ partition: Int) throws -> Any? {
        if lock.withLock({ unreadable.contains(partition) }) { return nil }
        let (client, set, prefer) = (self.client, self.set, self.prefer)
        let box = DecodedBox(decode)
        // The partition's directory entry is one key on one participant:
        // while that participant is unreachable (restarting after a
        // crash, say), wait for it a little before recomputing.
        let deadline = wallMillis() + Self.directoryWaitMillis
        var pause: UInt32 = 50_000
        while true {
            do {
                guard try blocking({ try await ReliableBlocks.read(client, set: set, partition: partition, prefer: prefer) { box.value = try box.decode($0) } }) != nil else { return nil }
                return box.value
            } catch let e as WeftError where (e.code == .unavailable || e.code == .timeout) && wallMillis() < deadline {
                usleep(pause)
                pause = min(pause * 2, 500_000)
            }
        }
    }

    /// How long a read waits for an unreachable participant holding a
    /// partition's directory entry before the partition is recomputed.
    static let directoryWaitMillis: UInt64 = 10_000

    func write(_ partition: Int, _ data: Any) throws {
        let block = encode(data)
        let (client, set, k) = (self.client, self.set, replicas)
        try blocking { try await ReliableBlocks.write(client, set: set, partition: partition, block: block, replicas: k) }
        lock.withLock {
            stored.insert(partition)
            unreadable.remove(partition)
        }
    }

    func allStored(_ n: Int) -> Bool { lock.withLock { stored.count == n } }

    /// Another process (an executor) stored the partition: the driver
    /// learns it from the task's reply.
    func noteStored(_ partition: Int) {
        lock.withLock {
            stored.insert(partition)
            unreadable.remove(partition)
        }
    }

    /// Deletes the blocks of every partition written (or tried) so far.
    func deleteAll(_ n: Int) throws {
        let (client, set) = (self.client, self.set)
        try blocking {
            for p in 0..<n { try await ReliableBlocks.delete(client, set: set, partition: p) }
        }
        lock.withLock {
            stored = []
            unreadable = []
        }
    }

    /// A partition none of whose replicas is readable: the RDD is no longer
    /// complete, so the scheduler plans its parents' stages again.
    /// Its replicas are not read again until it is written anew.
    func forget(_ partition: Int) {
        lock.withLock {
            stored.remove(partition)
            unreadable.insert(partition)
        }
    }
}

/// The decoder and what it decoded, across the `blocking` hop (used by one
/// task at a time).
final class DecodedBox: @unchecked Sendable {
    let decode: (Bytes) throws -> Any
    var value: Any?
    init(_ decode: @escaping (Bytes) throws -> Any) { self.decode = decode }
}
