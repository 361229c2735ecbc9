"""Tiny random-init checkpoints built fully offline, saved as ordinary HF checkpoint directories.

No machine of this project reaches the HuggingFace hub, so tests, the benchmark script and the embedded default
use small models built here from configs with a locally trained byte-level BPE tokenizer. The directories
they produce (``model.safetensors``, ``config.json``, tokenizer and processor files, chat template) load
through exactly the same ``from_pretrained`` path as a hub checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

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
class LlavaSize:
    """Sizes of a tiny LLaVA (CLIP-style vision tower + 2-layer MLP projector + Llama)."""

    image_size: int = 64  # square input side in pixels
    patch_size: int = 8  # → (image_size / patch_size)^2 visual tokens
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    max_positions: int = 2048
    feature_layer: int = -2  # vision layer the projector reads (LLaVA-1.5: -2, the penultimate)
    init_range: float = 0.02  # std of the LM / projector init (HF default 0.02)

    @property
    def n_visual_tokens(self) -> int:
        """Visual tokens per image in the LM sequence (CLS dropped)."""
        return (self.image_size // self.patch_size) ** 2


def build_tiny_llava(
    out_dir: str | Path, corpus: Iterable[str], size: LlavaSize = LlavaSize(), *, seed: int = 0, vocab_size: int = 600
) -> Path:
    """Build a random-init ``LlavaForConditionalGeneration`` with its processor and save it to ``out_dir``.

    Args:
        out_dir: Target directory (created).
        corpus: Lines to train the tokenizer on.
        size: Model sizes.
        seed: Seed of the weight initialisation (same seed and versions → identical tensors).
        vocab_size: BPE vocabulary size.

    Returns:
        The checkpoint directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = make_tiny_llava(corpus, size, seed=seed, vocab_size=vocab_size)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "tiny_size.json").write_text(json.dumps(asdict(size) | {"seed": seed}, indent=1))
    return out


def make_tiny_llava(
    corpus: Iterable[str], size: LlavaSize = LlavaSize(), *, seed: int = 0, vocab_size: int = 600
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random-init tiny LLaVA and its processor, in memory (see :func:`build_tiny_llava`)."""
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
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=size.text_hidden,
        intermediate_size=4 * size.text_hidden,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads,
        max_position_embeddings=size.max_positions,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=size.init_range,
    )
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
    model = LlavaForConditionalGeneration(cfg)
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
