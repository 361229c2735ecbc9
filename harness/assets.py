"""Build the embedded default shipped in ``assets/``: a tiny random-init LLaVA and a shapes-world POPE set.

    python -m harness.assets            # rebuild both into assets/ (deterministic)
    python -m harness.assets --out DIR  # elsewhere

The model is random-init (its answers mean nothing); it exists so that ``python run.py`` runs end to end on a
fresh machine with no network. The POPE set is written in the official COCO POPE format (JSON Lines per split)
by the same builder that follows POPE's sampling rules, and read back by the same loader as the real files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2

from adapters.tiny import LlavaSize, build_tiny_llava
from harness.config import REPO_ROOT
from tasks.pope_build import write_pope_files
from tasks.shapes import COLOURS, SHAPES, WorldSpec, generate

POPE_SPLITS = ("random", "popular", "adversarial")


def tokenizer_corpus() -> list[str]:
    """Prompt-shaped lines covering the world's vocabulary and the llava-1.5 conversation format."""
    lines = []
    for shape in SHAPES:
        art = "an" if shape[0] in "aeiou" else "a"
        for colour in COLOURS:
            lines.append(
                f"USER: <image>\nIs there {art} {shape} in the image?\nAnswer the question using a single "
                f"word or phrase. ASSISTANT: Yes. No. yes no There is {art} {colour} {shape}."
            )
    lines += [
        "Please describe this image in detail.",
        "What is the correct order of the steps?",
        "left right top bottom middle one two three four five six seven",
    ]
    return lines


def build_pope_set(out_dir: Path, n_images: int = 15, seed: int = 1234, spec: WorldSpec = WorldSpec()) -> Path:
    """Render ``n_images`` scenes and write POPE question files for the three splits."""
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    gt: dict[str, list[str]] = {}
    meta = []
    for i, (img, objs) in enumerate(generate(n_images, seed, spec)):
        name = f"shapes_{i:05d}.png"
        cv2.imwrite(str(img_dir / name), img[:, :, ::-1])  # RGB → BGR for OpenCV
        gt[name] = [o.shape for o in objs]
        meta.append(
            {
                "image": name,
                "objects": [
                    {"shape": o.shape, "colour": o.colour, "center": o.center, "radius": o.radius} for o in objs
                ],
            }
        )
    write_pope_files(gt, out_dir, prefix="shapes", seed=seed, splits=POPE_SPLITS)
    (out_dir / "scenes.json").write_text(json.dumps({"seed": seed, "spec": repr(spec), "scenes": meta}, indent=1))
    return out_dir


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "assets")
    args = ap.parse_args()
    build_tiny_llava(args.out / "tiny-llava", tokenizer_corpus(), LlavaSize(), seed=0)
    build_pope_set(args.out / "shapes-pope")
    print(f"built {args.out}/tiny-llava and {args.out}/shapes-pope")


if __name__ == "__main__":
    main()
