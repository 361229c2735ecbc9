"""The adapter interface: one model family each, behind one uniform *anatomy*.

An adapter knows its family: checkpoint loading, the processor and prompt template, image-token spans, the
visual-token grid, position ids and where the decoder layers and attention modules live. Methods talk to a
model only through this interface, so they never ask "which model is this?".

:class:`Adapter` is composed by concern, one mixin per module:

* :mod:`adapters.anatomy` (:class:`~adapters.anatomy.Anatomy`): the intervention-site grammar and its resolution
  (:meth:`site`), :meth:`num_layers`, :attr:`num_heads`, :attr:`num_kv_heads`, :attr:`head_dim`; the LM-only
  attention switch (:meth:`lm_attention`) and the vision tower's; the vision tower and :attr:`vision_has_cls`;
  projector input (:meth:`vision_features`) and the projected visual tokens in LM order (:meth:`image_features`);
  the tower's [CLS]→patch attention (:meth:`vision_cls_attention`);
* :mod:`adapters.geometry` (:class:`~adapters.geometry.Geometry`): per-sample image-token spans
  (:meth:`image_spans`, :meth:`tile_spans`, :meth:`instruction_spans`), each visual token's
  ``(image, tile, row, col)`` (:meth:`visual_token_map`) and the original-image region it covers
  (:meth:`tile_frames`, :meth:`token_cells`), and the position-id builder (:meth:`position_ids`);
* :mod:`adapters.generation` (:class:`~adapters.generation.Generation`): the prompt format
  (:meth:`format_prompt`, :meth:`answer_token_id`), model inputs (:meth:`build_inputs`), every model call
  (:meth:`forward`, :meth:`generate_ids`) with the position-id replacement (:meth:`positions`), input observers
  (:meth:`on_inputs`), batched views (:meth:`views`) and decoding-logit processors (:meth:`decoding_logits`).

This module holds the class itself, the rest that every family shares (construction, loading, :meth:`describe`)
and the registry of families, :data:`ADAPTERS`. The LM's position ids (site ``inputs.position_ids``) are read
with :meth:`Adapter.position_ids` and replaced with :meth:`Adapter.positions`.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from adapters.anatomy import Anatomy
from adapters.generation import Generation, PositionFn, ViewFn
from adapters.geometry import Geometry
from adapters.hf_compat import image_processing
from core.checkpoint import checkpoint_problem
from core.errors import UserError
from core.registry import Registry

ADAPTERS: Registry[type[Adapter]] = Registry("adapter")


class Adapter(Anatomy, Geometry, Generation, abc.ABC):
    """Base class of model-family adapters.

    Construction is cheap and never touches weights, so method/adapter compatibility can be checked before the
    model loads; :meth:`load` does the expensive part.

    A family subclass sets :attr:`family`, :attr:`model_types` and the class attributes its mixins declare
    (:class:`Anatomy`: ``paths``, ``layer_parts``, ``vision_has_cls``; :class:`Generation`: ``templates``,
    ``image_placeholder``, ``system_format``) and implements the abstract methods: :meth:`_load_processor` and
    :meth:`_model_class` here, :meth:`image_inputs` and :meth:`vision_features` (:class:`Anatomy`),
    :attr:`image_token_id` and :meth:`visual_token_map` (:class:`Geometry`).

    Args:
        name: Short model name used in run directories and reports.
        path: Local directory or hub id handed to ``from_pretrained``.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"`` (the checkpoint's own dtype).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available).
        attn_implementation: Attention kernel for both towers at load time (``"sdpa"`` or ``"eager"``).
        revision: Hub revision (ignored for local directories).
        prompt_template: ``"auto"`` (processor chat template when present, else the family default),
            ``"chat"`` (require the chat template) or a family template name.
        system_prompt: Optional system text put before the user turn.
    """

    #: the family's name in :data:`ADAPTERS`
    family: ClassVar[str]
    #: the ``config.model_type`` values of the checkpoints this family loads
    model_types: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        *,
        name: str,
        path: str,
        dtype: str = "float32",
        device: str = "cpu",
        attn_implementation: str = "sdpa",
        revision: str | None = None,
        prompt_template: str = "auto",
        system_prompt: str | None = None,
    ) -> None:
        self.name = name
        self.path = str(path)
        self.dtype_name = dtype
        self.device_name = device
        self.attn_implementation = attn_implementation
        self.revision = revision
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.model: nn.Module | None = None
        self.processor: Any = None
        self.load_seconds: float | None = None
        self._position_fn: PositionFn | None = None
        self._input_observers: list[Callable[[dict[str, torch.Tensor] | None], None]] = []
        self._turn_suffix: list[int] | None = None
        self._logits_processors: list[Any] = []
        self._view_fn: ViewFn | None = None
        self._encoded: tuple[torch.Tensor, Any] | None = None  # (pixel_values, their image encoding): Anatomy
        self._config: Any = None  # the checkpoint's config, read before loading (checkpoint_config)

    # ------------------------------------------------------------------ loading
    @property
    def device(self) -> torch.device:
        """Device the model runs on."""
        if self.device_name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device_name)

    def check_device(self) -> None:
        """Refuse a ``device`` this torch cannot use, before anything loads: one line saying what works instead."""
        works = "use model.device=cpu, cuda, cuda:N or auto (CUDA when available)"
        try:
            device = self.device
        except RuntimeError as exc:  # not a device string torch parses ("gpu", "cuda:x")
            raise UserError(f"model.device={self.device_name!r} is not a device ({str(exc).splitlines()[0]}); "
                            f"{works}") from None  # fmt: skip
        if device.type != "cuda":
            return
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
            raise UserError(f"model.device={self.device_name!r}, but torch {torch.__version__} has no CUDA device "
                            f"({build}); use model.device=cpu or auto, or install a CUDA build of torch on a GPU "
                            "machine")  # fmt: skip
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"model.device={self.device_name!r}, but only {torch.cuda.device_count()} CUDA device(s) "
                            f"are visible (cuda:0 ...); {works}")  # fmt: skip

    @property
    def torch_dtype(self) -> torch.dtype | str:
        """``torch.dtype`` for ``from_pretrained`` (or ``"auto"``)."""
        if self.dtype_name == "auto":
            return "auto"
        try:
            return getattr(torch, self.dtype_name)
        except AttributeError:
            raise ValueError(f"unknown dtype {self.dtype_name!r}; use float32, bfloat16, float16 or auto") from None

    def load(self) -> None:
        """Load processor and weights (idempotent); records ``load_seconds``."""
        if self.model is not None:
            return
        if Path(self.path).is_dir() and (problem := checkpoint_problem(Path(self.path))):
            raise UserError(f"model.path={self.path!r} {problem}")  # before from_pretrained builds a wrong model
        self.check_checkpoint()
        t0 = time.perf_counter()
        try:
            self.load_processor()
            self.model = self._load_model()
        except OSError as exc:  # from_pretrained: a hub id it cannot fetch, a directory missing a file it needs
            raise self._unloadable(exc) from exc
        self.model.eval()
        self.load_seconds = time.perf_counter() - t0

    def _unloadable(self, exc: Exception) -> UserError:
        """One line for a checkpoint ``from_pretrained`` cannot read: ``exc``'s first line, naming ``model.path``."""
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        return UserError(f"model.path={self.path!r} could not be loaded: {first}")

    def load_processor(self) -> Any:
        """Load the processor only (idempotent), never the weights; returns it.

        Enough for :meth:`format_prompt` and :meth:`answer_token_id`, e.g. to format prompts for another engine.
        """
        if self.processor is None:
            self.processor = self._load_processor()
        return self.processor

    @abc.abstractmethod
    def _load_processor(self) -> Any:
        """Return the processor loaded with ``from_pretrained`` and set up as the family needs (left padding)."""

    def checkpoint_config(self) -> Any:
        """The checkpoint's config (``AutoConfig``, no weights read), read once.

        Raises:
            UserError: No config here or on the hub (a hub id offline or misspelt), or one this transformers cannot
                read (an architecture it does not know, e.g. the original, non ``-hf`` LLaVA repositories): the load
                would fail the same way, after the hub client's retries a second time.
        """
        if self._config is None:
            from transformers import AutoConfig

            try:
                self._config = AutoConfig.from_pretrained(self.path, **self.hub_kwargs)
            except (OSError, ValueError) as exc:
                raise self._unloadable(exc) from exc
        return self._config

    def check_checkpoint(self) -> None:
        """Refuse a checkpoint of another family before anything loads: one line naming the option that loads it.

        Without it, a LLaVA checkpoint under ``model=internvl`` fails deep in the processor, or worse, loads into
        the wrong class with freshly initialised weights.
        """
        model_type = getattr(self.checkpoint_config(), "model_type", None)
        if model_type in self.model_types:
            return
        known = {name: ADAPTERS.get(name).model_types for name in ADAPTERS.names()}
        owners = [name for name, types in known.items() if model_type in types]
        every = ", ".join(sorted(t for types in known.values() for t in types))
        instead = f"use model={owners[0]} with this model.path" if owners else f"the families here load {every}"
        raise UserError(f"model.path={self.path!r} holds a {model_type} checkpoint (config.model_type), but the "
                        f"{self.family} adapter loads {', '.join(self.model_types)}; {instead}")  # fmt: skip

    def lm_depth(self) -> int | None:
        """The LM's number of layers: the loaded model's, else the checkpoint's config (no weights read).

        ``None`` when the config has no readable depth (the methods then check their layers when they install).
        Raises :class:`UserError` where :meth:`checkpoint_config` does.
        """
        if self.model is not None:
            return self.num_layers("lm")
        try:
            return int(self.checkpoint_config().get_text_config().num_hidden_layers)
        except (AttributeError, TypeError, ValueError):
            return None

    @property
    def hub_kwargs(self) -> dict[str, Any]:
        """Keyword arguments every ``from_pretrained`` call of this checkpoint takes (the hub revision, if any)."""
        return {"revision": self.revision} if self.revision else {}

    @abc.abstractmethod
    def _model_class(self) -> type[nn.Module]:
        """The transformers class of the checkpoint (called after :meth:`load_processor`).

        Families import their model and processor classes inside these load-time methods, never at module level:
        importing one loads transformers' modelling code (about 5 s on 2 CPU cores), which a command refused
        before the model loads (a wrong layer, an unsupported method) never needs.
        """

    def _load_model(self) -> nn.Module:
        """The model from ``from_pretrained`` (safetensors only) on :attr:`device`."""
        return (
            self._model_class()
            .from_pretrained(
                self.path,
                dtype=self.torch_dtype,
                attn_implementation=self.attn_implementation,
                use_safetensors=True,
                **self.hub_kwargs,
            )
            .to(self.device)
        )

    def _require_loaded(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError(f"adapter {self.name!r} is not loaded; call load() first")
        return self.model

    def describe(self) -> dict[str, Any]:
        """Model metadata for the results file."""
        info: dict[str, Any] = {
            "name": self.name,
            "family": self.family,
            "path": self.path,
            "revision": self.revision,
            "dtype": self.dtype_name,
            "device": str(self.device),
            "prompt_template": self.prompt_template,
            "system_prompt": self.system_prompt,
            "image_processor": image_processing(self.processor),
        }
        if self.model is not None:
            cfg = self.model.config
            info.update(
                model_class=type(self.model).__name__,
                commit_hash=getattr(cfg, "_commit_hash", None),
                attn_implementation={
                    "text": cfg.get_text_config()._attn_implementation,
                    "vision": getattr(getattr(cfg, "vision_config", None), "_attn_implementation", None),
                },
                n_parameters=sum(p.numel() for p in self.model.parameters()),
                lm_layers=self.num_layers("lm"),
                heads=self.num_heads,
                kv_heads=self.num_kv_heads,
                vision_layers=self.num_layers("vision"),
                vision_has_cls=self.vision_has_cls,
            )
        return info
