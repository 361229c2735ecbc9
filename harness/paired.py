"""A run's ``method=none`` baseline: finding it beside the run and storing the paired block in its results.

The statistics (bootstrap differences, McNemar's test) are :mod:`core.paired`'s; this module is the engine's side:
which baseline a run is compared with (:func:`find_baseline`: a ``none-*`` directory of the same task and model
whose ``results.json`` has the same ``pair_hash``), the ``paired`` block written into the results file, and its
printed summary.

    python -m harness.paired RUN_DIR [--baseline DIR]     # (re)compute and store results["paired"]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.paired import BASELINE_METHOD, compare
from core.records import load_records
from core.results import write_json
from tasks.base import Task, task_from_config


def find_baseline(output_dir: str | Path, pair_hash: str, sample_set: str | None = None) -> Path | None:
    """The newest ``none-*`` run directory beside ``output_dir`` whose results carry ``pair_hash``.

    With ``sample_set`` (the run's items hash), a baseline over the same items comes first: the full run and a
    ``limit`` run of the baseline (``none-<hash>`` and ``none-<hash>-limit<N>``) share the pair hash.
    """
    parent = Path(output_dir).resolve().parent
    found = []
    for results in parent.glob(f"{BASELINE_METHOD}-*/results.json"):
        try:
            doc = json.loads(results.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if doc.get("pair_hash") == pair_hash and results.parent != Path(output_dir).resolve():
            same = sample_set is not None and (doc.get("sample_set") or {}).get("sha256") == sample_set
            found.append((same, results.stat().st_mtime, results.parent))
    return max(found, key=lambda f: f[:2])[2] if found else None


def paired_block(
    task: Task, records: list[dict[str, Any]], baseline_dir: Path, samples_file: str, seed: int
) -> dict[str, Any]:
    """The ``paired`` block of a results file (an ``error`` entry instead when the comparison is refused)."""
    info: dict[str, Any] = {"baseline_dir": str(baseline_dir)}
    try:
        base = list(load_records(baseline_dir / samples_file).values())
        return {**info, **compare(task, records, base, seed=seed)}
    except (OSError, ValueError) as exc:
        return {**info, "error": str(exc)}


def paired_summary(block: dict[str, Any], max_rows: int = 6) -> str:
    """A few printable lines: the baseline, the headline differences with CIs, McNemar's test."""
    if "error" in block:
        return f"paired vs {block['baseline_dir']}: refused ({block['error']})"
    lines = [f"paired vs {block['baseline_dir']} ({block['n_paired']} samples, {block['n_clusters']} clusters):"]
    shown = 0
    for row, metrics in block["metrics"].items():
        for key, m in metrics.items():
            if shown >= max_rows or m["diff"] is None:
                continue
            ci = f"[{m['ci_low']:+.4f}, {m['ci_high']:+.4f}]" if m["ci_low"] is not None else "[n/a]"
            lines.append(f"  {row} {key}: {m['method']:.4f} vs {m['baseline']:.4f}, diff {m['diff']:+.4f} {ci}")
            shown += 1
    mc = block.get("mcnemar")
    if mc:
        lines.append(
            f"  McNemar on {mc['outcome']}: method-only right {mc['method_only_right']}, baseline-only right "
            f"{mc['baseline_only_right']}, p = {mc['p_value_exact']:.4g} (exact)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Recompute the paired block of a finished run (e.g. after its baseline finished) and store it."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--baseline", type=Path, default=None, help="baseline run directory (default: found beside)")
    args = ap.parse_args(argv)
    results = json.loads((args.run_dir / "results.json").read_text(encoding="utf-8"))
    baseline = args.baseline or find_baseline(
        args.run_dir, results["pair_hash"], (results.get("sample_set") or {}).get("sha256")
    )
    if baseline is None:
        raise SystemExit(f"no {BASELINE_METHOD}-* run with pair_hash {results['pair_hash']} beside {args.run_dir}")
    task = task_from_config(results["config"]["task"], strict=False)
    records = list(load_records(args.run_dir / results["samples_file"]).values())
    results["paired"] = paired_block(task, records, baseline, results["samples_file"], results["config"]["seed"])
    write_json(args.run_dir / "results.json", results)
    print(json.dumps(results["paired"], indent=1)[:4000])


if __name__ == "__main__":
    main()
