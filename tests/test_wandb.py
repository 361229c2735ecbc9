"""W&B mirror: offline mode writes a run directory with the logged results; failures never stop a run."""

from __future__ import annotations

import json
import time

import pytest

from core.loggers import WandbLogger
from harness.engine import RunSettings, evaluate
from methods.none import NoMethod


def test_offline_run_writes_a_run_directory(llava, pope_dir, tmp_path, monkeypatch, make_task):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    logger = WandbLogger(project="test", name="offline-test", tags=["ci"])
    out = tmp_path / "run"
    cfg = {"model": {"name": "llava"}, "seed": 0}
    try:
        logger.start(cfg, out)
        assert logger.run is not None, "wandb.init must succeed offline"
        res = evaluate(
            make_task(pope_dir, limit=1),
            llava,
            NoMethod(),
            RunSettings(output_dir=out, config_hash="w", progress=False),
            logger,
        )
        run_dir = logger.run.dir
    finally:
        logger.finish()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "the W&B run lives inside the run directory"
    history = list(runs[0].glob("run-*.wandb"))
    assert history, "history file written"
    # wandb's writer is its own service process: once `finish()` returns, the file can still be a bare header for a
    # moment (seen once in CI: 9 bytes). Wait for it rather than read a half-written file; a run that never records
    # the config and metrics still fails after the deadline.
    deadline = time.monotonic() + 30
    while True:
        blob = history[0].read_bytes()
        recorded = b"llava" in blob and b"pope_random/accuracy,pope_official" in blob
        if recorded or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert recorded, "config and metrics recorded"
    assert (out / "results.json").exists() and res["results"]
    assert run_dir.startswith(str(runs[0]))
    tables = list((runs[0] / "files" / "media" / "table").rglob("*.json"))
    assert tables, "eval_results and samples tables logged"
    assert any("raw_output" in json.loads(t.read_text())["columns"] for t in tables)


def test_wandb_that_cannot_start_warns_and_the_run_continues(llava, pope_dir, tmp_path, monkeypatch, make_task):
    import wandb

    def unreachable(**kwargs):  # what a machine without network or credentials gets from wandb.init
        raise wandb.errors.CommError("could not reach the W&B server")

    monkeypatch.setattr(wandb, "init", unreachable)
    logger = WandbLogger(project="test")
    with pytest.warns(UserWarning, match="W&B could not start"):
        logger.start({}, tmp_path)
    res = evaluate(
        make_task(pope_dir, limit=1),
        llava,
        NoMethod(),
        RunSettings(output_dir=tmp_path, config_hash="w", progress=False),
        logger,
    )
    logger.finish()
    assert res["results"] and (tmp_path / "results.json").exists()


def test_paired_block_becomes_scalars():
    from core.loggers import _paired_scalars

    paired = {
        "metrics": {"mme": {"acc,mme_official": {"method": 0.7, "baseline": 0.6, "diff": 0.1, "diff_stderr": 0.02,
                                                 "ci_low": 0.06, "ci_high": None}}},
        "mcnemar": {"p_value_exact": 0.03, "statistic": 4.2},
    }  # fmt: skip
    assert _paired_scalars(paired) == {
        "paired/mme/acc,mme_official/diff": 0.1,
        "paired/mme/acc,mme_official/diff_stderr": 0.02,
        "paired/mme/acc,mme_official/ci_low": 0.06,
        "paired/mcnemar/p_value_exact": 0.03,  # ci_high is None: left out
        "paired/mcnemar/statistic": 4.2,
    }
    assert _paired_scalars({"baseline_dir": "x", "error": "no"}) == {} and _paired_scalars(None) == {}
