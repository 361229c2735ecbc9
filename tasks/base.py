"""The task interface: a benchmark's samples, prompt, answer parsing and metrics.

A task never touches a model directly. It turns its original files into :class:`Sample` objects, answers a
batch of them through a :class:`ModelCalls` object (:meth:`Task.respond`: by default one generation per sample;
a task may make several calls per sample, text-only ones included, or read first-token log-probabilities),
scores one response (:meth:`Task.score`), and describes stored per-sample records as additive counts
(:meth:`Task.outcomes`) from which the metrics, their clustered-bootstrap standard errors
(:meth:`Task.aggregate`) and paired comparisons against a baseline run (:mod:`core.paired`) are computed.
Because metrics are computed from stored records only, a finished run can be re-scored under another parser
without generating again.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from PIL import Image

from core.errors import UserError
from core.registry import Registry
from core.stats import Outcomes, cluster_bootstrap

TASKS: Registry[type[Task]] = Registry("task")


class DataError(UserError, ValueError):
    """A task's data files do not hold what the config asks for (a split, a subtask, a readable annotation file).

    The whole run stops with one line naming the file and what is wrong.
    """


class SampleError(UserError, ValueError):
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


@dataclass(frozen=True)
class Request:
    """One model call: the user-turn text and its images (none for a text-only call)."""

    text: str
    images: list[Image.Image] = field(default_factory=list)


@dataclass(frozen=True)
class Call:
    """A finished generation call: the formatted prompt, the decoded new text, and its share of the batch time."""

    prompt: str
    output: str
    n_images: int
    seconds: float


@dataclass(frozen=True)
class Scored:
    """A finished scoring call: the formatted prompt and ``{answer: log P(first token of answer)}``."""

    prompt: str
    logprobs: dict[str, float]


class ModelCalls(Protocol):
    """What a task may ask of the model (the engine hands one in; a method is active around every call)."""

    def generate(self, requests: Sequence[Request], **gen_kwargs: Any) -> list[Call]:
        """Generate for every request (batched, left-padded); one :class:`Call` per request, in order."""

    def answer_logprobs(self, requests: Sequence[Request], answers: Sequence[str]) -> list[Scored]:
        """Per request, ``log P(first token of answer)`` of every answer at the first generated position."""


@dataclass
class Response:
    """What a task made of one sample's model call(s).

    Attributes:
        raw_output: The text the metrics parse (the last generation of a multi-call pipeline); ``None`` when
            the task scores something else (e.g. log-probabilities).
        prompt: The prompt of the main call, stored and hashed in the record.
        fields: Extra JSON-serialisable fields stored in the record (a multi-call transcript, log-probabilities).
    """

    raw_output: str | None
    prompt: str | None
    fields: dict[str, Any] = field(default_factory=dict)


class Task(abc.ABC):
    """Base class of every benchmark.

    Subclasses set ``name`` (the config's ``task.name``), ``version`` (bump when prompt, data handling or
    scoring changes) and ``higher_is_better`` (metric → bool), and implement :meth:`samples`, :meth:`score`
    and :meth:`outcomes`; :meth:`respond` and :meth:`aggregate` have working defaults.

    Args:
        strict: Raise :class:`SampleError` on the first malformed record instead of recording it.
        gen_kwargs: Generation settings passed to every generation call, merged over ``default_gen_kwargs``.
        n_boot: Bootstrap draws for standard errors (0 disables them).
        limit: At most this many samples (the engine passes the run's ``limit``; each task says what it counts:
            samples per split, images per subtask, ...); ``None`` for all.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    higher_is_better: ClassVar[dict[str, bool]]
    #: the benchmark's usual decoding settings; ``gen_kwargs`` given to the constructor are merged over them
    default_gen_kwargs: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        *,
        strict: bool = False,
        gen_kwargs: dict[str, Any] | None = None,
        n_boot: int = 1000,
        limit: int | None = None,
    ) -> None:
        if n_boot < 0 or (limit is not None and limit < 0):
            raise ValueError(f"n_boot and limit must be non-negative, got n_boot={n_boot}, limit={limit}")
        self.strict = strict
        self.gen_kwargs: dict[str, Any] = {**self.default_gen_kwargs, **dict(gen_kwargs or {})}
        self.n_boot = int(n_boot)
        self.limit = limit

    @abc.abstractmethod
    def samples(self) -> list[Sample]:
        """All samples in canonical order.

        Malformed records come back with ``error`` set, or raise :class:`SampleError` when ``strict`` is true.
        """

    def respond(self, batch: Sequence[tuple[Sample, list[Image.Image]]], model: ModelCalls) -> list[Response]:
        """Answer a batch of samples (their images already decoded); one :class:`Response` per sample, in order.

        The default makes one generation call per sample with ``gen_kwargs``. Multi-call pipelines override it.
        """
        calls = model.generate([Request(s.text, images) for s, images in batch], **self.gen_kwargs)
        return [Response(raw_output=c.output, prompt=c.prompt) for c in calls]

    @abc.abstractmethod
    def score(self, sample: Sample, response: Response) -> dict[str, Any]:
        """Per-sample fields stored with the record: at least ``parsed`` (the parsed answer)."""

    @abc.abstractmethod
    def outcomes(self, records: list[dict[str, Any]], splits: list[str] | None = None) -> Outcomes:
        """Additive counts of successful stored records and the statistics computed from them.

        A record holds ``sample_id, split, index, image_id, target, raw_output``, the response's ``fields``
        and what :meth:`score` returned, so a task can re-parse ``raw_output`` under any of its parsers.
        ``splits`` are the splits the run evaluated, those whose every sample failed included (``None``: the
        records' own): a task with a row per split keeps such a split's row, with NaN metrics, and a row that
        combines splits (a mean, a sum) is then NaN too, not computed over fewer splits than the run asked for.
        """

    def aggregate(self, records: list[dict[str, Any]], seed: int = 0) -> dict[str, dict[str, Any]]:
        """Metrics with clustered-bootstrap standard errors from stored per-sample records.

        Error records are not scored, but their splits count as evaluated (see :meth:`outcomes`). Clusters are
        ``image_id`` (questions about one image are resampled together); ``n_boot`` draws seeded with ``seed``.

        Returns:
            ``{row: {"alias", "sample_len", "<metric>,<filter>": value, "<metric>_stderr,<filter>": stderr}}``
            in the lm-eval results layout; the task's own name is the key of its headline row.
        """
        splits = list(dict.fromkeys(str(r["split"]) for r in records if r.get("split") is not None))
        records = [r for r in records if not r.get("error")]
        if not records:
            return {}
        out = self.outcomes(records, splits)
        res = cluster_bootstrap(
            [str(r["image_id"]) for r in records], out.counts, out.stat_fn, n_boot=self.n_boot, seed=seed
        )
        return out.rows(res.estimate, res.stderr)

    @property
    @abc.abstractmethod
    def headline(self) -> tuple[str, str]:
        """The ``(results row, "metric,filter")`` a leaderboard shows (direction: ``higher_is_better``)."""

    def describe(self) -> dict[str, Any]:
        """Task metadata for the results file, with the headline metric the reports show."""
        row, metric = self.headline
        return {
            "name": self.name,
            "version": self.version,
            "gen_kwargs": self.gen_kwargs,
            "n_boot": self.n_boot,
            "headline": {"row": row, "metric": metric},
        }


def task_from_config(node: Mapping[str, Any], **overrides: Any) -> Task:
    """The task object a run used, rebuilt from the ``task`` block of its results file (no model involved).

    Only registered task classes are built: the node's ``_target_`` must name one of :data:`TASKS`, so a results
    file cannot make a reader import arbitrary code. Its other fields (``name`` aside) are constructor arguments.

    Args:
        node: The run's resolved ``task`` config (``_target_``, ``name`` and the constructor fields).
        **overrides: Constructor arguments replacing the recorded ones (e.g. ``strict=False``).

    Raises:
        UserError: ``_target_`` names no registered task class.
    """
    import tasks  # noqa: F401  (registers every task class)

    by_target = {f"{cls.__module__}.{cls.__qualname__}": cls for cls in (TASKS.get(n) for n in TASKS.names())}
    cls = by_target.get(str(node.get("_target_")))
    if cls is None:
        raise UserError(f"task._target_={node.get('_target_')!r} is no registered task; known: {sorted(by_target)}")
    fields = {k: v for k, v in node.items() if k not in ("_target_", "name")}
    return cls(**{**fields, **overrides})
