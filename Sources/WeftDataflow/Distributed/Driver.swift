import Foundation
import WeftCore
import WeftRuntime

/// What a distributed job reports beyond `JobMetrics`.
public struct DistributedMetrics: Sendable {
    public var tasksByExecutor: [Int: Int] = [:]
    public var nodeLocalTasks = 0
    public var speculativeTasks = 0
    public var fetchFailures = 0
    public var executorsLost: [Int] = []
    /// (rdd, partition) computed more than once across all executors.
    public var recomputedPartitions = 0
    public var replicaReads = 0
    /// Attempts killed because another attempt of their task finished first.
    public var killedTasks = 0
}

/// The driver of a distributed job: the DAG scheduler's stage loop (as in
/// `DataflowContext.runJob`) with each stage's tasks sent to the executors
/// of the participant nodes, placed by `TaskSetMachine`. It tracks where
/// every map output and cached partition lives, notices lost executors by
/// heartbeat, and hands each executor the earlier actions' results its
/// replica of the program needs.
public final class ClusterDriver: ActionRunner, @unchecked Sendable {
    public let spec: JobSpec
    let call: @Sendable (Int, String, Bytes, Int64?) async throws -> (ok: Bool, body: Bytes)
    let nodes: [Int]
    let lock = NSLock()
    var live: Set<Int>
    /// Action results each executor's replica is known to hold.
    var delivered: [Int: Int] = [:]
    var results: [ActionResult] = []
    /// shuffle → map partition → node holding it.
    var mapOutputs: [Int: [Int: Int]] = [:]
    /// rdd → partition → node that cached it.
    var cacheLocations: [Int: [Int: Int]] = [:]
    var computed: Set<Int64> = []
    /// Every task attempt launched, and the node it went to: losers are
    /// killed from these, and an output's losing attempts' blocks found
    /// (`PartitionedOutput.collectLosers`).
    var attempts: [TaskKey: Int] = [:]
    var killsSent: Set<TaskKey> = []
    var metrics = DistributedMetrics()
    var mailboxes: [ObjectIdentifier: Mailbox] = [:]
    var heartbeat: Thread?
    var stopping = false
    public var config = TaskSetMachine.Config()

    /// How often the driver pings every executor.
    public static let heartbeatMillis: UInt64 = 500
    /// An executor that does not answer a ping for this long is lost: its
    /// running tasks go elsewhere, its map outputs and cached partitions
    /// are forgotten, and it gets tasks again once it answers.
    public static let executorLostAfterMillis: Int64 = 3000
    /// Test hook: called as each task is sent.
    public var onLaunch: (@Sendable (_ action: Int, _ isMap: Bool, _ partition: Int, _ node: Int) -> Void)?

    public init(spec: JobSpec, nodes: [Int], call: @escaping @Sendable (Int, String, Bytes, Int64?) async throws -> (ok: Bool, body: Bytes)) {
        self.spec = spec
        self.nodes = nodes
        self.call = call
        live = []
    }

    /// Pings every node once (the executors that answer are the job's
    /// first), then keeps pinging in the background.
    public func start() throws {
        let answered = pingAll()
        lock.withLock { live = Set(answered) }
        if answered.isEmpty {
            throw WeftError(.unavailable, "no participant's executor answered (nodes \(nodes.map(String.init).joined(separator: ", ")) are down?)")
        }
        // Every executor must know the job before any task runs.
        let (name, call) = (spec.name, self.call)
        for n in answered {
            let (ok, body) = try blocking { try await call(n, "exec.knows", ExecutorCodec.request(name, []), Self.executorLostAfterMillis) }
            let knows = ok ? ((try? ExecutorCodec.parseRequest(body))?.ints.first ?? 0) : 0
            if knows != 1 {
                throw WeftError(.invalidArgument, "participant-\(n) does not know job \(name) (is it running another weft binary?); no task was run")
            }
        }
        let t = Thread { [weak self] in
            while let s = self, !s.lock.withLock({ s.stopping }) {
                usleep(UInt32(Self.heartbeatMillis * 1000))
                s.beat()
            }
        }
        t.name = "weft-driver-heartbeat"
        heartbeat = t
        t.start()
    }

    /// Stops the heartbeat and tells every executor to forget the job.
    public func finish() {
        lock.withLock { stopping = true }
        let key = spec.key
        let call = self.call
        for n in nodes { _ = try? blocking { try await call(n, "exec.forget", ExecutorCodec.request(key, []), 1000) } }
    }

    public var report: DistributedMetrics { lock.withLock { metrics } }

    func pingAll() -> [Int] {
        let (key, call) = (spec.key, self.call)
        let answers = (try? blocking { () async -> [(Int, Int?, Int?)] in
            await withTaskGroup(of: (Int, Int?, Int?).self) { g in
                for n in self.nodes {
                    g.addTask {
                        guard let (ok, body) = try? await call(n, "exec.ping", ExecutorCodec.request(key, []), Self.executorLostAfterMillis), ok,
                              let (_, ints) = try? ExecutorCodec.parseRequest(body), ints.count >= 2 else { return (n, nil, nil) }
                        return (n, ints[0], ints[1])
                    }
                }
                var out: [(Int, Int?, Int?)] = []
                for await a in g { out.append(a) }
                return out
            }
        }) ?? []
        var up: [Int] = []
        lock.withLock {
            for (n, have, slots) in answers {
                guard let have else { continue }
                up.append(n)
                delivered[n] = have
                if let slots { config.slotsPerExecutor = max(1, slots) }
            }
        }
        return up.sorted()
    }

    func beat() {
        let up = Set(pingAll())
        var lostNow: [Int] = []
        var added: [Int] = []
        lock.withLock {
            lostNow = live.subtracting(up).sorted()
            added = up.subtracting(live).sorted()
            live = up
        }
        for n in lostNow { executorLost(n) }
        for n in added { post(.executorAdded(n)) }
    }

    /// Forgets what `n` held and tells the running stage.
    func executorLost(_ n: Int) {
        lock.withLock {
            live.remove(n)
            delivered[n] = 0
            if !metrics.executorsLost.contains(n) { metrics.executorsLost.append(n) }
            for s in mapOutputs.keys { mapOutputs[s] = mapOutputs[s]!.filter { $0.value != n } }
            for r in cacheLocations.keys { cacheLocations[r] = cacheLocations[r]!.filter { $0.value != n } }
        }
        post(.executorLost(n))
    }

    func post(_ e: TaskSetMachine.Event) {
        for m in lock.withLock({ Array(mailboxes.values) }) { m.post(.event(e)) }
    }

    // MARK: Actions

    func runAction(_ sc: DataflowContext, index: Int, rdd: AnyRDD, partitions: [Int],
                   encodeTask: @escaping (Int, TaskContext) throws -> Bytes) throws -> [Bytes] {
        var stageIndex = 0
        // Result partitions already computed survive a resubmission: only
        // the missing ones run again (Spark's missing partitions).
        var won: [Int: Done] = [:]
        for attempt in 0..<sc.maxStageAttempts {
            let plan = sc.stagePlan(rdd)
            do {
                for dep in plan {
                    stageIndex += 1
                    if CrashPoints.armed { CrashPoints.check("driver.stage-\(stageIndex)") }
                    let missing = lock.withLock { () -> [Int] in
                        let have = mapOutputs[dep.shuffleId] ?? [:]
                        return (0..<dep.parentRDD.numPartitions).filter { have[$0] == nil }
                    }
                    if missing.isEmpty { continue }
                    if let why = dep.processBoundRefusal { throw WeftError(.invalidArgument, "job \(spec.name) cannot run on executors: \(why) (run it with --local)") }
                    let record = beginStage(sc)
                    var done: [Int: Done] = [:]
                    var aborted = true
                    // Recorded whether it finished or was aborted by a fetch
                    // failure (marked so): a killed iteration's time is all of it.
                    defer {
                        lock.withLock { for (p, r) in done { mapOutputs[dep.shuffleId, default: [:]][p] = r.node } }
                        endStage(sc, record, name: "shuffle \(dep.shuffleId) of \(dep.parentRDD.name) [rdd \(dep.parentRDD.id)]\(aborted ? " (aborted)" : "")", tasks: missing.count)
                    }
                    try runStage(sc, action: index, kind: .map(shuffle: dep.shuffleId), rdd: dep.parentRDD, partitions: missing,
                                 stageIndex: stageIndex, stages: plan.count + 1, won: &done, durations: record.durations)
                    aborted = false
                    killLosers(action: index, shuffle: dep.shuffleId, winners: done)
                }
                stageIndex += 1
                let resultStage = beginStage(sc)
                let missing = partitions.filter { won[$0] == nil }
                var aborted = true
                defer { endStage(sc, resultStage, name: "result of \(rdd.name) [rdd \(rdd.id)]\(aborted ? " (aborted)" : "")", tasks: missing.count) }
                try runStage(sc, action: index, kind: .result, rdd: rdd, partitions: missing, stageIndex: stageIndex, stages: plan.count + 1, won: &won,
                             durations: resultStage.durations)
                aborted = false
                let done = won
                killLosers(action: index, shuffle: -1, winners: done)
                var out: [Bytes] = []
                for p in partitions {
                    let r = done[p]!
                    out.append(try blocking { [call] in try await ExecutorService.bytes(of: r.payload, from: r.node) { try await call($0, $1, $2, nil) } })
                }
                let accs = sc.lock.withLock { sc.accumulators.map(\.value) }
                let record = ActionResult(results: out, accumulators: accs)
                lock.withLock {
                    precondition(results.count == index, "actions run in order")
                    results.append(record)
                }
                return out
            } catch let f as FetchFailed {
                if attempt + 1 == sc.maxStageAttempts {
                    throw WeftError(.unavailable, "job \(spec.name) failed: map output \(f.mapPartition) of shuffle \(f.shuffleId) was lost \(sc.maxStageAttempts) times")
                }
                sc.metric { $0.stageResubmissions += 1 }
                stageIndex = 0
            }
        }
        throw WeftError(.unavailable, "job \(spec.name) failed after \(sc.maxStageAttempts) stage attempts")
    }

    struct Done {
        let node: Int
        let payload: Payload
        /// The attempt number the executor was given.
        var attempt = 0
    }

    /// Kills one attempt on `node` (best effort: a loser that is not
    /// stopped only wastes its slot; its answer is ignored and its output
    /// fenced), once.
    func kill(action: Int, shuffle: Int, partition: Int, attempt: Int, node: Int) {
        let key = TaskKey(action: action, shuffle: shuffle, partition: partition, attempt: attempt)
        guard lock.withLock({ killsSent.insert(key).inserted }) else { return }
        lock.withLock { metrics.killedTasks += 1 }
        let (call, body) = (self.call, ExecutorCodec.request(spec.key, [action, shuffle, partition, attempt]))
        Task.detached { _ = try? await call(node, "exec.kill", body, 2000) }
    }

    func launchedResultAttempts() -> Set<ResultAttempt> {
        lock.withLock { Set(attempts.keys.filter { $0.shuffle < 0 }.map { ResultAttempt(action: $0.action, partition: $0.partition, attempt: $0.attempt) }) }
    }

    /// After a stage: attempts of earlier runs of it (aborted by a fetch
    /// failure, or left on a node declared lost) may still run; every
    /// attempt of a partition it won, other than the winner, is killed.
    /// Map attempts are matched by shuffle (a lost output's task may run
    /// again in a later action), result attempts by action.
    func killLosers(action: Int, shuffle: Int, winners: [Int: Done]) {
        let losers = lock.withLock {
            attempts.filter { k, _ in
                k.shuffle == shuffle && (shuffle >= 0 || k.action == action) && winners[k.partition].map { $0.attempt != k.attempt } == true
            }
        }
        for (k, node) in losers { kill(action: k.action, shuffle: k.shuffle, partition: k.partition, attempt: k.attempt, node: node) }
    }

    /// The node to run partition `p` of `rdd` on: where it is cached, else
    /// where its input block lives, else its first narrow parent's.
    func preferredNode(_ rdd: AnyRDD, _ p: Int) -> Int? {
        var r = rdd
        var part = p
        for _ in 0..<1000 {
            if let n = lock.withLock({ cacheLocations[r.id]?[part] }) { return n }
            if let loc = r.preferredLocation(part), loc.hasPrefix("participant-"), let n = Int(loc.dropFirst("participant-".count)) { return n }
            guard case .narrow(let parent, let f)? = r.dependencies.first, let q = f(part).first else { return nil }
            r = parent
            part = q
        }
        return nil
    }

    enum Mail {
        case event(TaskSetMachine.Event)
        case reply(task: Int, attempt: Int, node: Int, TaskReply)
        case callFailed(task: Int, attempt: Int, node: Int, String)
    }

    final class Mailbox: @unchecked Sendable {
        let cond = NSCondition()
        var items: [Mail] = []
        func post(_ m: Mail) {
            cond.withLock {
                items.append(m)
                cond.signal()
            }
        }
        func take(waitMillis: UInt64) -> [Mail] {
            cond.lock()
            defer { cond.unlock() }
            if items.isEmpty { _ = cond.wait(until: Date(timeIntervalSinceNow: Double(waitMillis) / 1000)) }
            defer { items = [] }
            return items
        }
    }

    /// What a stage's record starts from: the time, the counters, and its
    /// winning tasks' run times as the executors measured them.
    struct StageRecord {
        let started: UInt64
        let before: JobMetrics
        let recomputedBefore: Int
        let durations: TaskMillis
    }

    func beginStage(_ sc: DataflowContext) -> StageRecord {
        StageRecord(started: DispatchTime.now().uptimeNanoseconds, before: sc.lock.withLock { sc.jobMetrics },
                    recomputedBefore: lock.withLock { metrics.recomputedPartitions }, durations: TaskMillis())
    }

    func endStage(_ sc: DataflowContext, _ r: StageRecord, name: String, tasks: Int) {
        let recomputed = lock.withLock { metrics.recomputedPartitions } - r.recomputedBefore
        sc.metric {
            $0.stages += 1
            $0.tasks += tasks
            var st = StageTime(name: name, tasks: tasks, seconds: Double(DispatchTime.now().uptimeNanoseconds - r.started) / 1e9)
            st.taskMillis = TaskDurations(r.durations.values)
            st.bytesSpilled = $0.bytesSpilled - r.before.bytesSpilled
            st.shuffleBytesWritten = $0.shuffleBytesWritten - r.before.shuffleBytesWritten
            st.shuffleBytesFetched = $0.shuffleBytesFetched - r.before.shuffleBytesFetched
            st.retries = $0.taskRetries - r.before.taskRetries
            st.recomputedPartitions = recomputed
            $0.stageTimes.append(st)
        }
    }

    /// One stage's tasks, to completion; each partition's winning attempt
    /// goes into `won` as it finishes (kept if the stage is aborted).
    func runStage(_ sc: DataflowContext, action: Int, kind: TaskRequest.Kind, rdd: AnyRDD, partitions: [Int], stageIndex: Int, stages: Int,
                  won: inout [Int: Done], durations: TaskMillis) throws {
        let preferred = partitions.map { preferredNode(rdd, $0) }
        let mailbox = Mailbox()
        let (executors, cfg) = lock.withLock { (live, config) }
        var machine = TaskSetMachine(preferred: preferred, executors: executors, nowMillis: wallMillis(), config: cfg)
        // Attempts are numbered across a task's stage runs (a fetch failure
        // starts a new machine, whose attempts start at 0): a result
        // attempt's number names its output blocks, and a stale attempt of
        // an earlier run must never write under a later winner's name, nor
        // be mistaken for it by a kill. Map tasks are counted per shuffle,
        // result tasks per action.
        let shuffle: Int = { if case .map(let s) = kind { return s } else { return -1 } }()
        let attemptOffset: [Int] = {
            var next: [Int: Int] = [:]
            lock.withLock {
                for k in attempts.keys where k.shuffle == shuffle && (shuffle >= 0 || k.action == action) {
                    next[k.partition] = max(next[k.partition] ?? 0, k.attempt + 1)
                }
            }
            return partitions.map { next[$0] ?? 0 }
        }()
        lock.withLock { mailboxes[ObjectIdentifier(mailbox)] = mailbox }
        defer { lock.withLock { mailboxes[ObjectIdentifier(mailbox)] = nil } }
        sc.onProgress?(JobProgress(stage: stageIndex, stages: stages, tasksDone: 0, tasks: partitions.count))
        var pendingActions = machine.start()
        while true {
            for a in pendingActions {
                switch a {
                case let .launch(t, attempt, node, speculative, local):
                    lock.withLock {
                        attempts[TaskKey(action: action, shuffle: shuffle, partition: partitions[t], attempt: attemptOffset[t] + attempt)] = node
                        metrics.tasksByExecutor[node, default: 0] += 1
                        if local { metrics.nodeLocalTasks += 1 }
                        if speculative { metrics.speculativeTasks += 1 }
                    }
                    launch(action: action, kind: kind, task: t, partition: partitions[t], attempt: attempt, sentAttempt: attemptOffset[t] + attempt,
                           node: node, mailbox: mailbox)
                case let .kill(t, attempt, node):
                    kill(action: action, shuffle: shuffle, partition: partitions[t], attempt: attemptOffset[t] + attempt, node: node)
                case .finished:
                    return
                case .failed(let why):
                    throw WeftError(.unavailable, "job \(spec.name): stage \(stageIndex) failed: \(why)")
                case let .abortForFetchFailure(s, m, node):
                    lock.withLock {
                        metrics.fetchFailures += 1
                        // Spark unregisters the one output; a dead holder's
                        // others go when it is declared lost.
                        mapOutputs[s]?[m] = nil
                        if let node, !live.contains(node) { for k in mapOutputs.keys { mapOutputs[k] = mapOutputs[k]!.filter { $0.value != node } } }
                    }
                    throw FetchFailed(shuffleId: s, mapPartition: m)
                }
            }
            pendingActions = []
            for mail in mailbox.take(waitMillis: 50) {
                switch mail {
                case .event(let e):
                    pendingActions += machine.on(e)
                case let .callFailed(t, attempt, node, why):
                    // The executor is unreachable: lost, until it answers a ping.
                    if lock.withLock({ live.contains(node) }) {
                        executorLost(node)
                    }
                    pendingActions += machine.on(.executorLost(node))
                    _ = (t, attempt, why)
                case let .reply(t, attempt, node, reply):
                    switch reply {
                    case let .ok(payload, accs, computedNow, cached, m, have):
                        let wasDone = machine.isTaskDone(t)
                        let acts = machine.on(.taskFinished(task: t, attempt: attempt))
                        if !wasDone && machine.isTaskDone(t) {
                            won[partitions[t]] = Done(node: node, payload: payload, attempt: attemptOffset[t] + attempt)
                            let all = sc.lock.withLock { sc.accumulators }
                            for (i, v) in accs where i < all.count { all[i].commit(v) }
                            lock.withLock {
                                delivered[node] = max(delivered[node] ?? 0, have)
                                for c in computedNow where !computed.insert(c).inserted { metrics.recomputedPartitions += 1 }
                                for c in cached { cacheLocations[Int(c >> 32), default: [:]][Int(c & 0xffff_ffff)] = node }
                                // A cached partition of a reliably persisted RDD was
                                // written to the store first (`RDD.iterator`): the
                                // plan need not recompute its parents again.
                                for c in cached { sc.reliableRegistry.state(rdd: Int(c >> 32))?.noteStored(Int(c & 0xffff_ffff)) }
                                metrics.replicaReads += m.replicaReads
                            }
                            durations.add(Double(m.taskMicros) / 1000)
                            sc.metric {
                                $0.cacheHits += m.cacheHits
                                $0.cacheMisses += m.cacheMisses
                                $0.shuffleBytesWritten += m.shuffleBytesWritten
                                $0.shuffleBytesFetched += m.shuffleBytesFetched
                                $0.bytesSpilled += m.bytesSpilled
                                $0.spillFiles += m.spillFiles
                                $0.diskBlockReads += m.diskBlockReads
                                $0.partitionsReadFromReplicas += m.replicaReads
                            }
                            sc.onProgress?(JobProgress(stage: stageIndex, stages: stages, tasksDone: machine.doneCount, tasks: partitions.count))
                        }
                        pendingActions += acts
                    case .failed(let why):
                        sc.metric { $0.taskRetries += 1 }
                        pendingActions += machine.on(.taskFailed(task: t, attempt: attempt, reason: "on node \(node): \(why)"))
                    case let .fetchFailed(s, m, holder):
                        pendingActions += machine.on(.fetchFailed(task: t, attempt: attempt, shuffle: s, map: m, executor: holder >= 0 ? holder : nil))
                    case .needResults:
                        // `launch` resends with what the replica lacks.
                        pendingActions += machine.on(.taskFailed(task: t, attempt: attempt, reason: "replica on node \(node) was behind"))
                    }
                }
            }
            pendingActions += machine.on(.tick(nowMillis: wallMillis()))
        }
    }

    /// Sends one task; its replies reach `mailbox` under the machine's
    /// `attempt`, while the executor is told `sentAttempt`.
    func launch(action: Int, kind: TaskRequest.Kind, task t: Int, partition: Int, attempt: Int, sentAttempt: Int, node: Int, mailbox: Mailbox) {
        let call = self.call
        onLaunch?(action, { if case .map = kind { return true } else { return false } }(), partition, node)
        Task.detached { [self] in
            for _ in 0..<3 {
                let request = self.request(action: action, kind: kind, partition: partition, attempt: sentAttempt, node: node)
                guard request.count <= ExecutorProtocol.requestBytesMax + (1 << 16) else {
                    mailbox.post(.reply(task: t, attempt: attempt, node: node, .failed("the results of earlier actions are too large to send to executors (\(request.count) bytes; ExecutorProtocol.requestBytesMax)")))
                    return
                }
                do {
                    let (ok, body) = try await call(node, "exec.task", request, nil)
                    guard ok else {
                        mailbox.post(.reply(task: t, attempt: attempt, node: node, .failed(String(decoding: body, as: UTF8.self))))
                        return
                    }
                    let reply = try TaskReply.decode(body)
                    if case .needResults(let have) = reply {
                        lock.withLock { delivered[node] = have }
                        continue
                    }
                    mailbox.post(.reply(task: t, attempt: attempt, node: node, reply))
                    return
                } catch let e as WeftError where e.code == .unavailable {
                    mailbox.post(.callFailed(task: t, attempt: attempt, node: node, e.message))
                    return
                } catch {
                    mailbox.post(.reply(task: t, attempt: attempt, node: node, .failed(describe(error))))
                    return
                }
            }
            mailbox.post(.reply(task: t, attempt: attempt, node: node, .failed("replica on node \(node) kept asking for earlier results")))
        }
    }

    func request(action: Int, kind: TaskRequest.Kind, partition: Int, attempt: Int, node: Int) -> Bytes {
        lock.withLock {
            let first = min(delivered[node] ?? 0, results.count)
            var locs: [Int: [Int]] = [:]
            for (s, outs) in mapOutputs {
                let n = (outs.keys.max() ?? -1) + 1
                var row = Array(repeating: -1, count: n)
                for (m, holder) in outs { row[m] = holder }
                locs[s] = row
            }
            return TaskRequest(spec: spec, action: action, kind: kind, partition: partition, attempt: attempt,
                               mapLocations: locs, firstResult: first, results: Array(results[first...])).encoded()
        }
    }
}

extension TaskSetMachine {
    func isTaskDone(_ t: Int) -> Bool {
        if case .done = states[t] { return true }
        return false
    }
}

extension BuiltinJobs {
    /// Runs a registry job with this process as the driver and the
    /// participants' executors running its tasks. `call` reaches node i's
    /// executor. The output table is written here, in one transaction,
    /// from the results the executors return.
    public static func runOnCluster(_ name: String, _ p: JobParameters, client: WeftClient, nodes: [Int], parallelism: Int, memoryBytesMax: Int,
                                    call: @escaping @Sendable (Int, String, Bytes, Int64?) async throws -> (ok: Bool, body: Bytes),
                                    pin: ((Timestamp) throws -> Void)? = nil, unpin: ((Timestamp) -> Void)? = nil,
                                    prepare: ((ClusterDriver, DataflowContext) -> Void)? = nil) throws -> (JobResult, DistributedMetrics) {
        var params = p
        params.at = try params.at ?? blocking { try await client.now() }
        let key = String(UInt64.random(in: 1...UInt64.max), radix: 36)
        let spec = JobSpec(key: key, name: name, params: params, runId: String(UInt64.random(in: 1...UInt64.max), radix: 36),
                           parallelism: parallelism, memoryBytesMax: memoryBytesMax)
        let driver = ClusterDriver(spec: spec, nodes: nodes, call: call)
        try driver.start()
        defer { driver.finish() }
        let sc = DataflowContext(executor: RemoteTasksExecutor(parallelism: parallelism), memoryBytesMax: memoryBytesMax, runId: spec.runId)
        sc.actionRunner = driver
        prepare?(driver, sc)
        var result = try run(name, params, sc: sc, client: client, pin: pin, unpin: unpin)
        let d = driver.report
        result.metrics.recomputedPartitions = d.recomputedPartitions
        result.metrics.executorsLost = d.executorsLost.count
        return (result, d)
    }
}
