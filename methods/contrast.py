r"""Two-view contrastive decoding, the part VCD (:mod:`methods.vcd`) and RITUAL (:mod:`methods.ritual`) share.

Both methods decode from two views of every sample, the original image ``v`` and a second image ``v'`` (VCD: a
noised copy; RITUAL: a randomly transformed copy), and combine their next-token logits at every step:

    s = a · l(v) + b · l(v')                                  (VCD: a = 1 + α, b = −α; RITUAL: a = 1, b = α)
    s_y = −inf  where  l_y(v) < log β + max_y' l_y'(v)         (adaptive plausibility constraint)

The constraint is on the ORIGINAL view's raw logits: in logit space ``l_y ≥ log β + max l`` is exactly
``p_y ≥ β · max p`` (the softmax normaliser cancels), which is how both official samplers compute it ("version 2"
in ``vcd_utils/vcd_sample.py``). The task's own logits processors run before (HF orders custom processors after its
built-in ones), the sampling warpers (temperature, top-k, top-p) after, as in the official samplers, which call
``logits_processor`` then ``logits_warper`` on the combined scores.

Both views run as ONE batched forward per step (:meth:`adapters.generation.Generation.views`): the batch is
doubled, rows ``0..B-1`` the original, rows ``B..2B-1`` the second view, each with its own KV-cache rows; left
padding and cached decoding are the adapter's, and the second view's rows are fed the chosen token at every step.
The second view's image is always the same size as the original's, so both views have the same tokens (Qwen-VL's
dynamic resolution and InternVL's tiling give the same grid) and the second view differs only in ``pixel_values``.

Seeding: every image's randomness (VCD's noise, RITUAL's transformation) comes from its own generator, seeded with
``sha256(seed, prompt text, image index in the row, image pixels)``, so a sample's second view does not depend on
the batch it runs in, on the device order of random draws, or on the other samples; rerunning reproduces it.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, ClassVar

import torch
from PIL import Image

from adapters.base import Adapter
from methods.base import Method, UnsupportedError
from methods.intervention import attach


def plausible(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """The adaptive plausibility constraint: ``l_y ≥ log β + max l`` per row, ``[batch, vocab]`` bool.

    Args:
        logits: The original view's raw next-token logits ``[batch, vocab]``.
        beta: β in (0, 1]; β = 1 keeps only the maximum, β → 0 keeps everything.
    """
    return logits >= logits.max(dim=-1, keepdim=True).values + math.log(beta)


def combine(original: torch.Tensor, other: torch.Tensor, a: float, b: float, beta: float) -> torch.Tensor:
    """``a·l + b·l'`` where :func:`plausible`, −inf elsewhere; float32 ``[batch, vocab]``."""
    scores = a * original.float() + b * other.float()
    return scores.masked_fill(~plausible(original.float(), beta), float("-inf"))


def image_seeds(inputs: dict[str, Any], seed: int, salt: str) -> list[int]:
    """One 63-bit seed per image of the batch (in order), from the seed, its row's prompt, its index and its pixels."""
    prompts, per_row, images = inputs["harness_prompts"], inputs["harness_images_per_row"], inputs["harness_images"]
    out, at = [], 0
    for prompt, n in zip(prompts, per_row, strict=True):
        for k in range(n):
            image = images[at]
            h = hashlib.sha256(f"{salt}\0{seed}\0{prompt}\0{k}\0{image.mode}{image.size}\0".encode())
            h.update(image.tobytes())
            out.append(int.from_bytes(h.digest()[:8], "little") >> 1)
            at += 1
    return out


def with_second_view(inputs: dict[str, Any], pixel_values: torch.Tensor, images: list[Image.Image]) -> dict[str, Any]:
    """The doubled batch: every entry twice (rows, then per-image entries), the second copy's pixels replaced."""
    if pixel_values.shape != inputs["pixel_values"].shape:
        raise ValueError(
            f"the second view's pixels {tuple(pixel_values.shape)} differ in shape from the original's "
            f"{tuple(inputs['pixel_values'].shape)}; it must keep every image's size"
        )
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if key == "pixel_values":
            out[key] = torch.cat([value, pixel_values.to(value.dtype)])
        elif key == "harness_images":
            out[key] = [*value, *images]
        elif isinstance(value, torch.Tensor):
            out[key] = torch.cat([value, value])
        elif isinstance(value, list):
            out[key] = [*value, *value]
        else:
            out[key] = value
    return out


class Contrast:
    """The decoding-logits processor: rows ``0..B-1`` get :func:`combine` of the two views' rows (``[2B, V]``)."""

    def __init__(self, a: float, b: float, beta: float) -> None:
        self.a, self.b, self.beta = a, b, beta
        self.doubled = False  # set per model call: False for a text-only batch (nothing to contrast)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Scores ``[2B, vocab]`` (or ``[B, vocab]`` unchanged for a text-only batch) with rows ``0..B-1`` combined."""
        if not self.doubled:
            return scores
        rows = scores.shape[0] // 2
        scores = scores.float().clone()  # [2B, vocab]
        scores[:rows] = combine(scores[:rows], scores[rows:], self.a, self.b, self.beta)
        return scores


class TwoViewMethod(Method):
    """Base of the two-view contrastive methods: subclasses give the weights and the second view's pixels."""

    #: the decoding the official repositories use (both sample with these); see the subclasses' docstrings
    OFFICIAL_SAMPLING: ClassVar[dict[str, Any]] = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}

    def __init__(self, seed: int = 0, **hparams: Any) -> None:
        if "beta" in hparams and not 0 < hparams["beta"] <= 1:
            raise ValueError(f"beta must be in (0, 1], got {hparams['beta']}")
        super().__init__(seed=seed, **hparams)
        self._images = 0
        self.log: list[dict[str, Any]] = []  # one entry per second-view image: what was done to it

    def weights(self) -> tuple[float, float]:
        """``(a, b)`` of ``a·l(v) + b·l(v')``."""
        raise NotImplementedError

    def second_view(self, inputs: dict[str, Any], seeds: list[int]) -> tuple[torch.Tensor, list[Image.Image]]:
        """``(pixel_values, images)`` of the second view: same shapes as the original's (one seed per image)."""
        raise NotImplementedError

    def check(self, adapter: Adapter) -> None:
        """Every family works (the second view keeps every image's size, hence its visual tokens)."""
        super().check(adapter)

    def check_generation(self, gen_kwargs: dict[str, Any]) -> None:
        """Beam search cannot decode two views as one text (beams reorder rows): refused before the model loads."""
        if int(gen_kwargs.get("num_beams", 1) or 1) > 1:
            raise UnsupportedError(
                f"method {self.name!r} contrasts two views per step, which beam search (num_beams > 1) cannot keep "
                "aligned; use greedy decoding (the tasks' default) or sampling (do_sample=true, the official setting)"
            )

    def install(self) -> None:
        """Claim the decoding logits and double every batch with its second view."""
        a, b = self.weights()
        handle = self.enter_context(attach(self.adapter, self.name, {"logits"}))
        self._contrast = Contrast(a, b, self.hparams["beta"])
        handle.logits(self._contrast)
        self.enter_context(self.adapter.views(self._expand))

    def _expand(self, inputs: dict[str, Any]) -> dict[str, Any]:
        self._contrast.doubled = "pixel_values" in inputs
        if not self._contrast.doubled:
            return inputs  # a text-only batch has nothing to contrast: it decodes as without the method
        seeds = image_seeds(inputs, self.hparams["seed"], self.name)
        pixels, images = self.second_view(inputs, seeds)
        self._images += len(seeds)
        return with_second_view(inputs, pixels, images)

    def report(self) -> dict[str, Any] | None:
        """How many second-view images were made (and, per method, what was done to them)."""
        return {"second_view_images": self._images}
