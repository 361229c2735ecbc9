"""``none``: the unmodified model (the baseline every method is compared with).

Installs nothing; ``method=none`` outputs are identical to a plain HF ``generate`` loop on the same prompts.
"""

from __future__ import annotations

from typing import ClassVar

from methods.base import METHODS, Method


@METHODS.register("none")
class NoMethod(Method):
    """Baseline: no intervention."""

    name: ClassVar[str] = "none"
    input_only: ClassVar[bool] = True  # nothing to install: any engine's plain forward is the baseline
