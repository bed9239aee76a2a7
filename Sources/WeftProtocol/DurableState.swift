import WeftCore

/// What a participant's LMDB environment holds, as a plain value: the
/// meaning of each `ParticipantRecord`, stated once. The LMDB storage in
/// WeftRuntime performs the same changes on disk; the simulator uses this
/// type as its disk.
public struct ParticipantDisk: Sendable {
    public var commits: [Timestamp: CommitRecord] = [:]
    public var prepared: [TxnId: PreparedTxn] = [:]
    public var gcHorizon: Timestamp = 0
    public var refused: Set<TxnId> = []
    public init() {}

    public mutating func apply(_ r: ParticipantRecord) {
        switch r {
        case .prepared(let p): prepared[p.txn] = p
        case let .committed(txn, ts, writes):
            commits[ts] = CommitRecord(txn: txn, writes: writes)
            prepared[txn] = nil
        case .aborted(let txn): prepared[txn] = nil
        case .releaseCommit(let ts): commits[ts] = nil
        case .gcHorizon(let ts): gcHorizon = max(gcHorizon, ts)
        case .refused(let txn): refused.insert(txn)
        }
    }

    public var recovery: ParticipantRecovery {
        var r = ParticipantRecovery()
        r.refused = refused
        r.commits = commits.keys.sorted().map { ($0, commits[$0]!) }
        r.prepared = prepared.values.sorted { $0.txn < $1.txn }
        r.gcHorizon = gcHorizon
        return r
    }
}

/// What a coordinator's LMDB environment holds, as a plain value.
public struct CoordinatorDisk: Sendable {
    public var reservedTs: Timestamp = 0
    public var decisions: [TxnId: Decision] = [:]
    public init() {}

    public mutating func apply(_ r: CoordinatorRecord) {
        switch r {
        case .reserveTimestamps(let upTo): reservedTs = max(reservedTs, upTo)
        case .decided(let d): decisions[d.txn] = d
        case .ended(let txn): decisions[txn] = nil
        }
    }

    public var recovery: CoordinatorRecovery {
        var r = CoordinatorRecovery()
        r.reservedTs = reservedTs
        r.decisions = decisions.values.sorted { $0.txn < $1.txn }
        return r
    }
}
