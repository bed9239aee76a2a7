import Foundation
import WeftCore
import WeftProtocol

/// The client library: snapshot reads, scans and transactions against a
/// coordinator and its participants, through any `Router`.
///
/// Every request carries a fresh request id and a deadline; a reply that
/// never comes ends in a `timeout` error, never a hang.
public final class WeftClient: MessageSink, @unchecked Sendable {
    public let id: UInt64
    public let participantCount: Int
    let router: any Transport
    let lock = NSLock()
    var nextReq: UInt64 = 1
    /// Waiting requests: their deadline and what to do with the answer
    /// (resume an async caller, or a callback's closure).
    var pending: [UInt64: (deadline: UInt64, done: @Sendable (Result<Message, any Error>) -> Void)] = [:]
    /// Where each waiting request went, and whether it asked to commit.
    var destinations: [UInt64: (to: NodeAddress, commit: Bool)] = [:]
    public var requestTimeoutMillis: UInt64 = 30_000
    var sweeper: Thread?
    var closed = false

    public init(id: UInt64, router: any Transport, participantCount: Int) {
        self.id = id
        self.router = router
        self.participantCount = participantCount
        router.register(.client(id), self)
        let t = Thread { [weak self] in
            while let s = self, !s.isClosed {
                s.sweep()
                usleep(50_000)
            }
        }
        t.name = "weft-client-sweeper"
        sweeper = t
        t.start()
    }

    var isClosed: Bool {
        lock.lock()
        defer { lock.unlock() }
        return closed
    }

    public func close() {
        lock.lock()
        closed = true
        lock.unlock()
        router.unregister(.client(id))
        failAll(WeftError(.unavailable, "client closed"))
    }

    public var me: NodeAddress { .client(id) }

    // MARK: Transport

    public func enqueueAll(_ envs: [Envelope]) { for e in envs { enqueue(e) } }

    public func enqueue(_ env: Envelope) {
        let req: UInt64
        switch env.message {
        case let .began(r, _), let .commitResult(r, _, _), let .readResult(r, _, _),
             let .scanResult(r, _, _), let .failed(r, _), let .statusResult(r, _, _), let .pinned(r, _):
            req = r
        default:
            return
        }
        lock.lock()
        let p = pending.removeValue(forKey: req)
        destinations[req] = nil
        lock.unlock()
        p?.done(.success(env.message))
    }

    func sweep() {
        let now = wallMillis()
        lock.lock()
        let expired = pending.filter { $0.value.deadline <= now }
        for k in expired.keys {
            pending[k] = nil
            destinations[k] = nil
        }
        lock.unlock()
        for (_, p) in expired {
            p.done(.failure(WeftError(.timeout, "no reply within \(requestTimeoutMillis) ms")))
        }
    }

    /// Fails the waiting requests that were sent to `to`, which is gone. A
    /// commit request gets `outcomeUnknown`: the node may have decided.
    func failRequests(to: NodeAddress, _ error: WeftError) {
        lock.lock()
        let gone = pending.filter { destinations[$0.key]?.to == to }
        var commits: Set<UInt64> = []
        for k in gone.keys {
            if destinations[k]?.commit == true { commits.insert(k) }
            pending[k] = nil
            destinations[k] = nil
        }
        lock.unlock()
        for (req, p) in gone {
            if commits.contains(req) {
                p.done(.failure(WeftError(.outcomeUnknown, "\(error.message); the commit may or may not have happened")))
            } else {
                p.done(.failure(error))
            }
        }
    }

    func failAll(_ error: WeftError) {
        lock.lock()
        let all = pending
        pending.removeAll()
        destinations.removeAll()
        lock.unlock()
        for (_, p) in all { p.done(.failure(error)) }
    }

    func call(_ to: NodeAddress, _ build: (UInt64) -> Message) async throws -> Message {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<Message, any Error>) in
            call(to, build) { c.resume(with: $0) }
        }
    }

    /// Sends a request and hands its answer (a `.failed` reply as an
    /// error) to `done`, on whichever thread delivers it: the path of the
    /// Redis front end, which answers from callbacks rather than tasks.
    public func call(_ to: NodeAddress, _ build: (UInt64) -> Message, via outbox: ((Envelope) -> Void)? = nil,
                     _ done: @escaping @Sendable (Result<Message, any Error>) -> Void) {
        let req = lock.withLock {
            defer { nextReq += 1 }
            return nextReq
        }
        let msg = build(req)
        let finish: @Sendable (Result<Message, any Error>) -> Void = { r in
            if case .success(.failed(_, let error)) = r { return done(.failure(error)) }
            done(r)
        }
        let admitted = lock.withLock {
            if pending.count >= Limits.clientInFlightMax { return false }
            pending[req] = (wallMillis() + requestTimeoutMillis, finish)
            if case .commit = msg { destinations[req] = (to, true) } else { destinations[req] = (to, false) }
            return true
        }
        if !admitted {
            return done(.failure(WeftError(.unavailable, "more than \(Limits.clientInFlightMax) requests in flight (Limits.clientInFlightMax)")))
        }
        let env = Envelope(from: me, to: to, msg)
        if let outbox { outbox(env) } else { router.send(env) }
    }

    /// Sends envelopes gathered by callers of `call(_:_:via:_:)`, grouped
    /// per destination.
    public func flush(_ envs: [Envelope]) { router.sendAll(envs) }

    // MARK: API

    /// A fresh timestamp from the oracle: every commit acknowledged before
    /// this call is visible at it. Several callers may get the same one:
    /// read at it, never use it as a transaction's id (`begin` does that).
    ///
    /// Concurrent callers share the oracle's round trips: at most one
    /// request is in flight, and callers that arrive meanwhile wait for the
    /// next one, which is sent after they arrived, so its answer is fresh
    /// for each of them (timestamp batching, as TiDB's PD client does).
    public func now() async throws -> Timestamp {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<Timestamp, any Error>) in
            now { c.resume(with: $0) }
        }
    }

    /// `now()` for callers that take a callback.
    public func now(_ done: @escaping @Sendable (Result<Timestamp, any Error>) -> Void) {
        let first: Bool = lock.withLock {
            tsWaiting.append(done)
            if tsInFlight { return false }
            tsInFlight = true
            return true
        }
        if first { fetchTimestamp() }
    }

    var tsWaiting: [@Sendable (Result<Timestamp, any Error>) -> Void] = []
    var tsInFlight = false

    /// Asks the oracle once for everyone waiting now; then again if more came.
    func fetchTimestamp() {
        let batch = lock.withLock {
            defer { tsWaiting = [] }
            return tsWaiting
        }
        call(.coordinator, { .begin(req: $0) }) { [self] r in
            let result: Result<Timestamp, any Error>
            switch r {
            case .success(.began(_, let ts)): result = .success(ts)
            case .success: result = .failure(unexpected())
            case .failure(let e): result = .failure(e)
            }
            for done in batch { done(result) }
            let more: Bool = lock.withLock {
                if tsWaiting.isEmpty { tsInFlight = false }
                return tsInFlight
            }
            if more { fetchTimestamp() }
        }
    }

    public func begin() async throws -> Transaction {
        // Not `now()`: callers batched there share a timestamp, and a
        // transaction's start timestamp is its id, unique per transaction.
        guard case .began(_, let ts) = try await call(.coordinator, { .begin(req: $0) }) else { throw unexpected() }
        return Transaction(client: self, startTs: ts)
    }

    public func owner(of key: Bytes) -> ParticipantId {
        Partitioner.participant(for: key, count: participantCount)
    }

    /// Reads `key` at `ts` (now when nil).
    public func get(_ key: Bytes, at ts: Timestamp? = nil) async throws -> (value: Bytes?, version: Timestamp) {
        try WeftError.checkKey(key)
        let at: Timestamp
        if let ts { at = ts } else { at = try await now() }
        return try await read(key, at: at)
    }

    func read(_ key: Bytes, at ts: Timestamp) async throws -> (value: Bytes?, version: Timestamp) {
        guard case let .readResult(_, value, version) = try await call(.participant(owner(of: key)), { .read(req: $0, key: key, ts: ts) }) else {
            throw unexpected()
        }
        return (value, version)
    }

    /// Keys in order from every participant, merged: those starting with
    /// `prefix` (all when empty), at most `limit`, at `ts` (now when nil).
    public func scan(prefix: Bytes = [], limit: Int = 1000, at at0: Timestamp? = nil) async throws -> (rows: [ScanRow], at: Timestamp) {
        if prefix.count > Limits.keyBytesMax { try WeftError.checkKey(prefix) }
        guard limit >= 0, limit <= Limits.scanLimitMax else {
            throw WeftError(.invalidArgument, "scan limit \(limit) is outside 0...\(Limits.scanLimitMax) (Limits.scanLimitMax)")
        }
        let ts: Timestamp
        if let given = at0 { ts = given } else { ts = try await now() }
        let end = prefixEnd(prefix)
        var all: [ScanRow] = []
        try await withThrowingTaskGroup(of: [ScanRow].self) { group in
            for p in 0..<participantCount {
                group.addTask {
                    guard case let .scanResult(_, rows, _) = try await self.call(.participant(p), { .scan(req: $0, start: prefix, end: end, limit: limit, ts: ts) }) else {
                        throw self.unexpected()
                    }
                    return rows
                }
            }
            for try await rows in group { all += rows }
        }
        all.sort { compareBytes($0.key, $1.key) < 0 }
        return (Array(all.prefix(limit)), ts)
    }

    /// One participant's keys starting with `prefix`, from `start` on, at
    /// most `limit`, at `ts`: one partition of a table snapshot.
    public func scanParticipant(_ p: ParticipantId, prefix: Bytes, from start: Bytes? = nil, limit: Int, at ts: Timestamp) async throws -> (rows: [ScanRow], more: Bool) {
        guard case let .scanResult(_, rows, more) = try await call(.participant(p), { .scan(req: $0, start: start ?? prefix, end: prefixEnd(prefix), limit: limit, ts: ts) }) else {
            throw unexpected()
        }
        return (rows, more)
    }

    /// Writes one key in a one-participant transaction (one-phase commit).
    @discardableResult
    public func put(_ key: Bytes, _ value: Bytes) async throws -> Timestamp {
        let t = Transaction(client: self, startTs: 0)
        try t.put(key, value)
        return try await t.commit()
    }

    @discardableResult
    public func delete(_ key: Bytes) async throws -> Timestamp {
        let t = Transaction(client: self, startTs: 0)
        try t.delete(key)
        return try await t.commit()
    }

    /// Holds the snapshot at `ts` against garbage collection on every
    /// participant for `leaseMillis` (renew by calling again; 0 releases).
    /// Fails with `snapshotTooOld` if a participant has already collected it.
    public func pin(_ ts: Timestamp, leaseMillis: UInt64) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            for p in 0..<participantCount {
                group.addTask {
                    guard case .pinned = try await self.call(.participant(p), { .pin(req: $0, ts: ts, leaseMillis: leaseMillis) }) else {
                        throw self.unexpected()
                    }
                }
            }
            try await group.waitForAll()
        }
    }

    /// What became of transaction `txn`: the coordinator's answer if it has
    /// one, else the participants'. A participant that never prepared `txn`
    /// refuses it for good when asked, so "aborted" is final.
    public func status(_ txn: TxnId) async throws -> TxnStatus {
        guard case let .statusResult(_, _, s) = try await call(.coordinator, { .status(req: $0, txn: txn) }) else { throw unexpected() }
        if s != .unknown { return s }
        var answers: [TxnStatus] = []
        for p in 0..<participantCount {
            guard case let .statusResult(_, _, a) = try await call(.participant(p), { .status(req: $0, txn: txn) }) else { throw unexpected() }
            answers.append(a)
        }
        if let c = answers.first(where: { if case .committed = $0 { return true } else { return false } }) { return c }
        if answers.contains(.pending) { return .pending }
        if answers.contains(.unknown) { return .unknown }
        return .aborted
    }

    func commit(txn: TxnId, startTs: Timestamp, parts: [ParticipantId: TxnPart]) async throws -> Timestamp {
        guard case let .commitResult(_, _, outcome) = try await call(.coordinator, { .commit(req: $0, txn: txn, startTs: startTs, parts: parts) }) else {
            throw unexpected()
        }
        switch outcome {
        case .committed(let ts): return ts
        case .aborted(let e): throw e
        case .unknown(let e): throw e
        }
    }

    func unexpected() -> WeftError { WeftError(.malformed, "unexpected reply") }
}

/// The smallest key greater than every key starting with `prefix`, or nil
/// when no such key exists (empty prefix, or all 0xff).
public func prefixEnd(_ prefix: Bytes) -> Bytes? {
    var p = prefix
    while let last = p.last {
        if last < 0xff {
            p[p.count - 1] = last + 1
            return p
        }
        p.removeLast()
    }
    return nil
}

/// A serializable transaction: reads at `startTs` (and its own writes),
/// writes buffered until `commit`, validated optimistically at commit.
/// Not for use from several tasks at once.
public final class Transaction: @unchecked Sendable {
    public let startTs: Timestamp
    let client: WeftClient
    var reads: Set<Bytes> = []
    var writes: [ByteKey: Bytes?] = [:]
    var order: [Bytes] = []
    var bytes = 0
    public private(set) var finished = false

    init(client: WeftClient, startTs: Timestamp) {
        self.client = client
        self.startTs = startTs
    }

    /// The transaction's id: its start timestamp (0 for a blind write, which
    /// gets its id when it commits).
    public var id: TxnId { startTs }

    public func get(_ key: Bytes) async throws -> Bytes? {
        try WeftError.checkKey(key)
        try checkOpen()
        if let w = writes[ByteKey(key)] { return w }
        let (value, _) = try await client.read(key, at: startTs)
        reads.insert(key)
        return value
    }

    /// Reads `key` and the timestamp of the version read (0 when it never
    /// existed); the key joins the read set, so a commit fails if it changed.
    func getVersioned(_ key: Bytes) async throws -> (value: Bytes?, version: Timestamp) {
        try WeftError.checkKey(key)
        try checkOpen()
        let r = try await client.read(key, at: startTs)
        reads.insert(key)
        return r
    }

    /// Reads several keys at once (in parallel across participants); each
    /// joins the read set. Keys this transaction wrote answer from its buffer.
    public func getMany(_ keys: [Bytes]) async throws -> [Bytes?] {
        for k in keys { try WeftError.checkKey(k) }
        try checkOpen()
        if keys.count == 1 { return [try await get(keys[0])] }
        var out = [Bytes?](repeating: nil, count: keys.count)
        let client = self.client, ts = startTs
        try await withThrowingTaskGroup(of: (Int, Bytes?).self) { group in
            for (i, k) in keys.enumerated() {
                if let w = writes[ByteKey(k)] {
                    out[i] = w
                    continue
                }
                group.addTask { (i, try await client.read(k, at: ts).value) }
            }
            for try await (i, v) in group { out[i] = v }
        }
        for k in keys where writes[ByteKey(k)] == nil { reads.insert(k) }
        return out
    }

    /// True if this transaction has buffered a write.
    public var hasWrites: Bool { !writes.isEmpty }

    public func put(_ key: Bytes, _ value: Bytes) throws {
        try WeftError.checkKey(key)
        try WeftError.checkValue(value)
        try buffer(key, value)
    }

    public func delete(_ key: Bytes) throws {
        try WeftError.checkKey(key)
        try buffer(key, nil)
    }

    func buffer(_ key: Bytes, _ value: Bytes?) throws {
        try checkOpen()
        let old = writes[ByteKey(key)].map { key.count + ($0?.count ?? 0) } ?? 0
        let new = key.count + (value?.count ?? 0)
        if writes[ByteKey(key)] == nil && writes.count >= Limits.txnWritesMax {
            throw WeftError(.txnTooLarge, "transaction writes more than \(Limits.txnWritesMax) keys (Limits.txnWritesMax)")
        }
        if bytes - old + new > Limits.txnBytesMax {
            throw WeftError(.txnTooLarge, "transaction writes more than \(Limits.txnBytesMax) bytes (Limits.txnBytesMax)")
        }
        bytes += new - old
        if writes.updateValue(value, forKey: ByteKey(key)) == nil { order.append(key) }
    }

    func checkOpen() throws {
        if finished { throw WeftError(.invalidArgument, "transaction \(startTs) is already finished") }
    }

    /// Commits atomically and returns the commit timestamp, or throws
    /// `conflict` (aborted), `outcomeUnknown` or `timeout`.
    @discardableResult
    public func commit() async throws -> Timestamp {
        try checkOpen()
        finished = true
        var parts: [ParticipantId: TxnPart] = [:]
        for k in reads.sorted(by: { compareBytes($0, $1) < 0 }) { parts[client.owner(of: k), default: TxnPart()].reads.append(k) }
        for k in order { parts[client.owner(of: k), default: TxnPart()].writes.append(WriteOp(key: k, value: writes[ByteKey(k)]!)) }
        // Snapshot reads are consistent at startTs by themselves: a read-only
        // transaction is serializable there and needs no validation round.
        if writes.isEmpty { return startTs }
        return try await client.commit(txn: startTs, startTs: startTs, parts: parts)
    }

    public func abort() { finished = true }
}
