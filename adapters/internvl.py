r"""InternVL adapter (HF-native ``InternVLForConditionalGeneration``: the "-hf" checkpoints).

Hub ids such as ``OpenGVLab/InternVL3-8B-hf`` or a local directory; loads with ``from_pretrained`` (safetensors,
no ``trust_remote_code``).

* **Tiling.** Each image is cut into dynamic crops (the grid of ``min_tiles..max_tiles`` tiles whose aspect
  ratio is closest to the image's), each resized to the tower's input size, plus a thumbnail of the whole
  image appended LAST when there is more than one crop. Tiles are numbered in that order (crops row-major, then
  the thumbnail).
* **Visual tokens.** Per tile, the ViT's patch grid (its [CLS] token dropped) is pixel-shuffled 2×2 into
  ``(side/2)²`` tokens, row-major, then projected. The LM sees ``<img>`` + tiles × ``image_seq_length`` ×
  ``<IMG_CONTEXT>`` + ``</img>`` per image; :meth:`tile_spans` splits that run per tile.
* **Prompt.** The processor's chat template, else ChatML with ``<IMG_CONTEXT>\n`` per image.
* **Positions.** 1-D RoPE, as in LLaVA.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from adapters.base import ADAPTERS, Adapter
from adapters.generation import CHATML, CHATML_SYSTEM
from adapters.geometry import Box


@ADAPTERS.register("internvl")
class InternVLAdapter(Adapter):
    """Adapter for HF-native InternVL checkpoints.

    Args:
        max_tiles: Upper bound on dynamic crops per image (None: the checkpoint's processor setting; 1 disables
            tiling, so every image is one tile).
        min_tiles: Lower bound on dynamic crops per image (None: the checkpoint's setting).
        **kwargs: See :class:`adapters.base.Adapter`.
    """

    family: ClassVar[str] = "internvl"
    model_types: ClassVar[tuple[str, ...]] = ("internvl",)  # the -hf conversions (not InternVLChatModel's)
    paths: ClassVar[dict[str, str]] = {
        "lm.embed": "model.language_model.embed_tokens",
        "lm.layers": "model.language_model.layers",
        "lm.norm": "model.language_model.norm",
        "vision": "model.vision_tower",
        "vision.layers": "model.vision_tower.encoder.layer",
        "projector": "model.multi_modal_projector",
    }
    layer_parts: ClassVar[dict[str, dict[str, str]]] = {
        "lm": {"attn": "self_attn", "mlp": "mlp"},
        "vision": {"attn": "attention", "mlp": "mlp"},
    }
    vision_has_cls: ClassVar[bool] = True
    templates: ClassVar[dict[str, str]] = {"chatml": CHATML}
    image_placeholder: ClassVar[str] = "<IMG_CONTEXT>\n"
    system_format: ClassVar[str] = CHATML_SYSTEM

    def __init__(self, *, max_tiles: int | None = None, min_tiles: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if (max_tiles is not None and max_tiles < 1) or (min_tiles is not None and min_tiles < 1):
            raise ValueError(f"min_tiles / max_tiles must be >= 1, got {min_tiles} / {max_tiles}")
        self.max_tiles = max_tiles
        self.min_tiles = min_tiles

    def _load_processor(self) -> Any:
        """The processor with the tiling bounds applied (``crop_to_patches`` iff more than one tile is allowed)."""
        from transformers import InternVLProcessor  # imported here: see adapters.base.Adapter._model_class

        from adapters.processors import load_processor

        processor = load_processor(self.path, InternVLProcessor, **self.hub_kwargs)
        ip = processor.image_processor
        if self.max_tiles is not None:
            ip.max_patches = self.max_tiles
        if self.min_tiles is not None:
            ip.min_patches = self.min_tiles
        if ip.min_patches > ip.max_patches:
            raise ValueError(f"min_tiles {ip.min_patches} > max_tiles {ip.max_patches}")
        ip.crop_to_patches = ip.max_patches > 1
        processor.tokenizer.padding_side = "left"
        return processor

    def _model_class(self) -> type[nn.Module]:
        from transformers import InternVLForConditionalGeneration

        return InternVLForConditionalGeneration

    def image_kwargs(self) -> dict[str, Any]:
        """The tiling settings, passed explicitly (the processor's call defaults would override the loaded ones)."""
        ip = self.processor.image_processor
        return {"crop_to_patches": ip.crop_to_patches, "min_patches": ip.min_patches, "max_patches": ip.max_patches}

    # ------------------------------------------------------------------ vision
    def image_inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """``pixel_values [n_tiles_total, 3, S, S]`` and ``num_patches`` (tiles per image)."""
        out = self.processor.image_processor(images, return_tensors="pt", **self.image_kwargs())
        return {"pixel_values": out["pixel_values"].to(self.device, self._require_loaded().dtype),
                "num_patches": torch.as_tensor(out["num_patches"])}  # fmt: skip

    def pixel_rows(self, inputs: dict[str, Any]) -> list[int]:
        """One ``pixel_values`` row per tile: each image's run of visual tokens over ``tokens_per_tile``."""
        return [(end - start) // self.tokens_per_tile for spans in self.image_spans(inputs) for start, end in spans]

    def vision_features(self, image_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pixel-shuffled tower features the projector reads, ``[n_tiles_total, tokens_per_tile, 4·d_vision]``."""
        model = self._require_loaded()
        cfg = model.config
        out = model.model.vision_tower(pixel_values=image_inputs["pixel_values"], output_hidden_states=True)
        feats = out.last_hidden_state if cfg.vision_feature_layer == -1 else out.hidden_states[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]  # drop [CLS]: [n_tiles, P, d]
        side = math.isqrt(feats.shape[1])
        feats = feats.reshape(feats.shape[0], side, side, -1)
        feats = model.model.pixel_shuffle(feats, scale_factor=cfg.downsample_ratio)  # [n_tiles, s/2, s/2, 4d]
        return feats.reshape(feats.shape[0], -1, feats.shape[-1])

    def vision_cls_attention(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """[CLS]→patch attention of the feature layer (head mean), summed over each 2×2 pixel-shuffle group.

        The score map is pixel-shuffled exactly like the features, so each LM token gets the attention mass of the
        patches it merges; tiles in the order the LM sees them.
        """
        model = self._require_loaded()
        cfg = model.config
        probs = self._vision_cls_probs({"pixel_values": inputs["pixel_values"]}, cfg.vision_feature_layer)
        cls = probs[:, :, 1:].mean(1)  # [n_tiles, P]
        side = math.isqrt(cls.shape[1])
        shuffled = model.model.pixel_shuffle(cls.reshape(-1, side, side, 1), scale_factor=cfg.downsample_ratio)
        pooled = shuffled.sum(-1).reshape(cls.shape[0], -1)  # [n_tiles, tokens_per_tile]
        return self._per_row(inputs, pooled, self.tokens_per_tile)

    def tile_boxes(self, size: tuple[int, int], n_tiles: int) -> list[Box]:
        """Crops row-major over the processor's tile canvas, then the whole-image thumbnail (when > 1 crop).

        The canvas (columns × rows of tiles) is the processor's own choice (``get_optimal_tiled_canvas``: closest
        aspect ratio within ``min_tiles..max_tiles``); without tiling the single tile is the whole image resized.
        """
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        ip = self.processor.image_processor
        h, w = size
        if not ip.crop_to_patches:
            return super().tile_boxes(size, n_tiles)
        tile = (ip.size["height"], ip.size["width"])
        cols, rows = get_optimal_tiled_canvas((h, w), tile, ip.min_patches, ip.max_patches)
        crops = [(c * w / cols, r * h / rows, (c + 1) * w / cols, (r + 1) * h / rows)
                 for r in range(rows) for c in range(cols)]  # fmt: skip
        boxes = crops + ([(0.0, 0.0, float(w), float(h))] if len(crops) > 1 else [])
        if len(boxes) != n_tiles:
            raise ValueError(f"image {w}x{h}: the processor's canvas has {len(boxes)} tiles, the prompt {n_tiles}")
        return boxes

    # ------------------------------------------------------------------ anatomy
    @property
    def image_token_id(self) -> int:
        """``config.image_token_id`` (``<IMG_CONTEXT>``; the ``<img>``/``</img>`` delimiters are not visual tokens)."""
        return int(self._require_loaded().config.image_token_id)

    @property
    def tokens_per_tile(self) -> int:
        """``config.image_seq_length``: visual tokens per tile."""
        return int(self._require_loaded().config.image_seq_length)

    def visual_token_map(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """(image, tile, row, col) per visual token; (row, col) on the tile's pixel-shuffled grid."""
        per_tile = self.tokens_per_tile
        side = math.isqrt(per_tile)
        ar = torch.arange(side, device="cpu")  # host-side geometry
        cell = torch.stack(torch.meshgrid(ar, ar, indexing="ij"), -1).reshape(-1, 2)
        maps = []
        for spans in self.image_spans(inputs):
            parts = []
            for image, (start, end) in enumerate(spans):
                n_tiles, rest = divmod(end - start, per_tile)
                if rest:
                    raise ValueError(f"image span of {end - start} tokens is not a multiple of {per_tile} per tile")
                tile = torch.arange(n_tiles, device="cpu").repeat_interleave(per_tile)[:, None]
                parts.append(torch.cat([torch.full_like(tile, image), tile, cell.repeat(n_tiles, 1)], 1))
            maps.append(torch.cat(parts) if parts else torch.zeros(0, 4, dtype=torch.long, device="cpu"))
        return maps

    def describe(self) -> dict[str, Any]:
        """Adds the tiling settings to the generic description."""
        info = super().describe()
        if self.processor is not None:
            ip = self.processor.image_processor
            # the processor's own image_seq_length when the weights are not loaded (model.backend=vllm)
            per_tile = self.tokens_per_tile if self.model is not None else self.processor.image_seq_length
            info |= {"min_tiles": ip.min_patches, "max_tiles": ip.max_patches, "tokens_per_tile": per_tile}
        return info
