import WeftCore

/// Codecs for values that cross a process boundary whole: task results
/// going to the driver, and action results going back to executors (which
/// replay the job's program; see `JobReplica`). Found at run time from the
/// static type: `SpillCodable` types, arrays and optionals of anything
/// with a codec, and pairs of `SpillCodable` components.
extension BlockCodec {
    public static func forResults() -> BlockCodec<T>? {
        if let c = T.self as? SpillCodable.Type {
            return BlockCodec(encode: { x, w in (x as! SpillCodable).encode(to: &w) },
                              decode: { (r: inout ByteReader) throws(DecodeError) -> T in try c.decode(from: &r) as! T })
        }
        if let a = T.self as? ResultContainer.Type { return a.containerCodec() as? BlockCodec<T> }
        return knownPair()
    }

    /// Pairs whose components are `SpillCodable`, by their static types (a
    /// reflected tuple codec learns its layout from a value, which the
    /// decoding process may never have seen).
    static func knownPair() -> BlockCodec<T>? {
        func p<A: SpillCodable, B: SpillCodable>(_: A.Type, _: B.Type) -> BlockCodec<T>? {
            guard T.self == (A, B).self else { return nil }
            let c = BlockCodec<(A, B)>(encode: { x, w in x.0.encode(to: &w); x.1.encode(to: &w) },
                                       decode: { (r: inout ByteReader) throws(DecodeError) -> (A, B) in (try A.decode(from: &r), try B.decode(from: &r)) })
            return unsafeBitCast(c, to: BlockCodec<T>.self)
        }
        let candidates: [() -> BlockCodec<T>?] = [
            { p(Bytes.self, Bytes.self) }, { p(String.self, Int.self) }, { p(String.self, Double.self) }, { p(Int.self, Double.self) },
            { p(Int.self, Int.self) }, { p(String.self, String.self) }, { p(Int.self, [Double].self) }, { p(String.self, [Double].self) },
            { p(Int.self, String.self) }, { p(String.self, [String].self) }, { p(Int.self, [Int].self) }, { p(Double.self, [Double].self) },
            { p(Bytes.self, Int.self) }, { p(String.self, Bytes.self) }, { p(Double.self, Int.self) }, { p([Double].self, Int.self) },
            { p([Double].self, Double.self) }, { p(Double.self, Double.self) },
        ]
        for c in candidates { if let codec = c() { return codec } }
        return nil
    }
}

/// Arrays and optionals: a codec when their element has one.
protocol ResultContainer {
    static func containerCodec() -> Any?
}

extension Array: ResultContainer {
    static func containerCodec() -> Any? {
        guard let c = BlockCodec<Element>.forResults() else { return nil }
        return BlockCodec<[Element]>(
            encode: { xs, w in
                w.int(xs.count)
                for x in xs { c.encode(x, &w) }
            },
            decode: { (r: inout ByteReader) throws(DecodeError) -> [Element] in
                let n = try r.int(max: r.remaining)
                var out: [Element] = []
                out.reserveCapacity(n)
                for _ in 0..<n { out.append(try c.decode(&r)) }
                return out
            })
    }
}

extension Optional: ResultContainer {
    static func containerCodec() -> Any? {
        guard let c = BlockCodec<Wrapped>.forResults() else { return nil }
        return BlockCodec<Wrapped?>(
            encode: { x, w in
                if let x { w.u8(1); c.encode(x, &w) } else { w.u8(0) }
            },
            decode: { (r: inout ByteReader) throws(DecodeError) -> Wrapped? in try r.u8() == 0 ? nil : try c.decode(&r) })
    }
}

extension BlockCodec {
    func encodeWhole(_ x: T) -> Bytes {
        var w = ByteWriter(capacity: 256)
        encode(x, &w)
        return w.bytes
    }

    func decodeWhole(_ b: Bytes, what: String) throws -> T {
        try b.withUnsafeBytes { buf in
            var r = ByteReader(buf)
            do {
                let v = try decode(&r)
                try r.expectEnd()
                return v
            } catch {
                throw WeftError(.corrupted, "\(what) does not decode: \(error)")
            }
        }
    }
}
