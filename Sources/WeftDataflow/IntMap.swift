/// A hash map from `Int` keys for the shuffle's hot loops (map-side
/// combine, reduce-side merge, join tables): open addressing with linear
/// probing and a multiplicative (Fibonacci) hash instead of `Dictionary`'s
/// seeded SipHash. Entries live in two dense arrays in insertion order; the
/// probe table holds each slot's key and entry index.
struct IntMap<Value> {
    private var slotKeys: [Int]
    /// Entry index + 1 per slot; 0 is an empty slot.
    private var slotEntries: [Int32]
    private var shift: Int
    private(set) var keys: [Int] = []
    var values: [Value] = []

    init(capacity: Int = 64) {
        var size = 16
        while size < capacity * 2 { size <<= 1 }
        slotKeys = [Int](repeating: 0, count: size)
        slotEntries = [Int32](repeating: 0, count: size)
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
        let mask = slotKeys.count - 1
        var s = home(k)
        while true {
            let e = slotEntries[s]
            if e == 0 { return (-1, s) }
            if slotKeys[s] == k { return (Int(e) - 1, s) }
            s = (s + 1) & mask
        }
    }

    /// Adds `k` (absent, `slot` from `find`) and returns its entry index.
    @discardableResult
    mutating func insert(_ k: Int, _ v: Value, at slot: Int) -> Int {
        keys.append(k)
        values.append(v)
        slotKeys[slot] = k
        slotEntries[slot] = Int32(truncatingIfNeeded: keys.count)
        if keys.count * 2 > slotKeys.count { grow() }
        return keys.count - 1
    }

    private mutating func grow() {
        let size = slotKeys.count * 2
        slotKeys = [Int](repeating: 0, count: size)
        slotEntries = [Int32](repeating: 0, count: size)
        shift -= 1
        let mask = size - 1
        for (i, k) in keys.enumerated() {
            var s = home(k)
            while slotEntries[s] != 0 { s = (s + 1) & mask }
            slotKeys[s] = k
            slotEntries[s] = Int32(truncatingIfNeeded: i + 1)
        }
    }
}
