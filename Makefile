# lps_fast: `make demo` sets up and runs the main job (n-body training, about 5 minutes),
# `make test` sets up and runs the tests, `make gpu-check` runs the GPU check (benchmarks/gpu_check.sh).
# Setting up creates .venv, installs the pinned stack and builds the extensions; each step is
# skipped when its inputs have not changed, so a second run starts at once.

PYTHON_BOOT ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
DEPS_STAMP  := $(VENV)/.deps-installed
PKG_STAMP   := $(VENV)/.package-installed
BUILD_STAMP := $(VENV)/.extensions-built
SOURCES     := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: setup build demo test bench info gpu-check clean

setup: $(DEPS_STAMP) $(PKG_STAMP) $(BUILD_STAMP)

$(DEPS_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Registers the package (and the lps-fast command) in the venv; the extensions are built in
# place by the next rule, incrementally.
$(PKG_STAMP): $(DEPS_STAMP) pyproject.toml
	LPS_FAST_NO_EXTENSION=1 $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) setup.py $(SOURCES)
	$(PY) setup.py --quiet build_ext --inplace
	touch $@

build: setup

demo: setup
	$(PY) -m lps_fast.cli main

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

info: setup
	$(PY) -m lps_fast.cli info

BENCH_ARGS ?=
bench: setup
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

# The one-call GPU check (benchmarks/gpu_check.sh); it builds the extension itself with the
# machine's own Python. GPU_CHECK_ARGS=--dry-run runs what needs no GPU.
GPU_CHECK_ARGS ?=
gpu-check:
	PYTHON=$${PYTHON:-$(if $(wildcard $(PY)),$(PY),python3)} bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf build lps_fast/*.so $(BUILD_STAMP)
