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

extension PreparedTxn {
    public static let formatVersion: UInt8 = 1

    public func encoded() -> Bytes {
        var w = ByteWriter(capacity: 64)
        w.u8(Self.formatVersion)
        w.u64(txn)
        w.u64(startTs)
        w.u64(commitTs)
        w.participants(participants)
        w.u64(preparedAtMillis)
        w.writes(writes)
        return w.bytes
    }

    public static func decode(_ b: Bytes) throws(DecodeError) -> PreparedTxn {
        try b.decode { (r: inout ByteReader) throws(DecodeError) -> PreparedTxn in
            let v = try r.u8()
            if v != formatVersion { throw DecodeError("PREPARED record format \(v), expected \(formatVersion)") }
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
    public static let formatVersion: UInt8 = 1
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
        return w.bytes
    }

    public static func decode(_ buf: UnsafeRawBufferPointer) throws(DecodeError) -> CommitRecord {
        var r = ByteReader(buf)
        let v = try r.u8()
        if v != formatVersion { throw DecodeError("commit record format \(v), expected \(formatVersion)") }
        let txn = try r.u64()
        let ws = try r.writes()
        try r.expectEnd()
        return CommitRecord(txn: txn, writes: ws)
    }
}

extension Decision {
    public static let formatVersion: UInt8 = 1

    public func encoded() -> Bytes {
        var w = ByteWriter(capacity: 32)
        w.u8(Self.formatVersion)
        w.u64(txn)
        w.u64(commitTs)
        w.participants(participants)
        return w.bytes
    }

    public static func decode(_ b: Bytes) throws(DecodeError) -> Decision {
        try b.decode { (r: inout ByteReader) throws(DecodeError) -> Decision in
            let v = try r.u8()
            if v != formatVersion { throw DecodeError("decision record format \(v), expected \(formatVersion)") }
            let d = Decision(txn: try r.u64(), commitTs: try r.u64(), participants: try r.participants())
            try r.expectEnd()
            return d
        }
    }
}
