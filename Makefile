# fourfold: `make demo` sets everything up and trains the demo job; `make test` runs the tests.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fourfold-setup
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.fourfold-setup
# One thread per rank and gloo on loopback: what the multi-process runs and tests need on CPU.
DIST_ENV := OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=lo MASTER_ADDR=127.0.0.1
PYTEST_ARGS ?=
BENCH_ARGS ?=
GPU_CHECK_ARGS ?=

.PHONY: setup demo test test-fast lint bench gpu-check clean

setup: $(STAMP)

# torch first and pinned: the local CPU wheel satisfies it, whereas a bare `torch` requirement
# could pull a multi-GB CUDA build. The stamp makes setup a no-op until pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check --progress-bar off -q torch==2.13.0
	$(BIN)/python -m pip install --disable-pip-version-check --progress-bar off -q -e '.[dev]'
	touch $(STAMP)

# The service in the background (local Ray head on 127.0.0.1, SQLite store, API and dashboard on
# :8000), then the demo job submitted to it and followed to the end; the dashboard keeps running.
demo: setup
	$(DIST_ENV) $(BIN)/fourfold up --detach --data-dir runs/service
	@id=$$($(BIN)/fourfold submit examples/demo.yaml) && echo "submitted job $$id" && \
		$(BIN)/fourfold logs $$id --follow && $(BIN)/fourfold status $$id
	@echo "dashboard: http://127.0.0.1:8000/  (stop the service: $(BIN)/fourfold down --data-dir runs/service)"

# pytest exits 5 when it collected no tests; any non-zero status fails the target, and we say why.
define pytest
	@set -e; export $(DIST_ENV); status=0; \
	echo '$(BIN)/python -m pytest -q $(1) $(PYTEST_ARGS)'; \
	$(BIN)/python -m pytest -q $(1) $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "make: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$status
endef

test: setup
	$(call pytest,)

test-fast: setup
	$(call pytest,-m "not dist and not ray and not browser")

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# Every comparison of docs/performance.md in one run, and the page written from it (bench/report.py;
# BENCH_ARGS="--database-url postgresql://..." adds the PostgreSQL rows, "--quick" shortens the runs).
bench: setup $(PEERS_STAMP)
	$(BIN)/python -m pip install --disable-pip-version-check --progress-bar off -q -e '.[bench]'
	$(DIST_ENV) $(BIN)/python bench/report.py $(BENCH_ARGS)

# bench/peers_bench.py's own venv, with torchtitan (whose pins clash with the test extras): torch first, as above.
$(PEERS_STAMP): bench/peers-requirements.txt
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --disable-pip-version-check --progress-bar off -q torch==2.13.0
	$(PEERS)/bin/python -m pip install --disable-pip-version-check --progress-bar off -q -r bench/peers-requirements.txt
	touch $(PEERS_STAMP)

# What the CPU suite cannot run, on a machine with CUDA: fp32 parity with the CPU, every layout over
# NCCL in bf16 and fp32, ZeRO peak memory against the formulas, MFU of the 1b and 8b presets. Without CUDA
# it says so and exits 0. Options: make gpu-check GPU_CHECK_ARGS="--skip mfu".
gpu-check: setup
	$(BIN)/python bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf runs .pytest_cache .ruff_cache
