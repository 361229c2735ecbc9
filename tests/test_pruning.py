"""Token surgery, FastV and FasterVLM: tokens reaching each layer, positions, and decoding vs explicit references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.generation import model_inputs
from methods.base import LayerError, UnsupportedError
from methods.fastervlm import FasterVLM
from methods.fastv import FastV, received_attention, resolve_layer
from methods.intervention import CompositionError, attach

FAMILIES = ("llava", "qwen_vl", "internvl")  # conftest's 4-layer random models
T = 4  # generated tokens compared (EOS suppressed so every row decodes T steps through the cache)
GEN = {"max_new_tokens": T, "min_new_tokens": T, "do_sample": False}


@pytest.fixture(scope="module")
def loaded(four_layer):
    return four_layer(seed=3)


def _img(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _batch(adapter):
    """Two rows of different lengths (so one is left-padded), one and two images."""
    rows = [("Is there a big red star in the middle of the image?", [_img(64, 64, 1)]),
            ("Count.", [_img(64, 64, 2), _img(64, 64, 3)])]  # fmt: skip
    prompts = [adapter.format_prompt(t, n_images=len(ims)) for t, ims in rows]
    return prompts, [ims for _, ims in rows]


def _planted_keep(visual: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A random ~30 % subset of each row's visual tokens (all text kept), ``[batch, seq]``."""
    g = torch.Generator().manual_seed(seed)
    return ~visual | (torch.rand(visual.shape, generator=g) < 0.3)


# ---------------------------------------------------------------------------------------------- reference
def _layer0(adapter, inputs):
    """Hidden states and RoPE (cos, sin) entering layer 0 of an ordinary uncached forward pass."""
    seen = {}

    def grab(_m, args, kwargs):
        seen["h"], seen["pe"] = args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"]

    handle = adapter.site("lm.layers.0").register_forward_pre_hook(grab, with_kwargs=True)
    try:
        adapter.model(**model_inputs(inputs), use_cache=False)
    finally:
        handle.remove()
    return seen["h"], seen["pe"]


@torch.no_grad()
def reference_tokens(adapter, prompt, images, present_of, renumber=False):
    """Greedy tokens of one unpadded row, uncached: each layer runs on the tokens ``present_of(layer)`` says.

    ``present_of(l) -> [prompt] bool``; generated tokens are always present. A token absent from the previous
    layer enters with its layer-0 embedding. ``renumber``: positions contiguous over the tokens present at layer 0.
    """
    base = adapter.build_inputs([prompt], [images])
    lm, gen = adapter.site("lm.layers"), []
    for _ in range(T):
        extra = torch.tensor([gen], dtype=torch.long)
        inputs = {**base, "input_ids": torch.cat([base["input_ids"], extra], 1),
                  "attention_mask": torch.ones(1, base["input_ids"].shape[1] + len(gen), dtype=torch.long)}  # fmt: skip
        if "mm_token_type_ids" in base:
            inputs["mm_token_type_ids"] = torch.cat([base["mm_token_type_ids"], torch.zeros_like(extra)], 1)
        embeds, (cos, sin) = _layer0(adapter, inputs)
        n, full, was = embeds.shape[1], embeds.clone(), None
        for layer_idx, layer in enumerate(lm):
            present = torch.cat([present_of(layer_idx), torch.ones(len(gen), dtype=torch.bool)])  # [n]
            if was is not None:
                full[:, present & ~was] = embeds[:, present & ~was]
            if renumber:
                pos = (present.long().cumsum(0) - 1)[present][None]  # [1, m]
                pe = adapter.model.model.language_model.rotary_emb(full, pos)
            else:
                pe = (cos[:, present], sin[:, present])
            m = int(present.sum())
            mask = torch.ones(m, m, dtype=torch.bool).tril()[None, None]
            full[:, present] = layer(full[:, present], attention_mask=mask, position_embeddings=pe)
            was = present
        logits = adapter.model.lm_head(adapter.site("lm.norm")(full[:, -1]))[0]
        logits[adapter.processor.tokenizer.eos_token_id] = -torch.inf  # as min_new_tokens does
        gen.append(int(logits.argmax()))
        assert n == base["input_ids"].shape[1] + len(gen) - 1
    return gen


def _row_view(mask: torch.Tensor, inputs, row: int) -> torch.Tensor:
    """A batch mask's row without its left padding."""
    return mask[row][inputs["attention_mask"][row].bool()]


MODES = {
    "drop_at": lambda vis, keep, L: lambda h: h.drop_at(2, lambda b: keep),
    "drop_input": lambda vis, keep, L: lambda h: h.drop_input(lambda i: keep),
    "renumber": lambda vis, keep, L: lambda h: h.drop_input(lambda i: keep, renumber=True),
    "enter_at": lambda vis, keep, L: lambda h: h.enter_at(2, lambda i: vis),
}


def _present_of(mode, vis_row, keep_row):
    def present(layer):
        if mode == "drop_at":
            return keep_row if layer >= 2 else torch.ones_like(keep_row)
        if mode in ("drop_input", "renumber"):
            return keep_row
        return torch.ones_like(vis_row) if layer >= 2 else ~vis_row

    return present


CASES = [("llava", m) for m in MODES] + [("qwen_vl", "drop_at"), ("qwen_vl", "drop_input"), ("qwen_vl", "enter_at"),
                                         ("internvl", "drop_at"), ("internvl", "renumber")]  # fmt: skip


@pytest.mark.parametrize(("family", "mode"), CASES)
def test_surgery_decoding_equals_explicit_reference(loaded, family, mode):
    """Batched, left-padded, cached generation under each surgery mode == a per-row uncached reference."""
    adapter = loaded(family)
    prompts, images = _batch(adapter)
    inputs = adapter.build_inputs(prompts, images)
    vis = adapter.image_token_mask(inputs)
    keep = _planted_keep(vis)
    with torch.inference_mode(), attach(adapter, "test", {"tokens"}) as handle:
        MODES[mode](vis, keep, adapter.num_layers())(handle)
        out = adapter.generate_ids(inputs, **GEN)
        layouts = adapter._intervention.surgery.layouts
    assert any(lay is not None for lay in layouts)  # something was actually removed / delayed
    for row in range(2):
        present = _present_of(mode, _row_view(vis, inputs, row), _row_view(keep, inputs, row))
        ref = reference_tokens(adapter, prompts[row], images[row], present, renumber=mode == "renumber")
        assert out[row].tolist() == ref, f"row {row}"


@pytest.mark.parametrize("path", ["batched", "per_row"])
def test_tokens_reaching_each_layer_for_a_planted_attention_pattern(loaded, path):
    """FastV keeps exactly the top-k of the attention it records; layers >= K see only text + those tokens.

    Both selection paths: the batched one (default) and the per-row one (taken when debiasing or recording).
    """
    adapter = loaded("llava")
    prompts, images = _batch(adapter)
    inputs = adapter.build_inputs(prompts, images)
    vis = adapter.image_token_mask(inputs)
    planted = torch.rand(vis.shape, generator=torch.Generator().manual_seed(5))  # [batch, seq] "attention"

    class Planted(FastV):
        def _record(self, probs, step):
            step.batch.state[self.name] = planted.clone()
            return probs

    lengths: dict[int, list[int]] = {}
    hooks = [adapter.site(f"lm.layers.{i}").register_forward_hook(  # output length = tokens the layer ran on
        lambda _m, _a, out, i=i: lengths.setdefault(i, []).append((out[0] if isinstance(out, tuple) else out).shape[1]))
        for i in range(adapter.num_layers())]  # fmt: skip
    method = Planted(layer=2, ratio=0.75)
    method.recorded = [] if path == "per_row" else None
    try:
        with torch.inference_mode(), method.bind(adapter):
            adapter.forward(inputs, logits_to_keep=1)
            layout = adapter._intervention.surgery.layouts[2]
    finally:
        for h in hooks:
            h.remove()
    for row in range(2):
        pos = vis[row].nonzero().flatten()
        k = round(0.25 * len(pos))
        top = pos[torch.topk(planted[row, pos], k).indices]
        expect = sorted(set((~vis[row] & inputs["attention_mask"][row].bool()).nonzero().flatten().tolist())
                        | set(top.tolist()))  # fmt: skip
        assert layout.index[row][layout.valid[row]].tolist() == expect
    n_text = (~vis & inputs["attention_mask"].bool()).sum(1)
    assert lengths[0] == lengths[1] == [vis.shape[1]]
    assert lengths[2] == lengths[3] == [int((n_text + (vis.sum(1) * 0.25).round().long()).max())]
    assert method.report()["kept_fraction"] == pytest.approx(0.25, abs=0.01)


def test_fastv_scores_equal_the_models_own_attention(loaded):
    """The recorded score is the head-mean last-row attention HF's eager attention returns at layer K−1."""
    adapter = loaded("llava")
    prompts, images = _batch(adapter)
    inputs = adapter.build_inputs(prompts, images)
    seen = {}

    class Spy(FastV):
        def _select(self, batch):
            seen["scores"] = batch.state[self.name].clone()
            return super()._select(batch)

    with torch.inference_mode(), Spy(layer=2).bind(adapter):
        adapter.forward(inputs, logits_to_keep=1)
    with torch.inference_mode(), adapter.lm_attention("eager"):
        att = adapter.model(**model_inputs(inputs), output_attentions=True).attentions[1]  # [batch, heads, q, k]
    torch.testing.assert_close(seen["scores"], att.mean(1)[:, -1], rtol=1e-4, atol=1e-6)
    padding = inputs["attention_mask"] == 0
    mean = received_attention(att, padding, "mean")
    rows = (~padding).float()
    torch.testing.assert_close(mean[0], (att.mean(1)[0] * rows[0][:, None]).sum(0) / rows[0].sum())


def test_fastervlm_equals_the_shortened_prompt(loaded):
    """FasterVLM == the model run on a prompt built with only the kept image tokens (the official route)."""
    adapter = loaded("llava")
    prompts, images = _batch(adapter)
    inputs = adapter.build_inputs(prompts, images)
    method = FasterVLM(ratio=0.75)
    with torch.inference_mode(), method.bind(adapter):
        out = adapter.generate_ids(inputs, **GEN)
    cls = adapter.vision_cls_attention(inputs)
    with torch.inference_mode(), adapter.vision_attention("eager"):
        att = adapter.model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[-2]
    torch.testing.assert_close(torch.cat(cls), att[:, :, 0, 1:].mean(1).reshape(-1))  # image order = row order
    model = adapter.model
    with torch.inference_mode():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output  # per image
        per_image, start, rows = len(cls[0]) // len(images[0]), 0, []
        for row in range(2):
            ids = _row_view(inputs["input_ids"], inputs, row)
            vis = ids == adapter.image_token_id
            embeds = model.get_input_embeddings()(ids)
            kept_feats, keep = [], ~vis.clone()
            vpos = vis.nonzero().flatten()
            for i in range(len(images[row])):
                score = cls[row][i * per_image : (i + 1) * per_image]
                top = torch.topk(score, round(0.25 * per_image)).indices.sort().values
                keep[vpos[i * per_image + top]] = True
                kept_feats.append(feats[start + i][top])
            start += len(images[row])
            embeds[vis & keep] = torch.cat(kept_feats)
            emb = embeds[keep][None]
            gen = model.generate(inputs_embeds=emb, attention_mask=torch.ones(1, emb.shape[1], dtype=torch.long), **GEN)
            rows.append(gen[0, -T:].tolist())
    assert out.tolist() == rows
    assert method.report()["kept_fraction"] == pytest.approx(0.25)


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_fastervlm_runs_the_vision_tower_once_per_prompt(loaded, family, monkeypatch):
    """The [CLS] scoring pass is the model's own image encoding: the tower runs once per prompt, not twice, in
    ``generate`` and ``forward``, through either bridge of :func:`adapters.hf_compat.encoded_images` (the
    ``mm_encoder_outputs`` argument of transformers >= 5.19, and the ``get_image_features`` stand-in for 5.17 and
    5.18, forced here on whatever version is installed), and the tokens and logits equal those of the double pass
    (the model encoding the images again)."""
    import contextlib

    import adapters.generation
    import adapters.hf_compat

    adapter = loaded(family)
    prompts, images = _batch(adapter)
    inputs = adapter.build_inputs(prompts, images)
    calls = []
    handle = adapter.model.model.vision_tower.register_forward_hook(lambda *_: calls.append(1))

    def run():
        calls.clear()
        with torch.inference_mode(), FasterVLM(ratio=0.75).bind(adapter):
            ids = adapter.generate_ids(inputs, **GEN)
            n_generate = len(calls)
            logits = adapter.forward(inputs, logits_to_keep=1).logits
        return ids, logits, [n_generate, len(calls) - n_generate]

    @contextlib.contextmanager
    def encode_again(_model, prepared, _encoded):
        yield prepared

    try:
        runs = {"installed": run()}
        with monkeypatch.context() as m:
            m.setattr(adapters.hf_compat, "accepts_encoder_outputs", lambda _model: False)
            runs["5.17 bridge"] = run()
        monkeypatch.setattr(adapters.generation, "encoded_images", encode_again)
        ids2, logits2, passes2 = run()
    finally:
        handle.remove()
    assert passes2 == [2, 2]
    for how, (ids, logits, passes) in runs.items():
        assert passes == [1, 1], how
        assert ids.tolist() == ids2.tolist(), how
        torch.testing.assert_close(logits, logits2, rtol=0, atol=0, msg=how)
    assert adapter._encoded is None  # nothing kept once the call is over
    assert "get_image_features" not in vars(adapter.model.base_model)  # the 5.17 stand-in is gone


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_cls_scores_materialise_no_patch_by_patch_attention(loaded, family):
    """The [CLS] row is computed alone: no op outputs an ``[n, heads, 1+P, 1+P]`` tensor (what an eager tower
    pass with ``output_attentions`` writes for every layer, the memory FasterVLM exists to save)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    adapter = loaded(family)
    prompts, images = _batch(adapter)
    inputs = adapter.build_inputs(prompts, images)
    largest = []

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            largest.extend(t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    with torch.inference_mode(), Largest():
        adapter.vision_cls_attention(inputs)
    tower = adapter.model.config.vision_config
    n, tokens = inputs["pixel_values"].shape[0], 1 + (_first(tower.image_size) // _first(tower.patch_size)) ** 2
    assert max(largest) < n * tower.num_attention_heads * tokens * tokens


def _first(size) -> int:
    return size[0] if isinstance(size, (list, tuple)) else size


def test_internvl_cls_scores_pool_each_merged_group(loaded):
    adapter = loaded("internvl")
    prompts, images = _batch(adapter)
    inputs = adapter.build_inputs(prompts, images)
    scores = adapter.vision_cls_attention(inputs)
    n_tiles = inputs["pixel_values"].shape[0]
    # every tile's [CLS] row sums to 1 over CLS + patches, so the pooled patch mass per tile is below 1
    total = torch.cat(scores).reshape(n_tiles, -1).sum(1)
    assert ((total > 0) & (total < 1)).all()
    assert [len(s) for s in scores] == adapter.image_token_mask(inputs).sum(1).tolist()


def test_refusals_and_validation(loaded, tmp_path):
    from adapters.qwen_vl import QwenVLAdapter

    qwen = QwenVLAdapter(name="q", path=str(tmp_path / "never-loaded"))
    with pytest.raises(UnsupportedError, match=r"no \[CLS\] token; use method=fastv"):
        FasterVLM().check(qwen)
    with pytest.raises(UnsupportedError, match=r"python -m methods\.calibrate debias"):
        FastV(debias=True).check(loaded("llava"))  # a random tiny model has no calibrated trend
    with pytest.raises(LayerError, match=r"must be in 1\.\.3"):  # a UserError: one line from run.py
        resolve_layer(4, 4)
    assert resolve_layer("auto", 2) == 1 and resolve_layer("auto", 32) == 2
    with pytest.raises(ValueError, match="ratio"):
        FastV(ratio=1.0)
    adapter = loaded("llava")
    with (
        attach(adapter, "fastv", {"tokens"}),
        pytest.raises(CompositionError, match="removes or adds"),
        attach(adapter, "var", {"probs", "resid"}),
    ):
        pass
