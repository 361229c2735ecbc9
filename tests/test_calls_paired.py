"""Model calls a task can make (batched generation, text-only calls, first-token log-probabilities) and the
paired statistics of a method run against its baseline (checked against SciPy)."""

from __future__ import annotations

import json
import math
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats as sps

from core.paired import compare, mcnemar
from core.stats import Outcomes, safe_divide
from harness.calls import AdapterCalls
from harness.paired import find_baseline
from tasks.base import Request, Task


def image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------- calls
def test_answer_logprobs_equal_a_manual_forward_pass(llava):
    calls = AdapterCalls(llava, batch_size=3)
    requests = [
        Request("Is there a circle?", [image(0)]),
        Request("Is there a red square in the picture, and is it large?", [image(1)]),  # longer: left padding
        Request("Yes or no?", []),  # text-only rows run in their own batch
    ]
    scored = calls.answer_logprobs(requests, ["Yes", "No"])
    tok = llava.processor.tokenizer
    ids = {a: llava.answer_token_id(a) for a in ("Yes", "No")}
    assert tok.decode([ids["Yes"]]) == " Yes"  # LLaVA-1.5: "ASSISTANT: Yes"
    for req, got in zip(requests, scored, strict=True):
        prompt = llava.format_prompt(req.text, n_images=len(req.images))
        assert got.prompt == prompt
        inputs = llava.processor(text=[prompt], images=req.images or None, return_tensors="pt")
        with torch.no_grad():
            logits = llava.model(**inputs).logits[0, -1].float()  # [vocab], one unpadded row
        ref = torch.log_softmax(logits, dim=-1)
        for answer, token in ids.items():
            assert got.logprobs[answer] == pytest.approx(float(ref[token]), abs=1e-4)


def test_generate_mixes_text_only_and_image_requests_in_order(llava):
    calls = AdapterCalls(llava, batch_size=2)
    reqs = [Request("a?", [image(0)]), Request("b?", []), Request("c?", [image(1)]), Request("d?", [])]
    out = calls.generate(reqs, max_new_tokens=3, do_sample=False)
    assert [c.n_images for c in out] == [1, 0, 1, 0]
    alone = [calls.generate([r], max_new_tokens=3, do_sample=False)[0] for r in reqs]
    assert [c.output for c in out] == [c.output for c in alone]
    assert [c.prompt for c in out] == [llava.format_prompt(r.text, len(r.images)) for r in reqs]


@pytest.mark.parametrize("method_name", ["var", "cca", "mma"])
def test_methods_accept_text_only_calls(llava, method_name):
    """A multi-call pipeline's text-only call runs under the method; with no image the methods change nothing."""
    from methods.base import METHODS

    kwargs = {"var": {"sink_dims": [0]}}.get(method_name, {})
    method = METHODS.get(method_name)(**kwargs)
    calls = AdapterCalls(llava, batch_size=4)
    reqs = [Request("Describe the shapes.", []), Request("Count them, please.", [])]
    base = calls.generate(reqs, max_new_tokens=4, do_sample=False)
    base_lp = calls.answer_logprobs(reqs, ["Yes", "No"])
    with torch.inference_mode(), method.bind(llava):
        got = calls.generate(reqs, max_new_tokens=4, do_sample=False)
        got_lp = calls.answer_logprobs(reqs, ["Yes", "No"])
    assert [c.output for c in got] == [c.output for c in base]
    for a, b in zip(got_lp, base_lp, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


# ----------------------------------------------------------------------------------------------- McNemar
#: (b, c) -> (exact two-sided p, continuity-corrected chi-square, its p), worked by hand: the exact p is
#: 2 * sum_{i <= min(b, c)} C(b + c, i) / 2^(b + c); the chi-square p is erfc(sqrt(stat / 2))
MCNEMAR_BY_HAND = {
    (0, 0): (1.0, 0.0, 1.0),
    (10, 2): (2 * (1 + 12 + 66) / 4096, 49 / 12, math.erfc(math.sqrt(49 / 24))),  # 0.03857, 4.0833, 0.04331
    (3, 9): (2 * (1 + 12 + 66 + 220) / 4096, 25 / 12, math.erfc(math.sqrt(25 / 24))),
    (10, 10): (1.0, 0.0, 1.0),  # min(1, 2 * P(X <= 10)) = 1; |b - c| - 1 < 0 is floored at 0
    (1, 12): (2 * (1 + 13) / 8192, 100 / 13, math.erfc(math.sqrt(50 / 13))),
}


@pytest.mark.parametrize(("b", "c"), list(MCNEMAR_BY_HAND))
def test_mcnemar_against_hand_computed_values(b, c):
    base = np.array([1] * b + [0] * c + [1] * 7 + [0] * 5)
    meth = np.array([0] * b + [1] * c + [1] * 7 + [0] * 5)
    res = mcnemar(base, meth)
    assert (res["baseline_only_right"], res["method_only_right"], res["both_right"], res["both_wrong"]) == (b, c, 7, 5)
    exact, stat, p = MCNEMAR_BY_HAND[(b, c)]
    assert res["p_value_exact"] == pytest.approx(exact, rel=1e-9)
    assert res["statistic"] == pytest.approx(stat, rel=1e-12)
    assert res["p_value"] == pytest.approx(p, rel=1e-9)


def test_mcnemar_is_symmetric_and_large_counts_stay_finite():
    def run(b, c):
        return mcnemar(np.array([1] * b + [0] * c), np.array([0] * b + [1] * c))

    for b, c in [(40, 19), (250, 300), (5000, 5100)]:
        one, other = run(b, c), run(c, b)
        assert one["p_value_exact"] == pytest.approx(other["p_value_exact"]) and 0 < one["p_value_exact"] <= 1
        assert one["p_value"] == pytest.approx(other["p_value"])


# ----------------------------------------------------------------------------------------------- paired bootstrap
class Binary(Task):
    """A minimal task over records with a 0/1 ``correct`` field (accuracy)."""

    name = "binary"
    version = "0"
    higher_is_better: ClassVar[dict[str, bool]] = {"acc": True}
    headline = ("binary", "acc,none")

    def samples(self):
        return []

    def score(self, sample, response):
        return {}

    def outcomes(self, records):
        counts = np.array([[1.0, float(r["correct"])] for r in records])  # [n, 2]
        return Outcomes(
            counts=counts,
            stat_fn=lambda s: safe_divide(s[..., 1:2], s[..., 0:1], np.nan),
            names=[("binary", "acc,none")],
            sizes={"binary": len(records)},
            binary=counts[:, 1],
            binary_name="correct,none",
        )


def records(correct, images=None) -> list[dict]:
    images = images if images is not None else [f"im{i}" for i in range(len(correct))]
    return [
        {"sample_id": str(i), "index": i, "image_id": im, "correct": int(c), "doc_hash": f"d{i}", "target_hash": "t"}
        for i, (c, im) in enumerate(zip(correct, images, strict=True))
    ]


def test_paired_ci_matches_scipy_paired_bootstrap():
    rng = np.random.default_rng(0)
    base = rng.random(300) < 0.6
    meth = np.where(rng.random(300) < 0.8, base, ~base) | (rng.random(300) < 0.1)
    out = compare(Binary(n_boot=4000), records(meth), records(base), seed=1)
    m = out["metrics"]["binary"]["acc,none"]
    assert m["method"] == pytest.approx(meth.mean()) and m["baseline"] == pytest.approx(base.mean())
    assert m["diff"] == pytest.approx(meth.mean() - base.mean())
    ref = sps.bootstrap(
        (meth.astype(float), base.astype(float)),
        lambda x, y, axis=-1: x.mean(axis=axis) - y.mean(axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=4000,
        method="percentile",
        random_state=np.random.default_rng(2),
    )
    # Monte Carlo agreement of two independent 4000-draw bootstraps of the same statistic
    assert m["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=0.012)
    assert m["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=0.012)
    assert m["diff_stderr"] == pytest.approx(ref.standard_error, rel=0.08)
    assert out["mcnemar"]["p_value_exact"] == pytest.approx(
        sps.binomtest(int((base & ~meth).sum()), int((base ^ meth).sum()), 0.5).pvalue
    )


def test_bootstrap_p_value_agrees_with_the_normal_approximation_and_is_one_at_zero():
    rng = np.random.default_rng(4)
    base = rng.random(400) < 0.6
    meth = np.where(rng.random(400) < 0.85, base, ~base) | (rng.random(400) < 0.08)
    m = compare(Binary(n_boot=4000), records(meth), records(base), seed=2)["metrics"]["binary"]["acc,none"]
    normal = 2 * sps.norm.sf(abs(m["diff"]) / m["diff_stderr"])
    assert 0 < m["p_value"] < 1 and m["p_value"] == pytest.approx(normal, abs=0.02)
    same = compare(Binary(n_boot=200), records(base), records(base))["metrics"]["binary"]["acc,none"]
    assert same["diff"] == 0 and same["p_value"] == 1.0
    far = compare(Binary(n_boot=200), records(np.ones(100, bool)), records(np.zeros(100, bool)))
    assert far["metrics"]["binary"]["acc,none"]["p_value"] == pytest.approx(2 / 201)  # every draw above zero


def test_paired_bootstrap_resamples_images_not_questions():
    """Questions about one image move together: with perfectly correlated pairs of questions the clustered
    standard error is larger than the one that treats the 2n questions as independent."""
    rng = np.random.default_rng(3)
    per_image = rng.random(150) < 0.5
    meth, base = np.repeat(per_image, 2), np.zeros(300, bool)
    clustered = compare(Binary(n_boot=3000), records(meth, [f"im{i // 2}" for i in range(300)]), records(base))
    independent = compare(Binary(n_boot=3000), records(meth), records(base))
    se_c = clustered["metrics"]["binary"]["acc,none"]["diff_stderr"]
    se_i = independent["metrics"]["binary"]["acc,none"]["diff_stderr"]
    assert clustered["n_clusters"] == 150 and independent["n_clusters"] == 300
    assert se_c / se_i == pytest.approx(np.sqrt(2), rel=0.12)


def test_pairing_refuses_different_data_and_reports_unpaired():
    base = records([1, 0, 1, 1])
    meth = records([1, 1, 1])  # one sample fewer
    out = compare(Binary(n_boot=10), meth, base)
    assert out["n_paired"] == 3 and out["n_unpaired"] == 1
    bad = [{**r, "doc_hash": "other"} if r["sample_id"] == "1" else r for r in meth]
    with pytest.raises(ValueError, match="did not evaluate the same data"):
        compare(Binary(n_boot=10), bad, base)


def test_find_baseline_by_pair_hash(tmp_path):
    for name, pair in (("none-aaa", "p1"), ("none-bbb", "p2"), ("var-ccc", "p1")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"pair_hash": pair}))
    assert find_baseline(tmp_path / "var-ccc", "p1") == (tmp_path / "none-aaa").resolve()
    assert find_baseline(tmp_path / "var-ccc", "p3") is None


def test_find_baseline_prefers_the_same_items(tmp_path):
    """A limited baseline (``none-aaa-limit2``) and the full one share the pair hash; the items decide."""
    import os

    for i, (name, items) in enumerate((("none-aaa-limit2", "small"), ("none-aaa", "full"))):
        (tmp_path / name).mkdir()
        path = tmp_path / name / "results.json"
        path.write_text(json.dumps({"pair_hash": "p1", "sample_set": {"sha256": items}}))
        os.utime(path, (1000 + i, 1000 + i))  # the full run is the newer one
    assert find_baseline(tmp_path / "var-ccc-limit2", "p1", "small") == (tmp_path / "none-aaa-limit2").resolve()
    assert find_baseline(tmp_path / "var-ccc", "p1", "full") == (tmp_path / "none-aaa").resolve()
    assert find_baseline(tmp_path / "var-ccc", "p1") == (tmp_path / "none-aaa").resolve()
