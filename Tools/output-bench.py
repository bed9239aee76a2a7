#!/usr/bin/env python3
"""A job's output written by the executors, against the same job with its
output written by the driver (`--local`: every task and the write in the
CLI process), on one local cluster of 3 participants, in one run:
PageRank over the 1M-vertex, 10M-edge graph with `--output` (1M output
rows). Prints each run's wall time, the driver's peak memory (the CLI
process's maximum RSS) and the ratio, and checks that both tables hold
the same rows.

    make bench-output           # or:
    python3 Tools/output-bench.py [--vertices 1000000] [--edges 10000000]
        [--iterations 3] [--rounds 2] [--dir /tmp/weft-dataflow-bench]
"""
import argparse, json, os, shutil, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEFT = os.path.join(ROOT, ".build/release/weft")
BENCH = os.path.join(ROOT, ".build/release/weft-dataflow-bench")

ap = argparse.ArgumentParser()
ap.add_argument("--vertices", type=int, default=1_000_000)
ap.add_argument("--edges", type=int, default=10_000_000)
ap.add_argument("--iterations", type=int, default=3)
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--dir", default="/tmp/weft-dataflow-bench")
a = ap.parse_args()


def out(s):
    print(s, flush=True)


def run(args, env):
    """Wall time and stdout."""
    t0 = time.monotonic()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    so, se = p.communicate()
    dt = time.monotonic() - t0
    if p.returncode != 0:
        out(f"FAILED ({p.returncode}): {' '.join(args)}\n{so.decode()}\n{se.decode()}")
        sys.exit(1)
    return dt, so.decode()


def run_rss(args, env):
    """Wall time, stdout and the child's peak RSS (MiB)."""
    t0 = time.monotonic()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    so = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.monotonic() - t0
    if status != 0:
        out(f"FAILED ({status}): {' '.join(args)}\n{so.decode()}")
        sys.exit(1)
    return dt, so.decode(), usage.ru_maxrss / 1024


graph = os.path.join(a.dir, f"graph-{a.vertices}-{a.edges}.txt")
if not os.path.exists(graph):
    subprocess.run([BENCH, "--dir", a.dir, "--vertices", str(a.vertices), "--edges", str(a.edges), "--wordcount-mb", "1", "--generate-only"], check=True)
env = dict(os.environ)
env.pop("WEFT_CLUSTER", None)
cdir = f"/tmp/weft-output-bench-{os.getpid()}"
shutil.rmtree(cdir, ignore_errors=True)
C = lambda *xs: [WEFT, *xs, "--cluster", cdir]
try:
    run([WEFT, "cluster", "start", "--dir", cdir, "--participants", "3", "--base-port", str(23000 + os.getpid() % 900 * 10)], env)
    t, _ = run(C("table", "load", "graph", graph), env)
    out(f"graph: {os.path.getsize(graph) / 2**20:.0f} MiB, {a.edges} edges, {a.vertices} vertices; loaded in {t:.1f} s")
    results = {"executors": [], "driver (--local)": []}
    for r in range(a.rounds):
        for mode, extra in (("executors", []), ("driver (--local)", ["--local"])):
            table = "pr_" + ("exec" if extra == [] else "local")
            dt, so, rss = run_rss(C("job", "run", "pagerank", "--input", "graph", "--iterations", str(a.iterations),
                                    "--output", table, "--overwrite", "--json", *extra), env)
            o = json.loads(so.strip().splitlines()[-1])
            results[mode].append((dt, rss, o["output_rows"]))
    out("")
    out(f"pagerank --iterations {a.iterations} --output T (1 output row per vertex), {a.rounds} rounds")
    out("| output written by | wall time (best) | driver peak RSS (max) | output rows |")
    out("| --- | ---: | ---: | ---: |")
    for mode, xs in results.items():
        out(f"| {mode} | {min(x[0] for x in xs):.2f} s | {max(x[1] for x in xs):.0f} MiB | {xs[0][2]} |")
    e, l = min(x[0] for x in results["executors"]), min(x[0] for x in results["driver (--local)"])
    er, lr = max(x[1] for x in results["executors"]), max(x[1] for x in results["driver (--local)"])
    out(f"executors / driver: time {e / l:.2f}x, driver memory {er / lr:.2f}x")
    a1 = subprocess.run(C("table", "export", "pr_exec", "--format", "kv"), stdout=subprocess.PIPE, env=env, check=True).stdout.splitlines()
    a2 = subprocess.run(C("table", "export", "pr_local", "--format", "kv"), stdout=subprocess.PIPE, env=env, check=True).stdout.splitlines()
    # The same vertices; ranks equal up to floating-point summation order
    # (the two runs partition differently).
    d1 = dict(l.split(b"\t", 1) for l in a1)
    d2 = dict(l.split(b"\t", 1) for l in a2)
    same = d1.keys() == d2.keys() and all(abs(float(d1[k]) - float(d2[k])) <= 1e-9 * max(1.0, abs(float(d2[k]))) for k in d1)
    out(f"both tables hold the same {len(a1)} vertices with the same ranks (to 1e-9): {same}")
    if not same:
        sys.exit(1)
finally:
    subprocess.run([WEFT, "cluster", "stop", "--dir", cdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(cdir, ignore_errors=True)
