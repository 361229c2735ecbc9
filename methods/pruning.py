"""What attention-scored visual-token pruners share: budgets, per-image/tile groups, debiasing, top-k, counts.

FastV (:mod:`methods.fastv`) and FasterVLM (:mod:`methods.fastervlm`) differ in where their importance score comes
from and when tokens leave; both then keep the top-scoring visual tokens of a group (a row's images for FastV, each
image or tile for FasterVLM), optionally after the attention-debiasing plug-in (:mod:`methods.debias`): positional
trend removal per image/tile and padding suppression. Text tokens are never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters.base import Adapter
from methods.base import UnsupportedError
from methods.debias import TREND_FILE, PositionalTrend, debias_scores, effective_budget, load_trend


def budget(n: int, ratio: float, keep: int | None) -> int:
    """Visual tokens kept out of ``n``: ``keep`` when given (at most ``n``), else ``round((1 - ratio) · n)``."""
    if keep is not None:
        return min(int(keep), n)
    return min(n, round((1.0 - ratio) * n))


def check_budget(ratio: float, keep: int | None) -> None:
    """Validate the pruning ratio / token budget (before the model loads)."""
    if keep is None and not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio (fraction of visual tokens removed) must be in [0, 1), got {ratio}")
    if keep is not None and int(keep) < 1:
        raise ValueError(f"keep (visual tokens kept) must be >= 1, got {keep}")


def trend_path(adapter: Adapter, debias_file: str | None) -> Path:
    """Where the debiasing curve is stored: ``debias_file`` or ``attn_debias.json`` beside the checkpoint."""
    return Path(debias_file) if debias_file else Path(adapter.path) / TREND_FILE


def require_trend(adapter: Adapter, debias_file: str | None, key: str, pruner: str) -> PositionalTrend:
    """Load the calibrated trend or fail (before the model loads) naming the calibration command."""
    path = trend_path(adapter, debias_file)
    try:
        return load_trend(path, key)
    except (FileNotFoundError, KeyError) as exc:
        raise UnsupportedError(
            f"debias=true needs the positional trend {key!r} of {adapter.path}: {exc}. Calibrate it with "
            f"`python -m methods.calibrate debias --model <option> --pruner {pruner}` (writes {path.name})"
        ) from None


@dataclass
class Debias:
    """The debiasing plug-in as a pruner applies it (``trend`` None: padding suppression only)."""

    trend: PositionalTrend | None
    pad_threshold: float = 0.5

    def __call__(self, scores: torch.Tensor, content: torch.Tensor | None) -> torch.Tensor:
        """Debiased scores of one image/tile's tokens in raster order, ``[n]``."""
        return debias_scores(scores, self.trend, content, pad_threshold=self.pad_threshold)

    def budget(self, k: int, content: torch.Tensor | None) -> int:
        """The budget lowered to the number of content tokens."""
        return effective_budget(k, content, self.pad_threshold)


def tile_groups(adapter: Adapter, inputs: dict[str, torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per row, the indices (into the row's visual tokens) of each image tile's tokens, raster order."""
    maps = adapter.visual_token_map(inputs)  # host-side geometry, [n_visual, >= 2] per row
    keys = torch.cat([m[:, :2] for m in maps]).tolist() if maps else []  # (image, tile): one host copy for all rows
    out, at = [], 0
    for vmap in maps:
        groups: dict[tuple[int, int], list[int]] = {}
        for i, key in enumerate(keys[at : at + len(vmap)]):
            groups.setdefault(tuple(key), []).append(i)
        out.append([torch.tensor(idx, dtype=torch.long, device="cpu") for idx in groups.values()])
        at += len(vmap)
    return out


def debiased(scores: torch.Tensor, tiles: list[torch.Tensor], debias: Debias | None,
             content: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """One row's scores ``[n]`` debiased per image/tile (the positional index restarts in every tile)."""
    out = scores.float().clone()
    if debias is not None:
        for idx in tiles:
            out[idx] = debias(out[idx], content[idx] if content is not None else None)
    return out


def select_top(scores: torch.Tensor, groups: list[torch.Tensor], k_of: Any, debias: Debias | None,
               content: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """Keep mask over one row's visual tokens ``[n]``: the top ``k_of(len(group))`` of every group.

    A group is all the row's visual tokens (FastV) or one image/tile (FasterVLM); with debiasing the budget is
    lowered to the group's content tokens.
    """
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for idx in groups:  # idx [m]: positions in the row, on the host (adapter geometry)
        k = k_of(len(idx))
        if debias is not None:
            k = debias.budget(k, content[idx.to(content.device)] if content is not None else None)
        if k > 0:
            at = idx.to(scores.device)  # a host index must not index a device tensor with device indices
            keep[at[torch.topk(scores[at], k).indices]] = True
    return keep


@dataclass
class KeptTokens:
    """Visual tokens seen and kept over a run (the method's report)."""

    rows: int = 0
    visual: int = 0
    kept: int = 0

    def add(self, n_visual: int, n_kept: int) -> None:
        """Count one row."""
        self.rows += 1
        self.visual += n_visual
        self.kept += n_kept

    def report(self) -> dict[str, Any]:
        """Mean visual tokens per row before and after pruning."""
        if not self.rows:
            return {"rows": 0}
        return {
            "rows": self.rows,
            "visual_tokens_per_row": round(self.visual / self.rows, 2),
            "kept_visual_tokens_per_row": round(self.kept / self.rows, 2),
            "kept_fraction": round(self.kept / max(self.visual, 1), 4),
        }
