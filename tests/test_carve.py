"""CARVE: tile geometry, recorded attention, planted contrast → mask, re-fed images and final prompts, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from adapters.generation import model_inputs
from harness.calls import AdapterCalls
from methods.carve import CARVE, auto_layers, contrast, image_saliency
from methods.carve_mask import refine, select_regions
from tasks.base import Request

FAMILIES = ("llava", "qwen_vl", "internvl")  # conftest's 4-layer random models
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]


@pytest.fixture(scope="module")
def loaded(four_layer):
    return four_layer(seed=7)


def _img(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _marker(w: int, h: int, x: int, y: int) -> Image.Image:
    """Black image with a white 4x4 square whose top-left corner is (x, y)."""
    im = Image.new("RGB", (w, h))
    ImageDraw.Draw(im).rectangle([x, y, x + 3, y + 3], fill=(255, 255, 255))
    return im


def _brightest(tile: torch.Tensor) -> tuple[float, float]:
    """(x, y) centroid of the brightest pixels of a normalised ``[3, H, W]`` tile."""
    grey = (tile.float().cpu() * STD + MEAN).mean(0)  # [H, W]
    ys, xs = torch.nonzero(grey > 0.8 * grey.max(), as_tuple=True)
    return float(xs.float().mean()) + 0.5, float(ys.float().mean()) + 0.5


# ---------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize(("family", "size", "pad"), [("llava", (96, 64), False), ("llava", (96, 64), True),
                                                     ("internvl", (128, 128), False)])  # fmt: skip
def test_tile_frames_place_a_marker_where_the_processor_put_it(loaded, family, size, pad):
    adapter = loaded(family)
    old = adapter.processor.image_processor
    if pad:  # llava-1.5's own preprocessing: pad to a square (image-mean colour), then resize and crop
        side = {"height": 64, "width": 64}
        adapter.processor.image_processor = LlavaImageProcessorPil(
            size={"shortest_edge": 64}, crop_size=side, do_center_crop=True, do_pad=True,
            image_mean=MEAN.flatten().tolist(), image_std=STD.flatten().tolist())  # fmt: skip
    try:
        w, h = size
        x, y = 70, 20  # marker centre (72, 22) in original pixels
        inputs = adapter.build_inputs([adapter.format_prompt("Where?")], [[_marker(w, h, x, y)]])
        frames = adapter.tile_frames(inputs)[0]
        content = adapter.visual_content(inputs)[0].reshape(8, 8) if family == "llava" else None
    finally:
        adapter.processor.image_processor = old
    pixels = inputs["pixel_values"]  # [tiles, 3, S, S]
    assert len(frames) == pixels.shape[0] == (5 if family == "internvl" else 1)  # 2x2 crops + thumbnail
    for frame, tile in zip(frames, pixels, strict=True):
        x0, y0, x1, y1 = frame.box
        side = tile.shape[-1]
        inside = x0 <= x + 2 < x1 and y0 <= y + 2 < y1
        if not inside:
            assert (tile.float().cpu() * STD + MEAN).max() < 0.3  # the marker is not in this tile
            continue
        px, py = ((x + 2 - x0) / (x1 - x0) * side, (y + 2 - y0) / (y1 - y0) * side)
        bx, by = _brightest(tile)
        assert abs(bx - px) < 1.5 and abs(by - py) < 1.5, (frame, (px, py), (bx, by))
    if family == "llava":
        assert frames[0].box == ((0.0, -16.0, 96.0, 80.0) if pad else (16.0, 0.0, 80.0, 64.0))
        # the content fraction per token agrees (image rows 16..80 of the 96-pixel square, 12-pixel cells)
        expected = torch.tensor([0, 2 / 3, 1, 1, 1, 1, 2 / 3, 0] if pad else [1.0] * 8)[:, None].expand(8, 8)
        torch.testing.assert_close(content, expected.float())


def test_qwen_frames_cover_the_whole_image_on_its_merged_grid(loaded):
    adapter = loaded("qwen_vl")
    inputs = adapter.build_inputs([adapter.format_prompt("Where?")] * 2, [[_img(96, 48, 0)], [_img(64, 64, 1)]])
    frames = adapter.tile_frames(inputs)
    grids = adapter.token_grids(inputs)
    assert [(f.rows, f.cols, f.box) for row in frames for f in row] == [
        (grids[0][0], grids[0][1], (0.0, 0.0, 96.0, 48.0)),
        (grids[1][0], grids[1][1], (0.0, 0.0, 64.0, 64.0)),
    ]


# ---------------------------------------------------------------------------------------------- contrast and mask
def test_planted_attention_pair_masks_exactly_the_planted_band(loaded):
    """Q attends to grid rows 2-3 and to row 6; G (general) also to row 6 → the mask is rows 2-3 only."""
    adapter = loaded("llava")
    inputs = adapter.build_inputs([adapter.format_prompt("Is there a star?")], [[_img(64, 64, 2)]])
    frames, vmap = adapter.tile_frames(inputs)[0], adapter.visual_token_map(inputs)[0]
    rows = vmap[:, 2]
    att_g = torch.full((3, 2, 64), 0.01)  # [steps, layers, tokens]
    att_g[:, :, rows == 6] = 0.05  # visually salient everywhere (both passes)
    att_q = att_g.clone()
    att_q[:, :, (rows == 2) | (rows == 3)] = 0.05  # what the question is about
    scores = contrast(att_q, att_g, lam=1e-8, steps="full")
    saliency = image_saliency(scores, vmap, frames, 0, (64, 64))
    mask = select_regions(saliency, p=0.25, k=3)
    expected = np.zeros((64, 64), dtype=bool)
    expected[16:32] = True  # grid rows 2-3 of 8-pixel cells
    np.testing.assert_array_equal(mask, expected)
    # without the contrast (Q alone) the salient row 6 would be kept too
    plain = image_saliency(att_q.sum((0, 1)), vmap, frames, 0, (64, 64))
    assert select_regions(plain, p=0.375, k=3)[48:56].all()


def test_step_weighting_and_layers():
    q = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])  # [steps=2, layers=1, n=2]
    g = torch.ones(3, 1, 2)
    torch.testing.assert_close(contrast(q, g, 0.0, "full"), torch.tensor([7.0, 10.0], dtype=torch.float64))
    torch.testing.assert_close(contrast(q, g, 0.0, "start"), torch.tensor([1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(contrast(q, g, 0.0, "end"), torch.tensor([3.0, 4.0], dtype=torch.float64))
    assert auto_layers(32) == [20, 21, 22, 23, 24, 25] and auto_layers(2) == [1] and auto_layers(4) == [2, 3]


# ---------------------------------------------------------------------------------------------- recording
def test_recorded_attention_equals_the_models_own(loaded):
    adapter = loaded("llava")
    method = CARVE(layers=[1, 3], max_new_tokens=3)
    texts = ["Is there a big red circle in the image?", "Count."]
    images = [[_img(64, 64, 3)], [_img(64, 64, 4)]]
    with torch.inference_mode(), method.bind(adapter):
        atts, inputs = method._attention_pass(texts, images, 3)
        new = adapter.generate_ids(inputs, max_new_tokens=3, do_sample=False)
    assert (inputs["attention_mask"] == 0).any()  # left padding present
    visual = adapter.image_token_mask(inputs)
    lengths = adapter.answer_lengths(new)
    for step in range(2):
        ids = torch.cat([inputs["input_ids"], new[:, :step]], 1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(new[:, :step])], 1)
        full = {**model_inputs(inputs), "input_ids": ids, "attention_mask": mask}
        with torch.inference_mode(), adapter.lm_attention("eager"):
            probs = adapter.model(**full, output_attentions=True).attentions  # L x [batch, heads, q, k]
        for b in range(2):
            if step >= max(1, lengths[b]):
                assert len(atts[b]) <= step
                continue
            for j, layer in enumerate((1, 3)):
                ref = probs[layer][b, :, -1, : visual.shape[1]].float().mean(0)[visual[b]]  # [n_visual]
                torch.testing.assert_close(atts[b][step, j], ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- the method
class _Spy(CARVE):
    """CARVE that keeps every mask it made, by image (the refinement itself is the real one; it runs on host
    threads, so in any order)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.masks: dict[int, np.ndarray] = {}  # id(original image) -> its mask

    def _refine(self, job):
        saliency, mask, new = super()._refine(job)
        self.masks[id(job[-1])] = select_regions(saliency, self.hparams["p"], self.hparams["k"])
        return saliency, mask, new


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("feed", ["refined", "both"])
def test_final_pass_sees_the_masked_image_and_the_expected_prompt(loaded, family, feed, tmp_path):
    adapter = loaded(family)
    method = _Spy(feed=feed, max_new_tokens=4, save_masks=True)
    method.output_dir = tmp_path
    images = [_img(64, 64, 10), _img(96, 64, 11)]
    requests = [Request("Is there a big red circle in the image?", [images[0]]), Request("Count.", [images[1]]),
                Request("Say hi.", [])]  # fmt: skip
    with torch.inference_mode(), method.bind(adapter):
        calls = AdapterCalls(adapter, 4, method)
        rewritten = method.rewrite(list(requests))
        out = calls.generate(requests, max_new_tokens=2, do_sample=False)
        again = method.rewrite(list(requests[:2]))
    assert rewritten[2] is requests[2]  # text-only: untouched
    for orig, new in zip(requests[:2], rewritten[:2], strict=True):
        assert new.text == orig.text
        assert len(new.images) == (2 if feed == "both" else 1)
        if feed == "both":
            assert new.images[0] is orig.images[0]
    for orig, new in zip(requests[:2], rewritten[:2], strict=True):
        image = orig.images[0]
        mask, refined = method.masks[id(image)], new.images[-1]
        assert np.array_equal(np.asarray(refined), np.asarray(refine(image, mask)))
        assert refined.width >= image.width and refined.height >= image.height
        assert 0 < mask.mean() < 0.5  # some regions of the top p = 20 % of the pixels
    placeholder = adapter.format_prompt("", n_images=1).count(adapter.processor.tokenizer.decode(
        [adapter.image_token_id]))  # fmt: skip
    for call, req in zip(out, requests, strict=True):
        expected = (2 if feed == "both" else 1) if req.images else 0
        assert call.n_images == expected
        tokens = adapter.format_prompt(req.text, n_images=expected)
        assert call.prompt == tokens and call.prompt.count(adapter.processor.tokenizer.decode(
            [adapter.image_token_id])) == expected * placeholder  # fmt: skip
    report = method.report()
    assert report["general_pass_cache_hits"] >= 4  # calls.generate and `again` reused the general pass
    assert [r.images[-1].size for r in again] == [r.images[-1].size for r in rewritten[:2]]
    assert len(list((tmp_path / "carve_masks").glob("*.png"))) >= 2


def test_validation():
    for bad in ({"steps": "mid"}, {"feed": "all"}, {"p": 0}, {"k": 0}, {"rank": "area"}, {"layers": 3}):
        with pytest.raises(ValueError):
            CARVE(**bad)


def test_joint_passes_equal_separate_passes_and_cache_pass_g(loaded):
    """Passes Q and G in one batch give what each gives alone; pass G runs once per distinct image set."""
    adapter = loaded("qwen_vl")
    method = CARVE(max_new_tokens=6)
    images = [[_img(64, 64, 20)], [_img(64, 64, 21)], [_img(64, 64, 20)]]  # rows 0 and 2: the same image
    texts = ["Is there a red circle?", "Count the shapes in the image, please.", "Is there a star?"]
    with torch.inference_mode(), method.bind(adapter):
        q_alone, _ = method._attention_pass(texts, images, 6)
        g_alone, _ = method._attention_pass([method.hparams["general_prompt"]] * 2, images[:2], 6)
        att_q, att_g, inputs = method._passes(texts, images)
        assert method._stats["general_cached"] == 1  # row 2 shares row 0's pass G
        assert len(inputs["input_ids"]) == 5  # 3 pass-Q rows + 2 pass-G rows, one generation
        again_q, again_g, inputs = method._passes(texts, images)
        assert method._stats["general_cached"] == 4 and len(inputs["input_ids"]) == 3  # every pass G cached
    for got, ref in [*zip(att_q, q_alone, strict=True), *zip(att_g, [g_alone[r] for r in (0, 1, 0)], strict=True),
                     *zip(again_q, q_alone, strict=True)]:  # fmt: skip
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    assert all(a is b for a, b in zip(again_g, att_g, strict=True))
