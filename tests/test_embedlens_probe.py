"""EmbedLens probe: nearest-vocabulary search, marker classification, marker calibration, overlay maps."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from methods.embedlens_probe import (
    GROUPS,
    PUBLISHED_MARKERS,
    calibrate_markers,
    classify,
    fractions,
    nearest_vocab,
    overlay_map,
    save_map,
)

V, D = 300, 32
MARKERS = {"vit_sink": 7, "llm_sink": 11, "dead": 13}
CODE = {g: i for i, g in enumerate(GROUPS)}


def brute_top(embeds: torch.Tensor, table: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Independent reference: full cosine matrix via F.cosine_similarity, then argsort."""
    cos = torch.nn.functional.cosine_similarity(embeds.double()[:, None], table.double()[None], dim=-1)  # [n, V]
    return cos.argsort(dim=1, descending=True)[:, :k]


@pytest.fixture
def table() -> torch.Tensor:
    return torch.randn(V, D, generator=torch.Generator().manual_seed(0))


def test_published_markers_and_groups():
    assert GROUPS == ("alive", "vit_sink", "llm_sink", "dead")
    assert PUBLISHED_MARKERS["llava-hf/llava-1.5-7b-hf"] == {"vit_sink": 1141, "llm_sink": 26673, "dead": 30296}


def test_planted_rows_are_found_and_classified(table):
    gen = torch.Generator().manual_seed(1)
    planted = {7: "vit_sink", 11: "llm_sink", 13: "dead"}
    rows, want = [], []
    for vid, group in planted.items():
        for scale in (0.3, 1.0, 25.0):  # cosine is scale-free
            rows.append(table[vid] * scale)
            want.append(CODE[group])
    others = torch.randn(200, D, generator=gen)
    far = ~torch.isin(brute_top(others, table), torch.tensor([7, 11, 13])).any(dim=1)
    others = others[far][:20]
    assert len(others) == 20
    embeds = torch.cat([torch.stack(rows), others])  # [29, D]
    want = torch.tensor(want + [CODE["alive"]] * 20)

    ids, cos = nearest_vocab(embeds, table, k=3)
    assert ids.shape == (29, 3) and ids.dtype == torch.long and cos.dtype == torch.float32
    assert torch.equal(ids, brute_top(embeds, table))
    assert (cos[:, :-1] >= cos[:, 1:]).all()
    planted_ids = torch.tensor([vid for vid in planted for _ in range(3)])
    assert torch.equal(ids[:9, 0], planted_ids)
    assert torch.allclose(cos[:9, 0], torch.ones(9), atol=1e-5)
    assert torch.equal(classify(ids, MARKERS), want)


def test_priority_with_mixed_embeddings(table):
    mixes = {(7, 13): "vit_sink", (11, 13): "llm_sink", (7, 11): "vit_sink"}
    for (a, b), group in mixes.items():
        emb = torch.nn.functional.normalize(table[a] + table[b], dim=0)[None]  # [1, D]
        top = brute_top(emb, table)[0].tolist()
        assert a in top and b in top, f"test premise: both {a} and {b} in top-3 {top}"
        ids, _ = nearest_vocab(emb, table)
        assert classify(ids, MARKERS).tolist() == [CODE[group]]
        assert classify(ids, {**MARKERS, group: None}).tolist() != [CODE[group]]


def test_classify_priority_and_marker_handling():
    top = torch.tensor([[7, 13, 11], [13, 11, 5], [13, 1, 2], [1, 2, 3], [2, 7, 9]])
    assert classify(top, MARKERS).tolist() == [1, 2, 3, 0, 1]
    assert classify(top, {"dead": 13}).tolist() == [3, 3, 3, 0, 0]
    assert classify(top, {"vit_sink": None, "llm_sink": 11, "dead": None}).tolist() == [2, 2, 0, 0, 0]
    with pytest.raises(ValueError, match="alive"):
        classify(top, {"sink": 7})
    with pytest.raises(ValueError):
        classify(top, {"alive": 1})


def test_nearest_vocab_chunking_matches_one_shot_and_handles_zero_rows(table):
    embeds = torch.randn(53, D, generator=torch.Generator().manual_seed(2))
    embeds[5] = 0
    tab = table.clone()
    tab[40] = 0
    ids1, cos1 = nearest_vocab(embeds, tab, k=5, chunk=100_000)
    for chunk in (3, 7, 64):
        ids2, cos2 = nearest_vocab(embeds, tab, k=5, chunk=chunk)
        assert torch.equal(ids1[torch.arange(53) != 5], ids2[torch.arange(53) != 5])  # row 5: all-tie order is free
        assert torch.allclose(cos1, cos2, atol=1e-6)
    assert not torch.isnan(cos1).any()
    assert torch.equal(cos1[5], torch.zeros(5))
    assert 40 not in ids1.flatten().tolist() or (cos1[ids1 == 40] == 0).all()
    ids16, cos16 = nearest_vocab(embeds.half(), tab.half(), k=5, chunk=7)
    assert cos16.dtype == torch.float32 and (ids16[:, 0] == ids1[:, 0]).float().mean() > 0.9
    with pytest.raises(ValueError):
        nearest_vocab(embeds, tab, k=V + 1)


def _random_top(n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, 3] distinct ids per row drawn from 100..299 (never a planted id)."""
    return torch.rand(n, 200, generator=gen).argsort(dim=1)[:, :3] + 100


def _plant(top: torch.Tensor, rows: torch.Tensor, vid: int, frac: float, col: int, gen: torch.Generator) -> None:
    chosen = rows[torch.rand(len(rows), generator=gen) < frac]
    top[chosen, col] = vid


def _masks(n: int) -> dict[str, torch.Tensor]:
    idx = torch.arange(n)
    return {"vit_sink": idx < 100, "llm_sink": (idx >= 100) & (idx < 200), "dead": (idx >= 200) & (idx < 300)}


def test_calibrate_recovers_markers_and_rejects_low_lift():
    gen = torch.Generator().manual_seed(3)
    n = 1000
    top = _random_top(n, gen)
    idx = torch.arange(n)
    _plant(top, idx[:100], 7, 0.9, 0, gen)
    _plant(top, idx[300:], 7, 0.02, 0, gen)
    _plant(top, idx[200:300], 13, 0.8, 1, gen)
    _plant(top, idx[100:200], 11, 0.7, 2, gen)
    _plant(top, idx[300:], 11, 0.5, 2, gen)  # common everywhere: lift ~1.4 < 2
    ref = _masks(n)
    out = calibrate_markers(top, ref)
    assert out["vit_sink"]["id"] == 7 and out["dead"]["id"] == 13
    assert out["vit_sink"]["reason"] is None
    hit = (top[ref["vit_sink"]] == 7).any(dim=1).float().mean().item()
    assert out["vit_sink"]["hit_rate"] == pytest.approx(hit) and hit > 0.8
    assert out["vit_sink"]["base_rate"] == pytest.approx((top == 7).any(dim=1).float().mean().item())
    assert out["vit_sink"]["n_reference"] == 100
    assert out["llm_sink"]["id"] is None and "lift" in out["llm_sink"]["reason"]
    assert calibrate_markers(top, ref, min_lift=1.1)["llm_sink"]["id"] == 11
    assert calibrate_markers(top, ref, min_hit=0.95)["vit_sink"]["id"] is None
    assert {g: r["id"] for g, r in calibrate_markers(top, ref).items()} == {"vit_sink": 7, "llm_sink": None, "dead": 13}


def test_calibrate_conflict_and_empty_reference():
    gen = torch.Generator().manual_seed(4)
    n = 1000
    top = _random_top(n, gen)
    idx = torch.arange(n)
    _plant(top, idx[:100], 7, 0.95, 0, gen)
    _plant(top, idx[200:300], 7, 0.85, 0, gen)  # dead wants 7 too, with a lower hit rate
    _plant(top, idx[200:300], 60, 0.7, 1, gen)  # dead's next-best candidate
    _plant(top, idx[100:200], 7, 0.75, 0, gen)  # llm_sink also wants 7, and has no acceptable fallback
    ref = _masks(n)
    out = calibrate_markers(top, ref)
    assert out["vit_sink"]["id"] == 7
    assert out["dead"]["id"] == 60 and out["dead"]["reason"] is None
    assert out["dead"]["hit_rate"] == pytest.approx((top[ref["dead"]] == 60).any(dim=1).float().mean().item())
    assert out["llm_sink"]["id"] is None and "vit_sink" in out["llm_sink"]["reason"]
    # without vit_sink's claim, dead (higher hit rate than llm_sink) keeps 7
    out2 = calibrate_markers(top, {"llm_sink": ref["llm_sink"], "dead": ref["dead"]}, min_lift=1.0)
    assert out2["dead"]["id"] == 7 and out2["llm_sink"]["id"] is None
    empty = calibrate_markers(top, {"vit_sink": torch.zeros(n, dtype=torch.bool)})
    assert empty["vit_sink"]["id"] is None and empty["vit_sink"]["n_reference"] == 0
    assert empty["vit_sink"]["reason"]
    with pytest.raises(ValueError):
        calibrate_markers(top, {"bogus": ref["dead"]})


def test_fractions():
    f = fractions(torch.tensor([0, 0, 1, 3, 3, 3]))
    assert list(f) == list(GROUPS)
    assert sum(f.values()) == pytest.approx(1.0)
    assert f == pytest.approx({"alive": 2 / 6, "vit_sink": 1 / 6, "llm_sink": 0.0, "dead": 0.5})
    assert fractions(torch.tensor([], dtype=torch.long)) == dict.fromkeys(GROUPS, 0.0)


def _image(h: int, w: int) -> Image.Image:
    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(60, 180, (h, w, 3), dtype=np.uint8))


def test_overlay_map_tints_cells():
    img = _image(64, 256)  # 16 px cells, 256 px wide: no upscaling
    codes = torch.zeros(64, dtype=torch.long)
    codes[0], codes[2], codes[3] = 1, 2, 3
    out = overlay_map(img, codes, (4, 16))
    src = np.asarray(img).astype(int)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.shape[1] == 256 and out.shape[0] > 64  # legend strip below
    inner = (slice(2, 14), slice(2, 14))  # interior of cell (0, 0)
    red_gain = lambda a: a[..., 0] - (a[..., 1] + a[..., 2]) / 2  # noqa: E731
    assert red_gain(out[inner].astype(int)).mean() > red_gain(src[inner]).mean() + 40
    alive = (slice(2, 14), slice(18, 30))  # cell (0, 1)
    assert np.array_equal(out[alive], src[alive])
    dead = (slice(2, 14), slice(50, 62))  # cell (0, 3): grey pulls saturation down
    assert np.abs(out[dead].astype(int) - 128).mean() < np.abs(src[dead] - 128).mean()
    assert out[64:].std() > 0  # legend has content


def test_overlay_map_upscales_and_validates():
    out = overlay_map(_image(20, 30), torch.zeros(24, dtype=torch.long), (4, 6))
    assert out.shape[1] >= 16 * 6 and out.shape[0] > 16 * 4
    with pytest.raises(ValueError):
        overlay_map(_image(20, 30), torch.zeros(23, dtype=torch.long), (4, 6))


def test_save_map_writes_png(tmp_path):
    path = tmp_path / "sub" / "map.png"
    codes = torch.tensor([1, 0, 0, 3])
    save_map(path, _image(32, 32), codes, (2, 2))
    back = cv2.imread(str(path))
    assert back is not None
    rgb = overlay_map(_image(32, 32), codes, (2, 2))
    assert np.array_equal(back[..., ::-1], rgb)


def test_calibrate_small_exact_rates_and_duplicate_ids():
    top = torch.tensor([[7, 7, 1], [7, 2, 3], [4, 5, 6], [4, 8, 9]])  # row 0 repeats 7: counted once
    out = calibrate_markers(top, {"dead": torch.tensor([True, True, False, False])}, min_lift=1.0)
    assert out["dead"] == {"id": 7, "hit_rate": 1.0, "base_rate": 0.5, "n_reference": 2, "reason": None}
