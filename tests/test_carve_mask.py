"""CARVE's image side: painting token grids onto the image, region selection, refinement and the overlay."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from methods.carve_mask import overlay, paint, refine, select_regions


def _resize(grid: np.ndarray, width: int, height: int) -> np.ndarray:
    return cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def _image(height: int = 64, width: int = 64, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    pixels = np.random.default_rng(seed).integers(1, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels), pixels


# paint


def test_paint_constant_grid_over_full_image_is_constant():
    canvas = paint([np.full((4, 4), 2.5)], [(0.0, 0.0, 48.0, 32.0)], (32, 48))
    assert canvas.shape == (32, 48)
    assert canvas.dtype == np.float32
    np.testing.assert_allclose(canvas, 2.5, rtol=0, atol=1e-6)


def test_paint_left_half_box_leaves_right_half_zero():
    grid = np.arange(1.0, 17.0).reshape(4, 4)
    canvas = paint([grid], [(0.0, 0.0, 24.0, 32.0)], (32, 48))
    assert np.all(canvas[:, 24:] == 0.0)
    np.testing.assert_allclose(canvas[:, :24], _resize(grid, 24, 32), rtol=0, atol=1e-6)
    assert canvas[:, :24].min() >= 1.0


def test_paint_letterbox_box_cuts_off_padding_rows():
    # Image 64 wide x 32 high, padded to a 64x64 square: the grid's rows 0-1 and 6-7 lie on padding.
    grid = np.full((8, 8), 100.0)
    grid[2:6] = np.arange(32.0).reshape(4, 8) / 10.0  # small values 0.0..3.1 on the image rows
    canvas = paint([grid], [(0.0, -16.0, 64.0, 48.0)], (32, 64))
    np.testing.assert_allclose(canvas, _resize(grid, 64, 64)[16:48], rtol=0, atol=1e-5)
    inner = canvas[4:28]  # away from the bilinear blend with the padding rows
    assert inner.max() <= grid[2:6].max() + 1e-5
    assert inner.min() >= grid[2:6].min() - 1e-5


def test_paint_box_beyond_right_edge_keeps_left_part():
    grid = np.arange(16.0).reshape(2, 8)
    canvas = paint([grid], [(32.0, 0.0, 96.0, 16.0)], (16, 64))
    assert np.all(canvas[:, :32] == 0.0)
    np.testing.assert_allclose(canvas[:, 32:], _resize(grid, 64, 16)[:, :32], rtol=0, atol=1e-5)


def test_paint_rounds_box_origin_and_extent():
    # x0 = round(2.6) = 3, y0 = round(1.6) = 2, width = round(10.4 - 2.6) = 8 (not 10 - 3), height = round(5.0) = 5.
    canvas = paint([np.ones((1, 1))], [(2.6, 1.6, 10.4, 6.6)], (12, 16))
    expected = np.zeros((12, 16), np.float32)
    expected[2:7, 3:11] = 1.0
    assert np.array_equal(canvas, expected)


def test_paint_thumbnail_and_tile_add_up():
    thumb = np.arange(9.0).reshape(3, 3)
    tile = np.full((2, 2), 5.0)
    full_box, sub_box = (0.0, 0.0, 40.0, 40.0), (10.0, 20.0, 30.0, 40.0)
    both = paint([thumb, tile], [full_box, sub_box], (40, 40))
    np.testing.assert_allclose(
        both, paint([thumb], [full_box], (40, 40)) + paint([tile], [sub_box], (40, 40)), rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(both[20:40, 10:30], _resize(thumb, 40, 40)[20:40, 10:30] + 5.0, rtol=0, atol=1e-5)
    np.testing.assert_allclose(both[:20], _resize(thumb, 40, 40)[:20], rtol=0, atol=1e-6)


def test_paint_rejects_bad_inputs():
    box = (0.0, 0.0, 8.0, 8.0)
    with pytest.raises(ValueError, match="same length"):
        paint([np.ones((2, 2))], [box, box], (8, 8))
    with pytest.raises(ValueError, match="2-D"):
        paint([np.ones(4)], [box], (8, 8))
    with pytest.raises(ValueError, match="non-finite"):
        paint([np.array([[1.0, np.nan], [0.0, 1.0]])], [box], (8, 8))
    with pytest.raises(ValueError, match="non-finite"):
        paint([np.array([[1.0, np.inf], [0.0, 1.0]])], [box], (8, 8))


# select_regions


def _planted() -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Two separate rectangles on zeros: a small bright one (8x8, sum 320) and a large dim one (16x16, sum 256)."""
    saliency = np.zeros((64, 64))
    bright = np.zeros((64, 64), bool)
    bright[8:16, 8:16] = True
    large = np.zeros((64, 64), bool)
    large[32:48, 24:40] = True
    saliency[bright] = 5.0
    saliency[large] = 1.0
    return saliency, bright, large, (bright.sum() + large.sum()) / saliency.size


def test_select_regions_planted_area_fraction_recovers_union():
    saliency, bright, large, p = _planted()
    mask = select_regions(saliency, p=p, k=3)
    assert mask.dtype == bool
    assert np.array_equal(mask, bright | large)


def test_select_regions_k1_attention_sum_keeps_brighter():
    saliency, bright, _, p = _planted()
    assert np.floor(p * 2) < 1
    assert np.array_equal(select_regions(saliency, p=p, k=1, rank="attention_sum"), bright)


def test_select_regions_k1_size_keeps_larger():
    saliency, _, large, p = _planted()
    assert np.array_equal(select_regions(saliency, p=p, k=1, rank="size"), large)


def test_select_regions_keeps_floor_p_n_when_above_k():
    # Five isolated pixels; p = 5/9 keeps exactly them, and floor(5/9 * 5) = 2 > k = 1 components survive.
    saliency = np.array([[1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 4.0, 0.0, 5.0]])
    mask = select_regions(saliency, p=5 / 9, k=1)
    assert np.array_equal(mask[0], [False, False, False, False, False, False, True, False, True])


def test_select_regions_uses_8_connectivity():
    saliency = np.zeros((4, 4))
    saliency[0, 0] = saliency[1, 1] = 1.0  # diagonal neighbours: one component (sum 2) with 8-connectivity
    saliency[3, 3] = 1.5
    mask = select_regions(saliency, p=3 / 16, k=1)
    expected = np.zeros((4, 4), bool)
    expected[0, 0] = expected[1, 1] = True
    assert np.array_equal(mask, expected)


def test_select_regions_constant_map_keeps_everything():
    assert select_regions(np.full((8, 12), 0.3), p=0.2, k=1).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 0.0}, "p must be"),
        ({"p": 1.5}, "p must be"),
        ({"p": float("nan")}, "p must be"),
        ({"k": 0}, "k must be"),
        ({"rank": "area"}, "rank must be"),
    ],
)
def test_select_regions_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_regions(np.ones((4, 4)), **kwargs)


def test_select_regions_rejects_bad_saliency():
    with pytest.raises(ValueError, match="non-finite"):
        select_regions(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="2-D"):
        select_regions(np.ones(4))


# refine


def test_refine_rectangle_mask_crops_and_upscales():
    image, pixels = _image()
    mask = np.zeros((64, 64), bool)
    mask[16:48, 8:40] = True
    out = refine(image, mask)
    assert out.mode == "RGB"
    assert out.size == (64, 64)
    expected = cv2.resize(np.ascontiguousarray(pixels[16:48, 8:40]), (64, 64), interpolation=cv2.INTER_LANCZOS4)
    assert np.array_equal(np.asarray(out), expected)


def test_refine_l_shaped_mask_zeroes_inside_bbox():
    image, pixels = _image(seed=1)
    mask = np.zeros((64, 64), bool)
    mask[0:32, 0:8] = True  # vertical bar
    mask[24:32, 0:32] = True  # horizontal bar: bbox rows 0-31, cols 0-31
    out = np.asarray(refine(image, mask))
    assert out.shape == (64, 64, 3)
    masked = pixels * mask[:, :, None]
    expected = cv2.resize(np.ascontiguousarray(masked[0:32, 0:32]), (64, 64), interpolation=cv2.INTER_LANCZOS4)
    assert np.array_equal(out, expected)
    # Source rows 0-23, cols 8-31 are zeroed; output pixels here see only them through the Lanczos kernel.
    assert np.all(out[8:32, 28:60] == 0)
    assert out[56:64, 0:64].mean() > 50  # the horizontal bar stays


def test_refine_non_square_bbox_uses_max_ratio():
    image, pixels = _image(seed=2)
    mask = np.zeros((64, 64), bool)
    mask[16:48, 24:40] = True  # 16 wide x 32 high: scale = max(64/16, 64/32) = 4
    out = refine(image, mask)
    assert out.size == (64, 128)
    expected = cv2.resize(np.ascontiguousarray(pixels[16:48, 24:40]), (64, 128), interpolation=cv2.INTER_LANCZOS4)
    assert np.array_equal(np.asarray(out), expected)


def test_refine_converts_to_rgb():
    gray = Image.fromarray(np.full((32, 32), 77, np.uint8), mode="L")
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    out = refine(gray, mask)
    assert out.mode == "RGB"
    assert out.size == (32, 32)
    assert np.all(np.asarray(out) == 77)


def test_refine_all_false_mask_returns_original():
    image, pixels = _image(seed=3)
    out = refine(image, np.zeros((64, 64), bool))
    assert out is not image
    assert out.size == image.size
    assert np.array_equal(np.asarray(out), pixels)


def test_refine_rejects_wrong_mask_shape():
    image, _ = _image()
    with pytest.raises(ValueError, match="mask shape"):
        refine(image, np.ones((64, 32), bool))


# overlay


def test_overlay_size_contour_and_blend():
    image = Image.fromarray(np.full((40, 60, 3), 100, np.uint8))
    mask = np.zeros((40, 60), bool)
    mask[10:20, 10:30] = True
    out = overlay(image, np.full((40, 60), 0.7), mask)
    assert out.mode == "RGB"
    assert out.size == image.size
    pixels = np.asarray(out)
    assert tuple(pixels[10, 10]) == (255, 255, 255)  # corner of the contour
    assert tuple(pixels[15, 29]) == (255, 255, 255)  # right edge
    # Off the contour: 50/50 blend of grey with the colormap's low end (constant map), in RGB order.
    jet_low = cv2.applyColorMap(np.zeros((1, 1), np.uint8), cv2.COLORMAP_JET)[0, 0, ::-1].astype(float)
    np.testing.assert_allclose(pixels[30, 45], 0.5 * 100 + 0.5 * jet_low, atol=1)
    np.testing.assert_allclose(pixels[15, 20], 0.5 * 100 + 0.5 * jet_low, atol=1)  # inside, not on the contour
    for y, x in [(9, 20), (11, 20), (15, 9), (15, 11)]:  # next to the contour: it is 1 px wide
        np.testing.assert_allclose(pixels[y, x], 0.5 * 100 + 0.5 * jet_low, atol=1)


def test_overlay_heat_follows_saliency():
    image = Image.fromarray(np.zeros((8, 16, 3), np.uint8))
    saliency = np.zeros((8, 16))
    saliency[:, 8:] = 1.0
    pixels = np.asarray(overlay(image, saliency, np.zeros((8, 16), bool))).astype(int)
    # JET: low = blue, high = red (RGB order).
    assert pixels[4, 2, 2] > pixels[4, 2, 0]
    assert pixels[4, 12, 0] > pixels[4, 12, 2]


def test_overlay_draws_outer_contours_only():
    image = Image.fromarray(np.full((40, 40, 3), 100, np.uint8))
    mask = np.zeros((40, 40), bool)
    mask[5:35, 5:35] = True
    mask[15:25, 15:25] = False  # a hole: its border is not an outer contour
    pixels = np.asarray(overlay(image, np.zeros((40, 40)), mask))
    assert tuple(pixels[5, 20]) == (255, 255, 255)
    assert tuple(pixels[34, 20]) == (255, 255, 255)
    assert tuple(pixels[14, 20]) != (255, 255, 255)
    assert tuple(pixels[20, 14]) != (255, 255, 255)
