# Every target sets itself up: the virtualenv is (re)built only when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: setup demo test lint format bench bench-methods bench-pruning world train clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so the CPU wheel is used where one is provided (see pyproject.toml)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup          ## evaluate the embedded tiny LLaVA on the embedded POPE set
	$(PY) run.py

test: setup          ## the test suite (W&B disabled)
	WANDB_MODE=disabled $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup         ## harness overhead vs plain HF generate, and throughput by batch size
	$(PY) -m harness.bench

bench-methods: setup ## each method's time per sample over none, same inputs, one run
	$(PY) -m harness.bench_methods

bench-pruning: setup ## pruning: prefill speed-up and peak memory over none (576 tokens), POPE accuracy retained
	$(PY) -m harness.bench_pruning

world: setup         ## re-export the shapes world (POPE, CHAIR, MME, VCR formats) and its README figure
	$(PY) -m harness.assets world
	$(PY) -m harness.assets figure

MODEL ?= llava
train: setup         ## retrain a shipped tiny checkpoint (MODEL=llava|qwen_vl|internvl|llava_cca|llava_mma), record POPE
	$(PY) -m harness.assets train --model $(MODEL)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
