/// A point in the oracle's total order. Strictly increasing across the whole
/// cluster and across restarts (the oracle reserves its high-water mark durably).
/// `0` means "before everything": a key that was never written has version 0.
public typealias Timestamp = UInt64

/// The read timestamp that asks a participant for a key's newest
/// committed version (see `ParticipantMachine.onRead`): a single-key read
/// that is linearizable without first asking the oracle for a timestamp.
public let readLatestTs: Timestamp = .max

/// A transaction is named by its start timestamp, which the oracle hands out
/// exactly once. This makes ids unique without a second counter.
public typealias TxnId = UInt64

/// A participant is named by its index in the cluster's participant list.
public typealias ParticipantId = Int

/// Keys and values are raw bytes. Keys order lexicographically (memcmp order,
/// shorter prefix first), which is the order `scan` returns.
public typealias Bytes = [UInt8]

/// Bytes as a dictionary key, hashed in one pass over the buffer: an
/// `[UInt8]` key feeds the hasher one element at a time, which made lock
/// tables and write buffers of big transactions hash-bound.
public struct ByteKey: Hashable, Sendable {
    public let bytes: Bytes
    @inline(__always) public init(_ bytes: Bytes) { self.bytes = bytes }
    @inline(__always) public func hash(into h: inout Hasher) { bytes.withUnsafeBytes { h.combine(bytes: $0) } }
    @inline(__always) public static func == (a: ByteKey, b: ByteKey) -> Bool { a.bytes == b.bytes }
}

/// Every bound in the system, in one place, with units last in the name.
/// `docs/architecture.md` lists them for users.
public enum Limits {
    /// Longest key accepted by `put`, `get` and `scan`.
    public static let keyBytesMax = 4096
    /// Largest value accepted by `put`.
    public static let valueBytesMax = 1 << 20
    /// Most writes (puts and deletes) one transaction may buffer.
    public static let txnWritesMax = 100_000
    /// Most bytes (keys plus values) one transaction may write.
    public static let txnBytesMax = 64 << 20
    /// Most keys a single `scan` returns.
    public static let scanLimitMax = 1_000_000
    /// Largest stored block of a table or of a reliably persisted
    /// partition, header included: one value in the store.
    public static let tableBlockBytesMax = valueBytesMax
    /// Most copies of a reliably persisted partition a job may ask for
    /// (`job run --reliable N`); fewer are made on a cluster with fewer
    /// participants.
    public static let replicasMax = 16
    /// Longest row (line, or key plus value) a table load accepts: a row
    /// never spans two blocks. A longer line is refused by its line number
    /// before it is buffered whole.
    public static let tableRowBytesMax = tableBlockBytesMax - 4096
    /// Blocks a table load (or a job's output) has in flight at once, each
    /// its own transaction: bounds the loader's memory to about this many
    /// blocks.
    public static let tableLoadBlocksInFlightMax = 16
    /// Replicas of a table's blocks (`table load --replicas K`), at most.
    public static let tableReplicasMax = 8
    /// How long a one-shot command waits for another one-shot command's
    /// lock on a data directory before it fails with `locked`, in ms.
    public static let dataDirLockWaitMillis = 10_000
    /// How long `weft server start` waits for its server to serve, in ms.
    public static let serverStartMillisMax = 120_000
    /// Blocks of one table partition handed to one task.
    public static let tableBlocksPerTaskMax = 8
    /// How far ahead of a participant's clock a read timestamp may be, in ms.
    public static let futureReadSlackMillis: UInt64 = 60_000
    /// How far ahead of a participant's clock a commit timestamp may be, in
    /// ms. The coordinator hands out timestamps at most
    /// `timestampReserveMillis` ahead of its own clock; one far beyond is
    /// forged or from a broken clock, and installing it would make the key
    /// unwritable until the clock got there ("poisoned"), so it is refused.
    public static let futureCommitSlackMillis: UInt64 = 60_000
    /// Most inbox messages a node steps in one round, so one group commit
    /// (one LMDB transaction) stays bounded.
    public static let roundMessagesMax = 4096
    /// How long a participant stays in doubt before it also asks its peers
    /// (cooperative termination), in ticks (ms).
    public static let peerQueryAfterTicks: UInt64 = 1_000
    /// Two-phase outcomes a participant remembers to answer peers.
    public static let outcomeCacheEntriesMax = 100_000
    /// Largest frame accepted on a TCP connection (a whole transaction fits).
    public static let frameBytesMax = Limits.txnBytesMax + (1 << 20)
    /// Requests one client may have in flight before new ones are refused.
    public static let clientInFlightMax = 10_000
    /// Envelopes queued for one peer connection before new ones are dropped
    /// (node to node: the protocol resends) or refused (client requests).
    public static let peerQueueMax = 100_000
    /// Largest frame accepted before the peer's HELLO is accepted: a HELLO,
    /// a health ping or an error is far smaller, so a stranger cannot make a
    /// node buffer a 64 MiB frame.
    public static let preHelloFrameBytesMax = 4096
    /// How long an inbound connection may stay without a HELLO (a health
    /// ping's connection included) before it is closed, in ms.
    public static let inboundHelloMillisMax: Int64 = 10_000
    /// How long a client's connection may sit with nothing read or written
    /// and no call running before it is closed, in ms (a client reconnects
    /// when it next sends).
    public static let clientIdleMillisMax: Int64 = 30 * 60 * 1000
    /// Inbound TCP connections one node (or server) holds at once; more are
    /// refused with an error frame.
    public static let inboundConnectionsMax = 1024
    /// Bytes of partly received large frames (over 64 KiB) one node buffers
    /// across all its connections; a connection whose frame would pass it
    /// is closed. One connection buffers at most one frame
    /// (`frameBytesMax`).
    public static let inboundBufferedBytesMax = 256 << 20
    /// Bytes of one request to the status port (request line, headers and
    /// body); more is answered 413 and the connection closed.
    public static let httpRequestBytesMax = 16 << 10
    /// A status-port connection that sends nothing for this long is closed, in ms.
    public static let httpIdleMillisMax: Int64 = 30_000
    /// Connections the status port holds at once; more are closed at accept.
    public static let httpConnectionsMax = 256
    /// Lines about refused connections a node logs per second; the rest are
    /// counted and reported in the next line.
    public static let rejectLogLinesPerSecondMax = 10
    /// How long an outbound connection may wait for the peer's HELLO before
    /// it is closed and what waits on it fails (a stopped or hung peer
    /// accepts connections in the kernel but never answers), in ms.
    public static let handshakeMillisMax: Int64 = 2_000
    /// Most entries in a participant's read-timestamp cache before it
    /// collapses old entries into its floor.
    public static let readCacheEntriesMax = 1 << 20
    /// How long a read waits on a prepared lock before giving up, in ticks (ms).
    public static let readWaitTicksMax: UInt64 = 5_000
    /// How long a coordinator waits for votes before aborting, in ticks (ms).
    public static let prepareTimeoutTicks: UInt64 = 2_000
    /// How often a coordinator resends COMMIT to participants that have not
    /// acknowledged, and a participant re-asks about in-doubt transactions, in ticks (ms).
    public static let resendIntervalTicks: UInt64 = 200
    /// Most COMMIT decisions the coordinator resends per tick: a backlog
    /// goes out in slices rather than all at once.
    public static let decisionResendsPerTickMax = 256
    /// Transactions the coordinator looks through on every tick; a bigger
    /// table (a backlog of unacknowledged decisions) is looked through
    /// every `coordinatorScanMillisWhenLarge` ms.
    public static let coordinatorTxnsScannedEveryTickMax = 4096
    public static let coordinatorScanMillisWhenLarge: UInt64 = 50
    /// How far ahead of the clock the oracle reserves timestamps durably in
    /// one record, in ms of hybrid time (one forced write per ~second at most).
    public static let timestampReserveMillis: UInt64 = 1000
    /// Versions older than this many ticks (ms) behind the newest commit are
    /// garbage-collected unless a snapshot pins them.
    public static let versionRetentionTicks: UInt64 = 10 * 60 * 1000
    /// The longest a snapshot lease (`pin`) holds without being renewed, ms.
    public static let pinLeaseMillisMax: UInt64 = 10 * 60 * 1000
    /// The lease a running job takes on its snapshot, renewed every third of it, ms.
    public static let jobPinLeaseMillis: UInt64 = 30_000

    // Redis protocol front end (`--redis-port`). Input over these bounds
    // closes the connection with an error; the node serves everyone else.
    /// Most arguments (command name included) in one RESP request.
    public static let respArgumentsMax = 262_144
    /// Longest bulk string in a RESP request: above `valueBytesMax`, so a
    /// value just over the store's limit gets an error naming that limit.
    public static let respBulkBytesMax = 8 << 20
    /// Most bytes in one RESP request, all arguments together.
    public static let respRequestBytesMax = txnBytesMax + (1 << 20)
    /// Longest inline command (a line without the `*` array framing).
    public static let respInlineBytesMax = 64 << 10
    /// Commands one connection may queue inside MULTI.
    public static let respMultiCommandsMax = 100_000
    /// How long the server keeps re-running a command or an EXEC whose
    /// commit lost a conflict (with back-off) before it answers with the
    /// conflict, in ms.
    public static let respConflictRetryMillisMax: UInt64 = 10_000
    /// Open SCAN cursors a server keeps (any connection may continue one);
    /// the oldest is forgotten.
    public static let respCursorsMax = 65_536
    /// Open RESP connections per listener; more are refused.
    public static let respConnectionsMax = 10_000
}
