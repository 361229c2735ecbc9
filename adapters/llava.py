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
from transformers import AutoProcessor, LlavaForConditionalGeneration

from adapters.base import ADAPTERS, Adapter

TEMPLATES = {"llava15": "USER: {images}{text} ASSISTANT:"}


@ADAPTERS.register("llava")
class LlavaAdapter(Adapter):
    """Adapter for LLaVA-1.5 (llava-hf format) checkpoints."""

    family: ClassVar[str] = "llava"
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

    def _load(self) -> tuple[nn.Module, Any]:
        kw: dict[str, Any] = {"revision": self.revision} if self.revision else {}
        model = LlavaForConditionalGeneration.from_pretrained(
            self.path,
            dtype=self.torch_dtype,
            attn_implementation=self.attn_implementation,
            use_safetensors=True,
            **kw,
        ).to(self.device)
        processor = AutoProcessor.from_pretrained(self.path, **kw)
        processor.tokenizer.padding_side = "left"
        return model, processor

    # ------------------------------------------------------------------ prompting
    def format_prompt(self, text: str, n_images: int = 1) -> str:
        """Apply the chat template (or the llava-1.5 format) to one user turn with ``n_images`` images."""
        template = self.prompt_template
        has_chat = getattr(self.processor, "chat_template", None) is not None
        if template == "chat" or (template == "auto" and has_chat):
            if not has_chat:
                raise ValueError(f"prompt_template='chat' but {self.path} has no chat template")
            messages = []
            if self.system_prompt:
                messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
            messages.append({"role": "user", "content": content})
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        name = "llava15" if template == "auto" else template
        if name not in TEMPLATES:
            raise ValueError(f"unknown prompt_template {template!r} for llava; use auto, chat or {sorted(TEMPLATES)}")
        prompt = TEMPLATES[name].format(images="<image>\n" * n_images, text=text)
        return f"{self.system_prompt} {prompt}" if self.system_prompt else prompt

    def build_inputs(self, prompts: list[str], images: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
        """Processor call with left padding; every row must carry as many images as its prompt has placeholders."""
        flat = [im for row in images for im in row]
        batch = self.processor(text=prompts, images=flat or None, padding=True, return_tensors="pt")
        out = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in out and self.model is not None:
            out["pixel_values"] = out["pixel_values"].to(self.model.dtype)
        return out

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

    def visual_grid(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """(row, col) of every visual token per sample; the CLS token of the ``full`` strategy gets (-1, -1)."""
        rows, cols = self.grid_shape()
        cell = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
        if self._require_loaded().config.vision_feature_select_strategy == "full":
            cell = torch.cat([torch.full((1, 2), -1), cell])  # [1 + rows*cols, 2]
        per_image = cell.shape[0]
        grids = []
        for n in self.image_token_mask(inputs).sum(-1).tolist():
            if n % per_image:
                raise ValueError(f"{n} visual tokens is not a multiple of {per_image} per image")
            grids.append(cell.repeat(n // per_image, 1))  # [n_visual_tokens, 2]
        return grids

    def position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """1-D positions that skip left padding, as ``generate`` builds them, ``[batch, seq]``."""
        mask = inputs["attention_mask"].long()
        return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)

    def describe(self) -> dict[str, Any]:
        """Adds the visual grid to the generic description."""
        info = super().describe()
        if self.model is not None:
            info["visual_grid"] = list(self.grid_shape())
            info["visual_tokens_per_image"] = int(math.prod(self.grid_shape()))
        return info
