"""LLaVA adapter: loading, prompt template, left padding, spans, grid, positions, sites, attention switch."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from adapters.anatomy import SiteError
from adapters.llava import LlavaAdapter


def _img(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (64, 64), colour)


def test_prompt_uses_chat_template_and_llava15_fallback(llava):
    assert llava.format_prompt("Is there a star?") == "USER: <image>\nIs there a star? ASSISTANT:"
    explicit = LlavaAdapter(name="x", path=llava.path, prompt_template="llava15", system_prompt="Be brief.")
    assert explicit.format_prompt("Q?", n_images=2) == "Be brief. USER: <image>\n<image>\nQ? ASSISTANT:"
    bad = LlavaAdapter(name="x", path=llava.path, prompt_template="vicuna_v9")
    with pytest.raises(ValueError, match="unknown prompt_template"):
        bad.format_prompt("Q?")


def test_left_padding_spans_grid_positions(llava):
    prompts = [
        llava.format_prompt("Is there a star?"),
        llava.format_prompt("Is there a hexagon in the picture at the top left corner?"),
    ]
    inputs = llava.build_inputs(prompts, [[_img((255, 0, 0))], [_img((0, 0, 255))]])
    mask = inputs["attention_mask"]
    assert mask[0, 0] == 0 and mask[1, 0] == 1, "the shorter row must be padded on the LEFT"
    assert mask[:, -1].all()
    spans = llava.image_spans(inputs)
    n_pad = int((mask[0] == 0).sum())
    assert [len(s) for s in spans] == [1, 1]
    (s0, e0), (s1, e1) = spans[0][0], spans[1][0]
    assert e0 - s0 == e1 - s1 == 64
    assert s0 - s1 == n_pad, "the padded row's image span is shifted by its padding"
    assert (inputs["input_ids"][0, s0:e0] == llava.image_token_id).all()
    grid = llava.visual_grid(inputs)
    assert grid[0].shape == (64, 2)
    assert grid[0][0].tolist() == [0, 0] and grid[0][9].tolist() == [1, 1] and grid[0][-1].tolist() == [7, 7]
    pos = llava.position_ids(inputs)
    assert pos[0, n_pad] == 0 and pos[1, 0] == 0
    assert (pos[0, n_pad:] == torch.arange(mask.shape[1] - n_pad)).all()


def test_sites_resolve_and_fail_loudly(llava):
    assert llava.num_layers("lm") == 2 and llava.num_layers("vision") == 2
    attn = llava.site("lm.layers.1.attn")
    assert attn is llava.model.model.language_model.layers[1].self_attn
    assert llava.site("vision.layers.0.mlp") is llava.model.model.vision_tower.encoder.layers[0].mlp
    assert llava.site("projector") is llava.model.model.multi_modal_projector
    with pytest.raises(SiteError, match="has 2 layers"):
        llava.site("lm.layers.7.attn")
    with pytest.raises(SiteError, match="grammar"):
        llava.site("lm.layer.0")


def test_lm_attention_switch_touches_only_the_lm_and_restores(llava):
    cfg = llava.model.config
    before_text, before_vision = cfg.get_text_config()._attn_implementation, cfg.vision_config._attn_implementation
    with llava.lm_attention("eager"):
        assert cfg.get_text_config()._attn_implementation == "eager"
        assert cfg.vision_config._attn_implementation == before_vision
    assert cfg.get_text_config()._attn_implementation == before_text
    with pytest.raises(RuntimeError), llava.lm_attention("eager"):
        raise RuntimeError("boom")
    assert cfg.get_text_config()._attn_implementation == before_text


def test_not_loaded_is_a_clear_error(tiny_llava_dir):
    adapter = LlavaAdapter(name="llava", path=str(tiny_llava_dir))
    with pytest.raises(RuntimeError, match="not loaded"):
        adapter.site("lm.layers.0")


def test_loads_like_a_hub_checkpoint(tiny_llava_dir):
    files = {p.name for p in tiny_llava_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "processor_config.json"} <= files
    assert not any(f.endswith(".bin") for f in files)


def test_vision_features_are_what_the_projector_reads(llava):
    images = [_img((255, 0, 0)), _img((0, 255, 0))]
    x = llava.image_inputs(images)
    feats = llava.vision_features(x)
    assert feats.shape == (2, 64, llava.model.config.vision_config.hidden_size)
    with torch.no_grad():
        ours = llava.site("projector")(feats)  # [n_images, n_visual, d_text]
        theirs = llava.model.model.get_image_features(pixel_values=x["pixel_values"]).pooler_output
    assert torch.allclose(ours, torch.stack(list(theirs)), atol=1e-6)
    assert llava.site("vision") is llava.model.model.vision_tower
