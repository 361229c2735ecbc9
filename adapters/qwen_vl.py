r"""Qwen2-VL and Qwen2.5-VL adapter (``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``).

Loads hub ids such as ``Qwen/Qwen2-VL-7B-Instruct`` / ``Qwen/Qwen2.5-VL-7B-Instruct`` or a local directory with
``from_pretrained`` (safetensors, no ``trust_remote_code``); the variant is read from ``config.model_type``.

* **Images.** Dynamic resolution: each image is resized so that its area lies in ``[min_pixels, max_pixels]`` with
  sides divisible by ``patch_size × merge_size``; the ViT sees ``(H/14)·(W/14)`` patches and the 2×2 patch merger
  (the projector, ``model.visual.merger``) emits ``(H/28)·(W/28)`` LM tokens per image, placed between
  ``<|vision_start|>`` and ``<|vision_end|>``, row-major over the merged grid.
* **Prompt.** The processor's chat template (ChatML), else the same ChatML layout written out.
* **Positions (M-RoPE).** The LM's position ids are ``[3, batch, seq]`` (temporal, height, width): text tokens
  share one increasing index in all three rows; an image's tokens get ``t = start``, ``h = start + row``,
  ``w = start + col``, and the text after it resumes at ``start + max(rows, cols)``. :meth:`position_ids` returns
  them as the model's own generation builder computes them (``get_rope_index``), and
  :meth:`~adapters.generation.Generation.positions` replaces them in prefill; decoding continues at each row's last
  position + 1.
* **Vision tower.** No [CLS] token. The projector's input (:meth:`vision_features`) is the last block's output,
  ``[n_patches_total, d_vision]``, patches ordered so that each 2×2 merge window is contiguous.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import transformers
from PIL import Image
from torch import nn
from transformers.vision_utils import get_vision_window_index

from adapters.base import ADAPTERS, Adapter
from adapters.generation import CHATML, CHATML_SYSTEM, model_inputs
from core.errors import UserError

#: config.model_type → names of (model class, stock processor class) in ``transformers``, looked up at load time
#: (see adapters.base.Adapter._model_class)
VARIANTS = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
}


@ADAPTERS.register("qwen_vl")
class QwenVLAdapter(Adapter):
    """Adapter for Qwen2-VL and Qwen2.5-VL checkpoints.

    Args:
        variant: ``"auto"`` (from the checkpoint's ``config.model_type``), ``"qwen2_vl"`` or ``"qwen2_5_vl"``; an
            explicit value must match the checkpoint.
        min_pixels: Lower bound of an image's area after resizing (None: the checkpoint's processor setting).
        max_pixels: Upper bound of an image's area after resizing (None: the checkpoint's processor setting).
        **kwargs: See :class:`adapters.base.Adapter`.
    """

    family: ClassVar[str] = "qwen_vl"
    model_types: ClassVar[tuple[str, ...]] = tuple(VARIANTS)
    paths: ClassVar[dict[str, str]] = {
        "lm.embed": "model.language_model.embed_tokens",
        "lm.layers": "model.language_model.layers",
        "lm.norm": "model.language_model.norm",
        "vision": "model.visual",
        "vision.layers": "model.visual.blocks",
        "projector": "model.visual.merger",
    }
    layer_parts: ClassVar[dict[str, dict[str, str]]] = {
        "lm": {"attn": "self_attn", "mlp": "mlp"},
        "vision": {"attn": "attn", "mlp": "mlp"},
    }
    vision_has_cls: ClassVar[bool] = False
    templates: ClassVar[dict[str, str]] = {"chatml": CHATML}
    image_placeholder: ClassVar[str] = "<|vision_start|><|image_pad|><|vision_end|>"
    system_format: ClassVar[str] = CHATML_SYSTEM

    def __init__(
        self, *, variant: str = "auto", min_pixels: int | None = None, max_pixels: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if variant != "auto" and variant not in VARIANTS:
            raise ValueError(f"unknown Qwen-VL variant {variant!r}; use auto or one of {sorted(VARIANTS)}")
        self.variant = variant
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels

    def check_checkpoint(self) -> None:
        """A Qwen2-VL or Qwen2.5-VL checkpoint, of the ``variant`` asked for (if not ``auto``)."""
        super().check_checkpoint()
        model_type = self.checkpoint_config().model_type
        if self.variant != "auto" and self.variant != model_type:
            raise UserError(f"model.variant={self.variant} but model.path={self.path!r} is a {model_type} "
                            "checkpoint; leave model.variant=auto")  # fmt: skip

    def _load_processor(self) -> Any:
        """The variant's processor with the pixel bounds applied; resolves ``variant`` from the checkpoint."""
        kw = self.hub_kwargs
        self.check_checkpoint()
        model_type = self.checkpoint_config().model_type
        self.variant = model_type
        from adapters.processors import load_processor

        processor = load_processor(self.path, getattr(transformers, VARIANTS[model_type][1]), **kw)
        size = dict(processor.image_processor.size)
        if self.min_pixels is not None:
            size["shortest_edge"] = self.min_pixels
        if self.max_pixels is not None:
            size["longest_edge"] = self.max_pixels
        if size["shortest_edge"] > size["longest_edge"]:
            raise ValueError(f"min_pixels {size['shortest_edge']} > max_pixels {size['longest_edge']}")
        processor.image_processor.size = size
        processor.tokenizer.padding_side = "left"
        return processor

    def _model_class(self) -> type[nn.Module]:
        return getattr(transformers, VARIANTS[self.variant][0])  # the variant the processor load resolved

    # ------------------------------------------------------------------ vision
    def image_inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """``pixel_values [n_patches_total, 3·2·p·p]`` and ``image_grid_thw [n_images, 3]`` (in patches)."""
        out = self.processor.image_processor(images, return_tensors="pt")
        return {
            "pixel_values": out["pixel_values"].to(self.device, self._require_loaded().dtype),
            "image_grid_thw": out["image_grid_thw"].to(self.device),
        }

    def pixel_rows(self, inputs: dict[str, Any]) -> list[int]:
        """One ``pixel_values`` row per ViT patch: ``t·h·w`` of each image's ``image_grid_thw``."""
        return inputs["image_grid_thw"].prod(-1).tolist()

    def pixel_noise(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One draw per element of the image, shared by a still image's temporal copies.

        Each patch row is ``[channel, temporal, p, p]`` and a still image is repeated ``temporal_patch_size`` times
        along ``temporal``, so the copies share their draw.
        """
        vcfg = self._require_loaded().config.vision_config
        t, p = int(vcfg.temporal_patch_size), int(vcfg.patch_size)
        c = pixels.shape[1] // (t * p * p)
        draw = torch.randn((pixels.shape[0], c, 1, p, p), generator=generator, device=pixels.device)
        return draw.expand(-1, -1, t, -1, -1).reshape(pixels.shape)

    def vision_features(self, image_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The vision blocks' output the merger reads, ``[n_patches_total, d_vision]``.

        Patches are in the processor's order (each 2×2 merge window contiguous, windows row-major per image), so
        ``site("projector")`` maps it to the LM's visual tokens in order. Qwen2.5-VL runs its blocks on a
        window-permuted sequence and un-permutes after the merger; here the permutation is undone first.
        """
        visual = self.site("vision")
        grid = image_inputs["image_grid_thw"]
        captured: dict[str, torch.Tensor] = {}

        def grab(_module: nn.Module, args: tuple) -> None:
            captured["x"] = args[0]

        handle = self.site("projector").register_forward_pre_hook(grab)
        try:
            visual(image_inputs["pixel_values"], grid_thw=grid)
        finally:
            handle.remove()
        x = captured["x"]  # [n_patches_total, d_vision]
        if self.variant == "qwen2_5_vl":
            vcfg = self._require_loaded().config.vision_config
            window_index, _ = get_vision_window_index(grid, self.merge_size, vcfg.window_size, vcfg.patch_size)
            unit = self.merge_size**2
            x = x.reshape(-1, unit, x.shape[-1])[torch.argsort(window_index)].reshape(-1, x.shape[-1])
        return x

    # ------------------------------------------------------------------ anatomy
    @property
    def image_token_id(self) -> int:
        """``config.image_token_id`` (``<|image_pad|>``)."""
        return int(self._require_loaded().config.image_token_id)

    @property
    def merge_size(self) -> int:
        """Side of the patch-merger window (2)."""
        return int(self._require_loaded().config.vision_config.spatial_merge_size)

    def token_grids(self, inputs: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
        """(rows, cols) of each image's LM-token grid, for the batch's images in order."""
        m = self.merge_size
        return [(int(h) // m, int(w) // m) for _t, h, w in inputs["image_grid_thw"].tolist()]

    def visual_token_map(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """(image, 0, row, col) per visual token, row-major over each image's merged grid."""
        grids = iter(self.token_grids(inputs)) if "image_grid_thw" in inputs else iter(())
        maps = []
        for spans in self.image_spans(inputs):
            rows_ = []
            for image, (start, end) in enumerate(spans):
                rows, cols = next(grids)
                if end - start != rows * cols:
                    raise ValueError(f"image span of {end - start} tokens does not match its {rows}x{cols} grid")
                r, c = torch.meshgrid(torch.arange(rows, device="cpu"), torch.arange(cols, device="cpu"), indexing="ij")
                rows_.append(torch.stack([torch.full_like(r, image), torch.zeros_like(r), r, c], -1).reshape(-1, 4))
            maps.append(torch.cat(rows_) if rows_ else torch.zeros(0, 4, dtype=torch.long, device="cpu"))
        return maps

    def position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """M-RoPE position ids of the prompt, ``[3, batch, seq]`` (temporal, height, width)."""
        return self._generation_positions(inputs)[1:]

    def _generation_positions(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ``[4, batch, seq]`` tensor ``generate`` builds: row 0 = text positions, rows 1–3 = M-RoPE."""
        model = self._require_loaded()
        kwargs = {k: v for k, v in model_inputs(inputs).items() if k != "pixel_values"}
        return model._prepare_position_ids_for_generation(inputs["input_ids"], kwargs)

    def _model_position_ids(self, positions: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Prepend the text-position row that ``forward``/``generate`` expect (``[4, batch, seq]``).

        That row is the 1-D ``cumsum(attention_mask) - 1`` that ``generate`` builds (the base class's builder),
        so the rope index is not computed a second time.
        """
        return torch.cat([super().position_ids(inputs)[None], positions], 0)

    def describe(self) -> dict[str, Any]:
        """Adds the variant and the resize bounds to the generic description."""
        info = super().describe() | {"variant": self.variant}
        if self.processor is not None:
            size = self.processor.image_processor.size
            info |= {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}
        return info
