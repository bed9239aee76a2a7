import CoreMetrics
import Foundation
import WeftCore

/// The jobs a process runs (`job run` through `weft server`), or that
/// drivers report to it (a cluster's coordinator: `job run --cluster`), for
/// the status pages: running ones with their progress, and the last
/// `finishedKept` finished ones with their stages.
public final class JobBoard: @unchecked Sendable {
    public static let finishedKept = 50
    /// Jobs reported by drivers and still running, at most.
    public static let reportedRunningMax = 64
    /// A reported job whose driver sent nothing for this long is shown as
    /// "driver lost" (drivers report at least every `reportIntervalMillis`).
    public static let driverSilenceMillis: UInt64 = 30_000
    public static let reportIntervalMillis: UInt64 = 2_000

    struct Entry {
        var id: Int
        var name: String
        var input: String
        var state = "running"
        var startedMillis = wallMillis()
        var finishedMillis: UInt64?
        var stage = 0
        var stages = 0
        var tasksDone = 0
        var tasks = 0
        var result: [String: Any] = [:]
        var error: String?
        /// Reported by a driver in another process, last heard from then.
        var reported = false
        var lastReportMillis = wallMillis()
    }

    let lock = NSLock()
    var entries: [Int: Entry] = [:]
    var order: [Int] = []
    var nextId = 1

    public init() {}

    public func start(name: String, input: String) -> Int {
        lock.withLock {
            let id = nextId
            nextId += 1
            entries[id] = Entry(id: id, name: name, input: input)
            order.append(id)
            return id
        }
    }

    /// A job a driver in another process runs; nil when
    /// `reportedRunningMax` reported jobs are running already.
    public func startReported(name: String, input: String) -> Int? {
        lock.withLock {
            let now = wallMillis()
            let running = entries.values.filter { $0.reported && $0.state == "running" && now - $0.lastReportMillis < Self.driverSilenceMillis }
            if running.count >= Self.reportedRunningMax { return nil }
            let id = nextId
            nextId += 1
            var e = Entry(id: id, name: name, input: input)
            e.reported = true
            entries[id] = e
            order.append(id)
            return id
        }
    }

    public func progress(_ id: Int, stage: Int, stages: Int, tasksDone: Int, tasks: Int) {
        lock.withLock {
            entries[id]?.lastReportMillis = wallMillis()
            entries[id]?.stage = stage
            entries[id]?.stages = stages
            entries[id]?.tasksDone = tasksDone
            entries[id]?.tasks = tasks
        }
    }

    /// `result`: the job's JSON answer (its `stage_times` become the stages).
    public func finish(_ id: Int, result: [String: Any]?, error: String?) {
        guard lock.withLock({ entries[id]?.state == "running" }) else { return }
        CoreMetrics.Counter(label: "weft_jobs_total", dimensions: [("result", error == nil ? "succeeded" : "failed")]).increment()
        if let r = result {
            let n = { (k: String) in (r[k] as? NSNumber)?.intValue ?? 0 }
            CoreMetrics.Counter(label: "weft_stages_total").increment(by: n("stages"))
            CoreMetrics.Counter(label: "weft_tasks_total").increment(by: n("tasks"))
            CoreMetrics.Counter(label: "weft_task_retries_total").increment(by: n("task_retries"))
            CoreMetrics.Counter(label: "weft_speculative_tasks_total").increment(by: n("speculative_tasks"))
            CoreMetrics.Counter(label: "weft_fetch_failures_total").increment(by: n("fetch_failures"))
            CoreMetrics.Counter(label: "weft_executors_lost_total").increment(by: (r["executors_lost"] as? [Any])?.count ?? 0)
            CoreMetrics.Counter(label: "weft_partitions_recomputed_total").increment(by: n("recomputed_partitions"))
            CoreMetrics.Counter(label: "weft_partitions_read_from_replicas_total").increment(by: n("partitions_read_from_replicas"))
            CoreMetrics.Counter(label: "weft_bytes_spilled_total").increment(by: n("bytes_spilled"))
            CoreMetrics.Counter(label: "weft_shuffle_bytes_written_total").increment(by: n("shuffle_bytes_written"))
            CoreMetrics.Counter(label: "weft_block_cache_hits_total").increment(by: n("cache_hits"))
            CoreMetrics.Counter(label: "weft_block_cache_misses_total").increment(by: n("cache_misses"))
        }
        lock.withLock {
            entries[id]?.state = error == nil ? "succeeded" : "failed"
            entries[id]?.finishedMillis = wallMillis()
            entries[id]?.result = result ?? [:]
            entries[id]?.error = error
            let finished = order.filter { entries[$0]?.state != "running" }
            if finished.count > Self.finishedKept {
                for old in finished.prefix(finished.count - Self.finishedKept) {
                    entries[old] = nil
                    order.removeAll { $0 == old }
                }
            }
        }
    }

    func summary(_ e: Entry) -> [String: Any] {
        var state = e.state
        if e.reported && state == "running" && wallMillis() - e.lastReportMillis > Self.driverSilenceMillis { state = "driver lost" }
        var o: [String: Any] = ["id": e.id, "job": e.name, "input": e.input, "state": state, "driver": e.reported ? "remote" : "this process",
                                "duration_ms": Int((e.finishedMillis ?? wallMillis()) - e.startedMillis)]
        if state == "running" {
            o["progress"] = "stage \(e.stage)/\(e.stages), \(e.tasksDone)/\(e.tasks) tasks"
        }
        for k in ["stages", "tasks", "task_retries", "recomputed_partitions", "bytes_spilled", "output_rows"] {
            if let v = e.result[k] { o[k] = v }
        }
        if let err = e.error { o["error"] = err }
        return o
    }

    public var list: [[String: Any]] {
        lock.withLock { order.reversed().compactMap { entries[$0].map(summary) } }
    }

    /// One job, with its stages in the order they ran: name, tasks, seconds.
    public func job(_ id: Int) -> [String: Any]? {
        lock.withLock {
            guard let e = entries[id] else { return nil }
            var o = summary(e)
            o["stage_list"] = (e.result["stage_times"] as? [[String: Any]] ?? []).enumerated().map { i, s in
                let q = s["task_ms"] as? [String: Any] ?? [:]
                return ["index": i + 1, "name": s["stage"] ?? "", "tasks": s["tasks"] ?? 0, "seconds": s["seconds"] ?? 0,
                        "task_p50_ms": q["p50"] ?? 0, "task_p95_ms": q["p95"] ?? 0, "task_max_ms": q["max"] ?? 0,
                        "bytes_spilled": s["bytes_spilled"] ?? 0, "shuffle_bytes_written": s["shuffle_bytes_written"] ?? 0,
                        "shuffle_bytes_fetched": s["shuffle_bytes_fetched"] ?? 0, "retries": s["retries"] ?? 0,
                        "recomputed_partitions": s["recomputed_partitions"] ?? 0] as [String: Any]
            }
            o["bytes_spilled"] = e.result["bytes_spilled"] ?? 0
            for k in ["shuffle_bytes_written", "shuffle_bytes_fetched", "cache_hits", "cache_misses", "executors", "tasks_by_executor",
                      "node_local_tasks", "speculative_tasks", "fetch_failures", "executors_lost"] {
                if let v = e.result[k] { o[k] = v }
            }
            o["partitions_read_from_replicas"] = e.result["partitions_read_from_replicas"] ?? 0
            return o
        }
    }
}
