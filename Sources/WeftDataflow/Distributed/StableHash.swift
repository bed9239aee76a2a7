import Foundation
import WeftCore

/// Keys that hash the same in every process. The engine's own key types
/// (integers, strings, bytes, doubles) are built in; a user's key type
/// conforms to be partitioned by a hash shuffle across processes.
public protocol StableHashable {
    var stableHash: UInt64 { get }
}

public enum StableHash {
    /// Keys of other types fall back to `hashValue`, which is stable within
    /// one process only; `isStable` says so, and a distributed job refuses them.
    @inline(__always)
    public static func of<K: Hashable>(_ k: K) -> UInt64 {
        if K.self == Int.self { return mix(UInt64(bitPattern: Int64(unsafeBitCast(k, to: Int.self)))) }
        if K.self == String.self { return string(unsafeBitCast(k, to: String.self)) }
        if K.self == Bytes.self { return stableHash(k as! Bytes) }
        if let s = k as? StableHashable { return s.stableHash }
        if K.self == Double.self { return mix((k as! Double).bitPattern) }
        if K.self == UInt64.self { return mix(k as! UInt64) }
        return UInt64(bitPattern: Int64(k.hashValue))
    }

    public static func isStable<K>(_: K.Type) -> Bool {
        K.self == Int.self || K.self == String.self || K.self == Bytes.self || K.self == Double.self || K.self == UInt64.self
            || K.self is StableHashable.Type
    }

    /// SplitMix64's finalizer: every input bit moves every output bit.
    @inline(__always)
    public static func mix(_ x: UInt64) -> UInt64 {
        var z = x &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    @inline(__always)
    static func string(_ s: String) -> UInt64 {
        var s = s
        return s.withUTF8 { buf in
            var h: UInt64 = 0xcbf2_9ce4_8422_2325
            var i = 0
            let n = buf.count
            // Eight bytes at a time, then the tail: FNV-style, word-wise.
            while i + 8 <= n {
                var w: UInt64 = 0
                memcpy(&w, buf.baseAddress! + i, 8)
                h = (h ^ w) &* 0x100_0000_01b3
                h ^= h >> 29
                i += 8
            }
            while i < n {
                h = (h ^ UInt64(buf[i])) &* 0x100_0000_01b3
                i += 1
            }
            return mix(h ^ UInt64(n))
        }
    }
}
