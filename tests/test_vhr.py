"""VHR: head selection (Eq. 6–7) on planted divergences, the text-only probe, and the selection and scaling of head
outputs in a real forward (checked against the head outputs of the unmodified model), batched with padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import methods.vhr as vhr_module
from methods.base import UnsupportedError
from methods.vhr import VHR, auto_layers, select_heads, text_only

FAMILIES = ("llava", "qwen_vl", "qwen2_5_vl", "internvl")


@pytest.fixture(scope="module")
def loaded(four_layer):
    return four_layer(seed=5)


def _img(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _inputs(adapter):
    rows = [("Is there a big red circle in the image? Answer yes or no.", _img(5)), ("Count.", _img(6))]
    prompts = [adapter.format_prompt(t) for t, _ in rows]
    return adapter.build_inputs(prompts, [[im] for _, im in rows]), prompts, rows


def test_head_selection_on_planted_divergences():
    vhd = torch.tensor([[0.1, 5.0, 0.3, 0.2, 0.9, 0.4]])
    flat = torch.ones(1, 6)
    # no outlier (TA all equal): the heads above the (lower) median 0.3, i.e. the top half
    assert select_heads(vhd, flat).nonzero()[:, 1].tolist() == [1, 4, 5]
    # head 1 has the top VHD and the top text-only norm: a negatively vision-sensitive outlier, zeroed
    ta = torch.tensor([[1.0, 9.0, 1.0, 1.0, 1.0, 1.0]])
    assert select_heads(vhd, ta).nonzero()[:, 1].tolist() == [2, 4, 5]
    assert select_heads(vhd, ta, outliers=False).nonzero()[:, 1].tolist() == [1, 4, 5]
    # a high TA alone or a high VHD alone is not an outlier
    assert select_heads(vhd, torch.tensor([[9.0, 1.0, 1.0, 1.0, 1.0, 1.0]])).nonzero()[:, 1].tolist() == [1, 4, 5]
    assert not select_heads(torch.zeros(2, 8), torch.ones(2, 8)).any()  # no divergence: nothing reinforced


def test_auto_layers_follow_the_paper():
    assert auto_layers(32) == [1, *range(18, 32)]  # the 2nd and the last 14 of LLaVA-1.5-7B
    assert auto_layers(4) == [1, 2, 3] and auto_layers(2) == [1]


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_probe_removes_the_visual_tokens(loaded, family):
    adapter = loaded(family)
    inputs, _, _ = _inputs(adapter)
    text = text_only(adapter, inputs)
    assert not adapter.image_token_mask(text).any()
    for b in range(2):
        kept = inputs["input_ids"][b][inputs["attention_mask"][b].bool() & ~adapter.image_token_mask(inputs)[b]]
        row = text["input_ids"][b][text["attention_mask"][b].bool()]
        assert row.tolist() == kept.tolist()
        assert text["attention_mask"][b, -1] == 1  # left padding: every row ends at the last column


def _record_heads(adapter, layer, store):
    """A pre-hook on the layer's output projection: its input is the concatenated head outputs."""
    proj = adapter.site(f"lm.layers.{layer}.attn").o_proj
    h, d = adapter.num_heads, adapter.head_dim
    return proj.register_forward_pre_hook(
        lambda _m, args: store.append(args[0].detach().float().reshape(*args[0].shape[:2], h, d).clone())
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_selection_and_scaling_against_the_unmodified_head_outputs(loaded, family):
    """Only the last layer reinforced: its inputs are the unmodified model's, so the head outputs are known."""
    adapter = loaded(family)
    inputs, _, _ = _inputs(adapter)
    last = adapter.num_layers("lm") - 1
    plain, text, got = [], [], []
    handle = _record_heads(adapter, last, plain)
    try:
        with torch.inference_mode():
            adapter.forward(inputs)
        handle.remove()
        handle = _record_heads(adapter, last, text)
        with torch.inference_mode():
            adapter.forward(text_only(adapter, inputs))
        handle.remove()
        method = VHR(alpha=2.0, layers=[last])
        with torch.inference_mode(), method.bind(adapter):
            handle = _record_heads(adapter, last, got)
            new = adapter.generate_ids(inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
    assert len(got) == 3  # the probe (text-only, unscaled), the prefill, one cached decoding step
    torch.testing.assert_close(got[0], text[0])
    pre, post = plain[0], got[1]  # [batch, seq, heads, head_dim]
    vhd = (pre[:, -1] - text[0][:, -1]).norm(dim=-1)
    chosen = select_heads(vhd, text[0][:, -1].pow(2).sum(-1))
    assert chosen.any(-1).all()
    scale = torch.where(chosen, 2.0, 1.0)[:, None, :, None]
    # every prompt position, the chosen heads only (the harness's attention function vs the stock kernel: ~1e-4)
    torch.testing.assert_close(post, pre * scale, atol=5e-4, rtol=1e-3)
    assert ((post - pre).abs() > 1e-2).any()  # the factor 2 is far outside that tolerance
    # the decoding step: the same heads, scaled (the unmodified head outputs from an uncached forward)
    step = []
    handle = _record_heads(adapter, last, step)
    try:
        grown = {k: v for k, v in inputs.items()}
        grown["input_ids"] = torch.cat([inputs["input_ids"], new[:, :1]], 1)
        grown["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(new[:, :1])], 1)
        if "mm_token_type_ids" in inputs:
            grown["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, 1))
        with torch.inference_mode():
            adapter.forward(grown)
    finally:
        handle.remove()
    torch.testing.assert_close(got[2][:, -1], step[0][:, -1] * scale[:, 0], atol=1e-4, rtol=1e-4)


def test_layer_by_layer_selection_sees_the_reinforced_layers_below(loaded, monkeypatch):
    adapter = loaded("llava")
    inputs, _, _ = _inputs(adapter)
    calls = []
    real = vhr_module.select_heads
    monkeypatch.setattr(vhr_module, "select_heads", lambda v, t, o=True: calls.append((v, t, real(v, t, o)))
                        or calls[-1][2])  # fmt: skip
    plain, got = {1: [], 2: []}, {1: [], 2: []}
    handles = [_record_heads(adapter, layer, plain[layer]) for layer in (1, 2)]
    with torch.inference_mode():
        adapter.forward(inputs)
    for h in handles:
        h.remove()
    method = VHR(alpha=2.0, layers=[1, 2])
    with torch.inference_mode(), method.bind(adapter):
        handles = [_record_heads(adapter, layer, got[layer]) for layer in (1, 2)]
        try:
            adapter.next_token_logprobs(inputs)
        finally:
            for h in handles:
                h.remove()
    assert len(calls) == 2  # one selection per reinforced layer, in the prefill
    (_, _, chosen1), (vhd2, _, chosen2) = calls
    text2 = got[2][0][:, -1]  # the probe's layer-2 outputs
    pre2 = got[2][1] / torch.where(chosen2, 2.0, 1.0)[:, None, :, None]  # layer 2 before its own scaling
    torch.testing.assert_close(vhd2, (pre2[:, -1] - text2).norm(dim=-1))
    assert (pre2 - plain[2][0]).abs().max() > 1e-3  # layer 1's reinforcement reached layer 2's VHD
    want1 = plain[1][0] * torch.where(chosen1, 2.0, 1.0)[:, None, :, None]
    torch.testing.assert_close(got[1][1], want1, atol=5e-4, rtol=1e-3)
    assert method.describe()["activity"]["heads_per_layer_row"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_padded_generation_equals_one_row_at_a_time(loaded, family):
    adapter = loaded(family)
    inputs, prompts, rows = _inputs(adapter)
    gen = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    method = VHR(alpha=4.0)
    method.check(adapter)
    with torch.inference_mode(), method.bind(adapter):
        batched = adapter.generate_ids(inputs, **gen)
        single = [adapter.generate_ids(adapter.build_inputs([p], [[im]]), **gen)[0]
                  for p, (_, im) in zip(prompts, rows, strict=True)]  # fmt: skip
    assert [r.tolist() for r in batched] == [r.tolist() for r in single]
    plain = adapter.generate_ids(inputs, **gen)
    if family == "llava":
        assert not torch.equal(plain, batched)  # alpha = 4 moves tokens: the comparison is not vacuous


def test_beam_search_is_refused_and_bad_layers_fail():
    with pytest.raises(UnsupportedError, match="beam"):
        VHR().check_generation({"num_beams": 2})
    with pytest.raises(ValueError, match="layers"):
        VHR(layers=[])
