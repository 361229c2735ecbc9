"""What the model is made of, named the same in every family: sites, sizes, attention switches, the vision tower.

The :class:`Anatomy` mixin of :class:`adapters.base.Adapter`. Intervention sites share one grammar (resolved by
:meth:`Anatomy.site`)::

    lm.embed                     token embedding module
    lm.layers.{l}                decoder layer l          (forward pre-hook input = resid_pre [batch, seq, d])
    lm.layers.{l}.attn           its self-attention       (output = attn_out [batch, seq, d])
    lm.layers.{l}.mlp            its MLP                  (output = mlp_out [batch, seq, d])
    lm.norm                      final norm
    vision                       the vision tower (encoder)
    vision.layers.{l}            vision-encoder layer l
    vision.layers.{l}.attn       its self-attention
    vision.layers.{l}.mlp        its MLP
    projector                    multimodal projector     (output = projector.out, the visual tokens; family-shaped)

Tensor-valued sites inside attention (``lm.layers.{l}.attn.scores`` / ``.probs``) are reached through the
attention-function switch (:meth:`Anatomy.lm_attention`), never by patching modeling files; the vision tower has
its own switch (:meth:`Anatomy.vision_attention`). The tower's [CLS]→patch attention
(:meth:`Anatomy.vision_cls_attention`) is read with :data:`VISION_CLS`, an attention function registered with
transformers when this module is imported.

Here: the site grammar (:class:`SiteError`), :meth:`Anatomy.num_layers`, :attr:`Anatomy.num_heads`,
:attr:`Anatomy.num_kv_heads`, :attr:`Anatomy.head_dim`, the two attention switches, the vision tower's inputs
(:meth:`Anatomy.image_inputs`, :meth:`Anatomy.pixel_rows`, :meth:`Anatomy.pixel_noise`), the projector's input
and output (:meth:`Anatomy.vision_features`, :meth:`Anatomy.image_features`) and the [CLS] attention.
"""

from __future__ import annotations

import abc
import contextlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image
from torch import nn

from adapters.hf_compat import attention_function, sdpa_attention, use_attention

#: the vision tower's attention function while [CLS] scores are read (:meth:`Anatomy._vision_cls_probs`)
VISION_CLS = "harness_vision_cls"


@attention_function(VISION_CLS)
def _vision_cls_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    """SDPA, and at the module carrying a ``_harness_cls_sink`` list, its [CLS] row's probabilities appended."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    sink = getattr(module, "_harness_cls_sink", None)
    if sink is not None:
        logits = query[:, :, :1].float() @ key.float().transpose(-1, -2) * scaling  # [n, heads, 1, k]
        if attention_mask is not None:  # the towers here pass none; an additive or boolean one would apply here
            logits = logits.masked_fill(~attention_mask, -torch.inf) if attention_mask.dtype == torch.bool else (
                logits + attention_mask[..., :1, :].float())  # fmt: skip
        sink.append(logits.softmax(-1))
    return sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


_SITE = re.compile(r"^(lm|vision)\.layers\.(\d+)(?:\.(attn|mlp))?$")


class SiteError(LookupError):
    """An intervention site name that does not resolve on this model."""


class Anatomy(abc.ABC):
    """Mixin of :class:`adapters.base.Adapter`: the model's modules by site name, its sizes and its vision tower.

    A family sets the class attributes below and implements :meth:`image_inputs` and :meth:`vision_features`;
    everything else works from them. The model itself comes from :meth:`adapters.base.Adapter.load`.
    """

    #: the family's name in :data:`adapters.base.ADAPTERS` (set on each adapter class)
    family: ClassVar[str]
    #: attribute paths from the top-level model to the anatomy's containers
    paths: ClassVar[dict[str, str]]
    #: names of the attention / MLP sub-modules inside an LM layer and a vision layer
    layer_parts: ClassVar[dict[str, dict[str, str]]]
    #: whether the vision tower prepends a [CLS] token (dropped or kept before the projector)
    vision_has_cls: ClassVar[bool]

    if TYPE_CHECKING:  # provided by adapters.base.Adapter

        def _require_loaded(self) -> nn.Module: ...

    # ------------------------------------------------------------------ sites and sizes
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

    @property
    def num_heads(self) -> int:
        """Query heads per LM attention layer."""
        return int(self._require_loaded().config.get_text_config().num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads per LM attention layer (fewer than :attr:`num_heads` under GQA)."""
        cfg = self._require_loaded().config.get_text_config()
        return int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)

    @property
    def head_dim(self) -> int:
        """Per-head dimension of the LM attention."""
        cfg = self._require_loaded().config.get_text_config()
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    # ------------------------------------------------------------------ attention switches
    def lm_attention(self, implementation: str) -> contextlib.AbstractContextManager[None]:
        """Switch the LANGUAGE MODEL's attention function (not the vision tower's); restore on exit.

        ``implementation`` is a name registered with ``transformers.AttentionInterface`` (and, for custom
        functions, with ``AttentionMaskInterface`` under the same name, or the function gets no mask at all).
        """
        return self._attention_of("text_config", implementation)

    def vision_attention(self, implementation: str) -> contextlib.AbstractContextManager[None]:
        """Switch the VISION tower's attention function (e.g. to ``"eager"`` to read probabilities); restore on exit."""
        return self._attention_of("vision_config", implementation)

    @contextlib.contextmanager
    def _attention_of(self, part: str, implementation: str) -> Iterator[None]:
        model = self._require_loaded()
        config = model.config.get_text_config() if part == "text_config" else model.config.vision_config
        previous = config._attn_implementation
        model.set_attn_implementation({part: use_attention(implementation)})
        try:
            yield
        finally:
            model.set_attn_implementation({part: previous})

    # ------------------------------------------------------------------ vision tower
    @abc.abstractmethod
    def image_inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Vision-tower inputs (``pixel_values`` etc.) for a list of images, on the model's device."""

    def pixel_rows(self, inputs: dict[str, Any]) -> list[int]:
        """How many rows of ``pixel_values`` each image of the batch fills, in order (one per image by default).

        Qwen-VL fills one row per ViT patch, InternVL one per tile; the processor's order is the images' order.
        """
        n_images, rows = len(inputs["harness_image_sizes"]), inputs["pixel_values"].shape[0]
        if rows != n_images:
            raise NotImplementedError(f"{self.family}: {rows} pixel rows for {n_images} images")
        return [1] * n_images

    def pixel_noise(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Standard normal noise shaped like one image's ``pixel_values`` rows (float32, on their device).

        One draw per element of the normalised image the processor produced; families that repeat an image inside
        their pixel tensor (Qwen-VL's temporal copies) repeat the draw too.
        """
        return torch.randn(pixels.shape, generator=generator, device=pixels.device, dtype=torch.float32)

    @abc.abstractmethod
    def vision_features(self, image_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The projector's input for these images (family-shaped; ``site("projector")`` consumes it)."""

    def image_features(self, image_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Projected visual tokens, in the order they fill the LM's image placeholders, ``[n_visual_total, d]``."""
        projected = self.site("projector")(self.vision_features(image_inputs))
        return projected.reshape(-1, projected.shape[-1])

    def vision_cls_attention(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per sample, the vision tower's head-mean [CLS]→patch attention for each visual token, ``[n]``.

        Read at the layer whose output feeds the projector (site ``vision.layers.{l}.attn.probs``, CLS query row),
        pooled to the LM's visual tokens where patches are merged. Families without a [CLS] token raise.
        """
        raise NotImplementedError(
            f"the {self.family} vision tower has no [CLS] token, so there is no [CLS]→patch attention to read"
        )

    def _vision_cls_probs(self, pixel_kwargs: dict[str, torch.Tensor], feature_layer: int) -> torch.Tensor:
        """[CLS]-query attention of the layer whose output is ``hidden_states[feature_layer]``, ``[n, heads, 1+P]``.

        One tower pass with its fused kernel: the attention function of :data:`VISION_CLS` computes the [CLS] row's
        softmax (float32) at that layer only, instead of an eager pass that materialises every layer's ``P²``
        probabilities (what ``output_attentions=True`` costs). The pass is the model's own image encoding
        (``get_image_features``, the same SDPA kernels), and its output is kept for the model call about to run
        on these ``pixel_values`` (:meth:`Generation._call`, :func:`adapters.hf_compat.encoded_images`), so the
        tower runs once per prompt, not twice.
        """
        if not isinstance(feature_layer, int) or feature_layer == 0:
            raise ValueError(f"vision_feature_layer {feature_layer!r} has no single attention layer")
        n = self.num_layers("vision")
        attn = self.site(f"vision.layers.{feature_layer % n if feature_layer < 0 else feature_layer - 1}.attn")
        model = self._require_loaded()
        sink: list[torch.Tensor] = []
        attn._harness_cls_sink = sink
        try:
            with self.vision_attention(VISION_CLS):
                encoded = model.base_model.get_image_features(**pixel_kwargs, return_dict=True)
            # only what the model reads (the projected features), not every tower layer's hidden states
            self._encoded = (pixel_kwargs["pixel_values"], type(encoded)(pooler_output=encoded.pooler_output))
        finally:
            del attn._harness_cls_sink
        if len(sink) != 1:
            raise RuntimeError(f"the vision tower called layer {feature_layer}'s attention {len(sink)} times, not once")
        return sink[0][:, :, 0]  # [n, heads, 1 + P]
