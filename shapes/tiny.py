"""Tiny random-init checkpoints built fully offline, saved as ordinary HF checkpoint directories.

No machine of this project reaches the HuggingFace hub, so tests, the benchmark script and the embedded default
use small models built here from configs with a locally trained byte-level BPE tokenizer. The directories
they produce (``model.safetensors``, ``config.json``, tokenizer and processor files, chat template) load
through exactly the same ``from_pretrained`` path as a hub checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

# Our own chat template in the llava-1.5 conversation format: "USER: <image>\n{text} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'][0]['text'] + ' ' }}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% elif m['role'] == 'assistant' %}ASSISTANT: {{ m['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

#: ``build(model_cls, config) -> model``: how a maker instantiates its model class
Builder = Callable[[type, Any], Any]

SPECIALS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}


def train_tokenizer(
    corpus: Iterable[str],
    *,
    vocab_size: int = 600,
    model_specials: dict[str, str] | None = None,
    add_bos: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer offline and wrap it for transformers.

    Args:
        corpus: Training lines.
        vocab_size: Target vocabulary size (BPE stops earlier when the corpus runs out of merges).
        model_specials: Attribute name → special token (e.g. ``{"image_token": "<image>"}``); each becomes
            ``tok.<name>`` and ``tok.<name>_id`` and survives ``save_pretrained``.
        add_bos: Prepend the BOS token to every encoded text (Llama convention).
    """
    model_specials = dict(model_specials or {})
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS.values()) + list(model_specials.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    if add_bos:
        bos = SPECIALS["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIALS["bos"],
        eos_token=SPECIALS["eos"],
        pad_token=SPECIALS["pad"],
        unk_token=SPECIALS["unk"],
        extra_special_tokens=model_specials or None,
    )


@dataclass(frozen=True)
class TinySize:
    """Sizes shared by every tiny family: the vision tower and the language model."""

    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    max_positions: int = 2048
    init_range: float = 0.02  # std of the LM / projector init (HF default 0.02)


@dataclass(frozen=True)
class LlavaSize(TinySize):
    """Sizes of a tiny LLaVA (CLIP-style vision tower + 2-layer MLP projector + Llama)."""

    image_size: int = 64  # square input side in pixels
    patch_size: int = 8  # → (image_size / patch_size)^2 visual tokens
    feature_layer: int = -2  # vision layer the projector reads (LLaVA-1.5: -2, the penultimate)

    @property
    def n_visual_tokens(self) -> int:
        """Visual tokens per image in the LM sequence (CLS dropped)."""
        return (self.image_size // self.patch_size) ** 2


def _text_kwargs(tok: PreTrainedTokenizerFast, size: TinySize, **extra) -> dict:
    """Language-model config fields shared by every tiny family (Llama or Qwen2 decoder)."""
    return dict(
        vocab_size=len(tok),
        hidden_size=size.text_hidden,
        intermediate_size=4 * size.text_hidden,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads,
        max_position_embeddings=size.max_positions,
        initializer_range=size.init_range,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **extra,
    )


def build_tiny_llava(
    out_dir: str | Path, corpus: Iterable[str], size: LlavaSize = LlavaSize(), *, seed: int = 0, vocab_size: int = 600
) -> Path:
    """Build a random-init tiny LLaVA with its processor and save it to ``out_dir`` (see :func:`build_tiny`)."""
    return build_tiny("llava", out_dir, corpus, size, seed=seed, vocab_size=vocab_size)


def _instantiate(model_cls: type, config: Any) -> Any:
    """The default ``build``: the model class on its config, on the CPU in float32."""
    return model_cls(config)


def make_tiny_llava(
    corpus: Iterable[str], size: LlavaSize = LlavaSize(), *, seed: int = 0, vocab_size: int = 600,
    build: Builder = _instantiate,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:  # fmt: skip
    """A random-init tiny LLaVA and its processor, in memory (see :func:`build_tiny_llava`).

    ``build(model_cls, config)`` instantiates the model (default: on the CPU in float32); a benchmark passes one
    that edits the config (real intermediate and vocabulary sizes) and builds on the GPU in bfloat16.
    """
    tok = train_tokenizer(corpus, vocab_size=vocab_size, model_specials={"image_token": "<image>"})
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=4 * size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
        projection_dim=size.vision_hidden,
    )
    text = LlamaConfig(**_text_kwargs(tok, size))
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.image_token_id,
        image_seq_length=size.n_visual_tokens,
        vision_feature_layer=size.feature_layer,
        vision_feature_select_strategy="default",
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = build(LlavaForConditionalGeneration, cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size.image_size}, crop_size={"height": size.image_size, "width": size.image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=size.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


# ============================================================================================ Qwen2-VL / Qwen2.5-VL
# Chat templates in the families' formats (ChatML; Qwen wraps each image in vision_start/end around one pad token,
# InternVL puts one <IMG_CONTEXT> per image, which the processor expands to <img> + tiles × N + </img>).
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INTERNVL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_SPECIALS = {"im_start_token": "<|im_start|>", "im_end_token": "<|im_end|>"}
QWEN_SPECIALS = CHATML_SPECIALS | {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}
INTERNVL_SPECIALS = CHATML_SPECIALS | {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


@dataclass(frozen=True)
class QwenVLSize(TinySize):
    """Sizes of a tiny Qwen2-VL / Qwen2.5-VL (ViT with 2×2 patch merger + Qwen2 LM with M-RoPE)."""

    variant: str = "qwen2_vl"  # qwen2_vl | qwen2_5_vl
    image_pixels: int = 64 * 64  # min_pixels = max_pixels: every image is resized to about this area
    patch_size: int = 8
    merge_size: int = 2  # LM tokens per image = (H/patch/merge) × (W/patch/merge)

    @property
    def mrope_section(self) -> list[int]:
        """(t, h, w) split of the rotary half-dimension; must sum to head_dim / 2 (Qwen2-VL uses 1/4, 3/8, 3/8)."""
        half = self.text_hidden // self.text_heads // 2
        h = w = 3 * half // 8
        return [half - h - w, h, w]


@dataclass(frozen=True)
class InternVLSize(TinySize):
    """Sizes of a tiny InternVL (InternViT-style tower with [CLS], pixel shuffle, MLP projector, Qwen2 LM)."""

    image_size: int = 64  # tile side in pixels
    patch_size: int = 8
    downsample_ratio: float = 0.5  # pixel shuffle: tokens per tile = (image_size/patch * ratio)^2
    max_tiles: int = 4  # dynamic crops (a thumbnail is added when an image gets more than one crop)
    layer_scale: float = 0.1  # InternViT's residual-branch scale at init (InternVL's default 0.1)

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens per tile in the LM sequence."""
        return round((self.image_size // self.patch_size * self.downsample_ratio) ** 2)


def _set_generation_ids(model, tok: PreTrainedTokenizerFast) -> None:
    """Stop at the end of the assistant turn (``<|im_end|>``) or at EOS; pad with the pad token."""
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    model.generation_config.bos_token_id = tok.bos_token_id


def make_tiny_qwen_vl(corpus: Iterable[str], size: QwenVLSize = QwenVLSize(), *, seed: int = 0, vocab_size: int = 600,
                      build: Builder = _instantiate):  # fmt: skip
    """A random-init tiny Qwen2-VL (or Qwen2.5-VL, by ``size.variant``) and its image-only processor."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    from adapters.processors import Qwen2_5_VLImageOnlyProcessor, Qwen2VLImageOnlyProcessor

    if size.variant not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"unknown Qwen-VL variant {size.variant!r}; use qwen2_vl or qwen2_5_vl")
    tok = train_tokenizer(corpus, vocab_size=vocab_size, model_specials=QWEN_SPECIALS, add_bos=False)
    text = _text_kwargs(tok, size, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "mrope_section": size.mrope_section})  # fmt: skip
    common = dict(
        depth=size.vision_layers,
        num_heads=size.vision_heads,
        patch_size=size.patch_size,
        spatial_merge_size=size.merge_size,
        temporal_patch_size=2,
        initializer_range=size.init_range,
    )
    ids = dict(
        image_token_id=tok.image_token_id,
        video_token_id=tok.video_token_id,
        vision_start_token_id=tok.vision_start_token_id,
        vision_end_token_id=tok.vision_end_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    if size.variant == "qwen2_5_vl":
        vision = common | dict(hidden_size=size.vision_hidden, intermediate_size=4 * size.vision_hidden,
                               out_hidden_size=size.text_hidden, window_size=2 * size.patch_size * size.merge_size,
                               fullatt_block_indexes=[size.vision_layers - 1])  # fmt: skip
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        model = build(Qwen2_5_VLForConditionalGeneration, cfg)
        proc_cls = Qwen2_5_VLImageOnlyProcessor
    else:
        vision = common | dict(embed_dim=size.vision_hidden, hidden_size=size.text_hidden, mlp_ratio=4)
        model = build(Qwen2VLForConditionalGeneration, Qwen2VLConfig(text_config=text, vision_config=vision, **ids))
        proc_cls = Qwen2VLImageOnlyProcessor
    _set_generation_ids(model, tok)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=size.image_pixels,
        max_pixels=size.image_pixels,
        patch_size=size.patch_size,
        merge_size=size.merge_size,
        temporal_patch_size=2,
    )
    return model, proc_cls(image_processor=image_processor, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)


def make_tiny_internvl(
    corpus: Iterable[str], size: InternVLSize = InternVLSize(), *, seed: int = 0, vocab_size: int = 600,
    build: Builder = _instantiate,
):  # fmt: skip
    """A random-init tiny ``InternVLForConditionalGeneration`` and its image-only processor (tiling on)."""
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

    from adapters.processors import InternVLImageOnlyProcessor

    tok = train_tokenizer(corpus, vocab_size=vocab_size, model_specials=INTERNVL_SPECIALS, add_bos=False)
    vision = dict(
        hidden_size=size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        intermediate_size=4 * size.vision_hidden,
        image_size=[size.image_size, size.image_size],
        patch_size=[size.patch_size, size.patch_size],
        initializer_range=size.init_range,
        layer_scale_init_value=size.layer_scale,
    )
    cfg = InternVLConfig(
        vision_config=vision,
        text_config=_text_kwargs(tok, size, model_type="qwen2"),
        image_token_id=tok.context_image_token_id,
        image_seq_length=size.tokens_per_tile,
        downsample_ratio=size.downsample_ratio,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = build(InternVLForConditionalGeneration, cfg)
    _set_generation_ids(model, tok)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": size.image_size, "width": size.image_size},
        crop_to_patches=size.max_tiles > 1,
        min_patches=1,
        max_patches=size.max_tiles,
    )
    processor = InternVLImageOnlyProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_length=size.tokens_per_tile,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    return model, processor


#: family → (size class, in-memory builder)
TINY = {
    "llava": (LlavaSize, make_tiny_llava),
    "qwen_vl": (QwenVLSize, make_tiny_qwen_vl),
    "internvl": (InternVLSize, make_tiny_internvl),
}


def build_tiny(family: str, out_dir: str | Path, corpus: Iterable[str], size=None, *, seed: int = 0,
               vocab_size: int = 600) -> Path:  # fmt: skip
    """Build a random-init tiny model of ``family`` (``llava``, ``qwen_vl``, ``internvl``) and save it.

    Returns:
        The checkpoint directory (safetensors + config + processor + tokenizer + chat template).
    """
    if family not in TINY:
        raise ValueError(f"unknown tiny family {family!r}; known: {sorted(TINY)}")
    size_cls, make = TINY[family]
    size = size or size_cls()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = make(corpus, size, seed=seed, vocab_size=vocab_size)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "tiny_size.json").write_text(json.dumps(asdict(size) | {"family": family, "seed": seed}, indent=1))
    return out
