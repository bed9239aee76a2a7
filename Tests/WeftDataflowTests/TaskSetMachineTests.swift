import XCTest
@testable import WeftDataflow

/// The stage scheduler as a pure machine: scripted cases, then a seeded
/// simulation of executors that fail, vanish, come back and straggle.
final class TaskSetMachineTests: XCTestCase {
    func launches(_ actions: [TaskSetMachine.Action]) -> [(task: Int, attempt: Int, executor: Int, speculative: Bool, local: Bool)] {
        actions.compactMap {
            if case let .launch(t, a, e, s, l) = $0 { return (t, a, e, s, l) }
            return nil
        }
    }

    func config(slots: Int = 2) -> TaskSetMachine.Config {
        var c = TaskSetMachine.Config()
        c.slotsPerExecutor = slots
        return c
    }

    func testTasksRunWhereTheirDataIs() {
        var m = TaskSetMachine(preferred: [0, 1, 2, 0, 1, 2], executors: [0, 1, 2], nowMillis: 0, config: config())
        let l = launches(m.start())
        XCTAssertEqual(l.count, 6)
        for x in l { XCTAssertEqual(x.executor, [0, 1, 2, 0, 1, 2][x.task]); XCTAssertTrue(x.local) }
        XCTAssertEqual(m.nodeLocalLaunches, 6)
    }

    func testTasksWithoutPreferenceSpreadOverExecutors() {
        var m = TaskSetMachine(preferred: [nil, nil, nil], executors: [0, 1, 2], nowMillis: 0, config: config())
        XCTAssertEqual(Set(launches(m.start()).map(\.executor)), [0, 1, 2])
    }

    func testLocalityWaitThenAnywhere() {
        var m = TaskSetMachine(preferred: [0, 0, 0], executors: [0, 1], nowMillis: 0, config: config(slots: 1))
        let first = launches(m.start())
        XCTAssertEqual(first.map(\.executor), [0], "executor 1 waits: every task prefers 0")
        XCTAssertTrue(launches(m.on(.tick(nowMillis: 100))).isEmpty)
        let later = launches(m.on(.tick(nowMillis: 301)))
        XCTAssertEqual(later.map(\.executor), [1], "past the locality wait a task runs anywhere")
        XCTAssertFalse(later[0].local)
    }

    func testPreferredExecutorGoneMeansAnywhereAtOnce() {
        var m = TaskSetMachine(preferred: [5, 5], executors: [0, 1], nowMillis: 0, config: config(slots: 1))
        XCTAssertEqual(launches(m.start()).count, 2)
    }

    func testLostExecutorsTasksRunElsewhereWithoutCountingAFailure() {
        var m = TaskSetMachine(preferred: [1, 1], executors: [0, 1], nowMillis: 0, config: config())
        XCTAssertEqual(launches(m.start()).map(\.executor), [1, 1])
        let again = launches(m.on(.executorLost(1)))
        XCTAssertEqual(again.map(\.executor), [0, 0])
        XCTAssertEqual(again.map(\.attempt), [1, 1])
        XCTAssertEqual(m.failures, [0, 0])
        // The dead executor's late answers are ignored.
        XCTAssertTrue(m.on(.taskFinished(task: 0, attempt: 0)).isEmpty)
        XCTAssertFalse(m.isTaskDone(0))
        // Once won, the attempts left on the lost executor are killed (it
        // may only have been paused).
        XCTAssertEqual(m.on(.taskFinished(task: 0, attempt: 1)), [.kill(task: 0, attempt: 0, executor: 1)])
        XCTAssertEqual(m.on(.taskFinished(task: 1, attempt: 1)), [.kill(task: 1, attempt: 0, executor: 1), .finished])
    }

    func testRetriesThenFailsTheStage() {
        var m = TaskSetMachine(preferred: [nil], executors: [0], nowMillis: 0, config: config())
        var attempt = launches(m.start())[0].attempt
        for i in 1...3 {
            let next = launches(m.on(.taskFailed(task: 0, attempt: attempt, reason: "boom \(i)")))
            XCTAssertEqual(next.count, 1)
            attempt = next[0].attempt
        }
        let last = m.on(.taskFailed(task: 0, attempt: attempt, reason: "boom 4"))
        guard case .failed(let why)? = last.first else { return XCTFail("\(last)") }
        XCTAssertTrue(why.contains("failed 4 times") && why.contains("boom 4"), why)
        XCTAssertTrue(m.isOver)
    }

    func testStragglerGetsASpeculativeCopyAndTheFirstToFinishWins() {
        var m = TaskSetMachine(preferred: [0, 1, 2, 2], executors: [0, 1, 2], nowMillis: 0, config: config())
        XCTAssertEqual(launches(m.start()).count, 4)
        for t in 0..<3 { _ = m.on(.tick(nowMillis: 100)); _ = m.on(.taskFinished(task: t, attempt: 0)) }
        XCTAssertTrue(launches(m.on(.tick(nowMillis: 180))).isEmpty, "not yet past the minimum (200 ms) nor 1.5 x the median")
        let copy = launches(m.on(.tick(nowMillis: 250)))
        XCTAssertEqual(copy.count, 1)
        XCTAssertEqual(copy[0].task, 3)
        XCTAssertTrue(copy[0].speculative)
        XCTAssertNotEqual(copy[0].executor, 2, "a copy runs on another executor")
        // The copy wins: the straggler is killed, and the stage is done.
        XCTAssertEqual(m.on(.taskFinished(task: 3, attempt: copy[0].attempt)), [.kill(task: 3, attempt: 0, executor: 2), .finished])
        XCTAssertEqual(m.speculativeLaunches, 1)
        XCTAssertEqual(m.killLaunches, 1)
        XCTAssertTrue(m.on(.taskFailed(task: 3, attempt: 0, reason: "killed")).isEmpty, "the killed attempt's answer changes nothing")
    }

    /// The original finishes before its copy: the copy is the one killed.
    func testTheOriginalWinningKillsItsCopy() {
        var m = TaskSetMachine(preferred: [nil, nil, nil, nil], executors: [0, 1], nowMillis: 0, config: config())
        XCTAssertEqual(launches(m.start()).map(\.executor), [0, 1, 0, 1])
        _ = m.on(.tick(nowMillis: 100))
        for t in 1...3 { XCTAssertFalse(m.on(.taskFinished(task: t, attempt: 0)).contains(.finished)) }
        let copy = launches(m.on(.tick(nowMillis: 250)))
        XCTAssertEqual(copy.map(\.task), [0])
        XCTAssertEqual(copy[0].executor, 1)
        XCTAssertEqual(m.on(.taskFinished(task: 0, attempt: 0)), [.kill(task: 0, attempt: copy[0].attempt, executor: 1), .finished])
    }

    func testEveryExecutorLostFailsNamingThemWhenNoneComesBack() {
        var m = TaskSetMachine(preferred: [nil, nil], executors: [0, 1], nowMillis: 0, config: config())
        _ = m.start()
        _ = m.on(.executorLost(0))
        XCTAssertEqual(m.on(.executorLost(1)), [], "it waits for an executor to come back")
        XCTAssertEqual(m.on(.tick(nowMillis: 9_999)), [])
        let out = m.on(.tick(nowMillis: 10_000))
        guard case .failed(let why)? = out.first else { return XCTFail("\(out)") }
        XCTAssertTrue(why.contains("0, 1") && why.contains("allLostWaitMillis"), why)
    }

    func testAnExecutorComingBackAfterAllWereLostRunsTheTasks() {
        var m = TaskSetMachine(preferred: [nil, nil], executors: [0, 1], nowMillis: 0, config: config())
        _ = m.start()
        _ = m.on(.executorLost(0))
        _ = m.on(.executorLost(1))
        let again = launches(m.on(.executorAdded(1)))
        XCTAssertEqual(Set(again.map(\.task)), [0, 1], "both tasks run again on the returned executor")
        XCTAssertTrue(again.allSatisfy { $0.executor == 1 })
        XCTAssertEqual(m.on(.taskFinished(task: 0, attempt: again[0].attempt)).filter { $0 == .finished }, [])
        // Executor 1's first attempt of task 1 may still run there: killed.
        XCTAssertEqual(m.on(.taskFinished(task: 1, attempt: again[1].attempt)), [.kill(task: 1, attempt: 0, executor: 1), .finished])
    }

    func testEveryExecutorLostTooOftenFails() {
        var m = TaskSetMachine(preferred: [nil], executors: [0], nowMillis: 0, config: config())
        _ = m.start()
        for i in 1...2 {
            XCTAssertEqual(m.on(.executorLost(0)), [], "loss \(i) of 3")
            _ = m.on(.executorAdded(0))
        }
        let out = m.on(.executorLost(0))
        guard case .failed(let why)? = out.first else { return XCTFail("\(out)") }
        XCTAssertTrue(why.contains("3 times") && why.contains("allLostTimesMax"), why)
    }

    func testFetchFailureAbortsTheStage() {
        var m = TaskSetMachine(preferred: [nil], executors: [0], nowMillis: 0, config: config())
        let a = launches(m.start())[0]
        XCTAssertEqual(m.on(.fetchFailed(task: 0, attempt: a.attempt, shuffle: 3, map: 1, executor: 2)),
                       [.abortForFetchFailure(shuffle: 3, map: 1, executor: 2)])
        XCTAssertTrue(m.isOver)
    }

    /// Random stages on executors that fail tasks, die, come back and
    /// straggle. Invariants: a task runs only on a live executor, never
    /// two attempts of it on one executor, never more tasks on an executor
    /// than its slots; `finished` comes exactly when every task has a
    /// winning attempt; a stage fails only for a reason the machine names.
    func testSeededSimulation() {
        for seed in 1...400 {
            var rng = SplitMix(seed: UInt64(seed))
            let tasks = 1 + Int(rng.next() % 20)
            let execs = 1 + Int(rng.next() % 4)
            var cfg = config(slots: 1 + Int(rng.next() % 3))
            cfg.localityWaitMillis = rng.next() % 200
            let preferred = (0..<tasks).map { _ in rng.next() % 3 == 0 ? nil : Int(rng.next() % UInt64(execs + 1)) }
            var live = Set(0..<execs)
            var m = TaskSetMachine(preferred: preferred, executors: live, nowMillis: 0, config: cfg)
            // attempt id → (task, executor, finishes at, fails)
            var running: [Int: [Int: (executor: Int, end: UInt64, fails: Bool)]] = [:]
            var now: UInt64 = 0
            var winners: [Int: Int] = [:]
            var outcome: TaskSetMachine.Action?
            func apply(_ actions: [TaskSetMachine.Action]) {
                for a in actions {
                    switch a {
                    case let .launch(t, attempt, e, _, _):
                        XCTAssertTrue(live.contains(e), "seed \(seed): launch on dead executor \(e)")
                        XCTAssertFalse(running[t, default: [:]].values.contains { $0.executor == e }, "seed \(seed): two attempts of \(t) on \(e)")
                        let straggle = rng.next() % 10 == 0 ? 2000 : 0
                        running[t, default: [:]][attempt] = (e, now + 10 + rng.next() % 100 + UInt64(straggle), rng.next() % 12 == 0)
                        let busy = running.values.flatMap(\.values).filter { $0.executor == e }.count
                        XCTAssertLessThanOrEqual(busy, cfg.slotsPerExecutor, "seed \(seed): executor \(e) over its slots")
                    case let .kill(t, attempt, e):
                        XCTAssertNotNil(winners[t], "seed \(seed): a kill for task \(t), which has no winner")
                        XCTAssertNotEqual(winners[t], attempt, "seed \(seed): the winner killed")
                        // A kill races the attempt's own end: it may have just
                        // ended; if not, it answers soon with a failure.
                        if let info = running[t]?[attempt] {
                            XCTAssertEqual(info.executor, e, "seed \(seed): kill sent to the wrong executor")
                            running[t]![attempt] = (e, now + 1, true)
                        }
                    case .finished, .failed, .abortForFetchFailure:
                        XCTAssertNil(outcome, "seed \(seed): two outcomes")
                        outcome = a
                    }
                }
            }
            apply(m.start())
            var steps = 0
            while outcome == nil && steps < 20_000 {
                steps += 1
                now += 5
                let r = rng.next() % 1000
                if r < 3, let e = live.sorted().randomElement(using: &rng) {
                    live.remove(e)
                    for t in running.keys { running[t] = running[t]!.filter { $0.value.executor != e } }
                    apply(m.on(.executorLost(e)))
                } else if r < 8 {
                    let e = Int(rng.next() % UInt64(execs))
                    if !live.contains(e) {
                        live.insert(e)
                        apply(m.on(.executorAdded(e)))
                    }
                }
                for (t, attempts) in running {
                    for (a, info) in attempts where info.end <= now {
                        running[t]![a] = nil
                        if info.fails {
                            apply(m.on(.taskFailed(task: t, attempt: a, reason: "injected")))
                        } else {
                            if winners[t] == nil { winners[t] = a }
                            apply(m.on(.taskFinished(task: t, attempt: a)))
                        }
                        if outcome != nil { break }
                    }
                    if outcome != nil { break }
                }
                if outcome == nil { apply(m.on(.tick(nowMillis: now))) }
            }
            switch outcome {
            case .finished?:
                XCTAssertEqual(winners.count, tasks, "seed \(seed): finished with tasks missing")
                for t in 0..<tasks { XCTAssertTrue(m.isTaskDone(t)) }
            case .failed(let why)?:
                XCTAssertTrue(why.contains("failed 4 times") || why.contains("every executor was lost"), "seed \(seed): \(why)")
            default:
                // Every executor may have died with none coming back soon:
                // then the machine waits; otherwise it must have ended.
                XCTAssertTrue(live.isEmpty || outcome != nil, "seed \(seed): no outcome after \(steps) steps (\(String(describing: outcome)))")
            }
        }
    }
}
