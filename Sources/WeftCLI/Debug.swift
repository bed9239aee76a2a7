import ArgumentParser
import Foundation
import WeftCore
import WeftRuntime

/// Test workloads used by the crash-recovery tests (hidden from help).
struct Debug: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "debug",
        abstract: "Test workloads for crash-recovery tests.",
        shouldDisplay: false,
        subcommands: [Bank.self, BankCheck.self]
    )

    static func account(_ i: Int) -> Bytes { Array("acct/\(String(format: "%04d", i))".utf8) }

    /// Concurrent transfers; prints `attempt TXN` as each begins, `ack TXN
    /// COMMIT_TS` for every transfer acknowledged as committed, `abort TXN`
    /// for a definite abort and `unknown TXN` for an unknown outcome. `--kill-after N` SIGKILLs the process after
    /// the N-th acknowledgement, with other transfers in flight.
    struct Bank: AsyncParsableCommand {
        @OptionGroup var global: GlobalOptions
        @Option var accounts = 20
        @Option var clients = 8
        @Option var transfers = 200
        @Option(name: .customLong("kill-after")) var killAfter: Int?
        @Option var balance = 1000
        @Option(help: "Run for this many seconds instead of a fixed number of transfers.") var duration: Double?
        @Flag(help: "Keep going through node failures (for random-kill tests).") var resilient = false

        func run() async throws {
            let (accounts, clients, transfers, killAfter, balance) = (self.accounts, self.clients, self.transfers, self.killAfter, self.balance)
            let (durationSeconds, resilient) = (duration, self.resilient)
            try await withCluster(global) { client in
                var ready = false
                for attempt in 0..<50 where !ready {
                    do {
                        ready = try await client.get(Debug.account(0)).value != nil
                        break
                    } catch let e as WeftError where resilient && attempt < 49 {
                        _ = e
                        try await Task.sleep(nanoseconds: 100_000_000)
                    }
                }
                if !ready {
                    let t = try await client.begin()
                    for i in 0..<accounts { try t.put(Debug.account(i), Array(String(balance).utf8)) }
                    try await t.commit()
                }
                let acks = Counter()
                let deadline = durationSeconds.map { wallMillis() + UInt64($0 * 1000) }
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for c in 0..<clients {
                        group.addTask {
                            var rng = SystemRandomNumberGenerator()
                            var done = 0
                            while done < transfers / clients || (deadline.map { wallMillis() < $0 } ?? false) {
                                if let d = deadline, wallMillis() >= d { break }
                                done += 1
                                let a = Int.random(in: 0..<accounts, using: &rng)
                                var b = Int.random(in: 0..<(accounts - 1), using: &rng)
                                if b >= a { b += 1 }
                                var txnId: TxnId = 0
                                do {
                                    let t = try await client.begin()
                                    txnId = t.id
                                    FileHandle.standardOutput.write(Data("attempt \(t.id)\n".utf8))
                                    let va = Int(String(decoding: try await t.get(Debug.account(a)) ?? [], as: UTF8.self)) ?? 0
                                    let vb = Int(String(decoding: try await t.get(Debug.account(b)) ?? [], as: UTF8.self)) ?? 0
                                    let amount = Int.random(in: 1...10, using: &rng)
                                    try t.put(Debug.account(a), Array(String(va - amount).utf8))
                                    try t.put(Debug.account(b), Array(String(vb + amount).utf8))
                                    try t.put(Array("log/\(t.id)".utf8), Array("\(a) \(b) \(amount) client-\(c)".utf8))
                                    let ts = try await t.commit()
                                    FileHandle.standardOutput.write(Data("ack \(t.id) \(ts)\n".utf8))
                                    if let k = killAfter, acks.increment() >= k { kill(getpid(), SIGKILL) }
                                } catch let e as WeftError where e.code == .conflict || e.code == .aborted {
                                    // A definite abort: it must never be applied.
                                    if txnId != 0 { FileHandle.standardOutput.write(Data("abort \(txnId)\n".utf8)) }
                                    continue
                                } catch let e as WeftError where resilient && e.code == .outcomeUnknown {
                                    FileHandle.standardOutput.write(Data("unknown \(txnId)\n".utf8))
                                } catch let e as WeftError where resilient {
                                    // A node is down: back off and go on (the transfer did not commit
                                    // unless the error says the outcome is unknown).
                                    if txnId != 0 && e.code == .timeout { FileHandle.standardOutput.write(Data("unknown \(txnId)\n".utf8)) }
                                    try await Task.sleep(nanoseconds: 50_000_000)
                                }
                            }
                        }
                    }
                    try await group.waitForAll()
                }
            }
        }
    }

    /// Prints `total N`, `accounts N` and `log TXN` for every transfer log key.
    struct BankCheck: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "bank-check")
        @OptionGroup var global: GlobalOptions

        func run() async throws {
            try await withCluster(global) { client in
                let (rows, _) = try await client.scan(prefix: Array("acct/".utf8), limit: Limits.scanLimitMax)
                let total = rows.reduce(0) { $0 + (Int(String(decoding: $1.value, as: UTF8.self)) ?? 0) }
                print("accounts \(rows.count)")
                print("total \(total)")
                let (logs, _) = try await client.scan(prefix: Array("log/".utf8), limit: Limits.scanLimitMax)
                for l in logs { print("log \(String(decoding: l.key.dropFirst(4), as: UTF8.self))") }
            }
        }
    }
}

final class Counter: @unchecked Sendable {
    let lock = NSLock()
    var n = 0
    func increment() -> Int { lock.withLock { n += 1; return n } }
}
