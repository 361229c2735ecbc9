"""EmbedLens probe: which vocabulary words do visual tokens sit next to? (model-free parts).

After "What Do Visual Tokens Really Encode?" (CVPR 2026, arXiv 2603.00510, code EIT-NLP/EmbedLens). Each visual
token's projector output (its LLM input embedding) is compared by cosine similarity with every row of the LLM's input
embedding table, and its top-k (k=3) nearest vocabulary ids are kept. A token belongs to a group when any of its top-k
ids is that group's *marker* id; for one category per token the priority is ``vit_sink > llm_sink > dead > alive``.
Published markers exist for LLaVA-1.5-7B (Vicuna tokenizer) only; for other models :func:`calibrate_markers` picks,
per group, the id most frequent among reference tokens' top-k ids (tokens known to be of that kind by an independent
criterion) and keeps it only if its hit rate among them is at least ``min_hit`` and at least ``min_lift`` times its
rate among non-reference tokens.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

GROUPS = ("alive", "vit_sink", "llm_sink", "dead")  # category codes 0..3 in this order
MARKER_GROUPS = ("vit_sink", "llm_sink", "dead")
PUBLISHED_MARKERS: dict[str, dict[str, int]] = {
    "llava-hf/llava-1.5-7b-hf": {"vit_sink": 1141, "llm_sink": 26673, "dead": 30296},
}
COLORS = {"alive": None, "vit_sink": (255, 0, 0), "llm_sink": (255, 0, 255), "dead": (128, 128, 128)}  # RGB tints
MIN_CELL_PX = 16
MIN_WIDTH_PX = 240  # so legend labels stay readable
EPS = 1e-12


def nearest_vocab(
    embeds: torch.Tensor, table: torch.Tensor, k: int = 3, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k vocabulary rows by cosine similarity, in float32 and in chunks of ``chunk`` embeds × ``chunk`` rows.

    Args:
        embeds: Visual-token LLM input embeddings ``[n, d]``.
        table: The LLM's input embedding table ``[V, d]``.
        k: Neighbours kept per token.
        chunk: Rows of ``embeds`` and of ``table`` handled at once (bounds memory to ``chunk**2`` floats).

    Returns:
        ``(ids [n, k] long, cos [n, k] float32)``, descending cosine. Zero-norm rows give cosine 0, never NaN.
    """
    if embeds.ndim != 2 or table.ndim != 2 or embeds.shape[1] != table.shape[1]:
        raise ValueError(f"need embeds [n, d] and table [V, d], got {tuple(embeds.shape)} and {tuple(table.shape)}")
    if not 1 <= k <= table.shape[0] or chunk < 1:
        raise ValueError(f"need 1 <= k <= V={table.shape[0]} and chunk >= 1, got k={k}, chunk={chunk}")
    norms = torch.cat([table[i : i + chunk].float().norm(dim=1) for i in range(0, len(table), chunk)])  # [V]
    parts = [
        _topk_rows(embeds[i : i + chunk], table, norms.clamp_min(EPS), k, chunk) for i in range(0, len(embeds), chunk)
    ]
    if not parts:
        dev = embeds.device
        return torch.zeros((0, k), dtype=torch.long, device=dev), torch.zeros((0, k), dtype=torch.float32, device=dev)
    ids, cos = zip(*parts, strict=True)
    return torch.cat(ids), torch.cat(cos)


def _topk_rows(embeds: torch.Tensor, table: torch.Tensor, table_norm: torch.Tensor, k: int, chunk: int) -> tuple:
    """Running top-k of one chunk of embeds ``[c, d]`` over the table, ``chunk`` table rows at a time."""
    e = embeds.float()
    e = e / e.norm(dim=1, keepdim=True).clamp_min(EPS)  # [c, d]
    best_cos = e.new_full((len(e), 0), -math.inf)  # [c, <=k]
    best_ids = torch.zeros((len(e), 0), dtype=torch.long, device=e.device)  # [c, <=k]
    for t0 in range(0, len(table), chunk):
        t = table[t0 : t0 + chunk].to(e.device).float() / table_norm[t0 : t0 + chunk, None].to(e.device)  # [ct, d]
        sims = e @ t.T  # [c, ct]
        ids = torch.arange(t0, t0 + len(t), device=e.device).expand_as(sims)  # [c, ct]
        best_cos, pick = torch.cat([best_cos, sims], dim=1).topk(min(k, best_cos.shape[1] + len(t)), dim=1)
        best_ids = torch.cat([best_ids, ids], dim=1).gather(1, pick)
    return best_ids, best_cos


def classify(top_ids: torch.Tensor, markers: dict[str, int | None]) -> torch.Tensor:
    """One category code per token (index into :data:`GROUPS`), priority ``vit_sink > llm_sink > dead > alive``.

    Args:
        top_ids: Nearest vocabulary ids ``[n, k]``.
        markers: Group name → marker id; groups omitted or mapped to ``None`` never match.

    Returns:
        Codes ``[n]`` long.
    """
    _check_groups(markers, allow_alive=True)
    if markers.get("alive") is not None:
        raise ValueError("'alive' has no marker id; it is whatever no marker matches")
    codes = torch.zeros(top_ids.shape[0], dtype=torch.long, device=top_ids.device)  # [n]
    for group in reversed(MARKER_GROUPS):  # lowest priority first, higher ones overwrite
        if markers.get(group) is not None:
            codes[(top_ids == int(markers[group])).any(dim=1)] = GROUPS.index(group)
    return codes


def _check_groups(names: Any, allow_alive: bool) -> None:
    """Raise ``ValueError`` on group names outside :data:`GROUPS` (or ``'alive'`` when not allowed)."""
    allowed = GROUPS if allow_alive else MARKER_GROUPS
    bad = [g for g in names if g not in allowed]
    if bad:
        raise ValueError(f"unknown group(s) {bad}; groups are {GROUPS} (markers only for {MARKER_GROUPS})")


def fractions(codes: torch.Tensor) -> dict[str, float]:
    """Fraction of tokens in each group (all four keys; sums to 1, or all 0.0 when ``codes`` is empty)."""
    counts = torch.bincount(codes.flatten().long().cpu(), minlength=len(GROUPS))  # [4]
    if counts.numel() > len(GROUPS):
        raise ValueError(f"codes must lie in 0..{len(GROUPS) - 1}")
    n = int(counts.sum())
    return {g: (float(counts[i]) / n if n else 0.0) for i, g in enumerate(GROUPS)}


def _hit_counts(top_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per vocabulary id, how many tokens selected by ``mask`` have it among their top-k (duplicates counted once)."""
    ids, _ = top_ids[mask].sort(dim=1)  # [m, k]
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return torch.bincount(ids[keep], minlength=int(top_ids.max()) + 1 if top_ids.numel() else 0)  # [V']


def calibrate_markers(
    top_ids: torch.Tensor, reference: dict[str, torch.Tensor], min_hit: float = 0.5, min_lift: float = 2.0
) -> dict[str, dict[str, Any]]:
    """Pick each group's marker id from reference tokens (see module docstring for the criterion).

    Args:
        top_ids: Nearest vocabulary ids ``[n, k]`` of many visual tokens.
        reference: Group name → boolean mask ``[n]`` of tokens known (independently) to be of that kind.
        min_hit: Least fraction of reference tokens whose top-k must contain the marker.
        min_lift: Least ratio of that hit rate to the marker's rate among non-reference tokens.

    Returns:
        Per group in ``reference``: ``{"id", "hit_rate", "base_rate", "n_reference", "reason"}``; ``base_rate`` is
        over all tokens, ``reason`` says why ``id`` is ``None`` (else ``None``). An id goes to one group only: the
        group with the higher hit rate keeps it, the other takes its next-best candidate meeting the criteria.
    """
    _check_groups(reference, allow_alive=False)
    top_ids = top_ids.long().cpu()
    n = top_ids.shape[0]
    all_counts = _hit_counts(top_ids, torch.ones(n, dtype=torch.bool, device=top_ids.device))  # [V']
    out: dict[str, dict[str, Any]] = {}
    pairs: list[tuple[float, int, int, str]] = []  # (hit rate, group order, id, group) of acceptable candidates
    for group, mask in reference.items():
        mask = mask.bool().cpu().flatten()
        if mask.shape[0] != n:
            raise ValueError(f"reference[{group!r}] has {mask.shape[0]} entries, top_ids has {n} tokens")
        n_ref = int(mask.sum())
        out[group] = {"id": None, "hit_rate": 0.0, "base_rate": 0.0, "n_reference": n_ref, "reason": None}
        if n_ref == 0:
            out[group]["reason"] = "no reference tokens"
            continue
        ref_counts = _hit_counts(top_ids, mask)  # [V']
        non_counts = all_counts - ref_counts  # [V']
        _, order = ref_counts.sort(descending=True, stable=True)  # [V'], ties: lower id first
        for rank, cand in enumerate(order.tolist()):
            hit = int(ref_counts[cand]) / n_ref
            non = int(non_counts[cand]) / (n - n_ref) if n > n_ref else 0.0
            reason = _rejection(hit, non, min_hit, min_lift)
            if rank == 0:
                out[group].update(id=cand, hit_rate=hit, base_rate=int(all_counts[cand]) / n, reason=reason)
                if reason:
                    out[group]["id"] = None
                    break
            if hit == 0.0 or hit < min_hit:
                break  # candidates are sorted by hit rate: none later can pass
            if reason is None:
                pairs.append((hit, MARKER_GROUPS.index(group), cand, group))
    return _assign(out, pairs, all_counts, n)


def _rejection(hit: float, non: float, min_hit: float, min_lift: float) -> str | None:
    """Why a candidate with hit rate ``hit`` (non-reference rate ``non``) fails the criteria, or ``None``."""
    if hit < min_hit:
        return f"hit rate {hit:.3f} < min_hit {min_hit}"
    if hit < min_lift * non:
        return f"lift {hit / non:.2f} < min_lift {min_lift} (hit rate {hit:.3f}, non-reference rate {non:.3f})"
    return None


def _assign(out: dict, pairs: list, all_counts: torch.Tensor, n: int) -> dict[str, dict[str, Any]]:
    """Greedy one-id-per-group assignment of acceptable candidates in descending hit rate."""
    primary = {g: r["id"] for g, r in out.items()}
    chosen: dict[str, int] = {}
    for hit, _, cand, group in sorted(pairs, key=lambda p: (-p[0], p[1], p[2])):
        if group not in chosen and cand not in chosen.values():
            chosen[group] = cand
            out[group].update(id=cand, hit_rate=hit, base_rate=int(all_counts[cand]) / n, reason=None)
    for group, cand in primary.items():
        if cand is not None and group not in chosen:
            owner = next(g for g, c in chosen.items() if c == cand)
            out[group].update(id=None, reason=f"marker {cand} kept by {owner} (higher hit rate); no other candidate")
    return out


def overlay_map(image: Image.Image, codes: torch.Tensor, grid: tuple[int, int], alpha: float = 0.5) -> np.ndarray:
    """Tint each grid cell of ``image`` by its token's category, with grid lines and a legend strip below.

    Args:
        image: The image the grid covers entirely.
        codes: Category codes ``[rows * cols]`` in raster order.
        grid: ``(rows, cols)``.
        alpha: Tint opacity.

    Returns:
        RGB uint8 array ``[H' + legend, W', 3]``; small images are upscaled (nearest) so cells are ≥ 16 px
        and the width ≥ 240 px.
    """
    rows, cols = grid
    codes = (codes if isinstance(codes, torch.Tensor) else torch.as_tensor(codes, device="cpu")).flatten().long().cpu()
    if codes.numel() != rows * cols:
        raise ValueError(f"{codes.numel()} codes for a {rows}x{cols} grid")
    if codes.numel() and not 0 <= int(codes.min()) <= int(codes.max()) < len(GROUPS):
        raise ValueError(f"codes must lie in 0..{len(GROUPS) - 1}")
    img = np.asarray(image.convert("RGB"))  # [H, W, 3]
    scale = math.ceil(max(MIN_CELL_PX / min(img.shape[0] / rows, img.shape[1] / cols), MIN_WIDTH_PX / img.shape[1]))
    if scale > 1:
        img = cv2.resize(img, (img.shape[1] * scale, img.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    out = img.astype(np.float32)  # [H', W', 3]
    ys = np.round(np.linspace(0, img.shape[0], rows + 1)).astype(int)
    xs = np.round(np.linspace(0, img.shape[1], cols + 1)).astype(int)
    for i, code in enumerate(codes.tolist()):
        color = COLORS[GROUPS[code]]
        if color is not None:
            r, c = divmod(i, cols)
            cell = out[ys[r] : ys[r + 1], xs[c] : xs[c + 1]]
            cell[:] = (1 - alpha) * cell + alpha * np.asarray(color, np.float32)
    out[ys[1:-1], :] = 255
    out[:, xs[1:-1]] = 255
    counts = torch.bincount(codes, minlength=len(GROUPS)).tolist()
    return np.concatenate([np.round(out).astype(np.uint8), _legend(img.shape[1], counts)], axis=0)


def _legend(width: int, counts: list[int]) -> np.ndarray:
    """Legend strip ``[h, width, 3]``: a swatch, the group name and its count per group, wrapping to new lines."""
    font, fs, line_h = cv2.FONT_HERSHEY_SIMPLEX, 0.4, 18
    items, x, y = [], 4, 0
    for group, count in zip(GROUPS, counts, strict=True):
        text = f"{group} {count}"
        w = 16 + cv2.getTextSize(text, font, fs, 1)[0][0] + 10
        if x > 4 and x + w > width:
            x, y = 4, y + line_h
        items.append((x, y, group, text))
        x += w
    strip = np.full((y + line_h, width, 3), 32, np.uint8)
    for x, y, group, text in items:
        cv2.rectangle(strip, (x, y + 4), (x + 10, y + 14), COLORS[group] or (255, 255, 255), -1)
        cv2.putText(strip, text, (x + 14, y + 13), font, fs, (255, 255, 255), 1, cv2.LINE_AA)
    return strip


def save_map(path: str | Path, image: Image.Image, codes: torch.Tensor, grid: tuple[int, int]) -> None:
    """Write :func:`overlay_map` to ``path`` as PNG, creating the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(overlay_map(image, codes, grid), cv2.COLOR_RGB2BGR)):
        raise OSError(f"cv2.imwrite failed for {path}")
