"""``python -m methods.calibrate NAME [options]``: run one calibration (see :mod:`methods.calibrate`)."""

from __future__ import annotations

import difflib
import importlib
import sys

from methods.calibrate import CALIBRATIONS


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the named calibration's ``main``; an unknown or missing name is one line, exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    names = ", ".join(CALIBRATIONS)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m methods.calibrate {{{names}}} [options]  (NAME --help: its options)")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in CALIBRATIONS:
        close = difflib.get_close_matches(name, CALIBRATIONS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"error: unknown calibration {name!r}{hint} (choose from {names})", file=sys.stderr)
        return 2
    importlib.import_module(CALIBRATIONS[name][0]).main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
