/// `StringMap`'s seed: per process, so no input can be built in advance
/// to collide (the reason `Dictionary` seeds its hash).
let stringHashSeed: UInt64 = UInt64.random(in: 1...UInt64.max) | 1

/// What the shuffle's combine and merge loops need of a key map.
protocol CombineMap {
    associatedtype Key
    associatedtype Value
    /// Where an absent key goes, as found by `probe`.
    associatedtype Probe
    init(capacity: Int)
    var count: Int { get }
    var keys: [Key] { get }
    var values: [Value] { get set }
    /// The entry index of `k` (or -1) and where to insert it if absent.
    func probe(_ k: Key) -> (entry: Int, at: Probe)
    @discardableResult mutating func insert(_ k: Key, _ v: Value, at: Probe) -> Int
}

extension CombineMap {
    /// Merges into `k`'s value, or adds `k` with a new value; true if added.
    /// Mutating, so that a map captured by a closure is used in place, not
    /// copied (and its arrays retained) for each row.
    @inline(__always)
    mutating func upsert(_ k: Key, _ create: () -> Value, _ merge: (inout Value) -> Void) -> Bool {
        let (e, at) = probe(k)
        if e >= 0 {
            merge(&values[e])
            return false
        }
        insert(k, create(), at: at)
        return true
    }
}

/// A hash map from `Int` keys for the shuffle's hot loops (map-side
/// combine, reduce-side merge, join tables): open addressing with linear
/// probing and a multiplicative (Fibonacci) hash instead of `Dictionary`'s
/// seeded SipHash. Entries live in two dense arrays in insertion order; the
/// probe table holds each slot's key and entry index side by side, so a
/// probe that misses the cache misses it once.
struct IntMap<Value>: CombineMap {
    struct Slot {
        var key: Int
        /// Entry index + 1; 0 is an empty slot.
        var entry: Int32
    }
    private var slots: [Slot]
    private var shift: Int
    private(set) var keys: [Int] = []
    var values: [Value] = []

    init(capacity: Int = 64) {
        var size = 16
        while size < capacity * 2 { size <<= 1 }
        slots = [Slot](repeating: Slot(key: 0, entry: 0), count: size)
        shift = 64 - size.trailingZeroBitCount
    }

    var count: Int { keys.count }

    @inline(__always)
    private func home(_ k: Int) -> Int {
        Int(truncatingIfNeeded: (UInt64(bitPattern: Int64(k)) &* 0x9E37_79B9_7F4A_7C15) >> UInt64(shift))
    }

    /// The entry index of `k`, or -1 with the slot where it would go.
    @inline(__always)
    func find(_ k: Int) -> (entry: Int, slot: Int) {
        slots.withUnsafeBufferPointer { slots in
            let mask = slots.count - 1
            var s = home(k)
            while true {
                let slot = slots[s]
                if slot.entry == 0 { return (-1, s) }
                if slot.key == k { return (Int(slot.entry) - 1, s) }
                s = (s + 1) & mask
            }
        }
    }

    @inline(__always)
    func probe(_ k: Int) -> (entry: Int, at: Int) {
        let (e, s) = find(k)
        return (e, s)
    }

    /// Adds `k` (absent, `slot` from `find`) and returns its entry index.
    @discardableResult
    mutating func insert(_ k: Int, _ v: Value, at slot: Int) -> Int {
        keys.append(k)
        values.append(v)
        slots[slot] = Slot(key: k, entry: Int32(truncatingIfNeeded: keys.count))
        if keys.count * 2 > slots.count { grow() }
        return keys.count - 1
    }

    private mutating func grow() {
        let size = slots.count * 2
        slots = [Slot](repeating: Slot(key: 0, entry: 0), count: size)
        shift -= 1
        let mask = size - 1
        for (i, k) in keys.enumerated() {
            var s = home(k)
            while slots[s].entry != 0 { s = (s + 1) & mask }
            slots[s] = Slot(key: k, entry: Int32(truncatingIfNeeded: i + 1))
        }
    }
}

/// The same for `String` keys: a fast hash of the key's UTF-8 bytes (a
/// multiply-fold over 8-byte words, seeded once per process) instead of
/// `Dictionary`'s SipHash. A slot holds the key itself beside 32 bits of
/// its hash and the entry index, so a probe that misses the cache misses
/// it once; growing never re-hashes a string. At most 3/4 full.
struct StringMap<Value>: CombineMap {
    struct Slot {
        var key: String
        var hash: UInt32
        /// Entry index + 1; 0 is an empty slot.
        var entry: Int32
    }
    private var slots: [Slot]
    private var shift: UInt32
    private(set) var keys: [String] = []
    var values: [Value] = []

    init(capacity: Int = 64) {
        var size = 16
        while size * 3 < capacity * 4 { size <<= 1 }
        slots = [Slot](repeating: Slot(key: "", hash: 0, entry: 0), count: size)
        shift = 32 - UInt32(size.trailingZeroBitCount)
    }

    var count: Int { keys.count }

    /// The process's seed, read once per map (a global is read through a
    /// once-check each time).
    private let seed = stringHashSeed

    /// Equal strings (`==`, which is canonical equivalence) get equal
    /// hashes. ASCII keys, the common case, hash their bytes. A key that
    /// is ASCII but for the three scalars whose normal form is ASCII
    /// (U+037E, U+1FEF, U+212A; checked over all of Unicode) hashes as
    /// that ASCII string. Any other key's normal form has a non-ASCII
    /// scalar, so it can equal no ASCII key: it takes `String`'s own hash.
    @inline(__always)
    static func hash(_ k: String, seed: UInt64 = stringHashSeed) -> UInt32 {
        let fast = k.utf8.withContiguousStorageIfAvailable { hash(ascii: UnsafeRawBufferPointer($0), seed: seed) }
            ?? { var copy = k; return copy.withUTF8 { hash(ascii: UnsafeRawBufferPointer($0), seed: seed) } }()
        return fast ?? hash(nonASCII: k, seed: seed)
    }

    @inline(never)
    static func hash(nonASCII k: String, seed: UInt64) -> UInt32 {
        var mapped: [UInt8] = []
        for s in k.unicodeScalars {
            switch s.value {
            case 0..<0x80: mapped.append(UInt8(s.value))
            case 0x37E: mapped.append(0x3B)    // GREEK QUESTION MARK is ";"
            case 0x1FEF: mapped.append(0x60)   // GREEK VARIA is "`"
            case 0x212A: mapped.append(0x4B)   // KELVIN SIGN is "K"
            default: return UInt32(truncatingIfNeeded: k.hashValue)
            }
        }
        return mapped.withUnsafeBytes { hash(ascii: $0, seed: seed)! }
    }

    /// A hash of `bytes`, or nil if they are not all ASCII.
    @inline(__always)
    static func hash(ascii bytes: UnsafeRawBufferPointer, seed: UInt64) -> UInt32? {
        @inline(__always) func mix(_ a: UInt64, _ b: UInt64) -> UInt64 {
            let m = a.multipliedFullWidth(by: b)
            return m.high ^ m.low
        }
        let n = bytes.count
        var h = seed ^ UInt64(n) &* 0x9E37_79B9_7F4A_7C15
        // Every byte is in some word loaded below, so `high` sees them all.
        // (No bytes, whatever the pointer: a = b = 0.)
        var a: UInt64 = 0, b: UInt64 = 0, high: UInt64 = 0
        guard let p = bytes.baseAddress, n > 0 else {
            return UInt32(truncatingIfNeeded: mix(mix(0xA076_1D64_78BD_642F, h) ^ 0xE703_7ED1_A0B4_28DB, 0x8EBC_6AF0_9C88_C6E3))
        }
        if n >= 8 {
            var i = 0
            while i + 16 < n {
                let (x, y) = (p.loadUnaligned(fromByteOffset: i, as: UInt64.self), p.loadUnaligned(fromByteOffset: i + 8, as: UInt64.self))
                high |= x | y
                h = mix(x ^ 0xE703_7ED1_A0B4_28DB, y ^ h)
                i += 16
            }
            // The last 8 to 16 bytes, as two (possibly overlapping) words.
            a = p.loadUnaligned(fromByteOffset: n >= 16 ? n - 16 : 0, as: UInt64.self)
            b = p.loadUnaligned(fromByteOffset: n - 8, as: UInt64.self)
        } else if n >= 4 {
            a = UInt64(p.loadUnaligned(as: UInt32.self))
            b = UInt64(p.loadUnaligned(fromByteOffset: n - 4, as: UInt32.self))
        } else {
            a = UInt64(p.load(as: UInt8.self)) << 16 | UInt64(p.load(fromByteOffset: n >> 1, as: UInt8.self)) << 8 | UInt64(p.load(fromByteOffset: n - 1, as: UInt8.self))
            b = a << 8
        }
        high |= a | b
        if high & 0x8080_8080_8080_8080 != 0 { return nil }
        h = mix(a ^ 0xA076_1D64_78BD_642F, b ^ h)
        return UInt32(truncatingIfNeeded: mix(h ^ 0xE703_7ED1_A0B4_28DB, 0x8EBC_6AF0_9C88_C6E3 ^ UInt64(n)))
    }

    @inline(__always)
    private func home(_ h: UInt32) -> Int { Int(h >> shift) }

    /// The entry index of `k`, or -1 with the slot where it would go; and
    /// the key's hash, for `insert`.
    @inline(__always)
    func find(_ k: String) -> (entry: Int, slot: Int, hash: UInt32) {
        let h = Self.hash(k, seed: seed)
        return slots.withUnsafeBufferPointer { slots in
            let mask = slots.count - 1
            var s = home(h)
            while true {
                if slots[s].entry == 0 { return (-1, s, h) }
                if slots[s].hash == h && slots[s].key == k { return (Int(slots[s].entry) - 1, s, h) }
                s = (s + 1) & mask
            }
        }
    }

    @inline(__always)
    func probe(_ k: String) -> (entry: Int, at: (slot: Int, hash: UInt32)) {
        let (e, s, h) = find(k)
        return (e, (s, h))
    }

    @discardableResult @inline(__always)
    mutating func insert(_ k: String, _ v: Value, at p: (slot: Int, hash: UInt32)) -> Int { insert(k, v, at: p.slot, hash: p.hash) }

    /// Adds `k` (absent; `slot` and `hash` from `find`) and returns its entry index.
    @discardableResult
    mutating func insert(_ k: String, _ v: Value, at slot: Int, hash: UInt32) -> Int {
        keys.append(k)
        values.append(v)
        slots[slot] = Slot(key: k, hash: hash, entry: Int32(truncatingIfNeeded: keys.count))
        if keys.count * 4 > slots.count * 3 { grow() }
        return keys.count - 1
    }

    private mutating func grow() {
        let size = slots.count * 2
        let old = slots
        slots = [Slot](repeating: Slot(key: "", hash: 0, entry: 0), count: size)
        shift -= 1
        let mask = size - 1
        for slot in old where slot.entry != 0 {
            var s = home(slot.hash)
            while slots[s].entry != 0 { s = (s + 1) & mask }
            slots[s] = slot
        }
    }
}
