import CoreMetrics
import Foundation
import WeftCore
import WeftLMDB
import WeftProtocol

/// A participant's in-doubt gauges, refreshed after every round from its
/// runner's summary (on the node's thread; the machine is at hand there).
final class InDoubtGauges: @unchecked Sendable {
    let count: CoreMetrics.Gauge
    let oldest: CoreMetrics.Gauge

    init(_ address: NodeAddress) {
        count = CoreMetrics.Gauge(label: "weft_in_doubt_transactions", dimensions: [("node", address.description)])
        oldest = CoreMetrics.Gauge(label: "weft_in_doubt_oldest_age_seconds", dimensions: [("node", address.description)])
    }

    func update(_ m: ParticipantMachine) {
        count.record(m.prepared.count)
        let first = m.prepared.values.map(\.preparedAtMillis).min()
        let now = wallMillis()
        oldest.record(first.map { now > $0 ? Double(now - $0) / 1000 : 0 } ?? 0)
    }
}

/// Logs, as a warning, every commit a participant refused for a timestamp
/// too far in the future (`Limits.futureCommitSlackMillis`): forged, or a
/// broken clock; either way an operator should hear of it.
func logFutureTimestampRefusals(_ log: @escaping @Sendable (String) -> Void) -> ([Envelope]) -> Void {
    { envs in
        for env in envs {
            switch env.message {
            case .vote(_, _, .no(let e)) where e.message.contains("Limits.futureCommitSlackMillis"),
                 .onePhaseResult(_, _, .aborted(let e)) where e.message.contains("Limits.futureCommitSlackMillis"):
                log(e.message)
            default:
                break
            }
        }
    }
}

/// `weft_lmdb_map_used_bytes` and `weft_lmdb_map_size_bytes` of some
/// environments, read at every scrape.
final class MapUsageGauges: @unchecked Sendable {
    let entries: [(LMDBEnvironment, CoreMetrics.Gauge, CoreMetrics.Gauge)]
    var collector: UUID?

    init(_ envs: [(NodeAddress, LMDBEnvironment)]) {
        entries = envs.map { a, env in
            (env, CoreMetrics.Gauge(label: "weft_lmdb_map_used_bytes", dimensions: [("node", a.description)]),
             CoreMetrics.Gauge(label: "weft_lmdb_map_size_bytes", dimensions: [("node", a.description)]))
        }
        collector = WeftMetrics.addCollector { [entries] in
            for (env, used, size) in entries {
                guard let u = env.usage() else { continue }
                used.record(u.usedBytes)
                size.record(u.mapSizeBytes)
            }
        }
    }

    func stop() { if let c = collector { WeftMetrics.removeCollector(c) } }
}
