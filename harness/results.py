"""The run's results file (lm-eval ``EvalResults`` layout plus method/model blocks) and its printed table."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness.config import REPO_ROOT

PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "hydra-core",
    "omegaconf",
    "wandb",
    "numpy",
    "pillow",
    "opencv-python-headless",
    "pyarrow",
)


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


@functools.cache
def _versions() -> dict[str, str | None]:
    return {name: package_version(name) for name in PACKAGES}


def git_info(root: Path = REPO_ROOT) -> dict[str, str | None]:
    """``git describe --always --dirty`` of the harness checkout and the SHA-256 of its uncommitted diff.

    Computed once per process (two ``git`` subprocesses, ~15 ms, were a fixed cost of every run of a multirun):
    the code a process runs is the code it imported, so the first reading is the truthful one.
    """
    return dict(_git_info(root))


@functools.cache
def _git_info(root: Path) -> dict[str, str | None]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout

    describe = git("describe", "--always", "--dirty")
    diff = git("diff", "HEAD")
    return {"describe": describe.strip() if describe else None, "diff_sha256": sha256_text(diff) if diff else None}


def environment() -> dict[str, Any]:
    """Python, platform and package versions (read once per process: installed packages do not change under it)."""
    versions = dict(_versions())
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "cpu_count": os.cpu_count(),
    }


def peak_memory() -> dict[str, float | None]:
    """Peak resident memory of this process and peak CUDA allocation, in MiB."""
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    cuda_mb = None
    try:
        import torch

        if torch.cuda.is_available():
            cuda_mb = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    return {"max_rss_mb": round(rss_mb, 1), "cuda_max_allocated_mb": None if cuda_mb is None else round(cuda_mb, 1)}


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def build_results(**blocks: Any) -> dict[str, Any]:
    """Assemble the results document from named blocks, adding date, git and environment."""
    return {
        **blocks,
        "date": time.time(),
        "git": git_info(),
        "environment": environment(),
        "peak_memory": peak_memory(),
    }


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
                if key in ("alias", "sample_len") or "_stderr" in key or not isinstance(value, int | float):
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
                        f"{value:.4f}",
                        "±" if stderr is not None else "",
                        f"{stderr:.4f}" if stderr is not None else "N/A",
                    ]
                )
    lines = ["|" + "|".join(head) + "|", "|" + "|".join("-" * max(len(h), 1) for h in head) + "|"]
    lines += ["|" + "|".join(r) + "|" for r in rows]
    return "\n".join(lines)
