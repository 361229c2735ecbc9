"""The one place that knows how transformers' internals differ across the supported release range.

Methods and adapters read transformers internals (a decoder layer's keyword arguments, private helpers) only
through the functions here, so a release that renames something is absorbed in one file instead of in every
method. Each entry names the releases it bridges.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

#: Keyword under which a decoder layer receives the KV cache: ``past_key_values`` up to transformers 5.24,
#: ``cache`` from 5.25 on. Both are looked up, newest first.
_CACHE_KWARGS = ("cache", "past_key_values")


def layer_cache(kwargs: dict[str, Any]) -> Any | None:
    """The KV cache handed to a decoder layer's forward (``None`` when the call is uncached).

    Args:
        kwargs: The keyword arguments a forward pre-hook (``with_kwargs=True``) sees on a decoder layer.

    Returns:
        The ``Cache`` object, or ``None``.
    """
    for name in _CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def accepts_encoder_outputs(model: nn.Module) -> bool:
    """Whether ``model``'s forward (and ``generate``) take pre-computed image features as ``mm_encoder_outputs``.

    ``mm_encoder_outputs={"image": model.base_model.get_image_features(pixel_values=..., return_dict=True)}``
    replaces ``pixel_values`` from transformers 5.19 on (LLaVA, InternVL, Qwen2-VL); 5.17 has no such argument,
    and a caller that has already run the vision tower must let the model run it again.
    """
    return "mm_encoder_outputs" in inspect.signature(model.forward).parameters
