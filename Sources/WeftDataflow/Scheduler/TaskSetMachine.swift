import WeftCore

/// The tasks of one stage on a set of executors, as a pure state machine:
/// `on(event) -> [action]`, no clock but `tick`, no I/O. The driver feeds it
/// task results, executor losses and ticks, and does what it says; a
/// seeded simulation drives it the same way (Spark's TaskSetManager).
///
/// What it decides:
/// - **Placement with locality.** A task with a preferred executor waits
///   for a slot there for up to `localityWaitMillis` (Spark's
///   `spark.locality.wait`); past that, or when the preferred executor is
///   gone, it runs anywhere.
/// - **Retries.** A failed attempt is retried up to `maxTaskFailures`
///   attempts; a task whose executor was lost is run again without counting
///   a failure.
/// - **Speculation.** Once `speculationQuantile` of the tasks are done, a
///   task running longer than `speculationMultiplier` × their median gets a
///   copy on another executor; the first attempt to finish wins, and every
///   other attempt of that task still running is killed (Spark kills the
///   losers too), as is any attempt left on an executor declared lost,
///   which may only have been paused; a late answer from one is ignored.
/// - **Fetch failures** end the task set at once: the caller resubmits the
///   lost map outputs' stage (the DAG level's job, not this machine's).
public struct TaskSetMachine: Sendable {
    public struct Config: Sendable {
        public var maxTaskFailures = 4
        public var localityWaitMillis: UInt64 = 300
        public var speculation = true
        public var speculationMultiplier = 1.5
        public var speculationQuantile = 0.75
        /// No copy of a task that has run less than this, however fast its
        /// siblings were.
        public var speculationMinMillis: UInt64 = 200
        public var slotsPerExecutor = 2
        /// Every executor lost: how long the stage waits for one to come
        /// back (a node restarted after `kill -9` rejoins within a few
        /// seconds) before it fails.
        public var allLostWaitMillis: UInt64 = 10_000
        /// The stage fails when every executor has been lost this many
        /// times, however quickly they came back.
        public var allLostTimesMax = 3
        public init() {}
    }

    public enum Event: Sendable, Equatable {
        case executorAdded(Int)
        case executorLost(Int)
        case taskFinished(task: Int, attempt: Int)
        case taskFailed(task: Int, attempt: Int, reason: String)
        /// A reduce task could not read map output `map` of `shuffle`.
        case fetchFailed(task: Int, attempt: Int, shuffle: Int, map: Int, executor: Int?)
        case tick(nowMillis: UInt64)
    }

    public enum Action: Sendable, Equatable {
        case launch(task: Int, attempt: Int, executor: Int, speculative: Bool, nodeLocal: Bool)
        /// Another attempt of `task` won: stop this one (its slot frees
        /// when its answer, success or failure, comes back).
        case kill(task: Int, attempt: Int, executor: Int)
        /// Every task has a winning attempt.
        case finished
        /// The stage cannot finish: too many failures, or no executor left.
        case failed(String)
        /// A fetch failure: stop this stage and recompute lost map output.
        case abortForFetchFailure(shuffle: Int, map: Int, executor: Int?)
    }

    enum TaskState: Equatable {
        case pending(sinceMillis: UInt64)
        case running
        case done(attempt: Int)
    }

    struct Attempt: Equatable {
        let executor: Int
        let startedMillis: UInt64
        let speculative: Bool
    }

    public let config: Config
    let preferred: [Int?]
    var states: [TaskState]
    /// Live attempts per task, by attempt number.
    var running: [[Int: Attempt]]
    /// Attempts on executors declared lost, by task: attempt → executor.
    var abandoned: [[Int: Int]]
    var nextAttempt: [Int]
    var failures: [Int]
    var executors: Set<Int>
    /// Executors ever lost during this task set (for error messages).
    var lost: [Int] = []
    /// Since when no executor is left (nil while one is), and how many
    /// times that happened.
    var allLostSinceMillis: UInt64?
    var allLostTimes = 0
    var busy: [Int: Int] = [:]
    var nowMillis: UInt64
    var durations: [UInt64] = []
    var over = false
    public private(set) var speculativeLaunches = 0
    public private(set) var nodeLocalLaunches = 0
    public private(set) var killLaunches = 0

    /// `preferred[i]` is the executor holding task i's input, if any.
    public init(preferred: [Int?], executors: Set<Int>, nowMillis: UInt64, config: Config = Config()) {
        self.config = config
        self.preferred = preferred
        states = Array(repeating: .pending(sinceMillis: nowMillis), count: preferred.count)
        running = Array(repeating: [:], count: preferred.count)
        abandoned = Array(repeating: [:], count: preferred.count)
        nextAttempt = Array(repeating: 0, count: preferred.count)
        failures = Array(repeating: 0, count: preferred.count)
        self.executors = executors
        self.nowMillis = nowMillis
    }

    /// The first actions: launches, or `finished` for an empty set.
    public mutating func start() -> [Action] {
        if preferred.isEmpty {
            over = true
            return [.finished]
        }
        if executors.isEmpty {
            over = true
            return [.failed("no executor is available")]
        }
        return schedule()
    }

    public var isOver: Bool { over }
    public var doneCount: Int { states.filter { if case .done = $0 { return true } else { return false } }.count }

    public mutating func on(_ event: Event) -> [Action] {
        if over { return [] }
        switch event {
        case .executorAdded(let e):
            executors.insert(e)
            allLostSinceMillis = nil
        case .executorLost(let e):
            guard executors.remove(e) != nil else { return [] }
            lost.append(e)
            busy[e] = nil
            for t in states.indices {
                let gone = running[t].filter { $0.value.executor == e }.map(\.key)
                for a in gone {
                    running[t][a] = nil
                    // A node declared lost may only be slow (SIGSTOP, a long
                    // pause): its attempt is killed too once the task is won.
                    abandoned[t][a] = e
                }
                if !gone.isEmpty, states[t] == .running, running[t].isEmpty { states[t] = .pending(sinceMillis: nowMillis) }
            }
            if executors.isEmpty {
                allLostTimes += 1
                if allLostTimes >= config.allLostTimesMax {
                    over = true
                    return [.failed("every executor was lost \(allLostTimes) times (nodes \(lostNames); TaskSetMachine.Config.allLostTimesMax)")]
                }
                allLostSinceMillis = nowMillis
                return []
            }
        case let .taskFinished(t, a):
            guard let att = running[t].removeValue(forKey: a) else { return schedule() }
            release(att.executor)
            if case .done = states[t] { return schedule() }   // a slower copy: ignored
            states[t] = .done(attempt: a)
            durations.append(nowMillis &- att.startedMillis)
            let losers = running[t].mapValues(\.executor).merging(abandoned[t]) { a, _ in a }
            abandoned[t] = [:]
            let kills = losers.sorted { $0.key < $1.key }.map { Action.kill(task: t, attempt: $0.key, executor: $0.value) }
            killLaunches += kills.count
            if states.allSatisfy({ if case .done = $0 { return true } else { return false } }) {
                over = true
                return kills + [.finished]
            }
            return kills + schedule()
        case let .taskFailed(t, a, reason):
            guard let att = running[t].removeValue(forKey: a) else { return schedule() }
            release(att.executor)
            if case .done = states[t] { return schedule() }
            failures[t] += 1
            if failures[t] >= config.maxTaskFailures {
                over = true
                return [.failed("task \(t) failed \(failures[t]) times; last: \(reason)")]
            }
            if running[t].isEmpty { states[t] = .pending(sinceMillis: nowMillis) }
        case let .fetchFailed(t, a, shuffle, map, executor):
            guard running[t][a] != nil else { return schedule() }
            over = true
            return [.abortForFetchFailure(shuffle: shuffle, map: map, executor: executor)]
        case .tick(let now):
            nowMillis = max(nowMillis, now)
            if let since = allLostSinceMillis {
                if nowMillis >= since + config.allLostWaitMillis {
                    over = true
                    return [.failed("every executor was lost (nodes \(lostNames)) and none came back within \(config.allLostWaitMillis) ms (TaskSetMachine.Config.allLostWaitMillis)")]
                }
                return []
            }
            var out = schedule()
            out += speculate()
            return out
        }
        return schedule()
    }

    var lostNames: String {
        var seen: Set<Int> = []
        return lost.filter { seen.insert($0).inserted }.map(String.init).joined(separator: ", ")
    }

    mutating func release(_ e: Int) {
        if let n = busy[e] { busy[e] = n > 1 ? n - 1 : nil }
    }

    func free(_ e: Int) -> Int { config.slotsPerExecutor - busy[e, default: 0] }

    /// Fills free slots: node-local tasks first; a task whose preferred
    /// executor is alive waits for it up to the locality wait.
    mutating func schedule() -> [Action] {
        var out: [Action] = []
        // One slot per executor per round, so that tasks without a
        // preference spread over the executors instead of filling the first.
        var progress = true
        while progress {
            progress = false
            for e in executors.sorted() where free(e) > 0 {
                if let t = pick(for: e) {
                    out.append(launch(t, on: e, speculative: false))
                    progress = true
                }
            }
        }
        return out
    }

    func pick(for e: Int) -> Int? {
        var fallback: Int?
        for t in states.indices {
            guard case .pending(let since) = states[t] else { continue }
            guard let p = preferred[t] else {
                if fallback == nil { fallback = t }
                continue
            }
            if p == e { return t }
            if !executors.contains(p) || nowMillis &- since >= config.localityWaitMillis {
                if fallback == nil { fallback = t }
            }
        }
        return fallback
    }

    mutating func launch(_ t: Int, on e: Int, speculative: Bool) -> Action {
        let a = nextAttempt[t]
        nextAttempt[t] += 1
        running[t][a] = Attempt(executor: e, startedMillis: nowMillis, speculative: speculative)
        states[t] = .running
        busy[e, default: 0] += 1
        let local = preferred[t] == e
        if local { nodeLocalLaunches += 1 }
        if speculative { speculativeLaunches += 1 }
        return .launch(task: t, attempt: a, executor: e, speculative: speculative, nodeLocal: local)
    }

    /// Copies of stragglers, on an executor with a free slot that is not
    /// already running the task.
    mutating func speculate() -> [Action] {
        guard config.speculation, !states.isEmpty,
              Double(durations.count) >= config.speculationQuantile * Double(states.count) else { return [] }
        let sorted = durations.sorted()
        let median = sorted[sorted.count / 2]
        let threshold = max(config.speculationMinMillis, UInt64(Double(median) * config.speculationMultiplier))
        var out: [Action] = []
        for t in states.indices where states[t] == .running && running[t].count == 1 {
            let (_, att) = running[t].first!
            guard nowMillis &- att.startedMillis > threshold else { continue }
            guard let e = executors.sorted().first(where: { $0 != att.executor && free($0) > 0 }) else { continue }
            out.append(launch(t, on: e, speculative: true))
        }
        return out
    }
}
