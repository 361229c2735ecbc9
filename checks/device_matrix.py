"""Every family × every method through the ``run.py`` path on one device: does each combination run?

    python -m checks.device_matrix --device cuda --dtype bfloat16          # on a GPU machine
    python -m checks.device_matrix --device cpu --models llava --methods none fastv --limit 2

Each cell composes the same Hydra config ``run.py model=<m> method=<x> model.device=... model.dtype=...`` would
(``conf/``, overrides and all), builds task, adapter and method with :func:`harness.engine.from_config` and runs
:func:`harness.engine.evaluate` on the shipped checkpoint and the shipped shapes-world task, in one process (a
process per cell would spend most of its time importing). A cell is ``ok`` (with its accuracy and per-sample
errors), ``unsupported`` (the method refused the family before the model loaded, with its message) or ``FAILED``
(anything else: the exception and where it was raised). Device bugs (a host tensor indexing a device tensor, say)
show up only on the device they concern: run it on every kind of device the harness claims, and on the CPU with
``--strict-devices`` (:mod:`checks.devicecheck`), which makes a tensor created without ``device=`` fail here too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from harness.config import REPO_ROOT

MODELS = ("llava", "qwen_vl", "internvl")
#: ``method=`` options and extra overrides: every ``conf/method`` option, the debiasing plug-in on both pruners,
#: EmbedLens dropping tokens, VAR with sinks that exist
METHODS: dict[str, list[str]] = {
    **{p.stem: [] for p in sorted((REPO_ROOT / "conf" / "method").glob("*.yaml"))},
    "fastv+debias": ["method=fastv", "method.debias=true"],
    "fastervlm+debias": ["method=fastervlm", "method.debias=true"],
    "embedlens+drop": ["method=embedlens", "method.mode=drop"],
    # the shipped checkpoints' calibrated VAR finds no sinks (tiny models have no massive activations), and their
    # 2-layer LMs leave "auto" (layers 2 .. L-2) empty: force sinks and edits in both layers
    "var+forced": [
        "method=var",
        "method.layers=[0,1]",
        "method.sink_dims=[0,1,2,3]",
        "method.tau=2.0",
        "method.rho=0.0",
        "method.visual_mass=0.0",
    ],
}


def cell(model: str, method: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run one combination; never raises."""
    from hydra import compose, initialize_config_dir

    from checks.devicecheck import strict_devices
    from harness.engine import evaluate, from_config
    from methods.base import UnsupportedError

    overrides = METHODS[method] or [f"method={method}"]
    overrides = [f"model={model}", *overrides, f"model.device={args.device}", f"model.dtype={args.dtype}",
                 f"task={args.task}", f"limit={args.limit}", f"batch_size={args.batch_size}", "progress=false",
                 f"prefetch={args.prefetch}", f"output_root={out}"]  # fmt: skip
    t0 = time.perf_counter()
    try:
        with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        task, adapter, meth, settings = from_config(cfg)
        settings.report = False
        with strict_devices() if args.strict_devices else contextlib.nullcontext():
            results = evaluate(task, adapter, meth, settings)
    except UnsupportedError as exc:
        return {"status": "unsupported", "why": str(exc).splitlines()[0]}
    except Exception as exc:  # the matrix reports every failure instead of stopping at the first
        return {"status": "FAILED", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200],
                "where": _where(exc)}  # fmt: skip
    n = next(iter(results["n-samples"].values()))
    metric = next(iter(results["results"].values()))
    acc = next((v for k, v in metric.items() if k.startswith("acc")), None)
    return {"status": "ok", "seconds": round(time.perf_counter() - t0, 1), "samples": n["effective"],
            "errors": n["errors"], "acc": acc, "activity": meth.describe().get("activity")}  # fmt: skip


def _where(exc: BaseException) -> str:
    """``file:line`` of the innermost frame in this repository (else the innermost one), the checker aside."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f.filename.startswith(str(REPO_ROOT)) and "site-packages" not in f.filename
            and not f.filename.endswith("devicecheck.py")]  # fmt: skip
    f = (ours or frames)[-1]
    return f"{Path(f.filename).relative_to(REPO_ROOT) if ours else Path(f.filename).name}:{f.lineno}"


def _detail(r: dict[str, Any]) -> str:
    if r["status"] == "ok":
        return f"{r['samples']} samples, {r['errors']} errors, acc {r['acc']}, {r['seconds']} s"
    if r["status"] == "unsupported":
        return r["why"][:150]
    return f"{r['error']} ({r['where']})"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point: print the matrix (Markdown) and write ``--json``; exit 1 if any cell FAILED."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--task", default="pope")
    ap.add_argument("--limit", type=int, default=6, help="samples per split")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--prefetch", default="auto", help="the run option (auto: decode ahead on a GPU only)")
    ap.add_argument(
        "--strict-devices",
        action="store_true",
        help="default device 'meta' inside model calls: host tensors made without device= fail here too",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="device-matrix-"))
    table: dict[str, dict[str, Any]] = {}
    report = {"device": args.device, "dtype": args.dtype, "task": args.task, "limit": args.limit, "cells": table}
    print("| model | method | status | detail |\n|---|---|---|---|", flush=True)
    for model in args.models:
        for method in args.methods:
            r = table.setdefault(model, {})[method] = cell(model, method, args, out)
            detail = _detail(r)
            print(f"| {model} | {method} | {r['status']} | {detail} |", flush=True)
            if args.json:  # after every cell: a run cut short by a time limit keeps the cells it finished
                args.json.write_text(json.dumps(report, indent=1, default=str))
    if any(c["status"] == "FAILED" for row in table.values() for c in row.values()):
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
