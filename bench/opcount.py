"""A CPU-countable proxy for GPU cost: ATen operations and host synchronisations per model call.

On a GPU, a decoding step of a 7B model is bound by kernel launches and by the host waiting on the device, not by
arithmetic; neither shows in CPU timings. Both are countable on any device, deterministically:

* **ops**: every ATen operation that reaches the dispatcher, seen by a ``TorchDispatchMode``; each costs host time
  (Python and dispatch) on any device;
* **launches**: the ops that do device work, i.e. all but those whose output is a view of an input (``view``,
  ``slice``, ``transpose``, a ``to`` or ``reshape`` that needs no copy, ...) and bare allocations (``empty``): about
  one kernel launch each on CUDA (a fused kernel counts once);
* **syncs**: operations that make the host wait for the device on CUDA: ``aten._local_scalar_dense`` and, under
  ``inference_mode``, ``aten.item`` / ``aten.is_nonzero`` (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``);
  ops whose output size depends on tensor values (``nonzero``, boolean-mask indexing, ``masked_select``,
  ``unique*``, ``repeat_interleave`` without ``output_size``); ``aten.equal``; and, seen by a ``TorchFunctionMode``
  because they never reach the dispatcher on the CPU, ``Tensor.tolist()``,
  ``.numpy()`` and ``.cpu()``.

:func:`count_steps` splits the counts by call of a module (one ``generate`` step = one call of the model): the
prefill (the call that carries the image inputs or several new tokens) and each cached decoding step.

    with count_steps(adapter.model) as steps:
        adapter.model.generate(**inputs, max_new_tokens=4)
    steps.decode_median("ops"), steps.prefill[0].syncs
"""

from __future__ import annotations

import contextlib
import statistics
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: ops that read a device value on the host (or size their output by one): each is a host sync on CUDA
SYNC_OPS = frozenset(
    {
        aten._local_scalar_dense.default,
        aten.item.default,  # what .item() / int(t) / bool(t) dispatch to under inference_mode
        aten.is_nonzero.default,
        aten.nonzero.default,
        aten.masked_select.default,
        aten.equal.default,
        aten.unique_consecutive.default,
        aten._unique2.default,
        aten.unique_dim.default,
        aten.repeat_interleave.Tensor,
        aten.repeat_interleave.self_Tensor,
    }
)
#: ops that sync only when indexing with a boolean mask (the mask is turned into indices first)
INDEX_OPS = frozenset({aten.index.Tensor, aten.index_put_.default, aten.index_put.default})
#: ``repeat_interleave`` with tensor repeats is sync-free when told its output size
_REPEATS = frozenset({aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor})
_SIZED = "output_size"
#: Tensor methods that copy to the host outside the dispatcher on the CPU
HOST_METHODS = frozenset({"tolist", "numpy", "cpu"})


@dataclass
class Tally:
    """Counts of one model call (or of anything between two :meth:`Counting.start` calls)."""

    ops: int = 0
    launches: int = 0  # ops that do device work (not a view of an input, not a bare allocation)
    syncs: int = 0
    prefill: bool = False
    sync_sites: Counter = field(default_factory=Counter)  # 'op @ file:line' -> count, for finding them


_REPO = Path(__file__).resolve().parents[1]


def _caller() -> str:
    """Where a sync was asked for: the innermost frame outside torch and this module, as ``path:line``.

    The path is relative to the repository for the project's own files, else the file's last two path parts.
    """
    for frame in reversed(traceback.extract_stack(limit=40)):
        if "/torch/" in frame.filename or frame.filename == __file__:
            continue
        path = Path(frame.filename).resolve()
        own = path.is_relative_to(_REPO) and "site-packages" not in path.parts
        return f"{path.relative_to(_REPO) if own else Path(*path.parts[-2:])}:{frame.lineno}"
    return "?"


def own_sites(sites: dict[str, int]) -> dict[str, int]:
    """The sync sites in the project's own code (``adapters/``, ``methods/``, ``harness/``, ``tasks/``)."""
    own = ("adapters/", "methods/", "harness/", "tasks/", "integrations/")
    return {k: v for k, v in sites.items() if k.split(" @ ")[-1].startswith(own)}


def _is_sync(func: Any, args: tuple, kwargs: dict) -> bool:
    if func in SYNC_OPS:
        return not (func in _REPEATS and kwargs.get(_SIZED) is not None)
    if func in INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices or ())
    return False


#: ops that allocate without touching the memory: no kernel
_ALLOCATIONS = frozenset({aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default})


def _launches(func: Any, args: tuple, out: Any) -> bool:
    """Whether ``func`` did device work: False for a bare allocation and for an output that views its input."""
    if func in _ALLOCATIONS:
        return False
    if not func.is_view:  # e.g. aten.to / aten.reshape are "view or copy": the output tells which
        return True
    first = args[0] if args and isinstance(args[0], torch.Tensor) else None
    outs = out if isinstance(out, tuple | list) else (out,)
    return first is None or any(
        isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
        for o in outs
    )


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: Counting) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        sync = _is_sync(func, args, kwargs)
        out = func(*args, **kwargs)
        self.owner.op(func, sync, _launches(func, args, out))
        return out


class _Functions(TorchFunctionMode):
    def __init__(self, owner: Counting) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in HOST_METHODS and args and isinstance(args[0], torch.Tensor):
            self.owner.host(name)
        return func(*args, **(kwargs or {}))


class Counting:
    """Ops and syncs, tallied per segment; a new segment starts at every :meth:`start`."""

    def __init__(self) -> None:
        self.tallies: list[Tally] = [Tally()]

    @property
    def current(self) -> Tally:
        """The segment being counted."""
        return self.tallies[-1]

    def start(self, prefill: bool) -> None:
        """Begin a new segment (a model call)."""
        self.tallies.append(Tally(prefill=prefill))

    def op(self, func: Any, sync: bool, launches: bool = True) -> None:
        """Count one ATen op (and whether it did device work)."""
        self.current.ops += 1
        self.current.launches += launches
        if sync:
            self._sync(str(func))

    def host(self, name: str) -> None:
        """Count one host copy made outside the dispatcher."""
        self._sync(f"Tensor.{name}")

    def _sync(self, what: str) -> None:
        self.current.syncs += 1
        self.current.sync_sites[f"{what} @ {_caller()}"] += 1

    @property
    def steps(self) -> list[Tally]:
        """The model calls (the segment before the first call, e.g. input preparation, left out)."""
        return self.tallies[1:]

    @property
    def prefill(self) -> list[Tally]:
        """Prefill calls."""
        return [t for t in self.steps if t.prefill]

    @property
    def decode(self) -> list[Tally]:
        """Cached decoding steps."""
        return [t for t in self.steps if not t.prefill]

    def decode_median(self, what: str) -> float:
        """Median ``ops``, ``launches`` or ``syncs`` over the decoding steps (0 when there are none)."""
        values = [getattr(t, what) for t in self.decode]
        return float(statistics.median(values)) if values else 0.0

    def prefill_total(self, what: str) -> int:
        """``ops``, ``launches`` or ``syncs`` summed over the prefill calls."""
        return sum(getattr(t, what) for t in self.prefill)


def _is_prefill(kwargs: dict[str, Any]) -> bool:
    """A call that carries image inputs or more than one new token."""
    if any(k.startswith("pixel_values") and v is not None for k, v in kwargs.items()):
        return True
    ids = kwargs.get("input_ids")
    if ids is None:
        ids = kwargs.get("inputs_embeds")
        return ids is not None and ids.shape[1] > 1
    return ids.shape[-1] > 1


@contextlib.contextmanager
def count_steps(model: nn.Module) -> Iterator[Counting]:
    """Count ops and syncs of everything run inside, split at every call of ``model``."""
    counting = Counting()
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: counting.start(_is_prefill(kw)), with_kwargs=True)
    try:
        with _Functions(counting), _Dispatch(counting):
            yield counting
    finally:
        handle.remove()
