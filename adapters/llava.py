r"""LLaVA-1.5 family adapter (``LlavaForConditionalGeneration``, CLIP-style vision tower + Llama/Vicuna LM).

Loads any llava-hf style checkpoint directory or hub id with ``from_pretrained`` (safetensors only, no
``trust_remote_code``). Prompt: the processor's chat template when it has one, else the llava-1.5 conversation
format ``USER: <image>\n{text} ASSISTANT:``. Visual tokens: ``config.image_seq_length`` placeholders per image,
one per vision patch in row-major order (CLS dropped under ``vision_feature_select_strategy="default"``,
kept as the first token under ``"full"``). Positions: 1-D RoPE, ``cumsum(attention_mask) - 1`` as ``generate``
builds them for left-padded batches.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from adapters.base import ADAPTERS, Adapter
from adapters.geometry import Box


@ADAPTERS.register("llava")
class LlavaAdapter(Adapter):
    """Adapter for LLaVA-1.5 (llava-hf format) checkpoints."""

    family: ClassVar[str] = "llava"
    model_types: ClassVar[tuple[str, ...]] = ("llava",)
    paths: ClassVar[dict[str, str]] = {
        "lm.embed": "model.language_model.embed_tokens",
        "lm.layers": "model.language_model.layers",
        "lm.norm": "model.language_model.norm",
        "vision": "model.vision_tower",
        "vision.layers": "model.vision_tower.encoder.layers",
        "projector": "model.multi_modal_projector",
    }
    layer_parts: ClassVar[dict[str, dict[str, str]]] = {
        "lm": {"attn": "self_attn", "mlp": "mlp"},
        "vision": {"attn": "self_attn", "mlp": "mlp"},
    }
    vision_has_cls: ClassVar[bool] = True
    templates: ClassVar[dict[str, str]] = {"llava15": "{system}USER: {images}{text} ASSISTANT:"}
    image_placeholder: ClassVar[str] = "<image>\n"

    def _load_processor(self) -> Any:
        from transformers import AutoProcessor  # imported here: see adapters.base.Adapter._model_class

        processor = AutoProcessor.from_pretrained(self.path, **self.hub_kwargs)
        processor.tokenizer.padding_side = "left"
        return processor

    def _model_class(self) -> type[nn.Module]:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def image_inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """``pixel_values`` of the images, ``[n_images, 3, H, W]``."""
        pixels = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels.to(self.device, self._require_loaded().dtype)}

    def vision_features(self, image_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states of ``vision_feature_layer`` (CLS dropped under "default"), ``[n_images, n_visual, d]``."""
        model = self._require_loaded()
        out = model.model.vision_tower(image_inputs["pixel_values"], output_hidden_states=True)
        feats = out.hidden_states[model.config.vision_feature_layer]  # [n_images, 1 + P, d]
        return feats[:, 1:] if model.config.vision_feature_select_strategy == "default" else feats

    def vision_cls_attention(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Head-mean [CLS]→patch attention of the feature layer per visual token (the kept [CLS] itself: +inf)."""
        model = self._require_loaded()
        cfg = model.config
        probs = self._vision_cls_probs({"pixel_values": inputs["pixel_values"]}, cfg.vision_feature_layer)
        cls = probs[:, :, 1:].mean(1)  # [n_images, P]
        if cfg.vision_feature_select_strategy == "full":
            cls = torch.cat([torch.full_like(cls[:, :1], torch.inf), cls], 1)  # [n_images, 1 + P]
        return self._per_row(inputs, cls, cls.shape[1])

    def tile_boxes(self, size: tuple[int, int], n_tiles: int) -> list[Box]:
        """The region the patch grid covers: the padded square (``do_pad``), the centre crop, or the whole image.

        ``do_pad`` centres the image on a square of side ``max(h, w)`` (the grid covers it all, padding included);
        otherwise ``do_center_crop`` resizes the shortest edge to ``size["shortest_edge"]`` and keeps the centred
        ``crop_size`` window; without either, the image is resized whole.
        """
        if n_tiles != 1:
            raise ValueError(f"LLaVA-1.5 has one tile per image, got {n_tiles}")
        h, w = size
        ip = self.processor.image_processor
        if getattr(ip, "do_pad", False):
            side = max(h, w)
            x0, y0 = -((side - w) // 2), -((side - h) // 2)
            return [(float(x0), float(y0), float(x0 + side), float(y0 + side))]
        if getattr(ip, "do_center_crop", False):
            scale = ip.size["shortest_edge"] / min(h, w)  # original → resized pixels
            cw, ch = ip.crop_size["width"] / scale, ip.crop_size["height"] / scale  # the crop in original pixels
            return [((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)]
        return super().tile_boxes(size, n_tiles)

    # ------------------------------------------------------------------ anatomy
    @property
    def image_token_id(self) -> int:
        """``config.image_token_id`` (the ``<image>`` placeholder)."""
        return int(self._require_loaded().config.image_token_id)

    def grid_shape(self) -> tuple[int, int]:
        """(rows, cols) of the vision patch grid."""
        vcfg = self._require_loaded().config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        return side, side

    def visual_token_map(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """(image, 0, row, col) per visual token; the [CLS] token of the ``full`` strategy gets row = col = -1."""
        rows, cols = self.grid_shape()
        ar = torch.arange(rows, device="cpu"), torch.arange(cols, device="cpu")  # host-side geometry
        cell = torch.stack(torch.meshgrid(*ar, indexing="ij"), -1).reshape(-1, 2)
        if self._require_loaded().config.vision_feature_select_strategy == "full":
            cell = torch.cat([torch.full((1, 2), -1, device="cpu"), cell])  # [1 + rows*cols, 2]
        per_image = cell.shape[0]
        maps = []
        for n in self.image_token_mask(inputs).sum(-1).tolist():
            if n % per_image:
                raise ValueError(f"{n} visual tokens is not a multiple of {per_image} per image")
            image = torch.arange(n // per_image, device="cpu").repeat_interleave(per_image)[:, None]  # [n, 1]
            maps.append(torch.cat([image, torch.zeros_like(image), cell.repeat(n // per_image, 1)], 1))  # [n, 4]
        return maps

    def describe(self) -> dict[str, Any]:
        """Adds the visual grid to the generic description."""
        info = super().describe()
        if self.model is not None:
            info["visual_grid"] = list(self.grid_shape())
            info["visual_tokens_per_image"] = int(math.prod(self.grid_shape()))
        return info
