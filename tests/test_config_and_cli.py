"""Hydra composition, config hash / output dir, unknown options, and run.py end to end in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from harness.config import REPO_ROOT, config_hash

CONF = str(REPO_ROOT / "conf")


@pytest.fixture
def hydra_ctx():
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        yield
    GlobalHydra.instance().clear()


def test_compose_defaults_and_overrides(hydra_ctx):
    cfg = compose("config", overrides=["method=none", "model=llava", "task=pope", "limit=20", "batch_size=4"])
    assert cfg.model._target_ == "adapters.llava.LlavaAdapter"
    assert cfg.method.name == "none" and cfg.task.name == "pope" and cfg.logger._target_.endswith("NoLogger")
    assert cfg.limit == 20 and cfg.batch_size == 4
    assert os.path.isdir(cfg.model.path), "the embedded default checkpoint is shipped in the repo"
    assert cfg.output_dir.startswith("outputs/pope/llava/none-")
    assert cfg.output_dir.endswith(f"{config_hash(cfg)}-limit20"), "a limited run has its own directory"


def test_hash_ignores_run_options_but_not_results_options(hydra_ctx):
    base = compose("config")
    same = compose("config", overrides=["limit=5", "batch_size=1", "strict=true", "output_root=/elsewhere"])
    other = compose("config", overrides=["task.gen_kwargs.max_new_tokens=4"])
    seed = compose("config", overrides=["seed=1"])
    assert config_hash(base) == config_hash(same)
    assert len({config_hash(base), config_hash(other), config_hash(seed)}) == 3


def test_unknown_group_option_lists_valid_choices(hydra_ctx):
    with pytest.raises(Exception, match=r"(?s)Could not find 'method/nonee'.*Available options in 'method'.*none"):
        compose("config", overrides=["method=nonee"])


def _run(args, cwd, timeout=300):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_run_py_end_to_end_and_multirun(tmp_path):
    out = tmp_path / "outs"
    common = [f"output_root={out}", "limit=2", "task.gen_kwargs.max_new_tokens=4", "progress=false"]
    p = _run(["method=none", "model=llava", "task=pope", *common], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "|pope|" in p.stdout and "accuracy" in p.stdout
    results = list(out.glob("pope/llava/none-*/results.json"))
    assert len(results) == 1
    res = json.loads(results[0].read_text())
    assert res["n-samples"]["pope"]["original"] == 6
    assert (results[0].parent / "samples_pope.jsonl").read_text().count("\n") == 6
    assert (results[0].parent / ".hydra" / "config.yaml").exists()
    assert OmegaConf.create(res["config"]).limit == 2

    m = _run(["-m", "seed=0,1", "method=none,fastv", *common], cwd=tmp_path)
    assert m.returncode == 0, m.stderr[-3000:]
    assert len(list(out.glob("pope/llava/none-*/results.json"))) == 2, "seed=0 resumed in place, seed=1 is new"
    assert (out / "multirun.yaml").exists()

    # the leaderboard on the multirun: seeds folded into one row per method, fastv paired with none per seed
    lb = subprocess.run(
        [sys.executable, "-m", "reports.leaderboard", str(out)], capture_output=True, text=True, timeout=300
    )
    assert lb.returncode == 0, lb.stderr[-3000:]
    rows = json.loads((out / "leaderboard" / "leaderboard.json").read_text())["entries"]
    assert [(r["method"], r["seeds"], r["n_samples"]) for r in rows] == [("none", [0, 1], 6), ("fastv", [0, 1], 6)]
    assert rows[1]["delta"] is not None and rows[1]["n_paired"] == 6
    for name in ("leaderboard.md", "leaderboard.html", "plots/delta_pope.png", "plots/cost_llava.png"):
        assert (out / "leaderboard" / name).stat().st_size > 0, name


def test_unknown_option_fails_cleanly_from_cli(tmp_path):
    p = _run(["method=var_typo", f"output_root={tmp_path}"], cwd=tmp_path, timeout=120)
    assert p.returncode == 2
    assert "unknown method 'var_typo'; did you mean 'var'?" in p.stderr and "none" in p.stderr


@pytest.mark.parametrize("family", ["qwen_vl", "internvl"])
def test_run_py_other_families_on_their_shipped_checkpoints(tmp_path, family):
    out = tmp_path / "outs"
    p = _run([f"model={family}", "task=pope", f"output_root={out}", "limit=3", "progress=false"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    (results,) = out.glob(f"pope/{family}/none-*/results.json")
    res = json.loads(results.read_text())
    assert res["n-samples"]["pope"] == {"original": 9, "effective": 9, "errors": 0}
    assert res["model"]["family"] == family and res["model"]["n_parameters"] > 0
    assert "|pope|" in p.stdout


def test_run_py_every_attention_method_on_every_shipped_family(tmp_path):
    out = tmp_path / "outs"
    args = ["-m", "method=var,cca,mma", "model=llava,qwen_vl,internvl", f"output_root={out}", "limit=1",
            "task.gen_kwargs.max_new_tokens=4", "progress=false"]  # fmt: skip
    p = _run(args, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for method in ("var", "cca", "mma"):
        for family in ("llava", "qwen_vl", "internvl"):
            (results,) = out.glob(f"pope/{family}/{method}-*/results.json")
            res = json.loads(results.read_text())
            assert res["n-samples"]["pope"] == {"original": 3, "effective": 3, "errors": 0}
            assert res["method"]["name"] == method
    var = json.loads(next(out.glob("pope/llava/var-*/results.json")).read_text())["method"]
    assert var["resolved"]["sink_source"].endswith("var_sinks.json"), "calibrated sink dims of the shipped model"


NEW_TASKS = ("chair", "mme", "vcrbench", "causal_pairs")


def _stderr_keys(res: dict) -> list[str]:
    return [k for row in res["results"].values() for k in row if "_stderr," in k and row[k] is not None]


def test_every_task_on_the_shipped_llava_with_paired_statistics(tmp_path):
    """``run.py task=chair|mme|vcrbench|causal_pairs`` on the shipped LLaVA; the CCA run of each task finds its
    ``method=none`` run (same model, task, samples, seed) and reports paired differences and McNemar's test."""
    out = tmp_path / "outs"
    args = ["-m", f"task={','.join(NEW_TASKS)}", "method=none,cca", f"output_root={out}", "limit=2",
            "++task.gen_kwargs.max_new_tokens=24", "progress=false"]  # fmt: skip
    p = _run(args, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for task in NEW_TASKS:
        (base,) = out.glob(f"{task}/llava/none-*/results.json")
        (cca,) = out.glob(f"{task}/llava/cca-*/results.json")
        res, res_cca = json.loads(base.read_text()), json.loads(cca.read_text())
        n = res["n-samples"][task]
        assert n["effective"] == n["original"] > 0 and n["errors"] == 0, (task, n)
        assert _stderr_keys(res), f"{task}: no standard error"
        assert "paired" not in res and res["pair_hash"] == res_cca["pair_hash"]
        paired = res_cca["paired"]
        assert paired["baseline_dir"] == str(base.parent) and paired["n_paired"] == n["effective"], task
        assert paired["mcnemar"]["outcome"] and 0 <= paired["mcnemar"]["p_value_exact"] <= 1
        some = next(iter(next(iter(paired["metrics"].values())).values()))
        assert set(some) == {"method", "baseline", "diff", "diff_stderr", "ci_low", "ci_high", "p_value"}
    assert "paired vs" in p.stdout

    # `python -m harness.paired RUN` recomputes the block from the stored records alone (no model needed)
    from harness.paired import main as paired_main

    (cca,) = out.glob("mme/llava/cca-*/results.json")
    before = json.loads(cca.read_text())
    cca.write_text(json.dumps({k: v for k, v in before.items() if k != "paired"}))
    paired_main([str(cca.parent)])
    assert json.loads(cca.read_text())["paired"] == before["paired"]


@pytest.mark.parametrize("family", ["qwen_vl", "internvl"])
def test_every_task_on_the_other_shipped_families(tmp_path, family):
    out = tmp_path / "outs"
    args = ["-m", f"task={','.join(NEW_TASKS)}", f"model={family}", f"output_root={out}", "limit=1",
            "++task.gen_kwargs.max_new_tokens=16", "progress=false"]  # fmt: skip
    p = _run(args, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for task in NEW_TASKS:
        (results,) = out.glob(f"{task}/{family}/none-*/results.json")
        n = json.loads(results.read_text())["n-samples"][task]
        assert n["effective"] == n["original"] > 0 and n["errors"] == 0, (task, n)


def test_rrd_pipeline_runs_under_a_method(tmp_path):
    """VCRBench's two-stage RRD (recognition with frames, then a text-only reasoning call) under VAR."""
    out = tmp_path / "outs"
    args = ["task=vcrbench", "task.mode=rrd", "method=var", f"output_root={out}", "limit=1",
            "task.gen_kwargs.max_new_tokens=12", "progress=false"]  # fmt: skip
    p = _run(args, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (samples,) = out.glob("vcrbench/llava/var-*/samples_vcrbench.jsonl")
    rec = json.loads(samples.read_text().splitlines()[0])
    stages = [(c["stage"], c["n_images"]) for c in rec["calls"]]
    assert stages[0][0] == "recognition" and stages[0][1] > 0
    assert stages[-1] == ("reasoning", 0), "the reasoning call is text-only"
    assert rec["raw_output"] == rec["calls"][-1]["output"]


def test_run_py_pruning_and_probing_methods_on_the_shipped_checkpoints(tmp_path):
    """fastv, fastervlm, fastv+debias and embedlens run from the CLI on the shipped LLaVA and write their results."""
    out = tmp_path / "outs"
    common = [f"output_root={out}", "limit=1", "task.gen_kwargs.max_new_tokens=4", "progress=false"]
    p = _run(["-m", "method=fastv,fastervlm,embedlens", "model=llava", *common], cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    d = _run(["method=fastv", "method.debias=true", "model=internvl", *common], cwd=tmp_path, timeout=300)
    assert d.returncode == 0, d.stderr[-3000:]
    for family, method in (("llava", "fastv"), ("llava", "fastervlm"), ("llava", "embedlens"), ("internvl", "fastv")):
        (results,) = out.glob(f"pope/{family}/{method}-*/results.json")
        res = json.loads(results.read_text())
        assert res["n-samples"]["pope"] == {"original": 3, "effective": 3, "errors": 0}
        assert "method_report" in res
    lens = next(out.glob("pope/llava/embedlens-*"))
    report = json.loads((lens / "results.json").read_text())["method_report"]
    assert report["images"] == len(list((lens / "embedlens" / "maps").glob("*.png"))) >= 1
    assert abs(sum(report["fractions"].values()) - 1) < 1e-3
    fastv = json.loads(next(out.glob("pope/llava/fastv-*/results.json")).read_text())["method_report"]
    assert fastv["kept_fraction"] == 0.5 and fastv["layer_K"] == 1
    q = _run(["method=fastervlm", "model=qwen_vl", *common], cwd=tmp_path, timeout=120)
    assert q.returncode != 0 and "no [CLS] token" in q.stderr


def test_run_py_carve_and_iri_on_the_shipped_checkpoints(tmp_path):
    """carve (masks saved) and iri (committed FCCT calibration) run from the CLI and write their results."""
    out = tmp_path / "outs"
    common = [f"output_root={out}", "limit=1", "task.gen_kwargs.max_new_tokens=4", "progress=false"]
    c = _run(["method=carve", "method.save_masks=true", "method.feed=both", "model=llava", *common], cwd=tmp_path)
    assert c.returncode == 0, c.stderr[-3000:]
    i = _run(["method=iri", "model=qwen_vl", *common], cwd=tmp_path)
    assert i.returncode == 0, i.stderr[-3000:]
    carve = next(out.glob("pope/llava/carve-*"))
    res = json.loads((carve / "results.json").read_text())
    assert res["n-samples"]["pope"] == {"original": 3, "effective": 3, "errors": 0}
    assert res["method_report"]["requests_refined"] == 3 and res["method_report"]["layers"] == [1]
    records = [json.loads(line) for line in (carve / "samples_pope.jsonl").read_text().splitlines()]
    assert all(r["prompt"].count("<image>") == 2 for r in records)  # feed=both: original + refined
    index = [json.loads(line) for line in (carve / "carve_masks" / "index.jsonl").read_text().splitlines()]
    assert len(index) == 3 and all((carve / "carve_masks" / e["file"]).is_file() for e in index)
    iri = json.loads(next(out.glob("pope/qwen_vl/iri-*/results.json")).read_text())["method"]
    assert iri["resolved"]["fcct_file"].endswith("shapes-qwen2vl/iri_fcct.json")
    assert iri["resolved"]["plan"]["attn"]["sources"] == [0] and iri["resolved"]["plan"]["attn"]["targets"] == [1]
    bare = tmp_path / "no-calibration"  # the shipped checkpoint without its iri_fcct.json
    bare.mkdir()
    for f in (REPO_ROOT / "assets" / "shapes-qwen2vl").iterdir():
        if f.name != "iri_fcct.json":
            (bare / f.name).symlink_to(f)
    missing = _run(["method=iri", "model=qwen_vl", f"model.path={bare}", *common], cwd=tmp_path)
    assert missing.returncode != 0 and "python -m methods.calibrate fcct" in missing.stderr
