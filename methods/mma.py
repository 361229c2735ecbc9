r"""MMA — Modality-Mutual Attention (AKI).

"Seeing is Understanding: Unlocking Causal Attention into Modality-Mutual Attention for
Multimodal LLMs", ICML 2026, arXiv 2503.02597; official code ``sony/aki`` (``codes/open_flamingo/src/vlm.py``,
``_make_modality_mutual_mask``).

In a causal decoder the image tokens, placed before the question, never see it, so the visual representation
cannot depend on what is asked. MMA lets them: during PREFILL the mask becomes

    allowed(q, k) = causal(q, k)  OR  (q ∈ visual tokens  AND  k ∈ instruction),   then AND key-not-padding,

and everything else is unchanged — text rows stay causal, image↔image stays causal, positions are untouched
(M-RoPE stays M-RoPE), and decoding uses the ordinary mask (the image keys/values in the cache were computed
with the question visible). With several images, every visual token may see the instruction after the last one.

**Which tokens are the instruction** (``adapters.geometry.Geometry.instruction_spans``): every token after the last
visual token up to the first assistant-turn suffix — the user's question plus the template tokens between the
image and it (LLaVA's ``\n``, Qwen's ``<|vision_end|>``, InternVL's ``</img>\n``), excluding the end-of-turn and
assistant-header tokens. The official code ends the window at ``marker_index + n_visual`` in the expanded sequence,
but the placeholder expansion shifts later tokens by ``n_visual − 1``, so its exclusive end lands one past the
``<|assistant|>`` marker, which is therefore INCLUDED (an off-by-one relative to "the question"). We default to
the question only; ``include_turn_suffix=true`` adds the whole turn suffix (end-of-turn marker and assistant
header), the closest equivalent of the official window on templates whose header is more than one token.

Hyperparameters:
    include_turn_suffix (bool, default False): also let visual tokens see the end-of-turn / assistant-header tokens.

MMA is a TRAINED change (AKI uses it during SFT); on a causally trained model it is an ablation. The
``model=llava_mma`` config loads the shapes-world LLaVA trained with it (``shapes.train --method mma``).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from methods.base import METHODS, Method
from methods.intervention import Batch, Step, attach


def instruction_mask(spans: list[tuple[int, int]], seq: int, device: torch.device) -> torch.Tensor:
    """``[batch, seq]`` True on each row's ``[start, end)`` instruction span."""
    pos = torch.arange(seq, device=device)
    bounds = torch.tensor(spans, device=device)  # [batch, 2]
    return (pos >= bounds[:, :1]) & (pos < bounds[:, 1:])


@METHODS.register("mma")
class MMA(Method):
    """Prefill mask in which visual tokens also attend to the instruction's text tokens."""

    name: ClassVar[str] = "mma"

    def __init__(self, include_turn_suffix: bool = False) -> None:
        super().__init__(include_turn_suffix=include_turn_suffix)

    def install(self) -> None:
        """Attach to the intervention layer (see the module docstring for what is registered)."""
        handle = self.enter_context(attach(self.adapter, self.name, {"mask"}))
        handle.on_batch(self._prepare)
        handle.mask(self._mask)

    def _prepare(self, batch: Batch) -> None:
        spans = self.adapter.instruction_spans(batch.inputs)
        if self.hparams["include_turn_suffix"]:
            k = len(self.adapter.turn_suffix_ids())
            spans = [(start, end + k) for start, end in spans]
        instr = instruction_mask(spans, batch.prompt_len, batch.visual.device)  # [batch, seq]
        batch.state[self.name] = batch.visual[:, :, None] & instr[:, None, :]  # [batch, q, k]: image → instruction

    def _mask(self, mask: torch.Tensor, step: Step) -> torch.Tensor:
        return mask | step.batch.state[self.name][:, None]  # [batch, 1, q, k]
