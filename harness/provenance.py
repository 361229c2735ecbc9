"""Where a results file came from: the date, the git checkout, package versions, the machine and peak memory."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from core.results import package_version, sha256_text
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
    "torchvision",  # present: transformers preprocesses images with it instead of PIL (the model's image_processor)
    "opencv-python-headless",
    "pyarrow",
)


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
    """Python, platform, package versions and torch's build.

    Read once per process: installed packages do not change under it.
    """
    versions = dict(_versions())
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "torch_build": _torch_build(),
        "cpu_count": os.cpu_count(),
    }


def _torch_build() -> dict[str, Any]:
    """The torch that runs, and the GPUs it sees.

    Its version with the build tag (PyPI's CUDA wheel installs as ``2.11.0`` but runs as ``2.11.0+cu130``), the
    CUDA and cuDNN it was built with (``None``: a CPU build) and the visible GPUs' names in device order. ``{}``
    when torch is not imported (nothing here imports it for the record).
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    return {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if gpus else None,  # loading cuDNN without a GPU is wasted work
        "gpus": gpus,
    }


def reset_peak_memory() -> None:
    """Count :func:`peak_memory`'s peaks from now on.

    A multirun's jobs share one process (Hydra's basic launcher): without a reset, each results file would hold the
    largest peak of every run before it (a pruning run after ``none`` would report ``none``'s memory).
    """
    with contextlib.suppress(OSError):  # elsewhere the resident peak stays the process's (getrusage)
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak resident set size (VmHWM)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the current device: each data-parallel rank has its own


def peak_memory() -> dict[str, float | None]:
    """Peak resident memory and peak CUDA allocation since :func:`reset_peak_memory` (else the process's), in MiB."""
    try:
        status = Path("/proc/self/status").read_text()
        rss_mb = int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM:")).split()[1]) / 1024  # KiB
    except (OSError, StopIteration, ValueError, IndexError):
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    torch = sys.modules.get("torch")
    cuda = torch is not None and torch.cuda.is_available()
    cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return {"max_rss_mb": round(rss_mb, 1), "cuda_max_allocated_mb": None if cuda_mb is None else round(cuda_mb, 1)}


def build_results(**blocks: Any) -> dict[str, Any]:
    """Assemble the results document from named blocks, adding date, git and environment."""
    return {
        **blocks,
        "date": time.time(),
        "git": git_info(),
        "environment": environment(),
        "peak_memory": peak_memory(),
    }
