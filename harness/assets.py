"""The embedded default shipped in ``assets/``: the shapes-world exports and the trained tiny LLaVA.

    python -m harness.assets world    # re-export assets/shapes-world (deterministic, seconds)
    python -m harness.assets train    # train assets/shapes-llava on the world's train split (~15 min, 2 cores)
    python -m harness.assets record   # evaluate it on the shipped POPE set; write recorded_pope.json

``recorded_pope.json`` holds the metrics ``python run.py`` must reproduce exactly (greedy, CPU); a test checks it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from harness.config import REPO_ROOT
from tasks import shapes
from tasks.shapes import SYNONYMS, WorldSpec, generate

WORLD_DIR = REPO_ROOT / "assets" / "shapes-world"
MODEL_DIR = REPO_ROOT / "assets" / "shapes-llava"
N_EVAL = 300  # eval-split scenes exported (POPE keeps those with >= 3 objects)
#: Co-occurrence strength of the EXPORTED eval scenes. Training scenes use the world default (0.65, i.e.
#: P(partner | shape) ≈ 0.8); the eval scenes break pairs more often (0.3, i.e. P ≈ 0.55, still the top
#: co-occurrence), so POPE's adversarial split, which ranks negatives by co-occurrence within the evaluated
#: images exactly as POPE does, finds absent partners to ask about. With 0.65 in both, most 3–4-object scenes
#: hold complete pairs and POPE's adversarial negatives are partners barely more often than random ones
#: (24 % vs 20 % of negatives, measured), so the split cannot show the prior the model learned.
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
        lines += [shapes.caption(scene, rng), shapes.reference_caption(scene, rng)]
        for kind in ("existence", "count", "colour", "position"):
            qa = getattr(shapes, f"qa_{kind}")(scene, rng)
            if qa:
                lines.append(f"USER: <image>\n{qa[0]} ASSISTANT: {qa[1]}")
    return lines


def build_world(out: Path = WORLD_DIR) -> Path:
    """Export the eval split in every benchmark's format (see :mod:`tasks.shapes_export`)."""
    from tasks.shapes_export import export_all

    export_all(out, seed=0, n_eval=N_EVAL, spec=WorldSpec(pair_prob=EVAL_PAIR_PROB), overwrite=True)
    return out


def record_pope(model_dir: Path = MODEL_DIR, world_dir: Path = WORLD_DIR, output_root: Path | None = None) -> dict:
    """Evaluate the checkpoint with the default run configuration and store its POPE metrics beside it."""
    import tempfile

    from hydra import compose, initialize_config_dir

    from harness.engine import evaluate, from_config

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO_ROOT / "conf")):
        cfg = compose(
            "config",
            overrides=[
                f"model.path={model_dir}",
                f"task.questions='{world_dir}/pope/shapes_pope_{{split}}.json'",
                f"task.image_root={world_dir}/pope/images",
            ],
        )
    res = evaluate(*from_config(cfg, output_dir=output_root or tempfile.mkdtemp(prefix="record-")))
    (model_dir / "recorded_pope.json").write_text(json.dumps(res["results"], indent=1) + "\n")
    return res


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["world", "train", "record"])
    args = ap.parse_args()
    if args.what == "world":
        print(f"exported {build_world()}")
    elif args.what == "train":
        from harness.train import TrainConfig, train

        train(TrainConfig(out=str(MODEL_DIR), exclude=str(WORLD_DIR / "metadata.json")), tokenizer_corpus())
        record_pope()
    else:
        record_pope()


if __name__ == "__main__":
    main()
