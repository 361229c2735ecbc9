"""The dev environment's lock against pyproject.toml and against what is installed.

    python -m harness.lock check-env requirements/lock.txt requirements/lmms-eval.txt   # the venv equals the lock
    python -m harness.lock check-pyproject                                              # the lock fits pyproject

The lock (``make lock``, uv's hashed requirements.txt) pins every package of the dev environment; pyproject.toml
keeps ranges. They disagree when a requirement of pyproject (the core dependencies and the locked extras) is missing
from the lock or locked outside its range, or when the lock still holds a package that only pyproject asked for and
pyproject no longer does. ``make setup`` and ``make test`` run ``check-env``; tests/test_lock.py runs the pyproject
check, so editing a range without ``make lock`` fails the suite.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10, the floor of requires-python (the dev extra installs tomli there)
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parent.parent  # not harness.config: no hydra import needed
LOCK = REPO_ROOT / "requirements" / "lock.txt"
LMMS_LOCK = REPO_ROOT / "requirements" / "lmms-eval.txt"
PYPROJECT = REPO_ROOT / "pyproject.toml"
PROJECT = "lvlm-hallucination-harness"
#: The extras the lock covers (the Makefile's EXTRAS); ``vllm`` is CUDA-only and stays out.
LOCKED_EXTRAS = ("dev", "lmms", "lmms-run")
#: The environment the lock is for (markers of pyproject's requirements are judged in it): CPython 3.11, Linux.
LOCK_ENV = {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux",
            "platform_system": "Linux", "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "extra": ""}  # fmt: skip
#: Installed but not locked on purpose: the venv's own pip (it bootstraps uv), and the harness itself (editable).
UNLOCKED = frozenset({"pip", PROJECT})

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
_VIA = re.compile(r"^\s*#\s+(?:via\s+)?(\S.*?)\s*$")


@dataclass
class Pin:
    """One locked package: its version and what asked for it (uv's ``# via`` annotations)."""

    version: str
    via: list[str] = field(default_factory=list)


def read_lock(path: Path) -> dict[str, Pin]:
    """The pins of a uv-compiled requirements file, by canonical name.

    Args:
        path: The lock file.

    Returns:
        Canonical package name -> its pin.
    """
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    in_via = False
    for line in path.read_text().splitlines():
        if match := _PIN.match(line):
            current = pins[canonicalize_name(match[1])] = Pin(match[2])
            in_via = False
        elif current is not None and line.strip().startswith("# via"):
            in_via = True
            rest = line.strip()[len("# via") :].strip()
            current.via += [rest] if rest else []
        elif current is not None and in_via and (match := _VIA.match(line)):
            current.via.append(match[1])
    return pins


def pyproject_requirements(path: Path = PYPROJECT, extras: Iterable[str] = LOCKED_EXTRAS) -> list[Requirement]:
    """The core dependencies and the given extras of pyproject.toml."""
    project = tomllib.loads(path.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def check_pyproject(requirements: list[Requirement], pins: Mapping[str, Pin]) -> list[str]:
    """Where the lock disagrees with pyproject's requirements (empty when it does not).

    Args:
        requirements: pyproject's requirements (:func:`pyproject_requirements`).
        pins: The lock (:func:`read_lock`).

    Returns:
        One line per disagreement.
    """
    problems = []
    wanted = {canonicalize_name(r.name): r for r in requirements if r.marker is None or r.marker.evaluate(LOCK_ENV)}
    for name, req in wanted.items():
        if name not in pins:
            problems.append(f"{req} is not in the lock")
        elif not req.specifier.contains(Version(pins[name].version), prereleases=True):
            problems.append(f"{req}: the lock has {name}=={pins[name].version}")
    for name, pin in pins.items():
        askers = [v for v in pin.via if not v.startswith("-c ")]  # `-c requirements/torch-cpu.txt` only constrains
        if askers and all(v.startswith(PROJECT) for v in askers) and name not in wanted:
            problems.append(f"{name}=={pin.version} is locked for pyproject, which no longer asks for it")
    return problems


def installed() -> dict[str, str]:
    """Canonical name -> version of every distribution in this interpreter's environment."""
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}


def check_env(pins: Mapping[str, Pin], present: Mapping[str, str]) -> list[str]:
    """Where an environment differs from the lock (empty when it equals it, :data:`UNLOCKED` aside).

    Args:
        pins: The lock (all lock files merged).
        present: What is installed (:func:`installed`).

    Returns:
        One line per difference.
    """
    problems = [f"{n}=={p.version} is locked but not installed" for n, p in pins.items() if n not in present]
    problems += [
        f"{n} is installed at {present[n]}, locked at {p.version}"
        for n, p in pins.items()
        if n in present and Version(present[n]) != Version(p.version)
    ]
    extra = [n for n in present if n not in pins and n not in UNLOCKED]
    problems += [f"{n}=={present[n]} is installed but not locked" for n in extra]
    return sorted(problems)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``check-env LOCK...`` or ``check-pyproject``; prints the differences, exit status 1 when there are any."""
    parser = argparse.ArgumentParser(prog="python -m harness.lock", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["check-env", "check-pyproject"])
    parser.add_argument("locks", nargs="*", type=Path, default=[LOCK, LMMS_LOCK])
    args = parser.parse_args(argv)
    pins = {name: pin for lock in args.locks for name, pin in read_lock(lock).items()}
    if args.command == "check-env":
        problems = check_env(pins, installed())
        advice = "run `make setup` (or `make lock` after editing pyproject.toml)"
    else:
        problems = check_pyproject(pyproject_requirements(), read_lock(LOCK))
        advice = "run `make lock`"
    for line in problems:
        print(f"lock: {line}", file=sys.stderr)
    if problems:
        print(f"lock: {len(problems)} difference(s): {advice}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
