"""Regression check on method results: rerun a fixed matrix and compare with committed goldens.

    python -m checks.regress                    # run the matrix in a fresh directory, compare, exit 1 on a change
    python -m checks.regress --runs DIR         # compare existing runs instead (e.g. a multirun of the cells)
    python -m checks.regress --update           # rerun and rewrite the goldens, printing what moved
    python -m checks.regress --only pope        # cells whose name contains "pope"

The matrix (``checks/goldens/matrix.yaml``) is every task × every listed (model, method) cell on a fixed small
subset of the shapes-world exports, on the shipped tiny checkpoints. A golden (``checks/goldens/<task>/<cell>.json``)
holds the cell's per-sample parsed answers and errors, a hash of every raw output, the answer log-probabilities
of first-token scoring tasks, the evaluated items' hash and all metrics. A check fails on

* a parsed answer, a raw output or a per-sample error that differs (the raw output too, because an unparseable
  answer — every VCRBench answer of the tiny models — would otherwise hide any change);
* a recorded log-probability that moved by more than 1e-4 (CPU float noise is ~1e-6);
* a sample missing or added, or other evaluated items;
* a metric or standard error outside ``|now − golden| ≤ atol + rtol·|golden|`` (1e-6 both: metrics are functions
  of the answers, equal answers give equal metrics up to float summation order);
* a refusal ("unsupported") that appeared or disappeared, and a cell without golden.

Goldens hold the torch/transformers versions they were written with; a failure prints them beside the current
ones. This is the one report that runs models (in this process, through the engine); the leaderboard only reads
files.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.results import package_version, sha256_text
from harness.config import REPO_ROOT
from reports.runs import Run, scan

GOLDENS = REPO_ROOT / "checks" / "goldens"
MATRIX = GOLDENS / "matrix.yaml"
ATOL = RTOL = 1e-6
LOGPROB_ATOL = 1e-4  # recorded answer log-probabilities (first-token scoring tasks): CPU float noise is ~1e-6


@dataclass(frozen=True)
class Cell:
    """One run of the matrix: a task with its subset, and a (model, method, extra overrides) entry."""

    task: str
    subset: tuple[str, ...]  # the task's overrides (limit, ...)
    spec: tuple[str, ...]  # the entry: model=..., method=..., extra overrides
    common: tuple[str, ...] = ()  # overrides of every cell (seed, batch size)
    goldens: Path = GOLDENS  # the goldens directory (beside the matrix file)

    @property
    def overrides(self) -> list[str]:
        """Every Hydra override of the run."""
        return [f"task={self.task}", *self.subset, *self.common, *self.spec]

    @property
    def name(self) -> str:
        """``"<model>+<method>[+<extra override>...]"`` (the golden's file stem)."""
        return "+".join(o.split("=", 1)[1] if o.startswith(("model=", "method=")) else o for o in self.spec)

    @property
    def golden_path(self) -> Path:
        """Where this cell's golden lives."""
        return self.goldens / self.task / f"{self.name}.json"

    def __str__(self) -> str:
        return f"{self.task}/{self.name}"


def load_matrix(path: Path = MATRIX, only: str | None = None) -> list[Cell]:
    """The cells of the matrix file (optionally those whose ``task/name`` contains ``only``); goldens beside it."""
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(OmegaConf.load(path))
    cells = [
        Cell(task, tuple(subset), tuple(entry), tuple(spec.get("run", [])), Path(path).parent)
        for task, subset in spec["tasks"].items()
        for entry in spec["cells"]
    ]
    return [c for c in cells if only is None or only in str(c)]


# ------------------------------------------------------------------------------------------------- running
def run_cell(cell: Cell, root: Path, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Run one cell in ``root/<task>/<name>`` through the engine; returns its golden document.

    ``extra``: overrides of run options that must not change any output (e.g. ``prefetch=1``), added to the cell's.
    """
    from harness.config import compose_config
    from harness.engine import evaluate, from_config
    from methods.base import UnsupportedError

    cfg = compose_config([*cell.overrides, *extra])
    out = root / cell.task / cell.name
    task, adapter, method, settings = from_config(cfg, output_dir=out)
    settings.report = False
    try:
        evaluate(task, adapter, method, settings)
    except UnsupportedError as exc:
        return {"cell": str(cell), "overrides": cell.overrides, "unsupported": str(exc)}
    return golden_of(Run(out, json.loads((out / "results.json").read_text(encoding="utf-8"))), cell)


def golden_of(run: Run, cell: Cell) -> dict[str, Any]:
    """A cell's golden document from a finished run."""
    from core.records import load_errors

    path = run.directory / run.results["samples_file"]
    errors = {sid: e for sid, e in load_errors(path).items() if sid not in run.records} if path.exists() else {}
    samples = {
        sid: {"parsed": rec.get("parsed"), "raw_sha256": sha256_text(rec.get("raw_output"))}
        | ({"logprobs": rec["logprobs"]} if rec.get("logprobs") is not None else {})
        for sid, rec in sorted(run.records.items(), key=lambda kv: kv[1].get("index", 0))
    }
    samples.update({sid: {"error": reason} for sid, reason in sorted(errors.items())})
    return {
        "cell": str(cell),
        "overrides": cell.overrides,
        "unsupported": None,
        "sample_set": run.sample_set,
        "metrics": run.results["results"],
        "samples": samples,
        "versions": {name: package_version(name) for name in ("torch", "transformers")},
    }


def runs_by_cell(cells: list[Cell], runs_dir: Path) -> dict[Cell, dict[str, Any]]:
    """Golden documents of the cells found among existing runs (matched by the result-determining config hash)."""
    from harness.config import compose_config, config_hash

    found = {}
    by_hash = {run.results["config_hash"]: run for run in scan(runs_dir)}
    for cell in cells:
        run = by_hash.get(config_hash(compose_config(cell.overrides)))
        if run is not None:
            found[cell] = golden_of(run, cell)
    return found


# ------------------------------------------------------------------------------------------------- comparing
@dataclass(frozen=True)
class Change:
    """One difference between a golden and a rerun."""

    cell: str
    kind: str  # answer | output | logprob | error | missing | added | metric | items | unsupported | no golden | no run
    what: str
    golden: Any
    now: Any


def _close(a: Any, b: Any, atol: float, rtol: float) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        # equal infinities are equal (a log-probability of -inf: a token a contrastive decoder masks out)
        return a == b or abs(a - b) <= atol + rtol * abs(b)
    return a == b


def compare(golden: dict[str, Any], now: dict[str, Any], atol: float = ATOL, rtol: float = RTOL) -> list[Change]:
    """Every difference between a cell's golden and its rerun."""
    cell = golden["cell"]
    if golden.get("unsupported") or now.get("unsupported"):
        if golden.get("unsupported") != now.get("unsupported"):
            return [Change(cell, "unsupported", "refusal", golden.get("unsupported"), now.get("unsupported"))]
        return []
    changes = list(_sample_changes(cell, golden["samples"], now["samples"]))
    if golden["sample_set"] != now["sample_set"]:
        changes.append(Change(cell, "items", "sample_set", golden["sample_set"][:12], now["sample_set"][:12]))
    else:
        changes += _metric_changes(cell, golden["metrics"], now["metrics"], atol, rtol)
    return changes


def _sample_changes(cell: str, golden: dict[str, Any], now: dict[str, Any]) -> Iterator[Change]:
    for sid, g in golden.items():
        n = now.get(sid)
        if n is None:
            yield Change(cell, "missing", sid, g.get("parsed", g.get("error")), None)
        elif g.get("error") != n.get("error"):
            yield Change(cell, "error", sid, g.get("error"), n.get("error"))
        elif g.get("parsed") != n.get("parsed"):
            yield Change(cell, "answer", sid, g.get("parsed"), n.get("parsed"))
        elif g.get("raw_sha256") != n.get("raw_sha256"):
            yield Change(cell, "output", sid, g.get("raw_sha256", "")[:12], (n.get("raw_sha256") or "")[:12])
        elif moved := _moved(g.get("logprobs"), n.get("logprobs")):
            yield Change(cell, "logprob", f"{sid} {moved[0]}", moved[1], moved[2])
    for sid in now.keys() - golden.keys():
        yield Change(cell, "added", sid, None, now[sid].get("parsed", now[sid].get("error")))


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a/b": leaf}`` of a nested dict (a non-dict is its own leaf)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{prefix}/{key}").items()}


def _moved(golden: Any, now: Any) -> tuple[str, Any, Any] | None:
    """The first recorded log-probability that differs by more than :data:`LOGPROB_ATOL` (or exists on one side)."""
    g, n = _leaves(golden), _leaves(now)
    for key in sorted(g.keys() | n.keys()):
        if not _close(g.get(key), n.get(key), LOGPROB_ATOL, 0):
            return key, g.get(key), n.get(key)
    return None


def _metric_changes(cell: str, golden: dict, now: dict, atol: float, rtol: float) -> Iterator[Change]:
    for row in sorted(golden.keys() | now.keys()):
        g, n = golden.get(row, {}), now.get(row, {})
        for key in sorted(g.keys() | n.keys()):
            if key != "alias" and not _close(g.get(key), n.get(key), atol, rtol):
                yield Change(cell, "metric", f"{row} {key}", g.get(key), n.get(key))


# ------------------------------------------------------------------------------------------------- reporting
def _short(value: Any, width: int = 48) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def diff_table(changes: list[Change], limit: int = 200) -> str:
    """A fixed-width table of changes, by cell."""
    rows = sorted(changes, key=lambda c: (c.cell, c.kind, c.what))
    head = ("cell", "kind", "what", "golden", "now")
    cells = [(c.cell, c.kind, c.what, _short(c.golden), _short(c.now)) for c in rows[:limit]]
    widths = [max(len(r[i]) for r in [head, *cells]) for i in range(5)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    if len(rows) > limit:
        lines.append(f"... and {len(rows) - limit} more")
    return "\n".join(lines)


def write_golden(doc: dict[str, Any], path: Path) -> None:
    """Write a golden file (stable key order, one sample per line for readable diffs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def check(cells: list[Cell], results: dict[Cell, dict[str, Any]], update: bool) -> list[Change]:
    """Compare (and with ``update`` rewrite) every cell's golden; returns all changes."""
    changes: list[Change] = []
    for cell in cells:
        now = results.get(cell)
        golden = json.loads(cell.golden_path.read_text(encoding="utf-8")) if cell.golden_path.exists() else None
        if now is None:
            changes.append(Change(str(cell), "no run", "-", "golden" if golden else None, None))
            continue
        if golden is None:
            changes.append(Change(str(cell), "no golden", "-", None, now.get("unsupported") or "new cell"))
        else:
            changes += compare(golden, now)
        if update:
            write_golden(now, cell.golden_path)
    return changes


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (1 when a check failed)."""
    import methods  # noqa: F401  (registers methods)
    import tasks  # noqa: F401  (registers tasks)

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, default=None, help="compare existing runs under DIR instead of running")
    ap.add_argument("--keep", type=Path, default=None, help="run the matrix in DIR (kept) instead of a temp dir")
    ap.add_argument("--update", action="store_true", help="rewrite the goldens and print what moved")
    ap.add_argument("--only", default=None, help="only cells whose task/name contains this")
    ap.add_argument("--matrix", type=Path, default=MATRIX)
    ap.add_argument("--prefetch", default=None,
                    help="run every cell with this prefetch setting (e.g. 1: images decoded and processed on the "
                    "worker thread, as on a GPU); the goldens must still hold")  # fmt: skip
    args = ap.parse_args(argv)
    extra = [] if args.prefetch is None else [f"prefetch={args.prefetch}"]
    cells = load_matrix(args.matrix, args.only)
    t0 = time.perf_counter()
    if args.runs is not None:
        results = runs_by_cell(cells, args.runs)
    else:
        with tempfile.TemporaryDirectory(prefix="regress-") as tmp:
            root = args.keep or Path(tmp)
            results = {}
            for i, cell in enumerate(cells, 1):
                results[cell] = run_cell(cell, root, extra)
                print(f"[{i}/{len(cells)}] {cell} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    changes = check(cells, results, args.update)
    print(diff_table(changes) if changes else "no change")
    if changes and not args.update:
        print(_versions_hint(cells))
    verdict = "updated (goldens rewritten)" if args.update else ("FAILED" if changes else "passed")
    moved = len({c.cell for c in changes})
    elapsed = time.perf_counter() - t0
    print(f"\nregression {verdict}: {len(cells)} cells, {moved} changed, {len(changes)} changes, {elapsed:.0f}s")
    return 0 if args.update or not changes else 1


def _versions_hint(cells: list[Cell]) -> str:
    """Versions the goldens were written with, beside the current ones."""
    written = set()
    for cell in cells:
        if cell.golden_path.exists():
            versions = json.loads(cell.golden_path.read_text(encoding="utf-8")).get("versions", {})
            written.add(", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    now = ", ".join(f"{k} {package_version(k)}" for k in ("torch", "transformers"))
    return f"goldens written with: {'; '.join(sorted(written)) or '?'}; now: {now}"


if __name__ == "__main__":
    raise SystemExit(main())
