"""IRI and its FCCT calibration: recovery at the extremes, token categories, injection sites, norms, batching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from methods.base import UnsupportedError
from methods.fcct import CATEGORIES, Probe, recovery, token_categories, trace_batch
from methods.iri import IRI, choose_layers, inject

FAMILIES = ("llava", "qwen_vl", "internvl")  # conftest's 4-layer random models
RR_ATTN = [0.9, 0.1, 0.5, 0.3]  # sources (k1=1): layer 0; targets (k2=2): layers 2, 3
RR_MLP = [0.2, 0.7, 0.6, 0.1]  # sources: layer 1; targets: layers 2, 3


@pytest.fixture(scope="module")
def loaded(four_layer):
    return four_layer(seed=5)


def _img(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _probes() -> list[Probe]:
    return [Probe(_img(1), "circle", (0, 0, 16, 16)),
            Probe(_img(2), "star", (40, 24, 60, 50), text="Look closely: is there a star here?")]  # fmt: skip


# ---------------------------------------------------------------------------------------------- FCCT
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tracing_recovers_fully_when_everything_is_restored_and_nothing_when_nothing_is(loaded, family):
    adapter = loaded(family)
    answer = adapter.answer_token_id("Yes")
    out = trace_batch(adapter, _probes(), answer, noise=3.0, seed=0, categories=("all", "none", "last"))
    clean, corrupted, patched = out["clean"], out["corrupted"], out["patched"]
    assert ((clean - corrupted).abs() / clean).min() > 0.01  # the corruption matters, so the checks can fail
    for layer in range(adapter.num_layers("lm")):
        # the whole hidden state restored entering any layer: the rest of the forward is the clean one
        torch.testing.assert_close(patched["hidden"]["all"][layer], clean, atol=0, rtol=1e-4)
        for comp in ("hidden", "attn", "mlp"):
            torch.testing.assert_close(patched[comp]["none"][layer], corrupted, atol=0, rtol=0)
    # restoring one sub-layer's output alone leaves the (corrupted) residual stream: not a full recovery
    assert ((patched["attn"]["all"][0] - clean).abs() / clean).max() > 1e-3
    rr = recovery([out], min_gap=0.0)["rr"]
    assert rr["hidden"]["all"] == pytest.approx([1.0] * 4, abs=1e-3)
    assert rr["attn"]["none"] == [0.0] * 4


def test_token_categories_follow_the_box_and_the_question(loaded):
    adapter = loaded("llava")
    probes = _probes()
    prompts = [adapter.format_prompt(p.question) for p in probes]
    inputs = adapter.build_inputs(prompts, [[p.image] for p in probes])
    cats = token_categories(adapter, inputs, probes)
    ids, tok = inputs["input_ids"], adapter.processor.tokenizer
    visual = adapter.image_token_mask(inputs)
    vmap = adapter.visual_token_map(inputs)[0]  # (image, tile, row, col); 8x8 grid of 8-pixel cells on 64x64
    obj_cells = {tuple(rc) for rc in vmap[cats["object_visual"][0][visual[0]]][:, 2:].tolist()}
    assert obj_cells == {(0, 0), (0, 1), (1, 0), (1, 1)}  # box (0, 0, 16, 16) covers exactly four cells
    for b, word in enumerate(("circle", "star")):
        assert tok.decode(ids[b][cats["text_object"][b]]).strip() == word
        assert cats["last"][b].nonzero().flatten().tolist() == [ids.shape[1] - 1]
        stack = torch.stack([cats[c][b] for c in CATEGORIES]).int()
        assert stack.sum(0).max() == 1  # categories are disjoint
        assert not (stack.sum(0).bool() & ~inputs["attention_mask"][b].bool()).any()  # never padding
        assert (cats["early_visual"][b] | cats["object_visual"][b] | cats["late_visual"][b]).sum() <= visual[b].sum()
    # row 1's object (x 40..60, y 24..50) sits in grid rows 3..6 and columns 5..7
    rows = vmap[cats["object_visual"][1][visual[1]]][:, 2]
    assert rows.min() == 3 and rows.max() == 6


# ---------------------------------------------------------------------------------------------- IRI
def test_layer_choice_and_the_injection_equation():
    assert choose_layers([0.1, 0.9, 0.5, 0.8], 1, 2) == ([1], [2, 3])  # the last layer cannot be a source
    assert choose_layers([0.9, 0.1], 1, 1) == ([0], [1])
    a = torch.tensor([[3.0, 4.0]])
    src = {0: torch.tensor([[1.0, 0.0]]), 5: torch.tensor([[0.0, 9.0]])}
    out = inject(a, src, {0: 0.5, 5: 1.0}, layer=2, lam=2.0, renorm=False)  # only k < 2 contributes
    torch.testing.assert_close(out, torch.tensor([[4.0, 4.0]]))
    normed = inject(a, src, {0: 0.5, 5: 1.0}, layer=2, lam=2.0, renorm=True)
    torch.testing.assert_close(normed.norm(), torch.tensor(5.0))
    torch.testing.assert_close(normed / normed.norm(), out / out.norm())


def _calibrate(tmp_path, layers: int = 4):
    cal = {"layers": layers, "rr": {"attn": {"last": RR_ATTN}, "mlp": {"last": RR_MLP}}}
    path = tmp_path / "fcct.json"
    path.write_text(json.dumps(cal))
    return str(path)


def _capture(adapter, part: str, store: dict):
    """Forward hooks that append every call's ``[batch, seq, d]`` output of ``part`` at each LM layer."""
    handles = []
    for layer in range(adapter.num_layers("lm")):

        def hook(_m, _a, out, layer=layer):
            store.setdefault(layer, []).append((out[0] if isinstance(out, tuple) else out).detach().clone())

        handles.append(adapter.site(f"lm.layers.{layer}.{part}").register_forward_hook(hook))
    return handles


@pytest.mark.parametrize("family", list(FAMILIES))
def test_injection_changes_only_target_layers_last_position_and_keeps_norms(loaded, family, tmp_path):
    _check_injection(loaded(family), tmp_path)


def test_injection_in_bfloat16_follows_the_equation(loaded, tmp_path):
    """In bf16 (a GPU run's dtype) the sums and norms still run in float32, without a cast kernel per site."""
    fp32 = loaded("llava")
    adapter = type(fp32)(name="llava-bf16", path=fp32.path, dtype="bfloat16")
    adapter.load()
    _check_injection(adapter, tmp_path)


def _check_injection(adapter, tmp_path):
    method = IRI(sources=1, targets=2, lambda_attn=0.5, lambda_mlp=0.4, fcct_file=_calibrate(tmp_path))
    method.check(adapter)
    prompts = [adapter.format_prompt("Is there a big red circle in the image?"), adapter.format_prompt("Count.")]
    inputs = adapter.build_inputs(prompts, [[_img(3)], [_img(4)]])
    assert (inputs["attention_mask"] == 0).any()  # left padding present
    for part, rr, lam, src, targets in (("attn", RR_ATTN, 0.5, 0, (2, 3)), ("mlp", RR_MLP, 0.4, 1, (2, 3))):
        pre, post = {}, {}
        handles = _capture(adapter, part, pre)  # registered before IRI's hooks: sees the original outputs
        try:
            with torch.inference_mode(), method.bind(adapter):
                handles += _capture(adapter, part, post)  # registered after: sees what the residual receives
                adapter.generate_ids(inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        finally:
            for h in handles:
                h.remove()
        assert method.plan[part]["sources"] == [src] and method.plan[part]["targets"] == list(targets)
        for layer in range(4):
            assert len(pre[layer]) == len(post[layer]) == 3  # prefill + 2 cached decoding steps
            for before, after in zip(pre[layer], post[layer], strict=True):
                diff = (after - before).abs().amax(-1)  # [batch, seq]
                if layer not in targets:
                    assert diff.max() == 0
                    continue
                assert (diff[:, :-1] == 0).all() and (diff[:, -1] > 0).all()  # only the last position
                torch.testing.assert_close(after[:, -1].norm(dim=-1), before[:, -1].norm(dim=-1))
        for call in range(3):  # the equation, from the same call's source output
            a, s = pre[targets[0]][call][:, -1], pre[src][call][:, -1]
            expected = inject(a, {src: s}, {src: rr[src]}, targets[0], lam, renorm=True)
            torch.testing.assert_close(post[targets[0]][call][:, -1], expected.to(a.dtype))


def test_activity_reports_every_injection_and_the_change_at_the_prompt_end(loaded, tmp_path):
    """``injections`` counts target rows of every forward; the relative change is the prefill's, as measured here."""
    adapter = loaded("llava")
    method = IRI(sources=1, targets=2, lambda_attn=0.5, lambda_mlp=0.4, fcct_file=_calibrate(tmp_path))
    method.check(adapter)
    prompts = [adapter.format_prompt("Is there a big red circle in the image?"), adapter.format_prompt("Count.")]
    inputs = adapter.build_inputs(prompts, [[_img(3)], [_img(4)]])
    pre, post = {"attn": {}, "mlp": {}}, {"attn": {}, "mlp": {}}
    handles = [h for part in pre for h in _capture(adapter, part, pre[part])]
    try:
        with torch.inference_mode(), method.bind(adapter):
            handles += [h for part in post for h in _capture(adapter, part, post[part])]
            adapter.generate_ids(inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    changes = [((post[p][t][0][:, -1] - pre[p][t][0][:, -1]).norm(dim=-1) / pre[p][t][0][:, -1].norm(dim=-1))
               for p in pre for t in method.plan[p]["targets"]]  # fmt: skip
    activity = method.describe()["activity"]
    assert activity["injections"] == 2 * 2 * 2 * 3  # parts x targets x rows x forwards (prefill + 2 steps)
    expected = torch.cat(changes).mean().item()
    assert expected > 0.01 and activity["mean_relative_change_at_prompt_end"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_padded_generation_equals_one_row_at_a_time(loaded, family, tmp_path):
    adapter = loaded(family)
    method = IRI(sources=1, targets=2, lambda_attn=3.0, lambda_mlp=3.0, fcct_file=_calibrate(tmp_path))
    method.check(adapter)
    rows = [("Is there a big red circle in the image?", _img(5)), ("Count.", _img(6))]
    gen = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    with torch.inference_mode(), method.bind(adapter):
        prompts = [adapter.format_prompt(t) for t, _ in rows]
        batched = adapter.generate_ids(adapter.build_inputs(prompts, [[im] for _, im in rows]), **gen)
        single = [adapter.generate_ids(adapter.build_inputs([p], [[im]]), **gen)[0]
                  for p, (_, im) in zip(prompts, rows, strict=True)]  # fmt: skip
    plain = adapter.generate_ids(adapter.build_inputs(prompts, [[im] for _, im in rows]), **gen)
    assert [r.tolist() for r in batched] == [r.tolist() for r in single]
    assert method.describe()["activity"]["injections"] > 0
    assert not torch.equal(plain, batched)  # λ = 3 moves the greedy tokens, so the comparison above is not vacuous


def test_missing_or_mismatched_calibration_fails_with_the_command(loaded, tmp_path):
    adapter = loaded("llava")
    with pytest.raises(UnsupportedError, match=r"python -m methods\.calibrate fcct"):
        IRI(fcct_file=None).check(type(adapter)(name="x", path=str(tmp_path), device="cpu"))
    method = IRI(fcct_file=_calibrate(tmp_path, layers=7))
    with pytest.raises(UnsupportedError, match=r"7-layer LM; this one has 4: trace this checkpoint"):
        method.check(adapter)  # the depth is the loaded model's here, the config's before loading (test_user_errors)
    with pytest.raises(ValueError, match="components"):
        IRI(components=["resid"])
