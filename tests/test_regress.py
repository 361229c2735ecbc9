"""Regression check: an identical rerun passes; a planted change in an answer, a method or a golden fails."""

from __future__ import annotations

import json
import re

import pytest

from checks import regress
from checks.regress import load_matrix, main


def test_identical_rerun_passes_and_a_planted_answer_change_fails(tmp_path, capsys):
    assert main(["--only", "pope/llava+none", "--keep", str(tmp_path)]) == 0
    assert "regression passed: 1 cells, 0 changed" in capsys.readouterr().out
    (samples,) = tmp_path.glob("pope/llava+none/samples_pope.jsonl")
    lines = samples.read_text().splitlines()
    rec = json.loads(lines[2])
    flipped = {"yes": "no", "no": "yes"}[rec["parsed"]]
    lines[2] = json.dumps({**rec, "parsed": flipped, "raw_output": flipped.capitalize()})
    samples.write_text("\n".join(lines) + "\n")
    assert main(["--runs", str(tmp_path), "--only", "pope/llava+none"]) == 1
    out = capsys.readouterr().out
    assert f"pope/llava+none  answer  {rec['sample_id']}" in out and "regression FAILED" in out
    assert "goldens written with: torch" in out


def test_a_planted_change_in_a_method_fails(monkeypatch, capsys):
    from methods.fastv import FastV

    original = FastV.__init__

    def prune_more(self, *args, **kwargs):  # the planted bug: 90 % of the visual tokens dropped instead of 50 %
        original(self, *args, **{**kwargs, "ratio": 0.9})

    monkeypatch.setattr(FastV, "__init__", prune_more)
    # On the shipped LLaVA the yes/no answers and the VQA-Causal answer log-probabilities survive it (FastV's K=1
    # is the last layer of a 2-layer LM, which barely reads the visual tokens: the log-probabilities move ~1e-6);
    # the CHAIR captions, generated over many steps, do not.
    assert main(["--only", "chair/llava+fastv+"]) == 1  # the FastV + debias cell: 6 captions
    out = capsys.readouterr().out
    assert "regression FAILED: 1 cells, 1 changed" in out
    assert re.search(r"chair/llava\+fastv\+method\.debias=true +answer", out)


def test_update_writes_goldens_and_a_moved_metric_fails(tmp_path, capsys):
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text(
        "run: [seed=0, batch_size=2, progress=false]\n"
        "tasks: {pope: [limit=1]}\n"
        "cells:\n  - [model=llava, method=none]\n  - [model=qwen_vl, method=fastervlm]\n"
    )
    assert main(["--matrix", str(matrix), "--update"]) == 0
    out = capsys.readouterr().out
    assert out.count("no golden") == 2 and "updated (goldens rewritten)" in out
    golden = json.loads((tmp_path / "pope" / "llava+none.json").read_text())
    assert len(golden["samples"]) == 3 and golden["metrics"]["pope"]["accuracy,pope_official"] is not None
    refused = json.loads((tmp_path / "pope" / "qwen_vl+fastervlm.json").read_text())
    assert "does not support" in refused["unsupported"] or "[CLS]" in refused["unsupported"]

    assert main(["--matrix", str(matrix)]) == 0, "a rerun of the same code passes, the refusal included"
    golden["metrics"]["pope"]["accuracy,pope_official"] += 1e-3
    (tmp_path / "pope" / "llava+none.json").write_text(json.dumps(golden))
    capsys.readouterr()
    assert main(["--matrix", str(matrix)]) == 1
    assert "metric  pope accuracy,pope_official" in capsys.readouterr().out


def test_compare_tolerance_and_sample_bookkeeping():
    golden = {
        "cell": "c", "sample_set": "s", "unsupported": None,
        "samples": {"a": {"parsed": "yes", "raw_sha256": "1"}, "b": {"error": "missing image"}},
        "metrics": {"r": {"acc,none": 0.5, "acc_stderr,none": 0.1}},
    }  # fmt: skip
    same = json.loads(json.dumps(golden))
    same["metrics"]["r"]["acc,none"] += 5e-7
    assert regress.compare(golden, same) == []
    moved = json.loads(json.dumps(golden))
    moved["samples"]["a"]["raw_sha256"] = "2"
    moved["samples"]["c"] = {"parsed": "no"}
    del moved["samples"]["b"]
    kinds = sorted(c.kind for c in regress.compare(golden, moved))
    assert kinds == ["added", "missing", "output"]


def test_the_committed_matrix_has_a_golden_for_every_cell():
    cells = load_matrix()
    missing = [str(c) for c in cells if not c.golden_path.exists()]
    assert not missing, f"run `python -m checks.regress --update`: {missing}"
    methods = {c.spec[1].split("=", 1)[1] for c in cells}
    tasks = {c.task for c in cells}
    assert {"none", "var", "cca", "mma", "fastv", "fastervlm", "embedlens", "carve", "iri"} <= methods
    assert {"pope", "chair", "mme", "vcrbench", "causal_pairs"} <= tasks
    for task in tasks:
        assert len([c for c in cells if c.task == task]) == len(cells) // len(tasks), "every cell on every task"


@pytest.mark.parametrize("name", ["pope/llava+carve", "chair/llava+iri"])
def test_goldens_record_answers_and_metrics(name):
    (cell,) = [c for c in load_matrix() if str(c) == name]
    golden = json.loads(cell.golden_path.read_text())
    assert golden["samples"] and all("parsed" in s or "error" in s for s in golden["samples"].values())
    assert golden["metrics"] and golden["unsupported"] is None
