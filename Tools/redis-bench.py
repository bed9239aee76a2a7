#!/usr/bin/env python3
"""redis-benchmark against `weft server --redis-port` and against a
redis-server with `--appendonly yes --appendfsync always` (every write
fsynced before it is answered, as Weft's are), in the same run, on the same
machine; prints each rate and Weft's ratio to Redis.

Run: make bench-redis   (or WEFT_BIN=... python3 Tools/redis-bench.py)
Env: BENCH_N (requests per test, default 100000), BENCH_CLIENTS (50), BENCH_PIPELINE (16),
     BENCH_TESTS (set,get,incr,mset), BENCH_ROUNDS (2: best of)."""
import csv, io, os, shutil, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEFT = os.environ.get("WEFT_BIN", os.path.join(ROOT, ".build/release/weft"))
N = int(os.environ.get("BENCH_N", "100000"))
CLIENTS = int(os.environ.get("BENCH_CLIENTS", "50"))
TESTS = os.environ.get("BENCH_TESTS", "set,get,incr,mset")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))
PIPELINE = int(os.environ.get("BENCH_PIPELINE", "16"))  # a second table with -P; 1: none
TARGETS = {"SET": 1.0, "GET": 1.0, "MSET (10 keys)": 0.5}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on {port}")


def bench(port, pipeline=1, password=None):
    """Best rate per test over ROUNDS runs of redis-benchmark."""
    best = {}
    for _ in range(ROUNDS):
        auth = ["-a", password] if password else []
        r = subprocess.run(["redis-benchmark", "-p", str(port), *auth, "-c", str(CLIENTS), "-d", "100", "-r", "1000000",
                            "-n", str(N), "-P", str(pipeline), "-t", TESTS, "--csv"],
                           capture_output=True, text=True)
        if r.returncode != 0 or "ERR" in r.stdout or "Error" in r.stderr:
            sys.exit(f"redis-benchmark failed on port {port}: {r.stdout[-500:]} {r.stderr[-500:]}")
        for row in csv.DictReader(io.StringIO(r.stdout)):
            best[row["test"]] = max(best.get(row["test"], 0.0), float(row["rps"]))
            best[row["test"] + " p50"] = float(row.get("p50_latency_ms", "nan"))
    return best


def main():
    tmp = tempfile.mkdtemp(prefix="weft-redis-bench-")
    weft_dir, redis_dir = os.path.join(tmp, "weft"), os.path.join(tmp, "redis")
    os.makedirs(redis_dir)
    wport, rport = free_port(), free_port()
    redis = None
    try:
        subprocess.run([WEFT, "server", "start", "--data-dir", weft_dir, "--redis-port", str(wport)], check=True,
                       stdout=subprocess.DEVNULL, env=dict(os.environ, WEFT_DATA_DIR=""))
        wait_port(wport)
        # Weft's Redis clients AUTH with the client secret; Redis's baseline
        # runs without a password (AUTH is once per connection, not per request).
        with open(os.path.join(weft_dir, "client.secret")) as f:
            pw = f.read().strip()
        weft = bench(wport, password=pw)
        weft_p = bench(wport, PIPELINE, password=pw) if PIPELINE > 1 else {}
        subprocess.run([WEFT, "server", "stop", "--data-dir", weft_dir], stdout=subprocess.DEVNULL)
        redis = subprocess.Popen(["redis-server", "--port", str(rport), "--dir", redis_dir, "--appendonly", "yes",
                                  "--appendfsync", "always", "--save", "", "--daemonize", "no"], stdout=subprocess.DEVNULL)
        wait_port(rport)
        base = bench(rport)
        base_p = bench(rport, PIPELINE) if PIPELINE > 1 else {}
    finally:
        subprocess.run([WEFT, "server", "stop", "--data-dir", weft_dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if redis:
            redis.terminate()
            redis.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    def table(title, weft, base, targets):
        print(title)
        print(f"{'test':<16}{'weft req/s':>12}{'p50 ms':>8}{'redis req/s':>13}{'p50 ms':>8}{'ratio':>8}{'target':>8}")
        for t in [k for k in weft if not k.endswith(" p50")]:
            ratio = weft[t] / base[t] if base.get(t) else float("nan")
            target = targets.get(t)
            print(f"{t:<16}{weft[t]:>12.0f}{weft[t + ' p50']:>8.2f}{base.get(t, 0):>13.0f}{base.get(t + ' p50', 0):>8.2f}"
                  f"{ratio:>7.2f}x{(f'{target:.1f}x' if target else ''):>8}")

    table(f"redis-benchmark -c {CLIENTS} -d 100 -r 1000000 -n {N}, best of {ROUNDS}; "
          f"Redis with appendonly yes, appendfsync always", weft, base, TARGETS)
    if weft_p:
        print()
        table(f"the same with -P {PIPELINE} (pipelined)", weft_p, base_p, {})


if __name__ == "__main__":
    main()
