import Foundation
import WeftProtocol

/// Named points where a node kills itself with SIGKILL when
/// `WEFT_CRASH_AT` names that point, to test recovery from every state.
/// The full list is in docs/protocol.md; names are
/// `<role>.<before|after>-<record>-forced`, e.g.
/// `participant.after-prepare-forced` or `coordinator.before-decision-forced`.
public enum CrashPoints {
    static let target: String? = ProcessInfo.processInfo.environment["WEFT_CRASH_AT"]

    /// True when this process has a crash point armed (so callers can skip
    /// building names).
    public static var armed: Bool { target != nil || stopTarget != nil }

    /// `WEFT_STOP_AT`: at that point the process stops itself with SIGSTOP
    /// (once): alive, connections open, silent, as a straggler or a hung
    /// machine is. SIGCONT resumes it.
    static let stopTarget: String? = ProcessInfo.processInfo.environment["WEFT_STOP_AT"]
    nonisolated(unsafe) static var stopped = false

    /// Points of a dataflow job (see docs/dataflow.md): `executor.map-task-S`
    /// (an executor about to run a map task of shuffle S),
    /// `executor.fetch-S` (serving a bucket of shuffle S),
    /// `executor.result-task-A` (a result task of the job's Ath action,
    /// from 0), `executor.output-write` (a result task about to write its
    /// output partition's first block), `driver.stage-N` (the driver starting its
    /// Nth stage), `table.before-catalog-commit` (a table or job output
    /// fully written, before the catalog names it).
    @inline(__always)
    public static func check(_ name: String) {
        if let stopTarget, stopTarget == name, !stopped {
            stopped = true
            FileHandle.standardError.write(Data("weft: stop point \(name) reached; stopping this process (SIGSTOP)\n".utf8))
            kill(getpid(), SIGSTOP)
        }
        guard let target, target == name else { return }
        FileHandle.standardError.write(Data("weft: crash point \(name) reached; killing this process (SIGKILL)\n".utf8))
        kill(getpid(), SIGKILL)
    }

    static func role(_ address: NodeAddress) -> String {
        switch address {
        case .coordinator: return "coordinator"
        case .participant: return "participant"
        case .client: return "client"
        }
    }

    /// The record kinds in one batch, by name, for crash points.
    static func kinds(_ records: [any Sendable]) -> Set<String> {
        var s: Set<String> = []
        for r in records {
            switch r {
            case let p as ParticipantRecord:
                switch p {
                case .prepared: s.insert("prepare")
                case .committed: s.insert("commit")
                case .aborted: s.insert("abort")
                case .releaseCommit, .gcHorizon: s.insert("gc")
                case .refused: s.insert("refusal")
                }
            case let c as CoordinatorRecord:
                switch c {
                case .reserveTimestamps: s.insert("reserve")
                case .decided: s.insert("decision")
                case .ended: s.insert("end")
                }
            default: break
            }
        }
        return s
    }

    public static let all: [String] = [
        "participant.before-prepare-forced", "participant.after-prepare-forced",
        "participant.before-commit-forced", "participant.after-commit-forced",
        "participant.before-abort-forced", "participant.after-abort-forced",
        "participant.before-refusal-forced", "participant.after-refusal-forced",
        "participant.before-gc-forced", "participant.after-gc-forced",
        "coordinator.before-decision-forced", "coordinator.after-decision-forced",
        "coordinator.before-end-forced", "coordinator.after-end-forced",
        "coordinator.before-reserve-forced", "coordinator.after-reserve-forced",
    ]
}
