r"""FasterVLM — prune visual tokens before the LM by the vision tower's [CLS] attention.

Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference
Faster", arXiv 2412.01818; official code ``Theia-4869/FasterVLM`` (``clip_encoder.py`` returns the attentions,
``llava_arch.py`` ``encode_images`` keeps the top-k)..

1. Score: the post-softmax attention of the vision tower's **[CLS] query** over the patch keys, averaged over
   heads, at the layer whose output feeds the projector (LLaVA-1.5's ``vision_feature_layer = −2``, the
   penultimate layer; site ``vision.layers.{l}.attn.probs``): ``s_j = mean_h A[h, CLS, j]``.
2. Each image keeps its top ``round((1 − R)·N)`` visual tokens, or ``keep`` (the official k = 144 / 58 / 29 for
   75 / 90 / 95 % on 576 tokens); tiled images (InternVL) keep that many per tile, as the official LLaVA-NeXT port
   does per crop.
3. The dropped tokens never enter the LM: the kept ones stay in raster order and the LM's positions are
   renumbered contiguously, exactly as if the prompt had been built with fewer image tokens (the official code
   shortens the image segment), so the KV cache is smaller from layer 0 and decoding continues from the pruned
   length. The projector still runs on every patch (as in the official code).

Families: LLaVA-1.5 (CLIP [CLS]) and InternVL (InternViT [CLS]; its 2×2 pixel-shuffle merges four patches into
one LM token, so a token's score is the [CLS] attention mass of its four patches). Qwen2-VL / Qwen2.5-VL are
refused before the model loads: their ViT has no [CLS] token, so the score does not exist (use ``method=fastv``,
which scores by the LM's own attention).

Cost: the scores are read in a tower pass before the model call, with the fused attention kernel (only the
feature layer's [CLS] row is computed as probabilities). That pass is the model's own image encoding, and its
features go into the model call (``mm_encoder_outputs`` from transformers 5.19; on 5.17 and 5.18 the model's
``get_image_features`` hands them back for the call), so the tower runs once per prompt (on LLaVA-1.5-7B it is
~4 % of the prefill FLOPs, and at R = 90 % a quarter or more of what pruning leaves).

Attention debiasing (``debias=true``, :mod:`methods.debias`): the [CLS] scores' positional trend, calibrated with
``python -m methods.calibrate debias --model <option> --pruner fastervlm``, and padding suppression.

Hyperparameters:
    ratio (float, default 0.75): R, fraction of each image's visual tokens removed.
    keep (int | None, default None): tokens kept per image/tile; overrides ``ratio``.
    debias (bool, default False), debias_file (str | None), pad_threshold (float, default 0.5): as in
        :mod:`methods.fastv`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from adapters.base import Adapter
from methods.base import METHODS, Method, UnsupportedError
from methods.debias import PositionalTrend, trend_key
from methods.intervention import attach
from methods.pruning import Debias, KeptTokens, budget, check_budget, debiased, require_trend, select_top, tile_groups

TREND_KEY = trend_key("fastervlm", None, "cls")


@METHODS.register("fastervlm")
class FasterVLM(Method):
    """FasterVLM [CLS]-attention pruning before the LM (see module docstring)."""

    name: ClassVar[str] = "fastervlm"
    families: ClassVar[tuple[str, ...]] = ("llava", "internvl")

    def __init__(
        self,
        ratio: float = 0.75,
        keep: int | None = None,
        debias: bool = False,
        debias_file: str | None = None,
        pad_threshold: float = 0.5,
    ) -> None:
        super().__init__(ratio=ratio, keep=keep, debias=debias, debias_file=debias_file, pad_threshold=pad_threshold)
        check_budget(ratio, keep)
        self.ratio, self.keep = ratio, keep
        self.debias, self.debias_file, self.pad_threshold = debias, debias_file, pad_threshold
        self.counter = KeptTokens()
        self.recorded: list[torch.Tensor] | None = None  # raw per-tile scores, when calibrating
        self._trend: PositionalTrend | None = None

    def check(self, adapter: Adapter) -> None:
        """Refuse towers without [CLS]; debiasing needs the calibrated trend."""
        if not type(adapter).vision_has_cls:
            raise UnsupportedError(
                f"method 'fastervlm' scores tokens by the vision tower's [CLS] attention, and the {adapter.family} "
                "tower has no [CLS] token; use method=fastv (LM attention) on this family. FasterVLM supports: "
                + ", ".join(self.families)
            )
        super().check(adapter)
        if self.debias:
            self._trend = require_trend(adapter, self.debias_file, TREND_KEY, "fastervlm")

    def install(self) -> None:
        """Select before the model call; the dropped tokens never enter the LM (positions renumbered)."""
        handle = self.enter_context(attach(self.adapter, self.name, {"tokens"}))
        handle.drop_input(self._select, renumber=True)

    def _select(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Keep mask ``[batch, prompt]``: every non-visual token plus each image/tile's top visual tokens."""
        visual = self.adapter.image_token_mask(inputs)  # [batch, prompt]
        keep = ~visual
        n_visual = visual.sum(1).tolist()  # the one host sync without debiasing: row sizes are Python integers
        if not any(n_visual):
            return keep
        scores = self.adapter.vision_cls_attention(inputs)
        contents = self.adapter.visual_content(inputs) if self.debias else None
        debias = Debias(self._trend, self.pad_threshold) if self.debias else None
        # each row's visual positions first, in prompt order (a stable sort: no nonzero, no sync)
        order = torch.sort(visual.to(torch.uint8), dim=1, descending=True, stable=True).indices  # [batch, prompt]
        k_of = lambda n: budget(n, self.ratio, self.keep)  # noqa: E731
        for row, tiles in enumerate(tile_groups(self.adapter, inputs)):  # tiles: host-side geometry
            n = n_visual[row]
            if not n:
                continue
            pos = order[row, :n]  # [n_visual]
            if self.recorded is not None:
                self.recorded += [scores[row][idx].detach().cpu() for idx in tiles]
            content = contents[row] if contents is not None else None
            s = debiased(scores[row], tiles, debias, content)
            kept = select_top(s, tiles, k_of, debias, content)
            keep[row, pos] = kept
            self.counter.add(n, int(kept.sum()) if debias else sum(k_of(len(idx)) for idx in tiles))
        return keep

    def report(self) -> dict[str, Any]:
        """Visual tokens per row before and after pruning."""
        return self.counter.report()
