"""Image-processor work done ahead, on the engine's prefetch thread, and handed to the processor when it asks.

A batch's inputs are built on the host: the processor's image processor (resize, tiling, patching, normalising)
then the tokenizer. For Qwen2-VL at 672 px this measured 19 ms per image on this project's CPU (the PIL backend),
a third of a second per batch of 16, during which a GPU idles. The engine's prefetch thread
(:mod:`harness.prefetch`) already decodes the next batch's images; with this module it also runs the image
processor on each of them, so the model call of the next batch finds its pixels ready.

How: while a run prefetches, :class:`PreparedImages` stands in for ``processor.image_processor``. Processors call
it with the batch's flat image list (``ProcessorMixin._process_images`` in transformers 5.17-5.25) and read the
token expansion off its output. The stand-in answers a call with the processor's keyword arguments (those of its
first call) from outputs per image (matched by object identity), joining them as the batched call would (tensors
concatenated along the first axis, lists chained). Images nobody prepared (an image a method made, e.g. CARVE's
refined ones) are processed then, each on a host thread (:mod:`core.hostpool`), instead of in one batched call on
the calling thread; :meth:`PreparedImages.prepare` uses the threads too. Any other call (other keyword arguments,
not PIL images) goes to the real image processor.

Safety: a setting changed on the stand-in goes to the real image processor and drops what was prepared; the
joined output is compared with the real batched output the first time it is served; if they differ
(a processor that pads across a batch, say) the stand-in stops serving for the rest of the run and says so once.
An output is held with a weak reference to its image and dropped by the next :meth:`PreparedImages.prepare` once
the image is gone, so outputs live about two batches. (No weak-reference callback: one can run inside the garbage
collector while this thread holds the lock or is mid-way through changing the dict.)
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image

from core.hostpool import host_map

log = logging.getLogger(__name__)


class PreparedImages:
    """Stands in for a processor's image processor; :meth:`prepare` computes outputs per image ahead of use.

    Args:
        real: The image processor it stands in for (every attribute read goes to it).
    """

    _OWN = frozenset({"_real", "_call_kwargs", "served", "disabled", "_verified", "_outputs", "_lock", "_settings"})

    def __init__(self, real: Any) -> None:
        self._real = real
        self._call_kwargs: dict[str, Any] | None = None  # of the processor's first call (prepare waits for it)
        self.served = 0  # calls answered from prepared outputs
        self.disabled: str | None = None  # why serving stopped, if it did
        self._verified = False
        self._outputs: dict[int, tuple[weakref.ref, Any]] = {}  # id(image) -> (ref to it, its output)
        self._lock = threading.Lock()
        self._settings = 0  # counts setting changes: an output computed across one is not kept

    @property
    def wrapped(self) -> Any:
        """The image processor stood in for."""
        return self._real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # a setting changed while the stand-in is installed (``size``, ``crop_to_patches``) is the real one's, and
        # what was prepared under the old setting is dropped
        if name in self._OWN:
            object.__setattr__(self, name, value)
            return
        setattr(self._real, name, value)
        with self._lock:
            self._outputs.clear()
            self._settings += 1

    def __call__(self, images: Any, *args: Any, **kwargs: Any) -> Any:
        """What the real image processor returns for this call: from prepared outputs when possible."""
        if args:
            return self._real(images, *args, **kwargs)
        joined = self._serve(images, kwargs)
        if joined is not None:
            return joined
        if self._call_kwargs is None:
            self._call_kwargs = dict(kwargs)
        return self._real(images, **kwargs)

    def prepare(self, images: list[Image.Image]) -> None:
        """Compute each image's output now (each on a host thread) with the processor's keyword arguments."""
        with self._lock:  # outputs of images gone since (earlier batches) are dropped here
            self._outputs = {k: held for k, held in self._outputs.items() if held[0]() is not None}
        kwargs = self._call_kwargs
        if kwargs is None or self.disabled is not None:
            return  # before the processor's first call its arguments are unknown: that batch builds in line
        self._compute([image for image in images if self._lookup(image) is None], kwargs)

    def _compute(self, images: list[Image.Image], kwargs: dict[str, Any]) -> None:
        """Each image's output, one image per host thread (:func:`core.hostpool.host_map`), kept by image."""

        def one(image: Image.Image) -> None:
            settings = self._settings
            out = self._real([image], **kwargs)
            with self._lock:
                if settings == self._settings:  # else computed (in part) under a setting changed meanwhile
                    self._outputs[id(image)] = (weakref.ref(image), out)

        host_map(one, list({id(im): im for im in images}.values()))  # an image given twice is computed once

    def _lookup(self, image: Any) -> Any | None:
        with self._lock:
            held = self._outputs.get(id(image))
        return held[1] if held is not None and held[0]() is image else None

    def _serve(self, images: Any, kwargs: dict[str, Any]) -> Any | None:
        """The joined prepared outputs for this call, or ``None`` when the real image processor must answer."""
        if self.disabled is not None or self._call_kwargs is None or kwargs != self._call_kwargs:
            return None
        flat = _flat(images)
        if not flat:
            return None
        outs = [self._lookup(im) for im in flat]
        if any(o is None for o in outs):  # images nobody prepared (a method's new images): per image, in parallel
            self._compute([im for im, o in zip(flat, outs, strict=True) if o is None], kwargs)
            outs = [self._lookup(im) for im in flat]
            if any(o is None for o in outs):
                return None
        joined = _join(outs)
        if joined is None:
            return None
        if not self._verified:
            real = self._real(images, **kwargs)
            if not _same(joined, real):
                self.disabled = "the image processor's batched output is not its per-image outputs joined"
                log.warning("image prefetch: %s; images are processed in line for the rest of the run", self.disabled)
                return real
            self._verified = True
        self.served += 1
        return joined


def _flat(images: Any) -> list[Image.Image] | None:
    """The call's images as a flat list (one level of nesting undone), or ``None`` if they are not PIL images."""
    if not isinstance(images, (list, tuple)):
        return None
    flat = [im for item in images for im in (item if isinstance(item, (list, tuple)) else [item])]
    return flat if all(isinstance(im, Image.Image) for im in flat) else None


def _join(outs: list[Any]) -> Any | None:
    """Per-image outputs as one batched output, or ``None`` when they cannot be joined that way."""
    first = outs[0]
    if any(set(o.keys()) != set(first.keys()) for o in outs):
        return None
    data: dict[str, Any] = {}
    for key in first:
        values = [o[key] for o in outs]
        if all(isinstance(v, torch.Tensor) for v in values):
            if len({v.shape[1:] for v in values}) != 1:
                return None  # per-image shapes that a batch would pad: not a plain concatenation
            data[key] = torch.cat(values)
        elif all(isinstance(v, list) for v in values):
            data[key] = [x for v in values for x in v]
        else:
            return None
    return type(first)(data)


def _same(a: Any, b: Any) -> bool:
    if set(a.keys()) != set(b.keys()):
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if not (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y):
            return False
    return True


@contextlib.contextmanager
def preparing(processor: Any) -> Iterator[PreparedImages | None]:
    """Install a :class:`PreparedImages` on ``processor`` for the block; ``None`` if it has no image processor."""
    real = getattr(processor, "image_processor", None)
    if real is None:
        yield None
        return
    stand_in = PreparedImages(real)
    processor.image_processor = stand_in
    try:
        yield stand_in
    finally:
        processor.image_processor = real
