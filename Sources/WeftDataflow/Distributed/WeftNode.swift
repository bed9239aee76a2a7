import Foundation
import Logging
import WeftCore
import WeftRuntime

/// A program's own node and driver: a Swift program that registers jobs
/// (`BuiltinJobs.register`) serves as the cluster's nodes with
/// `WeftNode.serve` and runs its jobs with `WeftNode.run`, so the driver
/// and every executor know the same jobs. (`weft node` is the same node
/// with the built-in jobs only.)
public enum WeftNode {
    /// Runs node `id` of the cluster in `clusterPath` (directory or file)
    /// until SIGTERM or SIGINT: its store, and on a participant an executor
    /// that knows every job registered in this process.
    public static func serve(clusterPath: String, id: String, secretFile: String? = nil) throws -> Never {
        let config = try ClusterConfig.load(clusterPath)
        let node = try ClusterNode(config: config, id: id, secretFile: secretFile)
        let log = Logger(label: "weft node \(id)")
        node.onFailure = { error in
            log.critical("\(error.message); exiting, restart it to recover from disk")
            exit(70)
        }
        var executor: ExecutorService?
        var client: ClusterClient?
        if case .participant(let p) = node.spec.address {
            let cc = node.makeClient()
            let e = ExecutorService(node: p, client: cc.client) { peer, method, body in
                try await node.call(to: .participant(peer), method, body)
            }
            node.onCall = { call in e.handle(call) }
            executor = e
            client = cc
        }
        let pidFile = config.clusterDirectory + "/\(id).pid"
        try? "\(getpid())\n".write(toFile: pidFile, atomically: true, encoding: .utf8)
        log.notice("pid \(getpid()) listening on \(node.spec.endpoint); jobs: \(BuiltinJobs.names.joined(separator: ", "))")
        let done = DispatchSemaphore(value: 0)
        var sources: [DispatchSourceSignal] = []
        for sig in [SIGTERM, SIGINT] {
            signal(sig, SIG_IGN)
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler { done.signal() }
            s.resume()
            sources.append(s)
        }
        done.wait()
        executor?.stop()
        client?.close()
        node.stop()
        if (try? String(contentsOfFile: pidFile, encoding: .utf8)) == "\(getpid())\n" { try? FileManager.default.removeItem(atPath: pidFile) }
        _ = sources
        exit(0)
    }

    /// Runs job `name` on the cluster in `clusterPath` with this process as
    /// the driver and the participants' executors running its tasks; the
    /// snapshot is leased for the job's life, and `params.output`, if set,
    /// is written in one transaction.
    public static func run(_ name: String, _ params: JobParameters, clusterPath: String, secretFile: String? = nil,
                           memoryBytesMax: Int = DataflowContext.memoryBytesMaxDefault) throws -> (JobResult, DistributedMetrics) {
        let config = try ClusterConfig.load(clusterPath)
        let remote = try ClusterClient(config: config, secretFile: secretFile)
        defer { remote.close() }
        let client = remote.client
        let nodes = Array(0..<config.participantCount)
        final class Lease: @unchecked Sendable { var value: SnapshotLease? }
        let lease = Lease()
        // The coordinator's jobs pages show the job, as for `weft job run --cluster`.
        let reporter = JobReporter(remote: remote)
        _ = try? blocking { await reporter.start(job: name, input: params.input) }
        do {
            let (result, dist) = try BuiltinJobs.runOnCluster(name, params, client: client, nodes: nodes, parallelism: 2 * nodes.count, memoryBytesMax: memoryBytesMax,
                                                              call: { n, m, b, t in try await remote.call(to: .participant(n), m, b, timeoutMillis: t) },
                                                              pin: { ts in lease.value = try blocking { try await SnapshotLease.take(client, at: ts) } },
                                                              unpin: { _ in if let l = lease.value { _ = try? blocking { await l.release() } } },
                                                              prepare: { _, sc in
                                                                  sc.onProgress = { reporter.progress(stage: $0.stage, stages: $0.stages, tasksDone: $0.tasksDone, tasks: $0.tasks) }
                                                              })
            let m = result.metrics
            let summary: [String: Any] = ["job": name, "input": params.input, "output_rows": result.outputRows, "summary": result.summary,
                                          "stages": m.stages, "tasks": m.tasks, "task_retries": m.taskRetries, "recomputed_partitions": m.recomputedPartitions,
                                          "bytes_spilled": m.bytesSpilled, "shuffle_bytes_written": m.shuffleBytesWritten,
                                          "shuffle_bytes_fetched": m.shuffleBytesFetched, "executors": "cluster",
                                          "speculative_tasks": dist.speculativeTasks, "killed_tasks": dist.killedTasks, "fetch_failures": dist.fetchFailures,
                                          "executors_lost": dist.executorsLost.map { "participant-\($0)" },
                                          "stage_times": m.stageTimes.map(\.json)]
            reporter.finishWaiting(result: summary, error: nil)
            return (result, dist)
        } catch {
            reporter.finishWaiting(result: nil, error: "\(error)")
            throw error
        }
    }
}
