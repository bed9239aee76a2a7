#!/usr/bin/env python3
"""The product as a user runs it: `weft` through `weft server`, end to end,
side by side in one run with the single-threaded loops and the engine on
the same files (weft-dataflow-bench's generated Zipf corpus and graph).

    make bench-server          # or:
    python3 Tools/server-bench.py [--wordcount-mb 200] [--vertices 1000000]
        [--edges 10000000] [--dir /tmp/weft-dataflow-bench] [--samples 50]

Every timing is one cold process of the real binary (release build);
peaks are each process's own max RSS (wait4). Prints each figure with its
ratio to the baseline it is held against.
"""
import argparse, json, os, resource, shutil, signal, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEFT = os.path.join(ROOT, ".build/release/weft")
BENCH = os.path.join(ROOT, ".build/release/weft-dataflow-bench")

ap = argparse.ArgumentParser()
ap.add_argument("--wordcount-mb", type=int, default=200)
ap.add_argument("--vertices", type=int, default=1_000_000)
ap.add_argument("--edges", type=int, default=10_000_000)
ap.add_argument("--dir", default="/tmp/weft-dataflow-bench")
ap.add_argument("--samples", type=int, default=50)
ap.add_argument("--keep", action="store_true", help="keep the data directory")
a = ap.parse_args()

def out(s):
    print(s, flush=True)

def run(args, check=True, env=None):
    """Runs a command; (seconds, peak RSS MiB, stdout)."""
    t0 = time.monotonic()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.monotonic() - t0
    so = p.stdout.read().decode(errors="replace")
    se = p.stderr.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if check and code != 0:
        out(f"FAILED ({code}): {' '.join(args)}\n{so}\n{se}")
        sys.exit(1)
    return dt, ru.ru_maxrss / 1024, so

def bench_child(what):
    """weft-dataflow-bench --child WHAT: (seconds, peak MiB, fields)."""
    _, _, so = run([BENCH, "--child", what, "--dir", a.dir, "--wordcount-mb", str(a.wordcount_mb),
                    "--vertices", str(a.vertices), "--edges", str(a.edges)])
    line = [l for l in so.splitlines() if l.startswith("RESULT ")][-1].split()
    return float(line[1]), float(line[2]), line[3:]

def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for l in f:
            if l.startswith("VmRSS:"):
                return int(l.split()[1]) / 1024
    return -1

def p50_ms(args, n):
    times = []
    for i in range(n):
        dt, _, _ = run([x.replace("{i}", str(i)) for x in args])
        times.append(dt * 1000)
    return statistics.median(times), max(times)

for b in (WEFT, BENCH):
    if not os.path.exists(b):
        out(f"{b} is missing: swift build -c release --product weft && swift build -c release --product weft-dataflow-bench")
        sys.exit(1)

# The same inputs as weft-dataflow-bench (it generates them if missing).
run([BENCH, "--dir", a.dir, "--wordcount-mb", str(a.wordcount_mb), "--vertices", str(a.vertices), "--edges", str(a.edges), "--generate-only"])
corpus = os.path.join(a.dir, f"zipf-{a.wordcount_mb}mb.txt")
graph = os.path.join(a.dir, f"graph-{a.vertices}-{a.edges}.txt")
corpus_bytes, graph_bytes = os.path.getsize(corpus), os.path.getsize(graph)
out(f"inputs: corpus {corpus_bytes / 2**20:.0f} MiB, graph {graph_bytes / 2**20:.0f} MiB ({a.edges} edges)")

# Baselines, in this run.
wc_loop, wc_loop_peak, wc_loop_r = bench_child("wc-loop")
wc_eng, wc_eng_peak, wc_eng_r = bench_child("wc-engine-2")
pr_eng, pr_eng_peak, pr_eng_r = bench_child("pr-engine-2")
# The word-count loop's time over the graph's bytes, scaled by size: the
# same single-threaded pass (read, split, count) per byte.
graph_loop = wc_loop * graph_bytes / corpus_bytes
out(f"baselines: word-count loop {wc_loop:.2f} s over the corpus ({graph_loop:.2f} s scaled to the graph's bytes); "
    f"engine 2 threads: wordcount {wc_eng:.2f} s, pagerank {pr_eng:.2f} s")

data = f"/tmp/weft-server-bench-{os.getpid()}"
shutil.rmtree(data, ignore_errors=True)
env = dict(os.environ, WEFT_DATA_DIR=data)
env.pop("WEFT_CLUSTER", None)
W = lambda *xs: [WEFT, *xs, "--data-dir", data]
try:
    dt, _, so = run(W("server", "start", "--json"))
    server = json.loads(so)
    spid = server["pid"]
    out(f"server pid {spid} at {server['address']} (started in {dt:.2f} s)")

    t, peak, _ = run(W("table", "load", "corpus", corpus))
    out(f"table load corpus: {t:.2f} s = {t / wc_loop:.2f}x the word-count loop (target <= 2x); client peak {peak:.0f} MiB (target <= 256)")
    t, peak, _ = run(W("table", "load", "graph", graph))
    out(f"table load graph: {t:.2f} s = {t / graph_loop:.2f}x the loop over the same bytes (target <= 2x); client peak {peak:.0f} MiB (target <= 256)")
    rss = rss_mib(spid)
    raw = (corpus_bytes + graph_bytes) / 2**20
    out(f"server resident memory holding both tables: {rss:.0f} MiB = {rss / raw:.2f}x their {raw:.0f} MiB raw (target <= 1.5x)")

    t, peak, so = run(W("job", "run", "wordcount", "--input", "corpus", "--output", "counts", "--json"))
    j = json.loads(so)
    out(f"job run wordcount through the server: {t:.2f} s = {t / wc_eng:.2f}x the engine on 2 threads (target <= 1.3x); "
        f"client peak {peak:.0f} MiB; {j['output_rows']} distinct words")
    t, peak, so = run(W("job", "run", "pagerank", "--input", "graph", "--iterations", "10", "--output", "ranks", "--json"))
    j = json.loads(so)
    out(f"job run pagerank through the server: {t:.2f} s = {t / pr_eng:.2f}x the engine on 2 threads (target <= 2x); "
        f"client peak {peak:.0f} MiB; {j['output_rows']} ranked vertices (engine: {pr_eng_r[0]})")
    rss = rss_mib(spid)
    out(f"server resident memory after the jobs (inputs and outputs): {rss:.0f} MiB")

    for name, args in [("table list", W("table", "list")), ("kv get", W("kv", "get", "k0")), ("kv put", W("kv", "put", "k{i}", "v"))]:
        if name == "kv get":
            run(W("kv", "put", "k0", "v"))
        p50, mx = p50_ms(args, a.samples)
        out(f"{name} through the server: p50 {p50:.1f} ms, max {mx:.1f} ms over {a.samples} runs (target p50 < 5 ms)")

    run(W("server", "stop"))
    p50, mx = p50_ms(W("table", "list"), 5)
    out(f"one-shot table list (no server): p50 {p50:.0f} ms, max {mx:.0f} ms (target < 1000 ms)")
finally:
    f = os.path.join(data, "SERVER")
    if os.path.exists(f):
        pid = int([l for l in open(f) if l.startswith("pid=")][0][4:])
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if not a.keep:
        shutil.rmtree(data, ignore_errors=True)
