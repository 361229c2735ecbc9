r"""FastV — prune visual tokens after layer K by the attention they receive.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models", ECCV 2024, arXiv 2403.06764; official code ``pkunlp-icler/FastV`` (``fastv_forward``
in its llava-hf ``modeling_llama.py``, KV-cache version).

1. Layers ``0 … K−1`` run on the whole prompt. From layer ``K−1``'s post-softmax attention
   ``A ∈ [batch, heads, q, k]`` (site ``lm.layers.{K−1}.attn.probs``) every visual token ``j`` gets a score:
   ``rule="last"`` (the official code): ``s_j = mean_h A[h, last, j]``, the head-mean attention the last prompt
   token pays to ``j``; ``rule="mean"`` (the paper's text): ``s_j = mean_h mean_i A[h, i, j]`` over the row's
   unpadded query tokens.
2. Each row keeps its top ``round((1 − R)·N_img)`` visual tokens (``N_img``: the row's visual tokens, all its
   images together), or ``keep`` when a token budget is given. Text and system tokens always stay.
3. From layer ``K`` on the dropped tokens are gone: hidden states, KV cache and mask of layers ``≥ K`` hold only
   the kept tokens, which keep their original RoPE positions (gaps); generated tokens continue from the unpruned
   length. The selection is made once, in prefill, and every decoded token sees that subset (the official
   cached implementation; the uncached original re-ranked at every step). Sequence surgery:
   :mod:`methods.surgery`.

Attention debiasing (``debias=true``; :mod:`methods.debias`, arXiv 2508.17807): before top-k, each image/tile's
scores are divided by the calibrated positional (recency) trend ``f(i/L)`` and tokens of patches more than
``pad_threshold`` padding are zeroed (the budget lowered to the content tokens). Calibrate once per model:
``python -m methods.calibrate debias --model <option> --pruner fastv [--layer K --rule last]``.

Hyperparameters:
    layer (int | "auto", default "auto"): K, 1-based count of layers that see every token (scores come from
        0-based layer K−1, tokens leave before 0-based layer K). "auto": the paper's K=2, or L−1 on an LM with
        L ≤ 2 layers (the shipped tiny checkpoints have 2).
    ratio (float, default 0.5): R, fraction of visual tokens removed.
    keep (int | None, default None): token budget per row; overrides ``ratio``.
    rule ("last" | "mean", default "last"): score rule (official code | paper text).
    debias (bool, default False): apply the debiasing plug-in.
    debias_file (str | None, default None): trend file (default ``attn_debias.json`` beside the checkpoint).
    pad_threshold (float, default 0.5): padding fraction above which a token's score is zeroed (debias only).

Not implemented: the paper's mask variant (blocks pruned keys instead of removing them; no speed-up).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from adapters.base import Adapter
from methods.base import METHODS, LayerError, Method, UnsupportedError
from methods.debias import PositionalTrend, trend_key
from methods.intervention import Batch, Step, attach
from methods.pruning import Debias, KeptTokens, budget, check_budget, debiased, require_trend, select_top, tile_groups

RULES = ("last", "mean")


def resolve_layer(layer: int | str, num_layers: int) -> int:
    """K from the config value: "auto" = 2 (paper), or L−1 on an LM of at most 2 layers; must be in 1..L−1."""
    k = (2 if num_layers > 2 else num_layers - 1) if layer == "auto" else int(layer)
    if not 1 <= k <= num_layers - 1:
        raise LayerError(f"FastV layer K={k} must be in 1..{num_layers - 1} (the LM has {num_layers} layers)")
    return k


def received_attention(probs: torch.Tensor, padding: torch.Tensor, rule: str) -> torch.Tensor:
    """Attention each key receives, ``[batch, k]``, from post-softmax ``probs [batch, heads, q, k]``.

    ``rule="last"``: the last query row (``q`` may be just that row); ``"mean"``: the mean over unpadded query rows
    (``padding [batch, q]``), padded rows excluded.
    """
    heads = probs.float().mean(1)  # [batch, q, k]
    if rule == "last":
        return heads[:, -1]
    rows = (~padding).float()  # [batch, q]
    return (heads * rows[..., None]).sum(1) / rows.sum(1, keepdim=True).clamp(min=1)


@METHODS.register("fastv")
class FastV(Method):
    """FastV visual-token pruning at layer K (see module docstring)."""

    name: ClassVar[str] = "fastv"

    def __init__(
        self,
        layer: int | str = "auto",
        ratio: float = 0.5,
        keep: int | None = None,
        rule: str = "last",
        debias: bool = False,
        debias_file: str | None = None,
        pad_threshold: float = 0.5,
    ) -> None:
        super().__init__(layer=layer, ratio=ratio, keep=keep, rule=rule, debias=debias, debias_file=debias_file,
                         pad_threshold=pad_threshold)  # fmt: skip
        if rule not in RULES:
            raise ValueError(f"FastV rule must be one of {RULES}, got {rule!r}")
        check_budget(ratio, keep)
        self.layer, self.ratio, self.keep, self.rule = layer, ratio, keep, rule
        self.debias, self.debias_file, self.pad_threshold = debias, debias_file, pad_threshold
        self.counter = KeptTokens()
        self.recorded: list[torch.Tensor] | None = None  # raw per-tile scores, when calibrating
        self._trend: PositionalTrend | None = None

    def check(self, adapter: Adapter) -> None:
        """Debiasing needs the calibrated trend of this K and rule (read from the checkpoint's config)."""
        super().check(adapter)
        layers = adapter.lm_depth()
        if layers is not None:
            resolve_layer(self.layer, layers)  # K within the LM, before the model loads
        if self.debias:
            if layers is None:
                raise UnsupportedError(f"FastV debias: cannot read the LM depth of {adapter.path!r} from its config")
            key = trend_key("fastv", resolve_layer(self.layer, layers), self.rule)
            self._trend = require_trend(adapter, self.debias_file, key, "fastv")

    def install(self) -> None:
        """Record layer K−1's attention in prefill; drop the low-scoring visual tokens from layer K on."""
        k = resolve_layer(self.layer, self.adapter.num_layers("lm"))
        self.k = k
        handle = self.enter_context(attach(self.adapter, self.name, {"tokens", "probs"}))
        handle.probs([k - 1], self._record, first_row=self._first_row)
        handle.drop_at(k, self._select)

    def _first_row(self, step: Step) -> int:
        if not step.prefill:
            return step.q_len  # decoding: nothing to record, fused attention
        return step.q_len - 1 if self.rule == "last" else 0

    def _record(self, probs: torch.Tensor, step: Step) -> torch.Tensor:
        """Store the attention received by each prompt token (prefill of layer K−1); probabilities unchanged."""
        padding = step.batch.padding[:, step.offset :]  # [batch, q] of the rows shown
        step.batch.state[self.name] = received_attention(probs, padding, self.rule)  # [batch, prompt]
        return probs

    def _select(self, batch: Batch) -> torch.Tensor:
        """Keep mask ``[batch, prompt]``: all non-visual tokens plus each row's top visual tokens."""
        if not self.debias and self.recorded is None:
            return self._select_batched(batch)
        scores = batch.state[self.name]  # [batch, prompt]
        keep = ~batch.visual
        debias = Debias(self._trend, self.pad_threshold) if self.debias else None
        contents = self.adapter.visual_content(batch.inputs) if self.debias else None
        for row, tiles in enumerate(tile_groups(self.adapter, batch.inputs)):
            pos = batch.visual[row].nonzero().flatten()
            if not len(pos):
                continue
            raw = scores[row, pos]  # [n_visual]
            if self.recorded is not None:
                self.recorded += [raw[idx].detach().cpu() for idx in tiles]
            content = contents[row] if contents is not None else None
            s = debiased(raw, tiles, debias, content)
            group = [torch.arange(len(pos), device="cpu")]  # one group: every visual token of the row
            kept = select_top(s, group, lambda n: budget(n, self.ratio, self.keep), debias, content)
            keep[row, pos] = kept
            self.counter.add(len(pos), int(kept.sum()))
        return keep

    def _select_batched(self, batch: Batch) -> torch.Tensor:
        """:meth:`_select` without debiasing or recording, for the whole batch at once (one host sync in all).

        The same top-k per row: non-visual scores are set to −inf, every row takes the batch's largest budget and
        keeps its own first ``k_row`` (top-k indices are distinct, so the scatter marks exactly ``k_row`` tokens).
        """
        visual = batch.visual  # [batch, prompt]
        n_visual = visual.sum(1).tolist()  # host: the budgets are Python integers
        ks = [budget(n, self.ratio, self.keep) if n else 0 for n in n_visual]
        keep = ~visual
        if max(ks) == 0:
            return keep
        scores = batch.state[self.name].float().masked_fill(~visual, -torch.inf)  # [batch, prompt]
        top = torch.topk(scores, max(ks), dim=1).indices  # [batch, k_max]
        rank = torch.arange(max(ks), device=top.device)[None, :]  # [1, k_max]
        wanted = rank < torch.tensor(ks, device=top.device)[:, None]  # [batch, k_max]
        keep = keep.scatter(1, top, wanted | keep.gather(1, top))  # non-visual entries stay True
        for n, k in zip(n_visual, ks, strict=True):
            if n:
                self.counter.add(n, k)
        return keep

    def report(self) -> dict[str, Any]:
        """Visual tokens per row before and after pruning, and the layer they left at."""
        return {"layer_K": getattr(self, "k", None), **self.counter.report()}
