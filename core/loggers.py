"""Result loggers. The local files are the source of truth; a logger only mirrors them.

``logger=none`` (the default, and what tests use) does nothing. ``logger=wandb`` mirrors a run to Weights &
Biases: ``wandb.init`` with the resolved config and ``dir`` = the run directory (``mode`` is never set here, so
``WANDB_MODE=offline|disabled`` and the user's W&B settings decide), metrics as ``<task>/<metric>``, an
``evaluation/eval_results`` table, a samples table and the results file as an artifact. If W&B cannot start or
fails while logging, a warning is printed and the run carries on with its local files; ``finish()`` is always
called. ``init_timeout`` (default 15 s, ``logger.init_timeout``) bounds how long ``wandb.init`` may wait for an
unreachable server (W&B's own default is 90 s).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from core.results import stderr_key


class NoLogger:
    """Logs nothing."""

    def start(self, config: dict[str, Any], run_dir: Path) -> None:
        """Nothing to start."""

    def log_results(self, results: dict[str, Any], results_path: Path, samples_path: Path) -> None:
        """Nothing to log."""

    def log_report(self, tables: dict[str, tuple[list[str], list[list[Any]]]], images: dict[str, Path]) -> None:
        """Nothing to log."""

    def finish(self) -> None:
        """Nothing to finish."""


class WandbLogger:
    """Mirror of a run on Weights & Biases.

    Args:
        project: W&B project.
        entity: W&B entity (team or user); ``None`` uses the default.
        name: Run name; ``None`` lets W&B choose.
        group: Run group (e.g. a sweep name).
        tags: Run tags.
        job_type: W&B job type.
        max_table_rows: Rows of the samples table (W&B tables hold at most 200k).
        init_timeout: Seconds ``wandb.init`` may take before the run goes on without W&B
            (``wandb.Settings(init_timeout=...)``; the mode still comes from ``WANDB_MODE`` / your settings).
    """

    def __init__(
        self,
        project: str = "lvlm-hallucination",
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        job_type: str = "eval",
        max_table_rows: int = 200_000,
        init_timeout: float = 15.0,
    ) -> None:
        self.init_kwargs = {
            "project": project,
            "entity": entity,
            "name": name,
            "group": group,
            "tags": list(tags or []),
            "job_type": job_type,
        }
        self.max_table_rows = max_table_rows
        self.init_timeout = float(init_timeout)
        self.run: Any = None

    def start(self, config: dict[str, Any], run_dir: Path) -> None:
        """``wandb.init``; on any failure warn and continue without W&B."""
        try:
            import wandb

            run_dir.mkdir(parents=True, exist_ok=True)
            settings = wandb.Settings(init_timeout=self.init_timeout)
            self.run = wandb.init(config=config, dir=str(run_dir), settings=settings, **self.init_kwargs)
        except Exception as exc:
            warnings.warn(
                f"W&B could not start ({type(exc).__name__}: {exc}); continuing with local files only", stacklevel=2
            )
            self.run = None

    def log_results(self, results: dict[str, Any], results_path: Path, samples_path: Path) -> None:
        """Log metrics, tables and the results artifact (warn on failure)."""
        if self.run is None:
            return
        try:
            self._log(results, results_path, samples_path)
        except Exception as exc:
            warnings.warn(f"W&B logging failed ({type(exc).__name__}: {exc}); local files are complete", stacklevel=2)

    def _log(self, results: dict[str, Any], results_path: Path, samples_path: Path) -> None:
        import wandb

        scalars, rows = {}, []
        for sub, metrics in results["results"].items():
            for key, value in metrics.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    scalars[f"{sub}/{key}"] = value
                    if "_stderr" not in key and key != "sample_len":
                        metric, _, filt = key.partition(",")
                        se = metrics.get(stderr_key(key))
                        rows.append([sub, filt or "none", metric, value, se])
        scalars.update(_paired_scalars(results.get("paired")))
        self.run.log(scalars)
        self.run.log(
            {
                "evaluation/eval_results": wandb.Table(
                    columns=["Tasks", "Filter", "Metric", "Value", "Stderr"], data=rows
                )
            }
        )
        self.run.log({"evaluation/samples": self._samples_table(samples_path)})
        art = wandb.Artifact(f"results-{self.run.id}", type="eval_results")
        art.add_file(str(results_path))
        art.add_file(str(samples_path))
        self.run.log_artifact(art)
        self.run.summary.update({"config_hash": results.get("config_hash"), "n_errors": results["errors"]["count"]})

    def log_report(self, tables: dict[str, tuple[list[str], list[list[Any]]]], images: dict[str, Path]) -> None:
        """Log a report's tables (``{key: (columns, rows)}``) and images (``{key: png path}``); warn on failure."""
        if self.run is None:
            return
        try:
            import wandb

            self.run.log({key: wandb.Table(columns=cols, data=rows) for key, (cols, rows) in tables.items()})
            self.run.log({key: wandb.Image(str(path)) for key, path in images.items()})
        except Exception as exc:
            warnings.warn(f"W&B logging failed ({type(exc).__name__}: {exc}); local files are complete", stacklevel=2)

    def _samples_table(self, samples_path: Path) -> Any:
        import wandb

        cols = ["sample_id", "split", "image_id", "prompt", "raw_output", "parsed", "target", "error"]
        data = []
        with samples_path.open(encoding="utf-8") as f:
            for line in f:
                if len(data) >= self.max_table_rows:
                    break
                rec = json.loads(line)
                data.append([None if rec.get(c) is None else str(rec.get(c)) for c in cols])
        return wandb.Table(columns=cols, data=data)

    def finish(self) -> None:
        """``wandb.finish()``, always safe to call."""
        if self.run is not None:
            try:
                self.run.finish()
            finally:
                self.run = None


def _paired_scalars(paired: dict[str, Any] | None) -> dict[str, float]:
    """``paired/<row>/<metric>/{diff,diff_stderr,ci_low,ci_high}`` and McNemar's p-values of a results file."""
    if not paired or "error" in paired:
        return {}
    out = {
        f"paired/{row}/{key}/{stat}": value
        for row, metrics in paired["metrics"].items()
        for key, m in metrics.items()
        for stat, value in m.items()
        if stat in ("diff", "diff_stderr", "ci_low", "ci_high") and value is not None
    }
    if paired.get("mcnemar"):
        out["paired/mcnemar/p_value_exact"] = paired["mcnemar"]["p_value_exact"]
        out["paired/mcnemar/statistic"] = paired["mcnemar"]["statistic"]
    return out
