"""The package layout's arrows run one way (docs/development.md#repository-layout).

Every ``import`` statement of the project's own packages is read from the source (function-level ones included,
``if TYPE_CHECKING:`` blocks excluded) and checked against what each package may import; a subprocess then checks
that the reports really load neither torch nor the engine.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN = {"core", "harness", "adapters", "methods", "tasks", "reports", "integrations", "shapes", "bench", "checks"}

#: package -> the project packages it may import (itself always)
ALLOWED = {
    "core": set(),
    "tasks": {"core"},
    "reports": {"core", "tasks"},
    "adapters": {"core"},
    "methods": {"core", "adapters", "tasks"},
    # entry points: the calibration CLIs load a model from the config and draw probes from the shapes world
    "methods/calibrate": {"core", "adapters", "methods", "tasks", "harness", "shapes"},
    "harness": {"core", "adapters", "methods", "tasks"},
    "integrations": {"core", "adapters", "methods", "tasks", "harness"},
}


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, top-level package)`` of every run-time import of a project package in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in OWN and node.lineno not in skip]
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package):
    allowed = ALLOWED[package] | {package.split("/")[0]}
    nested = [p for p in ALLOWED if p.startswith(f"{package}/")]  # judged by their own entry
    paths = [p for p in sorted((ROOT / package).rglob("*.py")) if not any(p.is_relative_to(ROOT / n) for n in nested)]
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {top}"
        for path in paths
        for line, top in imports_of(path)
        if top not in allowed
    ]
    assert not bad, f"{package}/ may import only {sorted(allowed)}:\n" + "\n".join(bad)


def test_the_checker_sees_a_function_level_import(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import harness.engine\n"
        "def f():\n    from harness.config import instantiate\n"
    )
    assert imports_of(src) == [(5, "harness")]


def test_reports_load_neither_torch_nor_the_engine():
    code = (
        "import sys, reports.leaderboard, reports.html, reports.plots;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'harness', 'adapters', "
        "'methods'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_shapes_world_is_one_package():
    """Its generator, exporters, POPE builder, tiny models, trainer and asset CLI live in shapes/ only."""
    moved = {"shapes", "shapes_export", "pope_build", "tiny", "train", "train_data", "assets"}
    stray = [p.name for d in ("tasks", "harness", "adapters") for p in (ROOT / d).glob("*.py") if p.stem in moved]
    assert not stray
    assert {"scene", "export", "pope_build", "tiny", "train", "train_data", "assets"} <= {
        p.stem for p in (ROOT / "shapes").glob("*.py")
    }
