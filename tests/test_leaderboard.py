"""Leaderboard on hand-made run directories: known deltas, a missing baseline, seeds to aggregate, other items.

Each hand-made run is what the engine writes for POPE (results.json with metrics from the task's own aggregate,
samples file with records), built from a list of Yes/No answers, so every expected number is known exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from core.results import sha256_json, sha256_text
from harness.config import config_hash, pair_hash
from harness.engine import sample_set
from reports.leaderboard import main as leaderboard_main
from reports.runs import scan
from reports.table import build_entries
from tasks.base import Sample
from tasks.pope import POPETask

TARGETS = ["yes", "no"] * 10  # 20 questions, 2 per image


def task_cfg(n_boot=300):
    return {
        "_target_": "tasks.pope.POPETask",
        "name": "pope",
        "questions": "/nonexistent/pope_{split}.json",
        "image_root": "/nonexistent",
        "splits": ["random"],
        "parser": "pope_official",
        "n_boot": n_boot,
    }


def write_run(root, *, method="none", model="llava", seed=0, right=None, wall=0.01, method_opts=None, n=20):
    """A POPE run of ``n`` questions where the samples in ``right`` (indices) are answered correctly."""
    right = set(range(n) if right is None else right)
    cfg = {
        "model": {"_target_": "adapters.llava.LlavaAdapter", "name": model, "path": f"/ckpt/{model}"},
        "method": {"_target_": f"methods.{method}.X", "name": method, **(method_opts or {})},
        "task": task_cfg(),
        "seed": seed,
        "limit": None,
    }
    samples = [
        Sample(f"random/{i}", "random", i, f"img{i // 2}", "q", TARGETS[i], "f:1", doc={"question_id": i})
        for i in range(n)
    ]
    records = []
    for s in samples:
        answer = s.target if s.index in right else {"yes": "no", "no": "yes"}[s.target]
        records.append(
            {
                "sample_id": s.sample_id, "index": s.index, "split": s.split, "image_id": s.image_id,
                "target": s.target, "doc_hash": sha256_json(s.doc), "target_hash": sha256_text(s.target),
                "prompt": "USER: <image>\nq ASSISTANT:", "raw_output": answer.capitalize(), "parsed": answer,
                "wall_s": wall, "error": None,
            }
        )  # fmt: skip
    task = POPETask(**{k: v for k, v in task_cfg().items() if k not in ("_target_", "name")})
    run_dir = root / "pope" / model / f"{method}-{config_hash(cfg)}"
    run_dir.mkdir(parents=True)
    (run_dir / "samples_pope.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    results = {
        "results": task.aggregate(records, seed=seed),
        "higher_is_better": {"pope": task.higher_is_better},
        "config": cfg,
        "config_hash": config_hash(cfg),
        "pair_hash": pair_hash(cfg),
        "task": task.describe(),
        "samples_file": "samples_pope.jsonl",
        "sample_set": sample_set(samples, {s.sample_id for s in samples}),
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


def by_label(entries):
    return {(e.model, e.method): e for e in entries}


def test_known_delta_ci_changed_answers_and_time_ratio(tmp_path):
    write_run(tmp_path, right=range(8), wall=0.01)  # 8/20 right
    write_run(tmp_path, method="var", right=range(16), wall=0.03)  # 16/20: +0.4, 8 answers changed (4 images of 10)
    entries = by_label(build_entries(scan(tmp_path)))
    base, var = entries[("llava", "none")], entries[("llava", "var")]
    assert base.is_baseline and base.value == pytest.approx(0.4) and base.delta is None
    assert var.value == pytest.approx(0.8) and var.delta == pytest.approx(0.4)
    # a draw misses all 4 changed images with probability 0.6**10 = 0.006 < 2.5 %: the interval excludes 0
    assert 0 < var.ci_low <= 0.4 <= var.ci_high
    assert var.p_value < 0.05 and var.significance in ("*", "**")
    assert var.changed == 8 and [x["sample_id"] for x in var.examples] == [f"random/{i}" for i in range(8, 13)]
    assert var.examples[0]["baseline_parsed"] != var.examples[0]["method_parsed"]
    assert var.time_ratio == pytest.approx(3.0) and var.n_paired == 20
    assert var.improves is True and var.stderr > 0


def test_missing_baseline_gives_no_delta_and_says_why(tmp_path):
    write_run(tmp_path, right=range(10))
    write_run(tmp_path, method="var", model="qwen_vl", right=range(14))  # no method=none for qwen_vl
    var = by_label(build_entries(scan(tmp_path)))[("qwen_vl", "var")]
    assert var.delta is None and var.time_ratio is None and var.changed is None
    assert "no method=none run" in var.note and var.value == pytest.approx(0.7)


def test_seeds_are_aggregated_and_paired_seed_by_seed(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path, seed=seed, right=range(10))
    write_run(tmp_path, method="var", seed=0, right=range(12))  # +0.1
    write_run(tmp_path, method="var", seed=1, right=range(16))  # +0.3
    entries = build_entries(scan(tmp_path))
    assert len(entries) == 2, "one row per (model, method), seeds folded in"
    var = by_label(entries)[("llava", "var")]
    assert var.seeds == [0, 1] and var.value == pytest.approx(0.7)
    assert var.spread == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert var.delta == pytest.approx(0.2), "mean of the per-seed paired differences"
    assert var.ci_low < 0.2 < var.ci_high


def test_runs_on_other_items_are_never_paired(tmp_path):
    write_run(tmp_path, right=range(10), n=20)
    write_run(tmp_path, method="var", right=range(10), n=18)  # a smaller limit: other items
    var = by_label(build_entries(scan(tmp_path)))[("llava", "var")]
    assert var.delta is None and "no method=none run on the same items" in var.note
    assert var.n_samples == 18


def test_method_variants_get_distinct_labels(tmp_path):
    write_run(tmp_path, right=range(10))
    write_run(tmp_path, method="var", method_opts={"p": 0.4}, right=range(11))
    write_run(tmp_path, method="var", method_opts={"p": 0.6}, right=range(13))
    entries = by_label(build_entries(scan(tmp_path)))
    assert entries[("llava", "var (p=0.4)")].delta == pytest.approx(0.05)
    assert entries[("llava", "var (p=0.6)")].delta == pytest.approx(0.15)


def test_cli_writes_markdown_html_json_and_plots(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(runs, right=range(12))
    write_run(runs, method="var", right=range(16))
    write_run(runs, method="fastv", right=range(8), wall=0.005)
    (runs / "pope" / "broken").mkdir()
    (runs / "pope" / "broken" / "results.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        leaderboard_main([str(runs), "--out", str(tmp_path / "lb")])
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "| llava | var | 20 | 0 | 0.8000 ± " in md and "+0.2000 [" in md
    assert "| llava | fastv |" in md and "-0.2000 [" in md and "0.50×" in md
    assert "| none | 0.6000 (n=20) |" in md, "the method x model matrix, n in every cell"
    doc = json.loads((tmp_path / "lb" / "leaderboard.json").read_text())
    assert doc["n_runs"] == 3 and {e["method"] for e in doc["entries"]} == {"none", "var", "fastv"}
    assert (tmp_path / "lb" / "leaderboard.html").read_text().count("<tr") >= 4
    pngs = sorted(p.name for p in (tmp_path / "lb" / "plots").glob("*.png"))
    assert pngs == ["cost_llava.png", "delta_pope.png"]
    assert "plots/delta_pope.png" in md
    assert "var" in capsys.readouterr().out


def test_the_leaderboard_never_imports_torch_or_a_model(tmp_path):
    write_run(tmp_path / "runs", right=range(12))
    write_run(tmp_path / "runs", method="var", right=range(16))
    code = (
        "import sys; from reports.leaderboard import main; "
        f"main([{str(tmp_path / 'runs')!r}, '--out', {str(tmp_path / 'lb')!r}]); "
        "bad = [m for m in ('torch', 'transformers', 'adapters', 'methods', 'harness.engine') if m in sys.modules]; "
        "assert not bad, bad"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


def test_wandb_mirror_logs_the_table_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    write_run(tmp_path / "runs", right=range(12))
    write_run(tmp_path / "runs", method="var", right=range(16))
    leaderboard_main([str(tmp_path / "runs"), "--out", str(tmp_path / "lb"), "--logger", "wandb"])
    (run,) = (tmp_path / "lb" / "wandb").glob("offline-run-*")
    tables = list((run / "files" / "media" / "table").rglob("*.json"))
    assert tables and "delta" in json.loads(tables[0].read_text())["columns"]
    images = {p.name.split("_")[0] for p in (run / "files" / "media" / "images").rglob("*.png")}
    assert images, "plots logged as images"
