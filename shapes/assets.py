"""The embedded default shipped in ``assets/``: the shapes-world exports and the trained tiny checkpoints.

    python -m shapes.assets world                     # re-export assets/shapes-world (deterministic, seconds)
    python -m shapes.assets train [--model llava]     # train a shipped checkpoint, record it, re-run its calibrations
    python -m shapes.assets record [--model llava]    # evaluate it on the shipped POPE set; write recorded_pope.json
    python -m shapes.assets calibrate [--model llava] # re-run the calibrations committed beside it

Shipped checkpoints (:data:`SHIPPED`, keyed by their ``conf/model`` option): ``llava`` (the default of
``python run.py``), ``qwen_vl`` (a tiny Qwen2-VL), ``internvl``, and ``llava_cca`` / ``llava_mma`` (LLaVA trained
with CCA / MMA, evaluated with the same method). ``recorded_pope.json`` holds the metrics
``python run.py model=<option> method=<its method>`` must reproduce exactly (greedy, CPU); a test checks it.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness.config import REPO_ROOT
from methods.calibrate import CALIBRATIONS
from shapes import scene as world
from shapes.scene import SYNONYMS, WorldSpec, generate

WORLD_DIR = REPO_ROOT / "assets" / "shapes-world"


@dataclass(frozen=True)
class Shipped:
    """A shipped tiny checkpoint: its ``conf/model`` option, directory, training recipe and evaluation method.

    Attributes:
        family: Adapter family (``shapes.train`` builder).
        path: Checkpoint directory.
        recipe: :class:`shapes.train.TrainConfig` overrides.
        method: The method it is trained AND evaluated with (``none`` for causally trained checkpoints).
        calibrations: Calibration CLIs (module + extra arguments, each run with ``--model <option>``) whose files
            are committed beside the checkpoint; training deletes the directory, so ``train`` re-runs them.
    """

    family: str
    path: Path
    recipe: dict = field(default_factory=dict)
    method: str = "none"
    calibrations: tuple[tuple[str, ...], ...] = ()


#: Calibration (``python -m methods.calibrate NAME``) → the file it writes beside the checkpoint.
CALIBRATION_FILES = {name: file for name, (_module, file) in CALIBRATIONS.items()}
_VAR_FCCT = (("var",), ("fcct",))
_FASTV = ("debias", "--pruner", "fastv")
_FASTERVLM = ("debias", "--pruner", "fastervlm")
_LLAVA_TOWER = str(REPO_ROOT / "assets" / "shapes-llava")  # its vision tower (shapes.train.tower_state)
#: conf/model option → shipped checkpoint. The CCA / MMA LLaVAs reuse the baseline LLaVA's stage-A vision tower
#: (stage A trains the tower alone, so the method cannot change it) and train stages B–C inside the method.
SHIPPED = {
    # Annotations naming an absent co-occurring partner (q = 0.25, full mix only; see shapes.train_data.Mix):
    # without them the POPE adversarial gap did not reproduce (1.6 points in one `make train` run; 2.8–3.8 in
    # other seeds); with them 3.1–4.7 in 3 of 3 runs (README, "Run-to-run variation").
    "llava": Shipped(
        "llava",
        REPO_ROOT / "assets" / "shapes-llava",
        {"implied_partner_prob": 0.25},
        calibrations=(*_VAR_FCCT, _FASTV, _FASTERVLM, ("embedlens",)),
    ),
    "qwen_vl": Shipped("qwen_vl", REPO_ROOT / "assets" / "shapes-qwen2vl", calibrations=(*_VAR_FCCT, _FASTV)),
    # InternViT learned presence slowly from scratch: after 3,000 stage-A steps its shape-set exact match was 0.19
    # (Qwen's tower: 0.81) and POPE random accuracy 0.70; it gets twice the steps (and residual scale 1 at init,
    # see shapes.train.TINY_BUILDERS).
    "internvl": Shipped(
        "internvl",
        REPO_ROOT / "assets" / "shapes-internvl",
        {"tower_steps": 6000},
        calibrations=(*_VAR_FCCT, _FASTV, _FASTERVLM),
    ),
    # 96-px input, 144 visual tokens (the world's 64-px scenes upsampled by the processor): the token-pruning
    # benchmark's second accuracy model, where keeping 10 % leaves 14 tokens (64 tokens leave 6). With the default's
    # 2-layer LM it grounded poorly (POPE random 0.730); with 4 LM layers 0.859 (README, "Pruning"). q = 0. The
    # shipped stage 3 ran on one thread from the stage-1 tower this recipe trains (tower_from), not via make train.
    "llava_144": Shipped(
        "llava", REPO_ROOT / "assets" / "shapes-llava-144", {"image_size": 96, "size": {"text_layers": 4}}
    ),
    "llava_cca": Shipped(
        "llava",
        REPO_ROOT / "assets" / "shapes-llava-cca",
        {"method": "cca", "tower_from": _LLAVA_TOWER},
        "cca",
        _VAR_FCCT,
    ),
    "llava_mma": Shipped(
        "llava",
        REPO_ROOT / "assets" / "shapes-llava-mma",
        {"method": "mma", "tower_from": _LLAVA_TOWER},
        "mma",
        _VAR_FCCT,
    ),
}
MODEL_DIRS = {name: ship.path for name, ship in SHIPPED.items()}
MODEL_DIR = MODEL_DIRS["llava"]
N_EVAL = 300  # eval-split scenes exported (CHAIR, MME, VQA-Causal)
#: POPE's own pool of 3-object scenes (see shapes.export.export_all for why 3): 200 images, 1,200 questions
#: per split. Until 2026-11-22 POPE read the 160 eval scenes with >= 3 objects, where the random and adversarial
#: splits differed too little to show the prior (partner share of negatives 0.34 vs 0.49; the LLaVA shipped then
#: had an adversarial gap of 2.9 points there, 3.8 on this pool); on this pool 0.31 vs 0.53.
N_POPE = 200
#: Co-occurrence strength of the EXPORTED eval scenes. Training scenes use TrainConfig.pair_prob (0.75, i.e. P(partner
#: | shape) ≈ 0.86; the world default 0.65 gives ≈ 0.8); the eval scenes break pairs more often (0.3, i.e. P ≈ 0.52,
#: still the top co-occurrence), so POPE's adversarial split, which ranks negatives by co-occurrence within the
#: evaluated images exactly as POPE does, finds absent partners to ask about. With 0.65 in both, most 3–4-object scenes
#: hold complete pairs and POPE's adversarial negatives are partners barely more often than random ones (24 % vs 20 %
#: of negatives, measured in the earlier 8-shape world), so the split cannot show the prior.
EVAL_PAIR_PROB = 0.3

EXTRA_TEXT = (
    "Answer the question using a single word or phrase. Please answer yes or no.",
    "Please describe this image in detail. Describe the image.",
    "These are shuffled clips of a procedure. The clip number is shown at the start of each clip. "
    "Identify the activity in each clip, then give the correct order of the clips to achieve the goal. "
    "Correct order: 1, 2, 3, 4, 5, 6, 7 Clip Goal: Build the arrangement step by step.",
)


def tokenizer_corpus(n_scenes: int = 300, seed: int = 0) -> list[str]:
    """Lines in the world's language (captions, synonyms, every question kind) and the tasks' prompt words."""
    rng = random.Random(seed)
    lines = list(EXTRA_TEXT) + [" ".join(words) for words in SYNONYMS.values()]
    for scene in generate(n_scenes, seed, WorldSpec(), split="tokenizer"):
        lines += [world.caption(scene, rng), world.reference_caption(scene, rng)]
        for kind in ("existence", "count", "colour", "position"):
            qa = getattr(world, f"qa_{kind}")(scene, rng)
            if qa:
                lines.append(f"USER: <image>\n{qa[0]} ASSISTANT: {qa[1]}")
    return lines


def build_world(out: Path = WORLD_DIR) -> Path:
    """Export the eval split in every benchmark's format (see :mod:`shapes.export`)."""
    from shapes.export import export_all

    export_all(out, seed=0, n_eval=N_EVAL, spec=WorldSpec(pair_prob=EVAL_PAIR_PROB), n_pope=N_POPE, overwrite=True)
    return out


def figure(out: Path = REPO_ROOT / "docs" / "shapes_world.png") -> Path:
    """README figure: training scenes (top, 2× upscaled) and the shape classes (bottom, one 64-px tile each)."""
    import cv2
    import numpy as np

    from shapes.scene import SHAPES, SceneObject, draw_object, make_scene

    spec = WorldSpec()
    scenes = [cv2.resize(make_scene(0, "train", i, spec).image, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
              for i in range(len(SHAPES) // 2)]  # fmt: skip
    tiles = []
    for shape in SHAPES:
        tile = np.full((64, 64, 3), 24, np.uint8)
        draw_object(tile, SceneObject(shape, "white", (32, 32), 22))
        tiles.append(tile)
    sheet = np.concatenate([np.concatenate(scenes, 1), np.concatenate(tiles, 1)], 0)  # [192, 64·n_shapes, 3]
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return out


def record_pope(
    model_dir: Path = MODEL_DIR,
    world_dir: Path = WORLD_DIR,
    output_root: Path | None = None,
    model: str = "llava",
    method: str = "none",
) -> dict:
    """Evaluate a checkpoint with the default run configuration and store its POPE metrics beside it.

    Args:
        model_dir: Checkpoint directory (written: ``recorded_pope.json``).
        world_dir: Shapes-world export whose POPE files are evaluated.
        output_root: Where the run's files go (a temporary directory by default).
        model: The ``conf/model`` option of the checkpoint.
        method: The ``conf/method`` option it is evaluated with.
    """
    import tempfile

    from harness.config import compose_config
    from harness.engine import evaluate, from_config

    cfg = compose_config(
        [
            f"model={model}",
            f"method={method}",
            f"model.path={model_dir}",
            f"task.questions='{world_dir}/pope/shapes_pope_{{split}}.json'",
            f"task.image_root={world_dir}/pope/images",
        ]
    )
    res = evaluate(*from_config(cfg, output_dir=output_root or tempfile.mkdtemp(prefix="record-")))
    (model_dir / "recorded_pope.json").write_text(json.dumps(res["results"], indent=1) + "\n")
    return res


def calibrate(model: str) -> None:
    """Re-run a shipped checkpoint's calibrations (:attr:`Shipped.calibrations`), each as its own CLI."""
    for name, *extra in SHIPPED[model].calibrations:
        subprocess.run([sys.executable, "-m", "methods.calibrate", name, "--model", model, *extra], check=True,
                       cwd=REPO_ROOT)  # fmt: skip


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["world", "train", "record", "calibrate", "figure"])
    ap.add_argument("--model", choices=sorted(SHIPPED), default="llava", help="shipped checkpoint (conf/model option)")
    args = ap.parse_args()
    ship = SHIPPED[args.model]
    if args.what == "world":
        print(f"exported {build_world()}")
    elif args.what == "figure":
        print(f"wrote {figure()}")
    elif args.what == "train":
        from shapes.train import TrainConfig, train

        exclude = str(WORLD_DIR / "metadata.json")
        train(TrainConfig(out=str(ship.path), family=ship.family, exclude=exclude, **ship.recipe), tokenizer_corpus())
        record_pope(ship.path, model=args.model, method=ship.method)
        calibrate(args.model)
    elif args.what == "calibrate":
        calibrate(args.model)
    else:
        record_pope(ship.path, model=args.model, method=ship.method)


if __name__ == "__main__":
    main()
