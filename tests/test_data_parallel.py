"""Data-parallel evaluation under torchrun (gloo, 2 CPU processes) equals a one-process run, sample for sample."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.records import RecordStore
from harness.config import REPO_ROOT
from harness.distributed import Ranks, merge_shards, shard_files, shard_path

# the shipped tiny LLaVA captioning 9 shapes-world images (CHAIR): long, image-specific outputs, so any difference in
# batching or padding between the two runs shows in the text
ARGS = ["task=chair", "limit=9", "batch_size=2", "progress=false"]
# a random-init model forced to write 48 tokens per answer, one sample per batch: slow enough to be killed part-way
SLOW = ["limit=3", "batch_size=1", "progress=false", "task.gen_kwargs.max_new_tokens=48",
        "+task.gen_kwargs.min_new_tokens=48"]  # fmt: skip
VOLATILE = ("wall_s", "cached")  # per-record timing, differs between any two runs


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _cmd(nproc: int, root: Path, *args: str) -> list[str]:
    launcher = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}"]
    head = launcher if nproc > 1 else [sys.executable]
    return [*head, str(REPO_ROOT / "run.py"), f"output_root={root}", *args]


def _run(nproc: int, root: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(nproc, root, *args), env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _run_dir(root: Path) -> Path:
    (d,) = root.glob("*/*/*-*")
    return d


def _records(root: Path) -> list[dict]:
    (path,) = _run_dir(root).glob("samples_*.jsonl")
    return [{k: v for k, v in json.loads(x).items() if k not in VOLATILE} for x in path.read_text().splitlines()]


def _results(root: Path) -> dict:
    return json.loads((_run_dir(root) / "results.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    _run(1, root, *ARGS)
    return root


def test_two_processes_equal_one_process(tmp_path, one_process):
    cache = f"cache={tmp_path / 'responses.sqlite'}"  # both ranks write one SQLite file
    _run(2, tmp_path / "two", *ARGS, cache)
    one, two = _records(one_process), _records(tmp_path / "two")
    assert len(two) == 9 and len({r["sample_id"] for r in two}) == 9
    assert two == one  # every field of every record, in the same order
    assert len({r["raw_output"] for r in two}) >= 8 and all(len(r["raw_output"].split()) >= 6 for r in two)
    res1, res2 = _results(one_process), _results(tmp_path / "two")
    assert res2["results"] == res1["results"] and res2["sample_set"] == res1["sample_set"]
    # 9 samples in batches of 2 → batches 0, 2, 4 on rank 0 (5 samples) and 1, 3 on rank 1 (4 samples)
    assert res2["timings"]["samples_per_process"] == [5, 4]
    assert res1["timings"]["samples_per_process"] == [9]
    assert not shard_files(_run_dir(tmp_path / "two") / "samples_chair.jsonl")  # merged, then removed
    # every rank's answers reached the shared cache: a one-process rerun elsewhere generates nothing
    _run(1, tmp_path / "again", *ARGS, cache)
    again = _results(tmp_path / "again")
    assert again["cache"]["hits"] == 9 and again["timings"]["model_load_s"] is None
    assert _records(tmp_path / "again") == one


def test_multi_task_submitit_job_is_data_parallel(tmp_path, one_process):
    """``hydra.launcher.tasks_per_node=2``: submitit starts two processes for the one configuration; they shard it."""
    launcher = ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "hydra.launcher.tasks_per_node=2"]
    cmd = [sys.executable, str(REPO_ROOT / "run.py"), "-m", *launcher, f"output_root={tmp_path}", *ARGS]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert _records(tmp_path) == _records(one_process)
    assert _results(tmp_path)["timings"]["samples_per_process"] == [5, 4]


def test_killed_parallel_run_resumes_per_shard(tmp_path, tiny_llava_dir):
    slow = [f"model.path={tiny_llava_dir}", *SLOW]
    proc = subprocess.Popen(
        _cmd(2, tmp_path, *slow), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip

    def shard_lines() -> list[int]:
        found = list(tmp_path.glob("*/*/*/samples_pope.rank*.jsonl"))
        return [len(p.read_text().splitlines()) for p in found] if len(found) == 2 else [0, 0]

    deadline = time.time() + 300
    while min(shard_lines()) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
    proc.wait()
    done = sum(shard_lines())
    assert 2 <= done < 9, f"the run must be killed part-way with records in both shards (had {done})"
    assert not (_run_dir(tmp_path) / "results.json").exists()

    again = _run(2, tmp_path, *slow)
    res = _results(tmp_path)
    assert res["resumed"]["skipped"] >= done and res["resumed"]["generated"] == 9 - res["resumed"]["skipped"]
    recs = _records(tmp_path)
    assert len(recs) == len({r["sample_id"] for r in recs}) == 9, again.stdout[-1000:]  # none lost, none twice
    assert not shard_files(_run_dir(tmp_path) / "samples_pope.jsonl")


def test_multirun_under_torchrun_is_refused(tmp_path, tiny_llava_dir):
    cmd = _cmd(2, tmp_path, "method=none,fastv", f"model.path={tiny_llava_dir}", "limit=1")
    cmd.insert(cmd.index(str(REPO_ROOT / "run.py")) + 1, "-m")
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "torchrun with -m is not supported" in proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("samples_*.jsonl"))


# ---------------------------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_batches_of_all_ranks_are_the_one_process_batches(world):
    pending = list(range(23))
    one = Ranks().my_batches(pending, 4)
    shares = [Ranks(rank, world, rank).my_batches(pending, 4) for rank in range(world)]
    assert sorted(b for share in shares for b in share) == one  # nothing lost, nothing twice, same batches
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_merge_appends_shard_records_in_sample_order_and_removes_shards(tmp_path):
    main = RecordStore(tmp_path / "samples_t.jsonl", "h")
    main.append([{"sample_id": "a", "index": 0, "config_hash": "h", "error": None}])
    RecordStore(shard_path(main.path, 1), "h").append(
        [{"sample_id": s, "index": i, "config_hash": "h", "error": None} for s, i in (("d", 3), ("b", 1))]
    )
    RecordStore(shard_path(main.path, 0), "h").append(
        [
            {"sample_id": "c", "index": 2, "config_hash": "h", "error": "image: missing"},
            {"sample_id": "a", "index": 0, "config_hash": "h", "error": None},  # already merged: not again
        ]
    )
    assert [p.name for p in shard_files(main.path)] == ["samples_t.rank0.jsonl", "samples_t.rank1.jsonl"]
    assert merge_shards(main, {"a": 0, "b": 1, "c": 2, "d": 3}) == 3
    lines = [json.loads(x) for x in main.path.read_text().splitlines()]
    assert [r["sample_id"] for r in lines] == ["a", "b", "c", "d"]
    assert not shard_files(main.path)
    again = RecordStore(main.path, "h")
    assert sorted(again.records) == ["a", "b", "d"] and again.dropped["errored"] == 1  # the error is retried
