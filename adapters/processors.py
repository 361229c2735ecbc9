"""Processor loading, with image-only fallbacks for processors that cannot be built without torchvision.

transformers 5.x declares a ``video_processor`` on ``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor`` and
``InternVLProcessor``. Its base class exists only when torchvision imports, so on a machine without a working
torchvision (this project's CPU machines: the only wheel is a CUDA build) the stock processors cannot even be
constructed (``AttributeError: ... VIDEO_PROCESSOR_MAPPING has no attribute '_extra_content'``), and
``AutoProcessor.from_pretrained`` on such a checkpoint silently returns the bare tokenizer.

The classes below subclass the stock processors and only drop ``video_processor`` from ``__init__``'s signature
(``ProcessorMixin`` derives its sub-processor attributes from that signature). ``__call__``, token expansion and
the image processor are the stock ones, so image inputs and placeholder expansion are identical; videos are not
supported. :func:`load_processor` tries the stock processor first and falls back automatically, logging a line.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from transformers import InternVLProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

log = logging.getLogger(__name__)


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without the video processor (images and text only)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class Qwen2_5_VLImageOnlyProcessor(Qwen2VLImageOnlyProcessor, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor (images and text only)."""


class InternVLImageOnlyProcessor(InternVLProcessor):
    """``InternVLProcessor`` without the video processor (images and text only)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kw):
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kw)
        self.image_seq_length = image_seq_length
        self.start_image_token = tokenizer.start_image_token
        self.end_image_token = tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token = tokenizer.context_image_token
        self.video_token = getattr(tokenizer, "video_token", None) or "<video>"
        self.image_token_id = tokenizer.context_image_token_id
        self.multimodal_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
        )


#: stock processor class name → its image-only stand-in
IMAGE_ONLY = {
    "Qwen2VLProcessor": Qwen2VLImageOnlyProcessor,
    "Qwen2_5_VLProcessor": Qwen2_5_VLImageOnlyProcessor,
    "InternVLProcessor": InternVLImageOnlyProcessor,
}


def load_processor(path: str, stock: type[ProcessorMixin], **kwargs: Any) -> ProcessorMixin:
    """``stock.from_pretrained(path)``, or its image-only stand-in when the stock class cannot be built.

    Args:
        path: Checkpoint directory or hub id.
        stock: The family's processor class (e.g. ``Qwen2VLProcessor``).
        **kwargs: Passed to ``from_pretrained`` (``revision`` ...).

    Returns:
        A processor whose ``__call__`` is the stock one.
    """
    try:
        processor = stock.from_pretrained(path, **kwargs)
    except (AttributeError, ImportError, OSError, TypeError, ValueError) as err:
        fallback = IMAGE_ONLY.get(stock.__name__)
        if fallback is None:
            raise
        log.warning(
            "%s could not be built (%s: %s); it needs a video processor (torchvision and a video config); "
            "using %s (same image inputs and token expansion, images only)",
            stock.__name__,
            type(err).__name__,
            str(err).splitlines()[0][:120],
            fallback.__name__,
        )
        processor = fallback.from_pretrained(path, **kwargs)
    if not hasattr(processor, "image_processor"):
        raise TypeError(f"{path}: expected a multimodal processor, got {type(processor).__name__}")
    return processor
