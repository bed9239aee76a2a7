/// Timestamps are hybrid: the high 44 bits are wall-clock milliseconds and the
/// low 20 bits a counter, so the oracle can hand out ~1M timestamps per
/// millisecond while keeping timestamps close to real time. That is what lets
/// version retention be stated in minutes.
public enum HLC {
    public static let logicalBits: UInt64 = 20

    public static func timestamp(millis: UInt64) -> Timestamp { millis << logicalBits }
    public static func millis(_ ts: Timestamp) -> UInt64 { ts >> logicalBits }
}
