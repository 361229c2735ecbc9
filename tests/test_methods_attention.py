"""The intervention layer and the attention methods VAR, CCA, MMA: mechanism tests, on every adapter family.

Tiny random checkpoints with a 4-layer LM (so VAR's default layers 2..L-2 are not empty) and GQA.
"""

from __future__ import annotations

import itertools
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.base import ADAPTERS
from adapters.generation import model_inputs
from methods.base import METHODS, Method
from methods.cca import CCA, concentric_allowed, concentric_positions, ring_layout
from methods.intervention import CompositionError, attach
from methods.mma import MMA
from methods.var import VAR, redistribute, sink_scores

FAMILIES = ("llava", "qwen_vl", "qwen2_5_vl", "internvl")  # conftest's 4-layer random models
GEN = {"max_new_tokens": 5, "do_sample": False}
#: VAR on random tiny models: explicit sink dims and a low tau so that sinks exist; every row eligible
VAR_TINY = {"sink_dims": [0, 1, 2, 3], "tau": 2.0, "rho": 0.0, "visual_mass": 0.0, "p": 0.5}


def _make(name: str, **kw) -> Method:
    return METHODS.get(name)(**(VAR_TINY | kw if name == "var" else kw))


@pytest.fixture(scope="module")
def loaded(four_layer):
    return four_layer(seed=2)


@pytest.fixture(scope="module", params=list(FAMILIES))
def adapter(request, loaded):
    return loaded(request.param)


def _img(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _rows(adapter):
    wide = (128, 64) if adapter.family != "llava" else (64, 64)
    texts = ["Is there a star?", "Is there a big red star in the middle of the image?", "Count.", "Describe it."]
    images = [[_img(64, 64, 1)], [_img(*wide, 2)], [_img(64, 64, 3)], [_img(*wide, 4)]]
    return [adapter.format_prompt(t) for t in texts], images


def _ids(adapter, inputs, **kw):
    return adapter.generate_ids(inputs, **(GEN | kw))


# ---------------------------------------------------------------------------------------------- the layer
class _Recorder(Method):
    """Test helper: records the prompt mask it is handed (after the methods attached before it) and the probs."""

    name: ClassVar[str] = "recorder"

    def install(self):
        self.masks, self.probs = [], []
        h = self.enter_context(attach(self.adapter, self.name, {"mask", "probs"}))
        h.mask(lambda m, s: (self.masks.append(m.clone()), m)[1])
        h.probs([0], lambda p, s: (self.probs.append((s.offset, p.clone())), p)[1])


def test_attaching_without_callbacks_is_the_baseline_and_is_fully_removed(adapter):
    prompts, images = _rows(adapter)
    inputs = adapter.build_inputs(prompts, images)
    with torch.inference_mode():
        adapter.forward(inputs)  # warm-up: the first plain forward can be the odd one out (see _report_mismatch)
        base = adapter.forward(inputs).logits
    ids = _ids(adapter, inputs)
    attn = adapter.model.config.get_text_config()._attn_implementation
    with attach(adapter, "probe", set()):
        assert adapter.model.config.get_text_config()._attn_implementation == "harness"
        with torch.inference_mode():
            attached = adapter.forward(inputs).logits
        assert torch.equal(_ids(adapter, inputs), ids)
    if not torch.equal(attached, base):  # exact: the same kernels on the same inputs
        _report_mismatch(adapter, inputs, base, attached)
    with _Recorder().bind(adapter):  # eager path (probs callback on layer 0) with an identity edit
        with torch.inference_mode():
            eager = adapter.forward(inputs).logits
        keep = inputs["attention_mask"].bool()
        assert torch.allclose(eager[keep], base[keep], atol=1e-4)
    assert adapter.model.config.get_text_config()._attn_implementation == attn
    assert not any(hasattr(adapter.site(f"lm.layers.{i}.attn"), "_harness_site") for i in range(4))
    assert getattr(adapter, "_intervention", None) is None


def _report_mismatch(adapter, inputs, base, attached):
    """Fail with where the logits differ and whether the plain model reproduces either result.

    Seen again on 2026-12-07 (session 6) with LLaVA, torch 2.15, transformers 5.25, Python 3.13, machine idle but
    for the test: 188,386 of 216,000 logits, max 0.0145, the plain model run again equal to the attached result. So
    the baseline is now taken after one warm-up forward of the same inputs; the test still fails if attaching
    changes a steady-state forward.
    Seen twice on 2026-12-07 under heavy CPU load, transformers 5.17, InternVL (2 in about 140 runs), with the same
    numbers both times: 91,637 of 204,000 logits differ, max 0.0096 (a one-ulp change anywhere in the LM moves them
    by at most 1.5e-5), only in rows 1 and 3 (the two-tile images), and the plain model run again equals the
    attached result, not the baseline. So the odd one out is the first forward of the model in the process, not
    the attached path; the cause (below the harness: no method is attached in that call) is not found yet.
    """
    with torch.inference_mode():
        again = adapter.forward(inputs).logits
    d = (attached - base).abs()  # [batch, seq, vocab]
    real = inputs["attention_mask"].bool()
    rows = [round(float(x), 6) for x in d.amax((1, 2))]
    pytest.fail(
        f"attached logits differ from the baseline: {int((d > 0).sum())} of {d.numel()} elements, "
        f"max {float(d.max()):.3g} (at real positions {float(d[real].max()):.3g}), per row {rows}; the plain "
        f"model again equals the baseline: {torch.equal(again, base)}, the attached: {torch.equal(again, attached)}"
    )


def test_the_mask_reaching_the_function_is_causal_with_padding(loaded):
    adapter = loaded("llava")
    prompts, images = _rows(adapter)
    inputs = adapter.build_inputs(prompts[:2], images[:2])
    rec = _Recorder()
    with rec.bind(adapter), torch.inference_mode():
        adapter.forward(inputs)
    mask = rec.masks[0][:, 0]  # [batch, q, k]
    n = inputs["input_ids"].shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    keys = inputs["attention_mask"].bool()[:, None, :]
    real_rows = inputs["attention_mask"].bool()
    assert torch.equal(mask[real_rows], (causal & keys).expand(2, n, n)[real_rows])


def test_calling_the_model_directly_while_attached_fails_clearly(loaded):
    adapter = loaded("llava")
    prompts, images = _rows(adapter)
    inputs = adapter.build_inputs(prompts[:1], images[:1])
    with _make("var").bind(adapter), pytest.raises(RuntimeError, match=r"adapter\.generate / adapter\.forward"):
        adapter.model(**model_inputs(inputs))


def test_composition_rules(loaded):
    adapter = loaded("llava")

    class OtherProbs(Method):
        name: ClassVar[str] = "other_probs"

        def install(self):
            self.enter_context(attach(self.adapter, self.name, {"probs"}))

    with _make("var").bind(adapter), CCA().bind(adapter):  # probs + positions/mask: composable
        prompts, images = _rows(adapter)
        _ids(adapter, adapter.build_inputs(prompts[:2], images[:2]))
    with _make("var").bind(adapter):
        with pytest.raises(CompositionError, match="both edit probs"), OtherProbs().bind(adapter):
            pass
        with pytest.raises(CompositionError, match="already applied"), _make("var").bind(adapter):
            pass
    assert getattr(adapter, "_intervention", None) is None
    assert adapter.model.config.get_text_config()._attn_implementation == "sdpa"


# ---------------------------------------------------------------------------------------------- every method
@pytest.mark.parametrize("name", ["var", "cca", "mma"])
def test_batch_with_padding_equals_one_by_one(adapter, name):
    prompts, images = _rows(adapter)
    batch = adapter.build_inputs(prompts, images)
    assert (batch["attention_mask"] == 0).any()
    with _make(name).bind(adapter):
        together = _ids(adapter, batch)
        with torch.inference_mode():
            logits_b = adapter.forward(batch).logits[:, -1]
        for i in range(4):
            single = adapter.build_inputs([prompts[i]], [images[i]])
            assert torch.equal(_ids(adapter, single)[0], together[i]), f"{name}: row {i} differs"
            with torch.inference_mode():
                assert torch.allclose(adapter.forward(single).logits[0, -1], logits_b[i], atol=1e-4)


@pytest.mark.parametrize("name", ["var", "cca", "mma"])
def test_cached_generation_equals_uncached_and_the_method_changes_the_output(adapter, name):
    prompts, images = _rows(adapter)
    inputs = adapter.build_inputs(prompts, images)
    with torch.inference_mode():
        base = adapter.forward(inputs).logits[:, -1]
    with _make(name).bind(adapter):
        cached = _ids(adapter, inputs, max_new_tokens=6)
        uncached = _ids(adapter, inputs, max_new_tokens=6, use_cache=False)
        with torch.inference_mode():
            logits = adapter.forward(inputs).logits[:, -1]
    assert torch.equal(cached, uncached)
    assert (logits - base).abs().max() > 1e-3, f"{name} did not change the model's output at all"


@pytest.mark.parametrize("name", ["var", "cca", "mma"])
def test_a_baseline_run_after_the_method_is_bit_identical(adapter, name):
    prompts, images = _rows(adapter)
    inputs = adapter.build_inputs(prompts, images)
    before = _ids(adapter, inputs)
    with torch.inference_mode():
        logits_before = adapter.forward(inputs).logits
    hooks = sum(len(adapter.site(f"lm.layers.{i}")._forward_pre_hooks) for i in range(4))
    with _make(name).bind(adapter):
        _ids(adapter, inputs)
    assert torch.equal(_ids(adapter, inputs), before)
    with torch.inference_mode():
        assert torch.equal(adapter.forward(inputs).logits, logits_before)
    assert sum(len(adapter.site(f"lm.layers.{i}")._forward_pre_hooks) for i in range(4)) == hooks


# ---------------------------------------------------------------------------------------------- VAR
def _planted():
    """Keys: 0 BOS (text sink), 1 text, 2 visual sink, 3 visual, 4 visual, 5 text. Rows: 3 query rows, 2 heads."""
    sinks = torch.tensor([[True, False, True, False, False, False]])
    visual = torch.tensor([[False, False, True, True, True, False]])
    probs = torch.tensor(
        [
            [  # head 0: image-centric rows 1, 2 (visual mass 0.5, non-sink ratio 0.6)
                [0.30, 0.10, 0.20, 0.20, 0.10, 0.10],
                [0.30, 0.10, 0.20, 0.20, 0.10, 0.10],
                [0.30, 0.10, 0.20, 0.20, 0.10, 0.10],
            ],
            [  # head 1: visual mass 0.1 < 0.2: never selected
                [0.70, 0.10, 0.05, 0.03, 0.02, 0.10],
                [0.70, 0.10, 0.05, 0.03, 0.02, 0.10],
                [0.70, 0.10, 0.05, 0.03, 0.02, 0.10],
            ],
        ]
    )[None]  # [1, 2, 3, 6]
    rows = torch.tensor([[False, True, True]])  # row 0 is before the image ends
    return probs, sinks, visual, rows


def test_var_moves_exactly_the_fraction_of_sink_mass_to_visual_non_sinks():
    probs, sinks, visual, rows = _planted()
    p = 0.4
    new, selected = redistribute(probs, sinks, visual, rows, p=p, rho=0.5, visual_mass=0.2)
    assert selected.tolist() == [[[False, True, True], [False, False, False]]]
    row, out = probs[0, 0, 1], new[0, 0, 1]
    sink_mass = row[[0, 2]].sum()  # 0.5
    moved = p * sink_mass  # 0.2
    assert torch.allclose(out[[0, 2]], (1 - p) * row[[0, 2]]), "each sink keeps (1 - p) of its weight"
    gained = out[[3, 4]] - row[[3, 4]]
    assert torch.allclose(gained.sum(), moved), "the whole budget goes to visual non-sinks"
    assert torch.allclose(gained / gained.sum(), row[[3, 4]] / row[[3, 4]].sum()), "in proportion to their weight"
    assert torch.equal(out[[1, 5]], row[[1, 5]]), "text non-sinks untouched"
    assert torch.allclose(new.sum(-1), torch.ones(1, 2, 3)), "rows still sum to 1"
    assert torch.equal(new[0, 1], probs[0, 1]), "unselected head untouched"
    assert torch.equal(new[0, 0, 0], probs[0, 0, 0]), "rows before the image end untouched"


def test_var_head_tests_use_the_paper_conventions():
    probs, sinks, visual, rows = _planted()
    # head 0 row: visual non-sink ratio r = 0.3 / 0.5 = 0.6
    assert redistribute(probs, sinks, visual, rows, 0.4, rho=0.6, visual_mass=0.2)[1][0, 0, 1]
    assert not redistribute(probs, sinks, visual, rows, 0.4, rho=0.61, visual_mass=0.2)[1][0, 0, 1]
    assert not redistribute(probs, sinks, visual, rows, 0.4, rho=0.5, visual_mass=0.51)[1][0, 0, 1]
    no_visual_sink = sinks & ~visual
    assert not redistribute(probs, no_visual_sink, visual, rows, 0.4, 0.5, 0.2)[1].any(), "no visual sink: no edit"


def test_var_sink_scores_are_ratio_to_rms():
    x = torch.ones(1, 3, 8)
    x[0, 1, 5] = 40.0  # a massive activation in channel 5 of token 1
    phi = sink_scores(x, [5])
    rms = ((7 + 1600) / 8) ** 0.5
    assert torch.allclose(phi[0, 1], torch.tensor(40 / rms), atol=1e-4)
    assert torch.allclose(phi[0, [0, 2]], torch.ones(2), atol=1e-4)


def test_var_on_a_model_applies_in_prefill_and_every_decoding_step(adapter):
    prompts, images = _rows(adapter)
    inputs = adapter.build_inputs(prompts, images)
    var = _make("var", layers=[2])
    seen = []
    original = var._redistribute

    def spy(probs, step):
        before = probs.clone()  # VAR edits the probabilities in place
        out = original(probs, step)
        seen.append((step.offset, step.q_len, before, out.clone()))
        return out

    var._redistribute = spy
    with var.bind(adapter):
        _ids(adapter, inputs)
    prefill = [s for s in seen if s[1] > 1]
    decode = [s for s in seen if s[1] == 1]
    assert len(prefill) == 1 and len(decode) == GEN["max_new_tokens"] - 1
    for _off, _q, before, after in seen:
        assert (after.sum(-1) - before.sum(-1)).abs().max() < 1e-5, "rows still sum to 1"
    assert any(not torch.equal(b, a) for _o, _q, b, a in decode), "VAR must edit decoding rows too"
    activity = var.describe()["activity"]
    assert activity["visual_sink_tokens"] > 0 and activity["selected_head_rows"] > 0
    offset, _q, before, after = prefill[0]
    assert offset > 0, "rows up to the first image's end run on fused SDPA, not shown to VAR"
    edited = []
    for b, spans in enumerate(adapter.image_spans(inputs)):
        end = spans[-1][1] - offset  # rows up to the last visual token (padding, system, image) are never edited
        assert end >= 0 and torch.equal(before[b, :, :end], after[b, :, :end])
        edited.append(not torch.equal(before[b, :, end:], after[b, :, end:]))
    assert any(edited), "instruction rows are edited"


def test_var_fused_rows_split_equals_the_all_eager_computation(adapter):
    prompts, images = _rows(adapter)
    inputs = adapter.build_inputs(prompts, images)
    split, full = _make("var"), _make("var")
    full._first_row = lambda step: 0  # every row through the eager path
    logits = []
    for var in (split, full):
        with var.bind(adapter), torch.inference_mode():
            logits.append(adapter.forward(inputs).logits)
    keep = inputs["attention_mask"].bool()
    assert torch.allclose(logits[0][keep], logits[1][keep], atol=1e-4)
    assert split.describe()["activity"] == full.describe()["activity"]


def test_var_default_layers_and_sink_resolution(loaded, tmp_path):
    adapter = loaded("llava")
    var = _make("var")
    with var.bind(adapter):
        assert var.layers == [2], "auto = 2..L-2 on a 4-layer LM"
    from methods.base import UnsupportedError

    bare = ADAPTERS.get("llava")(name="x", path=str(tmp_path))
    with pytest.raises(UnsupportedError, match=r"methods\.calibrate var"):
        VAR().check(bare)
    hub = ADAPTERS.get("llava")(name="x", path="llava-hf/llava-1.5-7b-hf")
    published = VAR()
    published.check(hub)
    assert (published.dims, published.tau, published.source) == ([1415, 2533], 20.0, "published")
    cal = tmp_path / "cal.json"
    cal.write_text('{"sink_dims": [5], "tau": 2.5}')
    from_file = VAR(sink_file=str(cal))
    from_file.check(hub)
    assert (from_file.dims, from_file.tau) == ([5], 2.5), "an explicit calibration file wins over the table"
    with pytest.raises(FileNotFoundError):
        VAR(sink_file=str(tmp_path / "missing.json")).check(hub)


# ---------------------------------------------------------------------------------------------- CCA
RING_6X6 = [
    [0, 0, 0, 0, 0, 0],
    [0, 1, 1, 1, 1, 0],
    [0, 1, 2, 2, 1, 0],
    [0, 1, 2, 2, 1, 0],
    [0, 1, 1, 1, 1, 0],
    [0, 0, 0, 0, 0, 0],
]


def _six_by_six():
    """One row: [pad, t, t, 36 visual tokens (6x6, raster order), t, t, t]."""
    seq = 1 + 2 + 36 + 3
    ring = torch.full((1, seq), -1)
    tile = torch.full((1, seq), -1)
    ring[0, 3:39] = torch.tensor(RING_6X6).flatten()
    tile[0, 3:39] = 0
    ends = torch.zeros(1, seq + 1, dtype=torch.long)
    ends[0, 39] = 3
    mask = torch.ones(1, seq, dtype=torch.long)
    mask[0, 0] = 0
    return ring, tile, ends, mask


def test_cca_positions_for_a_6x6_grid_equal_the_hand_table():
    ring, tile, ends, mask = _six_by_six()
    pos = concentric_positions(ring, tile, ends, mask)[0]
    expected = [0, 0, 1] + [2 + r for row in RING_6X6 for r in row] + [5, 6, 7]  # pad, text, rings, text after
    assert pos.tolist() == expected


def test_cca_mask_for_a_6x6_grid_equals_the_hand_rule():
    ring, tile, _ends, _mask = _six_by_six()
    block, allow = concentric_allowed(ring, tile)
    causal = torch.ones(42, 42, dtype=torch.bool).tril()
    got = torch.where(block[0], allow[0], causal)
    flat = [r for row in RING_6X6 for r in row]
    for q, k in itertools.product(range(42), range(42)):
        both_visual = 3 <= q < 39 and 3 <= k < 39
        want = flat[k - 3] <= flat[q - 3] if both_visual else k <= q  # concentric in the image, causal elsewhere
        assert bool(got[q, k]) == want, (q, k)
    # the centre (2,2) sees its ring-mate (2,3) later in raster order; the corner (0,0) never sees the centre
    centre, mate, corner = 3 + 2 * 6 + 2, 3 + 2 * 6 + 3, 3
    assert got[centre, mate] and got[mate, centre] and not got[corner, centre] and got[centre, corner]


def test_cca_layout_on_every_adapter(adapter):
    prompts, images = _rows(adapter)
    inputs = adapter.build_inputs(prompts, images)
    ring, tile, ends = ring_layout(adapter, inputs)
    for b, runs in enumerate(adapter.tile_spans(inputs)):
        for t, (_img_i, _tile_i, start, end) in enumerate(runs):
            cells = adapter.visual_token_map(inputs)[b]
            assert (tile[b, start:end] == t).all()
            assert ring[b, start:end].min() == 0, "every tile has an outer ring"
            assert ends[b, end] == ring[b, start:end].max() + 1
        assert len(runs) == len(cells[:, :2].unique(dim=0))
    pos = CCA().bind(adapter)._positions(adapter.position_ids(inputs), inputs)
    if adapter.family == "qwen_vl":
        assert pos.shape[0] == 3 and torch.equal(pos[0], pos[1]) and torch.equal(pos[1], pos[2])
        pos = pos[0]
    keep = inputs["attention_mask"].bool()
    for b in range(4):
        p = pos[b][keep[b]]
        n_vis = int(adapter.image_token_mask(inputs)[b].sum())
        n_rings = int(ends[b].sum())
        assert int(p.max()) == keep[b].sum() - 1 - n_vis + n_rings, "the image costs its ring count in positions"


def test_cca_positions_reach_the_model_in_prefill_and_decode_continues(adapter):
    prompts, images = _rows(adapter)
    inputs = adapter.build_inputs(prompts[:2], images[:2])
    seen = []
    hook = adapter.model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw.get("position_ids")) and None, with_kwargs=True
    )
    try:
        with CCA().bind(adapter):
            _ids(adapter, inputs, max_new_tokens=3)
    finally:
        hook.remove()
    ring, tile, ends = ring_layout(adapter, inputs)
    want = concentric_positions(ring, tile, ends, inputs["attention_mask"])
    prefill = seen[0][-1] if seen[0].dim() == 3 else seen[0]  # M-RoPE: [4, b, s], rows 1-3 are the rope rows
    assert torch.equal(prefill, want)
    step1 = seen[1][-1] if seen[1].dim() == 3 else seen[1]
    assert torch.equal(step1[:, -1], want[:, -1] + 1)


# ---------------------------------------------------------------------------------------------- MMA
def test_mma_admits_image_to_instruction_and_nothing_else(adapter):
    prompts, images = _rows(adapter)
    inputs = adapter.build_inputs(prompts, images)
    base, rec = _Recorder(), _Recorder()
    with base.bind(adapter), torch.inference_mode():
        adapter.forward(inputs)
    with MMA().bind(adapter), rec.bind(adapter), torch.inference_mode():
        adapter.forward(inputs)
    added = rec.masks[0][:, 0] & ~base.masks[0][:, 0]  # [batch, q, k]
    assert not (base.masks[0] & ~rec.masks[0]).any(), "MMA removes nothing"
    visual = adapter.image_token_mask(inputs)
    tok = adapter.processor.tokenizer
    texts = ["Is there a star?", "Is there a big red star in the middle of the image?", "Count.", "Describe it."]
    for b, (start, end) in enumerate(adapter.instruction_spans(inputs)):
        instr = torch.zeros_like(visual[b])
        instr[start:end] = True
        assert torch.equal(added[b], visual[b][:, None] & instr[None, :]), "exactly visual rows x instruction cols"
        words = tok.decode(inputs["input_ids"][b, start:end], skip_special_tokens=True)
        assert texts[b] in words and "ASSISTANT" not in words and "assistant" not in words
    assert rec.masks[0].shape[-1] == inputs["input_ids"].shape[1]


def test_mma_include_turn_suffix_widens_the_window(loaded):
    adapter = loaded("qwen_vl")
    prompts, images = _rows(adapter)
    inputs = adapter.build_inputs(prompts[:1], images[:1])
    recs = []
    for flag in (False, True):
        rec = _Recorder()
        with MMA(include_turn_suffix=flag).bind(adapter), rec.bind(adapter), torch.inference_mode():
            adapter.forward(inputs)
        recs.append(rec.masks[0][0, 0])
    vis_row = int(adapter.image_token_mask(inputs)[0].nonzero()[0])
    extra = (recs[1][vis_row] & ~recs[0][vis_row]).nonzero().flatten()
    assert len(extra) == len(adapter.turn_suffix_ids())
    assert int(extra[-1]) == inputs["input_ids"].shape[1] - 1, "the suffix ends the prompt"


def test_training_through_the_intervention_layer_has_the_plain_gradients(llava):
    """The shapes-world trainer runs CCA/MMA through this layer: with nothing registered it must train identically."""
    prompts, images = _rows(llava)
    batch = llava.build_inputs(prompts, images)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    llava.model.train()
    grads = []
    try:
        for ctx in (None, attach(llava, "probe", set())):
            llava.model.zero_grad()
            if ctx is None:
                llava.forward(batch).loss.backward()
            else:
                with ctx:
                    llava.forward(batch).loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in llava.model.parameters() if p.grad is not None]))
    finally:
        llava.model.zero_grad()
        llava.model.eval()
    assert grads[0].abs().max() > 0 and torch.equal(grads[0], grads[1])


def test_decoding_logits_site_edits_every_step_and_is_removed(loaded):
    adapter = loaded("qwen_vl")
    prompts, images = _rows(adapter)
    inputs = adapter.build_inputs(prompts[:2], images[:2])
    base = _ids(adapter, inputs)
    banned = int(base[0, 0])
    steps = []

    def ban(input_ids, scores):  # [batch, seq], [batch, vocab]
        steps.append(input_ids.shape[1])
        return scores.index_fill(1, torch.tensor([banned]), float("-inf"))

    with attach(adapter, "ban", {"logits"}) as handle:
        handle.logits(ban)
        edited = _ids(adapter, inputs)
    assert len(steps) == GEN["max_new_tokens"] and not (edited == banned).any()
    assert torch.equal(_ids(adapter, inputs), base), "removed on exit"


def test_var_fast_path_equals_the_reference_redistribution(adapter):
    """VAR's hook (key factors from prefill, prompt keys only) gives exactly :func:`redistribute`'s probabilities."""
    prompts, images = _rows(adapter)
    inputs = adapter.build_inputs(prompts, images)
    var = _make("var", layers=[2])
    seen = []
    original = var._redistribute

    def spy(probs, step):
        state = step.batch.state[var.name]
        keys = state["sinks"][step.layer]
        sinks = step.batch.keys((1 - keys.keep[:, 0, 0]).bool(), step.kv_len)  # keep = 1 - p on sinks
        visual = step.batch.keys(step.batch.visual, step.kv_len)
        rows = step.query_positions()[None, :] > state["last_visual"][:, None]
        hp = var.hparams
        want, _ = redistribute(probs.clone(), sinks, visual, rows, hp["p"], hp["rho"], hp["visual_mass"])
        got = original(probs, step)
        seen.append(step.q_len)
        assert torch.allclose(got, want, atol=1e-7, rtol=0), (step.offset, (got - want).abs().max())
        return got

    var._redistribute = spy
    with var.bind(adapter):
        _ids(adapter, inputs)
    assert seen.count(1) == GEN["max_new_tokens"] - 1 and max(seen) > 1
