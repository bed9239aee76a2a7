import Foundation
import WeftCore

/// Runs a stage's tasks. Local mode uses a pool of threads, one per core;
/// the protocol is where executors inside participant processes will plug
/// in.
public protocol Executor: Sendable {
    var parallelism: Int { get }
    /// Runs `body` once for each task and returns when every task is done,
    /// or as soon as the executor is lost (its threads die and the blocks
    /// and shuffle outputs it held are gone): then `.lost`. A task makes its
    /// result visible only through `TaskAttempt.publish`, which refuses
    /// once the executor that ran it is lost, so a dead executor's late
    /// result is never counted (nor its accumulator updates).
    func run(_ tasks: [TaskId], _ body: @escaping @Sendable (TaskId, TaskAttempt) -> Void) -> ExecutorOutcome
}

public enum ExecutorOutcome: Sendable { case finished, lost }

/// One batch of tasks on one executor incarnation.
public final class TaskAttempt: @unchecked Sendable {
    let cond = NSCondition()
    var lost = false
    var remaining: Int

    init(tasks: Int) { remaining = tasks }

    /// Runs `f` (which publishes a task's result) unless the executor was
    /// lost; the check and `f` are atomic with respect to the loss.
    @discardableResult
    public func publish(_ f: () -> Void) -> Bool {
        cond.lock()
        defer { cond.unlock() }
        if lost { return false }
        f()
        return true
    }

    var isLost: Bool { cond.withLock { lost } }

    func finishOne() {
        cond.lock()
        remaining -= 1
        if remaining == 0 { cond.broadcast() }
        cond.unlock()
    }

    func markLost() {
        cond.lock()
        lost = true
        cond.broadcast()
        cond.unlock()
    }

    func wait() -> ExecutorOutcome {
        cond.lock()
        defer { cond.unlock() }
        while remaining > 0 && !lost { cond.wait() }
        return lost ? .lost : .finished
    }
}

/// The local executor: a pool of `parallelism` dedicated threads pulling
/// tasks in order. `kill()` loses it the way a crashed executor process is
/// lost: waiting and running tasks are abandoned (a running task's result
/// is refused when it finishes), the scheduler drops what the executor
/// held, and a fresh pool of threads takes the next tasks.
public final class LocalExecutor: Executor, @unchecked Sendable {
    public let parallelism: Int
    let pool: WorkerPool

    public init(threads: Int = ProcessInfo.processInfo.activeProcessorCount) {
        parallelism = max(1, threads)
        pool = WorkerPool(threads: parallelism)
    }

    deinit { pool.shutdown() }

    public func run(_ tasks: [TaskId], _ body: @escaping @Sendable (TaskId, TaskAttempt) -> Void) -> ExecutorOutcome {
        pool.run(tasks, body)
    }

    /// Loses this executor: its threads stop taking tasks (a running task
    /// finishes, but its result is refused), every waiting task is
    /// abandoned, and new threads serve whatever comes next.
    public func kill() { pool.kill() }

    /// How many times `kill()` was called.
    public var kills: Int { pool.cond.withLock { pool.kills } }
}

/// The threads behind a `LocalExecutor`, one generation at a time.
final class WorkerPool: @unchecked Sendable {
    let threads: Int
    let cond = NSCondition()
    var queue: [(TaskAttempt, () -> Void)] = []
    var head = 0
    var generation = 0
    var active: [ObjectIdentifier: TaskAttempt] = [:]
    var kills = 0

    init(threads: Int) {
        self.threads = threads
        startWorkers()
    }

    func startWorkers() {
        let gen = generation
        for i in 0..<threads {
            let t = Thread { [self] in work(gen) }
            t.name = "weft-executor-\(gen)-\(i)"
            t.stackSize = DataflowContext.executorStackBytes
            t.start()
        }
    }

    func work(_ gen: Int) {
        while true {
            cond.lock()
            while head == queue.count && generation == gen { cond.wait() }
            if generation != gen {
                cond.unlock()
                return
            }
            let (attempt, item) = queue[head]
            head += 1
            if head == queue.count {
                queue.removeAll(keepingCapacity: true)
                head = 0
            }
            cond.unlock()
            item()
            attempt.finishOne()
        }
    }

    func run(_ tasks: [TaskId], _ body: @escaping @Sendable (TaskId, TaskAttempt) -> Void) -> ExecutorOutcome {
        if tasks.isEmpty { return .finished }
        let attempt = TaskAttempt(tasks: tasks.count)
        cond.lock()
        active[ObjectIdentifier(attempt)] = attempt
        for t in tasks { queue.append((attempt, { body(t, attempt) })) }
        cond.broadcast()
        cond.unlock()
        let outcome = attempt.wait()
        cond.lock()
        active[ObjectIdentifier(attempt)] = nil
        cond.unlock()
        return outcome
    }

    func kill() {
        cond.lock()
        generation += 1
        kills += 1
        let victims = Array(active.values)
        queue.removeAll()
        head = 0
        cond.broadcast()
        cond.unlock()
        for a in victims { a.markLost() }
        startWorkers()
    }

    /// Lets every thread exit once its current task is done.
    func shutdown() {
        cond.lock()
        generation += 1
        queue.removeAll()
        head = 0
        cond.broadcast()
        cond.unlock()
    }
}

/// Thrown inside the scheduler when the executor running a stage is lost.
struct ExecutorLost: Error {}

/// The executor of a context whose tasks run elsewhere (a distributed
/// driver, an executor's replica): it only states the parallelism that
/// default partition counts come from.
public final class RemoteTasksExecutor: Executor {
    public let parallelism: Int
    public init(parallelism: Int) { self.parallelism = max(1, parallelism) }
    public func run(_ tasks: [TaskId], _ body: @escaping @Sendable (TaskId, TaskAttempt) -> Void) -> ExecutorOutcome {
        preconditionFailure("a distributed context runs no task in process")
    }
}

public final class Counter: @unchecked Sendable {
    let lock = NSLock()
    var n = 0
    public init() {}
    func increment() -> Int { lock.withLock { n += 1; return n } }
    public func add(_ k: Int) { lock.withLock { n += k } }
    public var value: Int { lock.withLock { n } }
}

/// Progress of a running job, for progress bars.
public struct JobProgress: Sendable {
    public var stage: Int
    public var stages: Int
    public var tasksDone: Int
    public var tasks: Int
}
