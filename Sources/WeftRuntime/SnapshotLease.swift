import Foundation
import WeftCore

/// Keeps a snapshot readable while a job runs: a lease on `ts` at every
/// participant (`WeftClient.pin`), renewed every third of its length by a
/// background task and released at the end. If the job's process dies the
/// lease simply runs out, so garbage collection is never held up for long.
public final class SnapshotLease: @unchecked Sendable {
    public let ts: Timestamp
    let client: WeftClient
    let leaseMillis: UInt64
    var renewal: Task<Void, Never>?
    let lock = NSLock()
    var lastError: Error?

    init(client: WeftClient, ts: Timestamp, leaseMillis: UInt64) {
        self.client = client
        self.ts = ts
        self.leaseMillis = leaseMillis
    }

    /// Takes the lease; fails with `snapshotTooOld` if `ts` is already
    /// collected somewhere.
    public static func take(_ client: WeftClient, at ts: Timestamp, leaseMillis: UInt64 = Limits.jobPinLeaseMillis) async throws -> SnapshotLease {
        try await client.pin(ts, leaseMillis: leaseMillis)
        let lease = SnapshotLease(client: client, ts: ts, leaseMillis: leaseMillis)
        lease.renewal = Task { [lease] in
            while !Task.isCancelled {
                try? await Task.sleep(nanoseconds: leaseMillis / 3 * 1_000_000)
                if Task.isCancelled { return }
                do {
                    try await client.pin(ts, leaseMillis: leaseMillis)
                } catch {
                    // A participant that restarted lost its leases; the next
                    // renewal takes them again. The job's reads fail clearly
                    // (snapshot too old) if collection got there first.
                    lease.lock.withLock { lease.lastError = error }
                }
            }
        }
        return lease
    }

    /// The last renewal's failure, if the last renewal failed.
    public var renewalError: Error? { lock.withLock { lastError } }

    /// Stops renewing and releases the lease everywhere (best effort: an
    /// unreachable participant lets it run out).
    public func release() async {
        renewal?.cancel()
        try? await client.pin(ts, leaseMillis: 0)
    }
}
