"""``.ci/gpu-check``, the one-shot check for a lent GPU, run here on the CPU at tiny size.

A device call returns at most 8 files from ``$OUT``, named in letters, digits, ``.``, ``_`` and ``-``, and has one
time limit for the whole script: what the check leaves must fit, a step cut short must keep what it measured, and
a budget that runs out must say so in the exit status.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RETURNED = re.compile(r"[A-Za-z0-9._-]+")  # what the device tool brings back of a file name
MAX_FILES = 8


def _check(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    out, wheels = tmp_path / "out", tmp_path / "no-wheels"
    wheels.mkdir()
    cpu = {"GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_DTYPE": "float32", "GPU_CHECK_SIZE": "tiny",
           "GPU_CHECK_WHEELS": str(wheels)}  # fmt: skip
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # python3 = this environment's
    env = os.environ | {"OUT": str(out), "PATH": path} | cpu | env
    done = subprocess.run([str(ROOT / ".ci" / "gpu-check")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    return done, out


def _returned(out: Path) -> list[str]:
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(files) <= MAX_FILES, files
    assert all(RETURNED.fullmatch(part) for f in files for part in f.split("/")), files
    return files


def test_the_check_leaves_what_the_device_tool_returns_and_a_failing_step_stops_nothing(tmp_path):
    """Two steps: the matrix fails (every cell refuses batch size 0), the bench after it still runs."""
    done, out = _check(
        tmp_path,
        GPU_CHECK_STEPS="matrix bench_llava",
        GPU_CHECK_MATRIX_ARGS="--models llava --methods none fastv --limit 1 --batch-size 0",
        GPU_CHECK_BENCH_ARGS="--parts pruning --prefill-batch 2",
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # the first failure's status
    assert _returned(out) == ["bench_llava.json", "log.txt", "matrix.json"]
    matrix = json.loads((out / "matrix.json").read_text())  # written cell by cell
    assert {m: c["status"] for m, c in matrix["cells"]["llava"].items()} == {"none": "FAILED", "fastv": "FAILED"}
    bench = json.loads((out / "bench_llava.json").read_text())
    assert bench["parts_done"] == ["pruning"] and bench["errors"] == {}
    log = (out / "log.txt").read_text()
    assert "| llava | fastv | FAILED |" in log and "| fastv R=90% |" in log  # every step's output is in the log
    assert "== matrix: exit 1" in log and "== bench_llava: exit 0" in log and "== done: exit 1" in log
    assert "bench_qwen_vl" not in log  # steps not asked for do not run


def test_a_spent_budget_skips_the_steps_and_says_so(tmp_path):
    done, out = _check(tmp_path, GPU_CHECK_BUDGET="15")
    assert done.returncode == 124, done.stdout[-3000:]
    log = (out / "log.txt").read_text()
    for step in ("matrix", "bench_llava", "bench_qwen_vl", "bench_internvl"):
        assert f"== {step}: skipped" in log
    assert _returned(out) == ["log.txt"]
