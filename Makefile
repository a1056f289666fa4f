# Two commands, each doing its own set-up from only python3:
#   make run   - meta-train MAML on sinusoid regression (small default, ~2 minutes on 2 cores)
#   make test  - run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist: one worker per core, at most 4 (each worker's torch runs one thread: tests/conftest.py).
WORKERS ?= -n auto --maxprocesses 4

.PHONY: run test test-all bench setup clean

setup: $(STAMP)

# torch==2.13.0 goes first: an unpinned torch would pull a multi-GB CUDA build.
# higher (a test reference) pins nothing useful and is installed without deps.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps higher==0.2.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) experiments/train.py

test: $(STAMP)
	$(PY) -m mypy
	WANDB_MODE=disabled $(PY) -m pytest -m "not slow" $(WORKERS)

test-all: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest $(WORKERS)

bench: $(STAMP)
	$(PY) experiments/bench_step.py

clean:
	rm -rf $(VENV) outputs multirun
