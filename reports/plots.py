"""Leaderboard plots: per-task deltas against the baseline and per-model accuracy-vs-cost scatters.

Built on :class:`matplotlib.figure.Figure` directly (no pyplot, no global state, any backend-free process):

* :func:`delta_figure` — one grouped bar chart per task: method − baseline on the headline metric, one bar per
  model within each method group, with the paired 95 % interval as error bars and significance markers.
* :func:`cost_figure` — one scatter per model, a subplot per task: headline value ± stderr against the time per
  sample relative to the baseline's (baseline at x = 1).
* :func:`write_plots` — both kinds as PNG files under a folder.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from reports.table import Entry

DPI = 120
BAR_GROUP_WIDTH = 0.8  # share of a method's unit slot on the x axis taken by its bars
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def slug(text: str) -> str:
    """File-name-safe form of a label: characters outside ``[A-Za-z0-9._-]`` replaced by ``_``."""
    return _UNSAFE.sub("_", text)


def _plain(text: str) -> str:
    """A label shown verbatim by matplotlib (``$`` escaped so it never turns into mathtext)."""
    return text.replace("$", r"\$")


def _ok(*values: float | None) -> bool:
    """Whether every value is a finite number (not ``None``, NaN or infinite)."""
    return all(v is not None and math.isfinite(v) for v in values)


def _direction(higher_is_better: bool | None) -> str:
    """`` (↑ better)`` / `` (↓ better)`` / empty when the metric's direction is unknown."""
    if higher_is_better is None:
        return ""
    return " (↑ better)" if higher_is_better else " (↓ better)"


# ----------------------------------------------------------------------------------------------------------- deltas


def _delta_rows(entries: list[Entry], task: str) -> dict[tuple[str, str], Entry]:
    """Non-baseline entries of ``task`` with a delta, by ``(method, model)``.

    When several entries share a method and model (runs over different item sets), the one with the most paired
    samples is kept.
    """
    rows: dict[tuple[str, str], Entry] = {}
    for e in entries:
        if e.task != task or e.is_baseline or not _ok(e.delta):
            continue
        key = (e.method, e.model)
        if key not in rows or (e.n_paired or 0) > (rows[key].n_paired or 0):
            rows[key] = e
    return rows


def _mark_significance(ax: Axes, x: float, e: Entry) -> None:
    """Write ``e.significance`` just beyond the bar's end (or its interval's end) of the bar at ``x``."""
    if not e.significance or e.delta is None:
        return
    up = e.delta >= 0
    ends = [e.delta] + [v for v in ((e.ci_high if up else e.ci_low),) if _ok(v)]
    y = max(ends) if up else min(ends)
    ax.annotate(
        e.significance,
        (x, y),
        xytext=(0, 2 if up else -2),
        textcoords="offset points",
        ha="center",
        va="bottom" if up else "top",
        fontsize=9,
    )


def _interval(e: Entry) -> tuple[float, float, float]:
    """``(anchor, low, high)`` of the error bar spanning ``e``'s interval.

    The anchor is ``delta``, clipped into the interval: a percentile bootstrap interval may, rarely, not contain
    the point estimate, and matplotlib refuses negative error lengths.
    """
    low, high = sorted((e.ci_low, e.ci_high))
    return min(max(e.delta, low), high), low, high


def _model_bars(
    ax: Axes, rows: dict[tuple[str, str], Entry], methods: list[str], model: str, offset: float, width: float
) -> None:
    """One model's bars (one per method it has a delta for), their CI error bars and significance markers.

    Method ``j``'s bar sits at ``j + offset``.
    """
    bars = [(j + offset, rows[(meth, model)]) for j, meth in enumerate(methods) if (meth, model) in rows]
    ax.bar([x for x, _ in bars], [e.delta for _, e in bars], width, label=_plain(model))  # (n_bars,) each
    cis = [(x, *_interval(e)) for x, e in bars if _ok(e.ci_low, e.ci_high)]  # (x, anchor, low, high)
    if cis:
        yerr = [[y - lo for _, y, lo, _ in cis], [hi - y for _, y, _, hi in cis]]  # (2, n_with_ci): below, above
        ax.errorbar([x for x, *_ in cis], [y for _, y, *_ in cis], yerr=yerr, fmt="none", ecolor="black", capsize=3)
    for x, e in bars:
        _mark_significance(ax, x, e)


def delta_figure(entries: list[Entry], task: str) -> Figure | None:
    """Grouped bar chart of the deltas against the baseline for one task.

    X axis: the methods (sorted by name); within each method one bar per model (sorted by name, legend = models)
    of height ``delta``, with asymmetric error bars spanning ``[ci_low, ci_high]`` where the interval is known,
    the significance marker above (positive) or below (negative) the bar, and a horizontal line at 0.

    Args:
        entries: Leaderboard entries (any tasks; baselines and entries without delta are skipped).
        task: Task label to plot.

    Returns:
        The figure, or ``None`` when no entry of ``task`` has a delta.
    """
    rows = _delta_rows(entries, task)
    if not rows:
        return None
    methods = sorted({meth for meth, _ in rows})
    models = sorted({model for _, model in rows})
    width = BAR_GROUP_WIDTH / len(models)
    fig = Figure(figsize=(max(5.0, 1.0 + 0.6 * len(methods) * len(models)), 4.0))
    ax = fig.add_subplot()
    for i, model in enumerate(models):
        _model_bars(ax, rows, methods, model, (i - (len(models) - 1) / 2) * width, width)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(methods)))
    tilt = len(methods) > 3
    ax.set_xticklabels([_plain(m) for m in methods], rotation=20 if tilt else 0, ha="right" if tilt else "center")
    first = next(iter(rows.values()))
    ax.set_ylabel(_plain(f"Δ {first.metric} vs none{_direction(first.higher_is_better)}"))
    ax.set_title(_plain(task))
    ax.legend(title="model", fontsize=8)
    ax.margins(y=0.15)
    return fig


# ------------------------------------------------------------------------------------------------------------- cost


def _cost_points(entries: list[Entry], model: str) -> dict[str, list[tuple[float, Entry]]]:
    """Plottable ``(time ratio, entry)`` points of ``model`` by task, baseline first then methods by name.

    The baseline sits at its own ratio, else 1.0; entries without a value, and non-baseline entries without a
    time ratio, are skipped.
    """
    by_task: dict[str, list[tuple[float, Entry]]] = {}
    for e in sorted(entries, key=lambda e: (not e.is_baseline, e.method)):
        if e.model != model or not _ok(e.value):
            continue
        x = e.time_ratio if _ok(e.time_ratio) else (1.0 if e.is_baseline else None)
        if x is not None:
            by_task.setdefault(e.task, []).append((x, e))
    return by_task


def _cost_axes(ax: Axes, task: str, points: list[tuple[float, Entry]]) -> None:
    """One task's scatter: value ± stderr against the time ratio, each point labelled with its method."""
    xs = [x for x, _ in points]  # (n_points,)
    ys = [e.value for _, e in points]  # (n_points,)
    colors = ["tab:gray" if e.is_baseline else "tab:blue" for _, e in points]
    ax.scatter(xs, ys, c=colors, zorder=3)
    with_err = [(x, e) for x, e in points if _ok(e.stderr)]
    if with_err:
        ax.errorbar(
            [x for x, _ in with_err],
            [e.value for _, e in with_err],
            yerr=[e.stderr for _, e in with_err],
            fmt="none",
            ecolor="tab:gray",
            capsize=3,
            zorder=2,
        )
    for x, e in points:
        ax.annotate(_plain(e.method), (x, e.value), xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel("time per sample / baseline")
    ax.set_ylabel(_plain(points[0][1].metric))
    ax.set_title(_plain(task))
    ax.margins(x=0.15, y=0.15)


def cost_figure(entries: list[Entry], model: str) -> Figure | None:
    """Accuracy-vs-cost scatter for one model, one subplot per task (sorted).

    Each point is an entry: x = ``time_ratio`` (the baseline at 1.0 when it has none), y = ``value`` with
    ``stderr`` as vertical error bar, annotated with the method label; a dashed vertical line marks x = 1.

    Args:
        entries: Leaderboard entries (any models).
        model: Model label to plot.

    Returns:
        The figure, or ``None`` when the model has no plottable entry (value and, for methods, time ratio).
    """
    by_task = _cost_points(entries, model)
    if not by_task:
        return None
    tasks = sorted(by_task)
    fig = Figure(figsize=(4.5 * len(tasks), 4.0), layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]  # (n_tasks,)
    for ax, task in zip(axes, tasks, strict=True):
        _cost_axes(ax, task, by_task[task])
    fig.suptitle(_plain(model))
    return fig


# ------------------------------------------------------------------------------------------------------------ files


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``… when two labels slug to the same file name."""
    out, n = name, 1
    while out in taken:
        n += 1
        out = f"{name}-{n}"
    taken.add(out)
    return out


def write_plots(entries: list[Entry], out_dir: Path) -> list[Path]:
    """Write ``delta_<task>.png`` per task and ``cost_<model>.png`` per model (labels slugged) under ``out_dir``.

    Tasks or models with nothing to plot get no file.

    Args:
        entries: Leaderboard entries.
        out_dir: Output folder (created if missing).

    Returns:
        The written paths, sorted.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    written = []
    for task in sorted({e.task for e in entries}):
        fig = delta_figure(entries, task)
        if fig is not None:
            written.append(_save(fig, out_dir / f"{_unique(f'delta_{slug(task)}', taken)}.png"))
    for model in sorted({e.model for e in entries}):
        fig = cost_figure(entries, model)
        if fig is not None:
            written.append(_save(fig, out_dir / f"{_unique(f'cost_{slug(model)}', taken)}.png"))
    return sorted(written)
