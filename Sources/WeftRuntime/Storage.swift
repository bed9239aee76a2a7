import Foundation
import WeftCore
import WeftLMDB
import WeftProtocol

/// Big-endian u64 LMDB key, so byte order is numeric order.
func beKey(_ v: UInt64) -> Bytes {
    var w = ByteWriter(capacity: 8)
    w.u64BE(v)
    return w.bytes
}

func readBE(_ buf: UnsafeRawBufferPointer) throws(DecodeError) -> UInt64 {
    var r = ByteReader(buf)
    let v = try r.u64BE()
    try r.expectEnd()
    return v
}

/// Maps LMDB's errors to Weft's public error, keeping LMDB's words.
func storageError(_ error: any Error, _ what: String) -> WeftError {
    if let e = error as? WeftError { return e }
    if let e = error as? LMDBError {
        switch e.code {
        case .mapFull, .diskFull: return WeftError(.storageFull, "\(what): \(e.message)")
        case .readOnly, .permissionDenied: return WeftError(.readOnly, "\(what): \(e.message)")
        case .corrupted, .versionMismatch: return WeftError(.corrupted, "\(what): \(e.message)")
        default: return WeftError(.storage, "\(what): \(e.message)")
        }
    }
    if let e = error as? DecodeError { return WeftError(.corrupted, "\(what): \(e)") }
    return WeftError(.storage, "\(what): \(error)")
}

/// Environment options shared by every node's LMDB environment.
public struct StorageOptions: Sendable {
    public var mapSizeBytes = 64 << 20
    public var mapSizeBytesMax = 256 << 30
    /// false only for benchmarks that measure without fsync.
    public var durable = true
    public var readOnly = false
    public init() {}

    var lmdb: LMDBEnvironment.Options {
        var o = LMDBEnvironment.Options()
        o.mapSizeBytes = mapSizeBytes
        o.mapSizeBytesMax = mapSizeBytesMax
        o.durable = durable
        o.readOnly = readOnly
        return o
    }
}

/// A participant's LMDB environment. Databases:
/// - `meta`: `format` (u8), `gc-horizon` (u64)
/// - `commits`: commitTs (BE u64) -> CommitRecord
/// - `prepared`: txn (BE u64) -> PreparedTxn
/// - `refused`: txn (BE u64) -> 1, transactions given up by cooperative termination
public final class ParticipantStorage: @unchecked Sendable {
    public static let formatVersion: UInt8 = 1
    public let env: LMDBEnvironment
    let meta, commits, prepared, refused: LMDBDatabase

    public init(directory: String, options: StorageOptions = .init()) throws(WeftError) {
        do {
            env = try LMDBEnvironment(directory: directory, options: options.lmdb)
            meta = try env.database("meta", create: !options.readOnly)
            commits = try env.database("commits", create: !options.readOnly)
            prepared = try env.database("prepared", create: !options.readOnly)
            refused = try env.database("refused", create: !options.readOnly)
        } catch {
            throw storageError(error, "cannot open participant storage at \(directory)")
        }
        if !options.readOnly {
            do {
                try env.write { txn in
                    if let f = try txn.get(meta, Array("format".utf8)) {
                        if f != [Self.formatVersion] { throw WeftError(.corrupted, "participant storage at \(directory) has format \(f), this build reads \(Self.formatVersion)") }
                    } else {
                        try txn.put(meta, Array("format".utf8), [Self.formatVersion])
                    }
                }
            } catch {
                throw storageError(error, "cannot initialise participant storage at \(directory)")
            }
        }
    }

    /// Reads everything a participant needs to rebuild its memory, commit
    /// records included (for tools and tests; nodes use `recoverMachine`).
    public func recover() throws(WeftError) -> ParticipantRecovery {
        var r = try recoverState()
        try forEachCommit { ts, rec in r.commits.append((ts, rec)) }
        return r
    }

    /// Builds the participant's state machine, streaming the commit records
    /// into it one at a time so a large store is never held twice.
    public func recoverMachine(id: ParticipantId, readFloor: Timestamp?, nowMillis: UInt64) throws(WeftError) -> ParticipantMachine {
        var m = ParticipantMachine(id: id, recovery: try recoverState(), readFloor: readFloor, nowMillis: nowMillis)
        // A second thread faults in the store's next arena chunks while
        // this one copies values into the current chunk: on a fresh
        // process, first-touch page faults (zeroing) are half the cost.
        let chunks = PrefaultedChunks()
        defer { chunks.stop() }
        m.beginReplay(chunks: chunks)
        do {
            try env.read { txn in
                try txn.forEach(commits) { k, v in
                    let ts = try readBE(k)
                    do { try m.replayCommit(ts, encoded: v) } catch { throw DecodeError("commit record commitTs=\(ts): \((error as? DecodeError)?.reason ?? "\(error)")") }
                    return true
                }
            }
        } catch {
            throw storageError(error, "cannot recover participant storage at \(env.directory)")
        }
        m.endReplay()
        return m
    }

    /// Everything but the commit records: GC horizon, PREPARED, refusals.
    func recoverState() throws(WeftError) -> ParticipantRecovery {
        do {
            return try env.read { txn in
                var r = ParticipantRecovery()
                if let h = try txn.get(meta, Array("gc-horizon".utf8)) {
                    r.gcHorizon = try h.withUnsafeBytes { b throws(DecodeError) in try readBE(b) }
                }
                try txn.forEach(prepared) { k, v in
                    if InjectedFault.active == "forget-prepared" { return true }
                    do { r.prepared.append(try PreparedTxn.decode(Array(v))) } catch { throw DecodeError("PREPARED record of transaction \((try? readBE(k)).map(String.init) ?? "?"): \((error as? DecodeError)?.reason ?? "\(error)")") }
                    return true
                }
                try txn.forEach(refused) { k, _ in
                    r.refused.insert(try readBE(k))
                    return true
                }
                return r
            }
        } catch {
            throw storageError(error, "cannot recover participant storage at \(env.directory)")
        }
    }

    /// Visits the commit records in commitTs order, decoding each from the map.
    func forEachCommit(_ visit: (Timestamp, CommitRecord) -> Void) throws(WeftError) {
        do {
            try env.read { txn in
                try txn.forEach(commits) { k, v in
                    let ts = try readBE(k)
                    do { visit(ts, try CommitRecord.decode(v)) } catch { throw DecodeError("commit record commitTs=\(ts): \((error as? DecodeError)?.reason ?? "\(error)")") }
                    return true
                }
            }
        } catch {
            throw storageError(error, "cannot recover participant storage at \(env.directory)")
        }
    }

    /// Makes a batch durable in one LMDB commit (group commit).
    public func persist(_ records: [ParticipantRecord]) throws(WeftError) {
        do {
            try env.write { txn in
                for r in records {
                    switch r {
                    case .prepared(let p):
                        try txn.put(prepared, beKey(p.txn), p.encoded())
                    case let .committed(id, ts, writes):
                        if InjectedFault.active != "lose-commits" {
                            try txn.put(commits, beKey(ts), CommitRecord(txn: id, writes: writes).encoded())
                        }
                        try txn.delete(prepared, beKey(id))
                    case .aborted(let id):
                        try txn.delete(prepared, beKey(id))
                    case .releaseCommit(let ts):
                        try txn.delete(commits, beKey(ts))
                    case .gcHorizon(let ts):
                        // Monotonic, as the simulator's disk keeps it (ParityTests).
                        let key = Array("gc-horizon".utf8)
                        let old = try txn.get(meta, key).map { b in try b.withUnsafeBytes { r in try readBE(r) } } ?? 0
                        if ts > old { try txn.put(meta, key, beKey(ts)) }
                    case .refused(let id):
                        try txn.put(refused, beKey(id), [1])
                    }
                }
            }
        } catch {
            throw storageError(error, "participant storage at \(env.directory) could not commit \(records.count) records")
        }
    }

    public func close() { env.close() }
}

/// The coordinator's LMDB environment. Databases:
/// - `meta`: `format` (u8), `reserved-ts` (BE u64)
/// - `decisions`: txn (BE u64) -> Decision (COMMIT without END)
public final class CoordinatorStorage: @unchecked Sendable {
    public static let formatVersion: UInt8 = 1
    public let env: LMDBEnvironment
    let meta, decisions: LMDBDatabase

    public init(directory: String, options: StorageOptions = .init()) throws(WeftError) {
        do {
            env = try LMDBEnvironment(directory: directory, options: options.lmdb)
            meta = try env.database("meta", create: !options.readOnly)
            decisions = try env.database("decisions", create: !options.readOnly)
        } catch {
            throw storageError(error, "cannot open coordinator storage at \(directory)")
        }
    }

    public func recover() throws(WeftError) -> CoordinatorRecovery {
        do {
            return try env.read { txn in
                var r = CoordinatorRecovery()
                if let h = try txn.get(meta, Array("reserved-ts".utf8)) {
                    r.reservedTs = try h.withUnsafeBytes { b throws(DecodeError) in try readBE(b) }
                }
                try txn.forEach(decisions) { k, v in
                    do { r.decisions.append(try Decision.decode(Array(v))) } catch { throw DecodeError("decision record of transaction \((try? readBE(k)).map(String.init) ?? "?"): \((error as? DecodeError)?.reason ?? "\(error)")") }
                    return true
                }
                return r
            }
        } catch {
            throw storageError(error, "cannot recover coordinator storage at \(env.directory)")
        }
    }

    public func persist(_ records: [CoordinatorRecord]) throws(WeftError) {
        do {
            try env.write { txn in
                for r in records {
                    switch r {
                    case .reserveTimestamps(let upTo):
                        // Monotonic: a reservation never moves back.
                        let key = Array("reserved-ts".utf8)
                        let old = try txn.get(meta, key).map { b in try b.withUnsafeBytes { r in try readBE(r) } } ?? 0
                        if upTo > old { try txn.put(meta, key, beKey(upTo)) }
                    case .decided(let d):
                        try txn.put(decisions, beKey(d.txn), d.encoded())
                    case .ended(let id):
                        try txn.delete(decisions, beKey(id))
                    }
                }
            }
        } catch {
            throw storageError(error, "coordinator storage at \(env.directory) could not commit \(records.count) records")
        }
    }

    public func close() { env.close() }
}

/// Arena chunks faulted in ahead of use by a background thread (at most
/// `ahead` waiting), for recovery. `take` never waits: if none is ready the
/// store allocates its own.
final class PrefaultedChunks: ArenaChunkSource, @unchecked Sendable {
    let cond = NSCondition()
    var ready: [[UInt8]] = []
    var stopped = false
    let ahead = 3

    var running = false

    /// The thread starts at the first `take` (a store big enough to want
    /// more chunks); small stores never pay for it.
    init() {}

    func run() {
        while true {
            cond.lock()
            while ready.count >= ahead && !stopped { cond.wait() }
            if stopped {
                cond.unlock()
                return
            }
            cond.unlock()
            let c = [UInt8](unsafeUninitializedCapacity: MVCCStore.arenaChunkBytes) { buf, count in
                if let base = buf.baseAddress {
                    adviseHugePages(UnsafeMutableRawPointer(base), buf.count)
                    var i = 0
                    while i < buf.count {
                        base[i] = 0
                        i += 4096
                    }
                }
                count = 0
            }
            cond.lock()
            ready.append(c)
            cond.unlock()
        }
    }

    func take() -> [UInt8]? {
        cond.lock()
        defer { cond.unlock() }
        if !running && !stopped {
            running = true
            let t = Thread { [self] in run() }
            t.name = "weft-prefault"
            t.start()
        }
        guard !ready.isEmpty else { return nil }
        cond.signal()
        return ready.removeFirst()
    }

    func stop() {
        cond.lock()
        stopped = true
        ready = []
        cond.signal()
        cond.unlock()
    }
}

/// Deliberately broken builds, for testing the checkers (`weft check`):
/// `WEFT_FAULT=lose-commits` makes a participant acknowledge commits it
/// never writes to disk; `WEFT_FAULT=forget-prepared` makes it forget its
/// PREPARED records on restart. Never set in production; a node with a
/// fault says so in its log when it starts.
public enum InjectedFault {
    public static let active: String? = ProcessInfo.processInfo.environment["WEFT_FAULT"]
}
