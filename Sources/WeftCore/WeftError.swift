/// The public error of Weft: a stable code and a sentence a user can act on.
/// Codes are what scripts match on; messages are for people.
public struct WeftError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Code: String, Sendable, Equatable {
        case invalidArgument = "invalid-argument"
        case keyTooLarge = "key-too-large"
        case valueTooLarge = "value-too-large"
        case txnTooLarge = "txn-too-large"
        case conflict
        /// Definitely aborted for another reason than a conflict (a
        /// participant did not vote in time): nothing was committed.
        case aborted
        case notFound = "not-found"
        case snapshotTooOld = "snapshot-too-old"
        case storage
        case storageFull = "storage-full"
        case readOnly = "read-only"
        case locked
        case corrupted
        case unavailable
        case outcomeUnknown = "outcome-unknown"
        case timeout
        case malformed
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }

    public static func checkKey(_ key: Bytes) throws(WeftError) {
        if key.isEmpty { throw WeftError(.invalidArgument, "key is empty; keys must be 1...\(Limits.keyBytesMax) bytes") }
        if key.count > Limits.keyBytesMax {
            throw WeftError(.keyTooLarge, "key is \(key.count) bytes; the limit (Limits.keyBytesMax) is \(Limits.keyBytesMax) bytes")
        }
    }

    public static func checkValue(_ value: Bytes) throws(WeftError) {
        if value.count > Limits.valueBytesMax {
            throw WeftError(.valueTooLarge, "value is \(value.count) bytes; the limit (Limits.valueBytesMax) is \(Limits.valueBytesMax) bytes")
        }
    }
}
