#!/usr/bin/env python3
"""`weft table export` / `table load --format jsonl|csv`: round trips keep
every byte, and Python's json and csv modules read the exports.

Run: python3 Tests/cli/test_exchange.py   (WEFT_BIN: the weft binary,
default .build/debug/weft)."""
import csv, io, json, os, random, shutil, subprocess, sys, tempfile, unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WEFT = os.environ.get("WEFT_BIN", os.path.join(ROOT, ".build/debug/weft"))


def weft(*args, data_dir, check=True):
    env = dict(os.environ, WEFT_DATA_DIR="")
    r = subprocess.run([WEFT, *args, "--data-dir", data_dir], capture_output=True, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"weft {' '.join(args)} exited {r.returncode}: {r.stderr.decode(errors='replace')}")
    return r


class ExchangeTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="weft-exchange-")
        self.data = os.path.join(self.dir, "data")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.dir, name)

    def random_rows(self, n, seed):
        rng = random.Random(seed)
        alphabet = [b"a", b"z", b",", b'"', b"\\", b"\t", b"\n", b"\r", b"\x00", b"\x7f", b"\xff", b"\xc3\xa9", b" ", b"{", b"}"]
        rows = {}
        while len(rows) < n:
            key = b"k%05d" % len(rows) + b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
            value = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
            rows[key] = value
        return rows

    def write_jsonl(self, rows, path):
        with open(path, "w", encoding="utf-8") as f:
            for k, v in rows.items():
                o = {}
                for name, b in (("key", k), ("value", v)):
                    try:
                        o[name] = b.decode("utf-8")
                    except UnicodeDecodeError:
                        import base64
                        o[name + "_b64"] = base64.b64encode(b).decode()
                f.write(json.dumps(o) + "\n")

    def read_jsonl(self, text):
        import base64
        out = {}
        for line in text.decode("utf-8").splitlines():
            o = json.loads(line)
            k = o["key"].encode() if "key" in o else base64.b64decode(o["key_b64"])
            v = o["value"].encode() if "value" in o else base64.b64decode(o["value_b64"])
            out[k] = v
        return out

    def test_jsonl_and_csv_round_trip_every_byte(self):
        rows = self.random_rows(3000, seed=7)
        src = self.path("in.jsonl")
        self.write_jsonl(rows, src)
        weft("table", "load", "t", src, "--format", "jsonl", data_dir=self.data)
        # jsonl out: Python's json reads every line back to the same bytes.
        out = weft("table", "export", "t", "--format", "jsonl", data_dir=self.data).stdout
        self.assertEqual(self.read_jsonl(out), rows)
        # csv out to a file: Python's csv module reads it (bytes kept via surrogateescape).
        weft("table", "export", "t", "--format", "csv", "--output", self.path("t.csv"), data_dir=self.data)
        with open(self.path("t.csv"), newline="", encoding="utf-8", errors="surrogateescape") as f:
            records = list(csv.reader(f))
        self.assertEqual(records[0], ["key", "value"])
        got = {k.encode("utf-8", "surrogateescape"): v.encode("utf-8", "surrogateescape") for k, v in records[1:]}
        self.assertEqual(got, rows)
        # csv back in, then jsonl out again: the same rows.
        weft("table", "load", "t2", self.path("t.csv"), "--format", "csv", data_dir=self.data)
        out2 = weft("table", "export", "t2", "--format", "jsonl", data_dir=self.data).stdout
        self.assertEqual(self.read_jsonl(out2), rows)

    def test_lines_tables_keep_order_and_empty_lines(self):
        lines = [b"first", b"", b"with,comma", b'"quoted"', b"tab\there", b"\xff\xfe", b"last"]
        src = self.path("in.txt")
        with open(src, "wb") as f:
            f.write(b"\n".join(lines) + b"\n")
        weft("table", "load", "l", src, data_dir=self.data)
        self.assertEqual(weft("table", "export", "l", "--format", "lines", data_dir=self.data).stdout, b"\n".join(lines) + b"\n")
        for fmt in ("jsonl", "csv"):
            weft("table", "export", "l", "--format", fmt, "--output", self.path("l." + fmt), data_dir=self.data)
            weft("table", "load", "l_" + fmt, self.path("l." + fmt), "--format", fmt, data_dir=self.data)
            back = weft("table", "export", "l_" + fmt, "--format", "lines", data_dir=self.data).stdout
            self.assertEqual(back, b"\n".join(lines) + b"\n", fmt)
        with open(self.path("l.jsonl"), encoding="utf-8") as f:
            objs = [json.loads(x) for x in f]
        self.assertEqual(objs[0], {"value": "first"})
        self.assertEqual(objs[1], {"value": ""})
        self.assertIn("value_b64", objs[5])

    def test_bad_input_loads_nothing(self):
        bad = self.path("bad.jsonl")
        with open(bad, "w") as f:
            f.write('{"key":"a","value":"1"}\n{"key":"b"}\n')
        r = weft("table", "load", "x", bad, "--format", "jsonl", data_dir=self.data, check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn(b":2:", r.stderr)
        with open(self.path("bad.csv"), "w") as f:
            f.write('key,value\na,1\n"b,2\n')
        r = weft("table", "load", "y", self.path("bad.csv"), "--format", "csv", data_dir=self.data, check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn(b"quoted field", r.stderr)
        listed = weft("table", "list", "--json", data_dir=self.data).stdout
        self.assertNotIn(b'"x"', listed)
        self.assertNotIn(b'"y"', listed)
        r = weft("table", "export", "nosuch", data_dir=self.data, check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn(b"unknown table", r.stderr)
        # A row the lines format cannot carry is refused, and --output leaves no file.
        with open(self.path("nl.jsonl"), "w") as f:
            f.write('{"value":"two\\nlines"}\n')
        weft("table", "load", "nl", self.path("nl.jsonl"), "--format", "jsonl", data_dir=self.data)
        r = weft("table", "export", "nl", "--format", "lines", "--output", self.path("nl.txt"), data_dir=self.data, check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn(b"newline", r.stderr)
        self.assertFalse([n for n in os.listdir(self.dir) if n.startswith("nl.txt")])


if __name__ == "__main__":
    if not os.access(WEFT, os.X_OK):
        sys.exit(f"{WEFT} is missing; build it first (make test does)")
    unittest.main(verbosity=2)
