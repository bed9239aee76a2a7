import WeftCore

/// The shape every node's pure state machine shares, so one shell can run any of them.
public protocol Steppable: Sendable {
    associatedtype Record: Sendable
    mutating func step(_ env: Envelope)
    mutating func tick(nowMillis: UInt64)
    mutating func takeOutput() -> Output<Record>
    /// A record nobody acts on before it is durable, except through an
    /// acknowledgement (`awaitsRecords`): the shell may hold it back a
    /// little, to share the next round's LMDB commit.
    static func isLazy(_ r: Record) -> Bool
    /// A message that must not leave before every record of its round
    /// and of earlier rounds is durable, even in a round without records.
    static func awaitsRecords(_ e: Envelope) -> Bool
}

extension ParticipantMachine: Steppable {
    /// A decided transaction's commit record (its coordinator forced the
    /// decision and keeps it until this participant acknowledges; a crash
    /// before the record is durable leaves it prepared, and recovery asks
    /// the coordinator again), and a removal of an aborted PREPARED record
    /// (presumed abort). A one-phase commit's record is also `committed`,
    /// but its round answers the client, so it is never held.
    public static func isLazy(_ r: ParticipantRecord) -> Bool {
        switch r {
        case .committed, .aborted: return true
        case .prepared, .releaseCommit, .gcHorizon, .refused: return false
        }
    }

    /// The acknowledgement of a COMMIT: the coordinator forgets the decision
    /// on the last one, so it goes only once the commit record is durable.
    public static func awaitsRecords(_ e: Envelope) -> Bool {
        if case .ack = e.message { return true }
        return false
    }
}

extension CoordinatorMachine: Steppable {
    /// `ended` is lazy by design: a lost one only means the decision is
    /// kept (and asked about) longer.
    public static func isLazy(_ r: CoordinatorRecord) -> Bool {
        if case .ended = r { return true }
        return false
    }

    public static func awaitsRecords(_ e: Envelope) -> Bool { false }
}
