/// A hash map from `Int` keys for the shuffle's hot loops (map-side
/// combine, reduce-side merge, join tables): open addressing with linear
/// probing and a multiplicative (Fibonacci) hash instead of `Dictionary`'s
/// seeded SipHash. Entries live in two dense arrays in insertion order; the
/// probe table holds each slot's key and entry index side by side, so a
/// probe that misses the cache misses it once.
struct IntMap<Value> {
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
