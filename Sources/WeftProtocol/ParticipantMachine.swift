import WeftCore

/// What a state machine step asks its shell to do. The shell writes all
/// `records` in one durable LMDB commit, and only then sends `messages`.
/// That single rule is what makes every vote, ack and reply safe: nothing is
/// promised to anyone before the promise is on disk.
public struct Output<Record: Sendable>: Sendable {
    public var records: [Record] = []
    public var messages: [Envelope] = []
    public init() {}
    public var isEmpty: Bool { records.isEmpty && messages.isEmpty }
}

/// What a participant recovers from its LMDB environment on start.
public struct ParticipantRecovery: Sendable {
    /// Commit records in increasing `commitTs` order.
    public var commits: [(commitTs: Timestamp, record: CommitRecord)] = []
    public var prepared: [PreparedTxn] = []
    public var gcHorizon: Timestamp = 0
    /// Transactions this participant promised peers never to prepare.
    public var refused: Set<TxnId> = []
    public init() {}
}

/// The participant side of two-phase commit, as a pure state machine.
///
/// Concurrency control is optimistic with timestamp ordering:
/// - the coordinator picks `commitTs` before PREPARE; the serialization order
///   is `commitTs` order, which is also the order snapshots see;
/// - PREPARE takes no-wait exclusive locks on the written keys (held until the
///   outcome), aborts on any lock held by another transaction, on any version
///   of a read key newer than `startTs`, on a version of a written key at or
///   after `commitTs`, and on a written key that some reader already read at a
///   timestamp >= `commitTs` (the read cache). Blind writes (keys written but
///   not read) need no `startTs` check: serializability only needs them to
///   land after every version and every read below `commitTs`;
/// - reads at `ts` wait for a prepared lock whose `commitTs <= ts`, and record
///   `ts` in the read cache so no later writer slips beneath them.
///
/// States of a transaction here: (unknown) -> PREPARED -> (committed | aborted),
/// or (unknown) -> (committed) in one-phase commit. Read-only participants
/// never leave (unknown): they validate, vote and forget.
public struct ParticipantMachine: Sendable {
    public let id: ParticipantId
    public private(set) var store = MVCCStore()
    /// Write locks: key -> holder.
    var locks: [ByteKey: TxnId] = [:]
    public private(set) var prepared: [TxnId: PreparedTxn] = [:]
    /// Highest timestamp each key was read at (snapshot reads and validated reads).
    var readCache: [ByteKey: Timestamp] = [:]
    /// A lower bound for every key's read timestamp: raised by scans, by
    /// collapsing the read cache, and unknown (nil) after a restart until
    /// the coordinator reports its clock.
    public private(set) var readFloor: Timestamp
    /// True after a restart until the coordinator's clock arrives: until
    /// then no reader's timestamp is known to be below the floor, so no
    /// PREPARE or one-phase commit is accepted.
    public private(set) var awaitingClock: Bool
    /// Live versions per durable commit record, for garbage collection.
    var commitRefs: [Timestamp: Int] = [:]
    public private(set) var gcHorizon: Timestamp
    var nowMillis: UInt64 = 0
    var lastQueryMillis: [TxnId: UInt64] = [:]
    var lastClockQueryMillis: UInt64 = 0
    var lastGCMillis: UInt64 = 0
    var parked: [TxnId: [(from: NodeAddress, message: Message, deadline: UInt64)]] = [:]
    /// Snapshots pinned against garbage collection (ts -> pin count), by
    /// embedded callers.
    var pins: [Timestamp: Int] = [:]
    /// Snapshot leases of remote clients: (client, ts) -> expiry (ms).
    var leases: [LeaseKey: UInt64] = [:]
    public var retentionMillis: UInt64 = Limits.versionRetentionTicks
    /// Two-phase transactions committed here (txn -> commitTs), for answering
    /// peers; bounded, with everything at or below `outcomeFloor` forgotten.
    var committedTxns: [TxnId: Timestamp] = [:]
    var committedOlder: [TxnId: Timestamp] = [:]
    var outcomeFloor: Timestamp = 0
    var refused: Set<TxnId> = []
    var out = Output<ParticipantRecord>()

    /// - Parameter readFloor: every timestamp handed out before this start is
    ///   below it; nil when the participant must first ask the coordinator.
    public init(id: ParticipantId, recovery: ParticipantRecovery, readFloor: Timestamp?, nowMillis: UInt64) {
        self.id = id
        self.readFloor = readFloor ?? 0
        self.awaitingClock = readFloor == nil
        self.gcHorizon = recovery.gcHorizon
        self.nowMillis = nowMillis
        self.lastGCMillis = nowMillis
        if !recovery.commits.isEmpty {
            beginReplay()
            for (ts, rec) in recovery.commits { replayCommit(ts, rec) }
            endReplay()
        }
        refused = recovery.refused
        // Re-take the locks of in-doubt transactions before serving anything.
        for p in recovery.prepared {
            prepared[p.txn] = p
            for w in p.writes { locks[ByteKey(w.key)] = p.txn }
        }
        if readFloor == nil { out.messages.append(Envelope(from: me, to: .coordinator, .clockQuery(from: id))) }
        for p in recovery.prepared {
            out.messages.append(Envelope(from: me, to: .coordinator, .queryOutcome(txn: p.txn, from: id)))
            lastQueryMillis[p.txn] = nowMillis
        }
    }

    var me: NodeAddress { .participant(id) }

    /// Rebuilds memory from one durable commit record; records must come in
    /// increasing `commitTs` order. Lets a shell stream a large LMDB file
    /// instead of holding it all in a `ParticipantRecovery`.
    public mutating func beginReplay(chunks: ArenaChunkSource? = nil) {
        store.chunkSource = chunks
        store.beginBulkLoad()
    }
    public mutating func endReplay() {
        store.chunkSource = nil
        store.endBulkLoad()
    }

    /// Replays an encoded commit record (`CommitRecord.encoded()`) in
    /// place: keys and values go from the buffer to the store's arena with
    /// no intermediate arrays.
    public mutating func replayCommit(_ ts: Timestamp, encoded buf: UnsafeRawBufferPointer) throws(DecodeError) {
        var r = try RecordFormat.open(buf, "commit record")
        let txn = try r.u64()
        let n = try r.int(max: Limits.txnWritesMax)
        for _ in 0..<n {
            let k = try r.borrowedBlob(max: Limits.keyBytesMax)
            // Records replay in commit order, so every version is newer than
            // the key's last; a record that says otherwise (a key written
            // twice, or out of order) is damaged: an error, not a trap.
            let value: UnsafeRawBufferPointer? = try r.bool() ? try r.borrowedBlob(max: Limits.valueBytesMax) : nil
            if let newest = store.applyIfNewer(key: k, value: value, ts: ts) {
                throw DecodeError("commit record at \(ts) writes a key whose newest version is already \(newest)")
            }
        }
        try r.expectEnd()
        commitRefs[ts] = n
        rememberCommitted(txn, ts)
    }

    public mutating func replayCommit(_ ts: Timestamp, _ rec: CommitRecord) {
        for w in rec.writes { store.apply(key: w.key, value: w.value, ts: ts) }
        commitRefs[ts] = rec.writes.count
        rememberCommitted(rec.txn, ts)
    }

    public mutating func takeOutput() -> Output<ParticipantRecord> {
        defer { out = Output() }
        return out
    }

    // MARK: Inputs

    public mutating func step(_ env: Envelope) {
        let from = env.from
        switch env.message {
        case let .read(req, key, ts):
            onRead(from: from, req: req, key: key, ts: ts, original: env.message)
        case let .scan(req, start, end, limit, ts):
            onScan(from: from, req: req, start: start, end: end, limit: limit, ts: ts, original: env.message)
        case let .prepare(txn, startTs, commitTs, participants, part):
            onPrepare(txn: txn, startTs: startTs, commitTs: commitTs, participants: participants, part: part)
        case let .commitOnePhase(txn, startTs, commitTs, part):
            onOnePhase(txn: txn, startTs: startTs, commitTs: commitTs, part: part)
        case let .decide(txn, commit):
            onDecide(txn: txn, commit: commit)
        case let .clock(ts):
            if awaitingClock {
                readFloor = max(readFloor, ts)
                awaitingClock = false
            }
        case let .status(req, txn):
            onStatus(from: from, req: req, txn: txn)
        case let .pin(req, ts, lease):
            onPin(from: from, req: req, ts: ts, leaseMillis: lease)
        case let .peerQuery(txn, commitTs, from):
            onPeerQuery(txn: txn, commitTs: commitTs, from: from)
        case let .peerOutcome(txn, _, committed):
            if let committed, prepared[txn] != nil { onDecide(txn: txn, commit: committed) }
        default:
            break // not addressed to a participant; dropped
        }
    }

    /// Advances time: expires waiting reads, re-asks about in-doubt
    /// transactions, and collects garbage.
    public mutating func tick(nowMillis: UInt64) {
        self.nowMillis = max(self.nowMillis, nowMillis)
        for (txn, list) in parked {
            let (expired, waiting) = (list.filter { $0.deadline <= self.nowMillis }, list.filter { $0.deadline > self.nowMillis })
            parked[txn] = waiting.isEmpty ? nil : waiting
            for p in expired {
                if let req = requestId(p.message) {
                    send(p.from, .failed(req: req, error: WeftError(.locked, "timed out after \(Limits.readWaitTicksMax) ms waiting for in-doubt transaction \(txn) that holds a lock on the key")))
                }
            }
        }
        if awaitingClock && self.nowMillis >= lastClockQueryMillis + Limits.resendIntervalTicks {
            lastClockQueryMillis = self.nowMillis
            send(.coordinator, .clockQuery(from: id))
        }
        for (txn, p) in prepared where self.nowMillis >= (lastQueryMillis[txn] ?? 0) + Limits.resendIntervalTicks {
            lastQueryMillis[txn] = self.nowMillis
            send(.coordinator, .queryOutcome(txn: txn, from: id))
            // Cooperative termination: once in doubt for a while, ask the
            // other writers too; any of them may know, or may refuse.
            if self.nowMillis >= p.preparedAtMillis + Limits.peerQueryAfterTicks {
                for q in p.participants where q != id { send(.participant(q), .peerQuery(txn: txn, commitTs: p.commitTs, from: id)) }
            }
        }
        if leases.values.contains(where: { $0 <= self.nowMillis }) { leases = leases.filter { $0.value > self.nowMillis } }
        if self.nowMillis >= lastGCMillis + 1000 {
            lastGCMillis = self.nowMillis
            collectGarbage()
        }
    }

    public mutating func pin(_ ts: Timestamp) throws(WeftError) {
        if ts < gcHorizon { throw snapshotTooOld(ts) }
        pins[ts, default: 0] += 1
    }

    public mutating func unpin(_ ts: Timestamp) {
        guard let n = pins[ts] else { return }
        pins[ts] = n > 1 ? n - 1 : nil
    }

    /// Takes, renews (same client and ts) or, with 0, releases a lease.
    mutating func onPin(from: NodeAddress, req: UInt64, ts: Timestamp, leaseMillis: UInt64) {
        let key = LeaseKey(holder: from, ts: ts)
        if leaseMillis == 0 {
            leases[key] = nil
            return send(from, .pinned(req: req, ts: ts))
        }
        if leases[key] == nil && ts < gcHorizon { return send(from, .failed(req: req, error: snapshotTooOld(ts))) }
        leases[key] = nowMillis + min(leaseMillis, Limits.pinLeaseMillisMax)
        send(from, .pinned(req: req, ts: ts))
    }

    // MARK: Reads

    /// A read far in the future would raise the read cache (or a scan the
    /// floor) so high that no write could commit until the clock got there.
    func checkReadTs(_ ts: Timestamp) -> WeftError? {
        if ts < gcHorizon { return snapshotTooOld(ts) }
        if ts > HLC.timestamp(millis: nowMillis + Limits.futureReadSlackMillis) {
            return WeftError(.invalidArgument, "timestamp \(ts) is in the future (more than \(Limits.futureReadSlackMillis) ms ahead of participant \(id)'s clock)")
        }
        return nil
    }

    mutating func onRead(from: NodeAddress, req: UInt64, key: Bytes, ts: Timestamp, original: Message) {
        if ts == readLatestTs {
            // The newest committed version of one key. Every write
            // acknowledged before this read arrived is here already: a
            // one-phase commit is applied before it is acknowledged, and a
            // two-phase one holds its lock here until its decision arrives,
            // so a locked key waits for that. The read is not recorded in
            // the read cache: no one learns a timestamp for it, so a later
            // commit below it changes nothing anyone observed at a timestamp.
            if let holder = locks[ByteKey(key)], prepared[holder] != nil { return park(holder, from, original) }
            let (value, version) = store.read(key, at: ts)
            return send(from, .readResult(req: req, value: value, version: version))
        }
        if let e = checkReadTs(ts) { return send(from, .failed(req: req, error: e)) }
        if let holder = locks[ByteKey(key)], let p = prepared[holder], p.commitTs <= ts {
            return park(holder, from, original)
        }
        let (value, version) = store.read(key, at: ts)
        noteRead(key, ts)
        send(from, .readResult(req: req, value: value, version: version))
    }

    mutating func onScan(from: NodeAddress, req: UInt64, start: Bytes, end: Bytes?, limit: Int, ts: Timestamp, original: Message) {
        if let e = checkReadTs(ts) { return send(from, .failed(req: req, error: e)) }
        for (key, holder) in locks where compareBytes(key.bytes, start) >= 0 && (end.map { compareBytes(key.bytes, $0) < 0 } ?? true) {
            if let p = prepared[holder], p.commitTs <= ts { return park(holder, from, original) }
        }
        var rows: [ScanRow] = []
        var more = false
        let cap = max(0, min(limit, Limits.scanLimitMax))
        store.scan(from: start, at: ts) { k, v, version in
            if let end, compareBytes(k, end) >= 0 { return false }
            if rows.count == cap {
                more = true
                return false
            }
            rows.append(ScanRow(key: k, value: v, version: version))
            return true
        }
        // A scan reads the absence of keys too: no writer may commit beneath it.
        readFloor = max(readFloor, ts)
        send(from, .scanResult(req: req, rows: rows, more: more))
    }

    mutating func noteRead(_ key: Bytes, _ ts: Timestamp) {
        if ts <= (readCache[ByteKey(key)] ?? 0) || ts <= readFloor { return }
        if readCache.count >= Limits.readCacheEntriesMax {
            readFloor = max(readFloor, readCache.values.max() ?? 0)
            readCache.removeAll(keepingCapacity: true)
        }
        readCache[ByteKey(key)] = ts
    }

    mutating func park(_ holder: TxnId, _ from: NodeAddress, _ message: Message) {
        parked[holder, default: []].append((from, message, nowMillis + Limits.readWaitTicksMax))
    }

    // MARK: Writes

    /// Optimistic validation shared by PREPARE and one-phase commit.
    func validate(txn: TxnId, startTs: Timestamp, commitTs: Timestamp, part: TxnPart) -> WeftError? {
        if awaitingClock {
            return WeftError(.unavailable, "participant \(id) is recovering and has not yet heard the coordinator's clock; retry")
        }
        let floor = readFloor
        if commitTs <= startTs { return WeftError(.invalidArgument, "commit timestamp \(commitTs) is not after start \(startTs)") }
        if commitTs > HLC.timestamp(millis: nowMillis + Limits.futureCommitSlackMillis) {
            return WeftError(.invalidArgument, "commit timestamp \(commitTs) of transaction \(txn) is more than Limits.futureCommitSlackMillis (\(Limits.futureCommitSlackMillis) ms) ahead of participant \(id)'s clock; refused (a forged or broken timestamp would make its keys unwritable)")
        }
        for k in part.reads {
            if let h = locks[ByteKey(k)], h != txn { return conflict(k, "it is locked by transaction \(h)") }
            if store.latestTs(k) > startTs { return conflict(k, "it changed after the transaction read it") }
        }
        for w in part.writes {
            if let h = locks[ByteKey(w.key)], h != txn { return conflict(w.key, "it is locked by transaction \(h)") }
            // A key that was also read is covered by the read check above; a
            // blind write only has to land after every existing version.
            if store.latestTs(w.key) >= commitTs { return conflict(w.key, "a newer version was committed first") }
            if max(readCache[ByteKey(w.key)] ?? 0, floor) >= commitTs {
                return conflict(w.key, "it was read at a later timestamp than this commit")
            }
        }
        return nil
    }

    /// True if this exact transaction's writes are already installed here,
    /// which makes duplicate one-phase commits idempotent.
    func alreadyApplied(commitTs: Timestamp, part: TxnPart) -> Bool {
        guard let first = part.writes.first else { return false }
        return store.hasVersion(first.key, at: commitTs)
    }

    mutating func onPrepare(txn: TxnId, startTs: Timestamp, commitTs: Timestamp, participants: [ParticipantId], part: TxnPart) {
        if prepared[txn] != nil { return send(.coordinator, .vote(txn: txn, from: id, vote: .yes)) }
        if refused.contains(txn) {
            return send(.coordinator, .vote(txn: txn, from: id, vote: .no(WeftError(.unavailable, "transaction \(txn) was given up by cooperative termination while its coordinator was unreachable"))))
        }
        if let err = validate(txn: txn, startTs: startTs, commitTs: commitTs, part: part) {
            return send(.coordinator, .vote(txn: txn, from: id, vote: .no(err)))
        }
        for k in part.reads { noteRead(k, commitTs) }
        if part.isReadOnly { return send(.coordinator, .vote(txn: txn, from: id, vote: .readOnly)) }
        let p = PreparedTxn(txn: txn, startTs: startTs, commitTs: commitTs, participants: participants, writes: part.writes, preparedAtMillis: nowMillis)
        enter(txn, .prepared(p))
        for w in part.writes { locks[ByteKey(w.key)] = txn }
        lastQueryMillis[txn] = nowMillis
        out.records.append(.prepared(p))
        send(.coordinator, .vote(txn: txn, from: id, vote: .yes))
    }

    mutating func onOnePhase(txn: TxnId, startTs: Timestamp, commitTs: Timestamp, part: TxnPart) {
        if alreadyApplied(commitTs: commitTs, part: part) {
            return send(.coordinator, .onePhaseResult(txn: txn, from: id, outcome: .committed(commitTs)))
        }
        // A duplicate whose versions were collected since: still committed.
        if case .committed(let ts) = state(of: txn) {
            return send(.coordinator, .onePhaseResult(txn: txn, from: id, outcome: .committed(ts)))
        }
        if refused.contains(txn) {
            return send(.coordinator, .onePhaseResult(txn: txn, from: id, outcome: .aborted(WeftError(.unavailable, "transaction \(txn) was reported aborted to a status query before it arrived"))))
        }
        if let err = validate(txn: txn, startTs: startTs, commitTs: commitTs, part: part) {
            // Remember the refusal, so a duplicate of this request arriving
            // later cannot commit what the client was told is aborted.
            enter(txn, .refused)
            out.records.append(.refused(txn: txn))
            return send(.coordinator, .onePhaseResult(txn: txn, from: id, outcome: .aborted(err)))
        }
        for k in part.reads { noteRead(k, commitTs) }
        apply(txn: txn, commitTs: commitTs, writes: part.writes)
        enter(txn, .committed(commitTs))
        send(.coordinator, .onePhaseResult(txn: txn, from: id, outcome: .committed(commitTs)))
    }

    mutating func onDecide(txn: TxnId, commit: Bool) {
        guard case .prepared(let p) = state(of: txn) else {
            // Already resolved (a duplicate or a resend): COMMIT is acked again
            // so the coordinator can finish; ABORT needs no answer.
            if commit { send(.coordinator, .ack(txn: txn, from: id)) }
            return
        }
        lastQueryMillis[txn] = nil
        for w in p.writes where locks[ByteKey(w.key)] == txn { locks[ByteKey(w.key)] = nil }
        if commit {
            enter(txn, .committed(p.commitTs))
            apply(txn: txn, commitTs: p.commitTs, writes: p.writes)
            send(.coordinator, .ack(txn: txn, from: id))
        } else {
            enter(txn, .unknown)
            out.records.append(.aborted(txn: txn))
        }
        if let waiting = parked.removeValue(forKey: txn) {
            for w in waiting { step(Envelope(from: w.from, to: me, w.message)) }
        }
    }

    mutating func apply(txn: TxnId, commitTs: Timestamp, writes: [WriteOp]) {
        store.apply(writes, ts: commitTs)
        if !writes.isEmpty {
            commitRefs[commitTs] = writes.count
            out.records.append(.committed(txn: txn, commitTs: commitTs, writes: writes))
        }
    }

    // MARK: Per-transaction state

    /// What this participant knows of one transaction, and the one place
    /// it changes (`enter`). Its parts are kept where each is cheapest to
    /// use — PREPARED records beside their locks, the bounded outcome cache,
    /// the durable refusals — but every change goes through `enter`, which
    /// refuses a transition the protocol never makes:
    ///
    /// ```
    /// unknown --prepare--> prepared --decide(commit)--> committed
    ///    |                    '------decide(abort)----> unknown (presumed abort)
    ///    |--one-phase commit--> committed
    ///    '--refuse (peer query, status query, refused one-phase)--> refused
    /// committed and refused are final; a forgotten outcome reads as unknown.
    /// ```
    public enum TxnState: Equatable, Sendable {
        case unknown
        case prepared(PreparedTxn)
        case committed(Timestamp)
        case refused
    }

    public func state(of txn: TxnId) -> TxnState {
        if let p = prepared[txn] { return .prepared(p) }
        if let ts = committedAt(txn) { return .committed(ts) }
        if refused.contains(txn) { return .refused }
        return .unknown
    }

    mutating func enter(_ txn: TxnId, _ next: TxnState) {
        let now = state(of: txn)
        switch (now, next) {
        case (.unknown, .prepared(let p)):
            prepared[txn] = p
        case (.unknown, .committed(let ts)):
            rememberCommitted(txn, ts)
        case (.unknown, .refused):
            refused.insert(txn)
        case (.prepared(let p), .committed(let ts)):
            precondition(p.commitTs == ts, "participant \(id): transaction \(txn) prepared at \(p.commitTs) cannot commit at \(ts)")
            prepared[txn] = nil
            rememberCommitted(txn, ts)
        case (.prepared, .unknown):
            prepared[txn] = nil
        default:
            preconditionFailure("participant \(id): transaction \(txn) cannot go from \(now) to \(next)")
        }
    }

    // MARK: Cooperative termination

    /// Two generations, so forgetting is O(1) amortized: when the young one
    /// is full it becomes the old one, and the old one's outcomes are
    /// forgotten (raising `outcomeFloor`).
    mutating func rememberCommitted(_ txn: TxnId, _ commitTs: Timestamp) {
        if committedTxns.count >= Limits.outcomeCacheEntriesMax / 2 {
            if let newestForgotten = committedOlder.values.max() { outcomeFloor = max(outcomeFloor, newestForgotten) }
            committedOlder = committedTxns
            committedTxns = [:]
        }
        committedTxns[txn] = commitTs
    }

    func committedAt(_ txn: TxnId) -> Timestamp? { committedTxns[txn] ?? committedOlder[txn] }

    /// `weft txn status`: committed, pending, or (never prepared here)
    /// aborted for good, by refusing it durably.
    mutating func onStatus(from: NodeAddress, req: UInt64, txn: TxnId) {
        let status: TxnStatus
        if let ts = committedAt(txn) {
            status = .committed(ts)
        } else if prepared[txn] != nil {
            status = .pending
        } else if refused.contains(txn) {
            status = .aborted
        } else if txn <= outcomeFloor || txn <= gcHorizon {
            status = .unknown
        } else {
            enter(txn, .refused)
            out.records.append(.refused(txn: txn))
            status = .aborted
        }
        send(from, .statusResult(req: req, txn: txn, status: status))
    }

    /// What this participant can say about `txn` to an in-doubt peer:
    /// committed; unknown (itself in doubt, or the outcome is forgotten); or,
    /// having never prepared it, that it refuses it for good, which is safe
    /// because the coordinator cannot commit without this participant's YES.
    mutating func onPeerQuery(txn: TxnId, commitTs: Timestamp, from: ParticipantId) {
        let answer: Bool?
        if prepared[txn] != nil {
            answer = nil
        } else if committedAt(txn) != nil {
            answer = true
        } else if refused.contains(txn) {
            answer = false
        } else if commitTs <= outcomeFloor || commitTs <= gcHorizon {
            answer = nil
        } else {
            enter(txn, .refused)
            out.records.append(.refused(txn: txn))
            answer = false
        }
        send(.participant(from), .peerOutcome(txn: txn, from: id, committed: answer))
    }

    // MARK: Garbage collection

    mutating func collectGarbage() {
        var horizon = HLC.timestamp(millis: nowMillis > retentionMillis ? nowMillis - retentionMillis : 0)
        if let oldestPin = pins.keys.min() { horizon = min(horizon, oldestPin) }
        if let oldestLease = leases.keys.map(\.ts).min() { horizon = min(horizon, oldestLease) }
        guard horizon > gcHorizon else { return }
        gcHorizon = horizon
        if committedOlder.values.contains(where: { $0 <= horizon }) { committedOlder = committedOlder.filter { $0.value > horizon } }
        out.records.append(.gcHorizon(horizon))
        for (ts, n) in store.collectGarbage(horizon: horizon) {
            guard let refs = commitRefs[ts] else { continue }
            if refs <= n {
                commitRefs[ts] = nil
                out.records.append(.releaseCommit(commitTs: ts))
            } else {
                commitRefs[ts] = refs - n
            }
        }
    }

    // MARK: Helpers

    mutating func send(_ to: NodeAddress, _ m: Message) {
        out.messages.append(Envelope(from: me, to: to, m))
    }

    func conflict(_ key: Bytes, _ why: String) -> WeftError {
        WeftError(.conflict, "conflict on key \(printable(key)): \(why)")
    }

    func snapshotTooOld(_ ts: Timestamp) -> WeftError {
        WeftError(.snapshotTooOld, "snapshot \(ts) is older than participant \(id)'s garbage-collection horizon \(gcHorizon)")
    }

    func requestId(_ m: Message) -> UInt64? {
        switch m {
        case let .read(req, _, _), let .scan(req, _, _, _, _): return req
        default: return nil
        }
    }

    /// Ids of prepared transactions, for tests and tools.
    public var inDoubt: [PreparedTxn] { prepared.values.sorted { $0.txn < $1.txn } }
    public var lockCount: Int { locks.count }
}

/// A key as a user would type it: UTF-8 when printable, else hex.
public func printable(_ key: Bytes) -> String {
    if let s = String(validating: key, as: UTF8.self), s.unicodeScalars.allSatisfy({ $0.value >= 0x20 && $0.value != 0x7f }) {
        return "'\(s)'"
    }
    return "0x" + key.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined()
}

/// Who holds a snapshot lease, on which timestamp.
struct LeaseKey: Hashable {
    let holder: NodeAddress
    let ts: Timestamp
}
