import Foundation
import WeftSimulation
#if canImport(Glibc)
import Glibc
#endif

// Runs many seeds of the 2PC simulation. Usage:
//   weft-sim [--seeds N] [--first S]        (or WEFT_SIM_SEED=S for one seed, verbose)
var seeds: UInt64 = 2000
var first: UInt64 = 1
var args = CommandLine.arguments.dropFirst()
while let a = args.popFirst() {
    switch a {
    case "--seeds": seeds = UInt64(args.popFirst() ?? "") ?? seeds
    case "--first": first = UInt64(args.popFirst() ?? "") ?? first
    default:
        print("usage: weft-sim [--seeds N] [--first S]")
        exit(2)
    }
}
if let s = getenv("WEFT_SIM_SEED").flatMap({ UInt64(String(cString: $0)) }) {
    first = s
    seeds = 1
}
var failed = 0
var totals = (committed: 0, aborted: 0, unknown: 0, audits: 0, crashes: 0, peers: 0)
let start = clock_gettime_nsec_np_compat()
for seed in first..<(first + seeds) {
    let r = Simulator(seed: seed).run()
    totals.committed += r.committed
    totals.aborted += r.aborted
    totals.unknown += r.unknown
    totals.audits += r.audits
    totals.crashes += r.crashes
    totals.peers += r.peerResolutions
    if !r.violations.isEmpty || seeds == 1 {
        print(r)
    }
    if !r.violations.isEmpty { failed += 1 }
}
let secs = Double(clock_gettime_nsec_np_compat() - start) / 1e9
print("simulated \(seeds) seeds in \(String(format: "%.1f", secs)) s: committed \(totals.committed), aborted \(totals.aborted), unknown \(totals.unknown), audits \(totals.audits), crashes \(totals.crashes), resolved by peers \(totals.peers)")
print("\(Int(seeds) - failed) passed, \(failed) failed")
exit(failed == 0 ? 0 : 1)

func clock_gettime_nsec_np_compat() -> UInt64 {
    var t = timespec()
    clock_gettime(CLOCK_MONOTONIC, &t)
    return UInt64(t.tv_sec) * 1_000_000_000 + UInt64(t.tv_nsec)
}
