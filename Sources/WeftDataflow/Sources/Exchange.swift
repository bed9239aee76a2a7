import Foundation
import WeftCore
import WeftRuntime

/// Tables out to files and in from them, streaming: `table export` reads one
/// block at a time and writes it through a small buffer; `table load
/// --format jsonl|csv` goes through `TableStore.load`'s chunked reader.
///
/// Formats, each keeping bytes exactly:
/// - `lines`: each row's value and a newline (a row holding a newline is
///   refused: use jsonl or csv).
/// - `kv`: `key<TAB>value` lines (a key holding a TAB or newline, or a
///   value holding a newline, is refused).
/// - `jsonl`: one JSON object per row, `{"key":K,"value":V}` for a kv
///   table and `{"value":V}` for a lines table. Strings are UTF-8 with
///   JSON's escapes where it must (`"`, `\`, control characters); a key or
///   value that is not valid UTF-8 is written as `key_b64`/`value_b64`
///   (base64) instead, so nothing is lost or altered.
/// - `csv`: RFC 4180 with a header `key,value` (kv) or `value` (lines);
///   fields holding a comma, quote, CR or LF are quoted, quotes doubled.
public enum TableExchange {
    public static let formats = ["lines", "kv", "jsonl", "csv"]

    /// Writes table `name` (at `ts`, now when nil) to `fd` in `format`;
    /// returns the rows written.
    public static func export(_ client: WeftClient, _ name: String, format: String, to fd: Int32, at ts: Timestamp? = nil) async throws -> Int {
        guard formats.contains(format) else {
            throw WeftError(.invalidArgument, "unknown export format \(format) (one of \(formats.joined(separator: ", ")))")
        }
        let at: Timestamp
        if let ts { at = ts } else { at = try await client.now() }
        guard let info = try await TableStore.info(client, name, at: at) else { throw WeftError(.notFound, "unknown table \(name)") }
        let kv = info.format != "lines"
        var out = OutputBuffer(fd: fd)
        var rows = 0
        func emit(_ line: UInt64, _ key: UnsafeRawBufferPointer?, _ value: UnsafeRawBufferPointer) throws {
            rows += 1
            try write(&out, format: format, kv: kv, row: rows, key: key, value: value)
        }
        switch format {
        case "jsonl": break
        case "csv": out.append(kv ? "key,value\r\n" : "value\r\n")
        default: break
        }
        if info.blocks {
            for g in 0..<info.blockCount {
                let (p, i) = info.block(g)
                let block = try await TableStore.readBlock(client, info, partition: p, index: i, at: at)
                try TableStore.forEachRow(block, what: "table \(name) partition \(p) block \(i)") { line, k, v in
                    try emit(line, kv ? k : nil, v)
                }
                try out.flush()
            }
        } else {
            // The per-row layout of older tables: read whole, in key order.
            for r in try await TableStore.scan(client, info, at: at, limit: Limits.scanLimitMax) {
                try r.key.withUnsafeBytes { k in try r.value.withUnsafeBytes { v in try emit(0, kv ? k : nil, v) } }
            }
        }
        try out.flush()
        return rows
    }

    static func write(_ out: inout OutputBuffer, format: String, kv: Bool, row: Int, key: UnsafeRawBufferPointer?, value: UnsafeRawBufferPointer) throws {
        switch format {
        case "lines":
            if value.contains(10) { throw WeftError(.invalidArgument, "row \(row) holds a newline, which the lines format cannot carry; export with --format jsonl or csv") }
            out.append(value)
            out.append(10)
        case "kv":
            let k = key ?? UnsafeRawBufferPointer(start: nil, count: 0)
            if k.contains(9) || k.contains(10) || value.contains(10) {
                throw WeftError(.invalidArgument, "row \(row) holds a TAB in its key or a newline, which the kv format cannot carry; export with --format jsonl or csv")
            }
            if key == nil { out.append(String(row)) } else { out.append(k) }
            out.append(9)
            out.append(value)
            out.append(10)
        case "jsonl":
            out.append(UInt8(ascii: "{"))
            if let key {
                jsonField(&out, "key", key)
                out.append(UInt8(ascii: ","))
            }
            jsonField(&out, "value", value)
            out.append("}\n")
        default: // csv
            if let key {
                csvField(&out, key)
                out.append(UInt8(ascii: ","))
            }
            csvField(&out, value)
            out.append("\r\n")
        }
    }

    /// `"name":"..."`, or `"name_b64":"..."` for bytes that are not UTF-8.
    static func jsonField(_ out: inout OutputBuffer, _ name: String, _ bytes: UnsafeRawBufferPointer) {
        if String(validating: bytes, as: UTF8.self) == nil {
            out.append("\"\(name)_b64\":\"")
            out.append(Data(bytes).base64EncodedString())
            out.append(UInt8(ascii: "\""))
            return
        }
        out.append("\"\(name)\":\"")
        let hex: [UInt8] = Array("0123456789abcdef".utf8)
        for c in bytes {
            switch c {
            case UInt8(ascii: "\""): out.append("\\\"")
            case UInt8(ascii: "\\"): out.append("\\\\")
            case 10: out.append("\\n")
            case 13: out.append("\\r")
            case 9: out.append("\\t")
            case 0..<32, 127:
                out.append("\\u00")
                out.append(hex[Int(c >> 4)])
                out.append(hex[Int(c & 15)])
            default: out.append(c)
            }
        }
        out.append(UInt8(ascii: "\""))
    }

    static func csvField(_ out: inout OutputBuffer, _ bytes: UnsafeRawBufferPointer) {
        // An empty field is quoted too: an empty line would read as no record.
        let quote = bytes.isEmpty || bytes.contains { $0 == 44 || $0 == 34 || $0 == 13 || $0 == 10 }
        if !quote { return out.append(bytes) }
        out.append(34)
        for c in bytes {
            if c == 34 { out.append(34) }
            out.append(c)
        }
        out.append(34)
    }

    // MARK: Reading

    /// The table format a jsonl or csv file loads as, from its first record:
    /// `kv` when it has keys, `lines` when it has only values.
    static func sniff(path: String, format: String) throws -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw WeftError(.invalidArgument, "cannot read \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var head = Bytes(repeating: 0, count: 1 << 16)
        let n = head.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n > 0 else { throw WeftError(.invalidArgument, "\(path) is empty: a \(format) file starts with \(format == "csv" ? "a header (key,value or value)" : "an object")") }
        let text = head[0..<n]
        if format == "csv" {
            let first = text.split(separator: 10, maxSplits: 1, omittingEmptySubsequences: false)[0]
            let header = String(decoding: first, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines).lowercased()
            switch header {
            case "key,value": return "kv"
            case "value": return "lines"
            default: throw WeftError(.invalidArgument, "\(path):1: a csv table starts with the header `key,value` or `value`, not `\(header.prefix(80))`")
            }
        }
        for line in text.split(separator: 10) where !line.allSatisfy({ $0 == 32 || $0 == 13 || $0 == 9 }) {
            // A first line longer than the peek is an object with a key if "key" comes first.
            let s = String(decoding: line, as: UTF8.self)
            if let o = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: Any] {
                return o["key"] != nil || o["key_b64"] != nil ? "kv" : "lines"
            }
            return s.contains("\"key\"") || s.contains("\"key_b64\"") ? "kv" : "lines"
        }
        throw WeftError(.invalidArgument, "\(path) holds no JSON object")
    }

    /// One jsonl line as (key, value); key is nil for a lines table.
    static func parseJSONLine(_ line: UnsafeRawBufferPointer, kv: Bool, where at: @autoclosure () -> String) throws -> (Bytes?, Bytes)? {
        if line.allSatisfy({ $0 == 32 || $0 == 13 || $0 == 9 }) { return nil }
        guard let o = (try? JSONSerialization.jsonObject(with: Data(line))) as? [String: Any] else {
            throw WeftError(.invalidArgument, "\(at()): not a JSON object; nothing was loaded")
        }
        func field(_ name: String) throws -> Bytes? {
            if let s = o[name] as? String { return Array(s.utf8) }
            if let s = o[name + "_b64"] as? String {
                guard let d = Data(base64Encoded: s) else { throw WeftError(.invalidArgument, "\(at()): \(name)_b64 is not base64; nothing was loaded") }
                return Array(d)
            }
            if o[name] != nil { throw WeftError(.invalidArgument, "\(at()): \(name) must be a string; nothing was loaded") }
            return nil
        }
        guard let value = try field("value") else { throw WeftError(.invalidArgument, "\(at()): no \"value\" string; nothing was loaded") }
        let key = try field("key")
        if kv && key == nil { throw WeftError(.invalidArgument, "\(at()): no \"key\" string (the first row had one); nothing was loaded") }
        if !kv && key != nil { throw WeftError(.invalidArgument, "\(at()): has a \"key\" but the first row had none; nothing was loaded") }
        return (key, value)
    }
}

/// RFC 4180 records from a byte stream fed in chunks; quoted fields may
/// span lines and chunks. Bounded: a record over `maxBytes` is an error.
struct CSVReader {
    var fields: [Bytes] = []
    var field = Bytes()
    var inQuotes = false
    var quoteSeen = false     // a quote inside quotes: end, or the first of ""
    var fieldStarted = false
    var recordBytes = 0
    var record = 0
    let maxBytes: Int

    init(maxBytes: Int) { self.maxBytes = maxBytes }

    var pendingCR = false

    mutating func feed(_ buf: UnsafeRawBufferPointer, _ emit: ([Bytes], Int) throws -> Void) throws {
        for c in buf {
            recordBytes += 1
            if recordBytes > maxBytes { throw WeftError(.invalidArgument, "record \(record + 1) is longer than \(maxBytes) bytes (Limits.tableRowBytesMax)") }
            if inQuotes {
                if quoteSeen {
                    quoteSeen = false
                    if c == 34 { field.append(34); continue }
                    inQuotes = false   // that was the closing quote; `c` is handled below
                } else if c == 34 {
                    quoteSeen = true
                    continue
                } else {
                    field.append(c)
                    continue
                }
            }
            if pendingCR {
                pendingCR = false
                if c != 10 { field.append(13) }
            }
            switch c {
            case 34 where field.isEmpty && !fieldStarted:
                inQuotes = true
                fieldStarted = true
            case 44:
                fields.append(field)
                field = []
                fieldStarted = false
            case 13:
                pendingCR = true
            case 10:
                fields.append(field)
                field = []
                fieldStarted = false
                record += 1
                let f = fields
                fields = []
                recordBytes = 0
                try emit(f, record)
            default:
                field.append(c)
            }
        }
    }

    mutating func finish(_ emit: ([Bytes], Int) throws -> Void) throws {
        if quoteSeen { inQuotes = false; quoteSeen = false }
        if inQuotes { throw WeftError(.invalidArgument, "record \(record + 1) ends inside a quoted field") }
        if pendingCR && (fieldStarted || !field.isEmpty || !fields.isEmpty) { pendingCR = false }
        if !field.isEmpty || !fields.isEmpty || fieldStarted {
            fields.append(field)
            record += 1
            try emit(fields, record)
            fields = []
            field = []
        }
    }
}

/// Bytes bound for a file descriptor, written 256 KiB at a time.
struct OutputBuffer {
    let fd: Int32
    var bytes = Bytes()

    init(fd: Int32) {
        self.fd = fd
        bytes.reserveCapacity(1 << 18)
    }

    mutating func append(_ b: UInt8) { bytes.append(b) }
    mutating func append(_ s: String) { bytes.append(contentsOf: s.utf8) }
    mutating func append(_ b: UnsafeRawBufferPointer) { bytes.append(contentsOf: b) }

    mutating func flush() throws {
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { Foundation.write(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw WeftError(errno == ENOSPC ? .storageFull : .storage, "writing the export: \(String(cString: strerror(errno)))")
            }
            off += n
        }
        bytes.removeAll(keepingCapacity: true)
    }
}
