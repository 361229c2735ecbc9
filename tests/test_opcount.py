"""The CPU proxy for GPU cost (bench.opcount) and the proxy targets every method must meet (issue 25).

Targets, per cached decoding step, against ``none`` on the same batch: no host sync beyond none's for VAR, IRI, CCA,
MMA, FastV, FasterVLM, VCD, RITUAL and VHR; ATen ops at most 2x none's (VAR at most 3x). Counted on every family's
4-layer random model with a padded batch of 3 (prefill + cached decoding), so the counts are deterministic.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from bench.opcount import Counting, _Dispatch, _Functions, count_steps, own_sites
from bench.scale import SCALES, count_method
from harness.calls import AdapterCalls
from methods.base import METHODS
from tasks.base import Request

FAMILIES = ("llava", "qwen_vl", "qwen2_5_vl", "internvl")
VAR_TINY = {"sink_dims": [0, 1, 2, 3], "tau": 2.0, "rho": 0.0, "visual_mass": 0.0, "p": 0.5}
GEN = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
#: method -> (hyperparameters, max ops ratio per decoding step); every one: no extra sync per decoding step
TARGETS = {
    "var": (VAR_TINY, 3.0),
    "iri": ({}, 2.0),
    "cca": ({}, 2.0),
    "mma": ({}, 2.0),
    "fastv": ({"ratio": 0.5, "layer": 1}, 2.0),
    "fastervlm": ({"ratio": 0.75}, 2.0),
    "vcd": ({}, 2.0),  # two views in one batched forward: the same kernels on twice the rows
    "ritual": ({}, 2.0),
    "vhr": ({}, 2.0),
}


def _count(expr):
    c = Counting()
    with torch.inference_mode():
        x = torch.arange(6)
        with _Functions(c), _Dispatch(c):
            expr(x)
    return c.current


@pytest.mark.parametrize(
    "expr",
    [
        lambda x: x.sum().item(),
        lambda x: bool(x[1]),
        lambda x: int(x.max()),
        lambda x: float(x[0]),
        lambda x: x.tolist(),
        lambda x: x.numpy(),
        lambda x: x.cpu(),
        lambda x: x.nonzero(),
        lambda x: x[x > 2],
        lambda x: torch.equal(x, x),
        lambda x: torch.unique_consecutive(x),
        lambda x: x.repeat_interleave(x),
        lambda x: torch.masked_select(x, x > 1),
    ],
)
def test_each_host_sync_counts_once(expr):
    t = _count(expr)
    assert t.syncs == 1, dict(t.sync_sites)


def test_device_side_work_is_not_a_sync():
    def work(x):
        y = (x * 2 + 1).float().softmax(-1)
        idx = torch.arange(3, device=x.device)
        y[idx] = 0
        x.repeat_interleave(2, output_size=12)
        return torch.where(x > 2, y, -y).topk(2).indices

    t = _count(work)
    assert t.syncs == 0, dict(t.sync_sites)
    assert t.ops >= 8


def test_views_and_allocations_launch_nothing_and_copies_do():
    def work(x):  # x: int64 [6]
        x.view(2, 3).t()[0]  # views: 3 ops, no launch
        x.reshape(3, 2)  # a view here, no copy
        x.view(2, 3).t().reshape(6)  # not viewable: reshape copies (one launch)
        x.to(torch.int64)  # already int64: returns x itself
        x.to(torch.float32)  # a copy
        torch.empty(4)  # an allocation
        x + 1  # a kernel

    t = _count(work)
    assert t.ops == 11 and t.launches == 3, (t.ops, t.launches)


def test_sync_sites_name_the_calling_line():
    t = _count(lambda x: x.sum().item())
    (site,) = t.sync_sites
    assert site.startswith("aten.item.default @ tests/test_opcount.py:")


@pytest.fixture(scope="module")
def loaded(four_layer):
    return four_layer(seed=5)


def _batch(n=3):
    rng = np.random.default_rng(0)
    texts = ["Is there a star?", "Is there a big red star in the middle of the image? Answer yes or no.", "Count."]
    return [Request(texts[i % 3], [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))]) for i in
            range(n)]  # fmt: skip


def test_count_steps_splits_prefill_and_decoding(loaded):
    adapter = loaded("llava")
    inputs = adapter.build_inputs([adapter.format_prompt(r.text) for r in _batch()], [r.images for r in _batch()])
    with torch.inference_mode(), count_steps(adapter.model) as c:
        adapter.generate_ids(inputs, **GEN)
    assert [t.prefill for t in c.steps] == [True, False, False, False]
    ops = [t.ops for t in c.decode]
    assert max(ops) - min(ops) <= 5 < min(ops)  # cached steps launch (nearly) the same work
    assert c.prefill[0].ops > min(ops)


@pytest.fixture(scope="module")
def none_counts(loaded):
    return {f: count_method(loaded(f), METHODS.get("none")(), _batch(), GEN) for f in FAMILIES}


#: model calls a method adds per generate: VHR's text-only probe (a prefill; decoding steps are unchanged)
EXTRA_CALLS = {"vhr": 1}
#: fastervlm needs a vision [CLS] (LLaVA, InternVL); every other method claims every family
CASES = [(f, n) for f in FAMILIES for n in TARGETS if n != "fastervlm" or f in ("llava", "internvl")]


@pytest.mark.parametrize(("family", "name"), CASES)
def test_method_meets_the_decoding_proxy_targets(loaded, none_counts, family, name, tmp_path):
    adapter = loaded(family)
    kw, max_ratio = TARGETS[name]
    if name == "iri":
        rr = [0.2, 0.8, 0.5, 0.1]
        (tmp_path / "fcct.json").write_text(
            json.dumps({"layers": 4, "rr": {"attn": {"last": rr}, "mlp": {"last": rr}}})
        )
        kw = {"fcct_file": str(tmp_path / "fcct.json"), "sources": 1, "targets": 2}
    method = METHODS.get(name)(**kw)
    got, none = count_method(adapter, method, _batch(), GEN), none_counts[family]
    assert got["calls"] == none["calls"] + EXTRA_CALLS.get(name, 0) and none["calls"] == 4
    assert got["syncs_per_step"] <= none["syncs_per_step"], got["sync_sites"]
    assert own_sites(got["sync_sites"]) == {}  # the harness itself waits on the device nowhere in decoding
    assert got["ops_per_step"] <= max_ratio * none["ops_per_step"]


@pytest.mark.parametrize(("family", "name"), [(f, n) for f, n in CASES if n in ("fastv", "fastervlm")])
def test_pruning_selection_syncs_do_not_grow_with_the_batch(loaded, family, name):
    """On a GPU every host sync in prefill stalls the pipeline; a per-row selection loop pays them per row.

    The project's own syncs in input preparation and prefill (token selection, layout) must be the same for a
    batch of 2 and of 6, and few (the layout's width, the row sizes, the last-token check).
    """
    kw = TARGETS[name][0]
    small, large = (own_sites(count_method(loaded(family), METHODS.get(name)(**kw), _batch(n), GEN)
                              ["prefill_sync_sites"]) for n in (2, 6))  # fmt: skip
    assert small == large
    assert sum(large.values()) <= 8, large


@pytest.mark.parametrize("family", FAMILIES)
def test_vhr_builds_its_text_only_probe_with_one_sync(loaded, family):
    """The probe's rows are the prompts without their visual tokens: one sync for their width, and a scatter
    (boolean-mask indexing synced once per index: 6 in all)."""
    sites = own_sites(count_method(loaded(family), METHODS.get("vhr")(), _batch(), GEN)["prefill_sync_sites"])
    assert sum(v for k, v in sites.items() if "methods/vhr.py" in k) == 1, sites


def test_a_planted_sync_fails_the_target(loaded, monkeypatch):
    """The check can fail: VAR reading its first editable row in every layer at every step (the old code)."""
    from methods.var import VAR

    clean = count_method(loaded("llava"), METHODS.get("var")(**VAR_TINY), _batch(), GEN)
    monkeypatch.setattr(VAR, "_first_row", lambda self, step: max(0, int(step.batch.state[self.name]["last_visual"]
                                                                         .min()) + 1 - step.offset))  # fmt: skip
    planted = count_method(loaded("llava"), METHODS.get("var")(**VAR_TINY), _batch(), GEN)
    assert planted["syncs_per_step"] == clean["syncs_per_step"] + 1  # VAR edits one layer of four
    site = next(k for k in planted["sync_sites"] if "tests/test_opcount.py:" in k)
    assert site.startswith("aten.item.default") and planted["sync_sites"][site] == 3  # once per decoding step


#: ATen ops per cached decoding step that one edited layer (VAR) or one injected target (IRI, its sources' share
#: included) may add over none's.
#: On a 7B decoding step (~1,900 ops, launch-bound) VAR edits 29 of 32 layers and IRI injects into 20 targets, so
#: these budgets put VAR near 1.28x and IRI near 1.10x of none's ops (the H200 timings followed ops at ~0.36x of
#: the excess). Measured on every family: VAR 19 (2026-12-06; 35 before issue 25), 17.5 since the eager layers
#: scale and mask in one kernel and VAR's gain lost its clamp (2026-12-07: 17 per layer and 2 per step for
#: the additive mask); IRI 8.5.
PER_SITE_BUDGET = {"var": 18, "iri": 9}


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_decoding_cost_stays_within_budget(loaded, none_counts, family, tmp_path):
    """VAR on every layer and IRI with 4 targets: the extra ops per edited site, per cached decoding step."""
    adapter = loaded(family)
    rr = [0.2, 0.8, 0.5, 0.1]  # sources: layer 1; targets: layers 2, 3 (attention and MLP: 4 targets)
    (tmp_path / "fcct.json").write_text(json.dumps({"layers": 4, "rr": {"attn": {"last": rr}, "mlp": {"last": rr}}}))
    sites = {"var": (METHODS.get("var")(**VAR_TINY, layers=[0, 1, 2, 3]), 4),
             "iri": (METHODS.get("iri")(fcct_file=str(tmp_path / "fcct.json"), sources=1, targets=2), 4)}  # fmt: skip
    none = none_counts[family]["ops_per_step"]
    for name, (method, n_sites) in sites.items():
        got = count_method(adapter, method, _batch(), GEN)
        per_site = (got["ops_per_step"] - none) / n_sites
        assert 0 < per_site <= PER_SITE_BUDGET[name], (name, per_site)
        assert method.describe()["activity"], name  # the deferred tallies are read back


#: launches per edited site a bf16 model may add over the same site in float32 (casts, which a float32 count
#: cannot see): VAR's eager probabilities go back to bf16 after the edit, as HF's eager attention does; IRI casts
#: only the first source of each part (sums with the float32 running sum promote inside their kernel, norms are
#: told their dtype). Measured 2026-12-07: VAR 1, IRI 0.5 (1.5 before).
BF16_CASTS_PER_SITE = {"var": 1.0, "iri": 0.5}


def test_bfloat16_adds_no_cast_per_site_beyond_the_budget(loaded, tmp_path):
    rr = [0.2, 0.8, 0.5, 0.1]  # as above: per part, source layer 1 and targets 2, 3 (4 target sites in all)
    (tmp_path / "fcct.json").write_text(json.dumps({"layers": 4, "rr": {"attn": {"last": rr}, "mlp": {"last": rr}}}))
    fp32 = loaded("llava")
    bf16 = type(fp32)(name="llava-bf16", path=fp32.path, dtype="bfloat16")
    bf16.load()
    fcct = str(tmp_path / "fcct.json")
    per_site = {}
    for adapter in (fp32, bf16):
        none = count_method(adapter, METHODS.get("none")(), _batch(), GEN)["launches_per_step"]
        for name, method in (("var", METHODS.get("var")(**VAR_TINY, layers=[0, 1, 2, 3])),
                             ("iri", METHODS.get("iri")(fcct_file=fcct, sources=1, targets=2))):  # fmt: skip
            got = count_method(adapter, method, _batch(), GEN)["launches_per_step"]
            per_site.setdefault(name, []).append((got - none) / 4)
    for name, (f32, b16) in per_site.items():
        assert b16 - f32 <= BF16_CASTS_PER_SITE[name], (name, f32, b16)


class _SDPACalls(TorchDispatchMode):
    """Records, for every fused attention call, its query length and whether it was handed a mask."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, bool]] = []  # (query length, mask given)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.scaled_dot_product_attention.default:
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            self.calls.append((args[0].shape[2], mask is not None))
        return func(*args, **kwargs)


def _sdpa_calls(adapter, method, batch):
    """Fused attention calls of one ``generate`` and whether the method edits the prefill mask."""
    with torch.inference_mode(), method.bind(adapter):
        iv = getattr(adapter, "_intervention", None)
        edits_mask = bool(iv and iv.mask_fns)
        calls = AdapterCalls(adapter, len(batch), method)
        with _SDPACalls() as rec:
            calls.generate(batch, **GEN)
    return rec.calls, edits_mask


@pytest.mark.parametrize(("family", "name"), [(f, n) for f, n in CASES if n in ("var", "iri", "cca", "mma", "fastv",
                                                                             "fastervlm")])  # fmt: skip
def test_untouched_layers_run_the_baselines_causal_kernel(loaded, family, name, tmp_path):
    """With no padded row SDPA's mask function skips the mask and the unmodified model runs the causal kernel
    (FlashAttention on a GPU). An attached method must not materialise it for the layers it leaves alone: a fused
    call over the whole prompt carries a mask only when the method edits the prefill mask (CCA, MMA), the layers
    a pruning method shortened keep the causal kernel (their layout has no padded slot), and no decoding step's
    fused call carries a mask.
    """
    adapter = loaded(family)
    kw = TARGETS[name][0]
    if name == "iri":
        rr = [0.2, 0.8, 0.5, 0.1]
        (tmp_path / "fcct.json").write_text(
            json.dumps({"layers": 4, "rr": {"attn": {"last": rr}, "mlp": {"last": rr}}})
        )
        kw = {"fcct_file": str(tmp_path / "fcct.json"), "sources": 1, "targets": 2}
    one = _batch(1)
    base, _ = _sdpa_calls(adapter, METHODS.get("none")(), one)
    assert base and not any(masked for _q, masked in base)  # the baseline's kernel: causal, no mask in hand
    got, edits_mask = _sdpa_calls(adapter, METHODS.get(name)(**kw), one)
    inputs = adapter.build_inputs([adapter.format_prompt(r.text) for r in one], [r.images for r in one])
    prompt = inputs["input_ids"].shape[1]  # the LM's prefill query length
    decode = [masked for q, masked in got if q == 1]
    assert decode and not any(decode), f"{name} handed a decoding step's fused layer a mask"
    if name in ("fastv", "fastervlm"):  # every fused prefill call, the pruned layers' shorter ones included
        pruned = [masked for q, masked in got if 1 < q < prompt]
        assert pruned and not any(pruned), f"{name} handed a pruned layer a mask"
        return
    whole = [masked for q, masked in got if q == prompt]
    assert whole == [edits_mask] * len(whole) and whole, f"{name}: prefill masks {whole}, edits the mask: {edits_mask}"


@pytest.fixture(scope="module")
def by_depth(tmp_path_factory):
    """``get(family, layers)``: a random tiny model of ``family`` with ``layers`` LM layers (bench.scale's maker)."""
    from bench.scale import build_adapter

    made = {}

    def get(family, layers):
        if (family, layers) not in made:
            work = tmp_path_factory.mktemp(f"{family}-{layers}")
            made[family, layers] = build_adapter(family, "tiny", "cpu", "float32", work, lm_layers=layers)
        return made[family, layers]

    return get


@pytest.mark.parametrize(("family", "name"), [(f, n) for f, n in CASES if n in ("fastv", "fastervlm") and f in SCALES])
def test_pruned_prefill_costs_nothing_per_layer(by_depth, family, name):
    """A pruned layout's mask, RoPE and positions are built once and reused by every layer after the drop: the
    prefill ops a pruning method adds over none's are the same at 3 and 7 LM layers (they grew by ~4 per layer
    when each layer gathered its own positions)."""
    kw = TARGETS[name][0]
    excess = []
    for layers in (3, 7):
        adapter = by_depth(family, layers)
        none = count_method(adapter, METHODS.get("none")(), _batch(), GEN)
        got = count_method(adapter, METHODS.get(name)(**kw), _batch(), GEN)
        excess.append(got["prefill_ops"] - none["prefill_ops"])
    # the method ran (on transformers < 5.19 FasterVLM's prefill costs fewer ops than none's: the image encoding it
    # scored with stands in for the model's own, adapters/hf_compat.py)
    assert excess[0] != 0
    assert excess[1] == excess[0], excess
