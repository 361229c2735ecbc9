"""Attention debiasing for token pruners: trend fits, positional debias, padding/sink suppression, storage."""

from __future__ import annotations

import json
import math

import pytest
import torch

from methods.debias import (
    FAMILIES,
    PositionalTrend,
    debias_scores,
    effective_budget,
    fit_trend,
    load_trend,
    save_trend,
    trend_key,
)

L, MU, SIGMA, K = 64, 0.02, 2.5, 16
FASTV_CUBIC = [1.0, 1.734, -4.826, 4.884]  # released FastV 1/w, f(1) = 2.792


def _bias(n: int) -> torch.Tensor:
    return MU * torch.exp(SIGMA * torch.linspace(0, 1, n, dtype=torch.float64))  # [n]


def _topk(scores: torch.Tensor, k: int = K) -> set[int]:
    return set(scores.topk(k).indices.tolist())


def test_exp_fit_recovers_planted_recency_and_restores_ranking():
    g = torch.Generator().manual_seed(0)
    content = torch.rand(400, L, generator=g, dtype=torch.float64) + 0.1  # [images, L] content-agnostic
    noise = 1.0 + 0.1 * torch.randn(400, L, generator=g, dtype=torch.float64)
    observed = content * _bias(L) * noise  # [images, L]
    trend = fit_trend(observed.mean(0), "exp", pruner="fastv", n_images=400)
    _, sigma = trend.params
    assert abs(sigma - SIGMA) / SIGMA < 0.1, trend.params
    assert trend.r2 > 0.95
    assert trend.meta == {"pruner": "fastv", "n_images": 400, "n_positions": L}

    # held-out image: 16 strong content tokens planted among the first 40 positions, weak ones elsewhere
    t = 0.2 + 0.8 * torch.rand(L, generator=g, dtype=torch.float64)  # [L] in [0.2, 1.0]
    strong = torch.randperm(40, generator=g)[:K]
    t[strong] = 1.5 + torch.rand(K, generator=g, dtype=torch.float64)  # [K] in [1.5, 2.5]
    raw = (t * _bias(L)).float()  # [L]
    debiased = debias_scores(raw, trend)
    assert debiased.dtype == torch.float32 and debiased.shape == (L,)
    assert _topk(debiased) == _topk(t) == set(strong.tolist())
    assert len(_topk(raw) & _topk(t)) <= K // 2  # the bias hides the planted tokens without debiasing


def test_exp_fit_is_exact_on_noise_free_curve_and_refines_beyond_log_space():
    trend = fit_trend(_bias(50), "exp")
    assert trend.params == pytest.approx([MU, SIGMA], rel=1e-6)
    assert trend.r2 == pytest.approx(1.0, abs=1e-9)
    # additive noise: the linear-space refinement must not be worse than the log-space start
    g = torch.Generator().manual_seed(1)
    y = _bias(50) + 0.01 * torch.rand(50, generator=g, dtype=torch.float64)
    fit = fit_trend(y, "exp")
    x = torch.linspace(0, 1, 50, dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], 1)
    log_mu, s = torch.linalg.lstsq(design, y.log().unsqueeze(1)).solution.squeeze(1).tolist()
    sse_log = float(((math.exp(log_mu) * torch.exp(s * x) - y) ** 2).sum())
    sse_fit = float(((fit.curve(x) - y) ** 2).sum())
    assert sse_fit < sse_log


def test_cubic_recovers_released_fastv_curve():
    x = torch.linspace(0, 1, 576, dtype=torch.float64)
    f = sum(c * x**k for k, c in enumerate(FASTV_CUBIC))  # [576]
    g = torch.Generator().manual_seed(2)
    y = 0.003 * f * (1.0 + 1e-4 * torch.randn(576, generator=g, dtype=torch.float64))
    trend = fit_trend(y, "cubic")
    params = torch.tensor(trend.params) / trend.params[0]
    assert params.tolist() == pytest.approx(FASTV_CUBIC, abs=5e-3)
    assert trend.r2 > 0.9999
    w = trend.weights(576)
    assert w[0].item() == 1.0
    assert w[-1].item() == pytest.approx(1 / 2.792, rel=1e-3)
    # normalised positions: the same curve applies at another grid length
    assert trend.weights(144)[-1].item() == pytest.approx(1 / 2.792, rel=1e-3)
    assert fit_trend(torch.tensor([1.0, 2.0, 3.0]), "linear").params == pytest.approx([1.0, 2.0])


def test_padding_suppression_and_effective_budget():
    content = torch.ones(8, 8)
    content[:2] = 0.0
    content[6:] = 0.25
    content[2] = 0.6  # padding 0.4 <= 0.5: kept
    content[5] = 0.5  # boundary: kept
    content[4, 0] = 0.7  # float32 0.7 < 0.7: kept at pad_threshold 0.3 all the same
    scores = torch.rand(8, 8, generator=torch.Generator().manual_seed(3)) + 0.1
    out = debias_scores(scores.flatten(), None, content=content.flatten()).view(8, 8)
    assert (out[:2] == 0).all() and (out[6:] == 0).all()
    assert torch.equal(out[2:6], scores[2:6])
    assert effective_budget(40, content.flatten()) == 32
    assert effective_budget(20, content.flatten()) == 20
    assert effective_budget(40, None) == 40
    assert effective_budget(60, content.flatten(), pad_threshold=0.3) == 16  # rows 3-4, incl. the 0.7 token
    assert effective_budget(60, content.flatten(), pad_threshold=0.8) == 48  # 0.25 content now kept
    # positional debias comes first, then padding zeroing
    trend = PositionalTrend("exp", [1.0, 1.0])
    both = debias_scores(scores.flatten(), trend, content=content.flatten())
    expected = scores.flatten() * trend.weights(64)
    expected[content.flatten() < 0.5] = 0.0
    assert torch.allclose(both, expected)


def test_sinks_and_small_grids():
    scores = torch.arange(1.0, 7.0)
    sinks = torch.tensor([False, True, False, False, True, False])
    out = debias_scores(scores, None, sinks=sinks)
    assert out.tolist() == [1.0, 0.0, 3.0, 4.0, 0.0, 6.0]
    for family, params in (("exp", [2.0, 3.0]), ("cubic", FASTV_CUBIC), ("linear", [1.0, 1.0])):
        assert PositionalTrend(family, params).weights(1).tolist() == [1.0]


def test_invalid_inputs_raise_informative_errors():
    with pytest.raises(ValueError, match="did you mean 'exp'"):
        fit_trend(torch.ones(4), "expo")
    with pytest.raises(ValueError, match="cubic"):  # lists the families
        fit_trend(torch.ones(4), "gaussian")
    with pytest.raises(ValueError, match="at least 2"):
        fit_trend(torch.ones(1))
    with pytest.raises(ValueError, match="NaN"):
        fit_trend(torch.tensor([1.0, float("nan"), 2.0]))
    with pytest.raises(ValueError, match="positive"):
        fit_trend(torch.tensor([1.0, 0.0, 2.0]), "exp")
    fit_trend(torch.tensor([1.0, 0.0, 2.0]), "cubic")  # polynomials accept it
    with pytest.raises(ValueError, match=r"linear.*\[1\.0, -2\.0\]"):
        PositionalTrend("linear", [1.0, -2.0]).weights(10)  # f(1) = -1
    with pytest.raises(ValueError, match="n >= 1"):
        PositionalTrend("exp", [1.0, 0.0]).weights(0)
    with pytest.raises(ValueError, match="needs 4 finite params"):
        PositionalTrend.from_dict({"family": "cubic", "params": [1.0, 2.0]})
    with pytest.raises(ValueError, match="unknown trend family"):
        PositionalTrend.from_dict({"family": "quartic", "params": [1.0]})
    with pytest.raises(ValueError, match=r"exp trend needs 2 finite params, got \[1\.0, nan\]"):
        PositionalTrend("exp", [1.0, float("nan")])
    with pytest.raises(ValueError, match="'family' and 'params'"):
        PositionalTrend.from_dict({"params": [1.0]})
    with pytest.raises(ValueError, match="content has 3 entries"):
        debias_scores(torch.ones(4), None, content=torch.ones(3))
    with pytest.raises(ValueError, match="pad_threshold"):
        effective_budget(4, torch.ones(4), pad_threshold=1.5)


def test_trend_key():
    assert trend_key("fastv", 1, "last") == "fastv/layer1/last"
    assert trend_key("fastervlm", None, "cls") == "fastervlm/cls"
    assert FAMILIES == ("exp", "cubic", "linear")


def test_save_load_round_trip_merges_keys(tmp_path):
    path = tmp_path / "ckpt" / "attn_debias.json"
    with pytest.raises(FileNotFoundError, match=r"methods\.calibrate debias"):
        load_trend(path, "fastv/layer1/last")
    exp = fit_trend(_bias(32), "exp", pruner="fastv", layer=1)
    cubic = PositionalTrend("cubic", FASTV_CUBIC, meta={"source": "released"})  # r2 NaN
    save_trend(path, "fastv/layer1/last", exp)
    save_trend(path, "fastervlm/cls", cubic)
    assert set(json.loads(path.read_text())) == {"fastv/layer1/last", "fastervlm/cls"}
    assert [p.name for p in path.parent.iterdir()] == ["attn_debias.json"]  # no temp files left
    got = load_trend(path, "fastv/layer1/last")
    assert got.family == "exp" and got.params == pytest.approx(exp.params) and got.r2 == pytest.approx(exp.r2)
    assert got.meta == exp.meta
    got = load_trend(path, "fastervlm/cls")
    assert got.params == FASTV_CUBIC and math.isnan(got.r2) and got.meta == {"source": "released"}
    save_trend(path, "fastervlm/cls", PositionalTrend("linear", [1.0, 0.5]))  # overwrite one key, keep the other
    assert load_trend(path, "fastervlm/cls").family == "linear"
    assert load_trend(path, "fastv/layer1/last").family == "exp"
    with pytest.raises(KeyError, match=r"fastervlm/cls.*methods\.calibrate debias --model <option> --pruner <name>"):
        load_trend(path, "fastv/layer2/last")
