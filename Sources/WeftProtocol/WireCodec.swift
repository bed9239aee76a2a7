import WeftCore

/// The binary encoding of every `Message` and `Envelope`, version 2
/// (version 2: connections open with the authenticated handshake).
///
/// An envelope is `from`, `to`, then the message: a one-byte tag followed by
/// its fields in declaration order. Integers are LEB128 varints, timestamps
/// and ids are fixed 8-byte little-endian, byte strings are a varint length
/// then the bytes, optionals a presence byte. Tags are stable: a new
/// message gets a new tag, and an unknown tag is a decode error, never a crash.
public enum WireCodec {
    public static let version: UInt8 = 2

    public static func encode(_ env: Envelope) -> Bytes {
        var w = ByteWriter(capacity: 64)
        encode(env, into: &w)
        return w.bytes
    }

    public static func encode(_ env: Envelope, into w: inout ByteWriter) {
        address(env.from, &w)
        address(env.to, &w)
        message(env.message, &w)
    }

    public static func decodeEnvelope(_ r: inout ByteReader) throws(DecodeError) -> Envelope {
        let from = try address(&r)
        let to = try address(&r)
        return Envelope(from: from, to: to, try message(&r))
    }

    // MARK: Addresses

    public static func address(_ a: NodeAddress, _ w: inout ByteWriter) {
        switch a {
        case .coordinator: w.u8(0)
        case .participant(let p): w.u8(1); w.int(p)
        case .client(let c): w.u8(2); w.u64(c)
        }
    }

    static func address(_ r: inout ByteReader) throws(DecodeError) -> NodeAddress {
        switch try r.u8() {
        case 0: return .coordinator
        case 1: return .participant(try r.int(max: 1 << 16))
        case 2: return .client(try r.u64())
        case let t: throw DecodeError("unknown address tag \(t)")
        }
    }

    // MARK: Pieces

    static func error(_ e: WeftError, _ w: inout ByteWriter) {
        w.string(e.code.rawValue)
        w.string(e.message)
    }

    static func error(_ r: inout ByteReader) throws(DecodeError) -> WeftError {
        let code = try r.string(max: 64)
        let message = try r.string(max: 1 << 16)
        return WeftError(WeftError.Code(rawValue: code) ?? .storage, message)
    }

    static func part(_ p: TxnPart, _ w: inout ByteWriter) {
        w.int(p.reads.count)
        for k in p.reads { w.blob(k) }
        w.writes(p.writes)
    }

    static func part(_ r: inout ByteReader) throws(DecodeError) -> TxnPart {
        let n = try r.int(max: Limits.txnWritesMax)
        var reads: [Bytes] = []
        reads.reserveCapacity(n)
        for _ in 0..<n { reads.append(try r.blob(max: Limits.keyBytesMax)) }
        return TxnPart(reads: reads, writes: try r.writes())
    }

    static func outcome(_ o: CommitOutcome, _ w: inout ByteWriter) {
        switch o {
        case .committed(let ts): w.u8(0); w.u64(ts)
        case .aborted(let e): w.u8(1); error(e, &w)
        case .unknown(let e): w.u8(2); error(e, &w)
        }
    }

    static func outcome(_ r: inout ByteReader) throws(DecodeError) -> CommitOutcome {
        switch try r.u8() {
        case 0: return .committed(try r.u64())
        case 1: return .aborted(try error(&r))
        case 2: return .unknown(try error(&r))
        case let t: throw DecodeError("unknown outcome tag \(t)")
        }
    }

    static func optionalBlob(_ b: Bytes?, _ w: inout ByteWriter) {
        if let b { w.bool(true); w.blob(b) } else { w.bool(false) }
    }

    static func optionalBlob(_ r: inout ByteReader, max: Int) throws(DecodeError) -> Bytes? {
        try r.bool() ? try r.blob(max: max) : nil
    }

    static func optionalU64(_ v: UInt64?, _ w: inout ByteWriter) {
        if let v { w.bool(true); w.u64(v) } else { w.bool(false) }
    }

    static func optionalU64(_ r: inout ByteReader) throws(DecodeError) -> UInt64? {
        try r.bool() ? try r.u64() : nil
    }

    // MARK: Messages

    static func message(_ m: Message, _ w: inout ByteWriter) {
        switch m {
        case .begin(let req): w.u8(1); w.u64(req)
        case let .began(req, ts): w.u8(2); w.u64(req); w.u64(ts)
        case let .commit(req, txn, startTs, parts):
            w.u8(3); w.u64(req); w.u64(txn); w.u64(startTs)
            w.int(parts.count)
            for (p, part) in parts.sorted(by: { $0.key < $1.key }) { w.int(p); self.part(part, &w) }
        case let .commitResult(req, txn, o): w.u8(4); w.u64(req); w.u64(txn); outcome(o, &w)
        case let .status(req, txn): w.u8(5); w.u64(req); w.u64(txn)
        case let .statusResult(req, txn, status):
            w.u8(6); w.u64(req); w.u64(txn)
            switch status {
            case .committed(let ts): w.u8(0); w.u64(ts)
            case .pending: w.u8(1)
            case .aborted: w.u8(2)
            case .unknown: w.u8(3)
            }
        case let .read(req, key, ts): w.u8(7); w.u64(req); w.blob(key); w.u64(ts)
        case let .readResult(req, value, version): w.u8(8); w.u64(req); optionalBlob(value, &w); w.u64(version)
        case let .scan(req, start, end, limit, ts): w.u8(9); w.u64(req); w.blob(start); optionalBlob(end, &w); w.int(limit); w.u64(ts)
        case let .scanResult(req, rows, more):
            w.u8(10); w.u64(req); w.int(rows.count)
            for row in rows { w.blob(row.key); w.blob(row.value); w.u64(row.version) }
            w.bool(more)
        case let .failed(req, e): w.u8(11); w.u64(req); error(e, &w)
        case let .prepare(txn, startTs, commitTs, participants, p):
            w.u8(12); w.u64(txn); w.u64(startTs); w.u64(commitTs); w.participants(participants); part(p, &w)
        case let .commitOnePhase(txn, startTs, commitTs, p): w.u8(13); w.u64(txn); w.u64(startTs); w.u64(commitTs); part(p, &w)
        case let .decide(txn, commit): w.u8(14); w.u64(txn); w.bool(commit)
        case .clock(let ts): w.u8(15); w.u64(ts)
        case let .vote(txn, from, vote):
            w.u8(16); w.u64(txn); w.int(from)
            switch vote {
            case .yes: w.u8(0)
            case .readOnly: w.u8(1)
            case .no(let e): w.u8(2); error(e, &w)
            }
        case let .onePhaseResult(txn, from, o): w.u8(17); w.u64(txn); w.int(from); outcome(o, &w)
        case let .ack(txn, from): w.u8(18); w.u64(txn); w.int(from)
        case let .queryOutcome(txn, from): w.u8(19); w.u64(txn); w.int(from)
        case .clockQuery(let from): w.u8(20); w.int(from)
        case let .peerQuery(txn, commitTs, from): w.u8(21); w.u64(txn); w.u64(commitTs); w.int(from)
        case let .peerOutcome(txn, from, committed):
            w.u8(22); w.u64(txn); w.int(from)
            w.u8(committed == nil ? 2 : committed! ? 1 : 0)
        case let .pin(req, ts, lease): w.u8(23); w.u64(req); w.u64(ts); w.u64(lease)
        case let .pinned(req, ts): w.u8(24); w.u64(req); w.u64(ts)
        }
    }

    static func message(_ r: inout ByteReader) throws(DecodeError) -> Message {
        let pmax = 1 << 16
        switch try r.u8() {
        case 1: return .begin(req: try r.u64())
        case 2: return .began(req: try r.u64(), ts: try r.u64())
        case 3:
            let req = try r.u64(), txn = try r.u64(), startTs = try r.u64()
            let n = try r.int(max: pmax)
            var parts: [ParticipantId: TxnPart] = [:]
            for _ in 0..<n {
                let p = try r.int(max: pmax)
                parts[p] = try part(&r)
            }
            return .commit(req: req, txn: txn, startTs: startTs, parts: parts)
        case 4: return .commitResult(req: try r.u64(), txn: try r.u64(), outcome: try outcome(&r))
        case 5: return .status(req: try r.u64(), txn: try r.u64())
        case 6:
            let req = try r.u64(), txn = try r.u64()
            let status: TxnStatus
            switch try r.u8() {
            case 0: status = .committed(try r.u64())
            case 1: status = .pending
            case 2: status = .aborted
            case 3: status = .unknown
            case let t: throw DecodeError("unknown status tag \(t)")
            }
            return .statusResult(req: req, txn: txn, status: status)
        case 7: return .read(req: try r.u64(), key: try r.blob(max: Limits.keyBytesMax), ts: try r.u64())
        case 8: return .readResult(req: try r.u64(), value: try optionalBlob(&r, max: Limits.valueBytesMax), version: try r.u64())
        case 9:
            return .scan(req: try r.u64(), start: try r.blob(max: Limits.keyBytesMax), end: try optionalBlob(&r, max: Limits.keyBytesMax),
                         limit: try r.int(max: Limits.scanLimitMax), ts: try r.u64())
        case 10:
            let req = try r.u64()
            let n = try r.int(max: Limits.scanLimitMax)
            var rows: [ScanRow] = []
            for _ in 0..<n {
                rows.append(ScanRow(key: try r.blob(max: Limits.keyBytesMax), value: try r.blob(max: Limits.valueBytesMax), version: try r.u64()))
            }
            return .scanResult(req: req, rows: rows, more: try r.bool())
        case 11: return .failed(req: try r.u64(), error: try error(&r))
        case 12:
            return .prepare(txn: try r.u64(), startTs: try r.u64(), commitTs: try r.u64(), participants: try r.participants(), part: try part(&r))
        case 13: return .commitOnePhase(txn: try r.u64(), startTs: try r.u64(), commitTs: try r.u64(), part: try part(&r))
        case 14: return .decide(txn: try r.u64(), commit: try r.bool())
        case 15: return .clock(ts: try r.u64())
        case 16:
            let txn = try r.u64(), from = try r.int(max: pmax)
            let vote: Vote
            switch try r.u8() {
            case 0: vote = .yes
            case 1: vote = .readOnly
            case 2: vote = .no(try error(&r))
            case let t: throw DecodeError("unknown vote tag \(t)")
            }
            return .vote(txn: txn, from: from, vote: vote)
        case 17: return .onePhaseResult(txn: try r.u64(), from: try r.int(max: pmax), outcome: try outcome(&r))
        case 18: return .ack(txn: try r.u64(), from: try r.int(max: pmax))
        case 19: return .queryOutcome(txn: try r.u64(), from: try r.int(max: pmax))
        case 20: return .clockQuery(from: try r.int(max: pmax))
        case 21: return .peerQuery(txn: try r.u64(), commitTs: try r.u64(), from: try r.int(max: pmax))
        case 22:
            let txn = try r.u64(), from = try r.int(max: pmax)
            switch try r.u8() {
            case 0: return .peerOutcome(txn: txn, from: from, committed: false)
            case 1: return .peerOutcome(txn: txn, from: from, committed: true)
            case 2: return .peerOutcome(txn: txn, from: from, committed: nil)
            case let t: throw DecodeError("bad peer outcome \(t)")
            }
        case 23: return .pin(req: try r.u64(), ts: try r.u64(), leaseMillis: try r.u64())
        case 24: return .pinned(req: try r.u64(), ts: try r.u64())
        case let t: throw DecodeError("unknown message tag \(t)")
        }
    }
}
