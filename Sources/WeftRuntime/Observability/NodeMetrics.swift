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
