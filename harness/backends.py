"""Generation backends (``model.backend=...``): what answers a task's model calls.

A backend is a :class:`Backend` filed in :data:`BACKENDS` under the name ``model.backend`` takes. Its ``check``
refuses, before anything loads, a method or a setting it cannot run; its ``open`` returns the loaded
:class:`tasks.base.ModelCalls`. ``hf`` (transformers, the adapter's own model) is registered here. Backends from
other packages are Python entry points of the group :data:`ENTRY_POINT_GROUP` naming the module that registers
them, imported the first time their name is asked for: this project declares ``vllm`` in ``pyproject.toml``
(``integrations.vllm_backend``), so the engine never imports vLLM code unless a run asks for it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.registry import Registry

if TYPE_CHECKING:
    from adapters.base import Adapter
    from harness.engine import RunSettings
    from methods.base import Method
    from tasks.base import ModelCalls

ENTRY_POINT_GROUP = "lvlm_harness.backends"


@dataclass(frozen=True)
class Backend:
    """One generation backend.

    Attributes:
        check: ``check(method, settings)`` raises (a :class:`methods.base.UnsupportedError` or a
            :class:`core.errors.UserError`) when the run cannot go on this backend; called before any model loads.
        open: ``open(adapter, method, settings)`` loads what the backend needs and returns the model calls.
    """

    check: Callable[[Method, RunSettings], None]
    open: Callable[[Adapter, Method, RunSettings], ModelCalls]


BACKENDS: Registry[Backend] = Registry("model.backend")


def _hf_check(method: Method, settings: RunSettings) -> None:
    """Every method runs on the HF model: nothing to refuse."""


def _hf_open(adapter: Adapter, method: Method, settings: RunSettings) -> ModelCalls:
    from harness.calls import AdapterCalls  # here: the config check names backends before torch is imported

    adapter.load()
    return AdapterCalls(adapter, settings.batch_size, method)


BACKENDS.register("hf")(Backend(check=_hf_check, open=_hf_open))


def get_backend(name: str) -> Backend:
    """The backend filed under ``name``, importing the module an entry point names for it on first use.

    Raises:
        core.registry.UnknownNameError: no backend of that name is registered (with suggestions).
    """
    if name not in BACKENDS:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                importlib.import_module(ep.value)
    return BACKENDS.get(name)


def declared() -> list[str]:
    """Names of the registered backends and of those declared through entry points (not yet imported)."""
    names = {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names | set(BACKENDS.names()))
