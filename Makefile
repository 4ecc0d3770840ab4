# Fresh machine: `make demo` or `make test`. Both create .venv first (once; re-runs are quick).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo benchmarks clean

venv: $(STAMP)

# torch and torchvision must be a matched pair; sam2 builds against the installed torch
# (--no-build-isolation, without its CUDA extension), so it comes second.
$(STAMP): pyproject.toml Makefile Resources/requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.15.0 torchvision==0.29.2
	SAM2_BUILD_CUDA=0 $(BIN)/pip install -q --no-build-isolation sam2==1.1.0
	$(BIN)/pip install -q -r Resources/requirements.txt pytest hypothesis matplotlib
	# Slicer's real MRML core (no Qt) to test the Slicer module's Logic; never installed inside Slicer itself.
	$(BIN)/pip install -q slicer-core==5.13.31053.0
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/proxyprompt demo

benchmarks: venv
	$(BIN)/python benchmarks/registration.py
	$(BIN)/python benchmarks/accuracy.py
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/latency.py
	$(BIN)/python benchmarks/encode_range.py

clean:
	rm -rf $(VENV) out .pytest_cache
