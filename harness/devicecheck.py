"""Catch device mix-ups on a machine without a GPU: host tensors made without ``device=`` inside model calls.

On CUDA, a tensor created without ``device=`` lands on the CPU, and indexing or combining it with the model's
tensors fails (``indices should be either on cpu or on the same device``) or, worse, silently runs on the host.
On the CPU the same code works, because every tensor is on the CPU. :func:`strict_devices` makes it fail here too:
inside every adapter model call (:meth:`adapters.base.Adapter._call`: input preparation, the methods' hooks,
generation), torch's default device is ``meta``, so a tensor created without an explicit device is a data-less
meta tensor, and the first operation that needs its values, or mixes it with real tensors, raises.

The house rule this enforces: a tensor made during a model call names its device, the device of the tensor it
works with (``device=scores.device``), or ``"cpu"`` for host-side bookkeeping that is meant to stay there.

    with strict_devices():
        evaluate(task, adapter, method, settings)   # fails where a GPU run would
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from adapters.base import Adapter


@contextlib.contextmanager
def strict_devices(default: str = "meta") -> Iterator[None]:
    """Run every adapter model call with torch's default device set to ``default`` (restored on exit)."""
    original = Adapter._call

    @contextlib.contextmanager
    def strict(self: Adapter, inputs: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        with torch.device(default), original(self, inputs) as prepared:
            yield prepared

    Adapter._call = strict
    try:
        yield
    finally:
        Adapter._call = original
