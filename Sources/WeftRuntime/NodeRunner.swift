import CoreMetrics
import Foundation
import WeftCore
import WeftProtocol

/// Wall-clock milliseconds: the only clock a state machine ever sees, and
/// only through `tick`.
public func wallMillis() -> UInt64 {
    var t = timespec()
    clock_gettime(CLOCK_REALTIME, &t)
    return UInt64(t.tv_sec) * 1000 + UInt64(t.tv_nsec) / 1_000_000
}

/// Something that takes envelopes for a node or a client.
public protocol MessageSink: AnyObject, Sendable {
    func enqueue(_ env: Envelope)
    /// Several envelopes at once (one lock, one wake-up where it can).
    func enqueueAll(_ envs: [Envelope])
}

extension MessageSink {
    public func enqueueAll(_ envs: [Envelope]) { for e in envs { enqueue(e) } }
}

/// The thin shell around one pure state machine: a dedicated thread that
/// drains the inbox, steps the machine for every message, writes every
/// record of the round in ONE durable LMDB commit, and only then sends the
/// round's messages. Messages that arrive while a commit is in progress
/// join the next round: that is the group commit.
///
/// A round whose records are all lazy (`Steppable.isLazy`: a participant's
/// commit records after a decision, a coordinator's `ended`) and whose
/// messages all wait for them (acknowledgements) is held back for up to
/// `lazyWaitMillis`, and joins the next round's commit: under two-phase
/// commits the COMMIT records then share a participant's next PREPARE
/// commit instead of costing one of their own, and the next PREPARE does
/// not queue behind them. Acknowledgements of held records are held too;
/// other messages of rounds without records go at once.
///
/// If a commit fails (disk full, map at its limit), the node stops: its
/// memory may be ahead of its disk, and nothing it promised in that round
/// was sent. A restart recovers from the disk.
public final class NodeRunner<M: Steppable>: MessageSink, @unchecked Sendable {
    enum Item {
        case envelope(Envelope)
        case job((inout M) -> Void)
    }

    public let address: NodeAddress
    let cond = NSCondition()
    var inbox: [Item] = []
    var stopping = false
    var stopped = false
    var machine: M
    let persist: ([M.Record]) throws(WeftError) -> Void
    let router: any Transport
    let tickMillis: UInt64 = 10
    /// Longest a lazy round waits for company before it is committed alone.
    static var lazyWaitMillis: UInt64 { 2 }
    /// Held lazy records and the acknowledgements waiting for them, and
    /// when the first was held.
    var heldRecords: [M.Record] = []
    var heldMessages: [Envelope] = []
    var heldSince: UInt64 = 0
    public private(set) var failure: WeftError?
    /// Rounds and records committed, for benchmarks.
    public private(set) var commits = 0
    public private(set) var recordsCommitted = 0
    var thread: Thread?

    /// A one-line summary of the machine, refreshed after every round and
    /// readable from any thread without waiting for the node's thread:
    /// health checks answer from the event loop, which must never block on
    /// a runner (one that has not started yet would never answer).
    let summarize: (M) -> String
    var lastSummary: String

    /// Metrics of this node's group commit (no-ops unless the process
    /// bootstrapped `WeftMetrics`).
    let commitsCounter: CoreMetrics.Counter
    let commitTimer: CoreMetrics.Timer
    let groupSize: Recorder
    /// The coordinator's observer (commit outcomes and latency), if set.
    var observer: CoordinatorObserver?
    /// Sees each round's messages before they are sent (set before `start`).
    var onSent: (([Envelope]) -> Void)?

    init(address: NodeAddress, machine: M, router: any Transport, summarize: @escaping (M) -> String = { _ in "" },
         persist: @escaping ([M.Record]) throws(WeftError) -> Void) {
        self.address = address
        self.machine = machine
        self.router = router
        self.persist = persist
        self.summarize = summarize
        self.lastSummary = summarize(machine)
        commitsCounter = CoreMetrics.Counter(label: "weft_lmdb_commits_total", dimensions: [("node", address.description)])
        commitTimer = CoreMetrics.Timer(label: "weft_lmdb_commit_seconds", dimensions: [("node", address.description)])
        groupSize = Recorder(label: "weft_group_commit_records", dimensions: [("node", address.description)])
    }

    public var summary: String {
        cond.lock()
        defer { cond.unlock() }
        return lastSummary
    }

    func start() {
        let t = Thread { [self] in self.loop() }
        t.name = "weft-\(address)"
        t.stackSize = 8 << 20
        thread = t
        t.start()
    }

    public func enqueue(_ env: Envelope) {
        cond.lock()
        if stopped {
            cond.unlock()
            router.undeliverable(env, failure ?? WeftError(.unavailable, "\(address) is stopped"))
            return
        }
        inbox.append(.envelope(env))
        if inbox.count == 1 { cond.signal() }
        cond.unlock()
    }

    public func enqueueAll(_ envs: [Envelope]) {
        if envs.count == 1 { return enqueue(envs[0]) }
        cond.lock()
        if stopped {
            cond.unlock()
            for env in envs { router.undeliverable(env, failure ?? WeftError(.unavailable, "\(address) is stopped")) }
            return
        }
        let wasEmpty = inbox.isEmpty
        for env in envs { inbox.append(.envelope(env)) }
        if wasEmpty { cond.signal() }
        cond.unlock()
    }

    /// Runs `body` on the node's thread, between rounds, and returns its result.
    func withMachine<R: Sendable>(_ body: @escaping @Sendable (inout M) -> R) -> R {
        let box = ResultBox<R>()
        cond.lock()
        inbox.append(.job { m in box.set(body(&m)) })
        cond.signal()
        cond.unlock()
        return box.wait()
    }

    func stop() {
        cond.lock()
        stopping = true
        cond.signal()
        cond.unlock()
        while true {
            cond.lock()
            let done = stopped
            cond.unlock()
            if done { return }
            usleep(1000)
        }
    }

    func loop() {
        var nextTick = wallMillis()
        var first = true
        while true {
            cond.lock()
            while inbox.isEmpty && !stopping && !first {
                let until = heldRecords.isEmpty ? nextTick : min(nextTick, heldSince + Self.lazyWaitMillis)
                let wait = until > wallMillis() ? until - wallMillis() : 0
                if wait == 0 { break }
                _ = cond.wait(until: Date(timeIntervalSinceNow: Double(wait) / 1000))
            }
            first = false
            if stopping {
                cond.unlock()
                // Held records are written before the node stops.
                if !heldRecords.isEmpty && !commitRound(Output()) { return }
                cond.lock()
                stopped = true
                let rest = inbox
                inbox.removeAll()
                cond.unlock()
                failPending(rest)
                return
            }
            let items: [Item]
            if inbox.count <= Limits.roundMessagesMax {
                items = inbox
                inbox.removeAll(keepingCapacity: true)
            } else {
                items = Array(inbox.prefix(Limits.roundMessagesMax))
                inbox.removeFirst(Limits.roundMessagesMax)
            }
            cond.unlock()

            let arrived = observer == nil ? 0 : monoNanos()
            for item in items {
                switch item {
                case .envelope(let e):
                    observer?.arrived(e, nanos: arrived)
                    machine.step(e)
                case .job(let j): j(&machine)
                }
            }
            let now = wallMillis()
            if now >= nextTick {
                machine.tick(nowMillis: now)
                nextTick = now + tickMillis
            }
            var out = machine.takeOutput()
            let canWait = out.records.allSatisfy(M.isLazy) && out.messages.allSatisfy(M.awaitsRecords)
            if !out.records.isEmpty && canWait {
                if heldRecords.isEmpty { heldSince = wallMillis() }
                heldRecords += out.records
                heldMessages += out.messages
                out = Output()
            } else if out.records.isEmpty && !heldRecords.isEmpty {
                // Acknowledgements wait for the held records; the rest go.
                heldMessages += out.messages.filter(M.awaitsRecords)
                out.messages.removeAll(where: M.awaitsRecords)
            }
            if !heldRecords.isEmpty && (!out.records.isEmpty || wallMillis() >= heldSince + Self.lazyWaitMillis) {
                if !commitRound(out) { return }
            } else if !out.records.isEmpty {
                if !commitRound(out) { return }
            } else {
                send(out.messages)
            }
        }
    }

    /// Writes the held records and `out`'s in one LMDB commit, then sends
    /// the held messages and `out`'s. False if the commit failed (the node
    /// has stopped).
    func commitRound(_ out: Output<M.Record>) -> Bool {
        let records = heldRecords + out.records
        let messages = heldMessages + out.messages
        heldRecords = []
        heldMessages = []
        let kinds = CrashPoints.target == nil ? [] : CrashPoints.kinds(records)
        for k in kinds { CrashPoints.check("\(CrashPoints.role(address)).before-\(k)-forced") }
        do {
            let t0 = monoNanos()
            try persist(records)
            commitTimer.recordNanoseconds(Int64(monoNanos() - t0))
            commitsCounter.increment()
            groupSize.record(records.count)
            for k in kinds { CrashPoints.check("\(CrashPoints.role(address)).after-\(k)-forced") }
            commits += 1
            recordsCommitted += records.count
        } catch {
            fail(error)
            return false
        }
        send(messages)
        return true
    }

    func send(_ messages: [Envelope]) {
        let now2 = summarize(machine)
        cond.lock()
        lastSummary = now2
        cond.unlock()
        observer?.sent(messages, nanos: monoNanos())
        onSent?(messages)
        router.sendAll(messages)
    }

    func fail(_ error: WeftError) {
        cond.lock()
        failure = error
        stopped = true
        let rest = inbox
        inbox.removeAll()
        cond.unlock()
        router.nodeFailed(address, error)
        failPending(rest)
    }

    func failPending(_ items: [Item]) {
        for case .envelope(let e) in items {
            router.undeliverable(e, failure ?? WeftError(.unavailable, "\(address) stopped"))
        }
    }
}

final class ResultBox<R>: @unchecked Sendable {
    let cond = NSCondition()
    var value: R?
    func set(_ v: R) {
        cond.lock()
        value = v
        cond.signal()
        cond.unlock()
    }
    func wait() -> R {
        cond.lock()
        defer { cond.unlock() }
        while value == nil { cond.wait() }
        return value!
    }
}

/// How envelopes travel between nodes and clients: in process (`Router`)
/// or over TCP (`NetworkTransport`). A request that cannot be delivered is
/// answered with `.failed` so no client waits on a node that is gone.
public protocol Transport: AnyObject, Sendable {
    func send(_ env: Envelope)
    /// Sends a round's messages; a transport may coalesce them per connection.
    func sendAll(_ envs: [Envelope])
    func register(_ address: NodeAddress, _ sink: MessageSink)
    func unregister(_ address: NodeAddress)
    func undeliverable(_ env: Envelope, _ error: WeftError)
    func nodeFailed(_ address: NodeAddress, _ error: WeftError)
}

extension Transport {
    public func sendAll(_ envs: [Envelope]) { for e in envs { send(e) } }
}

/// The request id of a client request, if `m` is one.
func clientRequestId(_ m: Message) -> UInt64? {
    switch m {
    case let .begin(r), let .read(r, _, _), let .scan(r, _, _, _, _), let .commit(r, _, _, _), let .status(r, _), let .pin(r, _, _):
        return r
    default:
        return nil
    }
}

/// The in-process transport of embedded mode: delivers envelopes to node
/// runners and client endpoints by address.
public final class Router: Transport, @unchecked Sendable {
    public init() {}
    let lock = NSLock()
    var sinks: [NodeAddress: MessageSink] = [:]
    var failures: [NodeAddress: WeftError] = [:]

    public func register(_ address: NodeAddress, _ sink: MessageSink) {
        lock.lock()
        sinks[address] = sink
        lock.unlock()
    }

    public func unregister(_ address: NodeAddress) {
        lock.lock()
        sinks[address] = nil
        lock.unlock()
    }

    /// Where envelopes for clients not in this process go (`weft server`:
    /// the listener that remote clients are connected to).
    public var remoteClients: Transport? {
        get { lock.withLock { remote } }
        set { lock.withLock { remote = newValue } }
    }
    var remote: Transport?

    public func send(_ env: Envelope) {
        lock.lock()
        let sink = sinks[env.to]
        let failure = failures[env.to]
        let remote = self.remote
        lock.unlock()
        if let sink {
            sink.enqueue(env)
        } else if case .client = env.to, let remote {
            remote.send(env)
        } else {
            undeliverable(env, failure ?? WeftError(.unavailable, "\(env.to) is not running"))
        }
    }

    /// A round's messages, grouped by destination: one lookup and one
    /// `enqueueAll` (one lock, at most one wake-up) per node or client.
    public func sendAll(_ envs: [Envelope]) {
        if envs.count <= 1 { return envs.forEach(send) }
        var groups: [NodeAddress: [Envelope]] = [:]
        var order: [NodeAddress] = []
        for e in envs {
            if groups[e.to] == nil { order.append(e.to) }
            groups[e.to, default: []].append(e)
        }
        if order.count == envs.count { return envs.forEach(send) }
        for to in order {
            let batch = groups[to]!
            let sink = lock.withLock { sinks[to] }
            if let sink { sink.enqueueAll(batch) } else { batch.forEach(send) }
        }
    }

    /// A request that cannot reach its node is answered with the reason, so
    /// a client never waits on a node that is gone.
    public func undeliverable(_ env: Envelope, _ error: WeftError) {
        guard case .client = env.from, let req = clientRequestId(env.message) else { return }
        send(Envelope(from: env.to, to: env.from, .failed(req: req, error: error)))
    }

    public func nodeFailed(_ address: NodeAddress, _ error: WeftError) {
        lock.lock()
        failures[address] = error
        sinks[address] = nil
        let clients = sinks.values.compactMap { $0 as? WeftClient }
        lock.unlock()
        // In one process a node whose storage failed takes the embedded
        // cluster down: every waiting request fails with its error (a commit
        // already decided stays decided on disk; reopening finishes it).
        for c in clients { c.failAll(error) }
    }

    public var firstFailure: WeftError? {
        lock.lock()
        defer { lock.unlock() }
        return failures.values.first
    }
}
