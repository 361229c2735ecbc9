"""User errors: a mistake in a command, a config or an input file, reported as one line with what to do.

Every exception a user can cause and fix derives from :class:`UserError`; ``run.py`` prints such an error as one
line (``error: <what is wrong>; <what to do>``) and exits with status 2. Anything else is a bug and keeps its
traceback. The traceback of a user error too is shown with the debug switch: ``debug=true`` on the command line,
or ``HARNESS_DEBUG=1`` in the environment (which also covers mistakes found before the config is composed).
"""

from __future__ import annotations

import os
import sys
from typing import Any

#: environment variable that turns the one-line reports back into tracebacks
DEBUG_ENV = "HARNESS_DEBUG"


class UserError(Exception):
    """A mistake the user can fix; its message is one line saying what is wrong and what to do."""


def debug_enabled(cfg: Any = None) -> bool:
    """Whether tracebacks are wanted: ``HARNESS_DEBUG`` set to 1/true/yes, or ``debug=true`` in ``cfg``."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        return bool(cfg is not None and cfg.get("debug", False))
    except Exception:  # a config that cannot even answer: no debug
        return False


def one_line(exc: BaseException) -> str:
    """The error's message on one line (a multi-line message is joined; a KeyError's quotes dropped)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(exc).__name__


def report(exc: BaseException, prog: str = "run.py") -> None:
    """Print a user error as one line on stderr."""
    print(f"{prog}: error: {one_line(exc)}", file=sys.stderr, flush=True)
