"""The method interface: one intervention each, as a context manager over an adapter's anatomy.

Usage::

    method = METHODS.get("none")()
    method.check(adapter)          # before the model loads: unsupported family → UnsupportedError
    adapter.load()
    with method.bind(adapter):     # __enter__ installs hooks / switches the attention function
        adapter.generate(...)      # __exit__ always removes them, even on error

Subclasses implement :meth:`Method.install` and register what they add through :meth:`Method.add_hook` and
:meth:`Method.enter_context`, so removal is uniform and guaranteed. Methods import this module and the adapter
*interface* only, never a concrete adapter.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.hooks import RemovableHandle

from adapters.base import Adapter
from core.errors import UserError
from core.registry import Registry
from tasks.base import Request

METHODS: Registry[type[Method]] = Registry("method")


class DeviceTally:
    """Running sums a method's hooks add to on the model's device, with no host sync and no kernel per add.

    :meth:`add` only keeps a reference to the tensors; their elements are summed (in float64) when the sums are
    read, or once :data:`FLUSH_AT` tensors are pending: one ``cat`` and one ``sum`` per slot then, instead of a
    reduction and an indexed add per hook call, which at every cached decoding step of every layer were most of a
    method's bookkeeping launches (issue 25). A tensor passed to :meth:`add` must not be modified afterwards.

    Args:
        n: Number of sums.
    """

    #: pending tensors that trigger a flush (bounds what the references keep alive)
    FLUSH_AT = 4096

    def __init__(self, n: int) -> None:
        self.sums = torch.zeros(n, dtype=torch.float64, device="cpu")  # moved to the values' device on first flush
        self._pending: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self._ratios: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(n)]
        self._count = 0

    def add(self, at: int, *values: torch.Tensor) -> None:
        """Add the sums of the elements of ``values`` to the sums ``at, at + 1, …`` (deferred)."""
        for i, v in enumerate(values):
            self._pending[at + i].append(v)
        self._queued(len(values))

    def add_ratio(self, at: int, num: torch.Tensor, den: torch.Tensor) -> None:
        """Add ``Σ num / max(den, 1e-12)`` (elementwise, equal shapes) to the sum ``at``, the division deferred too."""
        self._ratios[at].append((num, den))
        self._queued(2)

    def _queued(self, n: int) -> None:
        """Count ``n`` more pending tensors; flush once :data:`FLUSH_AT` are held."""
        self._count += n
        if self._count >= self.FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        """Sum the pending tensors into :attr:`sums` (one ``cat`` and one ``sum`` per slot)."""
        for at, (pending, ratios) in enumerate(zip(self._pending, self._ratios, strict=True)):
            parts = [v.reshape(-1) for v in pending]
            if ratios:
                num = torch.cat([n.reshape(-1) for n, _ in ratios])
                parts.append(num / torch.cat([d.reshape(-1) for _, d in ratios]).clamp_min(1e-12))
            if not parts:
                continue
            if self.sums.device != parts[0].device:
                self.sums = self.sums.to(parts[0].device)
            flat = torch.cat(parts)  # promotes bool / int / float to a common type
            self.sums[at] += flat.sum(dtype=torch.float64)
            pending.clear()
            ratios.clear()
        self._count = 0

    def tolist(self) -> list[float]:
        """The sums (one host sync)."""
        self._flush()
        return self.sums.tolist()


class UnsupportedError(UserError, ValueError):
    """A method/adapter combination that cannot work; raised before the model loads."""


class LayerError(UserError, IndexError):
    """A method's layer hyperparameter names a layer the LM does not have (one line, with the valid range)."""


def auto_or_list(name: str, value: Any, items: str = "layer indices") -> None:
    """Raise ``ValueError`` unless ``value`` is ``"auto"`` or a non-empty list.

    An empty list would select nothing, making the method a silent ``none``.
    """
    if value != "auto" and (not isinstance(value, list | tuple) or not value):
        raise ValueError(f"{name} must be 'auto' or a non-empty list of {items}, got {value!r}")


def check_layers(adapter: Adapter, owner: str, layers: Any) -> None:
    """Before the model loads: every index in ``layers`` (``"auto"`` passes) is a layer of ``adapter``'s LM."""
    if isinstance(layers, str) or (n := adapter.lm_depth()) is None:
        return
    bad = [int(layer) for layer in layers if not 0 <= int(layer) < n]
    if bad:
        raise LayerError(f"{owner}: layers {bad} out of range; the LM has {n} layers (0..{n - 1})")


class Method(contextlib.AbstractContextManager):
    """Base class of mitigation methods.

    Attributes:
        name: Registry name (the config's ``method.name``).
        families: Adapter families the method supports, or ``None`` for all.
        input_only: True when the method's whole effect is in :meth:`rewrite` (the final generation is an
            unmodified forward on the rewritten requests), so that final pass may run on another engine (vLLM).
    """

    name: ClassVar[str]
    families: ClassVar[tuple[str, ...] | None] = None
    input_only: ClassVar[bool] = False

    def __init__(self, **hparams: Any) -> None:
        self.hparams = hparams
        self.adapter: Adapter | None = None
        self.output_dir: Path | None = None  # the run directory, for methods that write files (set by the engine)
        self._handles: list[RemovableHandle] = []
        self._stack: contextlib.ExitStack | None = None

    # ------------------------------------------------------------------ compatibility
    def check(self, adapter: Adapter) -> None:
        """Raise :class:`UnsupportedError` when this method cannot run on ``adapter``'s family."""
        if self.families is not None and adapter.family not in self.families:
            raise UnsupportedError(
                f"method {self.name!r} does not support model family {adapter.family!r}; "
                f"it supports: {', '.join(self.families)}"
            )

    def check_generation(self, gen_kwargs: dict[str, Any]) -> None:
        """Raise :class:`UnsupportedError` when the task's decoding settings cannot work (default: all can).

        Called with the task's ``gen_kwargs`` before the model loads (e.g. two-view decoding refuses beam search).
        """

    def bind(self, adapter: Adapter) -> Method:
        """Attach to a (loaded) adapter; returns ``self`` for use in a ``with`` statement."""
        self.check(adapter)
        self.adapter = adapter
        return self

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        """Install hooks and attention callbacks through the adapter's anatomy (default: nothing)."""

    def add_hook(self, handle: RemovableHandle) -> None:
        """Track a hook handle so it is removed on exit."""
        self._handles.append(handle)

    def enter_context(self, cm: contextlib.AbstractContextManager) -> Any:
        """Enter a context manager (e.g. ``adapter.lm_attention(...)``) that is exited on exit."""
        assert self._stack is not None, "enter_context is only valid inside install()"
        return self._stack.enter_context(cm)

    def __enter__(self) -> Method:
        if self.adapter is None:
            raise RuntimeError(f"method {self.name!r} is not bound; use `with method.bind(adapter):`")
        self._stack = contextlib.ExitStack()
        try:
            self.install()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def rewrite(self, requests: list[Request]) -> list[Request]:
        """The requests the model actually answers, for one batch (default: unchanged).

        Called by the engine's model calls inside the method's context, before each batch is built. Multi-pass
        methods (CARVE) run their extra passes here and return refined requests (other images, same text); the
        time spent counts towards the batch's per-sample seconds.
        """
        return requests

    def report(self) -> dict[str, Any] | None:
        """What the method measured over the run (tokens kept, categories found), stored in the results file.

        Called after generation; ``None`` (the default) when the method has nothing to report.
        """
        return None

    def describe(self) -> dict[str, Any]:
        """Method metadata for the results file."""
        return {"name": self.name, "class": f"{type(self).__module__}.{type(self).__qualname__}", **self.hparams}
