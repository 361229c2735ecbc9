"""Cluster sweeps through Hydra's submitit launcher: the local executor runs a 2×2 grid as separate jobs, and the
leaderboard reads exactly the four runs; the SLURM launcher config composes with its documented settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from harness.config import REPO_ROOT

GRID = ["method=none,fastv", "model=llava,qwen_vl"]


def test_submitit_local_sweep_feeds_the_leaderboard(tmp_path):
    out = tmp_path / "outputs"
    cmd = [sys.executable, str(REPO_ROOT / "run.py"), "-m", "hydra/launcher=submitit_local",
           "hydra.launcher.timeout_min=10", *GRID, "limit=2", "progress=false", f"output_root={out}"]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    results = sorted(out.glob("pope/*/*/results.json"))
    assert len(results) == 4
    jobs = [d for d in (out / ".submitit").iterdir() if d.name.isdigit()]
    assert len(jobs) == 4, "one submitit job per configuration"
    assert all(list(job.glob("*_result.pkl")) for job in jobs), "every job finished and returned"
    for path in results:
        res = json.loads(path.read_text())
        model, method = path.parent.parent.name, path.parent.name.split("-")[0]
        assert (res["config"]["model"]["name"], res["config"]["method"]["name"]) == (model, method)
        assert res["n-samples"]["pope"]["effective"] == 6

    lb = subprocess.run([sys.executable, "-m", "reports.leaderboard", str(out)], capture_output=True, text=True,
                        timeout=300, cwd=REPO_ROOT)  # fmt: skip
    assert lb.returncode == 0, lb.stderr[-3000:]
    rows = json.loads((out / "leaderboard" / "leaderboard.json").read_text())["entries"]
    assert sorted((r["model"], r["method"]) for r in rows) == [
        ("llava", "fastv"), ("llava", "none"), ("qwen_vl", "fastv"), ("qwen_vl", "none")
    ]  # fmt: skip
    for row in rows:
        assert row["n_samples"] == 6
        if row["method"] == "fastv":
            assert row["n_paired"] == 6 and row["delta"] is not None, row  # paired with its model's none run


def test_slurm_launcher_config_composes_with_gpu_settings():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        hcfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4"],
            return_hydra_config=True,
        )
    launcher = hcfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 4, 1)
    assert launcher.timeout_min == 240 and launcher.mem_gb == 64
    assert hcfg.hydra.sweep.subdir.startswith("pope/llava/none-")  # the leaderboard's run layout
