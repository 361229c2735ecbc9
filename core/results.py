"""The results file's format: metric keys, content hashes, atomic writing and the printed table.

A results file follows lm-eval's ``EvalResults`` layout (``results``, ``versions``, ``higher_is_better``, ...) plus
this harness's ``model``/``method``/``paired`` blocks. Writers (the engine) and readers (reports, the regression
check) share these helpers; provenance (git, environment, memory) is added by :mod:`harness.provenance`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any


def stderr_key(key: str) -> str:
    """``"acc,none"`` → ``"acc_stderr,none"`` (lm-eval's naming of a metric's standard error)."""
    metric, _, filt = key.partition(",")
    return f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr"


def package_version(name: str) -> str | None:
    """Installed version of a distribution, ``None`` when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def sha256_text(text: str | None) -> str | None:
    """Hex SHA-256 of a string (``None`` stays ``None``)."""
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex SHA-256 of a canonical JSON dump."""
    return sha256_text(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str))


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def make_table(results: dict[str, Any]) -> str:
    """Markdown table in lm-eval's layout: Tasks | Version | Filter | n | Metric | ↑↓ | Value | ± | Stderr.

    Hand-written (a dozen lines) instead of adding pytablewriter as a dependency for one table.
    """
    head = ["Tasks", "Version", "Filter", "n", "Metric", "", "Value", "", "Stderr"]
    rows = []
    for task, version in results["versions"].items():
        better = results["higher_is_better"].get(task, {})
        for sub, metrics in results["results"].items():
            for key, value in metrics.items():
                if key in ("alias", "sample_len") or "_stderr" in key or not isinstance(value, int | float | None):
                    continue
                metric, _, filt = key.partition(",")
                stderr = metrics.get(stderr_key(key))
                arrow = {True: "↑", False: "↓"}.get(better.get(metric), "")
                rows.append(
                    [
                        sub if sub != task else task,
                        version,
                        filt or "none",
                        str(metrics.get("sample_len", "")),
                        metric,
                        arrow,
                        "n/a" if value is None else f"{value:.4f}",  # NaN in the estimate (JSON null)
                        "±" if stderr is not None else "",
                        f"{stderr:.4f}" if stderr is not None else "N/A",
                    ]
                )
    lines = ["|" + "|".join(head) + "|", "|" + "|".join("-" * max(len(h), 1) for h in head) + "|"]
    lines += ["|" + "|".join(r) + "|" for r in rows]
    return "\n".join(lines)
