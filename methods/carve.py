r"""CARVE — Contrastive Attention Refinement for Visual Enhancement.

Ge et al., "Focusing by Contrastive Attention: Enhancing VLMs' Visual Reasoning", arXiv 2509.06461 (ECCV 2026);
official code ``YuyaoGe/CARVE`` (``carve/attention.py``, ``carve/masking.py``, ``carve/pipeline.py``).

A model's attention to the image mixes *where things are* (visual saliency, present whatever is asked) with
*what the question is about* (semantic relevance). CARVE separates the two by contrasting the attention of the
task question with that of a general instruction on the same image, masks the image to the regions the question
singles out, and asks again on the refined image. Per request with images:

1. **Pass Q** (question) and **pass G** (general instruction ``general_prompt``): greedy generation of up to
   ``max_new_tokens`` tokens; at every step t and layer l ∈ ``layers`` the newest query row's head-mean attention
   to the visual tokens, ``A_{l,t} ∈ R^{n_visual}`` (site ``lm.layers.{l}.attn.probs``, last row only). Steps
   after a row's end of sequence are dropped. Pass G does not depend on the question: it is cached per image.
   Both passes run as ONE batched generation (pass-Q rows, then the pass-G rows of the image sets not cached),
   not one after the other as in the official code; outputs equal separate passes up to padding round-off.
2. **Contrast**: ``Â_{l,t} = A^Q_{l,t} / (A^G_{l,t} + λ)`` (A ≈ F_vis ⊙ F_sem and A^G ≈ F_vis, so Â ≈ F_sem),
   steps paired by index up to the shorter generation.
3. **Fuse**: ``S = Σ_t w_t Σ_{l∈layers} Â_{l,t}`` per visual token with ``w_t = t + 1`` (``steps="full"``, the
   paper's T_full: later tokens weigh more), or only the first / last paired step (``"start"`` / ``"end"``). Each
   tile's token grid is resized bilinearly onto the pixels it covers (``adapter.tile_frames``: letterbox
   padding, centre crops and InternVL tiles are placed where the processor took them) — resizing is linear, so
   this equals resizing every Â before summing.
4. **Mask** (:func:`methods.carve_mask.select_regions`): keep pixels above the (1 − p)-quantile, label connected
   components, keep the ``max(k, ⌊p·#components⌋)`` with the largest summed saliency.
5. **Extract** (:func:`methods.carve_mask.refine`): zero outside the mask, crop to its bounding box, upscale
   (Lanczos) so the crop covers the original size.
6. **Final pass**: the task's own call, on the refined image only (``feed="refined"``, the paper's Algorithm 1)
   or on the original followed by the refined image (``feed="both"``, the official code).

Hyperparameters (code defaults):
    layers ("auto" | list[int], default "auto"): LM layers whose attention is read; "auto" scales the paper's
        best 20–25 of 32 layers to the model: ``round(0.625·L) … round(0.78·L)``, capped at L − 1.
    lam (float, default 1e-8): λ, the contrast's stabiliser (the code's value).
    p (float, default 0.2): fraction of pixels above the threshold, and the fraction of components kept.
    k (int, default 3): minimum number of regions kept.
    rank ("attention_sum" | "size", default "attention_sum"): how components are ranked.
    steps ("full" | "start" | "end", default "full"): step weighting of the fusion.
    max_new_tokens (int, default 32): length of passes Q and G.
    feed ("refined" | "both", default "refined"): what the final pass sees.
    general_prompt (str): pass G's instruction, "Write a general description of the image." plus the code's
        answer suffix " Answer the question using a single word or phrase.".
    question_suffix (str, default ""): appended to the task's question in pass Q (the code appends the answer
        suffix above; the harness's tasks already carry their own answer-format instruction).
    cache_size (int, default 1024): images whose pass-G attention is kept.
    save_masks (bool, default False): write an overlay PNG per refined image (saliency, mask contour) to
        ``carve_masks/`` in the run directory, indexed by ``carve_masks/index.jsonl``.

Cost: one extra greedy generation per request, on up to twice the batch (pass G amortised over the questions of an
image by the cache), and one OpenCV mask per image (each image's saliency, mask and refined image on its own host
thread, :mod:`core.hostpool`); the final pass is the task's ordinary call. Peak memory: the
joint pass holds up to 2× the batch's KV cache. Per-sample seconds in the records include it.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from adapters.base import Adapter
from adapters.geometry import TileFrame
from core.hostpool import host_map
from methods.base import METHODS, Method, auto_or_list, check_layers
from methods.carve_mask import overlay, paint, refine, select_regions
from methods.intervention import Step, attach
from tasks.base import Request

GENERAL_PROMPT = "Write a general description of the image. Answer the question using a single word or phrase."
STEPS = ("full", "start", "end")
FEEDS = ("refined", "both")
MASK_DIR = "carve_masks"


def auto_layers(n_layers: int) -> list[int]:
    """The paper's layers 20–25 of 32, scaled to an ``n_layers`` LM (at least one layer)."""
    lo, hi = (min(n_layers - 1, round(f * n_layers)) for f in (20 / 32, 25 / 32))
    return list(range(lo, hi + 1))


def contrast(att_q: torch.Tensor, att_g: torch.Tensor, lam: float, steps: str) -> torch.Tensor:
    """Token saliency ``S [n]`` from pass-Q and pass-G attention ``[T, layers, n]`` (steps paired by index)."""
    t = min(len(att_q), len(att_g))
    if t == 0:
        raise ValueError("contrast needs at least one recorded step in each pass")
    per_step = (att_q[:t].double() / (att_g[:t].double() + lam)).sum(1)  # [T, n]: Σ over layers
    if steps == "full":
        weights = torch.arange(1, t + 1, dtype=torch.float64, device=per_step.device)
    else:
        weights = torch.zeros(t, dtype=torch.float64, device=per_step.device)
        weights[0 if steps == "start" else t - 1] = 1.0
    return (weights[:, None] * per_step).sum(0)


def image_saliency(scores: torch.Tensor, vmap: torch.Tensor, frames: list[TileFrame], image: int,
                   size: tuple[int, int]) -> np.ndarray:  # fmt: skip
    """One image's pixel saliency ``[H, W]`` from its visual tokens' scores (``vmap``: (image, tile, row, col))."""
    maps, boxes = [], []
    for frame in (f for f in frames if f.image == image):
        sel = (vmap[:, 0] == frame.image) & (vmap[:, 1] == frame.tile) & (vmap[:, 2] >= 0)
        grid = np.zeros((frame.rows, frame.cols), dtype=np.float64)  # [rows, cols]
        grid[vmap[sel, 2].numpy(), vmap[sel, 3].numpy()] = scores[sel].numpy()
        maps.append(grid)
        boxes.append(frame.box)
    return paint(maps, boxes, size)


def image_key(image: Image.Image) -> str:
    """Content digest of a PIL image (size, mode and pixels)."""
    h = hashlib.sha1(f"{image.size}{image.mode}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


@METHODS.register("carve")
class CARVE(Method):
    """Contrastive attention (question vs general instruction) → pixel mask → answer on the refined image."""

    name: ClassVar[str] = "carve"
    #: the passes run in rewrite(); the recording hook is passive outside them, so the final pass is a plain forward
    input_only: ClassVar[bool] = True

    def __init__(
        self,
        layers: str | list[int] = "auto",
        lam: float = 1e-8,
        p: float = 0.2,
        k: int = 3,
        rank: str = "attention_sum",
        steps: str = "full",
        max_new_tokens: int = 32,
        feed: str = "refined",
        general_prompt: str = GENERAL_PROMPT,
        question_suffix: str = "",
        cache_size: int = 1024,
        save_masks: bool = False,
    ) -> None:
        if steps not in STEPS or feed not in FEEDS:
            raise ValueError(f"steps must be one of {STEPS} and feed one of {FEEDS}; got {steps!r}, {feed!r}")
        if not 0 < p <= 1 or k < 1 or lam < 0 or max_new_tokens < 1:
            raise ValueError(f"need 0 < p <= 1, k >= 1, lam >= 0, max_new_tokens >= 1; got {p}, {k}, {lam}, "
                             f"{max_new_tokens}")  # fmt: skip
        auto_or_list("layers", layers)
        select_regions(np.zeros((1, 1)), p, k, rank)  # validates rank early
        super().__init__(layers=layers, lam=lam, p=p, k=k, rank=rank, steps=steps, max_new_tokens=max_new_tokens,
                         feed=feed, general_prompt=general_prompt, question_suffix=question_suffix,
                         cache_size=cache_size, save_masks=save_masks)  # fmt: skip
        self.layers: list[int] = []
        self._recording: dict[int, list[torch.Tensor]] | None = None  # layer → per-step [batch, prompt]
        self._general: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()  # image set -> pass-G attention
        self._stats = {"requests": 0, "images": 0, "mask_fraction": 0.0, "general_cached": 0, "steps_q": 0,
                       "steps_g": 0}  # fmt: skip

    def check(self, adapter: Adapter) -> None:
        """Given layers must be layers of the LM (checked before the model loads)."""
        super().check(adapter)
        check_layers(adapter, self.name, self.hparams["layers"])

    # ------------------------------------------------------------------ install
    def install(self) -> None:
        """Read the last query row's attention at ``layers`` while a recording pass runs."""
        n_layers = self.adapter.num_layers("lm")
        hp = self.hparams
        self.layers = auto_layers(n_layers) if hp["layers"] == "auto" else [int(x) for x in hp["layers"]]
        handle = self.enter_context(attach(self.adapter, self.name, {"probs"}))
        handle.probs(self.layers, self._record, first_row=self._last_row)

    def _last_row(self, step: Step) -> int:
        """Only the newest query row is read, and only during a recording pass (else fused SDPA throughout)."""
        return step.q_len - 1 if self._recording is not None else step.q_len

    def _record(self, probs: torch.Tensor, step: Step) -> torch.Tensor:
        # probs: [batch, heads, 1, k], the newest query row
        self._recording[step.layer].append(probs[:, :, -1, : step.batch.prompt_len].mean(1).float())  # [batch, prompt]
        return probs

    # ------------------------------------------------------------------ passes
    def _attention_pass(
        self, texts: list[str], images: list[list[Image.Image]], max_new_tokens: int
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """Greedy generation recording visual attention.

        Returns:
            Per row ``[steps, layers, n_visual]`` (CPU; steps up to its end of sequence, at least 1), and the inputs.
        """
        adapter = self.adapter
        prompts = [adapter.format_prompt(t, n_images=len(ims)) for t, ims in zip(texts, images, strict=True)]
        inputs = adapter.build_inputs(prompts, images)
        self._recording = {layer: [] for layer in self.layers}
        try:
            new = adapter.generate_ids(inputs, max_new_tokens=max_new_tokens, do_sample=False)
            rec = torch.stack([torch.stack(self._recording[layer]) for layer in self.layers], 1)  # [T, layers, b, p]
        finally:
            self._recording = None
        visual = adapter.image_token_mask(inputs).cpu()  # [batch, prompt]
        lengths = adapter.answer_lengths(new)
        rec = rec.cpu()
        return [rec[: max(1, min(n, len(rec))), :, b][..., visual[b]] for b, n in enumerate(lengths)], inputs

    def _passes(self, texts: list[str], images: list[list[Image.Image]]) -> tuple[list, list, dict[str, Any]]:
        """Pass Q for every row and pass G for the image sets not cached, in ONE batched generation.

        Both passes are greedy generations of ``max_new_tokens`` on the same images, so they share a batch: on a
        GPU, decoding is bound by reading the weights, and a doubled batch costs far less than a second generation.
        Pass G rows run the full length (greedy steps do not depend on the limit; later steps are simply unused
        when pass Q ends earlier), so a cached pass G is always complete.

        Returns:
            Pass-Q attention per row, pass-G attention per row (``[steps, layers, n_visual]``), and the inputs
            of the joint batch (pass Q's rows first).
        """
        hp = self.hparams
        keys = [tuple(image_key(im) for im in ims) for ims in images]
        todo = list(dict.fromkeys(k for k in keys if k not in self._general))  # distinct image sets to run
        first = {k: keys.index(k) for k in todo}
        self._stats["general_cached"] += len(keys) - len(todo)
        g_texts, g_images = [hp["general_prompt"]] * len(todo), [images[first[k]] for k in todo]
        atts, inputs = self._attention_pass(texts + g_texts, images + g_images, hp["max_new_tokens"])
        self._general.update(zip(todo, atts[len(texts) :], strict=True))
        att_g = [self._general[key] for key in keys]
        while len(self._general) > hp["cache_size"]:
            self._general.popitem(last=False)
        return atts[: len(texts)], att_g, inputs

    # ------------------------------------------------------------------ the method
    def rewrite(self, requests: list[Request]) -> list[Request]:
        """Passes Q and G, masks and refined images for every request with images; text-only ones unchanged."""
        rows = [i for i, r in enumerate(requests) if r.images]
        if not rows:
            return requests
        hp = self.hparams
        images = [list(requests[i].images) for i in rows]
        texts = [requests[i].text + hp["question_suffix"] for i in rows]
        att_q, att_g, inputs = self._passes(texts, images)
        frames, vmaps = self.adapter.tile_frames(inputs), self.adapter.visual_token_map(inputs)  # rows: Q first
        scores = [contrast(att_q[j], att_g[j], hp["lam"], hp["steps"]) for j in range(len(rows))]  # [n_visual] each
        # the masks and refined images, each image on its own host thread while the device waits for them
        jobs = [(scores[j], vmaps[j], frames[j], n, im) for j in range(len(rows)) for n, im in enumerate(images[j])]
        masked = iter(host_map(self._refine, jobs))
        out = list(requests)
        for j, i in enumerate(rows):
            refined = []
            for im in images[j]:
                saliency, mask, new = next(masked)
                self._stats["images"] += 1
                self._stats["mask_fraction"] += float(mask.mean())
                if hp["save_masks"] and self.output_dir is not None:
                    self._save(requests[i].text, im, saliency, mask)
                refined.append(new)
            out[i] = Request(requests[i].text, images[j] + refined if hp["feed"] == "both" else refined)
            self._stats["steps_q"] += len(att_q[j])
            self._stats["steps_g"] += min(len(att_g[j]), len(att_q[j]))  # the steps paired (the rest unused)
        self._stats["requests"] += len(rows)
        return out

    def _refine(self, job: tuple) -> tuple[np.ndarray, np.ndarray, Image.Image]:
        """One image's ``(saliency [H, W], mask [H, W] bool, refined image)`` (a pure function: run on host threads)."""
        scores, vmap, frames, n, image = job
        hp = self.hparams
        saliency = image_saliency(scores, vmap, frames, n, (image.height, image.width))
        mask = select_regions(saliency, hp["p"], hp["k"], hp["rank"])
        return saliency, mask, refine(image, mask)

    def _save(self, text: str, image: Image.Image, saliency: np.ndarray, mask: np.ndarray) -> None:
        folder = self.output_dir / MASK_DIR
        folder.mkdir(parents=True, exist_ok=True)
        digest = image_key(image)
        name = hashlib.sha1(f"{digest}\n{text}".encode()).hexdigest()[:16] + ".png"
        overlay(image, saliency, mask).save(folder / name)
        entry = {"file": name, "text": text, "image_sha1": digest, "mask_fraction": round(float(mask.mean()), 5)}
        with open(folder / "index.jsonl", "a") as fh:
            fh.write(json.dumps(entry) + "\n")

    def report(self) -> dict[str, Any] | None:
        """Requests refined, mean mask area, mean recorded steps per pass, pass-G cache hits."""
        s = self._stats
        if not s["requests"]:
            return None
        return {
            "requests_refined": s["requests"],
            "images_refined": s["images"],
            "mean_mask_fraction": round(s["mask_fraction"] / max(1, s["images"]), 5),
            "mean_steps_question": round(s["steps_q"] / s["requests"], 3),
            "mean_steps_general": round(s["steps_g"] / s["requests"], 3),
            "general_pass_cache_hits": s["general_cached"],
            "layers": self.layers,
        }
