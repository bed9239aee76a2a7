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
        let r = try runWeft(["check", "bank", "--duration", "15s", "--kill-every", "200ms", "--seed", "42", "--json"])
        let o = report(r)
        XCTAssertEqual(r.status, 0, "\(r.stdout) \(r.stderr)")
        XCTAssertEqual(o["ok"] as? Bool, true, "\(o["violations"] ?? "")")
        let kills = (o["kills"] as? [String: Int] ?? [:]).values.reduce(0, +)
        XCTAssertGreaterThanOrEqual(kills, 10, "\(o)")
        XCTAssertGreaterThan(o["commits"] as? Int ?? 0, 20)
        XCTAssertGreaterThan(o["snapshots_checked"] as? Int ?? 0, 0)
        XCTAssertEqual(o["seed"] as? Int, 42)
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
