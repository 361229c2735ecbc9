"""Every adapter family against the same contract: LLaVA, Qwen2-VL, Qwen2.5-VL, InternVL (tiny random checkpoints).

Plain-HF equivalence, batch-1-vs-4 with padding, spans, (image, tile, row, col) map vs the processor's grid,
M-RoPE positions, position replacement, multi-image order, save/load round trip, processor fallback.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.base import ADAPTERS
from adapters.generation import model_inputs
from methods.base import METHODS
from shapes.assets import tokenizer_corpus
from shapes.tiny import InternVLSize, LlavaSize, QwenVLSize, build_tiny

FAMILIES = {
    "llava": ("llava", LlavaSize(init_range=0.2)),
    "qwen2_vl": ("qwen_vl", QwenVLSize(init_range=0.2)),
    "qwen2_5_vl": ("qwen_vl", QwenVLSize(variant="qwen2_5_vl", init_range=0.2)),
    "internvl": ("internvl", InternVLSize(init_range=0.2)),
}
GEN = {"max_new_tokens": 6, "do_sample": False}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    corpus = tokenizer_corpus(80)
    root = tmp_path_factory.mktemp("families")
    return {key: build_tiny(fam, root / key, corpus, size, seed=1) for key, (fam, size) in FAMILIES.items()}


@pytest.fixture(scope="module")
def loaded(tiny_dirs, lazy_adapters):
    """``loaded(key)``: the family adapter of ``FAMILIES[key]``, loaded once per module."""
    return lazy_adapters(lambda key: (FAMILIES[key][0], tiny_dirs[key]))


@pytest.fixture(scope="module", params=list(FAMILIES))
def adapter(request, loaded):
    return loaded(request.param)


def _img(w: int, h: int, colour=(200, 40, 40), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.zeros((h, w, 3), np.uint8) + np.array(colour, np.uint8)
    arr[rng.integers(0, h, 40), rng.integers(0, w, 40)] = 255  # some texture so images differ
    return Image.fromarray(arr)


def _rows(adapter):
    """Four prompts of different lengths; image sizes differ where the family supports it (Qwen grids, tiles)."""
    wide = (128, 64) if adapter.family != "llava" else (64, 64)
    texts = ["Is there a star?", "Is there a big red star in the middle of the image?", "Describe it.", "Count."]
    images = [[_img(64, 64, seed=1)], [_img(*wide, seed=2)], [_img(64, 64, (0, 0, 200), 3)], [_img(*wide, seed=4)]]
    return [adapter.format_prompt(t) for t in texts], images


def _new_ids(adapter, inputs):
    return adapter.generate_ids(inputs, **GEN)


def test_method_none_equals_plain_hf_generate(adapter):
    prompts, images = _rows(adapter)
    proc, model = adapter.processor, adapter.model
    kwargs = {"padding": True, "return_tensors": "pt"}
    if adapter.family == "internvl":
        ip = proc.image_processor
        kwargs |= {"crop_to_patches": ip.crop_to_patches, "max_patches": ip.max_patches}
    plain = proc(text=prompts, images=[im for row in images for im in row], **kwargs)
    with torch.inference_mode():
        ref = model.generate(**plain, **GEN)[:, plain["input_ids"].shape[1] :]
    ref_text = [t.strip() for t in proc.batch_decode(ref, skip_special_tokens=True)]
    with METHODS.get("none")().bind(adapter):
        ours = adapter.generate(adapter.build_inputs(prompts, images), **GEN)
    assert ours == ref_text
    assert ref.numel() and (ref != ref[0, 0]).any(), "degenerate reference: every generated token is the same"


def test_batch_of_four_with_padding_equals_one_by_one(adapter):
    prompts, images = _rows(adapter)
    batch = adapter.build_inputs(prompts, images)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain left padding"
    together = _new_ids(adapter, batch)
    with torch.inference_mode():
        logits_b = adapter.forward(batch).logits[:, -1]  # [4, vocab]
    for i in range(4):
        single = adapter.build_inputs([prompts[i]], [images[i]])
        assert torch.equal(_new_ids(adapter, single)[0], together[i]), f"row {i} differs"
        with torch.inference_mode():
            logits_1 = adapter.forward(single).logits[0, -1]
        assert torch.allclose(logits_1, logits_b[i], atol=1e-4)


def test_spans_cover_exactly_the_image_tokens(adapter):
    prompts, images = _rows(adapter)
    inputs = adapter.build_inputs(prompts, images)
    mask = adapter.image_token_mask(inputs)
    for i, spans in enumerate(adapter.image_spans(inputs)):
        covered = torch.zeros_like(mask[i])
        for s, e in spans:
            covered[s:e] = True
        assert torch.equal(covered, mask[i])
        assert len(spans) == 1
        tiles = adapter.tile_spans(inputs)[i]
        assert tiles[0][2] == spans[0][0] and tiles[-1][3] == spans[0][1]
        assert all(a[3] == b[2] for a, b in itertools.pairwise(tiles)), "tiles must be contiguous"
    expected = adapter.image_features(adapter.image_inputs([im for row in images for im in row])).shape[0]
    assert int(mask.sum()) == expected, "one placeholder per projected visual token"


def test_two_image_prompt_puts_spans_in_order(adapter):
    first, second = _img(64, 64, (250, 0, 0), 5), _img(64, 64, (0, 0, 250), 6)
    inputs = adapter.build_inputs([adapter.format_prompt("Which one?", n_images=2)], [[first, second]])
    spans = adapter.image_spans(inputs)[0]
    assert len(spans) == 2 and spans[0][1] <= spans[1][0]
    assert adapter.visual_token_map(inputs)[0][:, 0].unique().tolist() == [0, 1]
    captured = {}

    def grab(_m, args, kwargs):
        captured["h"] = (args[0] if args else kwargs["hidden_states"])[0]  # [seq, d]

    handle = adapter.site("lm.layers.0").register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            adapter.forward(inputs)
    finally:
        handle.remove()
    with torch.inference_mode():
        feats = [adapter.image_features(adapter.image_inputs([im])) for im in (first, second)]
    for (s, e), f in zip(spans, feats, strict=True):
        assert torch.allclose(captured["h"][s:e], f, atol=1e-5), "image k's features must fill span k"


def test_visual_token_map_matches_the_processor_grid(adapter):
    prompts, images = _rows(adapter)
    inputs = adapter.build_inputs(prompts[:2], images[:2])
    maps = adapter.visual_token_map(inputs)
    if adapter.family == "qwen_vl":
        m = adapter.merge_size
        grids = inputs["image_grid_thw"].tolist()
        for vmap, (_t, h, w) in zip(maps, grids, strict=True):
            assert vmap[:, 2].max() + 1 == h // m and vmap[:, 3].max() + 1 == w // m
    elif adapter.family == "internvl":
        n_tiles = [len({t for _i, t, _s, _e in spans}) for spans in adapter.tile_spans(inputs)]
        assert n_tiles == [1, 3], "64x64 → one tile; 128x64 → two crops + thumbnail"
        assert sum(n_tiles) == inputs["pixel_values"].shape[0]
    else:
        vcfg = adapter.model.config.vision_config
        assert maps[0][:, 2:].max().item() + 1 == vcfg.image_size // vcfg.patch_size
    for vmap in maps:
        per_tile = vmap[vmap[:, 1] == 0]
        rows, cols = per_tile[:, 2].max() + 1, per_tile[:, 3].max() + 1
        assert torch.equal(per_tile[:, 2] * cols + per_tile[:, 3], torch.arange(rows * cols)), "row-major"


@pytest.mark.parametrize("key", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_token_cells_hold_the_pixels_of_their_region(loaded, key):
    """A bright square in LM cell (r, c) shows up only in the 2x2 patch group the map assigns to (r, c)."""
    adapter = loaded(key)
    ip = adapter.processor.image_processor
    cell = ip.patch_size * ip.merge_size  # pixels per LM token side
    arr = np.zeros((64, 64, 3), np.uint8)
    r, c = 2, 1
    arr[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = 255
    inputs = adapter.build_inputs([adapter.format_prompt("Where?")], [[Image.fromarray(arr)]])
    px = inputs["pixel_values"]  # [n_patches, 3*2*p*p]
    dark = adapter.build_inputs([adapter.format_prompt("Where?")], [[Image.fromarray(np.zeros_like(arr))]])
    lit = (px - dark["pixel_values"]).abs().sum(-1) > 1e-3
    tokens = lit.reshape(-1, ip.merge_size**2).any(-1).nonzero().flatten().tolist()
    vmap = adapter.visual_token_map(inputs)[0]
    assert tokens == [int(((vmap[:, 2] == r) & (vmap[:, 3] == c)).nonzero())]


def test_internvl_tiles_and_pixel_shuffle_cells(loaded):
    """Tiles are crops left-to-right then the thumbnail; a marked ViT patch lands in the token the map names."""
    adapter = loaded("internvl")
    arr = np.zeros((64, 128, 3), np.uint8)
    arr[:, :64] = (255, 0, 0)
    arr[:, 64:] = (0, 0, 255)
    tiles = adapter.image_inputs([Image.fromarray(arr)])["pixel_values"]  # [3, 3, 64, 64]
    red, blue = tiles[:, 0].mean((1, 2)), tiles[:, 2].mean((1, 2))
    assert red[0] > red[1] and blue[1] > blue[0], "crop 0 is the left half, crop 1 the right half"
    assert red[1] < red[2] < red[0] and blue[0] < blue[2] < blue[1], "the last tile is the whole-image thumbnail"

    side = adapter.model.config.vision_config.image_size[0] // adapter.model.config.vision_config.patch_size[0]
    pr, pc = 5, 2
    tower = adapter.site("vision")

    def mark(_m, _args, out):
        h = torch.zeros_like(out.last_hidden_state)  # [n_tiles, 1 + side², d]
        h[:, 1 + pr * side + pc] = 1.0
        out.last_hidden_state = h
        return out

    handle = tower.register_forward_hook(mark)
    try:
        feats = adapter.vision_features(adapter.image_inputs([_img(64, 64)]))  # [1, tokens, 4d]
    finally:
        handle.remove()
    hit = feats[0].abs().sum(-1).nonzero().flatten().tolist()
    inputs = adapter.build_inputs([adapter.format_prompt("Q")], [[_img(64, 64)]])
    vmap = adapter.visual_token_map(inputs)[0]
    assert hit == [int(((vmap[:, 2] == pr // 2) & (vmap[:, 3] == pc // 2)).nonzero())]


def test_position_ids_follow_the_grid(adapter):
    prompts, images = _rows(adapter)
    inputs = adapter.build_inputs(prompts[:2], images[:2])
    pos = adapter.position_ids(inputs)
    if adapter.family != "qwen_vl":
        assert pos.shape == inputs["input_ids"].shape
        return
    assert pos.shape == (3, *inputs["input_ids"].shape)
    for b, ((start, end), vmap) in enumerate(
        zip([s[0] for s in adapter.image_spans(inputs)], adapter.visual_token_map(inputs), strict=True)
    ):
        t, h, w = pos[:, b, start:end]
        base = pos[0, b, start - 1] + 1
        assert (t == base).all()
        assert torch.equal(h - base, vmap[:, 2]) and torch.equal(w - base, vmap[:, 3])
        after = pos[:, b, end]
        assert (after == base + max(vmap[:, 2].max(), vmap[:, 3].max()) + 1).all(), "text resumes after the grid"


def test_position_replacement_reaches_rope_in_prefill_and_decoding(adapter):
    prompts, images = _rows(adapter)
    inputs = adapter.build_inputs(prompts[:2], images[:2])
    default = _new_ids(adapter, inputs)
    with adapter.positions(lambda d, _i: d):
        assert torch.equal(_new_ids(adapter, inputs), default), "identity replacement must change nothing"
    seen = []
    rope = adapter.model.model.language_model.rotary_emb
    handle = rope.register_forward_hook(
        lambda _m, args, kwargs, _o: seen.append((args[1] if len(args) > 1 else kwargs["position_ids"]).clone()),
        with_kwargs=True,
    )
    try:
        with adapter.positions(lambda d, _i: d * 3):
            with torch.inference_mode():
                logits = adapter.forward(inputs).logits
            _new_ids(adapter, inputs)
    finally:
        handle.remove()
    with torch.inference_mode():
        ref = adapter.forward(inputs).logits
    assert not torch.allclose(logits, ref), "replaced positions must change the output"
    tripled = adapter.position_ids(inputs) * 3
    prefill, first_decode = seen[0], seen[2]
    assert torch.equal(prefill[-3:] if prefill.dim() == 3 else prefill, tripled)
    last = tripled[..., -1:]
    assert torch.equal(first_decode[-3:] if first_decode.dim() == 3 else first_decode, last + 1), "decode = last + 1"
    with pytest.raises(ValueError, match="shape"), adapter.positions(lambda d, _i: d[..., :-1]):
        adapter.forward(inputs)


def test_save_load_round_trip(adapter, tmp_path):
    adapter.model.save_pretrained(tmp_path)
    adapter.processor.save_pretrained(tmp_path)
    again = ADAPTERS.get(adapter.family)(name="again", path=str(tmp_path), device="cpu")
    again.load()
    prompts, images = _rows(adapter)
    x1, x2 = adapter.build_inputs(prompts, images), again.build_inputs(prompts, images)
    assert all(torch.equal(x1[k], x2[k]) for k in model_inputs(x1))
    with torch.inference_mode():
        assert torch.equal(adapter.forward(x1).logits, again.forward(x2).logits)
    assert {p.name for p in tmp_path.iterdir()} >= {"model.safetensors", "config.json", "processor_config.json"}


def test_anatomy_is_uniform(adapter):
    assert adapter.num_layers("lm") == 2 and adapter.num_layers("vision") == 2
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (4, 2, 32)
    assert adapter.site("lm.layers.1.attn").layer_idx == 1
    adapter.site("vision.layers.1.attn")
    adapter.site("vision.layers.0.mlp")
    assert adapter.vision_has_cls == (adapter.family != "qwen_vl")
    with adapter.lm_attention("eager"):
        assert adapter.model.config.get_text_config()._attn_implementation == "eager"
        assert adapter.model.config.vision_config._attn_implementation == "sdpa"
    info = adapter.describe()
    assert info["heads"] == 4 and info["vision_has_cls"] == adapter.vision_has_cls


def test_processor_fallback_is_logged_and_image_inputs_are_the_image_processors(tiny_dirs, caplog):
    from transformers import Qwen2VLProcessor

    from adapters.processors import Qwen2VLImageOnlyProcessor, load_processor

    with caplog.at_level(logging.WARNING, logger="adapters.processors"):
        proc = load_processor(str(tiny_dirs["qwen2_vl"]), Qwen2VLProcessor)
    assert isinstance(proc, Qwen2VLImageOnlyProcessor) and "Qwen2VLImageOnlyProcessor" in caplog.text
    image = _img(96, 64)
    out = proc(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[image], return_tensors="pt")
    direct = proc.image_processor([image], return_tensors="pt")
    assert torch.equal(out["pixel_values"], direct["pixel_values"])
    n_tokens = int(direct["image_grid_thw"].prod()) // proc.image_processor.merge_size**2
    assert int((out["input_ids"] == proc.image_token_id).sum()) == n_tokens


def test_fallback_templates_render_like_the_chat_templates(adapter):
    """Without a chat template the family's fallback gives the same prompt (system prompt and two images too)."""
    fallback = next(iter(adapter.templates))
    for system in (None, "Be brief."):
        chat = ADAPTERS.get(adapter.family)(name="c", path=adapter.path, system_prompt=system)
        plain = ADAPTERS.get(adapter.family)(
            name="p", path=adapter.path, system_prompt=system, prompt_template=fallback
        )
        chat.processor = plain.processor = adapter.processor
        assert chat.format_prompt("Q?", n_images=2) == plain.format_prompt("Q?", n_images=2)
    with pytest.raises(ValueError, match="unknown prompt_template"):
        ADAPTERS.get(adapter.family)(name="x", path=adapter.path, prompt_template="nope").format_prompt("Q?")
