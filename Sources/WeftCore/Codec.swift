#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One binary codec for log records, wire messages and blocks.
///
/// Integers are little-endian fixed width or LEB128 varints; byte strings are
/// a varint length followed by the bytes. Readers validate every length
/// against what is left before trusting it, so a truncated or hostile buffer
/// produces `DecodeError`, never a crash or an oversized allocation.
public struct ByteWriter: Sendable {
    public private(set) var bytes: Bytes

    public init(capacity: Int = 64) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }

    public mutating func u32(_ v: UInt32) {
        withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) }
    }

    public mutating func u64(_ v: UInt64) {
        withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) }
    }

    /// Big-endian u64: used for LMDB keys so that byte order is numeric order.
    public mutating func u64BE(_ v: UInt64) {
        withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) }
    }

    public mutating func varint(_ v: UInt64) {
        var v = v
        while v >= 0x80 {
            bytes.append(UInt8(truncatingIfNeeded: v) | 0x80)
            v >>= 7
        }
        bytes.append(UInt8(v))
    }

    public mutating func int(_ v: Int) {
        precondition(v >= 0, "ByteWriter.int encodes non-negative values only")
        varint(UInt64(v))
    }

    public mutating func bool(_ v: Bool) { bytes.append(v ? 1 : 0) }

    /// Bytes as they are, with no length (the reader knows it).
    public mutating func raw(_ b: UnsafeRawBufferPointer) { bytes.append(contentsOf: b) }

    public mutating func blob<C: Collection>(_ b: C) where C.Element == UInt8 {
        varint(UInt64(b.count))
        bytes.append(contentsOf: b)
    }

    public mutating func string(_ s: String) { blob(Array(s.utf8)) }

    public mutating func raw<C: Collection>(_ b: C) where C.Element == UInt8 { bytes.append(contentsOf: b) }
}

public struct DecodeError: Error, Equatable, Sendable, CustomStringConvertible {
    public let reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { "malformed record: \(reason)" }
}

public struct ByteReader {
    public let bytes: UnsafeRawBufferPointer
    public private(set) var offset: Int = 0

    public init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    public var remaining: Int { bytes.count - offset }
    public var isAtEnd: Bool { offset == bytes.count }

    @inline(__always)
    private mutating func need(_ n: Int, _ what: StaticString) throws(DecodeError) {
        if n < 0 || n > remaining { throw DecodeError("truncated \(what): need \(n) bytes, \(remaining) left") }
    }

    public mutating func u8() throws(DecodeError) -> UInt8 {
        try need(1, "u8")
        defer { offset += 1 }
        return bytes[offset]
    }

    public mutating func u32() throws(DecodeError) -> UInt32 {
        try need(4, "u32")
        var v: UInt32 = 0
        withUnsafeMutableBytes(of: &v) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + 4])) }
        offset += 4
        return UInt32(littleEndian: v)
    }

    /// Fills `into` with the next `into.count` bytes.
    public mutating func raw(into: UnsafeMutableRawBufferPointer) throws(DecodeError) {
        try need(into.count, "raw bytes")
        if into.count > 0 { into.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + into.count])) }
        offset += into.count
    }

    public mutating func u64() throws(DecodeError) -> UInt64 {
        try need(8, "u64")
        var v: UInt64 = 0
        withUnsafeMutableBytes(of: &v) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + 8])) }
        offset += 8
        return UInt64(littleEndian: v)
    }

    public mutating func u64BE() throws(DecodeError) -> UInt64 {
        try need(8, "u64")
        var v: UInt64 = 0
        withUnsafeMutableBytes(of: &v) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + 8])) }
        offset += 8
        return UInt64(bigEndian: v)
    }

    public mutating func varint() throws(DecodeError) -> UInt64 {
        var result: UInt64 = 0
        var shift: UInt64 = 0
        while true {
            let b = try u8()
            if shift == 63 && b > 1 { throw DecodeError("varint overflows 64 bits") }
            result |= UInt64(b & 0x7f) << shift
            if b & 0x80 == 0 { return result }
            shift += 7
            if shift > 63 { throw DecodeError("varint longer than 10 bytes") }
        }
    }

    /// A non-negative count, bounded by `max` so a hostile length cannot make
    /// the reader allocate without limit.
    public mutating func int(max: Int = Int(Int32.max)) throws(DecodeError) -> Int {
        let v = try varint()
        if v > UInt64(max) { throw DecodeError("count \(v) exceeds limit \(max)") }
        return Int(v)
    }

    public mutating func bool() throws(DecodeError) -> Bool {
        switch try u8() {
        case 0: return false
        case 1: return true
        case let b: throw DecodeError("bad bool byte \(b)")
        }
    }

    public mutating func blob(max: Int = Limits.txnBytesMax) throws(DecodeError) -> Bytes {
        let n = try int(max: max)
        try need(n, "blob")
        defer { offset += n }
        return Bytes(UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + n]))
    }

    /// A blob's bytes in place, valid as long as the reader's buffer.
    public mutating func borrowedBlob(max: Int = Limits.txnBytesMax) throws(DecodeError) -> UnsafeRawBufferPointer {
        let n = try int(max: max)
        try need(n, "blob")
        defer { offset += n }
        return UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + n])
    }

    public mutating func string(max: Int = 1 << 16) throws(DecodeError) -> String {
        String(decoding: try blob(max: max), as: UTF8.self)
    }

    public func expectEnd() throws(DecodeError) {
        if !isAtEnd { throw DecodeError("\(remaining) trailing bytes") }
    }
}

extension Array where Element == UInt8 {
    /// Decodes with a reader over this array's storage.
    public func decode<T>(_ body: (inout ByteReader) throws(DecodeError) -> T) throws(DecodeError) -> T {
        let r: Result<T, DecodeError> = withUnsafeBytes { buf in
            var reader = ByteReader(buf)
            do throws(DecodeError) { return .success(try body(&reader)) } catch { return .failure(error) }
        }
        return try r.get()
    }
}

/// Lexicographic comparison of byte strings (memcmp order; a prefix sorts first).
@inlinable
public func compareBytes(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer) -> Int {
    let n = Swift.min(a.count, b.count)
    if n > 0 {
        let c = memcmpBytes(a.baseAddress!, b.baseAddress!, n)
        if c != 0 { return c }
    }
    return a.count - b.count
}

@usableFromInline
func memcmpBytes(_ a: UnsafeRawPointer, _ b: UnsafeRawPointer, _ n: Int) -> Int {
    Int(memcmp(a, b, n))
}

public func compareBytes(_ a: Bytes, _ b: Bytes) -> Int {
    a.withUnsafeBytes { pa in b.withUnsafeBytes { pb in compareBytes(pa, pb) } }
}

/// FNV-1a, 64-bit: a stable hash for partitioning (never Swift's randomized
/// `Hasher`, whose output changes between processes).
public func stableHash<C: Sequence>(_ bytes: C) -> UInt64 where C.Element == UInt8 {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for b in bytes {
        h ^= UInt64(b)
        h = h &* 0x100_0000_01b3
    }
    return h
}

/// A fast 64-bit checksum of a block's bytes: four independent lanes
/// of multiply-fold over 8-byte words, then the tail byte by byte, mixed
/// with the length. It detects flipped, lost and reordered bytes with high
/// probability; it is not a cryptographic hash. Stable across processes
/// and runs (no seed).
public func blockChecksum(_ buf: UnsafeRawBufferPointer) -> UInt64 {
    let k0: UInt64 = 0x9E37_79B9_7F4A_7C15, k1: UInt64 = 0xC2B2_AE3D_27D4_EB4F
    var a: UInt64 = 0x243F_6A88_85A3_08D3, b: UInt64 = 0x1319_8A2E_0370_7344
    var c: UInt64 = 0xA409_3822_299F_31D0, d: UInt64 = 0x082E_FA98_EC4E_6C89
    let n = buf.count
    var i = 0
    if let base = buf.baseAddress {
        while i + 32 <= n {
            a = (a ^ base.loadUnaligned(fromByteOffset: i, as: UInt64.self)) &* k0
            b = (b ^ base.loadUnaligned(fromByteOffset: i + 8, as: UInt64.self)) &* k0
            c = (c ^ base.loadUnaligned(fromByteOffset: i + 16, as: UInt64.self)) &* k0
            d = (d ^ base.loadUnaligned(fromByteOffset: i + 24, as: UInt64.self)) &* k0
            a ^= a >> 29; b ^= b >> 29; c ^= c >> 29; d ^= d >> 29
            i += 32
        }
    }
    var h = (a &* k1) ^ (b &* k1).rotateLeft(17) ^ (c &* k1).rotateLeft(31) ^ (d &* k1).rotateLeft(47) ^ UInt64(n)
    while i < n {
        h = (h ^ UInt64(buf[i])) &* 0x100_0000_01b3
        i += 1
    }
    h ^= h >> 33
    h = h &* k1
    h ^= h >> 29
    return h
}

public func blockChecksum(_ bytes: Bytes) -> UInt64 {
    bytes.withUnsafeBytes { blockChecksum($0) }
}

extension UInt64 {
    @inline(__always) func rotateLeft(_ s: UInt64) -> UInt64 { (self << s) | (self >> (64 - s)) }
}

/// Asks the kernel to back the whole 2 MiB pages inside `[p, p + n)` with
/// huge pages (Linux transparent huge pages in `madvise` mode); a hint,
/// ignored where unsupported.
public func adviseHugePages(_ p: UnsafeMutableRawPointer, _ n: Int) {
    #if os(Linux)
    let huge = 2 << 20
    let start = (Int(bitPattern: p) + huge - 1) & ~(huge - 1)
    let end = (Int(bitPattern: p) + n) & ~(huge - 1)
    if end > start { _ = madvise(UnsafeMutableRawPointer(bitPattern: start), end - start, 14 /* MADV_HUGEPAGE */) }
    #endif
}

/// The checksum that ends every durable record (PREPARED, commit and
/// decision records, format 2): `blockChecksum` of every byte before it,
/// u64 little-endian. Verified whenever a record is read, at recovery and
/// by tools, so a flipped byte on disk is an error naming the record,
/// never a wrong value served.
public enum RecordChecksum {
    public static let bytes = 8

    /// Appends the checksum of everything written to `w` so far.
    public static func seal(_ w: inout ByteWriter) {
        let sum = w.bytes.withUnsafeBytes { blockChecksum($0) }
        w.u64(sum)
    }

    /// `buf` without its checksum, once the checksum matches.
    public static func verified(_ buf: UnsafeRawBufferPointer) throws(DecodeError) -> UnsafeRawBufferPointer {
        guard buf.count >= bytes else { throw DecodeError("record of \(buf.count) bytes has no room for its checksum") }
        let body = UnsafeRawBufferPointer(rebasing: buf[..<(buf.count - bytes)])
        var stored: UInt64 = 0
        withUnsafeMutableBytes(of: &stored) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: buf[(buf.count - bytes)...])) }
        let want = blockChecksum(body)
        guard UInt64(littleEndian: stored) == want else {
            throw DecodeError("checksum mismatch (stored \(String(UInt64(littleEndian: stored), radix: 16)), computed \(String(want, radix: 16))): the record was damaged on disk")
        }
        return body
    }
}
