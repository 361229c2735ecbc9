"""Calibrate a pruner's positional (recency) trend for attention debiasing.

    python -m methods.calibrate debias --model llava --pruner fastv [--layer auto --rule last] [--family exp]
    python -m methods.calibrate debias --model llava --pruner fastervlm

Runs the pruner's own scoring (nothing pruned) over calibration prompts and images, normalises every image
tile's score vector to mean 1 (the trend is content-agnostic; normalising keeps images with more total visual
attention from dominating), averages per flattened token index over the tiles of the most common length, fits
the curve family by least squares (:func:`methods.debias.fit_trend`) and stores it under the pruner's key in
``attn_debias.json`` beside the checkpoint (or ``--out``). Default images: fresh shapes-world scenes of a
``calibration`` split (never the evaluation images); ``--images DIR`` takes a folder (e.g. COCO train images for a
real checkpoint).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from adapters.base import Adapter
from methods.calibrate import parser
from methods.debias import FAMILIES, TREND_FILE, PositionalTrend, fit_trend, save_trend, trend_key

QUESTIONS = ("Describe this image.", "Is there a circle in the image?", "What colour is the largest object?")


def calibration_images(n: int, folder: str | None, seed: int = 0) -> list[Image.Image]:
    """``n`` images: from ``folder`` (sorted) or fresh shapes-world scenes of the ``calibration`` split."""
    if folder:
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
        if not files:
            raise SystemExit(f"no .jpg/.png images in {folder}")
        return [Image.open(f).convert("RGB") for f in files]
    from shapes.scene import generate

    return [Image.fromarray(s.image) for s in generate(n, seed, split="calibration")]


def record_scores(adapter: Adapter, pruner, images: list[Image.Image], batch_size: int = 8) -> list[torch.Tensor]:
    """Every tile's raw scores under ``pruner`` (a FastV / FasterVLM instance that keeps every token)."""
    pruner.recorded = []
    with torch.inference_mode(), pruner.bind(adapter):
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            prompts = [adapter.format_prompt(QUESTIONS[(start + i) % len(QUESTIONS)]) for i in range(len(chunk))]
            adapter.forward(adapter.build_inputs(prompts, [[im] for im in chunk]), logits_to_keep=1)
    return pruner.recorded


def mean_profile(tiles: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Per-index mean of mean-normalised score vectors of the most common length; ``(profile [L], n_tiles)``."""
    length = Counter(len(t) for t in tiles).most_common(1)[0][0]
    same = torch.stack([t.float() / t.float().mean().clamp(min=1e-12) for t in tiles if len(t) == length])
    return same.mean(0), same.shape[0]


def calibrate(adapter: Adapter, pruner_name: str, layer: str, rule: str, family: str, images: list[Image.Image],
              batch_size: int = 8) -> tuple[str, PositionalTrend]:  # fmt: skip
    """Fit the trend of ``pruner_name`` on ``adapter`` (loaded); returns its file key and the trend."""
    from methods.fastervlm import TREND_KEY, FasterVLM
    from methods.fastv import FastV, resolve_layer

    if pruner_name == "fastv":
        pruner = FastV(layer=layer, ratio=0.0, rule=rule)
        key = trend_key("fastv", resolve_layer(layer, adapter.num_layers("lm")), rule)
    else:
        pruner, key = FasterVLM(ratio=0.0), TREND_KEY
    profile, n = mean_profile(record_scores(adapter, pruner, images, batch_size))
    trend = fit_trend(profile, family, pruner=pruner_name, images=len(images), tiles=n, positions=len(profile),
                      profile=[round(float(v), 5) for v in profile])  # fmt: skip
    return key, trend


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    import adapters  # noqa: F401  (registers adapters)
    from harness.config import calibration_target

    ap = parser("debias", "Fit a pruner's positional attention trend for debiasing", TREND_FILE)
    ap.add_argument("--pruner", choices=("fastv", "fastervlm"), default="fastv")
    ap.add_argument("--layer", default="auto", help="FastV K (as method.layer)")
    ap.add_argument("--rule", choices=("last", "mean"), default="last", help="FastV score rule")
    ap.add_argument("--family", choices=FAMILIES, default="exp", help="curve family")
    ap.add_argument("--images", default=None, help="folder of calibration images (default: fresh shapes scenes)")
    ap.add_argument("--n", type=int, default=256, help="calibration images")
    args = ap.parse_args(argv)
    adapter, out = calibration_target(args.model, args.path, args.out, TREND_FILE, "debias_file")
    adapter.load()
    key, trend = calibrate(adapter, args.pruner, args.layer, args.rule, args.family,
                           calibration_images(args.n, args.images))  # fmt: skip
    save_trend(out, key, trend)
    print(json.dumps({key: trend.to_dict()}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
