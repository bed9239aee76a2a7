import Foundation
import WeftCore

/// A driver's reports of its job to the cluster's coordinator
/// (`jobs.report` calls), so the coordinator's jobs pages show jobs run with
/// `weft job run --cluster`: the start, the latest progress every
/// `JobBoard.reportIntervalMillis` (also a heartbeat: a silent driver is
/// shown as lost), and the result. Reports are best effort: a coordinator
/// that is down, or without a status port, costs the job nothing.
public final class JobReporter: @unchecked Sendable {
    /// How long the start and finish reports wait for the coordinator.
    public static let callTimeoutMillis: Int64 = 2_000

    let remote: ClusterClient
    let lock = NSLock()
    var id: Int?
    public private(set) var url: String?
    var latest: [String: Any]?
    var stopped = false
    let wake = DispatchSemaphore(value: 0)

    public init(remote: ClusterClient) { self.remote = remote }

    func send(_ o: [String: Any]) async -> [String: Any]? {
        guard let body = try? JSONSerialization.data(withJSONObject: o),
              let (ok, answer) = try? await remote.call(to: .coordinator, "jobs.report", Array(body), timeoutMillis: Self.callTimeoutMillis), ok
        else { return nil }
        return (try? JSONSerialization.jsonObject(with: Data(answer))) as? [String: Any]
    }

    /// Registers the job; returns its page's URL when the coordinator serves one.
    @discardableResult
    public func start(job: String, input: String) async -> String? {
        guard let a = await send(["event": "start", "job": job, "input": input]), let id = (a["id"] as? NSNumber)?.intValue else { return nil }
        lock.withLock {
            self.id = id
            url = a["url"] as? String
        }
        let t = Thread { [self] in
            while true {
                _ = wake.wait(timeout: .now() + .milliseconds(Int(JobBoard.reportIntervalMillis)))
                let (report, done) = lock.withLock { (latest ?? ["event": "progress", "id": id], stopped) }
                if done { return }
                let box = UncheckedSendableBox(report)
                let sent = DispatchSemaphore(value: 0)
                Task {
                    _ = await self.send(box.value)
                    sent.signal()
                }
                sent.wait()
            }
        }
        t.start()
        return url
    }

    /// The latest progress; sent with the next report.
    public func progress(stage: Int, stages: Int, tasksDone: Int, tasks: Int) {
        lock.withLock {
            guard let id else { return }
            latest = ["event": "progress", "id": id, "stage": stage, "stages": stages, "tasks_done": tasksDone, "tasks": tasks]
        }
    }

    /// The job's JSON answer, or its error.
    public func finish(result: [String: Any]?, error: String?) async {
        guard let id = lock.withLock({ () -> Int? in
            stopped = true
            return self.id
        }) else { return }
        wake.signal()
        var o: [String: Any] = ["event": "finish", "id": id]
        if let result { o["result"] = result }
        if let error { o["error"] = error }
        _ = await send(o)
    }
}

extension JobReporter {
    /// `finish` for a caller on a plain thread: waits for it.
    public func finishWaiting(result: [String: Any]?, error: String?) {
        let box = UncheckedSendableBox(result)
        let done = DispatchSemaphore(value: 0)
        Task {
            await self.finish(result: box.value, error: error)
            done.signal()
        }
        done.wait()
    }
}

struct UncheckedSendableBox<T>: @unchecked Sendable {
    let value: T
    init(_ v: T) { value = v }
}
