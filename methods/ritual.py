r"""RITUAL — Random Image Transformations as a Universal Anti-hallucination Lever.

Woo et al., "RITUAL: Random Image Transformations as a Universal Anti-hallucination Lever in Large Vision Language
Models", arXiv 2405.17821 (2024); official code ``sangminwoo/RITUAL`` (``ritual_utils/ritual_sample.py``,
``eval_bench/pope_eval_llava.py``).

Where VCD subtracts a degraded view, RITUAL ADDS a randomly transformed one: the transformed image is a
complementary view whose logits reinforce the tokens both views support. Per sample one transformation ``T`` is
drawn uniformly from the pool below, and at every decoding step

    s   = l(v) + α · l(T(v))
    s_y = −inf  where  l_y(v) < log β + max l(v)                 (the adaptive plausibility constraint, as in VCD)

then the task's processors, the sampling warpers and the token choice run on ``s`` (:mod:`methods.contrast`); both
views run in one batched forward per step, each with its own KV cache. The model waits for the second view, so each
image is transformed and processed on its own host thread (:mod:`core.hostpool`).

The pool (``torchvision.transforms.v2`` in the official code; re-implemented here with PIL/NumPy so every random
parameter comes from the sample's own seeded generator), each drawn with probability 1/6:

    horizontal flip   ``RandomHorizontalFlip(p=1)``
    vertical flip     ``RandomVerticalFlip(p=1)``
    rotation          ``RandomRotation(degrees=180)``: angle ~ U(−180°, 180°) counter-clockwise about the centre,
                      nearest-neighbour, same canvas (corners filled black)
    color jitter      ``ColorJitter(brightness=1, contrast=1, saturation=1, hue=0.5)``: factors ~ U(0, 2), U(0, 2),
                      U(0, 2), hue shift ~ U(−0.5, 0.5), applied in a random order
    gaussian blur     ``GaussianBlur(kernel_size=13, sigma=(1.5, 2.0))``: σ ~ U(1.5, 2), 13 taps, reflect padding
    crop              ``RandomResizedCrop``: area ~ U(0.08, 1), log-aspect ~ U(log 3/4, log 4/3), 10 tries then the
                      central crop, bilinear resize

Hyperparameters (official defaults):
    alpha (float, default 3.0): α, ``--ritual_alpha_pos`` (argparse 3; the sampler's fallback 3).
    beta (float, default 0.1): β, ``--ritual_beta``.
    transforms (list, default all six): the pool (names as above, with underscores).
    seed (int, default 0): seeds every image's draw (with its prompt and pixels, see :mod:`methods.contrast`).
    log (bool, default True): write ``ritual_views.jsonl`` to the run directory, one line per transformed image:
        the prompt's sha256 (the records' ``prompt_hash``), the image index, the transformation and its parameters.

Decoding: the official scripts SAMPLE, ``do_sample=True, temperature=1, top_p=1, top_k=None``; the harness decodes
with the task's ``gen_kwargs`` (greedy for POPE) so the paired comparison with ``method=none`` changes one thing. The
official setting: ``task.gen_kwargs.do_sample=true task.gen_kwargs.temperature=1.0 task.gen_kwargs.top_p=1.0
task.gen_kwargs.top_k=0`` for BOTH runs. Beam search is refused before the model loads.

Convention traps:
    * The combination is a SUM: ``l + α·l'`` (α = 3 makes the scores 4× the logits' scale; under sampling at T = 1
      that sharpens the distribution, under greedy only the argmax matters). The ``(1 + α)·l − α·l'`` form is VCD's.
    * The transformation acts on the RAW image (PIL), before the processor, unlike VCD's noise.
    * The official crop outputs 336 × 336 (LLaVA-1.5's input side) whatever the image's size. Here the crop is resized
      to the ORIGINAL image's size, so Qwen-VL's dynamic resolution and InternVL's tiling keep the same token grid
      and both views batch together; for LLaVA on square images (the shapes world) the processor then resizes it to
      the same 336 × 336 input.
    * The official code draws with Python's global ``random.choice`` after ``seed=42`` (the draw depends on the
      sample's position in the run); here each image's draw is seeded per (seed, prompt, image), so it does not
      depend on the batch or the order, and it is logged.
    * torchvision's hue shift works on PIL's 8-bit HSV with wrap-around (``h + int(hue · 255)``); so does this.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from scipy.ndimage import correlate1d

from core.hostpool import host_map
from core.results import sha256_text
from methods.base import METHODS
from methods.contrast import TwoViewMethod

TRANSFORMS = ("horizontal_flip", "vertical_flip", "rotation", "color_jitter", "gaussian_blur", "crop")
LOG_FILE = "ritual_views.jsonl"


def _jitter(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    factors = {"brightness": rng.uniform(0, 2), "contrast": rng.uniform(0, 2), "saturation": rng.uniform(0, 2),
               "hue": rng.uniform(-0.5, 0.5)}  # fmt: skip
    order = [list(factors)[i] for i in rng.permutation(4)]
    for name in order:
        f = factors[name]
        if name == "brightness":
            image = ImageEnhance.Brightness(image).enhance(f)
        elif name == "contrast":
            image = ImageEnhance.Contrast(image).enhance(f)
        elif name == "saturation":
            image = ImageEnhance.Color(image).enhance(f)
        else:
            h, s, v = image.convert("HSV").split()
            shifted = (np.asarray(h, dtype=np.int16) + int(f * 255)) % 256
            image = Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8), "L"), s, v)).convert("RGB")
    return image, {**{k: round(float(v), 6) for k, v in factors.items()}, "order": order}


def _blur(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    sigma = float(rng.uniform(1.5, 2.0))
    x = np.linspace(-6, 6, 13)
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    arr = np.asarray(image, dtype=np.float64)  # [h, w, 3]
    for axis in (0, 1):
        arr = correlate1d(arr, kernel, axis=axis, mode="mirror")  # mirror = torch's reflect padding
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)), {"sigma": round(sigma, 6)}


def _crop(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    w_img, h_img = image.size
    area = w_img * h_img
    box = None
    for _ in range(10):  # torchvision's RandomResizedCrop.get_params
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= w_img and 0 < h <= h_img:
            top, left = int(rng.integers(0, h_img - h + 1)), int(rng.integers(0, w_img - w + 1))
            box = (left, top, left + w, top + h)
            break
    if box is None:  # the central crop at the nearest allowed aspect ratio
        ratio = w_img / h_img
        w, h = (
            (w_img, round(w_img / (4 / 3)))
            if ratio > 4 / 3
            else ((round(h_img * 3 / 4), h_img) if ratio < 3 / 4 else (w_img, h_img))
        )
        left, top = (w_img - w) // 2, (h_img - h) // 2
        box = (left, top, left + w, top + h)
    return image.resize((w_img, h_img), Image.Resampling.BILINEAR, box=box), {"box": list(box)}


def transform(image: Image.Image, name: str, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """``(T(image), parameters)`` for one pool entry; the result has the image's size, RGB."""
    image = image.convert("RGB")
    if name == "horizontal_flip":
        return ImageOps.mirror(image), {}
    if name == "vertical_flip":
        return ImageOps.flip(image), {}
    if name == "rotation":
        angle = float(rng.uniform(-180.0, 180.0))
        return image.rotate(angle, resample=Image.Resampling.NEAREST, expand=False, fillcolor=(0, 0, 0)), {
            "angle": round(angle, 6)
        }
    if name == "color_jitter":
        return _jitter(image, rng)
    if name == "gaussian_blur":
        return _blur(image, rng)
    if name == "crop":
        return _crop(image, rng)
    raise ValueError(f"unknown RITUAL transformation {name!r}; known: {', '.join(TRANSFORMS)}")


def draw(image: Image.Image, seed: int, pool: list[str]) -> tuple[Image.Image, str, dict[str, Any]]:
    """The seeded draw of one image: ``(T(image), name, parameters)``, uniform over ``pool``."""
    rng = np.random.default_rng(seed)
    name = pool[int(rng.integers(len(pool)))]
    out, params = transform(image, name, rng)
    return out, name, params


@METHODS.register("ritual")
class RITUAL(TwoViewMethod):
    """Add the logits of a randomly transformed copy of the image to every decoding step's logits."""

    name: ClassVar[str] = "ritual"

    def __init__(
        self,
        alpha: float = 3.0,
        beta: float = 0.1,
        transforms: list[str] | tuple[str, ...] = TRANSFORMS,
        seed: int = 0,
        log: bool = True,
    ) -> None:
        transforms = list(transforms)
        unknown = [t for t in transforms if t not in TRANSFORMS]
        if not transforms or unknown:
            raise ValueError(f"transforms must be a non-empty subset of {TRANSFORMS}, got {transforms}")
        super().__init__(seed=seed, alpha=alpha, beta=beta, transforms=transforms, log=log)
        self.counts: Counter = Counter()

    def weights(self) -> tuple[float, float]:
        """``(1, α)``."""
        return 1.0, float(self.hparams["alpha"])

    def second_view(self, inputs: dict[str, Any], seeds: list[int]) -> tuple[torch.Tensor, list[Image.Image]]:
        """Every image transformed by its seeded draw, through the family's processor.

        The model waits for this host work, so each image is transformed and processed on its own host thread
        (:func:`core.hostpool.host_map`); the pixels are the per-image rows joined in order, which equal the
        processor's batched output on every family (tested).
        """
        views = host_map(self._view, list(zip(inputs["harness_images"], seeds, strict=True)))
        images, lines, at = [], [], 0
        for prompt, n in zip(inputs["harness_prompts"], inputs["harness_images_per_row"], strict=True):
            for k in range(n):
                out, name, params, _pixels = views[at]
                images.append(out)
                self.counts[name] += 1
                lines.append({"prompt_hash": sha256_text(prompt), "image": k, "transform": name, "params": params})
                at += 1
        if self.hparams["log"] and self.output_dir is not None:
            with open(self.output_dir / LOG_FILE, "a") as fh:
                fh.writelines(json.dumps(line) + "\n" for line in lines)
        self.log += lines
        return torch.cat([view[3] for view in views]), images

    def _view(self, image_seed: tuple[Image.Image, int]) -> tuple[Image.Image, str, dict[str, Any], torch.Tensor]:
        """One image's draw and its ``pixel_values`` rows: ``(T(image), name, parameters, pixels)``."""
        out, name, params = draw(*image_seed, self.hparams["transforms"])
        return out, name, params, self.adapter.image_inputs([out])["pixel_values"]

    def report(self) -> dict[str, Any] | None:
        """How often each transformation was drawn (and the log file, when written)."""
        out = super().report() | {"transforms": dict(sorted(self.counts.items()))}
        if self.hparams["log"] and self.output_dir is not None:
            out["log"] = LOG_FILE
        return out
