"""Finished runs as the reports read them: a run directory's ``results.json`` and its samples file, nothing else.

A run directory is any directory holding a ``results.json`` written by the engine (single runs and Hydra
multiruns alike: ``outputs/<task>/<model>/<method>-<hash>/``). :func:`scan` finds them under a root and
:class:`Run` exposes what the leaderboard groups and pairs by:

* ``group_key`` — everything that determines results except the seed (model, task and method configs, and the
  evaluated items): runs that share it are seeds of one experiment and are aggregated;
* ``baseline_key`` — the same without the method: the ``method=none`` runs with this key (and the same seed) are
  the run's paired baseline;
* ``sample_set`` — SHA-256 of the evaluated items (ids, document and target hashes): runs on different items
  never share a key, so they are never compared as paired.

Nothing here imports the engine, a model or torch.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from core.paired import BASELINE_METHOD
from core.records import load_records

RESULTS_FILE = "results.json"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Run:
    """One finished run (read-only).

    Attributes:
        directory: The run directory.
        results: The parsed ``results.json``.
    """

    directory: Path
    results: dict[str, Any]
    _records: dict[str, dict[str, Any]] | None = field(default=None, repr=False)

    # ---- identity
    @property
    def config(self) -> dict[str, Any]:
        """The fully resolved config of the run."""
        return self.results["config"]

    @property
    def task(self) -> str:
        """Task name."""
        return self.config["task"]["name"]

    @property
    def model(self) -> str:
        """Model option name (``conf/model/<name>.yaml``)."""
        return self.config["model"]["name"]

    @property
    def method(self) -> str:
        """Method name."""
        return self.config["method"]["name"]

    @property
    def seed(self) -> int:
        """The run's seed."""
        return int(self.config.get("seed", 0))

    @property
    def is_baseline(self) -> bool:
        """Whether this is a ``method=none`` run."""
        return self.method == BASELINE_METHOD

    @cached_property
    def sample_set(self) -> str:
        """SHA-256 of the evaluated items (from the results file; recomputed from the records for older files)."""
        stored = self.results.get("sample_set")
        if stored:
            return stored["sha256"]
        lines = sorted(f"{r['sample_id']}\t{r['doc_hash']}\t{r['target_hash']}" for r in self.records.values())
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    @property
    def group_key(self) -> str:
        """Key shared by runs that differ only in seed."""
        return _digest([self.config["model"], self.config["task"], self.config["method"], self.sample_set])

    @property
    def baseline_key(self) -> str:
        """Key shared by this run and its ``method=none`` baselines (any seed)."""
        return _digest([self.config["model"], self.config["task"], self.sample_set])

    # ---- metrics
    @property
    def headline(self) -> tuple[str, str]:
        """``(results row, "metric,filter")`` of the task's headline metric."""
        head = self.results.get("task", {}).get("headline")
        if head:
            return head["row"], head["metric"]
        row, metrics = next(iter(self.results["results"].items()))  # older files: the first metric
        key = next(k for k, v in metrics.items() if k not in ("alias", "sample_len") and "_stderr" not in k)
        return row, key

    def metric(self, row: str, key: str) -> tuple[float | None, float | None]:
        """``(value, stderr)`` of one metric (``None`` where absent or undefined)."""
        metrics = self.results.get("results", {}).get(row, {})
        name, _, filt = key.partition(",")
        return metrics.get(key), metrics.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr")

    def higher_is_better(self, key: str) -> bool | None:
        """Direction of a metric (``None`` when the task does not say)."""
        return self.results.get("higher_is_better", {}).get(self.task, {}).get(key.partition(",")[0])

    # ---- records
    @property
    def records(self) -> dict[str, dict[str, Any]]:
        """Successful per-sample records of this run's items, by ``sample_id`` (read once)."""
        if self._records is None:
            path = self.directory / self.results.get("samples_file", f"samples_{self.task}.jsonl")
            records = load_records(path) if path.exists() else {}
            ids = (self.results.get("sample_set") or {}).get("ids")
            if ids is not None:
                wanted = set(ids)
                records = {k: r for k, r in records.items() if k in wanted}
            self._records = records
        return self._records

    @property
    def seconds_per_sample(self) -> float | None:
        """Median wall time per sample.

        From the records' ``wall_s`` (their batch's wall time / batch size); older files: generation time over
        generated samples. The median, because the first batch of a process pays one-off warm-up costs.
        """
        walls = [r["wall_s"] for r in self.records.values() if r.get("wall_s") is not None]
        if walls:
            return statistics.median(walls)
        timings, generated = self.results.get("timings", {}), self.results.get("resumed", {}).get("generated")
        if timings.get("generation_s") and generated:
            return timings["generation_s"] / generated
        return None


def is_results_file(doc: Any) -> bool:
    """Whether a parsed JSON document is an engine results file."""
    return isinstance(doc, dict) and all(k in doc for k in ("results", "config", "config_hash"))


def scan(root: str | Path) -> list[Run]:
    """Every run under ``root`` (``root`` itself may be a run directory), sorted by path.

    Unreadable or foreign ``results.json`` files are skipped with a warning, never silently.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"runs directory {root} does not exist")
    runs = []
    for path in sorted(root.rglob(RESULTS_FILE)):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # .hydra/, .git/ ...
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            warnings.warn(f"skipping {path}: unreadable ({exc})", stacklevel=2)
            continue
        if not is_results_file(doc):
            warnings.warn(f"skipping {path}: not a results file of this harness", stacklevel=2)
            continue
        runs.append(Run(path.parent, doc))
    return runs
