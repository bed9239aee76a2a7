import ArgumentParser
import Foundation
import WeftCore
import WeftDataflow
import WeftProtocol
import WeftRuntime

struct TableCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "table",
        abstract: "Load, list, scan and drop tables (committed, immutable snapshots for jobs).",
        subcommands: [Load.self, Export.self, List.self, Scan.self, Drop.self, GC.self]
    )

    enum Format: String, ExpressibleByArgument { case lines, kv, jsonl, csv }

    struct Export: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "export",
            abstract: "Write a table's rows to a file or stdout, streaming, bytes kept exactly (see docs/cli.md for the formats).")
        @OptionGroup var global: GlobalOptions
        @Argument var name: String
        @Option(help: "lines: values, one per line; kv: key<TAB>value; jsonl: {\"key\":..,\"value\":..} per line; csv: RFC 4180 with a header.") var format: Format = .jsonl
        @Option(help: "File to write (default: stdout). Written beside it and renamed when whole.") var output: String?
        @Option(help: "Snapshot timestamp (default: now).") var at: UInt64?

        func run() async throws {
            let g = global, name = self.name, format = self.format.rawValue, at = self.at
            var fd: Int32 = 1
            var partial: String?
            if let output {
                let tmp = output + ".partial-\(getpid())"
                fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
                guard fd >= 0 else { fail(WeftError(.invalidArgument, "cannot write \(output): \(String(cString: strerror(errno)))"), json: g.json) }
                partial = tmp
            }
            let out = fd, tmp = partial
            let rows = try await withCluster(g, reads: true) { c in
                do {
                    return try await TableExchange.export(c, name, format: format, to: out, at: at)
                } catch {
                    // Errors end the process in withCluster: no partial file stays.
                    if let tmp { unlink(tmp) }
                    throw error
                }
            }
            if let partial, let output {
                guard fsync(fd) == 0, close(fd) == 0, rename(partial, output) == 0 else {
                    let why = String(cString: strerror(errno))
                    unlink(partial)
                    fail(WeftError(.storage, "cannot finish \(output): \(why)"), json: g.json)
                }
                print(g.json ? jsonLine(["table": name, "rows": rows, "format": format, "output": output])
                             : "exported \(rows) rows of table \(name) to \(output) (\(format))")
            }
        }
    }

    struct Load: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "load", abstract: "Load a file as a table: one transaction, or batches (with a progress bar) that become visible together.")
        @OptionGroup var global: GlobalOptions
        @Argument var name: String
        @Argument var file: String
        @Option(help: "lines: every line a row keyed by its line number; kv: key<TAB>value lines; jsonl and csv: as `table export` writes them.") var format: Format = .lines
        @Flag(help: "Replace an existing table atomically.") var overwrite = false

        @Option(help: "Participants that hold each block (1...\(Limits.tableReplicasMax)); a reader whose replica is missing or corrupt uses another.")
        var replicas = 1

        func run() async throws {
            let g = global, name = self.name, format = self.format, overwrite = self.overwrite, file = self.file, replicas = self.replicas
            do { try TableStore.checkName(name) } catch let e as WeftError { fail(e, json: g.json) }
            // The file streams through in chunks; blocks are written as they are cut.
            let tty = isatty(2) == 1
            let started = Date()
            var lastDraw = Date.distantPast
            let progress: (Int, Int, Int) -> Void = { done, total, rows in
                guard total > 16 << 20 || (tty && Date().timeIntervalSince(started) > 1) else { return }
                let now = Date()
                guard done >= total || now.timeIntervalSince(lastDraw) >= (tty ? 0.1 : 2) else { return }
                lastDraw = now
                let width = 30, filled = total == 0 ? width : min(width, done * width / total)
                let line = "loading \(name) [" + String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled) + "] \(done >> 20)/\(total >> 20) MiB, \(rows) rows"
                FileHandle.standardError.write(Data((tty ? "\r" + line + (done >= total ? "\n" : "") : line + "\n").utf8))
            }
            let r = try await withCluster(g) { c in
                try await TableStore.load(c, name, path: file, format: format.rawValue, overwrite: overwrite, replicas: replicas, progress: progress)
            }
            print(g.json ? jsonLine(["table": name, "rows": r.rows, "bytes": r.bytes, "replicas": replicas, "committed_ts": r.ts])
                         : "loaded \(r.rows) rows (\(r.bytes) bytes) into table \(name) (committed at ts=\(r.ts))")
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List tables with their row counts.")
        @OptionGroup var global: GlobalOptions
        func run() async throws {
            let g = global
            let infos = try await withCluster(g, reads: true) { c in try await TableStore.list(c) }
            printTables(infos, json: g.json)
        }
    }

    struct Scan: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "scan", abstract: "Print a table's rows in key order.")
        @OptionGroup var global: GlobalOptions
        @Argument var name: String
        @Option var limit = 100
        @Option(help: "Snapshot timestamp (default: now).") var at: UInt64?
        @Flag(help: "Show keys and values as hex.") var hex = false
        func run() async throws {
            let g = global, name = self.name, limit = self.limit, at = self.at
            if limit < 0 { throw ValidationError("--limit must be at least 0") }
            let rows = try await withCluster(g, reads: true) { c -> [ScanRowBox] in
                var ts = at ?? 0
                if at == nil { ts = try await c.now() }
                guard let info = try await TableStore.info(c, name, at: ts) else { throw WeftError(.notFound, "unknown table \(name)") }
                return try await TableStore.scan(c, info, at: ts, limit: limit).map { ScanRowBox(key: $0.key, value: $0.value) }
            }
            for r in rows {
                let k = hex ? encodeHex(r.key) : text(r.key), v = hex ? encodeHex(r.value) : text(r.value)
                print(g.json ? jsonLine(["key": k, "value": v]) : "\(k)\t\(v)")
            }
        }
    }

    struct GC: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "gc",
            abstract: "Delete rows no table names: those of loads whose process on this host has exited (killed mid-load) and of replaced or dropped generations left half-deleted; with --older-than, any such generation older than that.")
        @OptionGroup var global: GlobalOptions
        @Option(help: "Also collect generations marked more than this many seconds ago, whoever wrote them.") var olderThan: Int?
        @Flag(help: "List the unfinished generations; delete nothing.") var list = false
        func run() async throws {
            let g = global, olderThan = self.olderThan, listOnly = self.list
            if let o = olderThan, o < 0 { throw ValidationError("--older-than must be at least 0 seconds") }
            try await withCluster(g) { c in
                func describe(_ p: TableStore.Pending) -> String {
                    let owner = p.owner.map { o in "\(o)\(WriterTag.isAlive(o).map { $0 ? " (running)" : " (exited)" } ?? "")" } ?? "unknown owner"
                    return "\(p.table)@\(p.generation)\t\(p.state)\t\(owner)"
                }
                if listOnly {
                    for p in try await TableStore.pending(c) {
                        print(g.json ? jsonLine(["table": p.table, "generation": p.generation, "state": p.state, "owner": p.owner ?? ""]) : describe(p))
                    }
                    return
                }
                let (deleted, kept) = try await TableStore.collectGarbage(c, olderThanMillis: olderThan.map { Int64($0) * 1000 })
                if g.json {
                    print(jsonLine(["deleted_generations": deleted.count, "kept_generations": kept.count]))
                } else {
                    for p in deleted { print("deleted\t" + describe(p)) }
                    print("deleted the blocks of \(deleted.count) generations; kept \(kept.count) (writers still running)")
                }
            }
        }
    }

    struct Drop: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "drop", abstract: "Drop a table in one transaction.")
        @OptionGroup var global: GlobalOptions
        @Argument var name: String
        func run() async throws {
            let g = global, name = self.name
            try await withCluster(g) { c in try await TableStore.drop(c, name) }
            print(g.json ? jsonLine(["dropped": name]) : "dropped table \(name)")
        }
    }
}

/// The job's snapshot lease, set and read on the driver thread.
final class LeaseHolder: @unchecked Sendable {
    var value: SnapshotLease?
}

/// Runs a built-in job on the driver thread with its snapshot leased on
/// every participant for the life of the job, embedded or over the
/// network alike (see `SnapshotLease`).
func runLeased(_ name: String, _ p: JobParameters, sc: DataflowContext, client: WeftClient) throws -> JobResult {
    let lease = LeaseHolder()
    return try BuiltinJobs.run(name, p, sc: sc, client: client,
                               pin: { ts in lease.value = try blocking { try await SnapshotLease.take(client, at: ts) } },
                               unpin: { _ in if let l = lease.value { _ = try? blocking { await l.release() } } })
}

struct ScanRowBox: Sendable {
    var key: Bytes
    var value: Bytes
}

struct JobCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "job",
        abstract: "Run built-in dataflow jobs over committed table snapshots.",
        subcommands: [List.self, Run.self, Explain.self, GC.self]
    )

    struct GC: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "gc",
            abstract: "Delete reliable blocks nobody will read: those of jobs whose process on this host has exited (killed mid-run), and with --older-than, any older block set.")
        @OptionGroup var global: GlobalOptions
        @Option(help: "Also delete block sets written more than this many seconds ago, whoever wrote them.") var olderThan: Int?
        @Flag(help: "List the block sets; delete nothing.") var list = false
        func run() async throws {
            let g = global, olderThan = self.olderThan, listOnly = self.list
            if let o = olderThan, o < 0 { throw ValidationError("--older-than must be at least 0 seconds") }
            try await withCluster(g) { c in
                func describe(_ i: ReliableBlocks.SetInfo) -> String {
                    let owner = i.owner.map { o in "\(o)\(WriterTag.isAlive(o).map { $0 ? " (running)" : " (exited)" } ?? "")" } ?? "unknown owner"
                    return "\(i.set)\t\(i.partitions.count) partitions\t\(i.bytes) bytes\t\(owner)"
                }
                if listOnly {
                    for i in try await ReliableBlocks.list(c) {
                        print(g.json ? jsonLine(["set": i.set, "partitions": i.partitions.count, "bytes": i.bytes, "owner": i.owner ?? ""]) : describe(i))
                    }
                    return
                }
                let (deleted, kept) = try await ReliableBlocks.collectGarbage(c, olderThanMillis: olderThan.map { Int64($0) * 1000 })
                if g.json {
                    print(jsonLine(["deleted_sets": deleted.count, "deleted_partitions": deleted.reduce(0) { $0 + $1.partitions.count },
                                    "deleted_bytes": deleted.reduce(0) { $0 + $1.bytes }, "kept_sets": kept.count]))
                } else {
                    for i in deleted { print("deleted\t" + describe(i)) }
                    print("deleted \(deleted.count) block sets (\(deleted.reduce(0) { $0 + $1.partitions.count }) partitions, \(deleted.reduce(0) { $0 + $1.bytes }) bytes); kept \(kept.count)")
                }
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "The built-in jobs.")
        func run() {
            for j in BuiltinJobs.all { print("\(j.name)\t\(j.about)") }
        }
    }

    struct JobOptions: ParsableArguments {
        @Argument(help: "Job name (see `weft job list`).") var name: String
        @Option(help: "Input table.") var input: String
        @Option(help: "Snapshot timestamp of the input (default: now).") var at: UInt64?
        @Option(help: "Iterations (pagerank).") var iterations = 10
        @Option(help: "Damping factor (pagerank).") var damping = 0.85
        @Option(help: "Clusters (kmeans).") var k = 2
        @Option(help: "Comma-separated words to count (logmining).") var words: String?
        @Option(help: "Second input table (join).") var input2: String?
        @Option(help: "Persist pagerank's graph and each iteration's ranks reliably, N copies on as many participants, so a lost node is not recomputed from the start (0: memory only).")
        var reliable = 0

        func validate() throws {
            if !BuiltinJobs.all.contains(where: { $0.name == name }) {
                throw ValidationError("unknown job '\(name)'; known jobs: \(BuiltinJobs.all.map(\.name).joined(separator: ", "))")
            }
            if iterations < 1 || iterations > 10_000 { throw ValidationError("--iterations must be 1...10000") }
            if !(damping > 0 && damping < 1) { throw ValidationError("--damping must be between 0 and 1") }
            if k < 1 || k > 10_000 { throw ValidationError("--k must be 1...10000") }
            if name == "join" && input2 == nil { throw ValidationError("join needs --input2 TABLE") }
            if name == "logmining" && (words ?? "").isEmpty { throw ValidationError("logmining needs --words w1,w2,...") }
            if reliable < 0 || reliable > Limits.replicasMax { throw ValidationError("--reliable must be 0...\(Limits.replicasMax)") }
        }

        var parameters: JobParameters {
            var p = JobParameters(input: input)
            p.at = at
            p.iterations = iterations
            p.damping = damping
            p.k = k
            p.words = words.map { $0.split(separator: ",").map(String.init) } ?? []
            p.input2 = input2
            p.reliable = reliable
            return p
        }
    }

    struct Run: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "run", abstract: "Run a job; its output goes to a table in one transaction.")
        @OptionGroup var global: GlobalOptions
        @OptionGroup var job: JobOptions
        @Option(help: "Output table.") var output: String?
        @Flag(help: "Replace an existing output table atomically.") var overwrite = false
        @Option(help: "Executor threads (default: every core, at most 256); on a cluster, the default partition count (default: 2 per participant).")
        var threads: Int?
        @Option(help: "The engine's memory bound in MiB; past it, shuffle data, merge tables and caches spill to disk.")
        var memoryMb = DataflowContext.memoryBytesMaxDefault >> 20
        @Flag(help: "With --cluster: run every task in this process instead of on the participants' executors.") var local = false

        func validate() throws {
            if let threads, threads < 1 || threads > DataflowContext.executorThreadsMax {
                throw ValidationError("--threads must be 1...\(DataflowContext.executorThreadsMax)")
            }
            if memoryMb < 1 || memoryMb > DataflowContext.memoryBytesMaxLimit >> 20 {
                throw ValidationError("--memory-mb must be 1...\(DataflowContext.memoryBytesMaxLimit >> 20)")
            }
        }

        func run() async throws {
            let g = global
            let memory = memoryMb << 20
            let threads = self.threads ?? min(ProcessInfo.processInfo.activeProcessorCount, DataflowContext.executorThreadsMax)
            var params = job.parameters
            params.output = output
            params.overwrite = overwrite
            let name = job.name
            let p = params
            // Through a server, the job runs in the server's process, next
            // to the data (its executor): only the request and the answer
            // cross the connection.
            if g.resolvedCluster == nil, case .running(let f) = ServerFile.probe(g.resolvedDataDir) {
                let remote: ServerClient
                do { remote = try ServerClient(f, dataDir: g.resolvedDataDir, secretFile: g.secretFile, certsDir: g.certsDir) } catch { fail(error, json: g.json) }
                defer { remote.close() }
                let request = jobRequest(name, p, threads: threads, memory: memory)
                let answer: Bytes
                do { answer = try await remote.call("job.run", request) } catch let e as WeftError { fail(e, json: g.json) }
                guard let o = (try? JSONSerialization.jsonObject(with: Data(answer))) as? [String: Any] else {
                    fail(WeftError(.corrupted, "the server's answer is not JSON"), json: g.json)
                }
                printJobResult(o, json: g.json)
                return
            }
            // On a cluster this process is the driver and the participants'
            // executors run the tasks, next to their blocks.
            if let c = g.resolvedCluster, !local {
                let remote: ClusterClient
                do { remote = try ClusterClient(config: try ClusterConfig.load(c), secretFile: g.secretFile, certsDir: g.certsDir) } catch { fail(error, json: g.json) }
                defer { remote.close() }
                let nodes = Array(0..<remote.config.participantCount)
                let threads = self.threads ?? 2 * nodes.count
                let tty = isatty(1) == 1
                // The coordinator's jobs pages show this job while it runs.
                let reporter = JobReporter(remote: remote)
                await reporter.start(job: name, input: p.input)
                do {
                    let (result, dist) = try await onDriverThread { () throws -> (JobResult, DistributedMetrics) in
                        let client = remote.client
                        let lease = LeaseHolder()
                        return try BuiltinJobs.runOnCluster(name, p, client: client, nodes: nodes, parallelism: threads, memoryBytesMax: memory,
                                                            call: { n, m, b, t in try await remote.call(to: .participant(n), m, b, timeoutMillis: t) },
                                                            pin: { ts in lease.value = try blocking { try await SnapshotLease.take(client, at: ts) } },
                                                            unpin: { _ in if let l = lease.value { _ = try? blocking { await l.release() } } },
                                                            prepare: { _, sc in
                                                                sc.onProgress = { pr in
                                                                    reporter.progress(stage: pr.stage, stages: pr.stages, tasksDone: pr.tasksDone, tasks: pr.tasks)
                                                                    if pr.tasksDone == pr.tasks || tty {
                                                                        let line = "[stage \(pr.stage)/\(pr.stages)] \(pr.tasksDone)/\(pr.tasks) tasks"
                                                                        FileHandle.standardError.write(Data((tty ? "\r" + line : line + "\n").utf8))
                                                                    }
                                                                }
                                                            })
                    }
                    if tty { FileHandle.standardError.write(Data("\n".utf8)) }
                    var o = jobResultObject(name, p, result, threads: threads, memory: memory)
                    o["executors"] = "cluster"
                    o["tasks_by_executor"] = Dictionary(uniqueKeysWithValues: dist.tasksByExecutor.map { ("participant-\($0.key)", $0.value) })
                    o["node_local_tasks"] = dist.nodeLocalTasks
                    o["replica_reads"] = dist.replicaReads
                    o["speculative_tasks"] = dist.speculativeTasks
                    o["killed_tasks"] = dist.killedTasks
                    o["fetch_failures"] = dist.fetchFailures
                    o["executors_lost"] = dist.executorsLost.map { "participant-\($0)" }
                    o["loser_blocks_deleted"] = result.loserBlocksDeleted
                    if let url = reporter.url { o["job_url"] = url }
                    await reporter.finish(result: o, error: nil)
                    printJobResult(o, json: g.json)
                } catch {
                    let e = (error as? WeftError) ?? WeftError(.unavailable, "\(error)")
                    await reporter.finish(result: nil, error: e.message)
                    fail(e, json: g.json)
                }
                return
            }
            // A job without --output writes nothing durable (its reliable
            // blocks, in a read-only directory, stay in this process).
            let result = try await withSession(g, reads: p.output == nil) { client, embedded -> JobResult in
                let sc = DataflowContext(executor: LocalExecutor(threads: threads), memoryBytesMax: memory)
                let tty = isatty(1) == 1
                sc.onProgress = { pr in
                    if pr.tasksDone == pr.tasks || tty {
                        let line = "[stage \(pr.stage)/\(pr.stages)] \(pr.tasksDone)/\(pr.tasks) tasks"
                        FileHandle.standardError.write(Data((tty ? "\r" + line : line + "\n").utf8))
                    }
                }
                let r = try await onDriverThread { try runLeased(name, p, sc: sc, client: client) }
                if tty { FileHandle.standardError.write(Data("\n".utf8)) }
                return r
            }
            printJobResult(jobResultObject(name, p, result, threads: threads, memory: memory), json: g.json)
        }
    }

    struct Explain: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "explain", abstract: "Print a job's lineage with its stage boundaries, without running it.")
        @OptionGroup var global: GlobalOptions
        @OptionGroup var job: JobOptions

        func run() async throws {
            let g = global
            let p = job.parameters, name = job.name
            let text = try await withCluster(g, reads: true) { client in
                try await onDriverThread {
                    let sc = DataflowContext()
                    return try BuiltinJobs.plan(name, p, sc: sc, client: client, malformed: sc.accumulator("malformed"), explainOnly: true).toDebugString()
                }
            }
            print(text)
        }
    }
}

/// A job run as a JSON request to `weft server` (method `job.run`).
func jobRequest(_ name: String, _ p: JobParameters, threads: Int, memory: Int) -> Bytes {
    var o: [String: Any] = ["job": name, "input": p.input, "iterations": p.iterations, "damping": p.damping, "k": p.k,
                            "words": p.words, "overwrite": p.overwrite, "threads": threads, "memory_bytes_max": memory]
    if let at = p.at { o["at"] = at }
    if let out = p.output { o["output"] = out }
    if let i2 = p.input2 { o["input2"] = i2 }
    if p.reliable > 0 { o["reliable"] = p.reliable }
    return Array(jsonLine(o).utf8)
}

/// Runs a `job.run` request in this process (the server), on its own
/// driver thread, with the job's snapshot leased; its answer is what
/// `weft job run --json` prints.
/// `board`: where the status pages see the job; `jobPage`: the URL prefix
/// of its page (`http://HOST:PORT/jobs/`), returned as `job_url`.
func serveJobRun(_ body: Bytes, client: WeftClient, shouldStop: (@Sendable () -> Bool)? = nil, board: JobBoard? = nil, jobPage: String? = nil) throws -> Bytes {
    guard let o = (try? JSONSerialization.jsonObject(with: Data(body))) as? [String: Any],
          let name = o["job"] as? String, let input = o["input"] as? String else {
        throw WeftError(.invalidArgument, "malformed job.run request")
    }
    var p = JobParameters(input: input)
    p.at = (o["at"] as? NSNumber).map { $0.uint64Value }
    p.iterations = o["iterations"] as? Int ?? p.iterations
    p.damping = o["damping"] as? Double ?? p.damping
    p.k = o["k"] as? Int ?? p.k
    p.reliable = max(0, min(o["reliable"] as? Int ?? 0, Limits.replicasMax))
    p.words = o["words"] as? [String] ?? []
    p.output = o["output"] as? String
    p.input2 = o["input2"] as? String
    p.overwrite = o["overwrite"] as? Bool ?? false
    let threads = min(max(1, o["threads"] as? Int ?? 1), DataflowContext.executorThreadsMax)
    let memory = min(max(1 << 20, o["memory_bytes_max"] as? Int ?? DataflowContext.memoryBytesMaxDefault), DataflowContext.memoryBytesMaxLimit)
    let sc = DataflowContext(executor: LocalExecutor(threads: threads), memoryBytesMax: memory)
    sc.shouldStop = shouldStop
    let id = board?.start(name: name, input: input)
    if let board, let id {
        sc.onProgress = { pr in board.progress(id, stage: pr.stage, stages: pr.stages, tasksDone: pr.tasksDone, tasks: pr.tasks) }
    }
    let result: JobResult
    do {
        result = try runLeased(name, p, sc: sc, client: client)
    } catch {
        if let id { board?.finish(id, result: nil, error: (error as? WeftError)?.message ?? "\(error)") }
        throw error
    }
    var answer = jobResultObject(name, p, result, threads: threads, memory: memory)
    if let id {
        board?.finish(id, result: answer, error: nil)
        if let jobPage { answer["job_url"] = jobPage + String(id) }
    }
    return Array(jsonLine(answer).utf8)
}

func jobResultObject(_ name: String, _ p: JobParameters, _ result: JobResult, threads: Int, memory: Int) -> [String: Any] {
    var o: [String: Any] = ["job": name, "input": p.input, "snapshot_ts": result.snapshotTs, "output_rows": result.outputRows,
                            "malformed_lines": result.malformedLines, "summary": result.summary,
                            "stages": result.metrics.stages, "tasks": result.metrics.tasks, "task_retries": result.metrics.taskRetries,
                            "recomputed_partitions": result.metrics.recomputedPartitions,
                            "partitions_read_from_replicas": result.metrics.partitionsReadFromReplicas,
                            "bytes_spilled": result.metrics.bytesSpilled, "spill_files": result.metrics.spillFiles,
                            "shuffle_bytes_written": result.metrics.shuffleBytesWritten, "shuffle_bytes_fetched": result.metrics.shuffleBytesFetched,
                            "cache_hits": result.metrics.cacheHits, "cache_misses": result.metrics.cacheMisses,
                            "threads": threads, "memory_bytes_max": memory,
                            "stage_times": result.metrics.stageTimes.map(\.json)]
    if let out = p.output, let ts = result.committedTs {
        o["output"] = out
        o["committed_ts"] = ts
    }
    return o
}

func printJobResult(_ o: [String: Any], json: Bool) {
    if json { return print(jsonLine(o)) }
    let n = { (k: String) in (o[k] as? NSNumber)?.intValue ?? 0 }
    print("\(o["job"] ?? "?") over \(o["input"] ?? "?") at ts=\(o["snapshot_ts"] ?? "?"): \(n("output_rows")) output rows")
    for s in o["summary"] as? [String] ?? [] { print("  \(s)") }
    print("  \(n("stages")) stages, \(n("tasks")) tasks, \(n("recomputed_partitions")) partitions recomputed, \(n("partitions_read_from_replicas")) read from replicas")
    if n("spill_files") > 0 {
        print("  \(n("bytes_spilled")) bytes spilled in \(n("spill_files")) files (memory bound \(n("memory_bytes_max") >> 20) MiB)")
    }
    if let out = o["output"], let ts = o["committed_ts"] { print("  output table \(out) committed at ts=\(ts)") }
    if let url = o["job_url"] { print("  job page: \(url)") }
}
