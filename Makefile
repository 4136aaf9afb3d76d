# Two entry points on a fresh machine (Rust toolchain + Python >= 3.11):
#   make demo   install moeflow into .venv, synthesize a small MoE checkpoint and generate with 25% of its experts,
#               then generate Python with the trained small model (olmoe-stdlib) at 25%
#   make test   install with test dependencies, then run cargo test, the stub check and pytest (which
#               NVRTC-compiles every CUDA kernel: tests/runtime/test_kernels.py)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= .artifacts/demo-mixtral

.PHONY: demo test install install-test rust-test py-test gpu-wheels

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test,plot,ray]"

demo: install
	test -f $(DEMO)/config.json || $(BIN)/moeflow synth --arch mixtral --size tiny --out $(DEMO)
	$(BIN)/moeflow run $(DEMO) --prompt "def fibonacci(n):" --max-new-tokens 32 --expert-budget 25%
	$(BIN)/moeflow run benches/models/olmoe-stdlib --prompt "def read_config(path):" --max-new-tokens 48 --expert-budget 25%

rust-test:
	cargo test --workspace --quiet

py-test: install-test
	$(BIN)/python -m mypy.stubtest moeflow._core
	$(BIN)/python -m pytest -q

test: rust-test py-test

# Wheels the GPU machine (CPython 3.12, no network) lacks for `bench_gpu.py --check --wheels .gpu-wheels`.
gpu-wheels: $(BIN)/python
	$(BIN)/pip download -q -d .gpu-wheels --only-binary=:all: --python-version 3.12 \
	    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
	    pytest-asyncio pytest-timeout hypothesis xxhash
