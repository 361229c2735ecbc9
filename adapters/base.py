"""The adapter interface: one model family each, behind one uniform *anatomy*.

An adapter knows its family: checkpoint loading, the processor and prompt template, image-token spans, the
visual-token grid, position ids and where the decoder layers and attention modules live. Methods talk to a
model only through this interface, so they never ask "which model is this?".

Intervention sites share one grammar (resolved by :meth:`Adapter.site`)::

    lm.embed                     token embedding module
    lm.layers.{l}                decoder layer l          (forward pre-hook input = resid_pre [batch, seq, d])
    lm.layers.{l}.attn           its self-attention       (output = attn_out [batch, seq, d])
    lm.layers.{l}.mlp            its MLP                  (output = mlp_out [batch, seq, d])
    lm.norm                      final norm
    vision                       the vision tower (encoder)
    vision.layers.{l}            vision-encoder layer l
    vision.layers.{l}.attn       its self-attention
    vision.layers.{l}.mlp        its MLP
    projector                    multimodal projector     (output = projector.out [n_img, n_vis, d])

Tensor-valued sites inside attention (``lm.layers.{l}.attn.scores`` / ``.probs``) are reached through the
attention-function switch (:meth:`Adapter.lm_attention`), never by patching modeling files.
"""

from __future__ import annotations

import abc
import contextlib
import re
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from harness.registry import Registry

ADAPTERS: Registry[type[Adapter]] = Registry("adapter")

_SITE = re.compile(r"^(lm|vision)\.layers\.(\d+)(?:\.(attn|mlp))?$")


class SiteError(LookupError):
    """An intervention site name that does not resolve on this model."""


class Adapter(abc.ABC):
    """Base class of model-family adapters.

    Construction is cheap and never touches weights, so method/adapter compatibility can be checked before the
    model loads; :meth:`load` does the expensive part.

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

    family: ClassVar[str]
    #: attribute paths from the top-level model to the anatomy's containers
    paths: ClassVar[dict[str, str]]
    #: names of the attention / MLP sub-modules inside an LM layer and a vision layer
    layer_parts: ClassVar[dict[str, dict[str, str]]]

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

    # ------------------------------------------------------------------ loading
    @property
    def device(self) -> torch.device:
        """Device the model runs on."""
        if self.device_name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device_name)

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
        """Load weights and processor (idempotent); records ``load_seconds``."""
        if self.model is not None:
            return
        t0 = time.perf_counter()
        self.model, self.processor = self._load()
        self.model.eval()
        self.load_seconds = time.perf_counter() - t0

    @abc.abstractmethod
    def _load(self) -> tuple[nn.Module, Any]:
        """Return ``(model, processor)`` loaded with ``from_pretrained``."""

    def _require_loaded(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError(f"adapter {self.name!r} is not loaded; call load() first")
        return self.model

    # ------------------------------------------------------------------ prompting and generation
    @abc.abstractmethod
    def format_prompt(self, text: str, n_images: int = 1) -> str:
        """Wrap the user text and ``n_images`` image placeholders in the family's prompt template."""

    @abc.abstractmethod
    def build_inputs(self, prompts: list[str], images: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
        """Tokenise a batch with LEFT padding and preprocess its images; tensors on the model's device."""

    @torch.inference_mode()
    def generate(self, inputs: dict[str, torch.Tensor], **gen_kwargs: Any) -> list[str]:
        """Generate continuations and return only the new text of each row, decoded without special tokens."""
        model = self._require_loaded()
        out = model.generate(**inputs, **gen_kwargs)  # [batch, prompt + new]
        new = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]

    # ------------------------------------------------------------------ anatomy
    @property
    @abc.abstractmethod
    def image_token_id(self) -> int:
        """Token id of the image placeholder in ``input_ids``."""

    def image_token_mask(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Boolean mask of visual-token positions in the LM sequence, ``[batch, seq]``."""
        return inputs["input_ids"] == self.image_token_id

    def image_spans(self, inputs: dict[str, torch.Tensor]) -> list[list[tuple[int, int]]]:
        """Per sample, the ``[start, end)`` runs of visual tokens in the (padded) LM sequence, in order."""
        mask = self.image_token_mask(inputs).to(torch.int8)  # [batch, seq]
        edges = torch.diff(
            mask, dim=1, prepend=mask.new_zeros(mask.shape[0], 1), append=mask.new_zeros(mask.shape[0], 1)
        )
        spans = []
        for row in edges:
            starts = (row == 1).nonzero().flatten().tolist()
            ends = (row == -1).nonzero().flatten().tolist()
            spans.append(list(zip(starts, ends, strict=True)))
        return spans

    @abc.abstractmethod
    def image_inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Vision-tower inputs (``pixel_values`` etc.) for a list of images, on the model's device."""

    @abc.abstractmethod
    def vision_features(self, image_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Vision-tower features the projector reads, one row per visual token, ``[n_images, n_visual, d]``."""

    @abc.abstractmethod
    def visual_grid(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per sample, the (row, col) grid position of every visual token in sequence order.

        Returns:
            One ``LongTensor [n_visual_tokens, 2]`` per sample; rows of ``-1`` mark tokens with no grid cell.
        """

    @abc.abstractmethod
    def position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Position ids the LM uses for this batch (``[batch, seq]`` for 1-D RoPE)."""

    def site(self, name: str) -> nn.Module:
        """Resolve an intervention site of the grammar in the module docstring to its module.

        Raises:
            SiteError: when the name is malformed, the layer index is out of range or the part is missing.
        """
        model = self._require_loaded()
        if name in self.paths:
            return self._get(model, self.paths[name], name)
        m = _SITE.match(name)
        if not m:
            raise SiteError(
                f"site {name!r} does not follow the grammar; known roots: {sorted(self.paths)}, "
                "lm.layers.{l}[.attn|.mlp], vision.layers.{l}[.attn|.mlp]"
            )
        tower, idx, part = m.group(1), int(m.group(2)), m.group(3)
        layers = self._get(model, self.paths[f"{tower}.layers"], name)
        if idx >= len(layers):
            raise SiteError(f"site {name!r}: {tower} has {len(layers)} layers (0..{len(layers) - 1})")
        layer = layers[idx]
        return layer if part is None else self._get(layer, self.layer_parts[tower][part], name)

    @staticmethod
    def _get(root: nn.Module, dotted: str, site: str) -> Any:
        obj = root
        for attr in dotted.split("."):
            if not hasattr(obj, attr):
                raise SiteError(f"site {site!r}: {type(obj).__name__} has no attribute {attr!r} (path {dotted})")
            obj = getattr(obj, attr)
        return obj

    def num_layers(self, tower: str = "lm") -> int:
        """Number of decoder (``"lm"``) or vision-encoder (``"vision"``) layers."""
        return len(self.site(f"{tower}.layers"))

    @contextlib.contextmanager
    def lm_attention(self, implementation: str) -> Iterator[None]:
        """Switch the LANGUAGE MODEL's attention function (not the vision tower's); restore on exit.

        ``implementation`` is a name registered with ``transformers.AttentionInterface`` (and, for custom
        functions, with ``AttentionMaskInterface`` under the same name so masks are materialised).
        """
        model = self._require_loaded()
        text_cfg = model.config.get_text_config()
        previous = text_cfg._attn_implementation
        model.set_attn_implementation({"text_config": implementation})
        try:
            yield
        finally:
            model.set_attn_implementation({"text_config": previous})

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
            )
        return info
