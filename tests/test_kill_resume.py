"""A run killed with SIGKILL part-way resumes without losing or duplicating samples, to the same metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from harness.config import REPO_ROOT

# 18 samples of 48 new tokens each on a random-init model, so that the run lasts long enough to be killed
ARGS = [
    "limit=6",
    "batch_size=1",
    "task.gen_kwargs.max_new_tokens=48",
    "+task.gen_kwargs.min_new_tokens=48",
    "progress=false",
]


def _cmd(root, model):
    return [sys.executable, str(REPO_ROOT / "run.py"), f"output_root={root}", f"model.path={model}", *ARGS]


def _env():
    return {**os.environ, "WANDB_MODE": "disabled"}


def _lines(root):
    files = list(root.glob("pope/llava/none-*/samples_pope.jsonl"))
    return files[0].read_text().splitlines() if files else []


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, tiny_llava_dir):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(killed, tiny_llava_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while len(_lines(killed)) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(_lines(killed))
    assert 4 <= n_before < 18, f"the run must be killed part-way (had {n_before} of 18 records)"
    assert not list(killed.glob("pope/llava/none-*/results.json"))

    again = subprocess.run(_cmd(killed, tiny_llava_dir), env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    ids = [json.loads(x)["sample_id"] for x in _lines(killed) if x.strip()]
    assert len(ids) == len(set(ids)) == 18

    clean = tmp_path / "clean"
    once = subprocess.run(_cmd(clean, tiny_llava_dir), env=_env(), capture_output=True, text=True, timeout=300)
    assert once.returncode == 0, once.stderr[-2000:]
    (r1,) = killed.glob("pope/llava/none-*/results.json")
    (r2,) = clean.glob("pope/llava/none-*/results.json")
    res1, res2 = json.loads(r1.read_text()), json.loads(r2.read_text())
    assert res1["resumed"]["skipped"] >= 4
    assert res1["results"] == res2["results"]
    by_id = lambda lines: {json.loads(x)["sample_id"]: json.loads(x)["raw_output"] for x in lines}  # noqa: E731
    assert by_id(_lines(killed)) == by_id(_lines(clean))
