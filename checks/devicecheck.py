"""Catch device mix-ups on a machine without a GPU: host tensors made without ``device=`` inside model calls.

On CUDA, a tensor created without ``device=`` lands on the CPU, and indexing or combining it with the model's
tensors fails (``indices should be either on cpu or on the same device``) or, worse, silently runs on the host.
On the CPU the same code works, because every tensor is on the CPU. :func:`strict_devices` makes it fail here too:
inside every adapter model call (:meth:`adapters.generation.Generation._call`: input preparation, the methods' hooks,
generation), torch's default device is ``meta``, so a tensor created without an explicit device is a data-less
meta tensor, and the first operation that needs its values, or mixes it with real tensors, raises. Mixing is
checked by a dispatch mode on every ATen operation: torch itself lets a CPU tensor be indexed or gathered with a
meta index and returns uninitialised memory, silently (torch 2.13), where CUDA would raise. 0-dim tensors may mix,
as CUDA lets a 0-dim host tensor join a device operation.

The house rule this enforces: a tensor made during a model call names its device, the device of the tensor it
works with (``device=scores.device``), or ``"cpu"`` for host-side bookkeeping that is meant to stay there.

    with strict_devices():
        evaluate(task, adapter, method, settings)   # fails where a GPU run would
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from adapters.generation import Generation


class DeviceMixError(RuntimeError):
    """An operation took a meta tensor (made without ``device=``) together with real ones."""


class _NoMixing(TorchDispatchMode):
    """Raise when one ATen operation receives meta and non-meta tensors (0-dim ones aside)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        devices = {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()}
        if "meta" in devices and len(devices) > 1:
            raise DeviceMixError(
                f"{func}: a tensor made without device= (meta here, the host on a GPU) meets "
                f"tensors on {sorted(devices - {'meta'})}; create it on the device it works with"
            )
        return func(*args, **kwargs)


@contextlib.contextmanager
def strict_devices(default: str = "meta") -> Iterator[None]:
    """Run every adapter model call with torch's default device set to ``default`` (restored on exit)."""
    original = Generation._call

    @contextlib.contextmanager
    def strict(self: Generation, inputs: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        with torch.device(default), _NoMixing(), original(self, inputs) as prepared:
            yield prepared

    Generation._call = strict
    try:
        yield
    finally:
        Generation._call = original
