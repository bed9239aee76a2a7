import ArgumentParser
import Foundation
import WeftCore
import WeftRuntime

struct KV: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kv",
        abstract: "Single-key operations and snapshot scans.",
        subcommands: [Put.self, Get.self, Del.self, Scan.self]
    )

    struct Put: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "put", abstract: "Write one key (a one-participant transaction).")
        @OptionGroup var global: GlobalOptions
        @OptionGroup var enc: EncodingOptions
        @Argument(help: "Key (1...\(Limits.keyBytesMax) bytes).") var key: String
        @Argument(help: "Value (at most \(Limits.valueBytesMax) bytes).") var value: String?
        @Option(name: .customLong("value-file"), help: "Read the value's raw bytes from this file ('-' for stdin).") var valueFile: String?

        func validate() throws {
            if (value == nil) == (valueFile == nil) { throw ValidationError("give a VALUE argument or --value-file, not both or neither") }
        }

        func run() async throws {
            let g = global, e = enc
            let (k, v): (Bytes, Bytes)
            do {
                k = try e.key(key)
                if let path = valueFile {
                    let data = path == "-" ? FileHandle.standardInput.readDataToEndOfFile() : FileManager.default.contents(atPath: path)
                    guard let data else { throw WeftError(.notFound, "cannot read value file \(path)") }
                    v = Array(data)
                } else {
                    v = try e.value(value!)
                }
                try WeftError.checkKey(k)
                try WeftError.checkValue(v)
            } catch let err as WeftError { fail(err, json: g.json) }
            let ts = try await withCluster(g) { c in try await c.put(k, v) }
            print(g.json ? jsonLine(["ok": true, "committed_ts": ts]) : "ok (committed at ts=\(ts))")
        }
    }

    struct Get: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "get", abstract: "Read one key, now or at a snapshot timestamp.")
        @OptionGroup var global: GlobalOptions
        @OptionGroup var enc: EncodingOptions
        @Argument var key: String
        @Option(help: "Snapshot timestamp to read at (default: now).") var at: UInt64?

        func run() async throws {
            let g = global, e = enc
            let k: Bytes
            do {
                k = try e.key(key)
                try WeftError.checkKey(k)
            } catch let err as WeftError { fail(err, json: g.json) }
            let at = self.at
            let (value, version) = try await withCluster(g, reads: true) { c in try await c.get(k, at: at) }
            guard let value else {
                if g.json {
                    print(jsonLine(["key": e.show(key: k), "found": false]))
                    throw ExitCode(4)
                }
                fail(WeftError(.notFound, "key \(e.show(key: k)) not found"), json: false)
            }
            if g.json {
                print(jsonLine(["key": e.show(key: k), "found": true, "value": e.show(value: value), "value_hex": encodeHex(value), "version": version]))
            } else {
                print(e.show(value: value))
            }
        }
    }

    struct Del: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "del", abstract: "Delete one key.")
        @OptionGroup var global: GlobalOptions
        @OptionGroup var enc: EncodingOptions
        @Argument var key: String

        func run() async throws {
            let g = global, e = enc
            let k: Bytes
            do {
                k = try e.key(key)
                try WeftError.checkKey(k)
            } catch let err as WeftError { fail(err, json: g.json) }
            let ts = try await withCluster(g) { c in try await c.delete(k) }
            print(g.json ? jsonLine(["ok": true, "committed_ts": ts]) : "ok (deleted at ts=\(ts))")
        }
    }

    struct Scan: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "scan", abstract: "List keys in order at one snapshot.")
        @OptionGroup var global: GlobalOptions
        @OptionGroup var enc: EncodingOptions
        @Option(help: "Only keys starting with this prefix.") var prefix: String = ""
        @Option(help: "At most this many keys (max \(Limits.scanLimitMax)).") var limit: Int = 100
        @Option(help: "Snapshot timestamp (default: now).") var at: UInt64?

        func validate() throws {
            if limit < 0 || limit > Limits.scanLimitMax { throw ValidationError("--limit must be 0...\(Limits.scanLimitMax)") }
        }

        func run() async throws {
            let g = global, e = enc
            let p: Bytes
            do { p = try e.key(prefix) } catch let err as WeftError { fail(err, json: g.json) }
            let (limit, at) = (self.limit, self.at)
            let (rows, ts) = try await withCluster(g, reads: true) { c in try await c.scan(prefix: p, limit: limit, at: at) }
            for r in rows {
                if g.json {
                    print(jsonLine(["key": e.show(key: r.key), "value": e.show(value: r.value), "version": r.version]))
                } else {
                    print("\(e.show(key: r.key))\t\(e.show(value: r.value))")
                }
            }
            if !g.json { printErr("(\(rows.count) keys at ts=\(ts))") }
        }
    }
}
