"""Leaderboard report from finished runs: Markdown, a static HTML page, PNG plots (and optionally W&B).

    python -m reports.leaderboard outputs                      # every run under outputs/ (single runs, multiruns)
    python -m reports.leaderboard multirun/2026-11-22 --out report --logger wandb

Writes into ``--out`` (default ``<RUNS_DIR>/leaderboard``): ``leaderboard.md`` (per task a method × model matrix
and a detail table), ``leaderboard.html`` (the same tables, sortable and filterable offline, with examples of
changed answers), ``leaderboard.json`` (every row's numbers) and ``plots/`` (per task the deltas with their
intervals, per model the headline metric against the time ratio). Only result files are read; the paired
statistics are recomputed from the per-sample records with the task's metric definitions (see
:mod:`reports.table`). ``--logger wandb`` also logs the table and the plots to a W&B run (its mode comes from
``WANDB_MODE`` and your W&B settings).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reports.markdown import delta_cell, render, value_cell
from reports.runs import scan
from reports.table import Entry, build_entries

COLUMNS = ["task", "model", "method", "metric", "n", "seeds", "value", "stderr", "delta", "ci_low", "ci_high", "p"]
COLUMNS += ["time_ratio", "changed", "note"]


def _table_rows(entries: list[Entry]) -> list[list[Any]]:
    return [
        [
            e.task,
            e.model,
            e.method,
            e.metric,
            e.n_samples,
            ",".join(map(str, e.seeds)),
            e.value,
            e.stderr,
            e.delta,
            e.ci_low,
            e.ci_high,
            e.p_value,
            e.time_ratio,
            e.changed,
            e.note,
        ]
        for e in entries
    ]


def write_report(runs_dir: Path, out: Path, *, title: str = "Leaderboard", max_examples: int = 5) -> list[Entry]:
    """Scan ``runs_dir``, build the rows and write the Markdown, HTML, JSON and plots into ``out``."""
    from reports.html import write_html
    from reports.plots import write_plots

    runs = scan(runs_dir)
    if not runs:
        raise SystemExit(f"no results.json under {runs_dir}")
    entries = build_entries(runs, max_examples=max_examples)
    out.mkdir(parents=True, exist_ok=True)
    plots = [p.relative_to(out).as_posix() for p in write_plots(entries, out / "plots")]
    (out / "leaderboard.md").write_text(render(entries, title, plots), encoding="utf-8")
    write_html(entries, out / "leaderboard.html", title=title, plots=plots)
    doc = {"runs_dir": str(runs_dir), "n_runs": len(runs), "entries": [e.to_dict() for e in entries]}
    (out / "leaderboard.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return entries


def log_to_wandb(entries: list[Entry], out: Path, args: argparse.Namespace) -> None:
    """Log the table and the plots to one W&B run (``job_type=leaderboard``)."""
    from core.loggers import WandbLogger

    logger = WandbLogger(project=args.wandb_project, name=args.wandb_name, job_type="leaderboard")
    try:
        logger.start({"runs_dir": str(args.runs_dir), "n_entries": len(entries)}, out)
        images = {f"leaderboard/{p.stem}": p for p in sorted((out / "plots").glob("*.png"))}
        logger.log_report({"leaderboard/table": (COLUMNS, _table_rows(entries))}, images)
    finally:
        logger.finish()


def summary(entries: list[Entry]) -> str:
    """A short printable digest: one line per non-baseline row."""
    lines = []
    for e in entries:
        time = "" if e.time_ratio is None else f", {e.time_ratio:.2f}× time"
        lines.append(f"{e.task:14s} {e.model:12s} {e.method:24s} {value_cell(e):28s} Δ {delta_cell(e)}{time}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs_dir", type=Path, help="directory holding run directories (searched recursively)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: RUNS_DIR/leaderboard)")
    ap.add_argument("--title", default="Leaderboard")
    ap.add_argument("--examples", type=int, default=5, help="changed answers shown per row in the HTML page")
    ap.add_argument("--logger", choices=("none", "wandb"), default="none", help="also log to W&B")
    ap.add_argument("--wandb-project", default="lvlm-hallucination")
    ap.add_argument("--wandb-name", default=None)
    args = ap.parse_args(argv)
    out = args.out or args.runs_dir / "leaderboard"
    entries = write_report(args.runs_dir, out, title=args.title, max_examples=args.examples)
    if args.logger == "wandb":
        log_to_wandb(entries, out, args)
    print(summary(entries))
    print(f"\n{len(entries)} rows → {out}/leaderboard.md, leaderboard.html, leaderboard.json, plots/")


if __name__ == "__main__":
    main()
