import Foundation
import WeftCore
import WeftProtocol

/// Embedded mode: a coordinator and N participants in one process, each
/// participant with its own LMDB environment under one data directory that
/// the process holds exclusively. Messages travel through an in-process
/// `Router`, but every node runs the same state machine and the same
/// group-committing shell as it would in its own process.
public final class EmbeddedCluster: @unchecked Sendable {
    public let layout: DataDirectoryLayout
    let lock: DataDirectoryLock
    public let router = Router()
    let coordinatorStorage: CoordinatorStorage
    let participantStorages: [ParticipantStorage]
    let coordinator: NodeRunner<CoordinatorMachine>
    let participants: [NodeRunner<ParticipantMachine>]
    /// Opened only to read (see `init`).
    public let readOnly: Bool
    let mapGauges: MapUsageGauges?

    /// Commit outcomes and recent latencies (when `observed`).
    var coordinatorObserver: CoordinatorObserver? { coordinator.observer }

    /// The coordinator's view of `txn`, for the status page.
    public func coordinatorStatus(_ txn: TxnId) -> TxnStatus { coordinator.withMachine { $0.status(of: txn) } }

    /// Bytes used by each node's LMDB map.
    public var storageUsage: [(node: String, usedBytes: Int, mapSizeBytes: Int)] {
        ([(NodeAddress.coordinator, coordinatorStorage.env)] + participantStorages.enumerated().map { (.participant($0), $1.env) }).compactMap { a, env in
            env.usage().map { (a.description, $0.usedBytes, $0.mapSizeBytes) }
        }
    }
    let idLock = NSLock()
    var nextClientId: UInt64 = 1
    var closed = false

    /// Opens (or creates) the data directory, recovers every node from its
    /// LMDB environment, and starts the nodes.
    ///
    /// `readOnly`: the directory is only read (`--read-only`, or a read
    /// command on a directory this process may not write): a shared lock,
    /// LMDB opened read-only, and nothing the nodes log is written (a
    /// timestamp reservation, garbage collection and in-doubt resolution
    /// stay in memory; only commands that write nothing open it this way).
    ///
    /// `observed`: record metrics (commit outcomes and latency, in-doubt
    /// gauges, map usage) for a long-lived process (`weft server`).
    public init(dataDir: String, participants count: Int? = nil, options: StorageOptions = .init(), lockWaitMillis: Int = 0,
                readOnly: Bool = false, observed: Bool = false) throws(WeftError) {
        let lock = readOnly ? try DataDirectoryLock(readingDirectory: dataDir) : try DataDirectoryLock(directory: dataDir, waitMillis: lockWaitMillis)
        self.lock = lock
        self.readOnly = readOnly
        var options = options
        options.readOnly = options.readOnly || readOnly
        layout = try DataDirectoryLayout.resolve(root: dataDir, participants: count, create: !readOnly)
        coordinatorStorage = try CoordinatorStorage(directory: layout.coordinator, options: options)
        var storages: [ParticipantStorage] = []
        for p in 0..<layout.participants {
            storages.append(try ParticipantStorage(directory: layout.participant(p), options: options))
        }
        participantStorages = storages
        let now = wallMillis()
        let coordRecovery = try coordinatorStorage.recover()
        // Every timestamp handed out before this start is below the reservation.
        let floor = coordRecovery.reservedTs > 0 ? coordRecovery.reservedTs - 1 : 0
        let cs = coordinatorStorage
        coordinator = NodeRunner(address: .coordinator, machine: CoordinatorMachine(recovery: coordRecovery, nowMillis: now), router: router) { (r) throws(WeftError) in
            if !readOnly { try cs.persist(r) }
        }
        if observed { coordinator.observer = CoordinatorObserver() }
        var runners: [NodeRunner<ParticipantMachine>] = []
        for p in 0..<layout.participants {
            let s = storages[p]
            let machine = try s.recoverMachine(id: p, readFloor: floor, nowMillis: now)
            let gauges = observed ? InDoubtGauges(.participant(p)) : nil
            runners.append(NodeRunner(address: .participant(p), machine: machine, router: router, summarize: { m in
                gauges?.update(m)
                return ""
            }) { (r) throws(WeftError) in
                if !readOnly { try s.persist(r) }
            })
        }
        participants = runners
        mapGauges = observed ? MapUsageGauges([(.coordinator, coordinatorStorage.env)] + storages.enumerated().map { (.participant($0), $1.env) }) : nil
        router.register(.coordinator, coordinator)
        for r in runners { router.register(r.address, r) }
        coordinator.start()
        for r in runners { r.start() }
    }

    public func client() -> WeftClient {
        idLock.lock()
        let id = nextClientId
        nextClientId += 1
        idLock.unlock()
        return WeftClient(id: id, router: router, participantCount: layout.participants)
    }

    /// Stops every node after its current round and releases the directory.
    public func close() {
        idLock.lock()
        if closed {
            idLock.unlock()
            return
        }
        closed = true
        idLock.unlock()
        mapGauges?.stop()
        coordinator.stop()
        for p in participants { p.stop() }
        coordinatorStorage.close()
        for s in participantStorages { s.close() }
        lock.release()
    }

    deinit { close() }

    /// Prepared, undecided transactions held by live participants.
    public func inDoubt() -> [(participant: ParticipantId, txn: PreparedTxn)] {
        participants.enumerated().flatMap { p, runner in runner.withMachine { $0.inDoubt }.map { (p, $0) } }
    }

    /// Pins a snapshot on every participant so garbage collection keeps it.
    public func pin(_ ts: Timestamp) throws(WeftError) {
        for (i, p) in participants.enumerated() {
            let r: WeftError? = p.withMachine { m in
                do throws(WeftError) { try m.pin(ts); return nil } catch { return error }
            }
            if let r {
                for q in participants[..<i] { q.withMachine { $0.unpin(ts) } }
                throw r
            }
        }
    }

    public func unpin(_ ts: Timestamp) {
        for p in participants { p.withMachine { $0.unpin(ts) } }
    }

    /// Group-commit statistics: LMDB commits and records per node.
    public var commitStats: [(node: String, commits: Int, records: Int)] {
        [(coordinator.address.description, coordinator.commits, coordinator.recordsCommitted)]
            + participants.map { ($0.address.description, $0.commits, $0.recordsCommitted) }
    }

    /// Resident bytes of every participant's in-memory store (estimate from
    /// its data structures).
    public var storeMemoryBytes: Int {
        participants.reduce(0) { $0 + $1.withMachine { $0.store.memoryBytes } }
    }

    public var firstFailure: WeftError? { router.firstFailure }
}

/// Offline inspection of a data directory's LMDB files, without the lock:
/// works when no process is running and when one is (LMDB readers are safe
/// beside a writer).
public enum OfflineInspector {
    public struct InDoubtEntry: Sendable {
        public var participant: ParticipantId
        public var txn: PreparedTxn
        /// true if the coordinator's log holds a COMMIT decision for it.
        public var coordinatorDecidedCommit: Bool
    }

    public static func inDoubt(dataDir: String) throws(WeftError) -> [InDoubtEntry] {
        let layout = try DataDirectoryLayout.resolve(root: dataDir, participants: nil, create: false)
        return try inDoubt(coordinatorDir: layout.coordinator, participantDirs: (0..<layout.participants).map { ($0, layout.participant($0)) })
    }

    /// The same for a cluster, from the data directories its file names.
    public static func inDoubt(cluster: ClusterConfig) throws(WeftError) -> [InDoubtEntry] {
        let coordinator = cluster.nodes.first { $0.role == .coordinator }!
        let parts = cluster.nodes.compactMap { n -> (ParticipantId, String)? in
            if case .participant(let p) = n.address { return (p, n.dataDir + "/lmdb") }
            return nil
        }
        return try inDoubt(coordinatorDir: coordinator.dataDir + "/lmdb", participantDirs: parts)
    }

    static func inDoubt(coordinatorDir: String, participantDirs: [(ParticipantId, String)]) throws(WeftError) -> [InDoubtEntry] {
        var ro = StorageOptions()
        ro.readOnly = true
        var decided: Set<TxnId> = []
        if FileManager.default.fileExists(atPath: coordinatorDir + "/data.mdb") {
            let c = try CoordinatorStorage(directory: coordinatorDir, options: ro)
            decided = Set(try c.recover().decisions.map(\.txn))
            c.close()
        }
        var out: [InDoubtEntry] = []
        for (p, dir) in participantDirs where FileManager.default.fileExists(atPath: dir + "/data.mdb") {
            let s = try ParticipantStorage(directory: dir, options: ro)
            for t in try s.recover().prepared {
                out.append(InDoubtEntry(participant: p, txn: t, coordinatorDecidedCommit: decided.contains(t.txn)))
            }
            s.close()
        }
        return out
    }
}
