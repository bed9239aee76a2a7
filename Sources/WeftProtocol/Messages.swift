import WeftCore

/// Who a message is for. Clients are named by a number their shell picks.
public enum NodeAddress: Hashable, Sendable, CustomStringConvertible {
    case coordinator
    case participant(ParticipantId)
    case client(UInt64)

    public var description: String {
        switch self {
        case .coordinator: return "coordinator"
        case .participant(let p): return "participant-\(p)"
        case .client(let c): return "client-\(c)"
        }
    }
}

/// One buffered write: `value == nil` deletes the key.
public struct WriteOp: Sendable, Equatable, Hashable {
    public var key: Bytes
    public var value: Bytes?
    public init(key: Bytes, value: Bytes?) {
        self.key = key
        self.value = value
    }
}

/// What one participant is asked to validate and apply for a transaction.
public struct TxnPart: Sendable, Equatable {
    /// Keys read at the transaction's start timestamp.
    public var reads: [Bytes]
    public var writes: [WriteOp]
    public init(reads: [Bytes] = [], writes: [WriteOp] = []) {
        self.reads = reads
        self.writes = writes
    }
    public var isReadOnly: Bool { writes.isEmpty }
}

/// A participant's answer to PREPARE.
public enum Vote: Sendable, Equatable {
    /// Validated, locked, PREPARED record forced: will commit if told to.
    case yes
    /// Validated reads only; the participant has already forgotten the transaction.
    case readOnly
    case no(WeftError)
}

/// How a commit request ended, as the client sees it.
public enum CommitOutcome: Sendable, Equatable {
    case committed(Timestamp)
    case aborted(WeftError)
    /// The coordinator could not learn the outcome in time (a participant
    /// went silent during one-phase commit); ask later by transaction id.
    case unknown(WeftError)
}

/// What a node knows about a transaction, for `weft txn status`.
public enum TxnStatus: Sendable, Equatable {
    case committed(Timestamp)
    /// Still being decided: ask again.
    case pending
    /// Aborted, or (from a participant) now refused so it can never commit.
    case aborted
    /// This node has no record (the coordinator does not log one-phase
    /// commits or aborts; a participant may have forgotten an old outcome).
    case unknown
}

public struct ScanRow: Sendable, Equatable {
    public var key: Bytes
    public var value: Bytes
    public var version: Timestamp
    public init(key: Bytes, value: Bytes, version: Timestamp) {
        self.key = key
        self.value = value
        self.version = version
    }
}

/// Every message between clients, the coordinator and participants.
/// Request ids (`req`) are chosen by the sender of a request and echoed back.
public enum Message: Sendable, Equatable {
    // client <-> coordinator
    case begin(req: UInt64)
    case began(req: UInt64, ts: Timestamp)
    case commit(req: UInt64, txn: TxnId, startTs: Timestamp, parts: [ParticipantId: TxnPart])
    case commitResult(req: UInt64, txn: TxnId, outcome: CommitOutcome)
    /// Asks the coordinator (or a participant) what became of a transaction.
    case status(req: UInt64, txn: TxnId)
    case statusResult(req: UInt64, txn: TxnId, status: TxnStatus)

    // client <-> participant
    case read(req: UInt64, key: Bytes, ts: Timestamp)
    case readResult(req: UInt64, value: Bytes?, version: Timestamp)
    case scan(req: UInt64, start: Bytes, end: Bytes?, limit: Int, ts: Timestamp)
    case scanResult(req: UInt64, rows: [ScanRow], more: Bool)
    case failed(req: UInt64, error: WeftError)
    /// Holds the versions a snapshot at `ts` reads against garbage
    /// collection for `leaseMillis` from now (capped at
    /// `Limits.pinLeaseMillisMax`); sending it again renews the lease; 0
    /// releases it. A lease belongs to (client, ts) and is not durable.
    case pin(req: UInt64, ts: Timestamp, leaseMillis: UInt64)
    case pinned(req: UInt64, ts: Timestamp)

    // coordinator -> participant
    case prepare(txn: TxnId, startTs: Timestamp, commitTs: Timestamp, participants: [ParticipantId], part: TxnPart)
    case commitOnePhase(txn: TxnId, startTs: Timestamp, commitTs: Timestamp, part: TxnPart)
    case decide(txn: TxnId, commit: Bool)
    /// Reply to `clockQuery`: every timestamp the oracle has handed out is below `ts`.
    case clock(ts: Timestamp)

    // participant -> coordinator
    case vote(txn: TxnId, from: ParticipantId, vote: Vote)
    case onePhaseResult(txn: TxnId, from: ParticipantId, outcome: CommitOutcome)
    case ack(txn: TxnId, from: ParticipantId)
    case queryOutcome(txn: TxnId, from: ParticipantId)
    case clockQuery(from: ParticipantId)

    // participant <-> participant (cooperative termination)
    /// "Do you know the outcome of `txn`?" from an in-doubt participant
    /// whose coordinator does not answer.
    case peerQuery(txn: TxnId, commitTs: Timestamp, from: ParticipantId)
    /// true: committed here; false: aborted here (or refused here, so it can
    /// never commit); nil: this peer does not know either.
    case peerOutcome(txn: TxnId, from: ParticipantId, committed: Bool?)
}

public struct Envelope: Sendable, Equatable {
    public var from: NodeAddress
    public var to: NodeAddress
    public var message: Message
    public init(from: NodeAddress, to: NodeAddress, _ message: Message) {
        self.from = from
        self.to = to
        self.message = message
    }
}

/// Keys are hash-partitioned across participants with a stable hash, so the
/// owner of a key is the same in every process and after every restart.
public enum Partitioner {
    public static func participant(for key: Bytes, count: Int) -> ParticipantId {
        precondition(count > 0)
        return Int(stableHash(key) % UInt64(count))
    }
}

/// Which role may send which message to whom. Applied by the network shell
/// to every envelope that arrives on an authenticated connection (after
/// its `from` was checked against the connection's proven identity): a
/// client can ask, but only the coordinator can tell a participant to
/// prepare, commit or decide, and only participants vote or answer peers.
public enum Authorization {
    /// nil if `env` is allowed; else why not.
    public static func refusal(_ env: Envelope) -> String? {
        let ok: Bool
        switch (env.from, env.message) {
        // A client asks the coordinator for timestamps and commits, and
        // participants for reads, scans and snapshot leases; anyone for status.
        case (.client, .begin), (.client, .commit):
            ok = env.to == .coordinator
        case (.client, .read), (.client, .scan), (.client, .pin):
            if case .participant = env.to { ok = true } else { ok = false }
        case (.client, .status):
            if case .client = env.to { ok = false } else { ok = true }
        // The coordinator answers clients and directs participants.
        case (.coordinator, .began), (.coordinator, .commitResult):
            if case .client = env.to { ok = true } else { ok = false }
        case (.coordinator, .prepare), (.coordinator, .commitOnePhase), (.coordinator, .decide), (.coordinator, .clock):
            if case .participant = env.to { ok = true } else { ok = false }
        case (.coordinator, .statusResult), (.coordinator, .failed):
            ok = true
        // A participant answers clients, votes and acknowledges to the
        // coordinator, and asks its peers, always in its own name.
        case (.participant, .readResult), (.participant, .scanResult), (.participant, .pinned),
             (.participant, .statusResult), (.participant, .failed):
            ok = true
        case let (.participant(p), .vote(_, from, _)), let (.participant(p), .onePhaseResult(_, from, _)),
             let (.participant(p), .ack(_, from)), let (.participant(p), .queryOutcome(_, from)), let (.participant(p), .clockQuery(from)):
            ok = p == from && env.to == .coordinator
        case let (.participant(p), .peerQuery(_, _, from)), let (.participant(p), .peerOutcome(_, from, _)):
            if case .participant(let q) = env.to { ok = p == from && q != p } else { ok = false }
        default:
            ok = false
        }
        return ok ? nil : "\(env.from) may not send \(kind(env.message)) to \(env.to)"
    }

    /// A message's or frame's case name, for error messages.
    public static func kind(_ m: some Any) -> String {
        let s = "\(m)"
        return String(s.prefix { $0 != "(" })
    }
}
