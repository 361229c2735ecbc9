"""Method base: binding, hook removal on exit (also on error), compatibility check before load."""

from __future__ import annotations

from typing import ClassVar

import pytest
from PIL import Image

from adapters.generation import model_inputs
from adapters.llava import LlavaAdapter
from methods.base import METHODS, Method, UnsupportedError


class _CountingMethod(Method):
    name: ClassVar[str] = "counting"

    def install(self) -> None:
        self.calls = 0

        def hook(module, args):
            self.calls += 1

        self.add_hook(self.adapter.site("lm.layers.0").register_forward_pre_hook(hook))
        self.enter_context(self.adapter.lm_attention("eager"))


class _OnlyQwen(Method):
    name: ClassVar[str] = "only_qwen"
    families: ClassVar[tuple[str, ...]] = ("qwen2_vl",)


def _n_hooks(adapter):
    return len(adapter.site("lm.layers.0")._forward_pre_hooks)


def test_hooks_installed_inside_and_removed_after(llava):
    m = _CountingMethod()
    before = _n_hooks(llava)
    with m.bind(llava):
        assert _n_hooks(llava) == before + 1
        assert llava.model.config.get_text_config()._attn_implementation == "eager"
        inputs = llava.build_inputs([llava.format_prompt("hi")], [[Image.new("RGB", (64, 64))]])
        llava.model(**model_inputs(inputs))
        assert m.calls == 1
    assert _n_hooks(llava) == before
    assert llava.model.config.get_text_config()._attn_implementation == "sdpa"


def test_hooks_removed_on_error(llava):
    before = _n_hooks(llava)
    with pytest.raises(ZeroDivisionError), _CountingMethod().bind(llava):
        1 / 0  # noqa: B018
    assert _n_hooks(llava) == before


def test_unresolvable_site_raises_and_leaves_nothing_behind(llava):
    class Bad(Method):
        name: ClassVar[str] = "bad"

        def install(self):
            self.add_hook(self.adapter.site("lm.layers.0").register_forward_pre_hook(lambda m, a: None))
            self.adapter.site("lm.layers.99.attn")

    before = _n_hooks(llava)
    with pytest.raises(LookupError, match=r"lm\.layers\.99"), Bad().bind(llava):
        pass
    assert _n_hooks(llava) == before


def test_unsupported_family_fails_before_load(tiny_llava_dir):
    adapter = LlavaAdapter(name="llava", path=str(tiny_llava_dir))
    with pytest.raises(UnsupportedError, match="supports: qwen2_vl"):
        _OnlyQwen().check(adapter)
    assert adapter.model is None


def test_registry_did_you_mean():
    import methods  # noqa: F401

    assert METHODS.get("none").name == "none"
    with pytest.raises(KeyError, match="did you mean 'none'"):
        METHODS.get("nome")


def test_eager_attention_groups_queries_instead_of_copying_kv():
    """The eager path (probability callbacks) equals repeat_kv attention on a GQA layer without copying K/V."""
    import torch
    from torch import nn
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers.integrations.sdpa_attention import repeat_kv

    from methods.intervention import Intervention, Step

    g = torch.Generator().manual_seed(0)
    b, heads, kv_heads, q, k, hd = 2, 8, 2, 3, 40, 16
    query, key, value = (torch.randn(b, n, length, hd, generator=g) for n, length in
                         ((heads, q), (kv_heads, k), (kv_heads, k)))  # fmt: skip
    mask = torch.ones(b, 1, q, k, dtype=torch.bool).tril(k - q)
    mask[0, ..., :5] = False  # left padding in row 0
    seen = []

    def record(probs, step):
        seen.append(probs.clone())
        return probs

    sizes = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes.extend(t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    step = Step(0, k - q, q, k, None)
    bias = torch.full(mask.shape, torch.finfo(torch.float32).min).masked_fill(mask, 0.0)  # the additive mask
    with Sizes():
        out, _ = Intervention._eager(nn.Identity().eval(), query, key, value, bias, hd**-0.5, 0.0, step, [],
                                     [(None, record, None)])  # fmt: skip
    rk, rv = repeat_kv(key, heads // kv_heads), repeat_kv(value, heads // kv_heads)
    ref = (query @ rk.transpose(2, 3) * hd**-0.5).masked_fill(~mask, torch.finfo(torch.float32).min).softmax(-1)
    torch.testing.assert_close(seen[0], ref)
    torch.testing.assert_close(out, (ref @ rv).transpose(1, 2))
    assert max(sizes) < b * heads * k * hd  # no op wrote a repeated K or V


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scaling_into_the_additive_mask_gives_the_masked_scores_exactly(dtype):
    """The eager layers scale and mask in one kernel, ``bias + scaling·raw``: bit for bit ``where(mask, raw·scaling,
    min)``, the two-kernel form (the masked entries round to the minimum)."""
    import torch

    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    raw = (torch.randn(2, 4, 3, 40, generator=g) * 300).to(dtype)  # [batch, heads, q, k]
    mask = torch.ones(2, 1, 3, 40, dtype=torch.bool).tril(37)
    mask[0, ..., :7] = False
    low = torch.finfo(dtype).min
    bias = torch.full(mask.shape, low, dtype=dtype).masked_fill(mask, 0.0)
    assert torch.equal(torch.add(bias, raw, alpha=0.125), torch.where(mask, raw * 0.125, low))


def test_device_tally_defers_the_sums_and_launches_nothing_per_add(monkeypatch):
    """``add`` keeps references (no kernel in a decoding step); the sums come out exact, in float64, when read."""
    import torch

    from bench.opcount import Counting, _Dispatch
    from methods.base import DeviceTally

    monkeypatch.setattr(DeviceTally, "FLUSH_AT", 5)  # a flush in the middle, pending tensors after it
    tally = DeviceTally(3)
    values = [
        (torch.tensor([[True, False, True]]), torch.arange(4), torch.full((2, 1), 0.25)),
        (torch.tensor(True), torch.tensor(7), torch.tensor(1e-9, dtype=torch.float32)),
        (torch.ones(2, 3, dtype=torch.bool), torch.tensor([1, 2]), torch.tensor([0.5])),
    ]
    c = Counting()
    with torch.inference_mode():
        with _Dispatch(c):
            tally.add(0, *values[0][:1])
            tally.add(1, *values[0][1:])
        assert c.current.ops == 0  # nothing launched before the flush
        for vs in values[1:]:
            tally.add(0, *vs)  # three sums at once: slots 0, 1, 2
    want = [sum(float(vs[i].double().sum()) for vs in values) for i in range(3)]
    assert tally.tolist() == pytest.approx(want, rel=1e-15)
    assert tally.tolist() == pytest.approx(want, rel=1e-15)  # reading twice adds nothing


def test_device_tally_ratios_divide_at_flush_exactly_as_per_row(monkeypatch):
    """``add_ratio`` defers the division too: the same float32 quotients as dividing row by row, summed in float64."""
    import torch

    from bench.opcount import Counting, _Dispatch
    from methods.base import DeviceTally

    monkeypatch.setattr(DeviceTally, "FLUSH_AT", 6)
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.rand(3, 1, generator=gen), torch.rand(3, 1, generator=gen) + 0.1) for _ in range(4)]
    pairs.append((torch.tensor([[2e-13]]), torch.tensor([[0.0]])))  # a zero norm: divided by the 1e-12 floor
    tally, plain = DeviceTally(2), torch.tensor([1.5])
    c = Counting()
    with torch.inference_mode():
        with _Dispatch(c):
            tally.add_ratio(1, *pairs[0])
            tally.add(1, plain)  # plain values and ratios share a slot
        assert c.current.ops == 0
        for num, den in pairs[1:]:
            tally.add_ratio(1, num, den)
    want = sum(float((n / d.clamp_min(1e-12)).double().sum()) for n, d in pairs) + 1.5
    assert tally.tolist() == pytest.approx([0.0, want], rel=1e-15)
    assert tally.tolist()[1] == pytest.approx(want, rel=1e-15)
