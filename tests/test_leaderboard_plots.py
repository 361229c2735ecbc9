"""Leaderboard plots, checked through the artists of the returned figures (no mocks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.container import BarContainer, ErrorbarContainer

from reports.plots import cost_figure, delta_figure, slug, write_plots
from reports.table import Entry

POPE = "pope: accuracy,pope_official"
CHAIR = "chair: chair_i,none"
QWEN = "qwen2-vl (size=2b)"  # a label that needs slugging


def entry(task: str, model: str, method: str, **kw) -> Entry:
    metric, hib = (POPE, True) if task == "pope" else (CHAIR, False)
    base = {"n_samples": 100, "seeds": [0], "value": 0.5, "stderr": 0.01, "n_paired": 100}
    return Entry(task=task, model=model, method=method, metric=metric, higher_is_better=hib, **{**base, **kw})


def method(task: str, model: str, name: str, value: float, ratio: float | None, delta=None, ci=None, p=None) -> Entry:
    low, high = ci if ci is not None else (None, None)
    return entry(task, model, name, value=value, time_ratio=ratio, delta=delta, ci_low=low, ci_high=high, p_value=p)


@pytest.fixture(scope="module")
def entries() -> list[Entry]:
    return [
        # pope: both models, methods "vcd" and "agla"; qwen/vcd has no CI, qwen/agla no delta (nor time ratio)
        entry("pope", "llava", "none", is_baseline=True, value=0.80, stderr=0.012),
        method("pope", "llava", "vcd", 0.83, 2.0, delta=0.03, ci=(0.01, 0.05), p=0.004),
        method("pope", "llava", "agla", 0.78, 1.5, delta=-0.02, ci=(-0.045, -0.002), p=0.03),
        entry("pope", QWEN, "none", is_baseline=True, value=0.85),
        method("pope", QWEN, "vcd", 0.86, 1.8, delta=0.01),
        method("pope", QWEN, "agla", 0.84, None),
        # chair (lower is better): both models
        entry("chair", "llava", "none", is_baseline=True, value=0.20, stderr=0.02, time_ratio=1.0),
        method("chair", "llava", "vcd", 0.15, 2.2, delta=-0.05, ci=(-0.08, -0.02), p=0.0005),
        method("chair", "llava", "agla", 0.22, 1.4, delta=0.02, ci=(-0.01, 0.05), p=0.2),
        entry("chair", QWEN, "none", is_baseline=True, value=0.25, stderr=None),
        method("chair", QWEN, "vcd", 0.21, 2.1, delta=-0.04, ci=(-0.07, -0.01)),
        method("chair", QWEN, "agla", 0.24, 1.3, delta=-0.01, ci=(-0.03, 0.01)),
    ]


def bars_by_model(fig) -> dict[str, list[tuple[float, float]]]:
    """``{model: [(bar centre x, height), ...]}`` from the axes' bar containers."""
    (ax,) = fig.axes
    out = {}
    for c in ax.containers:
        if isinstance(c, BarContainer):
            out[c.get_label()] = [(p.get_x() + p.get_width() / 2, p.get_height()) for p in c.patches]
    return out


def error_spans(fig) -> dict[float, tuple[float, float]]:
    """``{x: (y low, y high)}`` of every vertical error bar segment in the axes."""
    (ax,) = fig.axes
    spans = {}
    for c in ax.containers:
        if isinstance(c, ErrorbarContainer):
            for coll in c.lines[2]:
                for seg in coll.get_segments():  # (2, 2): [[x, y0], [x, y1]]
                    assert seg[0][0] == pytest.approx(seg[1][0])
                    spans[round(float(seg[0][0]), 6)] = (min(seg[:, 1]), max(seg[:, 1]))
    return spans


def test_delta_bars_heights_order_and_intervals(entries):
    fig = delta_figure(entries, "pope")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["agla", "vcd"]  # methods sorted by name
    bars = bars_by_model(fig)
    assert list(bars) == ["llava", QWEN]  # models sorted by name, legend labels
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["llava", QWEN]
    # two models in slots of 0.8 → offsets ∓0.2 around method index 0 (agla) and 1 (vcd)
    assert [x for x, _ in bars["llava"]] == pytest.approx([-0.2, 0.8])
    assert [h for _, h in bars["llava"]] == pytest.approx([-0.02, 0.03])
    # qwen/agla has no delta → no bar at x = 0.2; qwen/vcd has one
    assert bars[QWEN] == [(pytest.approx(1.2), pytest.approx(0.01))]
    # error bars span exactly [ci_low, ci_high]; qwen/vcd (no CI) has none
    spans = error_spans(fig)
    assert set(spans) == {-0.2, 0.8}
    assert spans[-0.2] == pytest.approx((-0.045, -0.002))
    assert spans[0.8] == pytest.approx((0.01, 0.05))
    # zero line, labels, significance markers (llava/vcd p=0.004 → "**", llava/agla p=0.03 → "*")
    assert any(list(line.get_ydata()) == [0, 0] for line in ax.get_lines())
    assert ax.get_title() == "pope"
    assert ax.get_ylabel() == f"Δ {POPE} vs none (↑ better)"
    marks = {(round(t.xy[0], 6), t.get_text()) for t in ax.texts}
    assert marks == {(0.8, "**"), (-0.2, "*")}


def test_delta_marker_placement_and_direction(entries):
    fig = delta_figure(entries, "chair")
    (ax,) = fig.axes
    assert ax.get_ylabel() == f"Δ {CHAIR} vs none (↓ better)"
    bars = bars_by_model(fig)
    assert [h for _, h in bars["llava"]] == pytest.approx([0.02, -0.05])
    assert [h for _, h in bars[QWEN]] == pytest.approx([-0.01, -0.04])
    spans = error_spans(fig)
    assert spans[round(0.8, 6)] == pytest.approx((-0.08, -0.02))  # llava/vcd
    assert spans[round(1.2, 6)] == pytest.approx((-0.07, -0.01))  # qwen/vcd
    (mark,) = ax.texts  # only llava/vcd is significant (p=0.0005); placed below its negative bar's interval
    assert (mark.get_text(), mark.xy) == ("***", (pytest.approx(0.8), pytest.approx(-0.08)))
    assert mark.get_va() == "top"


def test_delta_none_without_deltas(entries):
    only_undelta = [e for e in entries if e.task == "pope" and (e.is_baseline or e.delta is None)]
    assert len(only_undelta) == 3
    assert delta_figure(only_undelta, "pope") is None
    assert delta_figure(entries, "mme") is None


def test_delta_interval_not_containing_point(entries):
    # a percentile interval may miss the point estimate; the bar still spans [ci_low, ci_high]
    odd = entry("pope", "llava", "vcd", delta=0.03, ci_low=0.035, ci_high=0.06)
    spans = error_spans(delta_figure([odd], "pope"))
    assert list(spans.values()) == [pytest.approx((0.035, 0.06))]
    assert delta_figure([entry("pope", "llava", "vcd", delta=math.nan)], "pope") is None


def points_by_task(fig) -> dict[str, list[tuple[float, float]]]:
    """``{subplot title: sorted scatter offsets}`` (scatter points are the axes' path collections)."""
    out = {}
    for ax in fig.axes:
        scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
        offsets = [tuple(map(float, xy)) for c in scatters for xy in c.get_offsets()]  # (n_points, 2)
        out[ax.get_title()] = sorted(offsets)
    return out


def test_cost_scatter(entries):
    fig = cost_figure(entries, "llava")
    assert [ax.get_title() for ax in fig.axes] == ["chair", "pope"]  # tasks sorted
    points = points_by_task(fig)
    # pope baseline has no ratio → x = 1; chair baseline has ratio 1.0
    assert points["pope"] == [(1.0, 0.80), (1.5, 0.78), (2.0, 0.83)]
    assert points["chair"] == [(1.0, 0.20), (1.4, 0.22), (2.2, 0.15)]
    pope = fig.axes[1]
    assert pope.get_xlabel() == "time per sample / baseline"
    assert pope.get_ylabel() == POPE
    assert fig.axes[0].get_ylabel() == CHAIR
    assert sorted((t.get_text(), t.xy) for t in pope.texts) == [
        ("agla", (1.5, 0.78)),
        ("none", (1.0, 0.80)),
        ("vcd", (2.0, 0.83)),
    ]
    assert any(list(line.get_xdata()) == [1, 1] and line.get_linestyle() == "--" for line in pope.get_lines())
    # vertical error bars = value ± stderr
    (err,) = [c for c in pope.containers if isinstance(c, ErrorbarContainer)]
    spans = sorted((seg[0][0], seg[0][1], seg[1][1]) for seg in err.lines[2][0].get_segments())  # (x, y0, y1)
    assert np.array(spans) == pytest.approx(np.array([(1.0, 0.788, 0.812), (1.5, 0.77, 0.79), (2.0, 0.82, 0.84)]))


def test_cost_skips_unplottable(entries):
    points = points_by_task(cost_figure(entries, QWEN))
    # pope: qwen/agla has no time ratio → skipped; the baseline stays at x = 1
    assert points["pope"] == [(1.0, 0.85), (1.8, 0.86)]
    assert points["chair"] == [(1.0, 0.25), (1.3, 0.24), (2.1, 0.21)]
    assert cost_figure(entries, "nobody") is None
    unplottable = [entry("pope", "m", "vcd", time_ratio=None), entry("pope", "m", "none", value=None)]
    assert cost_figure(unplottable, "m") is None


def test_write_plots(entries, tmp_path):
    from PIL import Image

    out = tmp_path / "nested" / "plots"
    paths = write_plots(entries, out)
    names = [p.name for p in paths]
    assert names == sorted(["delta_chair.png", "delta_pope.png", "cost_llava.png", "cost_qwen2-vl__size_2b_.png"])
    assert paths == sorted(paths) and all(p.parent == out for p in paths)
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        with Image.open(p) as img:
            img.verify()
        with Image.open(p) as img:
            assert img.width > 100 and img.height > 100


def test_slug():
    assert slug("qwen2-vl (size=2b)") == "qwen2-vl__size_2b_"
    assert slug("a/b.c_d") == "a_b.c_d"
