import WeftCore

/// The shape every node's pure state machine shares, so one shell can run any of them.
public protocol Steppable: Sendable {
    associatedtype Record: Sendable
    mutating func step(_ env: Envelope)
    mutating func tick(nowMillis: UInt64)
    mutating func takeOutput() -> Output<Record>
}

extension ParticipantMachine: Steppable {}
extension CoordinatorMachine: Steppable {}
