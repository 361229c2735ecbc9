r"""VHR — Vision-aware Head Reinforcement.

He et al., "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence", ACL 2025, arXiv
2412.13949; official code ``jinghan1he/VHR`` (replaces the Llama attention of transformers 4.45; not readable from
here, so this follows the paper's equations and Algorithm 1).

Some attention heads react strongly to the image; hallucinations follow the language prior the other heads carry.
VHR measures, per head, how much its output changes when the image is removed, and amplifies the most
vision-aware heads for the whole generation. With ``A_{l,i}`` head i's output in layer l (its attention-weighted
values, before the output projection; site ``lm.layers.{l}.attn.heads``) for the token being predicted:

    VHD_{l,i} = ‖ A_{l,i}(y_t | y_<t, x_V, x_T) − A_{l,i}(y_t | y_<t, x_T) ‖₂        (Eq. 4: with vs without image)
    VHD_{l,i} ← 0   if VHD_{l,i} > μ(VHD_{l,*}) + σ(VHD_{l,*})
                    and TA_{l,i} > μ(TA_{l,*}) + σ(TA_{l,*}),  TA_{l,i} = ‖A_{l,i}(· | x_T)‖²   (Eq. 6: outliers)
    H_l       = { i : VHD_{l,i} > median(VHD_{l,*}) }                                    (Eq. 7: the top half)
    Ã_{l,i}   = α · A_{l,i}  for i ∈ H_l,  A_{l,i} otherwise

Algorithm 1: the heads are chosen at the FIRST generation step only (t = 0, the prompt's last position) and then
reinforced at every step (a head set that changed between steps would mix reinforced and plain keys/values in the
KV cache), LAYER BY LAYER in one forward: when layer l's VHD is computed, the layers below it are already
reinforced. Here, per batch: one extra forward over the text-only prompts (the same prompts with their visual
tokens removed, left-padded) records every reinforced layer's head outputs at each row's last position; then, in
the prefill of the real call, each reinforced layer in order compares its (already reinforced-below) head outputs
at the last position with the recorded ones, selects ``H_l`` per row and scales those heads at every position;
each cached decoding step scales the same heads. Rows without an image have VHD = 0 everywhere and reinforce
nothing.

Hyperparameters (paper defaults, §4.4 and Appendix C–D):
    alpha (float, default 2.0): α, the scale factor (Table 6: 2–3 help, 4 breaks generation, < 1 hurts).
    layers ("auto" | list[int], default "auto"): L_r; "auto" is the paper's "second and last 14 layers" of the
        32-layer LLaVA-1.5 LM, scaled: layer 1 plus the last ``max(1, round(14·L/32))`` layers.
    outliers (bool, default True): zero the negatively vision-sensitive outliers (Eq. 6; Table 4's ablation).

Decoding: the paper decodes greedily (Eq. 1, max_new_tokens 512 for CHAIR); every decoding setting of the task
works, beam search included (the heads are per row; beams copy their row's KV cache but not its head set, so beam
search is refused before loading).

Convention traps:
    * A_{l,i} is the head's output BEFORE ``W^O`` (Eq. 3: heads are concatenated, then projected); scaling it by α
      scales that head's contribution to the attention output by α (Appendix B's reorientation argument).
    * The distance is the Euclidean norm (not squared) in Eq. 4, the squared norm in TA (Eq. 6).
    * μ and σ are the layer's mean and standard deviation over its heads (σ: the sample standard deviation, N − 1,
      torch's default; the paper does not say which); the median of an even number of heads is the lower middle
      value (``torch.median``), so "> median" keeps exactly half the heads when they are distinct.
    * The text-only stream here is NOT reinforced (it runs before the real prefill, as the paper's "one additional
      forward pass, removing the image context"); a lock-step reading would reinforce it with the same heads. The
      with-image stream is reinforced below the layer being selected, as the paper requires.
    * Removing the image removes the visual (placeholder) tokens only; wrapper tokens (``<img>``, Qwen's
      ``<|vision_start|>``) stay, and positions are renumbered over what remains.
    * Heads are chosen per sample (Table 4: one fixed head set for all samples loses most of the gain).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from adapters.base import Adapter
from methods.base import METHODS, DeviceTally, Method, UnsupportedError, auto_or_list, check_layers
from methods.intervention import Step, attach


def auto_layers(n_layers: int) -> list[int]:
    """Layer 1 plus the last ``max(1, round(14·L/32))`` layers (the paper's choice for 32-layer LLaVA LMs)."""
    last = max(1, round(14 * n_layers / 32))
    return sorted({min(1, n_layers - 1)} | set(range(n_layers - last, n_layers)))


def select_heads(vhd: torch.Tensor, ta: torch.Tensor, outliers: bool = True) -> torch.Tensor:
    """Eq. 6–7 per row: ``H_l`` as a bool mask ``[batch, heads]`` from VHD and TA ``[batch, heads]`` (float)."""
    if outliers:
        high_vhd = vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, keepdim=True)
        high_ta = ta > ta.mean(-1, keepdim=True) + ta.std(-1, keepdim=True)
        vhd = vhd.masked_fill(high_vhd & high_ta, 0.0)
    return vhd > vhd.median(-1, keepdim=True).values


def text_only(adapter: Adapter, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The batch's prompts without their visual tokens, left-padded again (``input_ids``, ``attention_mask``)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]  # [batch, seq]
    keep = mask.bool() & ~adapter.image_token_mask(inputs)
    lengths = keep.sum(-1)  # [batch]
    width = int(lengths.max())  # the one host sync: the new rows' length
    # each kept token's place in the new row: right-aligned (left padding), in order; a dropped token goes to a
    # spare column of its own past the row, cut off below (one scatter with distinct indices, deterministic on
    # any device; boolean-mask indexing would sync once per index)
    seq = ids.shape[1]
    dest = keep.long().cumsum(-1) - 1 + (width - lengths)[:, None]  # [batch, seq]
    dest = torch.where(keep, dest, width + torch.arange(seq, device=ids.device))
    pad = getattr(adapter.processor.tokenizer, "pad_token_id", None) or 0
    new_ids = torch.full((ids.shape[0], width + seq), pad, dtype=ids.dtype, device=ids.device)
    new_mask = torch.zeros((ids.shape[0], width + seq), dtype=mask.dtype, device=ids.device)
    new_ids.scatter_(1, dest, ids)  # [batch, width + seq]
    new_mask.scatter_(1, dest, keep.to(mask.dtype))
    out = {"input_ids": new_ids[:, :width], "attention_mask": new_mask[:, :width]}
    if "mm_token_type_ids" in inputs:  # Qwen-VL's processor marks image tokens; none are left
        out["mm_token_type_ids"] = torch.zeros_like(new_ids)
    return out


@METHODS.register("vhr")
class VHR(Method):
    """Amplify the heads whose output moves most when the image is removed, chosen at the first step."""

    name: ClassVar[str] = "vhr"

    def __init__(self, alpha: float = 2.0, layers: str | list[int] = "auto", outliers: bool = True) -> None:
        auto_or_list("layers", layers)
        super().__init__(alpha=alpha, layers=layers if layers == "auto" else list(layers), outliers=outliers)
        self.layers: list[int] = []
        self._text: dict[int, torch.Tensor] = {}  # layer -> text-only head outputs at the last position [B, H, hd]
        self._scale: dict[int, torch.Tensor] = {}  # layer -> [B, H] factor (alpha on H_l, 1 elsewhere)
        self._probing = False
        self._tally = DeviceTally(2)  # heads reinforced, VHD outliers zeroed (summed over layers and rows)
        self._rows = 0

    def check(self, adapter: Adapter) -> None:
        """Given layers must be layers of the LM (checked before the model loads)."""
        super().check(adapter)
        check_layers(adapter, self.name, self.hparams["layers"])

    def check_generation(self, gen_kwargs: dict[str, Any]) -> None:
        """Beam search reorders rows, the per-row head sets would not follow: refused before the model loads."""
        if int(gen_kwargs.get("num_beams", 1) or 1) > 1:
            raise UnsupportedError(
                "method 'vhr' chooses heads per row at the first step, which beam search (num_beams > 1) "
                "reorders; use greedy decoding (the paper's) or sampling"
            )

    def install(self) -> None:
        """Hook the head outputs of the reinforced layers and run the text-only probe before every call."""
        n = self.adapter.num_layers("lm")
        self.layers = auto_layers(n) if self.hparams["layers"] == "auto" else sorted(set(self.hparams["layers"]))
        handle = self.enter_context(attach(self.adapter, self.name, {"heads"}))
        for layer in self.layers:
            handle.heads([layer], self._site(layer))
        self.enter_context(self.adapter.views(self._probe))

    def _probe(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Before a call: the text-only forward that records the heads' outputs without the image."""
        self._text, self._scale = {}, {}
        if "pixel_values" not in inputs:
            return inputs  # a text-only batch: nothing to compare, nothing reinforced
        self._probing = True
        try:
            self.adapter.forward(text_only(self.adapter, inputs), logits_to_keep=1)
        finally:
            self._probing = False
        self._rows += inputs["input_ids"].shape[0]
        return inputs

    def _site(self, layer: int):
        alpha, outliers = float(self.hparams["alpha"]), self.hparams["outliers"]

        def fn(out: torch.Tensor, step: Step) -> torch.Tensor:  # out: [batch, q, heads, head_dim]
            if self._probing:
                self._text[layer] = out[:, -1].float()  # [batch, heads, head_dim]
                return out
            if layer not in self._text:
                return out  # a text-only batch
            if step.prefill:  # t = 0: select from the last position, layers below already reinforced
                text = self._text[layer]
                last = out[:, -1].float()
                vhd = (last - text).norm(dim=-1)  # [batch, heads]
                ta = text.pow(2).sum(-1)
                chosen = select_heads(vhd, ta, outliers)
                if outliers:
                    zeroed = (vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, keepdim=True)) & (
                        ta > ta.mean(-1, keepdim=True) + ta.std(-1, keepdim=True))  # fmt: skip
                    self._tally.add(1, zeroed.sum())
                self._tally.add(0, chosen.sum())
                self._scale[layer] = torch.where(chosen, alpha, 1.0).to(out.dtype)  # [batch, heads]
            return out * self._scale[layer][:, None, :, None]

        return fn

    def describe(self) -> dict[str, Any]:
        """Adds the resolved layers and how many heads were reinforced per layer and row on average."""
        heads, zeroed = self._tally.tolist()
        per = self._rows * max(1, len(self.layers))
        return super().describe() | {
            "resolved": {"layers": self.layers},
            "activity": {"rows": self._rows, "heads_per_layer_row": round(heads / per, 4) if self._rows else 0.0,
                         "outliers_zeroed_per_layer_row": round(zeroed / per, 4) if self._rows else 0.0},
        }  # fmt: skip
