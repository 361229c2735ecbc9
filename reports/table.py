"""The leaderboard's rows: runs grouped over seeds, each paired with its ``method=none`` baseline.

One :class:`Entry` per (task, model, method configuration, evaluated items). Its numbers:

* ``value ± stderr`` — the task's headline metric, mean over seeds; ``stderr`` is the mean of the runs'
  clustered-bootstrap standard errors and ``spread`` the standard deviation over seeds (``None`` with one seed).
* ``delta`` with ``ci_low``/``ci_high`` and ``p_value`` — method − baseline on the headline, paired per sample
  (:func:`core.paired.compare`, images resampled jointly for both runs) against the ``method=none`` run with
  the same model, task, items and seed. One seed: the percentile interval and the bootstrap p-value. Several
  seeds: the mean difference, the interval ``mean ± z·mean(stderr)`` and a normal p-value from the same
  quantities; the standard deviation of a mean of correlated estimates is at most the mean of their standard
  deviations, so this interval is conservative.
* ``time_ratio`` — mean over seeds of (method's mean wall time per sample) / (baseline's), same items.
* ``changed`` — how many paired samples got a different parsed answer than the baseline's (first seed), with a few
  examples for the HTML page.

Runs whose items differ from every baseline's get no delta (``note`` says why), never an unpaired comparison.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from core.paired import compare
from reports.runs import Run
from tasks.base import task_from_config

Z95 = 1.959963984540054  # standard normal 97.5 % quantile
#: significance markers by p-value threshold (checked in order)
MARKERS = ((0.001, "***"), (0.01, "**"), (0.05, "*"))


@dataclass
class Entry:
    """One leaderboard row (see the module docstring for the meaning of each number)."""

    task: str
    model: str
    method: str
    metric: str  # "row: metric,filter"
    higher_is_better: bool | None
    n_samples: int
    seeds: list[int]
    value: float | None
    stderr: float | None
    spread: float | None = None
    is_baseline: bool = False
    delta: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    n_paired: int | None = None
    seconds_per_sample: float | None = None
    time_ratio: float | None = None
    changed: int | None = None
    note: str = ""
    runs: list[str] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def significance(self) -> str:
        """``***`` / ``**`` / ``*`` for p < 0.001 / 0.01 / 0.05, else empty."""
        if self.p_value is None:
            return ""
        return next((mark for limit, mark in MARKERS if self.p_value < limit), "")

    @property
    def improves(self) -> bool | None:
        """Whether the delta goes in the metric's better direction (``None`` when unknown or zero)."""
        if self.delta is None or self.higher_is_better is None or self.delta == 0:
            return None
        return (self.delta > 0) == self.higher_is_better

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with ``significance``."""
        return {**asdict(self), "significance": self.significance}


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def label(node: dict[str, Any], siblings: list[dict[str, Any]]) -> str:
    """``node["name"]``, with ``(key=value, ...)`` for the fields where same-named ``siblings`` differ."""
    keys = sorted({k for s in siblings for k in s} - {"name", "_target_"})
    differing = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True, default=str) for s in siblings}) > 1]
    if not differing:
        return str(node["name"])
    return f"{node['name']} ({', '.join(f'{k}={node.get(k)}' for k in differing)})"


class Labeller:
    """Display names of model, task and method configs, unique within the scanned runs."""

    def __init__(self, runs: list[Run]) -> None:
        self.siblings: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        seen: set[tuple[str, str]] = set()
        for run in runs:
            for part in ("model", "task", "method"):
                node = run.config[part]
                ident = (part, json.dumps(node, sort_keys=True, default=str))
                if ident not in seen:
                    seen.add(ident)
                    self.siblings[(part, node["name"])].append(node)

    def __call__(self, run: Run, part: str) -> str:
        """Label of the run's ``part`` (``"model"``, ``"task"`` or ``"method"``) config."""
        node = run.config[part]
        return label(node, self.siblings[(part, node["name"])])


class PairedStats:
    """Paired headline comparisons, rebuilding each task once from its config (no model is involved)."""

    def __init__(self) -> None:
        self._tasks: dict[str, Any] = {}

    def task(self, run: Run) -> Any:
        """The task object of a run's config (only its metric definitions are used)."""
        key = json.dumps(run.config["task"], sort_keys=True, default=str)
        if key not in self._tasks:
            self._tasks[key] = task_from_config(run.config["task"], strict=False)
        return self._tasks[key]

    def headline(self, run: Run, base: Run) -> dict[str, Any]:
        """``{diff, diff_stderr, ci_low, ci_high, p_value, n_paired}`` of the headline metric, run − base."""
        row, key = run.headline
        out = compare(self.task(run), list(run.records.values()), list(base.records.values()), seed=run.seed)
        return {**out["metrics"][row][key], "n_paired": out["n_paired"]}


def changed_answers(run: Run, base: Run, max_examples: int) -> tuple[int, list[dict[str, Any]]]:
    """Paired samples whose parsed answer differs from the baseline's: their count and the first few."""
    changed = []
    for sid, rec in run.records.items():
        other = base.records.get(sid)
        if other is not None and json.dumps(rec.get("parsed"), default=str) != json.dumps(
            other.get("parsed"), default=str
        ):
            changed.append((rec.get("index", 0), rec, other))
    changed.sort(key=lambda item: item[0])
    examples = [
        {
            "sample_id": rec["sample_id"],
            "target": rec.get("target"),
            "prompt": rec.get("prompt"),
            "baseline_output": other.get("raw_output"),
            "method_output": rec.get("raw_output"),
            "baseline_parsed": other.get("parsed"),
            "method_parsed": rec.get("parsed"),
        }
        for _, rec, other in changed[:max_examples]
    ]
    return len(changed), examples


def _combine(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Delta, interval and p-value over seeds (see the module docstring)."""
    if len(per_seed) == 1:
        one = per_seed[0]
        return {k: one.get(k) for k in ("diff", "ci_low", "ci_high", "p_value", "n_paired")}
    diff = _mean([p["diff"] for p in per_seed])
    se = _mean([p["diff_stderr"] for p in per_seed])
    if diff is None or se is None:
        return {"diff": diff, "ci_low": None, "ci_high": None, "p_value": None, "n_paired": per_seed[0]["n_paired"]}
    p = 1.0 if diff == 0 else (math.erfc(abs(diff) / se / math.sqrt(2)) if se > 0 else 0.0)
    return {
        "diff": diff,
        "ci_low": diff - Z95 * se,
        "ci_high": diff + Z95 * se,
        "p_value": p,
        "n_paired": per_seed[0]["n_paired"],
    }


def build_entries(runs: list[Run], max_examples: int = 5) -> list[Entry]:
    """Leaderboard rows, sorted by task, model, baseline first, then method."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.group_key].append(run)
    baselines: dict[tuple[str, int], Run] = {}
    for run in runs:
        if run.is_baseline:
            baselines.setdefault((run.baseline_key, run.seed), run)
    names, stats = Labeller(runs), PairedStats()
    entries = [_entry(sorted(g, key=lambda r: r.seed), baselines, names, stats, max_examples) for g in groups.values()]
    return sorted(entries, key=lambda e: (e.task, e.model, not e.is_baseline, e.method, e.n_samples))


def _entry(
    group: list[Run], baselines: dict[tuple[str, int], Run], names: Labeller, stats: PairedStats, max_examples: int
) -> Entry:
    first = group[0]
    row, key = first.headline
    values = [r.metric(row, key) for r in group]  # (value, stderr) per seed
    finite = [v for v, _ in values if v is not None]
    entry = Entry(
        task=names(first, "task"),
        model=names(first, "model"),
        method=names(first, "method"),
        metric=f"{row}: {key}",
        higher_is_better=first.higher_is_better(key),
        n_samples=len(first.records),
        seeds=[r.seed for r in group],
        value=_mean([v for v, _ in values]),
        stderr=_mean([s for _, s in values]),
        spread=statistics.stdev(finite) if len(finite) > 1 else None,
        is_baseline=first.is_baseline,
        seconds_per_sample=_mean([r.seconds_per_sample for r in group]),
        runs=[str(r.directory) for r in group],
    )
    if not entry.is_baseline:
        _pair_with_baseline(entry, group, baselines, stats, max_examples)
    return entry


def _pair_with_baseline(
    entry: Entry, group: list[Run], baselines: dict[tuple[str, int], Run], stats: PairedStats, max_examples: int
) -> None:
    """Fill the delta, time ratio and changed answers from the baselines with the same items and seeds."""
    pairs = [(r, baselines.get((r.baseline_key, r.seed))) for r in group]
    pairs = [(r, b) for r, b in pairs if b is not None]
    if not pairs:
        seeds = ", ".join(str(r.seed) for r in group)
        entry.note = f"no method=none run on the same items with seed {seeds}"
        return
    if len(pairs) < len(group):
        entry.note = f"delta over seeds {[r.seed for r, _ in pairs]} (others have no baseline)"
    try:
        entry_stats = _combine([stats.headline(r, b) for r, b in pairs])
    except (ValueError, KeyError) as exc:
        entry.note = f"paired comparison refused: {exc}"
        return
    entry.delta, entry.ci_low, entry.ci_high = entry_stats["diff"], entry_stats["ci_low"], entry_stats["ci_high"]
    entry.p_value, entry.n_paired = entry_stats["p_value"], entry_stats["n_paired"]
    ratios = [
        r.seconds_per_sample / b.seconds_per_sample for r, b in pairs if r.seconds_per_sample and b.seconds_per_sample
    ]
    entry.time_ratio = _mean(ratios)
    entry.changed, entry.examples = changed_answers(*pairs[0], max_examples)
