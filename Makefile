# Plain entry points. `make test` and `make demo` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CIFAR-100 and the teachers: found beside the project on machines without internet.
SHARED ?= $(abspath ../shared)
export CIFAR100_ROOT ?= $(if $(wildcard $(SHARED)/data/cifar-100-python),$(SHARED)/data,./data)
# Idle OpenMP threads yield instead of spinning (spinning slowed CPU steps several-fold on small machines).
export OMP_WAIT_POLICY ?= PASSIVE
export KD_TEACHERS ?= $(if $(wildcard $(SHARED)/teachers),$(SHARED)/teachers,./save/models)

.PHONY: venv test test-all lint demo bench clean gpu-check

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

# CI and `make test`: every test but the few long end-to-end runs marked `long` (each repeats, through the CLI,
# what an in-process test checks); `make test-all` runs them too.
test: venv
	$(PY) -m pytest -q -m "not long"

test-all: venv
	$(PY) -m pytest -q

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: venv
	$(PY) scripts/demo.py

# The first command on a GPU machine (about 10 minutes): CUDA tests, syncs, determinism, speed. JSON beside.
gpu-check: venv
	$(PY) scripts/gpu_check.py --json gpu_check.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
