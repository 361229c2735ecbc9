"""Clustered bootstrap for count-based metrics (numpy only).

Benchmarks such as POPE (Li et al., EMNLP 2023) ask several questions about the same image, so the questions are
not independent draws: the image is the sampling unit. The standard error of a metric is therefore estimated
with a *cluster* bootstrap: resample whole clusters (images) with replacement, recompute the metric, take the
standard deviation over draws.

Design (vectorised, one set of draws for every statistic):

1. The caller describes each record by a row of additive counts, e.g. ``[n, tp, fp, tn, fn]``.
2. Records are summed per cluster: ``cluster_sums[c] = Σ rows of cluster c``.
3. A draw is a vector of multiplicities ``w[c]`` (how often cluster ``c`` was drawn, Σ w = n_clusters);
   the draw's column totals are ``w @ cluster_sums``.
4. ``stat_fn`` turns totals into statistics (accuracy, F1, ...), vectorised over draws.

Because every metric is a function of the same summed counts, all metrics (and all parsers, all splits) come
from one set of draws. Several sub-tasks that share clusters (POPE's three splits ask about the same images)
are bootstrapped *jointly* by giving each sub-task its own block of columns (:func:`block_columns`); the
standard error of a mean over sub-tasks then comes from the same draws as the per-sub-task ones.

Example:
    >>> import numpy as np
    >>> correct = np.array([1, 0, 1, 1])
    >>> counts = np.stack([np.ones(4), correct], axis=1)        # [n_records, 2]: (n, correct)
    >>> acc = lambda s: s[..., 1:2] / s[..., 0:1]               # [..., 2] -> [..., 1]
    >>> res = cluster_bootstrap(["a", "a", "b", "c"], counts, acc, n_boot=200, seed=0)
    >>> float(res.estimate[0])
    0.75
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.results import stderr_key

#: Upper bound on the number of entries of one weights chunk ``[chunk, n_clusters]`` (memory guard).
_MAX_CHUNK_ENTRIES = 4_000_000

StatFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class BootstrapResult:
    """Point estimates and bootstrap standard errors.

    Attributes:
        estimate: ``stat_fn`` applied to the totals of the full data, shape ``stat_shape``.
        stderr: Standard deviation (ddof=1) over the finite bootstrap draws, shape ``stat_shape``; NaN where
            fewer than two draws are finite, when ``n_boot < 2``, or with a single cluster (every draw would
            repeat the data, a meaningless zero).
        n_boot: Number of bootstrap draws.
        n_clusters: Number of distinct clusters.
        draws: The bootstrap statistics, shape ``[n_boot, *stat_shape]`` (for paired comparisons or plots).
    """

    estimate: np.ndarray
    stderr: np.ndarray
    n_boot: int
    n_clusters: int
    draws: np.ndarray


def factorize(cluster_ids: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, int]:
    """Map arbitrary hashable cluster labels to dense integer indices.

    Args:
        cluster_ids: One label per record (str, int, ...), length ``n_records``.

    Returns:
        ``(index, n_clusters)`` with ``index`` of shape ``[n_records]`` and values in ``[0, n_clusters)``,
        numbered in order of first appearance (so the result does not depend on how labels sort).
    """
    mapping: dict[Any, int] = {}
    index = np.fromiter((mapping.setdefault(c, len(mapping)) for c in cluster_ids), dtype=np.int64)
    return index, len(mapping)


def cluster_sums(cluster_index: np.ndarray, counts: np.ndarray, n_clusters: int) -> np.ndarray:
    """Sum record rows per cluster.

    Args:
        cluster_index: Integer cluster of each record, shape ``[n_records]``.
        counts: Additive per-record counts, shape ``[n_records, n_cols]``.
        n_clusters: Number of clusters.

    Returns:
        Per-cluster sums, shape ``[n_clusters, n_cols]``.
    """
    out = np.zeros((n_clusters, counts.shape[1]), dtype=np.float64)  # [n_clusters, n_cols]
    np.add.at(out, cluster_index, counts)
    return out


def bootstrap_weights(rng: np.random.Generator, n_draws: int, n_clusters: int) -> np.ndarray:
    """Multiplicities of each cluster in ``n_draws`` resamples of ``n_clusters`` clusters with replacement.

    Args:
        rng: Source of randomness.
        n_draws: Number of resamples in this chunk.
        n_clusters: Number of clusters (also the size of each resample).

    Returns:
        Weights of shape ``[n_draws, n_clusters]``; each row sums to ``n_clusters``.
    """
    picks = rng.integers(0, n_clusters, size=(n_draws, n_clusters))  # [n_draws, n_clusters]
    flat = (picks + n_clusters * np.arange(n_draws)[:, None]).ravel()
    counts = np.bincount(flat, minlength=n_draws * n_clusters)
    return counts.reshape(n_draws, n_clusters).astype(np.float64)  # [n_draws, n_clusters]


def _finite_std(draws: np.ndarray) -> np.ndarray:
    """Standard deviation (ddof=1) over axis 0 ignoring non-finite entries; NaN with < 2 finite values."""
    finite = np.isfinite(draws)  # [n_boot, *stat_shape]
    k = finite.sum(axis=0)
    safe = np.where(finite, draws, 0.0)
    mean = safe.sum(axis=0) / np.maximum(k, 1)
    sq = np.where(finite, (draws - mean) ** 2, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(sq / (k - 1))
    return np.where(k >= 2, std, np.nan)


def cluster_bootstrap(
    cluster_ids: Sequence[Any] | np.ndarray,
    counts: np.ndarray,
    stat_fn: StatFn,
    n_boot: int = 1000,
    seed: int = 0,
) -> BootstrapResult:
    """Clustered bootstrap of statistics that are functions of summed per-record counts.

    Args:
        cluster_ids: Cluster label of each record (e.g. the image id), length ``n_records``.
        counts: Additive per-record counts, shape ``[n_records, n_cols]`` (a 1-D array is one column).
        stat_fn: Vectorised map from column totals ``[n, n_cols]`` to statistics ``[n, *stat_shape]``. It may
            return NaN for undefined draws; those draws are left out of the standard error.
        n_boot: Number of bootstrap draws (0 or 1 gives a NaN standard error).
        seed: Seed of the numpy generator; equal seeds give identical draws.

    Returns:
        A :class:`BootstrapResult` with the full-data estimate and the bootstrap standard error.

    Raises:
        ValueError: When there are no records or ``counts`` and ``cluster_ids`` disagree in length.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim == 1:
        counts = counts[:, None]  # [n_records, 1]
    index, n_clusters = factorize(cluster_ids)
    if n_clusters == 0:
        raise ValueError("cluster_bootstrap needs at least one record")
    if index.shape[0] != counts.shape[0]:
        raise ValueError(f"{index.shape[0]} cluster ids but {counts.shape[0]} rows of counts")

    per_cluster = cluster_sums(index, counts, n_clusters)  # [n_clusters, n_cols]
    estimate = np.asarray(stat_fn(per_cluster.sum(axis=0)[None, :]))[0]  # [*stat_shape]

    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_CHUNK_ENTRIES // n_clusters)
    parts: list[np.ndarray] = []
    for start in range(0, n_boot, chunk):
        weights = bootstrap_weights(rng, min(chunk, n_boot - start), n_clusters)  # [chunk, n_clusters]
        parts.append(np.asarray(stat_fn(weights @ per_cluster)))  # [chunk, *stat_shape]
    draws = np.concatenate(parts) if parts else np.empty((0, *estimate.shape))  # [n_boot, *stat_shape]
    stderr = _finite_std(draws) if n_clusters >= 2 else np.full(estimate.shape, np.nan)  # one cluster: unknowable
    return BootstrapResult(estimate=estimate, stderr=stderr, n_boot=n_boot, n_clusters=n_clusters, draws=draws)


def block_columns(counts: np.ndarray, group_index: np.ndarray, n_groups: int) -> np.ndarray:
    """Spread per-record counts into one block of columns per group, for a joint bootstrap.

    A record of group ``g`` keeps its counts in columns ``[g * n_cols, (g + 1) * n_cols)`` and zeros elsewhere,
    so the column totals of a draw hold every group's totals side by side (reshape to ``[..., n_groups,
    n_cols]`` inside ``stat_fn``). All groups are then resampled with the same cluster draws.

    Args:
        counts: Per-record counts, shape ``[n_records, n_cols]``.
        group_index: Integer group (e.g. split) of each record, shape ``[n_records]``, values in ``[0, n_groups)``.
        n_groups: Number of groups.

    Returns:
        Block counts of shape ``[n_records, n_groups * n_cols]``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    n_records, n_cols = counts.shape
    out = np.zeros((n_records, n_groups, n_cols), dtype=np.float64)  # [n_records, n_groups, n_cols]
    out[np.arange(n_records), np.asarray(group_index, dtype=np.int64)] = counts
    return out.reshape(n_records, n_groups * n_cols)


def safe_divide(num: np.ndarray, den: np.ndarray, empty: float = 0.0) -> np.ndarray:
    """Elementwise ``num / den`` with ``empty`` where ``den == 0``.

    Args:
        num: Numerators (any shape broadcastable with ``den``).
        den: Denominators.
        empty: Value used where the denominator is zero.

    Returns:
        The quotient, float64.
    """
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    num, den = np.broadcast_arrays(num, den)
    out = np.full(num.shape, empty, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def finite_or_none(x: float) -> float | None:
    """``float(x)``, or ``None`` when ``x`` is NaN or infinite (JSON has no NaN)."""
    return float(x) if np.isfinite(x) else None


@dataclass(frozen=True)
class Outcomes:
    """Per-record additive counts and the statistics computed from their totals.

    Every metric of a task is a function of summed per-record counts, so one set of clustered bootstrap draws
    (:func:`core.stats.cluster_bootstrap`) gives all standard errors, and the same counts of two runs on the
    same samples give paired differences.

    Attributes:
        counts: ``[n_records, K]`` additive counts, one row per record in the order given.
        stat_fn: Vectorised map from totals ``[n, K]`` to statistics ``[n, M]`` (NaN where undefined).
        names: ``M`` pairs ``(row, "metric,filter")`` naming each statistic; ``row`` is a results key.
        sizes: ``sample_len`` of each row.
        binary: ``[n_records]`` 0/1 headline outcome per record (1 = right), for McNemar's test; ``None`` when
            the task has no per-record binary outcome.
        binary_name: What ``binary`` measures, e.g. ``"correct,pope_official"``.
    """

    counts: np.ndarray
    stat_fn: StatFn
    names: list[tuple[str, str]]
    sizes: dict[str, int]
    binary: np.ndarray | None = None
    binary_name: str = ""

    def rows(self, estimate: np.ndarray, stderr: np.ndarray) -> dict[str, dict[str, Any]]:
        """Results rows ``{row: {"alias", "sample_len", "<metric>,<filter>", "<metric>_stderr,<filter>"}}``."""
        out: dict[str, dict[str, Any]] = {}
        for j, (row, key) in enumerate(self.names):
            entry = out.setdefault(row, {"alias": row, "sample_len": self.sizes.get(row)})
            entry[key] = finite_or_none(estimate[j])
            entry[stderr_key(key)] = finite_or_none(stderr[j])
        return out
