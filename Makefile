# Weft: two commands on a fresh machine.
#   make demo   - build and run the tour of the embedded store
#   make test   - build and run every test (unit, LMDB, simulation, CLI end to end, a short fuzz pass)
SHELL := /bin/bash
SWIFT ?= swift
SIM_SEEDS ?= 2000
# Release binaries link the Swift runtime and Foundation statically, as a
# fixed-address (non-PIE) executable: a command starts in about a third of
# the time (no dynamic relocation of the runtime's libraries or of the
# binary's own 88k pointers), which is most of a short command's cost.
RELEASE = $(SWIFT) build -c release --static-swift-stdlib -Xlinker -no-pie

.PHONY: demo test deps client-deps build release sim bench bench-server bench-cluster bench-recovery bench-output bench-redis fuzz fuzz-build clean

deps:
	@if [ ! -f /usr/include/lmdb.h ] || [ ! -f /usr/include/openssl/ssl.h ] || ! command -v openssl >/dev/null; then \
		echo "installing liblmdb-dev, libssl-dev and openssl"; \
		(apt-get update -qq && apt-get install -y -qq liblmdb-dev libssl-dev openssl) >/dev/null || { echo "could not install liblmdb-dev, libssl-dev and openssl (need root and Debian's package registry)"; exit 1; }; \
	fi

# Real Redis clients for the front end's tests and benchmark: Debian's
# redis-tools (redis-cli, redis-benchmark; redis-server for the benchmark's
# baseline) and PyPI's redis (redis-py); Debian's chromium for the status
# pages' browser test.
client-deps:
	@if ! command -v redis-cli >/dev/null || ! command -v redis-benchmark >/dev/null || ! command -v redis-server >/dev/null; then \
		echo "installing redis-tools and redis-server"; \
		(apt-get update -qq && apt-get install -y -qq redis-tools redis-server) >/dev/null || { echo "could not install redis-tools (need root and Debian's package registry)"; exit 1; }; \
	fi
	@if ! command -v chromium >/dev/null; then \
		echo "installing chromium (the status pages' browser test)"; \
		(apt-get update -qq && apt-get install -y -qq chromium) >/dev/null || echo "could not install chromium: the browser test will say it was skipped"; \
	fi
	@python3 -c "import redis" 2>/dev/null || pip install -q redis 2>/dev/null || pip install -q --break-system-packages redis || { echo "could not install redis-py"; exit 1; }

build: deps
	$(SWIFT) build

release: deps
	$(RELEASE) --product weft
	$(RELEASE) --product WeftSim

demo: release
	./.build/release/weft demo

# Unit, adapter, simulation and end-to-end tests, then thousands of
# simulation seeds in release mode.
test: deps client-deps
	$(SWIFT) build --product weft
	$(SWIFT) build --product weft-example-wordlengths
	$(SWIFT) test
	python3 Tests/cli/test_exchange.py
	WEFT_BENCH_N=4000 python3 Tests/redis/test_redis_clients.py
	$(RELEASE) --product WeftSim
	./.build/release/WeftSim --seeds $(SIM_SEEDS)
	$(MAKE) fuzz FUZZ_CONFIG=debug FUZZ_SECONDS=10

sim: deps
	$(RELEASE) --product WeftSim
	./.build/release/WeftSim --seeds $(SIM_SEEDS)

bench: deps
	$(RELEASE) --product weft
	$(RELEASE) --product weft-bench
	./.build/release/weft-bench

# The product through the CLI and `weft server`, end to end (docs/benchmarks.md).
bench-server: deps
	$(RELEASE) --product weft
	$(RELEASE) --product weft-dataflow-bench
	python3 Tools/server-bench.py

# Distributed jobs on a local 3-participant cluster (executors in the nodes)
# beside weft server and --local, and PageRank with a node killed in
# iteration 5 (docs/benchmarks.md).
bench-cluster: deps
	$(RELEASE) --product weft
	$(RELEASE) --product weft-dataflow-bench
	python3 Tools/cluster-bench.py

# Recovery time per SIGKILL for the coordinator and a participant, from a
# 5-minute `weft check bank` run, against graceful restarts (docs/benchmarks.md).
bench-recovery: deps
	$(RELEASE) --product weft
	python3 Tools/recovery-bench.py

# A job's output written by the executors against the driver (--local):
# PageRank with --output on a local cluster (docs/benchmarks.md).
bench-output: deps
	$(RELEASE) --product weft
	$(RELEASE) --product weft-dataflow-bench
	python3 Tools/output-bench.py

# redis-benchmark against weft server and against redis-server with
# appendfsync always, in the same run (docs/benchmarks.md).
bench-redis: deps client-deps
	$(RELEASE) --product weft
	python3 Tools/redis-bench.py

# libFuzzer targets (Tools/WeftFuzz): wire frames, durable records, table
# blocks, RESP requests. Instrumented (ASan + libFuzzer coverage) in their
# own build directory; libFuzzer's library comes with the Swift toolchain.
# FUZZ_SECONDS per target (CI runs a short pass; docs/benchmarks.md has a
# long one). A crash leaves its input in .build/fuzz/crashes/.
FUZZ_SECONDS ?= 20
FUZZ_TARGETS ?= wire records block resp
# release for long runs; `make test` uses debug, which builds in about half the time.
FUZZ_CONFIG ?= release
FUZZ_BIN = .build/fuzz-$(FUZZ_CONFIG)/$(FUZZ_CONFIG)/weft-fuzz
FUZZER_LIB = $(firstword $(wildcard $(dir $(realpath $(shell command -v swiftc)))../lib/clang/*/lib/linux/libclang_rt.fuzzer_no_main-x86_64.a))
FUZZ_BUILD = $(SWIFT) build -c $(FUZZ_CONFIG) --build-path .build/fuzz-$(FUZZ_CONFIG) \
	-Xswiftc -sanitize=address -Xswiftc -sanitize-coverage=edge,inline-8bit-counters,pc-table,trace-cmp \
	-Xlinker --undefined=LLVMFuzzerRunDriver -Xlinker $(FUZZER_LIB) -Xlinker -lstdc++ --product weft-fuzz

fuzz-build: deps
	@test -n "$(FUZZER_LIB)" || { echo "libclang_rt.fuzzer_no_main not found beside swiftc"; exit 1; }
	$(FUZZ_BUILD)

fuzz: fuzz-build
	@mkdir -p .build/fuzz/crashes
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p .build/fuzz/corpus/$$t; \
		echo "fuzzing $$t for $(FUZZ_SECONDS) s"; \
		WEFT_FUZZ_TARGET=$$t timeout -s KILL $$(( $(FUZZ_SECONDS) + 60 )) $(FUZZ_BIN) \
			-max_total_time=$(FUZZ_SECONDS) -max_len=65536 -print_final_stats=1 \
			-artifact_prefix=.build/fuzz/crashes/$$t- .build/fuzz/corpus/$$t Tools/fuzz-seeds/$$t 2>&1 \
			| grep -E "^(stat::number_of_executed_units|stat::average_exec_per_sec|Done|==[0-9]+==|SUMMARY|.*crashed|.*ERROR)" ; \
		status=$${PIPESTATUS[0]}; \
		if [ $$status -ne 0 ]; then echo "weft-fuzz $$t failed ($$status); inputs in .build/fuzz/crashes/"; exit 1; fi; \
	done

clean:
	rm -rf .build
