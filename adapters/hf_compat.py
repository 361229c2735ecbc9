"""The one place that knows how transformers' internals differ across the supported release range.

Methods and adapters read transformers internals (a decoder layer's keyword arguments, private helpers) only
through the functions here, so a release that renames something is absorbed in one file instead of in every
method. Each entry names the releases it bridges.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

#: Keyword under which a decoder layer receives the KV cache: ``past_key_values`` up to transformers 5.24,
#: ``cache`` from 5.25 on. Both are looked up, newest first.
_CACHE_KWARGS = ("cache", "past_key_values")


#: this project's attention functions by name, until a model first switches to one and it is handed to transformers.
#: Importing transformers' attention registry (``AttentionInterface``, ``transformers.masking_utils``) loads its
#: modelling code, about 5 s on 2 CPU cores, which a command refused before the model loads never needs.
_PENDING: dict[str, Callable[..., Any]] = {}
_sdpa_forward: Callable[..., Any] | None = None


def attention_function(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the decorated function is the attention function called ``name``.

    It is registered with ``transformers.AttentionInterface``, together with SDPA's mask function under the same
    name (without a same-name mask function transformers hands a custom function no mask at all), by
    :func:`use_attention`, the first time a model switches to it.
    """

    def record(function: Callable[..., Any]) -> Callable[..., Any]:
        _PENDING[name] = function
        return function

    return record


def use_attention(name: str) -> str:
    """``name``, registered with transformers first when it is one of :func:`attention_function`'s not yet handed over.

    Call it just before ``model.set_attn_implementation``; transformers' own names (``"sdpa"``, ``"eager"``) and
    functions already registered pass through untouched.
    """
    function = _PENDING.pop(name, None)
    if function is not None:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionInterface.register(name, function)
        # SDPA's own mask function, causal skip included: with no padded row a layer gets ``None`` and runs the
        # causal kernel the unmodified model runs
        AttentionMaskInterface.register(name, sdpa_mask)
    return name


def sdpa_attention(module: nn.Module, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
    """The SDPA attention function of transformers (``sdpa_attention_forward``), imported at the first call."""
    global _sdpa_forward
    if _sdpa_forward is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        _sdpa_forward = sdpa_attention_forward
    return _sdpa_forward(module, query, key, value, attention_mask, **kwargs)


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


def image_processing(processor: Any) -> dict[str, str | None] | None:
    """Which image processor a processor runs, and on which backend, for the results file.

    transformers 5.x builds the torchvision-backed image processor when torchvision imports and the PIL one
    (``...Pil``) otherwise, so the same checkpoint preprocesses differently on machines with and without
    torchvision (on the shipped checkpoints the pixels differ by at most about one 8-bit grey level). Every 5.x
    release names it in the image processor's ``backend`` attribute (``"torchvision"`` or ``"pil"``).

    Args:
        processor: A loaded processor (or ``None``); an image processor stood in for by
            :class:`adapters.prepared_images.PreparedImages` is read through it.

    Returns:
        ``{"class": ..., "backend": ...}``, or ``None`` when there is no image processor.
    """
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return None
    real = getattr(image_processor, "wrapped", image_processor)
    return {"class": type(real).__name__, "backend": getattr(real, "backend", None)}


def accepts_encoder_outputs(model: nn.Module) -> bool:
    """Whether ``model``'s forward (and ``generate``) take pre-computed image features as ``mm_encoder_outputs``.

    ``mm_encoder_outputs={"image": model.base_model.get_image_features(pixel_values=..., return_dict=True)}``
    replaces ``pixel_values`` from transformers 5.19 on (LLaVA, InternVL, Qwen2-VL); 5.17 and 5.18 have no such
    argument (:func:`encoded_images` bridges them).
    """
    return "mm_encoder_outputs" in inspect.signature(model.forward).parameters


@contextlib.contextmanager
def encoded_images(model: nn.Module, prepared: dict[str, Any], encoded: tuple[Any, Any] | None) -> Iterator[dict]:
    """The inputs of one model call whose images were already encoded, so the vision tower does not run again.

    Args:
        model: The loaded model.
        prepared: The call's keyword arguments (``pixel_values`` among them).
        encoded: ``(pixel_values, model.base_model.get_image_features(pixel_values=..., return_dict=True))``, or
            ``None``. Used only when ``prepared["pixel_values"]`` is that same tensor object.

    Yields:
        The keyword arguments to call the model (or ``generate``) with, inside the block. From transformers 5.19:
        ``mm_encoder_outputs`` in place of ``pixel_values``. 5.17 and 5.18: ``prepared`` unchanged, while the
        base model's ``get_image_features`` (what its forward calls) answers a call on exactly these pixels with
        the kept encoding and runs as usual on any other; the instance is as before when the block ends.
    """
    if encoded is None or prepared.get("pixel_values") is not encoded[0]:
        yield prepared
        return
    pixels, features = encoded
    if accepts_encoder_outputs(model):
        yield {k: v for k, v in prepared.items() if k != "pixel_values"} | {"mm_encoder_outputs": {"image": features}}
        return
    base = model.base_model
    encode, shadowed = base.get_image_features, vars(base).get("get_image_features")  # an enclosing call's stand-in

    @functools.wraps(encode)  # callers that read its signature (``generate`` from 5.19 on) see the method's
    def get_image_features(*args: Any, **kwargs: Any) -> Any:
        given = kwargs["pixel_values"] if "pixel_values" in kwargs else (args[0] if args else None)
        return features if given is pixels else encode(*args, **kwargs)

    base.get_image_features = get_image_features  # shadows the class's method on this instance only
    try:
        yield prepared
    finally:
        if shadowed is None:
            del base.get_image_features
        else:
            base.get_image_features = shadowed
