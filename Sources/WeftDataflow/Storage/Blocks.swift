import Foundation
import WeftCore
import WeftProtocol
import WeftRuntime

/// Blocks: the one storage unit of tables, reliably persisted partitions
/// and checkpoints. A table is a checkpointed dataset: a set of partitions,
/// each a sequence of immutable blocks.
///
/// A block is ONE value in the store, at most `Limits.tableBlockBytesMax`
/// bytes:
///
/// ```
/// "WBLK" | u8 version (2) | u8 kind | u64 LE checksum of the rest | payload
/// kind 1, lines:  varint first line number, then per row: varint length, bytes
/// kind 2, kv:     per row: varint key length, key, varint value length, value
/// kind 3, piece:  a slice of an encoded reliable partition (`ReliableBlocks`)
/// ```
///
/// Replica `j` of block `i` of partition `p` of set `s` is the key
/// `b/<s>/<p>/<i>/<j>/<salt>`, the salt chosen (deterministically, so a
/// reader computes the same key) so that the key lives on participant
/// `(p + j) mod n`: replicas of a partition are on distinct participants,
/// and participant `p mod n` is partition `p`'s preferred location. A
/// block's replicas are written in one transaction (2PC across them).
public enum Blocks {
    static let magic: [UInt8] = Array("WBLK".utf8)
    public static let version: UInt8 = 2
    public static let headerBytes = 14

    public enum Kind: UInt8, Sendable {
        case lines = 1, kv = 2, piece = 3
    }

    /// A block being filled: the header is reserved, rows are appended,
    /// `seal` writes the checksum.
    public struct Builder {
        public private(set) var writer: ByteWriter
        public let kind: Kind
        public private(set) var rows = 0

        public init(kind: Kind, firstLine: UInt64 = 0, capacity: Int = Limits.tableBlockBytesMax) {
            self.kind = kind
            writer = ByteWriter(capacity: capacity)
            writer.raw(Blocks.magic)
            writer.u8(Blocks.version)
            writer.u8(kind.rawValue)
            writer.u64(0)
            if kind == .lines { writer.varint(firstLine) }
        }

        public var byteCount: Int { writer.bytes.count }

        /// Bytes a row adds: its fields with their varint lengths.
        public static func cost(_ fields: Int...) -> Int {
            fields.reduce(0) { $0 + $1 + varintBytes($1) }
        }

        public mutating func appendLine(_ line: UnsafeRawBufferPointer) {
            writer.varint(UInt64(line.count))
            writer.raw(line)
            rows += 1
        }

        public mutating func appendRow(_ key: Bytes, _ value: Bytes) {
            writer.blob(key)
            writer.blob(value)
            rows += 1
        }

        public mutating func appendPiece(_ bytes: ArraySlice<UInt8>) {
            writer.raw(bytes)
            rows += 1
        }

        public func seal() -> Bytes {
            var b = writer.bytes
            let sum = b.withUnsafeBytes { blockChecksum(UnsafeRawBufferPointer(rebasing: $0[Blocks.headerBytes...])) }
            withUnsafeBytes(of: sum.littleEndian) { for i in 0..<8 { b[6 + i] = $0[i] } }
            return b
        }
    }

    static func varintBytes(_ n: Int) -> Int {
        var n = n, k = 1
        while n >= 0x80 { n >>= 7; k += 1 }
        return k
    }

    /// Checks a block's header and checksum; its kind. `what` names the
    /// block in the error (table, partition, block).
    public static func verify(_ bytes: UnsafeRawBufferPointer, what: @autoclosure () -> String) throws -> Kind {
        guard bytes.count >= headerBytes, bytes[0] == magic[0], bytes[1] == magic[1], bytes[2] == magic[2], bytes[3] == magic[3] else {
            throw WeftError(.corrupted, "\(what()) is not a block (no WBLK header)")
        }
        guard bytes[4] == version else { throw WeftError(.corrupted, "\(what()) has block format \(bytes[4]), not \(version)") }
        guard let kind = Kind(rawValue: bytes[5]) else { throw WeftError(.corrupted, "\(what()) has unknown block kind \(bytes[5])") }
        let stored = bytes.loadUnaligned(fromByteOffset: 6, as: UInt64.self).littleEndian
        guard blockChecksum(UnsafeRawBufferPointer(rebasing: bytes[headerBytes...])) == stored else {
            throw WeftError(.corrupted, "\(what()) fails its checksum")
        }
        return kind
    }

    /// The participant that holds replica `replica` of `partition`.
    public static func target(partition: Int, replica: Int, participants n: Int) -> ParticipantId {
        (partition + replica) % n
    }

    public static func key(_ set: String, partition: Int, index: Int, replica: Int, participants n: Int) -> Bytes {
        placedKey("b/\(set)/\(partition)/\(index)/\(replica)", on: target(partition: partition, replica: replica, participants: n), of: n)
    }

    public static func setPrefix(_ set: String) -> Bytes { Array("b/\(set)/".utf8) }

    /// A key with `prefix` that the store places on participant `target`.
    static func placedKey(_ prefix: String, on target: ParticipantId, of count: Int) -> Bytes {
        var salt = 0
        while true {
            let k = Array("\(prefix)/\(salt)".utf8)
            if WeftProtocol.Partitioner.participant(for: k, count: count) == target { return k }
            salt += 1
        }
    }

    /// Adds every replica of one block to `t`.
    public static func put(_ t: Transaction, _ set: String, partition: Int, index: Int, block: Bytes, replicas: Int, participants n: Int) throws {
        for j in 0..<max(1, min(replicas, n)) {
            try t.put(key(set, partition: partition, index: index, replica: j, participants: n), block)
        }
    }

    /// Reads a block from the first replica that is present and passes its
    /// checksum; a missing or corrupt replica is skipped for the next (and
    /// counted in `replicaFallbacks`). The error names the block when no
    /// replica is good. `accept` may check more (it decodes, say).
    /// `prefer`: a participant whose replica is tried first (an executor's
    /// own); the others follow in replica order.
    public static func read(_ client: WeftClient, _ set: String, partition: Int, index: Int, replicas: Int, at ts: Timestamp?,
                            what: String, prefer: ParticipantId? = nil) async throws -> Bytes {
        let n = client.participantCount
        var problems: [String] = []
        var order = Array(0..<max(1, min(replicas, n)))
        if let prefer, let i = order.firstIndex(where: { target(partition: partition, replica: $0, participants: n) == prefer }) {
            order.insert(order.remove(at: i), at: 0)
        }
        for j in order {
            let k = key(set, partition: partition, index: index, replica: j, participants: n)
            do {
                guard let v = try await client.get(k, at: ts).value else {
                    problems.append("replica \(j) on participant-\(target(partition: partition, replica: j, participants: n)) is missing")
                    continue
                }
                _ = try v.withUnsafeBytes { try verify($0, what: "\(what) replica \(j)") }
                if j != order[0] { fallbacks.add(1) }
                return v
            } catch let e as WeftError where e.code == .corrupted || e.code == .unavailable || e.code == .timeout {
                problems.append(e.message)
            }
        }
        throw WeftError(.corrupted, "\(what) has no readable replica: " + problems.joined(separator: "; "))
    }

    /// Reads whose first replica was missing or corrupt (process-wide).
    public static let fallbacks = Counter()


    /// Deletes every key of a block set (its blocks and all replicas), in
    /// small pages: blocks are big.
    public static func deleteSet(_ client: WeftClient, _ set: String) async throws {
        try await deleteKeys(client, prefix: setPrefix(set), page: 16)
    }

    /// Deletes every key under `prefix`, `page` keys per transaction.
    static func deleteKeys(_ client: WeftClient, prefix: Bytes, page: Int) async throws {
        for part in 0..<client.participantCount {
            while true {
                let at = try await client.now()
                let (old, more) = try await client.scanParticipant(part, prefix: prefix, from: nil, limit: page, at: at)
                if old.isEmpty { break }
                let t = try await client.begin()
                for r in old { try t.delete(r.key) }
                try await t.commit()
                if !more { break }
            }
        }
    }
}

