import XCTest
import WeftSimulation

/// Runs the seeded 2PC simulation over many schedules. `Tools/WeftSim`
/// (`make sim`) runs thousands more in release mode.
final class SimulationTests: XCTestCase {
    func testManySeedsKeepInvariants() {
        let count = UInt64(ProcessInfo.processInfo.environment["WEFT_SIM_SEEDS"].flatMap(Int.init) ?? 200)
        var totals = 0
        for seed in 1...count {
            let r = Simulator(seed: seed).run()
            totals += r.committed
            XCTAssert(r.violations.isEmpty, r.description)
            if !r.violations.isEmpty { break }
        }
        // The workload must actually commit transfers, or the checks prove nothing.
        XCTAssertGreaterThan(totals, Int(count) * 3)
    }

    func testRunIsDeterministicForASeed() {
        let a = Simulator(seed: 42).run()
        let b = Simulator(seed: 42).run()
        XCTAssertEqual(a.description, b.description)
        XCTAssertGreaterThan(a.committed, 0)
    }
}
