import WeftCore
import WeftProtocol

/// A small, fast, seedable PRNG (SplitMix64): the only randomness in a run.
public struct SeededRandom: RandomNumberGenerator, Sendable {
    var state: UInt64
    public init(seed: UInt64) { state = seed &+ 0x9E37_79B9_7F4A_7C15 }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    public mutating func chance(_ p: Double) -> Bool { Double(next() >> 11) / Double(1 << 53) < p }
    public mutating func int(_ range: ClosedRange<Int>) -> Int { Int.random(in: range, using: &self) }
}

public struct SimulationConfig: Sendable {
    public var participants = 3
    public var accounts = 12
    public var initialBalance = 100
    public var transferClients = 4
    public var auditors = 1
    /// Virtual ms during which faults happen and clients run.
    public var faultyMillis: UInt64 = 3_000
    /// Virtual ms with every node up and a perfect network, to let in-doubt
    /// transactions resolve before the checks.
    public var healMillis: UInt64 = 20_000
    public var dropProbability = 0.05
    public var duplicateProbability = 0.05
    public var maxDelayMillis = 20
    /// Chance per node per 10 ms tick of a crash during the faulty period.
    public var crashProbability = 0.004
    /// Chance that a crash also loses the in-flight (unsynced) batch.
    public var powerLossProbability = 0.5
    public var clientTimeoutMillis: UInt64 = 400
    /// Downtime after a coordinator crash. Long outages make in-doubt
    /// participants resolve among themselves (cooperative termination).
    public var coordinatorDowntimeMillis: ClosedRange<Int> = 50...600
    public init() {}

    /// The default mix: every third seed has long coordinator outages.
    public static func forSeed(_ seed: UInt64) -> SimulationConfig {
        var c = SimulationConfig()
        if seed % 3 == 0 { c.coordinatorDowntimeMillis = 1_500...2_500 }
        return c
    }
}

/// What a run found: every violated invariant, in words, with the seed.
public struct SimulationReport: Sendable, CustomStringConvertible {
    public var seed: UInt64
    public var violations: [String] = []
    public var committed = 0
    public var aborted = 0
    public var unknown = 0
    public var audits = 0
    public var crashes = 0
    public var messages = 0
    public var peerResolutions = 0
    public var description: String {
        let head = "seed \(seed): committed \(committed), aborted \(aborted), unknown \(unknown), audits \(audits), crashes \(crashes), messages \(messages), resolved by peers \(peerResolutions)"
        return violations.isEmpty ? head : head + "\n  VIOLATIONS (replay with WEFT_SIM_SEED=\(seed)):\n  - " + violations.joined(separator: "\n  - ")
    }
}

/// Drives the real coordinator and participant state machines through a
/// seeded schedule of delays, reordering, duplication, loss, crashes and
/// power loss, with a bank workload, and checks the invariants afterwards.
public final class Simulator {
    enum Event {
        case deliver(Envelope)
        case syncDone(NodeAddress, epoch: Int)
        case tick(NodeAddress)
        case client(Int)
        case crash(NodeAddress)
        case restart(NodeAddress)
    }

    struct Sync {
        var records: Int
        var pending: PendingBatch
    }

    /// Records and messages a node produced that are not yet durable/sent.
    struct PendingBatch {
        var participantRecords: [ParticipantRecord] = []
        var coordinatorRecords: [CoordinatorRecord] = []
        var messages: [Envelope] = []
        var isEmpty: Bool { participantRecords.isEmpty && coordinatorRecords.isEmpty && messages.isEmpty }
        var hasRecords: Bool { !participantRecords.isEmpty || !coordinatorRecords.isEmpty }
    }

    struct NodeState {
        var up = true
        var epoch = 0
        var pending = PendingBatch()
        var syncing: PendingBatch?
    }

    enum ClientPhase {
        case idle
        case beginning(req: UInt64, since: UInt64)
        case reading(txn: TxnId, keys: [Bytes], got: [Bytes: Int], since: UInt64)
        case committing(req: UInt64, txn: TxnId, since: UInt64)
    }

    struct Client {
        var auditor: Bool
        var phase: ClientPhase = .idle
        var nextReq: UInt64 = 1
        var reqKeys: [UInt64: Bytes] = [:]
    }

    /// Everything a transaction asked to write, for the atomicity check.
    struct Attempt {
        var commitTs: Timestamp?
        var writes: [ParticipantId: [WriteOp]]
        var acknowledged = false
        var abortAcknowledged = false
    }

    let config: SimulationConfig
    var rng: SeededRandom
    var now: UInt64 = 1_000_000
    var queue: [(time: UInt64, seq: UInt64, event: Event)] = []
    var seq: UInt64 = 0
    var coordinator: CoordinatorMachine?
    var coordinatorDisk = CoordinatorDisk()
    var participants: [ParticipantMachine?]
    var participantDisks: [ParticipantDisk]
    var nodes: [NodeAddress: NodeState] = [:]
    var clients: [Client] = []
    var attempts: [TxnId: Attempt] = [:]
    var faulty = true
    public private(set) var report: SimulationReport

    public convenience init(seed: UInt64) {
        self.init(seed: seed, config: .forSeed(seed))
    }

    public init(seed: UInt64, config: SimulationConfig) {
        self.config = config
        self.rng = SeededRandom(seed: seed)
        self.report = SimulationReport(seed: seed)
        participants = Array(repeating: nil, count: config.participants)
        participantDisks = Array(repeating: ParticipantDisk(), count: config.participants)
        // Bootstrap: every account starts with the same balance, committed at ts 1.
        var byParticipant: [ParticipantId: [WriteOp]] = [:]
        for a in 0..<config.accounts {
            let k = Self.accountKey(a)
            byParticipant[partition(k), default: []].append(WriteOp(key: k, value: Array(String(config.initialBalance).utf8)))
        }
        for (p, ws) in byParticipant { participantDisks[p].apply(.committed(txn: 1, commitTs: 1, writes: ws)) }
        coordinatorDisk.apply(.reserveTimestamps(upTo: 2))
        nodes[.coordinator] = NodeState()
        for p in 0..<config.participants { nodes[.participant(p)] = NodeState() }
        startCoordinator()
        for p in 0..<config.participants { startParticipant(p) }
        for i in 0..<(config.transferClients + config.auditors) {
            clients.append(Client(auditor: i >= config.transferClients))
            schedule(UInt64(rng.int(0...5)), .client(i))
        }
        for n in nodes.keys.sorted(by: { $0.description < $1.description }) { schedule(10, .tick(n)) }
    }

    static func accountKey(_ a: Int) -> Bytes { Array("acct/\(a)".utf8) }

    func partition(_ key: Bytes) -> ParticipantId { Int(stableHash(key) % UInt64(config.participants)) }

    // MARK: Running

    public func run() -> SimulationReport {
        let faultEnd = now + config.faultyMillis
        let end = faultEnd + config.healMillis
        while let e = popEvent() {
            if e.time > end { break }
            now = e.time
            if faulty && now >= faultEnd { heal() }
            handle(e.event)
        }
        check()
        return report
    }

    func heal() {
        faulty = false
        for (n, s) in nodes where !s.up { schedule(1, .restart(n)) }
    }

    func schedule(_ delay: UInt64, _ e: Event) {
        seq += 1
        let item = (time: now + delay, seq: seq, event: e)
        queue.append(item)
        var i = queue.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            if (queue[parent].time, queue[parent].seq) <= (item.time, item.seq) { break }
            queue[i] = queue[parent]
            i = parent
        }
        queue[i] = item
    }

    func popEvent() -> (time: UInt64, seq: UInt64, event: Event)? {
        guard !queue.isEmpty else { return nil }
        let top = queue[0]
        let last = queue.removeLast()
        if !queue.isEmpty {
            var i = 0
            let n = queue.count
            while true {
                let l = 2 * i + 1, r = l + 1
                var m = i
                var mv = (last.time, last.seq)
                if l < n && (queue[l].time, queue[l].seq) < mv { m = l; mv = (queue[l].time, queue[l].seq) }
                if r < n && (queue[r].time, queue[r].seq) < mv { m = r }
                if m == i { break }
                queue[i] = queue[m]
                i = m
            }
            queue[i] = last
        }
        return top
    }

    func handle(_ event: Event) {
        switch event {
        case .deliver(let env):
            deliver(env)
        case let .syncDone(node, epoch):
            guard var s = nodes[node], s.up, s.epoch == epoch, let batch = s.syncing else { return }
            s.syncing = nil
            nodes[node] = s
            makeDurable(node, batch)
            for m in batch.messages { transmit(m) }
            startSyncIfIdle(node)
        case .tick(let node):
            tick(node)
            schedule(faulty ? 10 : 50, .tick(node))
        case .client(let i):
            clientWake(i)
        case .crash(let node):
            crash(node)
        case .restart(let node):
            restart(node)
        }
    }

    // MARK: Nodes

    func startCoordinator() {
        coordinator = CoordinatorMachine(recovery: coordinatorDisk.recovery, nowMillis: now)
        collect(.coordinator)
    }

    func startParticipant(_ p: ParticipantId) {
        participants[p] = ParticipantMachine(id: p, recovery: participantDisks[p].recovery, readFloor: nil, nowMillis: now)
        collect(.participant(p))
    }

    func deliver(_ env: Envelope) {
        switch env.to {
        case .coordinator:
            guard nodes[.coordinator]!.up else { return }
            coordinator!.step(env)
            collect(.coordinator)
        case .participant(let p):
            guard nodes[env.to]!.up else { return }
            participants[p]!.step(env)
            collect(env.to)
        case .client(let c):
            clientReceive(Int(c), env.message)
        }
    }

    func tick(_ node: NodeAddress) {
        guard nodes[node]!.up else { return }
        switch node {
        case .coordinator: coordinator!.tick(nowMillis: now)
        case .participant(let p): participants[p]!.tick(nowMillis: now)
        case .client: break
        }
        collect(node)
        if faulty && rng.chance(config.crashProbability) {
            schedule(UInt64(rng.int(0...3)), .crash(node))
        }
    }

    /// Takes a machine's output into the node's pending batch (the shell's
    /// group commit), and starts a sync if none is running.
    func collect(_ node: NodeAddress) {
        var s = nodes[node]!
        switch node {
        case .coordinator:
            let o = coordinator!.takeOutput()
            s.pending.coordinatorRecords += o.records
            s.pending.messages += o.messages
        case .participant(let p):
            let o = participants[p]!.takeOutput()
            s.pending.participantRecords += o.records
            s.pending.messages += o.messages
        case .client:
            return
        }
        nodes[node] = s
        startSyncIfIdle(node)
    }

    func startSyncIfIdle(_ node: NodeAddress) {
        var s = nodes[node]!
        guard s.syncing == nil, !s.pending.isEmpty else { return }
        if !s.pending.hasRecords {
            // Nothing to make durable: messages leave at once.
            let msgs = s.pending.messages
            s.pending = PendingBatch()
            nodes[node] = s
            for m in msgs { transmit(m) }
            return
        }
        s.syncing = s.pending
        s.pending = PendingBatch()
        nodes[node] = s
        schedule(UInt64(rng.int(0...2)), .syncDone(node, epoch: s.epoch))
    }

    func makeDurable(_ node: NodeAddress, _ b: PendingBatch) {
        switch node {
        case .coordinator: for r in b.coordinatorRecords { coordinatorDisk.apply(r) }
        case .participant(let p): for r in b.participantRecords { participantDisks[p].apply(r) }
        case .client: break
        }
    }

    func crash(_ node: NodeAddress) {
        guard var s = nodes[node], s.up else { return }
        report.crashes += 1
        // An LMDB commit is atomic: the in-flight batch either made it or not.
        if let batch = s.syncing, !rng.chance(config.powerLossProbability) {
            makeDurable(node, batch)
        }
        s.up = false
        s.epoch += 1
        s.pending = PendingBatch()
        s.syncing = nil
        nodes[node] = s
        switch node {
        case .coordinator: coordinator = nil
        case .participant(let p): participants[p] = nil
        case .client: break
        }
        schedule(UInt64(rng.int(node == .coordinator ? config.coordinatorDowntimeMillis : 50...600)), .restart(node))
    }

    func restart(_ node: NodeAddress) {
        guard var s = nodes[node], !s.up else { return }
        s.up = true
        nodes[node] = s
        switch node {
        case .coordinator: startCoordinator()
        case .participant(let p): startParticipant(p)
        case .client: break
        }
    }

    func transmit(_ env: Envelope) {
        report.messages += 1
        if case .peerOutcome(_, _, .some) = env.message { report.peerResolutions += 1 }
        if faulty && rng.chance(config.dropProbability) { return }
        let copies = faulty && rng.chance(config.duplicateProbability) ? 2 : 1
        for _ in 0..<copies {
            let delay = faulty ? UInt64(rng.int(0...config.maxDelayMillis)) : UInt64(rng.int(0...1))
            schedule(delay, .deliver(env))
        }
    }

    // MARK: Clients

    func clientWake(_ i: Int) {
        guard faulty else { return }
        var c = clients[i]
        switch c.phase {
        case .idle:
            let req = c.nextReq
            c.nextReq += 1
            c.phase = .beginning(req: req, since: now)
            clients[i] = c
            transmit(Envelope(from: .client(UInt64(i)), to: .coordinator, .begin(req: req)))
        case .beginning(_, let since), .reading(_, _, _, let since):
            if now >= since + config.clientTimeoutMillis { c.phase = .idle; clients[i] = c }
        case let .committing(_, txn, since):
            if now >= since + config.clientTimeoutMillis {
                report.unknown += 1
                _ = txn
                c.phase = .idle
                clients[i] = c
            }
        }
        schedule(UInt64(rng.int(1...20)), .client(i))
    }

    func clientReceive(_ i: Int, _ m: Message) {
        var c = clients[i]
        let me = NodeAddress.client(UInt64(i))
        switch (c.phase, m) {
        case let (.beginning(req, since), .began(r, ts)) where r == req:
            var keys: [Bytes]
            if c.auditor {
                keys = (0..<config.accounts).map(Self.accountKey)
            } else {
                let a = rng.int(0...config.accounts - 1)
                var b = rng.int(0...config.accounts - 2)
                if b >= a { b += 1 }
                keys = [Self.accountKey(a), Self.accountKey(b)]
            }
            c.phase = .reading(txn: ts, keys: keys, got: [:], since: since)
            c.reqKeys.removeAll()
            for k in keys {
                let req = c.nextReq
                c.nextReq += 1
                c.reqKeys[req] = k
                transmit(Envelope(from: me, to: .participant(partition(k)), .read(req: req, key: k, ts: ts)))
            }
        case let (.reading(txn, keys, got, since), .readResult(req, value, _)):
            guard let k = c.reqKeys.removeValue(forKey: req), keys.contains(k) else { break }
            var got = got
            guard let v = value, let n = Int(String(decoding: v, as: UTF8.self)) else {
                report.violations.append("txn \(txn) read key \(printable(k)) as absent or malformed")
                c.phase = .idle
                break
            }
            got[k] = n
            if got.count < keys.count {
                c.phase = .reading(txn: txn, keys: keys, got: got, since: since)
                break
            }
            if c.auditor {
                let sum = got.values.reduce(0, +)
                report.audits += 1
                if sum != config.accounts * config.initialBalance {
                    report.violations.append("snapshot \(txn) sums to \(sum), expected \(config.accounts * config.initialBalance)")
                }
                c.phase = .idle
                break
            }
            let amount = rng.int(1...10)
            let (from, to) = (keys[0], keys[1])
            let fw = WriteOp(key: from, value: Array(String(got[from]! - amount).utf8))
            let tw = WriteOp(key: to, value: Array(String(got[to]! + amount).utf8))
            var parts: [ParticipantId: TxnPart] = [:]
            for (k, w) in [(from, fw), (to, tw)] {
                parts[partition(k), default: TxnPart()].reads.append(k)
                parts[partition(k), default: TxnPart()].writes.append(w)
            }
            attempts[txn] = Attempt(commitTs: nil, writes: parts.mapValues { $0.writes })
            let req = c.nextReq
            c.nextReq += 1
            c.phase = .committing(req: req, txn: txn, since: now)
            transmit(Envelope(from: me, to: .coordinator, .commit(req: req, txn: txn, startTs: txn, parts: parts)))
        case (.reading, .failed(let req, _)):
            c.reqKeys[req] = nil
            c.phase = .idle
        case let (.committing(req, txn, _), .commitResult(r, _, outcome)) where r == req:
            switch outcome {
            case .committed(let ts):
                report.committed += 1
                attempts[txn]?.commitTs = ts
                attempts[txn]?.acknowledged = true
            case .aborted:
                report.aborted += 1
                attempts[txn]?.abortAcknowledged = true
            case .unknown:
                report.unknown += 1
            }
            c.phase = .idle
        default:
            break // a late or duplicate reply
        }
        clients[i] = c
    }

    // MARK: Checks

    func check() {
        for (node, s) in nodes where !s.up { report.violations.append("\(node) is still down after healing") }
        guard report.violations.isEmpty || nodes.values.allSatisfy(\.up) else { return }
        // Nothing stays in doubt once every node is back.
        for p in 0..<config.participants {
            let m = participants[p]!
            if !m.inDoubt.isEmpty { report.violations.append("participant \(p) still has in-doubt transactions \(m.inDoubt.map(\.txn))") }
            if !participantDisks[p].prepared.isEmpty {
                report.violations.append("participant \(p) still has PREPARED records for \(participantDisks[p].prepared.keys.sorted())")
            }
        }
        if !coordinatorDisk.decisions.isEmpty {
            report.violations.append("coordinator still holds unended decisions \(coordinatorDisk.decisions.keys.sorted())")
        }
        // Rebuild every participant from its disk alone: what survives is what counts.
        let recovered = (0..<config.participants).map {
            ParticipantMachine(id: $0, recovery: participantDisks[$0].recovery, readFloor: 0, nowMillis: now)
        }
        // Atomicity and durability.
        for (txn, a) in attempts.sorted(by: { $0.key < $1.key }) {
            var present: [Bool] = []
            let commitTs = a.commitTs ?? findCommitTs(txn, recovered)
            for (p, ws) in a.writes {
                for w in ws {
                    present.append(commitTs.map { recovered[p].store.hasVersion(w.key, at: $0) } ?? false)
                }
            }
            if present.contains(true) && present.contains(false) {
                report.violations.append("txn \(txn) is partially applied: \(present)")
            }
            if a.abortAcknowledged && present.contains(true) {
                report.violations.append("txn \(txn) was reported aborted to its client but its writes are visible")
            }
            if a.acknowledged && present.contains(false) {
                report.violations.append("txn \(txn) was acknowledged committed at \(a.commitTs!) but its writes are lost")
            }
        }
        // The bank's total is conserved in the final state.
        var sum = 0
        for a in 0..<config.accounts {
            let k = Self.accountKey(a)
            let (v, _) = recovered[partition(k)].store.read(k, at: .max)
            sum += v.flatMap { Int(String(decoding: $0, as: UTF8.self)) } ?? 0
        }
        if sum != config.accounts * config.initialBalance {
            report.violations.append("final total is \(sum), expected \(config.accounts * config.initialBalance)")
        }
    }

    /// For a transaction whose client never heard back: its commit
    /// timestamp, if any participant durably committed it.
    func findCommitTs(_ txn: TxnId, _ recovered: [ParticipantMachine]) -> Timestamp? {
        for d in participantDisks {
            for (ts, rec) in d.commits where rec.txn == txn { return ts }
        }
        return nil
    }
}
