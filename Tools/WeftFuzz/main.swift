import CFuzzDriver
import Foundation
import NIOCore
import WeftCore
import WeftDataflow
import WeftProtocol
import WeftRuntime

// libFuzzer targets for everything that decodes bytes from outside:
//   wire     a node's inbound frames (the length-prefixed stream, as
//            FrameDecoder cuts it, then Frame.decode and the envelope codec)
//   records  PREPARED, commit and decision records, and commit replay
//   block    table blocks: the checksum check, and the row decoder behind
//            it (the input is resealed, so the fuzzer reaches the rows)
//   resp     the Redis request parser, fed in random-sized pieces
// Built by `make fuzz` (instrumented, libFuzzer linked); run as
//   WEFT_FUZZ_TARGET=resp .build/fuzz/release/weft-fuzz [libFuzzer options]
// Any crash, trap or sanitizer report is a bug; an error thrown is the
// expected answer to bad input.

func fuzzWire(_ data: UnsafeRawBufferPointer) {
    var i = 0
    while i + 4 <= data.count {
        let n = Int(data.loadUnaligned(fromByteOffset: i, as: UInt32.self).littleEndian)
        guard n <= Limits.frameBytesMax, i + 4 + n <= data.count else { return }
        let body = UnsafeRawBufferPointer(rebasing: data[(i + 4)..<(i + 4 + n)])
        if let frame = try? Frame.decode(body: body) {
            // Whatever decodes re-encodes to a frame that decodes the same.
            let again = frame.encoded()
            let back = again.withUnsafeBytes { try? Frame.decode(body: UnsafeRawBufferPointer(rebasing: $0[4...])) }
            precondition(back == frame, "frame does not round-trip: \(frame)")
            if case .envelope(let env) = frame { _ = Authorization.refusal(env) }
        }
        i += 4 + n
    }
}

func fuzzRecords(_ data: UnsafeRawBufferPointer) {
    let bytes = Array(data)
    _ = try? PreparedTxn.decode(bytes)
    _ = try? Decision.decode(bytes)
    // Replay reads the same format; a machine (its store) is made only for
    // records that decode, which keeps the target fast.
    guard let rec = try? CommitRecord.decode(data) else { return }
    var m = ParticipantMachine(id: 0, recovery: ParticipantRecovery(), readFloor: 0, nowMillis: 0)
    m.beginReplay()
    let replayed = (try? m.replayCommit(1, encoded: data)) != nil
    m.endReplay()
    // Replay refuses exactly the records that write a key twice.
    precondition(replayed == (Set(rec.writes.map { ByteKey($0.key) }).count == rec.writes.count), "replay and decode disagree")
}

func fuzzBlock(_ data: UnsafeRawBufferPointer) {
    let raw = Array(data)
    _ = try? TableStore.forEachRow(raw, what: "fuzz") { _, _, _ in }
    // Resealed: a valid header and checksum over the input, so the row
    // decoder itself is what is fuzzed.
    guard let kind = data.first else { return }
    let body = Array(data.dropFirst())
    var sealed = Array("WBLK".utf8) + [Blocks.version, kind % 4]
    let sum = body.withUnsafeBytes { blockChecksum($0) }
    withUnsafeBytes(of: sum.littleEndian) { sealed += $0 }
    sealed += body
    var rows = 0
    _ = try? TableStore.forEachRow(sealed, what: "fuzz") { _, k, v in
        rows += 1
        precondition(v.count <= body.count && (k?.count ?? 0) <= body.count)
    }
}

func fuzzRESP(_ data: UnsafeRawBufferPointer) {
    var parser = RESPRequestParser()
    var buffer = ByteBufferAllocator().buffer(capacity: data.count)
    // Pieces of sizes taken from the input itself, as TCP might deliver them.
    var i = 0
    var step = 1
    while i < data.count {
        let n = min(data.count - i, step)
        buffer.writeBytes(UnsafeRawBufferPointer(rebasing: data[i..<(i + n)]))
        i += n
        step = Int(data[i - 1] % 64) + 1
        do {
            while let args = try parser.next(&buffer) {
                precondition(args.count <= Limits.respArgumentsMax)
            }
        } catch {
            return  // a protocol error closes the connection
        }
    }
}

/// Valid inputs for each target, made with the real encoders, so the
/// fuzzer starts from the formats' shapes (`weft-fuzz --write-seeds DIR`;
/// the result is committed under Tools/WeftFuzz/seeds).
func writeSeeds(_ dir: String) throws {
    func put(_ target: String, _ name: String, _ bytes: Bytes) throws {
        try FileManager.default.createDirectory(atPath: dir + "/" + target, withIntermediateDirectories: true)
        try Data(bytes).write(to: URL(fileURLWithPath: dir + "/" + target + "/" + name))
    }
    let writes = [WriteOp(key: Array("balance".utf8), value: Array("100".utf8)), WriteOp(key: [0, 1, 2], value: nil)]
    let part = TxnPart(reads: [Array("r".utf8)], writes: writes)
    let frames: [(String, Frame)] = [
        ("hello", .hello(nonce: Array(repeating: 7, count: 32))), ("challenge", .challenge(nonce: Array(repeating: 9, count: 32))),
        ("auth", .auth(sender: .participant(2), proof: Array(repeating: 1, count: 32))), ("welcome", .welcome(sender: .coordinator, proof: Array(repeating: 2, count: 32))),
        ("ping", .ping(req: 5)), ("pong", .pong(req: 5, info: "{\"state\":\"serving\"}")), ("error", .error("authentication failed")),
        ("call", .call(req: 1, method: "job.run", body: Array("{\"job\":\"wordcount\"}".utf8))), ("reply", .reply(req: 1, ok: true, body: Array("{}".utf8))),
        ("prepare", .envelope(Envelope(from: .coordinator, to: .participant(1), .prepare(txn: 9, startTs: 9, commitTs: 12, participants: [0, 1], part: part)))),
        ("commit", .envelope(Envelope(from: .client(77), to: .coordinator, .commit(req: 3, txn: 9, startTs: 9, parts: [0: part, 1: part])))),
        ("scan", .envelope(Envelope(from: .participant(0), to: .client(77), .scanResult(req: 4, rows: [ScanRow(key: [1], value: [2], version: 3)], more: true)))),
        ("vote", .envelope(Envelope(from: .participant(1), to: .coordinator, .vote(txn: 9, from: 1, vote: .no(WeftError(.conflict, "write-write")))))),
    ]
    var stream: Bytes = []
    for (name, f) in frames {
        try put("wire", name, f.encoded())
        stream += f.encoded()
    }
    try put("wire", "stream", stream)
    try put("records", "prepared", PreparedTxn(txn: 5, startTs: 5, commitTs: 9, participants: [0, 1], writes: writes, preparedAtMillis: 7).encoded())
    try put("records", "commit", CommitRecord(txn: 3, writes: writes).encoded())
    try put("records", "decision", Decision(txn: 1, commitTs: 2, participants: [1, 2]).encoded())
    var lines = Blocks.Builder(kind: .lines, firstLine: 0)
    for l in ["to be or not to be", "", "that is the question"] { Array(l.utf8).withUnsafeBytes { lines.appendLine($0) } }
    try put("block", "lines", lines.seal())
    var kv = Blocks.Builder(kind: .kv, firstLine: 0)
    kv.appendRow(Array("k1".utf8), Array("v1".utf8))
    kv.appendRow(Array("k2".utf8), [])
    try put("block", "kv", kv.seal())
    try put("resp", "set", Array("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nvalue\r\n".utf8))
    try put("resp", "pipeline", Array("PING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\nMULTI\r\nINCR n\r\nEXEC\r\n".utf8))
    try put("resp", "inline", Array("SET \"a b\" 'c\\nd'\r\n".utf8))
    try put("resp", "empty-bulk", Array("*2\r\n$4\r\nECHO\r\n$0\r\n\r\n".utf8))
}

if CommandLine.arguments.count == 3 && CommandLine.arguments[1] == "--write-seeds" {
    do { try writeSeeds(CommandLine.arguments[2]) } catch {
        FileHandle.standardError.write(Data("cannot write seeds: \(error)\n".utf8))
        exit(1)
    }
    exit(0)
}

let target = ProcessInfo.processInfo.environment["WEFT_FUZZ_TARGET"] ?? ""
let one: weft_fuzz_one
switch target {
case "wire": one = { p, n in fuzzWire(UnsafeRawBufferPointer(start: p, count: n)); return 0 }
case "records": one = { p, n in fuzzRecords(UnsafeRawBufferPointer(start: p, count: n)); return 0 }
case "block": one = { p, n in fuzzBlock(UnsafeRawBufferPointer(start: p, count: n)); return 0 }
case "resp": one = { p, n in fuzzRESP(UnsafeRawBufferPointer(start: p, count: n)); return 0 }
default:
    FileHandle.standardError.write(Data("set WEFT_FUZZ_TARGET to wire, records, block or resp\n".utf8))
    exit(2)
}
guard weft_fuzzer_linked() != 0 else {
    FileHandle.standardError.write(Data("weft-fuzz was built without libFuzzer; build it with `make fuzz`\n".utf8))
    exit(2)
}
var argc = CommandLine.argc
var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
exit(weft_run_fuzzer(&argc, &argv, one))
