import CoreMetrics
import Foundation
import Prometheus
import WeftCore
import WeftProtocol

/// The process's metrics: code records through swift-metrics (`Counter`,
/// `Recorder`, `Timer`, `Gauge`), swift-prometheus keeps them, and
/// `GET /metrics` prints the Prometheus text format. Every name starts
/// with `weft_` and has a HELP line (`WeftMetrics.help`).
public enum WeftMetrics {
    public static let registry = PrometheusCollectorRegistry()

    /// HELP text of every metric; a metric missing here is a bug (the
    /// factory refuses it).
    static let help: [String: String] = [
        "weft_transactions_total": "Transactions finished by the coordinator, by outcome (committed, aborted, unknown) and path (one_phase, two_phase, read_only).",
        "weft_commit_latency_seconds": "Time from a commit request reaching the coordinator to its answer leaving it.",
        "weft_group_commit_records": "Records written by one LMDB commit (group-commit size).",
        "weft_lmdb_commits_total": "Durable LMDB commits (each one data fdatasync plus the meta page write), by node.",
        "weft_lmdb_commit_seconds": "Time of one durable LMDB commit.",
        "weft_in_doubt_transactions": "Prepared transactions without an outcome, by participant.",
        "weft_in_doubt_oldest_age_seconds": "Age of the oldest prepared transaction without an outcome, by participant (0 when none).",
        "weft_lmdb_map_used_bytes": "Bytes of the LMDB map in use (last page times page size), by node.",
        "weft_lmdb_map_size_bytes": "Size of the LMDB map, by node.",
        "weft_connections_open": "Inbound connections open on the cluster-protocol listener.",
        "weft_connections_rejected_total": "Inbound connections closed or refused, by reason.",
        "weft_recovery_seconds": "Time to open and recover the node's storage at its last start.",
        "weft_http_requests_total": "Requests to the status port, by path class and status code.",
        "weft_jobs_total": "Dataflow jobs finished in this process, by result.",
        "weft_stages_total": "Stages run by finished jobs.",
        "weft_tasks_total": "Tasks run by finished jobs.",
        "weft_task_retries_total": "Task attempts retried by finished jobs.",
        "weft_speculative_tasks_total": "Speculative copies of slow tasks launched by finished jobs (reported by cluster drivers).",
        "weft_fetch_failures_total": "Shuffle fetch failures finished jobs recovered from by rerunning map tasks (reported by cluster drivers).",
        "weft_executors_lost_total": "Executors finished jobs lost mid-job (reported by cluster drivers).",
        "weft_partitions_recomputed_total": "Partitions finished jobs computed again from lineage.",
        "weft_partitions_read_from_replicas_total": "Reliably persisted partitions read back from a replica block (by jobs run in this process and by this node's executor).",
        "weft_bytes_spilled_total": "Bytes written to spill files, shuffle data and cache blocks (by jobs run in this process and by this node's executor).",
        "weft_shuffle_bytes_written_total": "Shuffle map output held for reducers, in memory (estimated) and in spill files.",
        "weft_shuffle_bytes_fetched_total": "Shuffle buckets this node's executor read from other executors over the network.",
        "weft_block_cache_hits_total": "Partitions of persisted RDDs found in the block cache.",
        "weft_block_cache_misses_total": "Partitions of persisted RDDs not in the block cache (computed, or read from a replica).",
        "weft_executor_tasks_total": "Tasks this node's executor ran for a driver, by result (succeeded, failed, fetch_failed).",
        "weft_executor_task_duration_seconds": "Run time of one task on this node's executor.",
    ]

    static let durationBuckets: [Duration] = [
        .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(4), .milliseconds(8),
        .milliseconds(16), .milliseconds(32), .milliseconds(64), .milliseconds(128), .milliseconds(256), .milliseconds(512),
        .seconds(1), .seconds(2), .seconds(5),
    ]
    static let recordBuckets: [Double] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]

    static let bootstrapped: Bool = {
        MetricsSystem.bootstrap(WeftMetricsFactory())
        return true
    }()

    /// Installs the factory (once per process); nodes and servers call it
    /// before they record anything.
    public static func bootstrap() { _ = bootstrapped }

    /// Runs before every scrape: gauges read from live state.
    static let collectorsLock = NSLock()
    nonisolated(unsafe) static var collectors: [UUID: () -> Void] = [:]

    @discardableResult
    public static func addCollector(_ c: @escaping () -> Void) -> UUID {
        let id = UUID()
        collectorsLock.withLock { collectors[id] = c }
        return id
    }

    public static func removeCollector(_ id: UUID) { _ = collectorsLock.withLock { collectors.removeValue(forKey: id) } }

    /// The Prometheus text exposition of everything recorded.
    public static func exposition() -> [UInt8] {
        for c in collectorsLock.withLock({ Array(collectors.values) }) { c() }
        return registry.emitToBuffer()
    }
}

/// swift-metrics onto swift-prometheus, with HELP text from `WeftMetrics.help`.
final class WeftMetricsFactory: MetricsFactory, @unchecked Sendable {
    let registry = WeftMetrics.registry

    func helpText(_ label: String) -> String {
        guard let h = WeftMetrics.help[label] else { preconditionFailure("metric \(label) has no HELP text in WeftMetrics.help") }
        return h
    }

    func makeCounter(label: String, dimensions: [(String, String)]) -> any CounterHandler {
        dimensions.isEmpty ? registry.makeCounter(name: label, help: helpText(label))
            : registry.makeCounter(name: label, labels: dimensions, help: helpText(label))
    }

    func makeFloatingPointCounter(label: String, dimensions: [(String, String)]) -> any FloatingPointCounterHandler {
        dimensions.isEmpty ? registry.makeCounter(name: label, help: helpText(label))
            : registry.makeCounter(name: label, labels: dimensions, help: helpText(label))
    }

    func makeRecorder(label: String, dimensions: [(String, String)], aggregate: Bool) -> any RecorderHandler {
        if !aggregate {
            return dimensions.isEmpty ? registry.makeGauge(name: label, help: helpText(label))
                : registry.makeGauge(name: label, labels: dimensions, help: helpText(label))
        }
        return dimensions.isEmpty ? registry.makeValueHistogram(name: label, buckets: WeftMetrics.recordBuckets, help: helpText(label))
            : registry.makeValueHistogram(name: label, labels: dimensions, buckets: WeftMetrics.recordBuckets, help: helpText(label))
    }

    func makeMeter(label: String, dimensions: [(String, String)]) -> any MeterHandler {
        dimensions.isEmpty ? registry.makeGauge(name: label, help: helpText(label))
            : registry.makeGauge(name: label, labels: dimensions, help: helpText(label))
    }

    func makeTimer(label: String, dimensions: [(String, String)]) -> any TimerHandler {
        dimensions.isEmpty ? registry.makeDurationHistogram(name: label, buckets: WeftMetrics.durationBuckets, help: helpText(label))
            : registry.makeDurationHistogram(name: label, labels: dimensions, buckets: WeftMetrics.durationBuckets, help: helpText(label))
    }

    func destroyCounter(_ handler: any CounterHandler) {}
    func destroyFloatingPointCounter(_ handler: any FloatingPointCounterHandler) {}
    func destroyRecorder(_ handler: any RecorderHandler) {}
    func destroyMeter(_ handler: any MeterHandler) {}
    func destroyTimer(_ handler: any TimerHandler) {}
}

/// Watches a coordinator's rounds from its shell: when a commit request
/// arrives, which path it takes (the coordinator sends `commitOnePhase` or
/// `prepare`), and when its answer leaves. Feeds `weft_transactions_total`
/// and `weft_commit_latency_seconds`, and keeps the last latencies for the
/// status page's quantiles. Touched only on the coordinator's thread,
/// except `recentLatencies`.
final class CoordinatorObserver: @unchecked Sendable {
    /// When each commit request arrived, by (client, request id): a blind
    /// write's transaction is named by the coordinator, so the request's
    /// own id is the key the answer also carries.
    struct RequestKey: Hashable {
        let client: NodeAddress
        let req: UInt64
    }
    var started: [RequestKey: UInt64] = [:]
    var paths: [TxnId: String] = [:]
    let latency = CoreMetrics.Timer(label: "weft_commit_latency_seconds")
    var counters: [String: CoreMetrics.Counter] = [:]
    let lock = NSLock()
    var ring = [Double](repeating: .nan, count: 1024)
    var ringNext = 0

    func counter(_ outcome: String, _ path: String) -> CoreMetrics.Counter {
        let key = outcome + "/" + path
        if let c = counters[key] { return c }
        let c = CoreMetrics.Counter(label: "weft_transactions_total", dimensions: [("outcome", outcome), ("path", path)])
        counters[key] = c
        return c
    }

    func arrived(_ env: Envelope, nanos: UInt64) {
        if case let .commit(req, _, _, _) = env.message { started[RequestKey(client: env.from, req: req)] = nanos }
    }

    func sent(_ envs: [Envelope], nanos: UInt64) {
        for env in envs {
            switch env.message {
            case let .commitOnePhase(txn, _, _, _): paths[txn] = "one_phase"
            case let .prepare(txn, _, _, _, _): paths[txn] = "two_phase"
            case let .commitResult(req, txn, outcome):
                let outcomeName: String
                switch outcome {
                case .committed: outcomeName = "committed"
                case .aborted: outcomeName = "aborted"
                case .unknown: outcomeName = "unknown"
                }
                counter(outcomeName, paths.removeValue(forKey: txn) ?? "read_only").increment()
                if let t0 = started.removeValue(forKey: RequestKey(client: env.to, req: req)), nanos >= t0 {
                    latency.recordNanoseconds(Int64(nanos - t0))
                    lock.withLock {
                        ring[ringNext] = Double(nanos - t0) / 1e9
                        ringNext = (ringNext + 1) % ring.count
                    }
                }
            default:
                break
            }
        }
        // Answers that never come (a client's retry under another id) must
        // not grow these without bound.
        if started.count > 100_000 { started.removeAll() }
        if paths.count > 100_000 { paths.removeAll() }
    }

    /// p50, p95, p99 and max of the last answered commits (seconds), and how many.
    func recentQuantiles() -> [String: Double] {
        let xs = lock.withLock { ring.filter { !$0.isNaN } }.sorted()
        guard !xs.isEmpty else { return ["count": 0] }
        func q(_ p: Double) -> Double { xs[min(xs.count - 1, Int(Double(xs.count) * p))] }
        return ["count": Double(xs.count), "p50": q(0.5), "p95": q(0.95), "p99": q(0.99), "max": xs.last!]
    }
}

/// Monotonic nanoseconds.
func monoNanos() -> UInt64 {
    var t = timespec()
    clock_gettime(CLOCK_MONOTONIC, &t)
    return UInt64(t.tv_sec) * 1_000_000_000 + UInt64(t.tv_nsec)
}
