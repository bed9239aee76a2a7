import Foundation
import WeftCore

/// Elements that can leave memory: written to a spill file or a block and
/// read back. Shuffle data, disk-level caches and reliable blocks use it.
/// A type that is not `SpillCodable` still works everywhere; its shuffle
/// data and caches just stay in memory (counted as `unspillableBytes`).
public protocol SpillCodable {
    func encode(to w: inout ByteWriter)
    static func decode(from r: inout ByteReader) throws(DecodeError) -> Self
}

extension Int: SpillCodable {
    public func encode(to w: inout ByteWriter) { w.u64(UInt64(bitPattern: Int64(self))) }
    public static func decode(from r: inout ByteReader) throws(DecodeError) -> Int { Int(Int64(bitPattern: try r.u64())) }
}

extension UInt64: SpillCodable {
    public func encode(to w: inout ByteWriter) { w.u64(self) }
    public static func decode(from r: inout ByteReader) throws(DecodeError) -> UInt64 { try r.u64() }
}

extension UInt8: SpillCodable {
    public func encode(to w: inout ByteWriter) { w.u8(self) }
    public static func decode(from r: inout ByteReader) throws(DecodeError) -> UInt8 { try r.u8() }
}

extension Double: SpillCodable {
    public func encode(to w: inout ByteWriter) { w.u64(bitPattern) }
    public static func decode(from r: inout ByteReader) throws(DecodeError) -> Double { Double(bitPattern: try r.u64()) }
}

extension Bool: SpillCodable {
    public func encode(to w: inout ByteWriter) { w.bool(self) }
    public static func decode(from r: inout ByteReader) throws(DecodeError) -> Bool { try r.bool() }
}

extension String: SpillCodable {
    public func encode(to w: inout ByteWriter) { w.string(self) }
    public static func decode(from r: inout ByteReader) throws(DecodeError) -> String { try r.string(max: Int(Int32.max)) }
}

extension Array: SpillCodable where Element: SpillCodable {
    /// Arrays of 8-byte numbers are copied whole: on a little-endian host
    /// their memory is their encoding.
    static var isWordArray: Bool {
        #if _endian(little)
        return Element.self == Int.self || Element.self == Double.self || Element.self == UInt64.self
        #else
        return false
        #endif
    }

    public func encode(to w: inout ByteWriter) {
        w.int(count)
        if Self.isWordArray {
            withUnsafeBytes { w.raw($0) }
            return
        }
        for x in self { x.encode(to: &w) }
    }
    public static func decode(from r: inout ByteReader) throws(DecodeError) -> [Element] {
        let n = try r.int(max: r.remaining)
        if isWordArray {
            guard n <= r.remaining / 8 else { throw DecodeError("array of \(n) words in \(r.remaining) bytes") }
            var failure: DecodeError?
            let out = [Element](unsafeUninitializedCapacity: n) { buf, count in
                do throws(DecodeError) {
                    try r.raw(into: UnsafeMutableRawBufferPointer(buf))
                    count = n
                } catch {
                    failure = error
                    count = 0
                }
            }
            if let failure { throw failure }
            return out
        }
        var out: [Element] = []
        out.reserveCapacity(n)
        for _ in 0..<n { out.append(try Element.decode(from: &r)) }
        return out
    }
}

extension Optional: SpillCodable where Wrapped: SpillCodable {
    public func encode(to w: inout ByteWriter) {
        switch self {
        case .none: w.u8(0)
        case .some(let x): w.u8(1); x.encode(to: &w)
        }
    }
    public static func decode(from r: inout ByteReader) throws(DecodeError) -> Wrapped? {
        try r.u8() == 0 ? nil : try Wrapped.decode(from: &r)
    }
}

extension BlockCodec {
    /// The codec of a `SpillCodable` type, found at run time; nil for any
    /// other type (tuples included: use `pair`).
    public static func automatic() -> BlockCodec<T>? {
        if let c = T.self as? SpillCodable.Type {
            return BlockCodec(encode: { x, w in (x as! SpillCodable).encode(to: &w) },
                              decode: { (r: inout ByteReader) throws(DecodeError) -> T in try c.decode(from: &r) as! T })
        }
        // A pair known by its static types decodes in a process that never
        // encoded one (a reducer fetching from another executor).
        return knownPair() ?? tuple()
    }

    /// A tuple of `SpillCodable` components, by reflection: the components'
    /// types come from the first value encoded, and a decoded tuple is
    /// assembled in place at the offsets of Swift's tuple layout (each
    /// component aligned after the previous one). Spill data never leaves
    /// the process that wrote it, so the layout is the one it was written
    /// with. Nil if `T` is not a tuple; `accepts` is false for a value with
    /// a component that has no codec.
    static func tuple() -> BlockCodec<T>? {
        let layout = TupleLayout()
        return BlockCodec(
            encode: { x, w in
                for child in Mirror(reflecting: x).children { (child.value as! SpillCodable).encode(to: &w) }
            },
            decode: { (r: inout ByteReader) throws(DecodeError) -> T in
                guard let (types, offsets) = layout.get() else { throw DecodeError("tuple layout unknown") }
                let p = UnsafeMutableRawPointer.allocate(byteCount: Swift.max(1, MemoryLayout<T>.size), alignment: MemoryLayout<T>.alignment)
                defer { p.deallocate() }
                for (t, off) in zip(types, offsets) {
                    let v = try t.decode(from: &r)
                    store(v, at: p + off)
                }
                return p.assumingMemoryBound(to: T.self).move()
            },
            accepts: { x in layout.learn(x, size: MemoryLayout<T>.size) }
        )
    }
}

private func store<X: SpillCodable>(_ x: X, at p: UnsafeMutableRawPointer) {
    p.initializeMemory(as: X.self, repeating: x, count: 1)
}

/// Component types and offsets of a tuple type, learned from a value.
final class TupleLayout: @unchecked Sendable {
    private let lock = NSLock()
    private var known: ([SpillCodable.Type], [Int])?
    private var refused = false

    func get() -> ([SpillCodable.Type], [Int])? { lock.withLock { known } }

    /// True if `x` is a tuple whose components are all `SpillCodable` and
    /// whose computed layout matches the tuple's size.
    func learn(_ x: Any, size: Int) -> Bool {
        if let ok = lock.withLock({ known != nil ? true : refused ? false : nil }) { return ok }
        let m = Mirror(reflecting: x)
        var types: [SpillCodable.Type] = []
        var offsets: [Int] = []
        var end = 0
        var ok = m.displayStyle == .tuple && m.children.count > 0
        for child in m.children where ok {
            guard let t = type(of: child.value) as? SpillCodable.Type else { ok = false; break }
            let (sz, al) = layoutOf(t)
            let off = (end + al - 1) / al * al
            types.append(t)
            offsets.append(off)
            end = off + sz
        }
        ok = ok && end == size
        lock.withLock {
            if ok { known = (types, offsets) } else { refused = true }
        }
        return ok
    }
}

private func layoutOf(_ t: SpillCodable.Type) -> (Int, Int) {
    func of<X: SpillCodable>(_: X.Type) -> (Int, Int) { (MemoryLayout<X>.size, MemoryLayout<X>.alignment) }
    return of(t)
}

extension BlockCodec {

    /// A pair's codec from its components' codecs.
    public static func pair<A, B>(_ a: BlockCodec<A>?, _ b: BlockCodec<B>?) -> BlockCodec<(A, B)>? where T == (A, B) {
        guard let a, let b else { return nil }
        return BlockCodec(encode: { x, w in a.encode(x.0, &w); b.encode(x.1, &w) },
                          decode: { (r: inout ByteReader) throws(DecodeError) -> (A, B) in (try a.decode(&r), try b.decode(&r)) },
                          accepts: { a.accepts($0.0) && b.accepts($0.1) })
    }
}

/// The one memory bound of a context, shared by cached blocks, shuffle map
/// outputs and map-side combine tables. Whoever cannot get memory spills
/// (or, for a `.memory` cache, drops the block).
final class MemoryPool: @unchecked Sendable {
    let capacity: Int
    private let lock = NSLock()
    private var used = 0
    private(set) var peak = 0

    init(capacity: Int) { self.capacity = capacity }

    func tryAcquire(_ n: Int) -> Bool {
        lock.withLock {
            guard used + n <= capacity else { return false }
            used += n
            peak = Swift.max(peak, used)
            return true
        }
    }

    /// Takes memory that is already in use and cannot be refused (data
    /// that has no codec to spill with).
    func force(_ n: Int) {
        lock.withLock {
            used += n
            peak = Swift.max(peak, used)
        }
    }

    func release(_ n: Int) { lock.withLock { used -= n } }
    var inUse: Int { lock.withLock { used } }
}

/// Spill files of one context, in a private directory removed with it.
final class SpillDirectory: @unchecked Sendable {
    let path: String
    private let lock = NSLock()
    private var next = 0
    private var created = false

    init(runId: String) {
        path = NSTemporaryDirectory() + "weft-spill-\(getpid())-\(runId)"
        Self.removeOrphans()
    }

    nonisolated(unsafe) static var orphansChecked = false
    static let orphanLock = NSLock()

    /// Removes the spill directories of processes that are gone (a job
    /// killed with SIGKILL never removes its own), once per process.
    static func removeOrphans(force: Bool = false) {
        let first = orphanLock.withLock { () -> Bool in
            defer { orphansChecked = true }
            return !orphansChecked
        }
        guard first || force else { return }
        let tmp = NSTemporaryDirectory()
        for name in (try? FileManager.default.contentsOfDirectory(atPath: tmp)) ?? [] where name.hasPrefix("weft-spill-") {
            let fields = name.split(separator: "-")
            guard fields.count >= 4, let pid = Int32(fields[2]), pid != getpid() else { continue }
            if kill(pid, 0) != 0 && errno == ESRCH { try? FileManager.default.removeItem(atPath: tmp + name) }
        }
    }

    /// The path of a new spill file (not created yet).
    func newFile(tag: String) throws -> String {
        try lock.withLock { () throws -> String in
            if !created {
                try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
                created = true
            }
            next += 1
            return path + "/\(tag)-\(next)"
        }
    }

    /// Writes `bytes` to a new file and returns its path.
    func write(_ bytes: Bytes, tag: String) throws -> String {
        let file = try newFile(tag: tag)
        do {
            do {
                try Data(bytes).write(to: URL(fileURLWithPath: file))
            } catch {
                // The directory may have been removed under us: make it again once.
                try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
                try Data(bytes).write(to: URL(fileURLWithPath: file))
            }
        } catch {
            throw WeftError(.storage, "cannot spill \(bytes.count) bytes to \(file): \(error.localizedDescription) (is the disk full?)")
        }
        return file
    }

    func read(_ file: String) throws -> Bytes {
        guard let d = FileManager.default.contents(atPath: file) else { throw WeftError(.storage, "spill file \(file) is missing") }
        return Bytes(d)
    }

    /// Bytes [from, to) of a spill file.
    func readRange(_ file: String, from: Int, to: Int) throws -> Bytes {
        guard let fh = FileHandle(forReadingAtPath: file) else { throw WeftError(.storage, "spill file \(file) is missing") }
        defer { try? fh.close() }
        try fh.seek(toOffset: UInt64(from))
        let d = fh.readData(ofLength: to - from)
        guard d.count == to - from else { throw WeftError(.corrupted, "spill file \(file) is shorter than its index says") }
        return Bytes(d)
    }

    func remove(_ file: String) { try? FileManager.default.removeItem(atPath: file) }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// A spill file written piece by piece, for output larger than memory
/// should hold at once (a merge of runs).
final class SpillFileWriter {
    let file: String
    private var fd: Int32
    private(set) var size = 0

    init(_ file: String) throws {
        self.file = file
        fd = open(file, O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw WeftError(.storage, "cannot create spill file \(file): \(String(cString: strerror(errno)))") }
    }

    func append(_ bytes: Bytes) throws {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + done, bytes.count - done) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                let why = n == 0 ? "nothing written" : String(cString: strerror(errno))
                throw WeftError(.storage, "cannot spill \(bytes.count) bytes to \(file): \(why) (is the disk full?)")
            }
            done += n
        }
        size += bytes.count
    }

    func close() {
        if fd >= 0 { _ = Glibc.close(fd) }
        fd = -1
    }

    deinit { close() }
}

/// A spill file read range by range through one open descriptor (a merge
/// reads each run a batch at a time).
final class SpillFileReader {
    let file: String
    private let fd: Int32

    init(_ file: String) throws {
        self.file = file
        fd = open(file, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw WeftError(.storage, "cannot open spill file \(file): \(String(cString: strerror(errno)))") }
    }

    /// Bytes [from, to) of the file.
    func read(from: Int, to: Int) throws -> Bytes {
        let count = to - from
        var bytes = Bytes(repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, count - done, off_t(from + done)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw WeftError(.corrupted, "spill file \(file) is shorter than its index says") }
            done += n
        }
        return bytes
    }

    deinit { _ = close(fd) }
}

/// Encodes items with a codec into one buffer; `decodeAll` reads them back.
enum SpillFormat {
    static func encode<T, S: Sequence>(_ items: S, count: Int, _ codec: BlockCodec<T>, into w: inout ByteWriter) where S.Element == T {
        w.int(count)
        for x in items { codec.encode(x, &w) }
    }

    static func decodeAll<T>(_ bytes: ArraySlice<UInt8>, _ codec: BlockCodec<T>) throws -> [T] {
        try bytes.withUnsafeBytes { buf throws -> [T] in
            var r = ByteReader(buf)
            do {
                let n = try r.int(max: buf.count)
                var out: [T] = []
                out.reserveCapacity(n)
                for _ in 0..<n { out.append(try codec.decode(&r)) }
                return out
            } catch {
                throw WeftError(.corrupted, "spill data does not decode: \(error)")
            }
        }
    }
}
