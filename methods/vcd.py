r"""VCD — Visual Contrastive Decoding.

Leng et al., "Mitigating Object Hallucinations in Large Vision-Language Models through Visual Contrastive
Decoding", CVPR 2024, arXiv 2311.16922; official code ``DAMO-NLP-SG/VCD`` (``vcd_utils/vcd_sample.py``,
``vcd_utils/vcd_add_noise.py``, ``experiments/eval/object_hallucination_vqa_llava.py``,
``experiments/cd_scripts/llava1.5_pope.bash``).

An LVLM's language prior survives when the image is degraded, while visually grounded tokens do not. VCD contrasts
the next-token logits given the image ``v`` with those given a distorted copy ``v'`` at every decoding step:

    v'  = sqrt(ᾱ_T) · v + sqrt(1 − ᾱ_T) · ε,   ε ~ N(0, I)                       (one DDPM forward step to T)
    ᾱ_t = Π_{s ≤ t} (1 − β_s),   β_s = sigmoid(linspace(−6, 6, 1000))_s · (5e-3 − 1e-5) + 1e-5
    s   = (1 + α) · l(v) − α · l(v')
    s_y = −inf  where  l_y(v) < log β + max l(v)                                 (adaptive plausibility constraint)

then the task's processors, the sampling warpers and the token choice run on ``s`` (:mod:`methods.contrast`).
Both views run in one batched forward per step, each with its own KV cache (the official sampler runs a second
``forward`` with its own ``model_kwargs_cd``; same arithmetic).

Hyperparameters (official defaults):
    alpha (float, default 1.0): α, ``--cd_alpha`` (argparse 1; the sampler's fallback 0.5 applies only when unset).
    beta (float, default 0.1): β, ``--cd_beta`` (argparse 0.1; ``llava1.5_pope.bash`` passes 0.2).
    noise_step (int, default 500): T, an index into the 1000-step schedule (0…999), ``--noise_step``.
    seed (int, default 0): seeds every image's noise (with its prompt and pixels, see :mod:`methods.contrast`).

Decoding: the official scripts SAMPLE, ``do_sample=True, temperature=1, top_p=1, top_k=None`` (no top-k).
The harness decodes with the task's ``gen_kwargs`` (greedy for POPE and CHAIR) so that the paired comparison with
``method=none`` changes one thing; the official setting is
``task.gen_kwargs.do_sample=true task.gen_kwargs.temperature=1.0 task.gen_kwargs.top_p=1.0 task.gen_kwargs.top_k=0``
given to BOTH runs (the paper's "Regular" baseline samples too). Beam search is refused before the model loads.

Convention traps:
    * The noise is added to the NORMALISED pixel tensor the processor returns (CLIP mean/std), not to [0, 1]
      pixels, and it is not clipped: ``add_diffusion_noise(image_tensor, noise_step)`` on the output of
      ``image_processor.preprocess``. Here: on ``pixel_values``, per image, in float32, then cast to the model dtype.
    * The schedule is a SIGMOID schedule from 1e-5 to 5e-3 (not DDPM's linear 1e-4 … 2e-2); ``ᾱ_500 ≈ 0.745``,
      so the noised tensor is 0.863 × the image plus 0.505 × unit noise (the official code computes the schedule
      in float32; here float64, a difference below 1e-6 in the two factors).
    * ``noise_step`` indexes ``alphas_bar_sqrt[t]`` directly: t = 500 is the 501st step.
    * Family geometry: Qwen-VL's ``pixel_values`` are patch rows ``[channel, temporal, p, p]`` with a still image
      repeated along ``temporal``; the copies share one draw (as noising the image before patchifying would).
      InternVL's tiles (crops and thumbnail) each get their own draw, as its normalised input tensor would.
    * The plausibility cutoff is computed from the ORIGINAL view's logits, ``(1 + α)`` multiplies the original
      view; with greedy decoding only the mask and the argmax of ``s`` matter.
    * The official sampler draws fresh noise per question (global ``torch.randn_like`` after ``set_seed``); here each
      image's noise is seeded per (seed, prompt, image), so a sample's noise does not depend on the batch.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from PIL import Image

from methods.base import METHODS
from methods.contrast import TwoViewMethod

STEPS = 1000  # the official schedule's length


def alpha_bar(step: int) -> float:
    """``ᾱ_t`` of the official 1000-step sigmoid schedule (float64 arithmetic)."""
    if not 0 <= step < STEPS:
        raise ValueError(f"noise_step must be in 0..{STEPS - 1}, got {step}")
    betas = torch.sigmoid(torch.linspace(-6, 6, STEPS, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    return float(torch.cumprod(1 - betas, 0)[step])


def add_noise(pixels: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
    """``sqrt(ᾱ_T)·x + sqrt(1 − ᾱ_T)·ε`` in float32, in ``pixels``' dtype."""
    ab = alpha_bar(step)
    return (ab**0.5 * pixels.float() + (1 - ab) ** 0.5 * noise).to(pixels.dtype)


@METHODS.register("vcd")
class VCD(TwoViewMethod):
    """Contrast every decoding step's logits with those of a diffusion-noised copy of the image."""

    name: ClassVar[str] = "vcd"

    def __init__(self, alpha: float = 1.0, beta: float = 0.1, noise_step: int = 500, seed: int = 0) -> None:
        alpha_bar(noise_step)  # validates the step
        super().__init__(seed=seed, alpha=alpha, beta=beta, noise_step=noise_step)

    def weights(self) -> tuple[float, float]:
        """``(1 + α, −α)``."""
        alpha = float(self.hparams["alpha"])
        return 1 + alpha, -alpha

    def second_view(self, inputs: dict[str, Any], seeds: list[int]) -> tuple[torch.Tensor, list[Image.Image]]:
        """Every image's pixel rows noised to step T with its own seeded generator."""
        pixels = inputs["pixel_values"]  # family-shaped; rows grouped by image, in order
        parts, at = [], 0
        for rows, seed in zip(self.adapter.pixel_rows(inputs), seeds, strict=True):
            chunk = pixels[at : at + rows]
            generator = torch.Generator(device=chunk.device).manual_seed(seed)
            parts.append(add_noise(chunk, self.adapter.pixel_noise(chunk, generator), self.hparams["noise_step"]))
            at += rows
        if at != pixels.shape[0]:
            raise ValueError(f"{at} pixel rows accounted for, {pixels.shape[0]} in the batch")
        return torch.cat(parts), list(inputs["harness_images"])  # the images themselves are unchanged
