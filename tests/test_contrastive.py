"""VCD and RITUAL: the contrast equation, the plausibility mask, the noise, the seeded transformations, and two-view
decoding (one batched forward, a KV cache per view) against an uncached two-forward reference on every family."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from methods.base import UnsupportedError
from methods.contrast import Contrast, combine, image_seeds, plausible
from methods.ritual import RITUAL, TRANSFORMS, draw, transform
from methods.vcd import VCD, add_noise, alpha_bar

FAMILIES = ("llava", "qwen_vl", "qwen2_5_vl", "internvl")  # conftest's 4-layer random models


@pytest.fixture(scope="module")
def loaded(four_layer):
    return four_layer(seed=5)


def _img(seed: int, size=(64, 64)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- the equations
def test_contrast_equation_and_plausibility_mask_on_planted_logits():
    l = torch.tensor([[2.0, 1.0, -1.0, -5.0], [0.0, 0.0, 3.0, 2.0]])  # noqa: E741
    l2 = torch.tensor([[1.0, 3.0, 0.0, 0.0], [4.0, 0.0, 1.0, -1.0]])
    # beta = 0.1: keep l >= max l + log 0.1 = max - 2.3026
    assert plausible(l, 0.1).tolist() == [[True, True, False, False], [False, False, True, True]]
    # the mask is p >= beta * max p (the softmax normaliser cancels)
    p = l.softmax(-1)
    assert torch.equal(plausible(l, 0.1), p >= 0.1 * p.max(-1, keepdim=True).values)
    inf = float("-inf")
    vcd = combine(l, l2, 2.0, -1.0, 0.1)  # (1 + a) l - a l', a = 1
    assert vcd.tolist() == [[3.0, -1.0, inf, inf], [inf, inf, 5.0, 5.0]]
    ritual = combine(l, l2, 1.0, 3.0, 0.1)  # l + 3 l'
    assert ritual.tolist() == [[5.0, 10.0, inf, inf], [inf, inf, 6.0, -1.0]]
    assert plausible(l, 1.0).sum(-1).tolist() == [1, 1]  # beta = 1: only the maximum survives
    # the processor: rows 0..B-1 combined from rows B..2B-1, the second view's rows left alone
    proc = Contrast(2.0, -1.0, 0.1)
    scores = torch.cat([l, l2])
    proc.doubled = True
    out = proc(torch.zeros(4, 1, dtype=torch.long), scores.clone())
    assert out[:2].tolist() == vcd.tolist() and torch.equal(out[2:], l2)
    proc.doubled = False  # a text-only batch: untouched
    assert torch.equal(proc(torch.zeros(4, 1, dtype=torch.long), scores.clone()), scores)


def test_diffusion_noise_schedule_and_equation():
    betas = 1 / (1 + np.exp(-np.linspace(-6, 6, 1000))) * (0.5e-2 - 1e-5) + 1e-5  # the official sigmoid schedule
    assert alpha_bar(500) == pytest.approx(float(np.prod(1 - betas[:501])), rel=1e-12)
    assert alpha_bar(0) == pytest.approx(1 - betas[0]) and alpha_bar(999) < alpha_bar(500) < alpha_bar(100)
    x, eps = torch.randn(3, 5), torch.randn(3, 5)
    ab = alpha_bar(500)
    torch.testing.assert_close(add_noise(x, eps, 500), math.sqrt(ab) * x + math.sqrt(1 - ab) * eps)
    with pytest.raises(ValueError, match="noise_step"):
        VCD(noise_step=1000)


def test_qwen_noise_repeats_the_draw_over_temporal_copies(loaded):
    adapter = loaded("qwen_vl")
    inputs = adapter.build_inputs([adapter.format_prompt("Q?")], [[_img(1)]])
    pixels = inputs["pixel_values"]  # [patches, C·T·p·p]
    vcfg = adapter.model.config.vision_config
    t, p = vcfg.temporal_patch_size, vcfg.patch_size
    as_image = pixels.reshape(pixels.shape[0], -1, t, p, p)
    assert torch.equal(as_image[:, :, 0], as_image[:, :, 1])  # a still image: the processor's copies are equal
    noise = adapter.pixel_noise(pixels, torch.Generator().manual_seed(0)).reshape(as_image.shape)
    assert torch.equal(noise[:, :, 0], noise[:, :, 1]) and noise.std() > 0.5
    assert sum(adapter.pixel_rows(inputs)) == pixels.shape[0]


# ---------------------------------------------------------------------------------------------- seeding
def test_seeds_follow_the_sample_not_the_batch():
    a, b = _img(1), _img(2)
    batch = {"harness_prompts": ["p1", "p2"], "harness_images_per_row": [1, 1], "harness_images": [a, b]}
    alone = {"harness_prompts": ["p2"], "harness_images_per_row": [1], "harness_images": [b]}
    s = image_seeds(batch, 0, "vcd")
    assert image_seeds(alone, 0, "vcd") == s[1:]  # the same sample in another batch: the same seed
    assert image_seeds(batch, 1, "vcd") != s  # another run seed
    other = {**alone, "harness_prompts": ["p3"]}
    assert image_seeds(other, 0, "vcd") != s[1:]  # the same image with another question: another draw


def test_ritual_draws_are_seeded_size_preserving_and_logged():
    image = _img(3, size=(48, 80))  # non-square: (height, width) = (48, 80)
    names = [draw(image, seed, list(TRANSFORMS))[1] for seed in range(300)]
    counts = {n: names.count(n) for n in TRANSFORMS}
    assert min(counts.values()) > 25  # uniform over the six
    for seed in range(12):
        out, name, params = draw(image, seed, list(TRANSFORMS))
        again, name2, params2 = draw(image, seed, list(TRANSFORMS))
        assert (name, params) == (name2, params2) and np.array_equal(np.asarray(out), np.asarray(again))
        assert out.size == image.size and out.mode == "RGB"
    rng = np.random.default_rng(0)
    arr = np.asarray(image)
    assert np.array_equal(np.asarray(transform(image, "horizontal_flip", rng)[0]), arr[:, ::-1])
    assert np.array_equal(np.asarray(transform(image, "vertical_flip", rng)[0]), arr[::-1])
    rotated, params = transform(image, "rotation", np.random.default_rng(1))
    assert -180 <= params["angle"] <= 180 and not np.array_equal(np.asarray(rotated), arr)
    blurred, params = transform(image, "gaussian_blur", np.random.default_rng(1))
    assert 1.5 <= params["sigma"] <= 2.0 and np.asarray(blurred).std() < arr.std()
    _, params = transform(image, "crop", np.random.default_rng(1))
    x0, y0, x1, y1 = params["box"]
    assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 48
    _, params = transform(image, "color_jitter", np.random.default_rng(1))
    assert sorted(params["order"]) == ["brightness", "contrast", "hue", "saturation"]
    assert 0 <= params["brightness"] <= 2 and -0.5 <= params["hue"] <= 0.5
    with pytest.raises(ValueError, match="transforms"):
        RITUAL(transforms=["mixup"])


@pytest.mark.parametrize("family", FAMILIES)
def test_ritual_second_view_equals_the_batched_processor_call(loaded, family):
    """Each image is transformed and processed on its own host thread; the rows joined in order are what one
    batched call of the family's processor gives (images of different sizes: Qwen-VL grids, InternVL tiles)."""
    adapter = loaded(family)
    method = RITUAL()
    sizes = [(64, 64), (48, 96), (96, 40), (64, 64), (80, 56)]
    images = [_img(10 + i, size) for i, size in enumerate(sizes)]
    inputs = {"harness_prompts": ["p1", "p2", "p3"], "harness_images_per_row": [2, 1, 2], "harness_images": images}
    seeds = image_seeds(inputs, 0, "ritual")
    with torch.inference_mode(), method.bind(adapter):
        pixels, views = method.second_view(inputs, seeds)
        batched = adapter.image_inputs(views)["pixel_values"]
    assert [v.size for v in views] == [im.size for im in images]
    assert [draw(im, s, list(TRANSFORMS))[1] for im, s in zip(images, seeds, strict=True)] == [
        line["transform"] for line in method.log]  # fmt: skip
    assert torch.equal(pixels, batched)


def test_host_map_keeps_order_uses_the_threads_and_raises_the_first_error(monkeypatch):
    import threading

    from core import hostpool as base

    monkeypatch.setattr(base, "HOST_THREADS", 4)
    names = base.host_map(lambda i: (i * i, threading.current_thread().name), range(12))
    assert [n for n, _ in names] == [i * i for i in range(12)]
    assert all(t.startswith("harness-host") for _, t in names)
    here = threading.current_thread().name
    assert base.host_map(lambda i: threading.current_thread().name, [0]) == [here]  # one item: in line
    nested = base.host_map(lambda i: base.host_map(lambda j: threading.current_thread().name, range(3)), range(2))
    assert all(len(set(names)) == 1 and names[0].startswith("harness-host") for names in nested)  # no deadlock

    def fail(i):
        if i in (3, 7):
            raise ValueError(f"bad {i}")
        return i

    with pytest.raises(ValueError, match="bad 3"):
        base.host_map(fail, range(10))


def test_ritual_logs_every_second_view(loaded, tmp_path):
    adapter = loaded("llava")
    method = RITUAL(transforms=["horizontal_flip", "vertical_flip"])
    method.output_dir = tmp_path
    prompts = [adapter.format_prompt("Is there a star?"), adapter.format_prompt("Count.")]
    with torch.inference_mode(), method.bind(adapter):
        adapter.generate_ids(adapter.build_inputs(prompts, [[_img(1)], [_img(2)]]), max_new_tokens=2)
    lines = (tmp_path / "ritual_views.jsonl").read_text().splitlines()
    assert len(lines) == 2 and sum(method.counts.values()) == 2
    assert method.report()["second_view_images"] == 2


# ---------------------------------------------------------------------------------------------- decoding
def _reference(adapter, method, inputs, steps):
    """Greedy two-view decoding without the method: two uncached forwards per step, combined by hand."""
    a, b = method.weights()
    beta = method.hparams["beta"]
    with torch.inference_mode(), method.bind(adapter):
        doubled = adapter._views(inputs)  # the method's second view (its seeding is tested above)
    rows = inputs["input_ids"].shape[0]
    views = [{k: v for k, v in inputs.items()}, {**inputs, "pixel_values": doubled["pixel_values"][
        inputs["pixel_values"].shape[0]:]}]  # fmt: skip
    if "image_grid_thw" in inputs:
        views[1]["image_grid_thw"] = inputs["image_grid_thw"]
    ids, mask, out = inputs["input_ids"], inputs["attention_mask"], []
    for _ in range(steps):
        logits = []
        for view in views:
            with torch.inference_mode():
                extra = {"mm_token_type_ids": nn.functional.pad(view["mm_token_type_ids"], (0, ids.shape[1] - view[
                    "mm_token_type_ids"].shape[1]))} if "mm_token_type_ids" in view else {}  # fmt: skip
                step = {**view, "input_ids": ids, "attention_mask": mask, **extra}
                logits.append(adapter.forward(step).logits[:, -1])
        token = combine(logits[0], logits[1], a, b, beta).argmax(-1)  # [batch]
        out.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert rows == ids.shape[0]
    return torch.stack(out, 1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["vcd", "ritual"])
def test_two_view_decoding_equals_the_uncached_reference_with_padding(loaded, family, name):
    adapter = loaded(family)
    method = VCD(alpha=3.0) if name == "vcd" else RITUAL()
    method.check(adapter)
    rows = [("Is there a big red circle in the image? Answer yes or no.", _img(5)), ("Count.", _img(6))]
    prompts = [adapter.format_prompt(t) for t, _ in rows]
    inputs = adapter.build_inputs(prompts, [[im] for _, im in rows])
    assert (inputs["attention_mask"] == 0).any()  # left padding present
    gen = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    with torch.inference_mode(), method.bind(adapter):
        batched = adapter.generate_ids(inputs, **gen)
        single = [adapter.generate_ids(adapter.build_inputs([p], [[im]]), **gen)[0]
                  for p, (_, im) in zip(prompts, rows, strict=True)]  # fmt: skip
        logp = adapter.next_token_logprobs(inputs)
    assert batched.shape == (2, 4)
    assert [r.tolist() for r in batched] == [r.tolist() for r in single]
    assert torch.equal(batched, _reference(adapter, method, inputs, 4))  # cached two-view == uncached two forwards
    plain = adapter.generate_ids(inputs, **gen)
    with torch.inference_mode():
        first = adapter.forward(inputs).logits[:, -1]
    assert torch.equal(logp.argmax(-1), batched[:, 0]) and logp.shape == first.shape
    assert method.report()["second_view_images"] > 0
    if family == "llava":  # the contrast moves greedy tokens here, so the comparisons above are not vacuous
        assert not torch.equal(plain, batched)


def test_text_only_batches_decode_as_without_the_method(loaded):
    adapter = loaded("llava")
    inputs = adapter.build_inputs([adapter.format_prompt("Say hi.", n_images=0)], [[]])
    gen = {"max_new_tokens": 3, "do_sample": False}
    plain = adapter.generate_ids(inputs, **gen)
    with torch.inference_mode(), VCD().bind(adapter):
        assert torch.equal(adapter.generate_ids(inputs, **gen), plain)


def test_sampling_keeps_the_views_on_one_text(loaded):
    adapter = loaded("qwen_vl")
    prompts = [adapter.format_prompt("Describe."), adapter.format_prompt("Is there a star?")]
    inputs = adapter.build_inputs(prompts, [[_img(7)], [_img(8)]])
    gen = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": True, "top_k": 0, "top_p": 1.0}
    method = VCD()
    with torch.inference_mode(), method.bind(adapter):
        torch.manual_seed(0)
        a = adapter.generate_ids(inputs, **gen)
        torch.manual_seed(0)
        b = adapter.generate_ids(inputs, **gen)
    assert a.shape == (2, 5) and torch.equal(a, b)  # reproducible under the torch seed


def test_beam_search_is_refused_before_loading():
    for method in (VCD(), RITUAL()):
        method.check_generation({"max_new_tokens": 8, "do_sample": False})
        with pytest.raises(UnsupportedError, match="beam"):
            method.check_generation({"num_beams": 3})
