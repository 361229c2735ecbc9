"""The shipped embedded default: the world export is exactly what the exporter builds (the mp4 clips: what was
encoded), and the shipped trained checkpoint's recorded POPE metrics are reproduced exactly by ``python run.py``
(greedy, CPU)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors import safe_open

from harness.config import REPO_ROOT
from shapes.assets import CALIBRATION_FILES, MODEL_DIR, MODEL_DIRS, SHIPPED, WORLD_DIR, build_world
from shapes.export import VCR_SPEC, encoder_frames, frames_digest, make_vcr_sample


def _digests(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# The VCR clips' bytes depend on the OpenCV/FFmpeg build's mp4v encoder: opencv-python-headless 5.1 writes other
# bytes than 4.x from the same frames, and (mp4v is lossy) other decoded pixels (mean |difference| ~1.2 of 255).
ENCODER_DEPENDENT = ".mp4"
# MME's parquet file: its footer names the writer (pyarrow 15 writes other bytes than 23 from the same table), so
# it is compared as a table.
WRITER_DEPENDENT = ".parquet"
# A sanity floor (every frame), not an identity test: the shipped clips decode to >= 20.7 dB of their own encoder
# frames, <= 15.8 dB of any other clip's of the same length; a clip order swap can stay above it. Identity is the
# digest of the encoder frames.
MIN_CLIP_PSNR_DB = 18.0


def _decode(path):
    cap, frames = cv2.VideoCapture(str(path)), []
    while (frame := cap.read())[0]:
        frames.append(frame[1])
    cap.release()
    return frames


def _psnr(a, b):
    mse = np.mean((np.asarray(a, float) - np.asarray(b, float)) ** 2)
    return 10 * np.log10(255**2 / mse)


def test_shipped_world_export_is_reproducible(tmp_path):
    """Every shipped world file byte for byte except the mp4 clips, compared by what was encoded, and MME's parquet
    file, compared as a table (WRITER_DEPENDENT).

    Their bytes depend on the encoder build (ENCODER_DEPENDENT), so for them the identity check is on the frames
    handed to the encoder: metadata.json (compared byte for byte) records each clip's ``frames_digest``, which the
    rebuild recomputes from the frames it encodes, and the regenerated encoder frames must hash to it. The shipped
    and the rebuilt clip must both decode to exactly those frames' count and size, within MIN_CLIP_PSNR_DB.
    """
    rebuilt = build_world(tmp_path / "w")
    new, old = _digests(rebuilt), _digests(WORLD_DIR)
    assert sorted(new) == sorted(old)
    exact = (ENCODER_DEPENDENT, WRITER_DEPENDENT)
    assert {p: d for p, d in new.items() if not p.endswith(exact)} == {
        p: d for p, d in old.items() if not p.endswith(exact)
    }
    for table in (p for p in old if p.endswith(WRITER_DEPENDENT)):
        assert pq.read_table(rebuilt / table).equals(pq.read_table(WORLD_DIR / table)), table
    encoded = json.loads((WORLD_DIR / "metadata.json").read_text())["vcr"]["encoded_frames"]
    clips = sorted(p for p in old if p.endswith(ENCODER_DEPENDENT))
    assert [f"vcr/videos/{name}" for name in sorted(encoded)] == clips
    for record in json.loads((WORLD_DIR / "vcr" / "data.json").read_text()):
        frames = encoder_frames(make_vcr_sample(0, int(record["qid"]) - 1, VCR_SPEC))
        assert frames_digest(frames) == encoded[record["video_file"]]
        for root in (WORLD_DIR, rebuilt):
            decoded = _decode(root / "vcr" / "videos" / record["video_file"])
            assert [d.shape for d in decoded] == [f.shape for f in frames], (root, record["video_file"])
            assert min(map(_psnr, decoded, frames)) >= MIN_CLIP_PSNR_DB, (root, record["video_file"])


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
def test_shipped_checkpoint_is_in_the_layout_vllm_loads(family):
    # what shapes.train.export_layout writes (make train, tests/test_train.py); tests_vllm/ loads them in vLLM
    out, family = MODEL_DIRS[family], SHIPPED[family].family
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"], "vLLM loads every *.safetensors"
    keys = safe_open(str(out / "model.safetensors"), "pt").keys()
    tower = [k for k in keys if k.startswith("vision_tower.")]
    if family == "llava":
        assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
    assert (out / "video_preprocessor_config.json").exists() == (family in ("qwen_vl", "internvl"))


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
    # Training deletes the checkpoint directory; `shapes.assets train` must re-run exactly the calibrations whose
    # files are committed there (and the debiasing fits of the same pruners), or a retrained checkpoint ships stale
    # or missing calibrations.
    ship = SHIPPED[model]
    expected = {CALIBRATION_FILES[module] for module, *_ in ship.calibrations}
    assert {f for f in CALIBRATION_FILES.values() if (ship.path / f).exists()} == expected
    pruners = {extra[extra.index("--pruner") + 1] for module, *extra in ship.calibrations if "--pruner" in extra}
    if pruners:
        fits = json.loads((ship.path / "attn_debias.json").read_text())
        assert {key.split("/")[0] for key in fits} == pruners
