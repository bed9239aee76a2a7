import CoreMetrics
import Foundation
import WeftCore

/// The jobs a process runs (`job run` through `weft server`), for the
/// status pages: running ones with their progress, and the last
/// `finishedKept` finished ones with their stages.
public final class JobBoard: @unchecked Sendable {
    public static let finishedKept = 50

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

    public func progress(_ id: Int, stage: Int, stages: Int, tasksDone: Int, tasks: Int) {
        lock.withLock {
            entries[id]?.stage = stage
            entries[id]?.stages = stages
            entries[id]?.tasksDone = tasksDone
            entries[id]?.tasks = tasks
        }
    }

    /// `result`: the job's JSON answer (its `stage_times` become the stages).
    public func finish(_ id: Int, result: [String: Any]?, error: String?) {
        CoreMetrics.Counter(label: "weft_jobs_total", dimensions: [("result", error == nil ? "succeeded" : "failed")]).increment()
        if let r = result {
            let n = { (k: String) in (r[k] as? NSNumber)?.intValue ?? 0 }
            CoreMetrics.Counter(label: "weft_stages_total").increment(by: n("stages"))
            CoreMetrics.Counter(label: "weft_tasks_total").increment(by: n("tasks"))
            CoreMetrics.Counter(label: "weft_task_retries_total").increment(by: n("task_retries"))
            CoreMetrics.Counter(label: "weft_partitions_recomputed_total").increment(by: n("recomputed_partitions"))
            CoreMetrics.Counter(label: "weft_partitions_read_from_replicas_total").increment(by: n("partitions_read_from_replicas"))
            CoreMetrics.Counter(label: "weft_bytes_spilled_total").increment(by: n("bytes_spilled"))
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
        var o: [String: Any] = ["id": e.id, "job": e.name, "input": e.input, "state": e.state,
                                "duration_ms": Int((e.finishedMillis ?? wallMillis()) - e.startedMillis)]
        if e.state == "running" {
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
                ["index": i + 1, "name": s["stage"] ?? "", "tasks": s["tasks"] ?? 0, "seconds": s["seconds"] ?? 0] as [String: Any]
            }
            o["bytes_spilled"] = e.result["bytes_spilled"] ?? 0
            o["partitions_read_from_replicas"] = e.result["partitions_read_from_replicas"] ?? 0
            return o
        }
    }
}
