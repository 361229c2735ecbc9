"""Config schemas: every field of every ``conf/`` option checked for type and range right after composition.

``validate(cfg)`` runs in ``run.py`` on the composed config, before torch, transformers or any method module is
imported, so ``batch_size=0``, ``method.p=1.5``, ``model.dtype=float8`` or ``method.rhoo=0.5`` stop in well under a
second with one line naming the field, the value, what is allowed and, for names, the closest valid one. Nothing
here imports torch; the module only reads the config (and, for ``model.path``, the file system).

A schema is a dataclass whose fields are the option's keys (besides ``_target_``) with type hints; ranges and
other value checks ride on ``Annotated``. The YAML stays the one place that holds the defaults and their comments:
a schema has no defaults, every field is required, and a key the schema does not know is refused with a
did-you-mean. Supported hints: ``bool``, ``int``, ``float`` (an int is accepted), ``str``, ``None``, ``Any``,
``Literal[...]``, ``list[X]``, ``dict[str, X]``, unions (``X | Y``) and ``Annotated[X, Range(...) | NonEmpty()
| Local() | Device()]``.

Adding a method (the same for a model adapter, task or logger): write ``conf/method/<name>.yaml`` with
``_target_: methods.<file>.<Class>``, ``name: <name>`` and one key per constructor argument; then add here::

    @schema("methods.<file>.<Class>")
    @dataclass
    class MyMethod(MethodConfig):
        alpha: Annotated[float, Range(ge=0, le=1)]      # one field per YAML key, same names, no defaults
        mode: Literal["a", "b"]
        layers: Literal["auto"] | list[Annotated[int, Range(ge=0)]]

``MethodConfig`` contributes ``name``. ``tests/test_schema.py`` composes every ``conf/`` option and fails when one
has no schema or does not pass it.
"""

from __future__ import annotations

import os
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from core.checkpoint import checkpoint_problem
from core.errors import UserError
from core.registry import close_matches


class ConfigError(UserError):
    """A config value of the wrong type or out of range, a missing or unknown key: one line, with the fix."""


# ----------------------------------------------------------------------------------------------- value checks


@dataclass(frozen=True)
class Range:
    """Numeric bounds (any subset of ``ge``, ``gt``, ``le``, ``lt``)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __call__(self, value: Any) -> str | None:
        """``None`` when ``value`` lies inside, else what is allowed."""
        ok = (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )
        return None if ok else f"must be {self.describe()}"

    def describe(self) -> str:
        """``>= 0 and < 1`` style text."""
        parts = [f"{op} {bound:g}" for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if bound is not None]  # fmt: skip
        return " and ".join(parts)


@dataclass(frozen=True)
class NonEmpty:
    """A non-empty string or list."""

    def __call__(self, value: Any) -> str | None:
        """``None`` when ``value`` is non-empty."""
        return None if len(value) else "must not be empty"


@dataclass(frozen=True)
class Local:
    """A checkpoint: an existing local directory with safetensors weights, or a hub id (``org/name``).

    A value that looks like a path (absolute, ``./``, ``~``, more than one ``/``, or under a directory that exists
    here, e.g. ``assets/shapes-lava`` where ``assets/`` does) must be a directory holding ``*.safetensors`` files
    (the adapters load safetensors only, no pickle) and ``config.json`` (:func:`core.checkpoint.checkpoint_problem`).
    (A mistyped local path would otherwise be taken for a hub id and spend minutes in download retries on a machine
    without the hub.)
    """

    def __call__(self, value: Any) -> str | None:
        """``None`` for a usable checkpoint location, else what is wrong with it and what to do."""
        path = Path(os.path.expanduser(value))
        under_local = len(path.parts) > 1 and Path(path.parts[0]).is_dir()
        looks_local = (os.path.isabs(value) or value.startswith((".", "~")) or value.count("/") > 1 or path.exists()
                       or under_local)  # fmt: skip
        if not looks_local:
            return None  # a hub id: resolved (and cached) by from_pretrained
        if not path.is_dir():
            siblings = sorted(str(c) for c in path.parent.iterdir() if c.is_dir()) if path.parent.is_dir() else []
            return ("is not a directory: give a local checkpoint directory or a hub id like llava-hf/llava-1.5-7b-hf"
                    f"{_closest(str(path), siblings)}")  # fmt: skip
        return checkpoint_problem(path)


@dataclass(frozen=True)
class Device:
    """A ``model.device`` torch can parse: ``cpu``, ``auto``, ``cuda``, ``cuda:N`` (or ``mps``, ``xpu[:N]``).

    Whether that device exists here needs torch, and is checked when the run is built
    (:meth:`adapters.base.Adapter.check_device`).
    """

    def __call__(self, value: Any) -> str | None:
        """``None`` for a device string, else what works."""
        if re.fullmatch(r"cpu|auto|mps|(cuda|xpu)(:\d+)?", value):
            return None
        return f"is not a device: use cpu, cuda, cuda:N or auto (CUDA when available){_closest(value, DEVICES)}"


DEVICES = ["cpu", "cuda", "auto", "mps", "xpu"]


class Backend:
    """A ``model.backend`` name: registered in :data:`harness.backends.BACKENDS` or declared by an entry point."""

    def __call__(self, value: Any) -> str | None:
        """``None`` for a known backend, else the known ones (and the closest)."""
        from harness.backends import declared

        known = declared()
        return None if value in known else f"is no generation backend{_closest(value, known)} Known: {', '.join(known)}"


# ----------------------------------------------------------------------------------------------- the checker


def _closest(value: Any, choices: list[Any]) -> str:
    close = close_matches(value, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


#: a plain type in words: (one value, several values)
_WORDS = {bool: ("true/false", "true/false values"), int: ("an int", "ints"), float: ("a number", "numbers"),
          str: ("a string", "strings"), Any: ("anything", "anything"), type(None): ("null", "nulls")}  # fmt: skip


def describe(hint: Any, plural: bool = False) -> str:
    """A type hint in words (``'auto' or a list of ints >= 0``); ``plural`` words a list's items."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        checks = [a.describe() for a in args[1:] if isinstance(a, Range)]
        return describe(args[0], plural) + (f" {checks[0]}" if checks else "")
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a, plural) for a in args)
    if origin is list:
        return f"{'lists' if plural else 'a list'} of {describe(args[0], plural=True)}"
    if origin is dict:
        return "mappings" if plural else "a mapping"
    words = _WORDS.get(hint)
    return str(hint) if words is None else words[plural]


def _check(value: Any, hint: Any, where: str) -> str | None:
    """``None`` when ``value`` matches ``hint``; else the problem (its ``where`` names nested places)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return None
    if origin is Annotated:
        problem = _check(value, args[0], where)
        if problem is not None:
            return problem
        for check in args[1:]:
            problem = check(value) if callable(check) else None
            if problem is not None:
                return problem
        return None
    if origin in (Union, types.UnionType):
        problems = [_check(value, a, where) for a in args]
        if any(p is None for p in problems):
            return None
        # one alternative of the value's own kind explains best (e.g. the range of an int)
        for alt, problem in zip(args, problems, strict=True):
            if _same_kind(value, alt) and get_origin(alt) is not Literal:
                return problem
        names = [a for alt in args if get_origin(alt) is Literal for a in get_args(alt)]
        return f"must be {describe(hint)}{_closest(value, names) if isinstance(value, str) else ''}"
    if origin is Literal:
        if value in args and type(value) is type(next(a for a in args if a == value)):
            return None
        return f"must be {describe(hint)}{_closest(value, list(args))}"
    if origin is list:
        if not isinstance(value, list | tuple):
            return f"must be {describe(hint)}"
        for i, item in enumerate(value):
            problem = _check(item, args[0], f"{where}[{i}]")
            if problem is not None:
                return f"item {i} ({item!r}) {problem}"
        return None
    if origin is dict:
        if not isinstance(value, dict):
            return "must be a mapping"
        for key, item in value.items():
            problem = _check(item, args[1], f"{where}.{key}")
            if problem is not None:
                return f"entry {key!r} {problem}"
        return None
    if hint is type(None):
        return None if value is None else "must be null"
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an int"
    if hint is float:
        return None if isinstance(value, int | float) and not isinstance(value, bool) else "must be a number"
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    raise TypeError(f"schema hint {hint!r} at {where} is not supported")


def _same_kind(value: Any, hint: Any) -> bool:
    base = get_args(hint)[0] if get_origin(hint) is Annotated else hint
    if isinstance(value, bool):
        return base is bool
    if isinstance(value, int):
        return base in (int, float)
    if isinstance(value, float):
        return base is float
    if isinstance(value, str):
        return base is str or get_origin(base) is Literal
    if isinstance(value, list):
        return get_origin(base) is list
    return False


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value).replace("True", "true").replace("False", "false")
    text = "null" if value is None else text
    return text if len(text) <= 60 else text[:57] + "..."


def _label(node: dict[str, Any], where: str) -> str:
    if where and "name" in node:
        return f"{where} {node['name']!r}"
    return where or "the config"


def check_node(node: dict[str, Any], cls: type, where: str) -> None:
    """Check one config node against a schema dataclass; raise :class:`ConfigError` on the first problem."""
    hints = get_type_hints(cls, include_extras=True)
    names = [f.name for f in fields(cls)]
    prefix = f"{where}." if where else ""
    given = [k for k in node if k != "_target_"]
    for key in given:
        if key not in hints:
            raise ConfigError(
                f"{prefix}{key} is not an option of {_label(node, where)}{_closest(key, names)} "
                f"(options: {', '.join(names)})"
            )
    for name in names:
        if name not in node:
            raise ConfigError(f"{prefix}{name} is missing: every option of {cls.__name__} is required (see its YAML)")
        problem = _check(node[name], hints[name], f"{prefix}{name}")
        if problem is not None:
            raise ConfigError(f"{prefix}{name}={_show(node[name])} {problem}")


# ----------------------------------------------------------------------------------------------- schemas

#: ``_target_`` → schema dataclass, per config group
SCHEMAS: dict[str, dict[str, type]] = {"model": {}, "method": {}, "task": {}, "logger": {}}


def schema(target: str, group: str = "method") -> Callable[[type], type]:
    """Class decorator: file a schema dataclass under its ``_target_`` in ``group``."""

    def deco(cls: type) -> type:
        if not is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        SCHEMAS[group][target] = cls
        return cls

    return deco


Fraction = Annotated[float, Range(ge=0, le=1)]
NonNegInt = Annotated[int, Range(ge=0)]
PosInt = Annotated[int, Range(ge=1)]
# An empty list would select no layer (no sink dimension): the method would silently be `none`.
Layers = Literal["auto"] | Annotated[list[NonNegInt], NonEmpty()]


@dataclass
class RunConfig:
    """Top-level keys of ``conf/config.yaml`` (the groups are checked by their own schemas)."""

    model: dict[str, Any]
    method: dict[str, Any]
    task: dict[str, Any]
    logger: dict[str, Any]
    limit: PosInt | None
    batch_size: PosInt
    prefetch: Literal["auto"] | NonNegInt
    seed: NonNegInt
    strict: bool
    progress: bool
    debug: bool
    output_root: Annotated[str, NonEmpty()]
    cache: str | None
    output_dir: Annotated[str, NonEmpty()]


# ---- models


@dataclass
class AdapterConfig:
    """What every ``conf/model`` option holds (``adapters.base.Adapter`` plus the backend choice)."""

    name: Annotated[str, NonEmpty()]
    path: Annotated[str, NonEmpty(), Local()]
    dtype: Literal["float32", "bfloat16", "float16", "auto"]
    device: Annotated[str, NonEmpty(), Device()]
    attn_implementation: Literal["sdpa", "eager"]
    revision: str | None
    prompt_template: str
    system_prompt: str | None
    backend: Annotated[str, Backend()]  # harness/backends.py
    vllm: dict[str, Any]  # vLLM engine arguments (integrations/vllm_backend.py checks them)


@schema("adapters.llava.LlavaAdapter", "model")
@dataclass
class LlavaConfig(AdapterConfig):
    """``conf/model/llava*.yaml``."""


@schema("adapters.qwen_vl.QwenVLAdapter", "model")
@dataclass
class QwenVLConfig(AdapterConfig):
    """``conf/model/qwen_vl.yaml``."""

    variant: Literal["auto", "qwen2_vl", "qwen2_5_vl"]
    min_pixels: PosInt | None
    max_pixels: PosInt | None


@schema("adapters.internvl.InternVLAdapter", "model")
@dataclass
class InternVLConfig(AdapterConfig):
    """``conf/model/internvl.yaml``."""

    max_tiles: PosInt | None
    min_tiles: PosInt | None


# ---- methods


@dataclass
class MethodConfig:
    """What every ``conf/method`` option holds."""

    name: Annotated[str, NonEmpty()]


@schema("methods.none.NoMethod")
@dataclass
class NoMethodConfig(MethodConfig):
    """``conf/method/none.yaml``."""


@schema("methods.var.VAR")
@dataclass
class VARConfig(MethodConfig):
    """``conf/method/var.yaml``."""

    p: Fraction
    rho: Fraction
    visual_mass: Fraction
    tau: Annotated[float, Range(gt=0)] | None
    layers: Layers
    sink_dims: Layers
    sink_file: str | None


@schema("methods.cca.CCA")
@dataclass
class CCAConfig(MethodConfig):
    """``conf/method/cca.yaml``."""

    positions: bool
    mask: bool


@schema("methods.mma.MMA")
@dataclass
class MMAConfig(MethodConfig):
    """``conf/method/mma.yaml``."""

    include_turn_suffix: bool


@dataclass
class _PrunerConfig(MethodConfig):
    ratio: Annotated[float, Range(ge=0, lt=1)]
    keep: PosInt | None
    debias: bool
    debias_file: str | None
    pad_threshold: Fraction


@schema("methods.fastv.FastV")
@dataclass
class FastVConfig(_PrunerConfig):
    """``conf/method/fastv.yaml``."""

    layer: Literal["auto"] | PosInt
    rule: Literal["last", "mean"]


@schema("methods.fastervlm.FasterVLM")
@dataclass
class FasterVLMConfig(_PrunerConfig):
    """``conf/method/fastervlm.yaml``."""


@schema("methods.embedlens.EmbedLens")
@dataclass
class EmbedLensConfig(MethodConfig):
    """``conf/method/embedlens.yaml``."""

    mode: Literal["probe", "drop", "inject"]
    drop: list[Literal["vit_sink", "llm_sink", "dead"]]
    entry_layer: Literal["middle"] | PosInt
    top_k: PosInt
    markers: Literal["auto"] | dict[str, NonNegInt | None]
    markers_file: str | None
    maps: bool


@schema("methods.carve.CARVE")
@dataclass
class CARVEConfig(MethodConfig):
    """``conf/method/carve.yaml``."""

    layers: Layers
    lam: Annotated[float, Range(ge=0)]
    p: Annotated[float, Range(gt=0, le=1)]
    k: PosInt
    rank: Literal["attention_sum", "size"]
    steps: Literal["full", "start", "end"]
    max_new_tokens: PosInt
    feed: Literal["refined", "both"]
    general_prompt: str
    question_suffix: str
    cache_size: NonNegInt
    save_masks: bool


@schema("methods.iri.IRI")
@dataclass
class IRIConfig(MethodConfig):
    """``conf/method/iri.yaml``."""

    lambda_attn: Literal["auto"] | float
    lambda_mlp: Literal["auto"] | float
    sources: Literal["auto"] | PosInt
    targets: Literal["auto"] | PosInt
    use_rr: bool
    renorm: bool
    components: Annotated[list[Literal["attn", "mlp"]], NonEmpty()]
    fcct_file: str | None


@schema("methods.vcd.VCD")
@dataclass
class VCDConfig(MethodConfig):
    """``conf/method/vcd.yaml``."""

    alpha: Annotated[float, Range(ge=0)]
    beta: Annotated[float, Range(gt=0, le=1)]
    noise_step: Annotated[int, Range(ge=0, le=999)]
    seed: int


@schema("methods.ritual.RITUAL")
@dataclass
class RITUALConfig(MethodConfig):
    """``conf/method/ritual.yaml``."""

    alpha: Annotated[float, Range(ge=0)]
    beta: Annotated[float, Range(gt=0, le=1)]
    transforms: Annotated[
        list[Literal["horizontal_flip", "vertical_flip", "rotation", "color_jitter", "gaussian_blur", "crop"]],
        NonEmpty(),
    ]
    seed: int
    log: bool


@schema("methods.vhr.VHR")
@dataclass
class VHRConfig(MethodConfig):
    """``conf/method/vhr.yaml``."""

    alpha: Annotated[float, Range(ge=0)]
    layers: Layers
    outliers: bool


# ---- tasks


@dataclass
class TaskConfig:
    """What every ``conf/task`` option holds."""

    name: Annotated[str, NonEmpty()]
    n_boot: NonNegInt
    gen_kwargs: dict[str, Any]


Paths = Annotated[str, NonEmpty()] | Annotated[list[str], NonEmpty()]


@schema("tasks.pope.POPETask", "task")
@dataclass
class POPEConfig(TaskConfig):
    """``conf/task/pope.yaml``."""

    questions: Annotated[str, NonEmpty()]
    image_root: str | None
    splits: Annotated[list[Annotated[str, NonEmpty()]], NonEmpty()]
    prompt_suffix: str
    parser: str
    extra_parsers: list[str]


@schema("tasks.chair.CHAIRTask", "task")
@dataclass
class CHAIRConfig(TaskConfig):
    """``conf/task/chair.yaml``."""

    instances: Paths
    captions: Paths
    image_root: str | None
    synonyms: str | None
    image_ids_file: str | None
    n_images: PosInt | None
    seed: NonNegInt
    prompt: str
    drop_incomplete_sentence: bool


@schema("tasks.mme.MMETask", "task")
@dataclass
class MMEConfig(TaskConfig):
    """``conf/task/mme.yaml``."""

    data: Annotated[str, NonEmpty()]
    subtasks: str | list[str] | None
    image_root: str | None
    prompt_suffix: str
    strip_original_suffix: bool
    parser: str
    extra_parsers: list[str]
    require_yes_and_no: bool


@schema("tasks.vcrbench.VCRBenchTask", "task")
@dataclass
class VCRBenchConfig(TaskConfig):
    """``conf/task/vcrbench.yaml``."""

    data: Annotated[str, NonEmpty()]
    video_root: str | None
    num_frames: PosInt | None
    fps: Annotated[float, Range(gt=0)] | None
    max_frames: PosInt | None
    label_clips: bool
    mode: Literal["direct", "rrd"]
    rrd_recognition: Literal["joint", "sequential"]
    rrd_reason_with_video: bool


@schema("tasks.causal_pairs.CausalPairsTask", "task")
@dataclass
class CausalPairsConfig(TaskConfig):
    """``conf/task/causal_pairs.yaml``."""

    data: Annotated[str, NonEmpty()]
    image_root: str | None
    image_pattern: str | None
    connective: str | None
    prompt: str
    answers: Annotated[list[Annotated[str, NonEmpty()]], NonEmpty()]


# ---- loggers


@schema("core.loggers.NoLogger", "logger")
@dataclass
class NoLoggerConfig:
    """``conf/logger/none.yaml``."""


@schema("core.loggers.WandbLogger", "logger")
@dataclass
class WandbConfig:
    """``conf/logger/wandb.yaml``."""

    project: Annotated[str, NonEmpty()]
    entity: str | None
    name: str | None
    group: str | None
    tags: list[str]
    job_type: str
    max_table_rows: Annotated[int, Range(ge=1, le=200_000)]
    init_timeout: Annotated[float, Range(gt=0)]


# ----------------------------------------------------------------------------------------------- entry point


def validate(cfg: Any) -> dict[str, Any]:
    """Check a composed top-level config; returns it resolved as a plain dict.

    Raises:
        ConfigError: On the first wrong type, out-of-range value, missing or unknown key, or a group option whose
            ``_target_`` has no schema.
    """
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        doc = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"the config does not resolve: {str(exc).splitlines()[0]}") from None
    doc = {k: v for k, v in doc.items() if k != "hydra"}
    check_node(doc, RunConfig, "")
    for group, known in SCHEMAS.items():
        node = doc[group]
        target = node.get("_target_")
        if target not in known:
            raise ConfigError(
                f"{group}: no schema for _target_ {target!r}; add one in harness/schema.py (see its docstring)"
                + _closest(target, list(known))
            )
        check_node(node, known[target], group)
    return doc


def torch_imported() -> bool:
    """Whether torch is in this process yet (tests assert validation happens before)."""
    return "torch" in sys.modules
