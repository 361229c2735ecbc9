"""The leaderboard as Markdown: a method × model matrix per task, then every row with its statistics."""

from __future__ import annotations

from collections import defaultdict

from reports.table import Entry


def fmt(value: float | None, spec: str = ".4f", signed: bool = False) -> str:
    """A number for a table cell (``—`` when missing)."""
    if value is None:
        return "—"
    return format(value, ("+" if signed else "") + spec)


def value_cell(e: Entry) -> str:
    """``0.8900 ± 0.0100`` (``, sd 0.0040 over 3 seeds`` when seeds were aggregated)."""
    text = f"{fmt(e.value)} ± {fmt(e.stderr)}" if e.stderr is not None else fmt(e.value)
    if e.spread is not None:
        text += f" (sd {fmt(e.spread)}, {len(e.seeds)} seeds)"
    return text


def delta_cell(e: Entry) -> str:
    """``+0.0200 [+0.0050, +0.0350] *``; ``baseline`` for the baseline; ``—`` without a paired baseline."""
    if e.is_baseline:
        return "baseline"
    if e.delta is None:
        return "—"
    ci = f" [{fmt(e.ci_low, signed=True)}, {fmt(e.ci_high, signed=True)}]" if e.ci_low is not None else ""
    return f"{fmt(e.delta, signed=True)}{ci} {e.significance}".rstrip()


def _arrow(e: Entry) -> str:
    return {True: " ↑", False: " ↓"}.get(e.higher_is_better, "")


def _escape(text: str) -> str:
    """Table-safe text: pipes escaped, newlines flattened."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _matrix(entries: list[Entry]) -> list[str]:
    """Method rows × model columns; each cell the headline value, for methods the delta and marker, and ``n``.

    When several rows share a cell (runs over different items, e.g. another ``limit``), the cell shows the one over
    the most samples and says how many others the detail table lists; a smaller run never stands in for a fuller one.
    """
    models = sorted({e.model for e in entries})
    by_method: dict[str, dict[str, Entry]] = defaultdict(dict)
    others: dict[tuple[str, str], int] = defaultdict(int)
    for e in entries:
        kept = by_method[e.method].get(e.model)
        if kept is not None:
            others[(e.method, e.model)] += 1
        if kept is None or e.n_samples > kept.n_samples:
            by_method[e.method][e.model] = e
    order = sorted(by_method, key=lambda m: (not any(e.is_baseline for e in by_method[m].values()), m))
    lines = ["| method | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for method in order:
        cells = []
        for model in models:
            e = by_method[method].get(model)
            if e is None:
                cells.append("")
            else:
                more = others[(method, model)]
                n = f"n={e.n_samples}" + (f"; +{more} smaller, see below" if more else "")
                if e.is_baseline or e.delta is None:
                    cells.append(f"{fmt(e.value)} ({n})")
                else:
                    cells.append(f"{fmt(e.value)} ({fmt(e.delta, signed=True)}{e.significance}, {n})")
        lines.append(f"| {_escape(method)} | " + " | ".join(cells) + " |")
    return lines


def _rows(entries: list[Entry]) -> list[str]:
    head = "| model | method | n | seeds | value ± se | Δ vs none [95% CI] | p | time × | changed | note |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        cells = [
            e.model,
            e.method,
            str(e.n_samples),
            ",".join(map(str, e.seeds)),
            value_cell(e),
            delta_cell(e),
            fmt(e.p_value, ".3g"),
            "" if e.time_ratio is None else f"{e.time_ratio:.2f}×",
            "" if e.changed is None else str(e.changed),
            e.note,
        ]
        lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    return lines


def render(entries: list[Entry], title: str = "Leaderboard", plots: list[str] | None = None) -> str:
    """The whole Markdown document: per task a matrix and a detail table, then the plots."""
    lines = [
        f"# {title}",
        "",
        "Headline metric per task, mean over seeds ± clustered-bootstrap standard error. Δ = paired difference "
        "against `method=none` on the same model, items and seed, with its 95% interval; markers: * p < 0.05, "
        "** p < 0.01, *** p < 0.001 (bootstrap). time × = wall time per sample over the baseline's. changed = "
        "samples whose parsed answer differs from the baseline's.",
    ]
    by_task: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        by_task[e.task].append(e)
    for task, group in sorted(by_task.items()):
        metrics = sorted({e.metric + _arrow(e) for e in group})
        lines += ["", f"## {task} — {', '.join(metrics)}", "", *_matrix(group), "", *_rows(group)]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"
