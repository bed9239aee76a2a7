# Weft: two commands on a fresh machine.
#   make demo   - build and run the tour of the embedded store
#   make test   - build and run every test (unit, LMDB, simulation, CLI end to end)
SWIFT ?= swift
SIM_SEEDS ?= 2000
# Release binaries link the Swift runtime and Foundation statically, as a
# fixed-address (non-PIE) executable: a command starts in about a third of
# the time (no dynamic relocation of the runtime's libraries or of the
# binary's own 88k pointers), which is most of a short command's cost.
RELEASE = $(SWIFT) build -c release --static-swift-stdlib -Xlinker -no-pie

.PHONY: demo test deps build release sim bench bench-server clean

deps:
	@if [ ! -f /usr/include/lmdb.h ]; then \
		echo "installing liblmdb-dev"; \
		(apt-get update -qq && apt-get install -y -qq liblmdb-dev) >/dev/null || { echo "could not install liblmdb-dev (need root and Debian's package registry)"; exit 1; }; \
	fi

build: deps
	$(SWIFT) build

release: deps
	$(RELEASE) --product weft
	$(RELEASE) --product WeftSim

demo: release
	./.build/release/weft demo

# Unit, adapter, simulation and end-to-end tests, then thousands of
# simulation seeds in release mode.
test: deps
	$(SWIFT) build --product weft
	$(SWIFT) test
	$(RELEASE) --product WeftSim
	./.build/release/WeftSim --seeds $(SIM_SEEDS)

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

clean:
	rm -rf .build
