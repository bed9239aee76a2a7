import Foundation
import WeftCore

/// Lets lineage printing say where reliable blocks live without knowing T.
protocol ReliableMarker {
    var reliableDescription: String? { get }
    var reliablyComplete: Bool { get }
    /// Deletes the RDD's reliable blocks (nothing if it has none).
    func releaseReliable() throws
}

/// The reliable block sets a context has written to (their states, not
/// the RDDs, which may be gone), so a job can delete its blocks when it ends.
final class ReliableRegistry: @unchecked Sendable {
    private let lock = NSLock()
    private var sets: [(id: Int, state: ReliableState, partitions: Int)] = []
    private var next = 0
    func add(_ r: ReliableState, partitions: Int) { lock.withLock { sets.append((next, r, partitions)); next += 1 } }
    /// A position: `take(since:)` returns only sets registered after it.
    func mark() -> Int { lock.withLock { next } }
    func take(since mark: Int) -> [(id: Int, state: ReliableState, partitions: Int)] {
        lock.withLock {
            let taken = sets.filter { $0.id >= mark }
            sets.removeAll { $0.id >= mark }
            return taken
        }
    }
    func putBack(_ s: (id: Int, state: ReliableState, partitions: Int)) { lock.withLock { sets.append(s) } }
    /// The reliable state of RDD `rdd`, if it is persisted reliably.
    func state(rdd: Int) -> ReliableState? { lock.withLock { sets.first { $0.state.rdd == rdd }?.state } }
}

extension DataflowContext {
    /// A position in the context's reliable block sets, for
    /// `releaseReliableBlocks(since:)`.
    public func reliableMark() -> Int { reliableRegistry.mark() }

    /// Deletes the reliable blocks of the sets registered since `mark` (a
    /// job's: they exist to survive a lost node while it runs, not after).
    /// A set that cannot be deleted stays registered; the first error is thrown.
    public func releaseReliableBlocks(since mark: Int = 0) throws {
        if !ownsReliableBlocks { return }
        var failure: Error?
        for s in reliableRegistry.take(since: mark) {
            do { try s.state.deleteAll(s.partitions) } catch {
                reliableRegistry.putBack(s)
                failure = failure ?? error
            }
        }
        if let failure { throw failure }
    }
}

extension RDD: ReliableMarker {
    func releaseReliable() throws {
        if reliable != nil { try unpersist() }
    }

    var reliablyComplete: Bool { reliable?.allStored(numPartitions) ?? false }

    var reliableDescription: String? {
        guard let r = reliable else { return nil }
        return "reliable x\(r.replicas) replicas in the store as block set \(r.set)\(checkpointed ? ", lineage cut by checkpoint" : "")"
    }
}

/// Lineage closures are not `Sendable`, but an RDD is immutable once built
/// and tasks only read it; this box carries a closure to the executor's threads.
final class UncheckedBox<T>: @unchecked Sendable {
    let value: T
    init(_ v: T) { value = v }
}

final class ResultSlots: @unchecked Sendable {
    let lock = NSLock()
    var values: [Result<Any, Error>?]
    init(_ n: Int) { values = Array(repeating: nil, count: n) }
    func set(_ i: Int, _ r: Result<Any, Error>) { lock.withLock { values[i] = r } }
}
