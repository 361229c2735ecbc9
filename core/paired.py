"""Paired comparison of a method run against its ``method=none`` baseline on the same samples.

A mitigation method and its baseline answer the *same* items, so their difference is estimated far more
precisely from paired data than from two independent standard errors. For every metric of the task:

* the difference ``method − baseline`` with its standard error and a percentile confidence interval from a
  bootstrap that resamples clusters (images) jointly for both runs — one draw picks the same images for the
  method and for the baseline, so the correlation between the two runs is kept;
* for the task's binary per-sample outcome (correct / no hallucination), McNemar's test on the discordant pairs
  (``b`` = baseline right and method wrong, ``c`` = baseline wrong and method right): the exact two-sided
  binomial p-value (``b ~ Binomial(b + c, 1/2)`` under the null) and the χ² statistic with continuity
  correction ``max(|b − c| − 1, 0)² / (b + c)`` with its p-value.

Samples are paired by ``sample_id`` and must carry the same ``doc_hash`` and ``target_hash`` in both runs
(otherwise the runs did not evaluate the same data and the comparison is refused). The baseline of a run is
found by the engine (:func:`harness.paired.find_baseline`); reports pair runs from their files
(:mod:`reports.table`). Both call :func:`compare`, which needs of the task only its metric definitions.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from core.stats import Outcomes, cluster_bootstrap, finite_or_none

BASELINE_METHOD = "none"


class Task(Protocol):
    """What a comparison needs of a task (:class:`tasks.base.Task` has it): its metrics as additive counts."""

    n_boot: int

    def outcomes(self, records: list[dict[str, Any]]) -> Outcomes:
        """The records' per-sample counts and the statistics computed from them."""


def mcnemar(baseline: np.ndarray, method: np.ndarray) -> dict[str, Any]:
    """McNemar's test on paired binary outcomes (1 = right), the p-values from SciPy's distributions.

    Args:
        baseline: ``[n]`` 0/1 outcomes of the baseline run.
        method: ``[n]`` 0/1 outcomes of the method run, same samples in the same order.

    Returns:
        Counts of the 2×2 table, the continuity-corrected χ² ``statistic`` and its ``p_value``, and the exact
        two-sided binomial ``p_value_exact``; p-values are 1.0 when there is no discordant pair.
    """
    from scipy.stats import binomtest, chi2  # here, not at import: the run's CLI starts without SciPy's import cost

    base, meth = np.asarray(baseline, dtype=bool), np.asarray(method, dtype=bool)
    b = int(np.sum(base & ~meth))  # baseline right, method wrong
    c = int(np.sum(~base & meth))  # baseline wrong, method right
    n = b + c
    stat = max(abs(b - c) - 1, 0) ** 2 / n if n else 0.0  # Edwards' continuity correction, floored at 0
    return {
        "both_right": int(np.sum(base & meth)),
        "both_wrong": int(np.sum(~base & ~meth)),
        "baseline_only_right": b,
        "method_only_right": c,
        "statistic": stat,
        "p_value": float(chi2.sf(stat, df=1)) if n else 1.0,
        "p_value_exact": float(binomtest(min(b, c), n, 0.5).pvalue) if n else 1.0,  # b ~ Binomial(b + c, 1/2)
    }


def _pair(records: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> tuple[list[dict], list[dict], int]:
    """Successful records present in both runs, in the method run's order, and how many were left unpaired."""
    base = {r["sample_id"]: r for r in baseline if not r.get("error")}
    mine = [r for r in records if not r.get("error")]
    pairs = [(r, base[r["sample_id"]]) for r in mine if r["sample_id"] in base]
    for r, b in pairs:
        for key in ("doc_hash", "target_hash"):
            if r.get(key) != b.get(key):
                raise ValueError(
                    f"sample {r['sample_id']!r} differs between the runs ({key}); they did not evaluate the same data"
                )
    pairs.sort(key=lambda p: p[0]["index"])
    unpaired = len(mine) + len(base) - 2 * len(pairs)
    return [p[0] for p in pairs], [p[1] for p in pairs], unpaired


def compare(
    task: Task,
    records: list[dict[str, Any]],
    baseline: list[dict[str, Any]],
    *,
    seed: int = 0,
    n_boot: int | None = None,
    level: float = 0.95,
) -> dict[str, Any]:
    """Paired differences (method − baseline) of every metric, with clustered-bootstrap CIs, and McNemar's test.

    Args:
        task: The task both runs evaluated (its :meth:`~tasks.base.Task.outcomes` defines the metrics).
        records: Per-sample records of the method run.
        baseline: Per-sample records of the baseline run.
        seed: Bootstrap seed.
        n_boot: Bootstrap draws (default: the task's ``n_boot``).
        level: Confidence level of the percentile interval.

    Returns:
        ``{"n_paired", "n_unpaired", "n_clusters", "n_boot", "ci_level", "metrics": {row: {metric: {...}}},
        "mcnemar"}``; each metric holds ``method``, ``baseline``, ``diff``, ``diff_stderr``, ``ci_low``,
        ``ci_high`` (``None`` where undefined).

    Raises:
        ValueError: When a paired sample's document or target differs between the runs, or nothing pairs.
    """
    mine, base, unpaired = _pair(records, baseline)
    if not mine:
        raise ValueError("no sample was answered successfully in both runs")
    a, b = task.outcomes(mine), task.outcomes(base)
    if a.names != b.names:
        raise ValueError("the two runs report different metrics (task options differ?)")
    n_boot = task.n_boot if n_boot is None else n_boot
    k = a.counts.shape[1]

    def stat(sums: np.ndarray) -> np.ndarray:  # [..., 2K] -> [..., 3, M]: method, baseline, difference
        sa, sb = a.stat_fn(sums[..., :k]), b.stat_fn(sums[..., k:])
        return np.stack([sa, sb, sa - sb], axis=-2)

    res = cluster_bootstrap(
        [str(r["image_id"]) for r in mine], np.hstack([a.counts, b.counts]), stat, n_boot=n_boot, seed=seed
    )
    return {
        "n_paired": len(mine),
        "n_unpaired": unpaired,
        "n_clusters": res.n_clusters,
        "n_boot": n_boot,
        "ci_level": level,
        "metrics": _metric_table(a, res.estimate, res.stderr[2], res.draws[:, 2], level),
        "mcnemar": _mcnemar_block(a, b),
    }


def _metric_table(
    out: Outcomes, est: np.ndarray, diff_se: np.ndarray, diff_draws: np.ndarray, level: float
) -> dict[str, dict[str, Any]]:
    """``{row: {metric: {method, baseline, diff, diff_stderr, ci_low, ci_high, p_value}}}`` from ``[3, M]`` estimates.

    ``p_value`` is the two-sided bootstrap p-value of "no difference": twice the smaller share of draws on either
    side of zero, each share ``(count + 1) / (n + 1)`` so that it is never 0 with finitely many draws.
    """
    alpha = (1 - level) / 2
    table: dict[str, dict[str, Any]] = {}
    for j, (row, key) in enumerate(out.names):
        draws = diff_draws[:, j][np.isfinite(diff_draws[:, j])]  # [n_finite]
        lo, hi = np.quantile(draws, [alpha, 1 - alpha]) if len(draws) >= 2 else (np.nan, np.nan)
        table.setdefault(row, {})[key] = {
            "method": finite_or_none(est[0, j]),
            "baseline": finite_or_none(est[1, j]),
            "diff": finite_or_none(est[2, j]),
            "diff_stderr": finite_or_none(diff_se[j]),
            "ci_low": finite_or_none(lo),
            "ci_high": finite_or_none(hi),
            "p_value": _bootstrap_p(draws),
        }
    return table


def _bootstrap_p(draws: np.ndarray) -> float | None:
    """Two-sided bootstrap p-value of a zero difference from the finite draws ``[n]`` (``None`` when < 2)."""
    n = len(draws)
    if n < 2:
        return None
    below, above = (np.sum(draws <= 0) + 1) / (n + 1), (np.sum(draws >= 0) + 1) / (n + 1)
    return float(min(1.0, 2 * min(below, above)))


def _mcnemar_block(a: Outcomes, b: Outcomes) -> dict[str, Any] | None:
    if a.binary is None or b.binary is None:
        return None
    return {"outcome": a.binary_name, **mcnemar(b.binary, a.binary)}
