# Every target sets itself up: the virtualenv is (re)built only when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: setup browser demo test regress leaderboard lint format bench bench-methods bench-pruning world train clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so the CPU wheel is used where one is provided (see pyproject.toml)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,lmms,lmms-run]"
	# the lmms-eval bridge's tests: lmms-eval without its requirements (they pin wandb==0.25 and pull a CUDA torch)
	$(PY) -m pip install -q --no-deps lmms-eval==0.7.3
	touch $(STAMP)

# Debian's Chromium for the leaderboard page's browser test (Playwright drives it; it never downloads a browser)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium (needs root and apt)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: setup          ## evaluate the embedded tiny LLaVA on the embedded POPE set
	$(PY) run.py

test: setup browser  ## the test suite, then the regression matrix against the committed goldens (W&B disabled)
	WANDB_MODE=disabled $(PY) -m pytest -q
	WANDB_MODE=disabled $(PY) -m reports.regress

regress: setup       ## the regression matrix alone (UPDATE=1 rewrites the goldens and prints what moved)
	WANDB_MODE=disabled $(PY) -m reports.regress $(if $(UPDATE),--update,)

RUNS ?= outputs
leaderboard: setup   ## Markdown + HTML + plots from every run under RUNS (default outputs/)
	$(PY) -m reports.leaderboard $(RUNS)

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
train: setup         ## retrain a shipped tiny checkpoint (MODEL=llava|qwen_vl|internvl|llava_cca|llava_mma|llava_144), record POPE, re-run its calibrations
	$(PY) -m harness.assets train --model $(MODEL)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
