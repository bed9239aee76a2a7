#!/usr/bin/env python3
"""Recovery time after SIGKILL, as `weft check bank` measures it: a
5-minute run on a local cluster of 3 participants that kills a random node
(the coordinator or a participant) about every second while 8 clients run
transfers, restarts it, and times `weft cluster start` until the node
answers as serving. The baseline, in the same run and on the same cluster:
a graceful restart (SIGTERM, wait, `cluster start`) of the same roles.

    make bench-recovery         # or:
    python3 Tools/recovery-bench.py [--duration 300s] [--kill-every 1s]
        [--baseline-restarts 10] [--seed 7]

Prints the distribution per role (min, p50, p90, p99, max) and its ratio
to the graceful restart's p50; the check's invariants must hold (exit 1
otherwise). Figures are recorded in docs/benchmarks.md.
"""
import argparse, json, os, shutil, signal, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEFT = os.path.join(ROOT, ".build/release/weft")

ap = argparse.ArgumentParser()
ap.add_argument("--duration", default="300s")
ap.add_argument("--kill-every", default="1s")
ap.add_argument("--baseline-restarts", type=int, default=10)
ap.add_argument("--seed", default="7")
ap.add_argument("--base-port", type=int, default=27400)
a = ap.parse_args()


def out(s):
    print(s, flush=True)


def weft(*args, check=True):
    p = subprocess.run([WEFT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if check and p.returncode != 0:
        out(f"FAILED ({p.returncode}): weft {' '.join(args)}\n{p.stdout.decode()}\n{p.stderr.decode()}")
        sys.exit(1)
    return p


def pid_of(d, node):
    with open(os.path.join(d, f"{node}.pid")) as f:
        return int(f.read().split()[0])


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def q(xs, p):
    s = sorted(xs)
    return s[min(len(s) - 1, int((len(s) - 1) * p))]


d = tempfile.mkdtemp(prefix="weft-recovery-bench-")
try:
    weft("cluster", "start", "--dir", d, "--participants", "3", "--base-port", str(a.base_port))
    # Some data first, so recovery reads a non-empty store.
    weft("debug", "bank", "--cluster", d, "--accounts", "100", "--clients", "8", "--transfers", "2000")

    # Baseline: graceful restarts of the same roles.
    baseline = {"coordinator": [], "participant": []}
    for i in range(a.baseline_restarts):
        for role, node in (("coordinator", "coordinator"), ("participant", f"participant-{i % 3}")):
            pid = pid_of(d, node)
            os.kill(pid, signal.SIGTERM)
            while alive(pid):
                time.sleep(0.01)
            t0 = time.monotonic()
            weft("cluster", "start", "--dir", d)
            baseline[role].append((time.monotonic() - t0) * 1000)

    p = weft("check", "bank", "--cluster", d, "--duration", a.duration, "--kill-every", a.kill_every,
             "--kill", "any", "--seed", a.seed, "--json", check=False)
    report = json.loads(p.stdout.decode().strip().splitlines()[-1])
    out(f"weft check bank --cluster DIR --duration {a.duration} --kill-every {a.kill_every} --kill any --seed {a.seed}")
    out(f"  kills {report['kills']}, commits {report['commits']}, aborts {report['aborts']}, "
        f"unknown {report['unknown']} ({report['unknown_committed']} committed), snapshots checked {report['snapshots_checked']}, "
        f"in doubt resolved {report['in_doubt_resolved_ms']} ms after the last restart, violations {len(report['violations'])}")
    out("")
    out("| role | kills | min | p50 | p90 | p99 | max | graceful restart p50 | p50 ÷ graceful |")
    out("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for role in ("coordinator", "participant"):
        r = report["recovery"].get(role)
        if not r:
            continue
        g = statistics.median(baseline[role])
        out(f"| {role} | {r['count']} | {r['min_ms']} ms | {r['p50_ms']} ms | {r['p90_ms']} ms | {r['p99_ms']} ms | {r['max_ms']} ms "
            f"| {g:.0f} ms | {r['p50_ms'] / g:.2f}× |")
    for role in ("coordinator", "participant"):
        r = report["recovery"].get(role)
        if r:
            # A coarse histogram: 50 ms buckets up to 1 s.
            buckets = {}
            for x in r["samples_ms"]:
                b = min(x // 50 * 50, 1000)
                buckets[b] = buckets.get(b, 0) + 1
            out(f"{role} recovery histogram (ms bucket: kills): " + ", ".join(
                f"{'≥1000' if b == 1000 else f'{b}–{b + 49}'}: {n}" for b, n in sorted(buckets.items())))
    if not report["ok"]:
        out("VIOLATIONS:\n  " + "\n  ".join(report["violations"][:20]))
        sys.exit(1)
finally:
    subprocess.run([WEFT, "cluster", "stop", "--dir", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(d, ignore_errors=True)
