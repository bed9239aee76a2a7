import WeftCore

/// A transaction a participant has voted YES for and not yet resolved.
/// It is forced to disk before the vote leaves the participant.
public struct PreparedTxn: Sendable, Equatable {
    public var txn: TxnId
    public var startTs: Timestamp
    public var commitTs: Timestamp
    /// Every participant of the transaction, for cooperative termination and
    /// for `weft admin in-doubt`.
    public var participants: [ParticipantId]
    public var writes: [WriteOp]
    /// Wall-clock ms when prepared, to report the age of in-doubt transactions.
    public var preparedAtMillis: UInt64

    public init(txn: TxnId, startTs: Timestamp, commitTs: Timestamp, participants: [ParticipantId], writes: [WriteOp], preparedAtMillis: UInt64) {
        self.txn = txn
        self.startTs = startTs
        self.commitTs = commitTs
        self.participants = participants
        self.writes = writes
        self.preparedAtMillis = preparedAtMillis
    }
}

/// What a participant asks its shell to make durable. Records emitted by one
/// step, and every step before it, are written in one LMDB commit before any
/// message of those steps is sent.
public enum ParticipantRecord: Sendable, Equatable {
    /// PREPARED: the writes and participants of a transaction voted YES.
    case prepared(PreparedTxn)
    /// The transaction's writes as one commit record keyed by `commitTs`, and
    /// (atomically) the removal of its PREPARED record if any.
    case committed(txn: TxnId, commitTs: Timestamp, writes: [WriteOp])
    /// Removal of a PREPARED record. Never forced on its own (presumed abort).
    case aborted(txn: TxnId)
    /// Garbage collection: no version in the commit record at `commitTs` is
    /// visible any more, so the record can go.
    case releaseCommit(commitTs: Timestamp)
    /// Reads below this timestamp are refused from now on.
    case gcHorizon(Timestamp)
    /// Cooperative termination: this participant told a peer that `txn`
    /// cannot commit, so it must never vote YES for it. Forced before the answer.
    case refused(txn: TxnId)
}

/// A coordinator decision that was forced and not yet acknowledged by all.
public struct Decision: Sendable, Equatable {
    public var txn: TxnId
    public var commitTs: Timestamp
    public var participants: [ParticipantId]
    public init(txn: TxnId, commitTs: Timestamp, participants: [ParticipantId]) {
        self.txn = txn
        self.commitTs = commitTs
        self.participants = participants
    }
}

public enum CoordinatorRecord: Sendable, Equatable {
    /// The oracle may hand out timestamps below this value.
    case reserveTimestamps(upTo: Timestamp)
    /// COMMIT decision: forced before the client or any participant hears of it.
    case decided(Decision)
    /// Every participant acknowledged: the decision can be forgotten. Lazy.
    case ended(txn: TxnId)
}

// MARK: Encoding (the same codec serves log records and, later, the wire)

extension ByteWriter {
    public mutating func writes(_ ws: [WriteOp]) {
        int(ws.count)
        for w in ws {
            blob(w.key)
            if let v = w.value {
                bool(true)
                blob(v)
            } else {
                bool(false)
            }
        }
    }

    public mutating func participants(_ ps: [ParticipantId]) {
        int(ps.count)
        for p in ps { int(p) }
    }
}

extension ByteReader {
    public mutating func writes() throws(DecodeError) -> [WriteOp] {
        let n = try int(max: Limits.txnWritesMax)
        var ws: [WriteOp] = []
        ws.reserveCapacity(n)
        for _ in 0..<n {
            let k = try blob(max: Limits.keyBytesMax)
            let v: Bytes? = try bool() ? try blob(max: Limits.valueBytesMax) : nil
            ws.append(WriteOp(key: k, value: v))
        }
        return ws
    }

    public mutating func participants() throws(DecodeError) -> [ParticipantId] {
        let n = try int(max: 1 << 16)
        var ps: [ParticipantId] = []
        for _ in 0..<n { ps.append(try int(max: 1 << 16)) }
        return ps
    }
}

/// Durable records have format 2: format 1's fields, then a
/// `RecordChecksum`. Format 1 (no checksum, written before) is still read.
public enum RecordFormat {
    public static let unchecked: UInt8 = 1
    public static let checksummed: UInt8 = 2

    /// A reader over the record's fields (checksum verified and cut off
    /// for format 2), positioned after the format byte.
    public static func open(_ buf: UnsafeRawBufferPointer, _ what: String) throws(DecodeError) -> ByteReader {
        guard let v = buf.first else { throw DecodeError("empty \(what)") }
        switch v {
        case unchecked:
            var r = ByteReader(buf)
            _ = try r.u8()
            return r
        case checksummed:
            var r = ByteReader(try RecordChecksum.verified(buf))
            _ = try r.u8()
            return r
        default:
            throw DecodeError("\(what) format \(v), expected \(unchecked) or \(checksummed)")
        }
    }

    /// `open`, then `body` over the fields.
    public static func read<T>(_ b: Bytes, _ what: String, _ body: (inout ByteReader) throws(DecodeError) -> T) throws(DecodeError) -> T {
        let r: Result<T, DecodeError> = b.withUnsafeBytes { buf in
            do throws(DecodeError) {
                var reader = try open(buf, what)
                return .success(try body(&reader))
            } catch {
                return .failure(error)
            }
        }
        return try r.get()
    }
}

extension PreparedTxn {
    public static let formatVersion = RecordFormat.checksummed

    public func encoded() -> Bytes {
        var w = ByteWriter(capacity: 64)
        w.u8(Self.formatVersion)
        w.u64(txn)
        w.u64(startTs)
        w.u64(commitTs)
        w.participants(participants)
        w.u64(preparedAtMillis)
        w.writes(writes)
        RecordChecksum.seal(&w)
        return w.bytes
    }

    public static func decode(_ b: Bytes) throws(DecodeError) -> PreparedTxn {
        try RecordFormat.read(b, "PREPARED record") { (r: inout ByteReader) throws(DecodeError) -> PreparedTxn in
            let txn = try r.u64(), s = try r.u64(), c = try r.u64()
            let ps = try r.participants()
            let at = try r.u64()
            let ws = try r.writes()
            try r.expectEnd()
            return PreparedTxn(txn: txn, startTs: s, commitTs: c, participants: ps, writes: ws, preparedAtMillis: at)
        }
    }
}

/// The value of a durable commit record: which transaction, and its writes
/// at this participant.
public struct CommitRecord: Sendable, Equatable {
    public static let formatVersion = RecordFormat.checksummed
    public var txn: TxnId
    public var writes: [WriteOp]

    public init(txn: TxnId, writes: [WriteOp]) {
        self.txn = txn
        self.writes = writes
    }

    public func encoded() -> Bytes {
        var w = ByteWriter(capacity: 32 + writes.count * 32)
        w.u8(Self.formatVersion)
        w.u64(txn)
        w.writes(writes)
        RecordChecksum.seal(&w)
        return w.bytes
    }

    public static func decode(_ buf: UnsafeRawBufferPointer) throws(DecodeError) -> CommitRecord {
        var r = try RecordFormat.open(buf, "commit record")
        let txn = try r.u64()
        let ws = try r.writes()
        try r.expectEnd()
        return CommitRecord(txn: txn, writes: ws)
    }
}

extension Decision {
    public static let formatVersion = RecordFormat.checksummed

    public func encoded() -> Bytes {
        var w = ByteWriter(capacity: 32)
        w.u8(Self.formatVersion)
        w.u64(txn)
        w.u64(commitTs)
        w.participants(participants)
        RecordChecksum.seal(&w)
        return w.bytes
    }

    public static func decode(_ b: Bytes) throws(DecodeError) -> Decision {
        try RecordFormat.read(b, "decision record") { (r: inout ByteReader) throws(DecodeError) -> Decision in
            let d = Decision(txn: try r.u64(), commitTs: try r.u64(), participants: try r.participants())
            try r.expectEnd()
            return d
        }
    }
}
