"""The shipped embedded default: the world export is exactly what the exporter builds, and the shipped trained
checkpoint's recorded POPE metrics are reproduced exactly by ``python run.py`` (greedy, CPU)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from harness.assets import CALIBRATION_FILES, MODEL_DIR, MODEL_DIRS, SHIPPED, WORLD_DIR, build_world
from harness.config import REPO_ROOT


def _digests(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_shipped_world_export_is_reproducible(tmp_path):
    build_world(tmp_path / "w")
    assert _digests(tmp_path / "w") == _digests(WORLD_DIR)


@pytest.mark.parametrize("family", sorted(SHIPPED))
def test_shipped_checkpoint_is_an_ordinary_hf_directory(family):
    names = {p.name for p in MODEL_DIRS[family].iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "processor_config.json",
        "chat_template.jinja",
        "train_config.json",
        "training_log.json",
        "recorded_pope.json",
    } <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    trained_with = json.loads((MODEL_DIRS[family] / "train_config.json").read_text())["method"]
    assert (trained_with or "none") == SHIPPED[family].method, "evaluated with the method it was trained with"


@pytest.mark.parametrize("family", sorted(SHIPPED))
def test_run_py_reproduces_the_recorded_pope_metrics_exactly(tmp_path, family):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    method = SHIPPED[family].method
    p = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "run.py"),
            f"model={family}",
            f"method={method}",
            f"output_root={tmp_path}",
            "progress=false",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (results,) = tmp_path.glob(f"pope/{family}/{method}-*/results.json")
    got = json.loads(results.read_text())
    assert got["n-samples"]["pope"]["errors"] == 0
    assert got["results"] == json.loads((MODEL_DIRS[family] / "recorded_pope.json").read_text())


def _fpr(split):
    # balanced splits: yes_ratio = (TP + FP) / N and recall = TP / (N / 2)  ⇒  FPR = 2·yes_ratio − recall
    return 2 * split["yes_ratio,pope_official"] - split["recall,pope_official"]


def test_shipped_checkpoint_is_grounded_and_shows_the_induced_gap():
    # Issue targets: random-split accuracy >= 0.85 and adversarial accuracy >= 3 points lower, from false positives.
    # A retrain that loses the prior fails here (README: run-to-run variation of the gap).
    rec = json.loads((MODEL_DIR / "recorded_pope.json").read_text())
    rnd, adv = rec["pope_random"], rec["pope_adversarial"]
    assert rnd["accuracy,pope_official"] >= 0.85, "grounded: random-split accuracy >= 0.85"
    assert rnd["accuracy,pope_official"] - adv["accuracy,pope_official"] >= 0.03, "induced hallucination gap"
    assert _fpr(adv) > _fpr(rnd) + 0.04, "the gap comes from false positives on co-occurring objects"


@pytest.mark.parametrize("family", ["qwen_vl", "internvl"])
def test_other_shipped_families_are_grounded(family):
    # Bar set before training them: a trained tiny checkpoint answers from the image, not from the prior.
    rec = json.loads((MODEL_DIRS[family] / "recorded_pope.json").read_text())
    assert rec["pope_random"]["accuracy,pope_official"] >= 0.80


@pytest.mark.parametrize("family", ["llava_cca", "llava_mma"])
def test_method_trained_llavas_answer_from_the_image(family):
    # The LLaVA recipe (q = 0) run with CCA / MMA inside grounds markedly worse at this size (random accuracy
    # 0.637 / 0.702 against 0.888 for the causal q = 0 run; README, "Methods"): this guards only that a retrain
    # stays clearly above chance (0.5) and keeps recall and specificity both non-trivial (not a constant answer).
    rec = json.loads((MODEL_DIRS[family] / "recorded_pope.json").read_text())["pope_random"]
    assert rec["accuracy,pope_official"] >= 0.60
    assert 0.2 < rec["yes_ratio,pope_official"] < 0.8


def test_many_token_llava_answers_from_the_image():
    # llava_144 (96 px, 144 visual tokens, 4-layer LM) is the pruning benchmark's second accuracy model (POPE random
    # 0.859; with a 2-layer LM the recipe reached only 0.730, README "Pruning"). Guard: a retrain stays clearly
    # above chance with both recall and specificity non-trivial, and keeps the 144-token grid.
    rec = json.loads((MODEL_DIRS["llava_144"] / "recorded_pope.json").read_text())["pope_random"]
    assert rec["accuracy,pope_official"] >= 0.65
    assert 0.2 < rec["yes_ratio,pope_official"] < 0.8
    vision = json.loads((MODEL_DIRS["llava_144"] / "config.json").read_text())["vision_config"]
    assert (vision["image_size"] // vision["patch_size"]) ** 2 == 144


@pytest.mark.parametrize("model", sorted(SHIPPED))
def test_train_reruns_every_calibration_committed_beside_a_checkpoint(model):
    # Training deletes the checkpoint directory; `harness.assets train` must re-run exactly the calibrations whose
    # files are committed there (and the debiasing fits of the same pruners), or a retrained checkpoint ships stale
    # or missing calibrations.
    ship = SHIPPED[model]
    expected = {CALIBRATION_FILES[module] for module, *_ in ship.calibrations}
    assert {f for f in CALIBRATION_FILES.values() if (ship.path / f).exists()} == expected
    pruners = {extra[extra.index("--pruner") + 1] for module, *extra in ship.calibrations if "--pruner" in extra}
    if pruners:
        fits = json.loads((ship.path / "attn_debias.json").read_text())
        assert {key.split("/")[0] for key in fits} == pruners
