"""lmms-eval end to end: its own ``pope`` task (lmms-eval's YAML, prompt, parser and metrics) over a local copy of
shapes-world POPE, run by the ``lmms-eval`` CLI with ``--model harness``, answers exactly as the harness's own POPE run
(same prompt suffix), with and without a method.

Needs lmms-eval's evaluator requirements (``pip install -e '.[lmms,lmms-run]'`` + ``--no-deps lmms-eval``, as
``make setup`` does); the dataset is written with ``datasets.save_to_disk`` and loaded through the task's
``load_from_disk`` option, so nothing touches the hub.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.config import REPO_ROOT, compose_config
from harness.engine import evaluate, from_config

try:
    import datasets
    import lmms_eval
except ImportError as exc:  # not a skip: CI installs both (make setup)
    raise ImportError(f"{exc}: pip install -e '.[lmms,lmms-run]' && pip install --no-deps lmms-eval==0.7.3") from exc

N = 12  # questions of the adversarial split (2 images)
POPE = REPO_ROOT / "assets" / "shapes-world" / "pope"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """An lmms-lab/POPE-shaped dataset of the first N adversarial questions and a task YAML over lmms-eval's own."""
    root = tmp_path_factory.mktemp("lmms_task")
    rows = [json.loads(x) for x in (POPE / "shapes_pope_adversarial.json").read_text().splitlines()][:N]
    columns = {
        "question_id": [str(r["question_id"]) for r in rows],
        "question": [r["text"] for r in rows],
        "answer": [r["label"] for r in rows],
        "category": ["adversarial"] * N,
        "image": [str(POPE / "images" / r["image"]) for r in rows],
    }
    ds = datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": ds}).save_to_disk(str(root / "data"))  # a str: datasets 2.19 + fsspec 2024.3
    pope_yaml = Path(lmms_eval.__file__).parent / "tasks" / "pope" / "pope.yaml"
    (root / "shapes_pope.yaml").write_text(
        f"include: {pope_yaml}\ntask: shapes_pope\ndataset_path: {root / 'data'}\n"
        "dataset_kwargs:\n  load_from_disk: true\n"
    )
    return root


def lmms_run(task_dir: Path, out: Path, model_args: str) -> tuple[dict[str, str], dict]:
    """``lmms-eval --model harness``: answers by question id and the task's results block."""
    cli = Path(sys.executable).parent / "lmms-eval"
    cmd = [str(cli), "--model", "harness", "--model_args", model_args, "--tasks", "shapes_pope", "--include_path",
           str(task_dir), "--batch_size", "4", "--output_path", str(out), "--log_samples"]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=out.parent)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (samples,) = out.rglob("*_samples_shapes_pope.jsonl")
    (results,) = out.rglob("*_results.json")
    answers = {}
    for line in samples.read_text().splitlines():
        rec = json.loads(line)
        answers[rec["pope_accuracy"]["question_id"]] = rec["filtered_resps"]
    return answers, json.loads(results.read_text())["results"]["shapes_pope"]


@pytest.fixture(scope="module")
def lmms(task_dir, tmp_path_factory):
    """``lmms(model_args)``: one CLI run per distinct ``--model_args`` in this module."""
    runs: dict[str, tuple[dict[str, str], dict]] = {}

    def get(model_args: str) -> tuple[dict[str, str], dict]:
        if model_args not in runs:
            runs[model_args] = lmms_run(task_dir, tmp_path_factory.mktemp("lmms") / "out", model_args)
        return runs[model_args]

    return get


NONE, PRUNED = "model=llava,method=none", "model=llava,method=fastervlm,method.keep=1"


def harness_run(tmp: Path, *overrides: str) -> dict[str, str]:
    """The harness's own POPE run (adversarial split, first N): raw answers by question id."""
    task, adapter, method, settings = from_config(compose_config(["limit=12", "progress=false", *overrides]), tmp)
    settings.report = False
    res = evaluate(task, adapter, method, settings)
    lines = (tmp / res["samples_file"]).read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    return {str(r["doc"]["question_id"]): r["raw_output"] for r in recs if r["split"] == "adversarial"}


@pytest.mark.parametrize(("model_args", "overrides"), [(NONE, ()), (PRUNED, ("method=fastervlm", "method.keep=1"))])
def test_lmms_eval_pope_answers_equal_the_harness_run(lmms, tmp_path, model_args, overrides):
    answers, results = lmms(model_args)
    ours = harness_run(tmp_path / "harness", *overrides)
    assert len(answers) == N and answers == ours
    gold = {str(json.loads(x)["question_id"]): json.loads(x)["label"] for x in
            (POPE / "shapes_pope_adversarial.json").read_text().splitlines()[:N]}  # fmt: skip
    acc = sum(answers[q].strip().lower() == gold[q] for q in gold) / N
    assert results["pope_accuracy,none"] == pytest.approx(acc)


def test_a_method_changes_lmms_eval_answers(lmms):
    """The method really runs inside lmms-eval: keeping one visual token changes answers on this set."""
    assert lmms(NONE)[0] != lmms(PRUNED)[0]
