import WeftCore

/// What a coordinator recovers from its LMDB environment on start.
public struct CoordinatorRecovery: Sendable {
    /// The durable high-water mark: no timestamp at or above it was handed out.
    public var reservedTs: Timestamp = 0
    /// COMMIT decisions without END.
    public var decisions: [Decision] = []
    public init() {}
}

/// The coordinator side of two-phase commit (presumed abort) and the
/// timestamp oracle, as a pure state machine.
///
/// A transaction moves: (unknown) -> preparing -> committed -> (ended), or
/// preparing -> (aborted, forgotten), or (unknown) -> onePhase -> (forgotten).
/// Only the COMMIT decision is forced; ABORT is never logged, so a
/// transaction the coordinator has no record of is aborted.
public struct CoordinatorMachine: Sendable {
    enum TxnState {
        case preparing(Preparing)
        case onePhase(client: NodeAddress, req: UInt64, participant: ParticipantId, deadline: UInt64)
        case committed(commitTs: Timestamp, pendingAcks: Set<ParticipantId>, lastSentMillis: UInt64)
    }

    struct Preparing {
        var client: NodeAddress
        var req: UInt64
        var commitTs: Timestamp
        var participants: [ParticipantId]
        var waiting: Set<ParticipantId>
        var yes: Set<ParticipantId>
        var deadline: UInt64
    }

    var nextTs: Timestamp
    public private(set) var reservedTs: Timestamp
    var nowMillis: UInt64
    var txns: [TxnId: TxnState] = [:]
    /// When `tick` last looked through `txns` (see `tick`).
    var lastScanMillis: UInt64 = 0
    /// Recently finished transactions (aborted or one-phase), so a duplicate
    /// commit request cannot run them again; two bounded generations.
    var finished: Set<TxnId> = []
    var finishedOlder: Set<TxnId> = []
    var out = Output<CoordinatorRecord>()

    public init(recovery: CoordinatorRecovery, nowMillis: UInt64) {
        self.nowMillis = nowMillis
        self.reservedTs = recovery.reservedTs
        // Anything below the reservation may have been handed out before a crash.
        self.nextTs = recovery.reservedTs
        for d in recovery.decisions {
            txns[d.txn] = .committed(commitTs: d.commitTs, pendingAcks: Set(d.participants), lastSentMillis: 0)
            for p in d.participants { send(.participant(p), .decide(txn: d.txn, commit: true)) }
        }
    }

    public mutating func takeOutput() -> Output<CoordinatorRecord> {
        defer { out = Output() }
        return out
    }

    /// Hands out a fresh timestamp. A message carrying it is only sent after
    /// the batch holding any new reservation is durable, so a timestamp can
    /// never be handed out twice across a crash.
    public mutating func allocateTimestamp() -> Timestamp {
        let ts = max(nextTs, HLC.timestamp(millis: nowMillis))
        nextTs = ts + 1
        if nextTs >= reservedTs {
            reservedTs = nextTs + HLC.timestamp(millis: Limits.timestampReserveMillis)
            out.records.append(.reserveTimestamps(upTo: reservedTs))
        }
        return ts
    }

    public var inFlight: Int { txns.count }

    /// What the coordinator knows of `txn`: committed (a forced decision),
    /// pending (voting), or unknown (ENDed, aborted, or never two-phase:
    /// presumed abort for a participant that asks).
    public func status(of txn: TxnId) -> TxnStatus {
        switch txns[txn] {
        case .committed(let ts, _, _)?: return .committed(ts)
        case .preparing?, .onePhase?: return .pending
        case nil: return .unknown
        }
    }

    // MARK: Inputs

    public mutating func step(_ env: Envelope) {
        switch env.message {
        case let .begin(req):
            send(env.from, .began(req: req, ts: allocateTimestamp()))
        case let .commit(req, txn, startTs, parts):
            onCommit(client: env.from, req: req, txn: txn, startTs: startTs, parts: parts)
        case let .vote(txn, from, vote):
            onVote(txn: txn, from: from, vote: vote)
        case let .onePhaseResult(txn, _, outcome):
            guard case let .onePhase(client, req, _, _)? = txns[txn] else { return }
            forget(txn)
            send(client, .commitResult(req: req, txn: txn, outcome: outcome))
        case let .ack(txn, from):
            guard case .committed(let ts, var pending, let last)? = txns[txn] else { return }
            pending.remove(from)
            if pending.isEmpty {
                txns[txn] = nil
                out.records.append(.ended(txn: txn))
            } else {
                txns[txn] = .committed(commitTs: ts, pendingAcks: pending, lastSentMillis: last)
            }
        case let .queryOutcome(txn, from):
            switch txns[txn] {
            case .committed?: send(.participant(from), .decide(txn: txn, commit: true))
            case .preparing?, .onePhase?: break // undecided: the participant asks again later
            case nil: send(.participant(from), .decide(txn: txn, commit: false)) // presumed abort
            }
        case let .clockQuery(from):
            send(.participant(from), .clock(ts: allocateTimestamp()))
        case let .status(req, txn):
            send(env.from, .statusResult(req: req, txn: txn, status: status(of: txn)))
        default:
            break
        }
    }

    public mutating func tick(nowMillis: UInt64) {
        self.nowMillis = max(self.nowMillis, nowMillis)
        let now = self.nowMillis
        // A big table (a backlog of decisions a participant that is down
        // has not acknowledged) is looked through every
        // `Limits.coordinatorScanMillisWhenLarge` ms, not every tick: the
        // scan costs in proportion to the table.
        if txns.count > Limits.coordinatorTxnsScannedEveryTickMax && now < lastScanMillis + Limits.coordinatorScanMillisWhenLarge { return }
        let elapsed = min(max(now - min(lastScanMillis, now), 10), 100)
        lastScanMillis = now
        // COMMIT resends are paced: a backlog of undelivered decisions goes
        // out a slice at a time (`Limits.decisionResendsPerTickMax` per
        // 10 ms), so a reconnecting participant's queue never fills with
        // them ahead of everything else (its clock query's answer, new
        // prepares).
        var resendBudget = Limits.decisionResendsPerTickMax * Int(elapsed / 10)
        // Due decisions, grouped by when they were last sent.
        var due: [UInt64: [TxnId]] = [:]
        for (txn, state) in txns {
            switch state {
            case .preparing(let p) where p.deadline <= now:
                abort(txn, p, WeftError(.aborted, "transaction \(txn) aborted: participants \(p.waiting.sorted()) did not vote within \(Limits.prepareTimeoutTicks) ms"))
            case let .onePhase(client, req, participant, deadline) where deadline <= now:
                forget(txn)
                send(client, .commitResult(req: req, txn: txn, outcome: .unknown(WeftError(.outcomeUnknown, "participant \(participant) did not answer the one-phase commit of transaction \(txn) within \(Limits.prepareTimeoutTicks) ms; its outcome is unknown"))))
            case let .committed(_, _, last) where now >= last + Limits.resendIntervalTicks:
                due[last, default: []].append(txn)
            default:
                break
            }
        }
        // Longest-waiting first, so that a backlog bigger than a slice is
        // resent in turn and no decision waits behind the others forever.
        outer: for last in due.keys.sorted() {
            for txn in due[last]! {
                guard resendBudget > 0 else { break outer }
                guard case let .committed(ts, pending, _) = txns[txn] else { continue }
                resendBudget -= pending.count
                txns[txn] = .committed(commitTs: ts, pendingAcks: pending, lastSentMillis: now)
                for p in pending.sorted() { send(.participant(p), .decide(txn: txn, commit: true)) }
            }
        }
    }

    mutating func onCommit(client: NodeAddress, req: UInt64, txn: TxnId, startTs: Timestamp, parts: [ParticipantId: TxnPart]) {
        // A duplicate request: the first one answers.
        if txns[txn] != nil || finished.contains(txn) || finishedOlder.contains(txn) { return }
        let commitTs = allocateTimestamp()
        // A blind write arrives without an id: its commit timestamp, unique too, names it.
        let txn = txn == 0 ? commitTs : txn
        let ids = parts.keys.sorted()
        let deadline = nowMillis + Limits.prepareTimeoutTicks
        if ids.isEmpty {
            return send(client, .commitResult(req: req, txn: txn, outcome: .committed(commitTs)))
        }
        if ids.count == 1 {
            txns[txn] = .onePhase(client: client, req: req, participant: ids[0], deadline: deadline)
            return send(.participant(ids[0]), .commitOnePhase(txn: txn, startTs: startTs, commitTs: commitTs, part: parts[ids[0]]!))
        }
        txns[txn] = .preparing(Preparing(client: client, req: req, commitTs: commitTs, participants: ids, waiting: Set(ids), yes: [], deadline: deadline))
        // Only participants with writes can vote YES and hold a PREPARED
        // record; they are the peers an in-doubt participant may ask.
        let writers = ids.filter { !parts[$0]!.isReadOnly }
        for p in ids {
            send(.participant(p), .prepare(txn: txn, startTs: startTs, commitTs: commitTs, participants: writers, part: parts[p]!))
        }
    }

    mutating func onVote(txn: TxnId, from: ParticipantId, vote: Vote) {
        guard case .preparing(var p)? = txns[txn], p.waiting.contains(from) else { return }
        p.waiting.remove(from)
        switch vote {
        case .no(let err):
            return abort(txn, p, err)
        case .readOnly:
            break
        case .yes:
            p.yes.insert(from)
        }
        guard p.waiting.isEmpty else {
            txns[txn] = .preparing(p)
            return
        }
        if p.yes.isEmpty {
            txns[txn] = nil
            return send(p.client, .commitResult(req: p.req, txn: txn, outcome: .committed(p.commitTs)))
        }
        let decided = Decision(txn: txn, commitTs: p.commitTs, participants: p.yes.sorted())
        out.records.append(.decided(decided))
        txns[txn] = .committed(commitTs: p.commitTs, pendingAcks: p.yes, lastSentMillis: nowMillis)
        send(p.client, .commitResult(req: p.req, txn: txn, outcome: .committed(p.commitTs)))
        for q in decided.participants { send(.participant(q), .decide(txn: txn, commit: true)) }
    }

    mutating func forget(_ txn: TxnId) {
        txns[txn] = nil
        if finished.count >= Limits.outcomeCacheEntriesMax / 2 {
            finishedOlder = finished
            finished = []
        }
        finished.insert(txn)
    }

    mutating func abort(_ txn: TxnId, _ p: Preparing, _ err: WeftError) {
        forget(txn)
        // Participants that have not voted may still prepare; they will ask
        // and hear "abort" by presumption, so telling the YES voters suffices,
        // but telling everyone frees their locks sooner.
        for q in p.participants where p.yes.contains(q) || p.waiting.contains(q) {
            send(.participant(q), .decide(txn: txn, commit: false))
        }
        send(p.client, .commitResult(req: p.req, txn: txn, outcome: .aborted(err)))
    }

    mutating func send(_ to: NodeAddress, _ m: Message) {
        out.messages.append(Envelope(from: .coordinator, to: to, m))
    }
}
