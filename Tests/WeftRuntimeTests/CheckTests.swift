import Foundation
import XCTest

/// `weft check bank` as a user runs it: it passes on the real build under
/// at least ten kills, and it reports violations against builds broken on
/// purpose (`WEFT_FAULT`), so its checks can fail.
final class CheckTests: XCTestCase {
    func report(_ r: RunResult) -> [String: Any] {
        let last = r.stdout.split(separator: "\n").last.map(String.init) ?? ""
        return (try? JSONSerialization.jsonObject(with: Data(last.utf8)) as? [String: Any]) ?? [:]
    }

    func testBankPassesUnderKillsOnTheRealBuild() throws {
        let history = NSTemporaryDirectory() + "weft-check-history-\(getpid()).jsonl"
        defer { try? FileManager.default.removeItem(atPath: history) }
        let r = try runWeft(["check", "bank", "--duration", "15s", "--kill-every", "200ms", "--seed", "42", "--json", "--history", history])
        let o = report(r)
        XCTAssertEqual(r.status, 0, "\(r.stdout) \(r.stderr)")
        XCTAssertEqual(o["ok"] as? Bool, true, "\(o["violations"] ?? "")")
        let kills = (o["kills"] as? [String: Int] ?? [:]).values.reduce(0, +)
        XCTAssertGreaterThanOrEqual(kills, 10, "\(o)")
        XCTAssertGreaterThan(o["commits"] as? Int ?? 0, 20)
        XCTAssertGreaterThan(o["snapshots_checked"] as? Int ?? 0, 0)
        XCTAssertEqual(o["seed"] as? Int, 42)
        XCTAssertEqual(o["history"] as? String, history)
        try checkHistory(history, commits: o["commits"] as? Int ?? -1, kills: kills)
    }

    /// The history file: JSON lines in time order; every completion follows
    /// its process's invoke of the same transaction; a process ends in doubt
    /// at most once (then it is retired); the kills are there as nemesis events.
    func checkHistory(_ path: String, commits: Int, kills: Int) throws {
        let lines = try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n")
        var open: [Int: UInt64] = [:]
        var retired: Set<Int> = []
        var (oks, nemesisKills, lastTime) = (0, 0, UInt64(0))
        for line in lines {
            let o = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], String(line))
            let type = o["type"] as? String ?? ""
            let time = (o["time"] as? NSNumber)?.uint64Value ?? 0
            XCTAssertGreaterThanOrEqual(time, lastTime, "history out of time order at \(line)")
            lastTime = time
            if o["process"] as? String == "nemesis" {
                if o["f"] as? String == "kill" { nemesisKills += 1 }
                continue
            }
            if type == "resolution" { continue }
            let process = try XCTUnwrap(o["process"] as? Int, String(line))
            XCTAssertFalse(retired.contains(process), "process \(process) acted after an info: \(line)")
            let txn = (o["txn"] as? NSNumber)?.uint64Value ?? 0
            let value = try XCTUnwrap(o["value"] as? [[Any]], String(line))
            XCTAssertEqual(value.count, 5, String(line))
            switch type {
            case "invoke":
                XCTAssertNil(open[process], "process \(process) invoked twice without completing")
                open[process] = txn
            case "ok", "fail", "info":
                XCTAssertEqual(open.removeValue(forKey: process), txn, "\(type) without its invoke: \(line)")
                if type == "ok" {
                    oks += 1
                    XCTAssertNotNil(o["commit_ts"], String(line))
                    XCTAssertFalse(value.contains { $0[2] is NSNull }, "an ok names every value it read and wrote: \(line)")
                }
                if type == "info" { retired.insert(process) }
            default:
                XCTFail("unknown event type: \(line)")
            }
        }
        XCTAssertEqual(oks, commits, "every acknowledged transfer is an ok in the history")
        XCTAssertEqual(nemesisKills, kills, "every kill is in the history")
    }

    /// Every 2PC crash point in turn on the real build: each reached, each
    /// checked, all pass.
    func testCrashPointsPassOnTheRealBuild() throws {
        let r = try runWeft(["check", "crash-points", "--json"])
        let lines = r.stdout.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        XCTAssertEqual(r.status, 0, "\(r.stdout) \(r.stderr)")
        let points = lines.filter { $0["point"] != nil }
        XCTAssertEqual(points.compactMap { $0["point"] as? String }, ["participant.before-prepare-forced", "participant.after-prepare-forced",
            "participant.before-commit-forced", "participant.after-commit-forced", "participant.before-abort-forced", "participant.after-abort-forced",
            "participant.before-refusal-forced", "participant.after-refusal-forced", "participant.before-gc-forced", "participant.after-gc-forced",
            "coordinator.before-decision-forced", "coordinator.after-decision-forced", "coordinator.before-end-forced", "coordinator.after-end-forced",
            "coordinator.before-reserve-forced", "coordinator.after-reserve-forced"])
        for p in points {
            XCTAssertEqual(p["reached"] as? Bool, true, "\(p)")
            XCTAssertEqual(p["ok"] as? Bool, true, "\(p)")
            XCTAssertGreaterThanOrEqual((p["checked"] as? [String] ?? []).count, 2, "\(p)")
        }
        // The abort and refusal points are reached by the transactions built for them.
        for p in points where (p["point"] as? String ?? "").contains("-abort-") || (p["point"] as? String ?? "").contains("-refusal-") {
            XCTAssertNotEqual(p["outcome"] as? String, "ack", "\(p)")
        }
        XCTAssertEqual(lines.last?["ok"] as? Bool, true)
    }

    /// A participant that forgets its PREPARED records on restart commits
    /// a transaction on the other participants only: caught.
    func testCrashPointsCatchForgottenPreparedRecords() throws {
        let r = try runWeft(["check", "crash-points", "--points", "participant.before-commit-forced", "--json"], env: ["WEFT_FAULT": "forget-prepared"])
        XCTAssertEqual(r.status, 1, "\(r.stdout) \(r.stderr)")
        let first = r.stdout.split(separator: "\n").first.flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] } ?? [:]
        XCTAssertEqual(first["ok"] as? Bool, false, r.stdout)
        XCTAssertTrue((first["violations"] as? [String] ?? []).contains { $0.contains("partially applied") || $0.contains("acknowledged") }, r.stdout)
        let summary = r.stdout.split(separator: "\n").last.flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] } ?? [:]
        if let dir = summary["kept_dir"] as? String { try? FileManager.default.removeItem(atPath: dir) }
    }

    func testBankCatchesDeliberatelyBrokenBuilds() throws {
        for fault in ["lose-commits", "forget-prepared"] {
            let r = try runWeft(["check", "bank", "--duration", "10s", "--kill", "participant", "--kill-every", "300ms",
                                 "--accounts", "20", "--clients", "8", "--seed", "5", "--json"], env: ["WEFT_FAULT": fault])
            let o = report(r)
            XCTAssertEqual(r.status, 1, "\(fault): \(r.stdout) \(r.stderr)")
            XCTAssertEqual(o["ok"] as? Bool, false, fault)
            XCTAssertFalse((o["violations"] as? [String] ?? []).isEmpty, fault)
        }
    }
}
