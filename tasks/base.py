"""The task interface: a benchmark's samples, prompt, answer parsing and metrics.

A task never touches a model. It turns its original files into :class:`Sample` objects, says how to
generate (``gen_kwargs``), scores one raw output (:meth:`Task.score`), and aggregates stored per-sample
records into metrics (:meth:`Task.aggregate`). Because metrics are computed from stored records only, a
finished run can be re-scored under another parser without generating again.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from PIL import Image

from harness.registry import Registry

TASKS: Registry[type[Task]] = Registry("task")


class SampleError(ValueError):
    """A bad input (malformed record, missing or corrupt image). Carries the place it came from."""

    def __init__(self, reason: str, source: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.reason = reason
        self.source = source


@dataclass(frozen=True)
class Sample:
    """One benchmark item, ready to be prompted.

    Attributes:
        sample_id: Unique and stable within the task across runs, e.g. ``"adversarial/17"``.
        split: Sub-task the item belongs to (POPE: random / popular / adversarial).
        index: Position in the task's canonical order (used to sort records).
        image_id: Statistical cluster: questions about the same image are resampled together.
        text: User-turn text (question plus the task's prompt suffix), without any image placeholder.
        target: Reference answer.
        source: ``"<file>:<line>"`` (or ``<file>#<row>``) of the record, for error messages.
        images: Zero-argument callable returning the PIL images of the item (lazy: decoding happens in the
            engine, so one bad image becomes a per-sample error, not a failed load of the whole set).
        doc: The raw record as read from the file (JSON-serialisable, images excluded).
        error: Set when the record itself is malformed; such samples are recorded as failures.
    """

    sample_id: str
    split: str
    index: int
    image_id: str
    text: str
    target: str
    source: str
    images: Callable[[], list[Image.Image]] | None = None
    doc: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Task(abc.ABC):
    """Base class of every benchmark.

    Subclasses set ``name`` (the config's ``task.name``), ``version`` (bump when prompt, data handling or
    scoring changes) and ``higher_is_better`` (metric → bool).
    """

    name: ClassVar[str]
    version: ClassVar[str]
    higher_is_better: ClassVar[dict[str, bool]]

    def __init__(self, *, strict: bool = False, gen_kwargs: dict[str, Any] | None = None) -> None:
        self.strict = strict
        self.gen_kwargs: dict[str, Any] = dict(gen_kwargs or {})

    @abc.abstractmethod
    def samples(self) -> list[Sample]:
        """All samples in canonical order.

        Malformed records come back with ``error`` set, or raise :class:`SampleError` when ``strict`` is true.
        """

    @abc.abstractmethod
    def score(self, sample: Sample, raw_output: str) -> dict[str, Any]:
        """Per-sample fields stored with the record: at least ``parsed`` (the parsed answer)."""

    @abc.abstractmethod
    def aggregate(self, records: list[dict[str, Any]], seed: int = 0) -> dict[str, dict[str, Any]]:
        """Metrics from stored per-sample records (successful ones only).

        A record holds ``sample_id, split, index, image_id, target, raw_output`` and what :meth:`score`
        returned, so a task can re-parse ``raw_output`` under any of its parsers.

        Returns:
            ``{subtask: {"<metric>,<filter>": value, "<metric>_stderr,<filter>": stderr, ...}}`` in the
            lm-eval results layout; the task's own name is the key of its headline aggregate.
        """

    def describe(self) -> dict[str, Any]:
        """Task metadata for the results file."""
        return {"name": self.name, "version": self.version, "gen_kwargs": self.gen_kwargs}
