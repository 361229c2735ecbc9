r"""CCA — Concentric Causal Attention.

Xing et al., "Mitigating Object Hallucination via Concentric Causal Attention", NeurIPS 2024, arXiv 2410.15926;
official code ``xing0047/cca-llava`` (``llava/cca_utils/cca.py``).

RoPE's long-term decay makes visual tokens far (in position) from the instruction contribute less; in raster
order the bottom-right of the image is closest to the text and the top-left farthest. CCA re-lays the visual
tokens of each image (each tile, for tiled families) in concentric rings around the centre:

* **Positions.** For a tile's ``H × W`` token grid, token ``(i, j)`` lies on ring
  ``ring(i, j) = min(i, j, H−1−i, W−1−j)``, ``R = ⌈min(H, W)/2⌉`` rings (12 for LLaVA-1.5's 24×24). If the tile's
  first visual token would have position ``s``, every token of ring ``r`` gets position ``s + r``: the tile costs
  ``R`` positions instead of ``H·W``, and everything after it is shifted down by ``H·W − R``. Decoding continues
  at the last prompt position + 1.
* **Mask (prefill).** Inside one tile a visual query on ring ``r`` may attend a visual key on ring ``r'`` iff
  ``r' ≤ r`` — the periphery sees the periphery only, the centre sees everything outside it, and attention within
  a ring is bidirectional (one shared position). Every other pair keeps the causal (+padding) mask: visual tokens
  see the text before them and earlier tiles; text after the image sees all visual tokens. Decoding steps use the
  ordinary mask (the prompt's keys were computed under the concentric one).

Family mapping (the paper defines CCA for LLaVA's single square 1-D-RoPE grid only):

* **LLaVA** — exactly the official scheme (``s`` = the image's first token index in the unpadded row).
* **InternVL** — per tile: every crop and the thumbnail get their own rings (``R = 8`` for InternVL3's 16×16
  tokens per tile, 2 for the tiny checkpoint's 4×4), tiles laid out one after the other in sequence order.
* **Qwen2-VL / Qwen2.5-VL (M-RoPE)** — our choice: a visual token's three M-RoPE components (temporal, height,
  width) are ALL set to ``s + ring(i, j)``, and text resumes at ``s + R`` in all three. The token therefore
  rotates like a 1-D token at its ring position, which is the published scheme verbatim. Keeping raster ``h``/``w``
  components (and only making ``t`` concentric) was rejected: the text→image distance along ``h``/``w`` would still
  grow with raster order, which is the very decay CCA removes.

Hyperparameters (none in the paper beyond the grid):
    positions (bool, default True): apply the concentric position ids (False: mask-only ablation).
    mask (bool, default True): apply the concentric causal mask (False: position-only ablation).

CCA is a TRAINED change: the paper retrains LLaVA-1.5 with it (checkpoint ``xing0047/cca-llava-1.5-7b``).
Applying it to a causally trained model is an ablation (the ``model=llava_cca`` config loads the shapes-world
LLaVA trained with CCA through ``shapes.train --method cca``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from methods.base import METHODS, Method
from methods.intervention import Batch, Step, attach


def ring_layout(adapter: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token's ring and tile, and the number of rings of the tile ending at each position.

    Returns:
        ring: ``[batch, seq]`` ring index of visual tokens, -1 elsewhere.
        tile: ``[batch, seq]`` a per-row tile number (0, 1, … in sequence order) of visual tokens, -1 elsewhere.
        ends: ``[batch, seq + 1]`` at index ``e``, the ring count R of a tile whose span ends at ``e`` (else 0).
    """
    ids = inputs["input_ids"]  # [batch, seq]
    ring = torch.full_like(ids, -1)
    tile = torch.full_like(ids, -1)
    ends = torch.zeros(ids.shape[0], ids.shape[1] + 1, dtype=torch.long, device=ids.device)
    maps, spans = adapter.visual_token_map(inputs), adapter.tile_spans(inputs)
    for b, (vmap, runs) in enumerate(zip(maps, spans, strict=True)):
        cursor = 0
        for t, (_image, _tile, start, end) in enumerate(runs):
            cells = vmap[cursor : cursor + end - start, 2:].to(ids.device)  # [n, 2] (row, col)
            cursor += end - start
            if (cells < 0).any():
                raise ValueError("CCA needs a grid cell for every visual token (a kept [CLS] token has none)")
            h, w = int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1
            i, j = cells[:, 0], cells[:, 1]
            ring[b, start:end] = torch.minimum(torch.minimum(i, j), torch.minimum(h - 1 - i, w - 1 - j))
            tile[b, start:end] = t
            ends[b, end] = (min(h, w) + 1) // 2
    return ring, tile, ends


def concentric_positions(
    ring: torch.Tensor, tile: torch.Tensor, ends: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """1-D CCA position ids ``[batch, seq]``: text counts 1, each tile counts its ring number R (padding → 0)."""
    text = ((attention_mask != 0) & (tile < 0)).long()  # [batch, seq]
    before = text.cumsum(-1) - text + ends[:, :-1].cumsum(-1)  # text tokens and tile rings before each token
    # a visual token sits at its tile's start (`before` is constant across the tile) plus its ring
    pos = torch.where(tile >= 0, before + ring, before)
    return pos.masked_fill(attention_mask == 0, 0)


def concentric_allowed(ring: torch.Tensor, tile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The image block of the concentric mask.

    Returns:
        block: ``[batch, q, k]`` True where query and key are visual tokens of the same tile.
        allow: ``[batch, q, k]`` True where the key's ring ≤ the query's ring (meaningful inside ``block``).
    """
    vis = tile >= 0
    block = vis[:, :, None] & vis[:, None, :] & (tile[:, :, None] == tile[:, None, :])
    allow = ring[:, None, :] <= ring[:, :, None]
    return block, allow


@METHODS.register("cca")
class CCA(Method):
    """Concentric position ids and concentric causal mask over each image's (tile's) token grid."""

    name: ClassVar[str] = "cca"

    def __init__(self, positions: bool = True, mask: bool = True) -> None:
        if not (positions or mask):
            raise ValueError("cca with positions=false and mask=false changes nothing; use method=none")
        super().__init__(positions=positions, mask=mask)
        self._last: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None  # (input_ids, its ring layout)

    def install(self) -> None:
        """Attach to the intervention layer (see the module docstring for what is registered)."""
        claims = {"mask"} | ({"positions"} if self.hparams["positions"] else set())
        handle = self.enter_context(attach(self.adapter, self.name, claims))
        if self.hparams["mask"]:
            handle.on_batch(self._prepare)
            handle.mask(self._mask)
        if self.hparams["positions"]:
            self.enter_context(self.adapter.positions(self._positions))

    def _layout(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """:func:`ring_layout` of this call's inputs, computed once for the position ids and the mask."""
        ids = inputs["input_ids"]
        if self._last is None or self._last[0] is not ids:
            self._last = (ids, ring_layout(self.adapter, inputs))
        return self._last[1]

    def _positions(self, default: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        ring, tile, ends = self._layout(inputs)
        pos = concentric_positions(ring, tile, ends, inputs["attention_mask"])  # [batch, seq]
        return pos.expand_as(default) if default.dim() == 3 else pos  # M-RoPE: all three components alike

    def _prepare(self, batch: Batch) -> None:
        ring, tile, _ends = self._layout(batch.inputs)
        batch.state[self.name] = concentric_allowed(ring, tile)

    def _mask(self, mask: torch.Tensor, step: Step) -> torch.Tensor:
        block, allow = step.batch.state[self.name]  # [batch, q, k] each
        return torch.where(block[:, None], allow[:, None], mask)  # [batch, 1, q, k]
