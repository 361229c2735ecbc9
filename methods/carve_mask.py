"""CARVE's image side: from a per-pixel saliency map to a masked, cropped and upscaled image.

CARVE ("Focusing by Contrastive Attention", arXiv 2509.06461) contrasts a vision-language model's attention under a
generic and a task-specific instruction to get a saliency map of the image, then asks the model again with only the
salient part of the image. This module holds the pure-image part of that pipeline (numpy, OpenCV, PIL; no model code):

* :func:`paint` turns per-tile token-score grids into one saliency map over the original image's pixels, placing each
  grid on the rectangle of the image it covers (letterbox padding, centre crops and tiles included).
* :func:`select_regions` (step 4) thresholds the map at its ``(1 - p)``-quantile so that at least the top ``p`` share of
  pixels survives, splits the survivors into 8-connected regions and keeps the most important ones: ranked by summed
  saliency (or by area), the best ``max(k, floor(p · n))`` of the ``n`` regions.
* :func:`refine` (steps 5-6) blacks out everything outside the kept regions, crops the image to their bounding box and
  enlarges the crop (Lanczos) until it covers the original size again, so that the model sees the relevant detail at a
  higher resolution and nothing else.
* :func:`overlay` renders the saliency heat map and the kept regions' outlines over the image for inspection.
"""

from __future__ import annotations

import math
import numbers

import cv2
import numpy as np
import PIL.Image

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in the ORIGINAL image's pixel coordinates

RANKS = ("attention_sum", "size")


def _check_finite_2d(name: str, array: np.ndarray) -> np.ndarray:
    """Return ``array`` as an ndarray after checking it is non-empty, 2-D, real-valued and finite."""
    array = np.asarray(array)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has non-finite values (NaN or inf)")
    return array


def _paste(canvas: np.ndarray, grid: np.ndarray, box: Box) -> None:
    """Add ``grid``, bilinearly resized to ``box``'s pixel extent, onto ``canvas`` where the two overlap."""
    x0f, y0f, x1f, y1f = (float(v) for v in box)
    x0, y0 = round(x0f), round(y0f)
    width, height = max(1, round(x1f - x0f)), max(1, round(y1f - y0f))
    resized = cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)  # [height, width]
    rows, cols = canvas.shape
    top, bottom = max(y0, 0), min(y0 + height, rows)
    left, right = max(x0, 0), min(x0 + width, cols)
    if top >= bottom or left >= right:
        return  # the box lies entirely outside the image
    canvas[top:bottom, left:right] += resized[top - y0 : bottom - y0, left - x0 : right - x0]


def paint(maps: list[np.ndarray], boxes: list[Box], size: tuple[int, int]) -> np.ndarray:
    """Sum per-tile token-score grids into one saliency map over the original image.

    Args:
        maps: Score grids ``[rows_i, cols_i]``, one score per visual token in row-major grid order.
        boxes: For each grid, the rectangle ``(x0, y0, x1, y1)`` of the original image (x right, y down, pixels) that it
            covers. It may reach beyond the image (letterbox padding: that part of the grid is cut off) or lie inside
            it (a centre crop or a tile); a full-image thumbnail box and tile boxes can be mixed.
        size: ``(height, width)`` of the original image.

    Returns:
        float32 ``[height, width]``: each grid resized bilinearly to its box's extent (origin rounded to whole pixels,
        width ``max(1, round(x1 - x0))``, height ``max(1, round(y1 - y0))``) and added where it overlaps the image.

    Raises:
        ValueError: On a length mismatch, a grid that is not 2-D or not finite, a non-finite box or a bad size.
    """
    if len(maps) != len(boxes):
        raise ValueError(f"maps and boxes must have the same length, got {len(maps)} maps and {len(boxes)} boxes")
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ValueError(f"size (height, width) must be positive, got {size}")
    canvas = np.zeros((height, width), np.float32)  # [H, W]
    for i, (grid, box) in enumerate(zip(maps, boxes, strict=True)):
        grid = _check_finite_2d(f"maps[{i}]", grid)  # [rows_i, cols_i]
        if len(box) != 4 or not all(math.isfinite(float(v)) for v in box):
            raise ValueError(f"boxes[{i}] must be 4 finite numbers (x0, y0, x1, y1), got {box}")
        _paste(canvas, grid, box)
    return canvas


def _component_scores(saliency: np.ndarray, labels: np.ndarray, stats: np.ndarray, rank: str) -> np.ndarray:
    """Score of each foreground component (labels ``1..n``): summed saliency or pixel area."""
    if rank == "size":
        return stats[1:, cv2.CC_STAT_AREA].astype(np.float64)  # [n]
    sums = np.bincount(labels.ravel(), weights=saliency.ravel().astype(np.float64), minlength=len(stats))
    return sums[1:]  # [n]


def select_regions(saliency: np.ndarray, p: float = 0.2, k: int = 3, rank: str = "attention_sum") -> np.ndarray:
    """Keep the most salient connected regions of a saliency map (CARVE step 4).

    Pixels at or above the ``(1 - p)``-quantile of ``saliency`` survive (at least the top ``p`` share of pixels), are
    split into 8-connected components, and the best ``max(k, floor(p · n))`` of the ``n`` components (at most ``n``) are
    kept, ranked by summed saliency (``"attention_sum"``) or by pixel area (``"size"``); ties go to the component
    OpenCV labels first. A constant map forms one component covering the whole image.

    Args:
        saliency: Per-pixel saliency ``[H, W]``.
        p: Share of pixels kept by the threshold, in ``(0, 1]``.
        k: Minimum number of components kept, ``>= 1``.
        rank: ``"attention_sum"`` or ``"size"``.

    Returns:
        bool ``[H, W]``: True on the kept components.

    Raises:
        ValueError: On ``p`` outside ``(0, 1]``, ``k < 1``, an unknown ``rank``, or a saliency map that is not 2-D or
            not finite.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1], got {p}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k}")
    if rank not in RANKS:
        raise ValueError(f"rank must be one of {RANKS}, got {rank!r}")
    saliency = _check_finite_2d("saliency", saliency)  # [H, W]
    tau = np.quantile(saliency, 1.0 - p)
    binary = (saliency >= tau).astype(np.uint8)  # [H, W]
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)  # labels [H, W]; 0 = background
    n = count - 1  # >= 1: the maximum always reaches the threshold
    scores = _component_scores(saliency, labels, stats, rank)  # [n]
    keep = min(n, max(int(k), math.floor(p * n)))
    best = np.argsort(-scores, kind="stable")[:keep] + 1  # component labels
    return np.isin(labels, best)  # [H, W]


def _check_mask(mask: np.ndarray, image: PIL.Image.Image) -> np.ndarray:
    """Return ``mask`` as bool after checking it matches the image's ``(height, width)``."""
    mask = np.asarray(mask)
    expected = (image.height, image.width)
    if mask.shape != expected:
        raise ValueError(f"mask shape {mask.shape} must equal the image's (height, width) {expected}")
    return mask.astype(bool)


def refine(image: PIL.Image.Image, mask: np.ndarray) -> PIL.Image.Image:
    """Mask, crop and upscale an image to its selected regions (CARVE steps 5-6).

    Pixels outside ``mask`` are set to black, the image is cropped to the mask's bounding box, and the crop is enlarged
    with Lanczos interpolation by ``max(W / w, H / h)`` so that it covers the original ``W x H`` (the output keeps the
    crop's aspect ratio, so one side may exceed the original's).

    Args:
        image: Original image; converted to RGB first.
        mask: bool ``[H, W]`` of the regions to keep.

    Returns:
        The refined RGB image. With an all-False mask, an unchanged copy of the (RGB) original.

    Raises:
        ValueError: When ``mask``'s shape is not ``(image.height, image.width)``.
    """
    mask = _check_mask(mask, image)  # [H, W]
    rgb = image.convert("RGB")
    if not mask.any():
        return rgb.copy()
    masked = np.asarray(rgb) * mask[:, :, None]  # [H, W, 3] uint8
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = np.ascontiguousarray(masked[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])  # [h, w, 3]
    h, w = crop.shape[:2]
    scale = max(image.width / w, image.height / h)
    upscaled = cv2.resize(crop, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_LANCZOS4)
    return PIL.Image.fromarray(upscaled)


def _heat(saliency: np.ndarray) -> np.ndarray:
    """Saliency min-max normalised to 0..255 and coloured with the JET map, as RGB ``[H, W, 3]`` uint8."""
    low, high = float(saliency.min()), float(saliency.max())
    if high > low:
        levels = np.round((saliency - low) / (high - low) * 255.0).astype(np.uint8)  # [H, W]
    else:
        levels = np.zeros(saliency.shape, np.uint8)  # constant map
    return cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)  # [H, W, 3]


def overlay(image: PIL.Image.Image, saliency: np.ndarray, mask: np.ndarray) -> PIL.Image.Image:
    """Inspection picture: the saliency heat map blended over the image, with the mask's outlines in white.

    Args:
        image: Original image; converted to RGB.
        saliency: Per-pixel saliency ``[H, W]``; min-max normalised (a constant map shows as the colormap's low end).
        mask: bool ``[H, W]``; the outer contours of its regions are drawn 1 px wide in white.

    Returns:
        RGB image of the same size as ``image``.

    Raises:
        ValueError: When ``saliency`` or ``mask`` does not match the image's ``(height, width)`` or ``saliency`` is not
            finite.
    """
    mask = _check_mask(mask, image)  # [H, W]
    saliency = _check_finite_2d("saliency", saliency)  # [H, W]
    if saliency.shape != mask.shape:
        raise ValueError(f"saliency shape {saliency.shape} must equal the image's (height, width) {mask.shape}")
    rgb = np.ascontiguousarray(image.convert("RGB"))  # [H, W, 3]
    blend = cv2.addWeighted(rgb, 0.5, _heat(saliency.astype(np.float64)), 0.5, 0.0)  # [H, W, 3]
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(blend, contours, -1, (255, 255, 255), 1)
    return PIL.Image.fromarray(blend)
