"""The next batches' images decoded on a background thread while the model answers the current batch.

Reading and decoding a sample's images (JPEG/PNG files, a video's frames for VCRBench) is host work that does not
depend on the model. Done in line, it leaves the accelerator idle for each batch's decode: about 2 ms per COCO-size
JPEG on one core, 32 ms per batch of 16, and whole seconds for a batch of videos. :func:`prefetched` runs the
loaders of the next ``depth`` batches on one worker thread instead, as a ``torch.utils.data.DataLoader`` with
``prefetch_factor`` would, without its worker processes (the loaders are plain functions of files, and the
decoders release the GIL while they work). With the HF backend the worker also runs the model's image processor on
those images (``prepare``; :mod:`adapters.prepared_images`), the larger share of a batch's host work.

Nothing about the outputs changes: each batch's media are the same objects the in-line loader would give, handed over
in batch order; a bad image is the same per-sample reason; with ``strict`` the first bad input still stops the
run when its batch comes up, after every earlier batch's records were written. The config's ``prefetch`` sets the
depth (``auto``: 1 on an accelerator, 0 on the CPU, see :meth:`harness.engine.RunSettings.prefetch_depth`).
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from tasks.base import Sample, SampleError

log = logging.getLogger(__name__)

#: per sample of a batch: ``(images, None)``, or ``(None, why the sample is unusable)``
Media = list[tuple[list[Any] | None, str | None]]
#: work on a batch's decoded images ahead of the model call (e.g. the image processor), on the worker thread
Prepare = Callable[[list[Any]], None]


def load_images(sample: Sample, strict: bool) -> tuple[list[Any] | None, str | None]:
    """Images of a sample, or the reason it is unusable (raises :class:`SampleError` in strict mode)."""
    if sample.error:
        if strict:
            raise SampleError(sample.error, sample.source)
        return None, sample.error
    try:
        return (sample.images() if sample.images else []), None
    except SampleError as exc:
        if strict:
            raise
        return None, exc.reason


def load_media(batch: list[Sample], strict: bool) -> Media:
    """Every sample's images of one batch, in order (strict: raises at the first unusable sample)."""
    return [load_images(sample, strict) for sample in batch]


def _load_and_prepare(batch: list[Sample], strict: bool, prepare: Prepare | None) -> Media:
    """:func:`load_media`, then ``prepare`` on the batch's images (a failure there is left to the in-line path)."""
    media = load_media(batch, strict)
    if prepare is not None:
        try:
            prepare([im for images, _ in media if images for im in images])
        except Exception as exc:  # an optimisation only: the model call processes these images itself, as usual
            log.debug("prefetch: preparing a batch's images failed (%s); they are processed in line", exc)
    return media


@contextlib.contextmanager
def prefetched(
    batches: Iterable[list[Sample]], strict: bool, depth: int = 1, prepare: Prepare | None = None
) -> Iterator[Iterator[Media]]:
    """The batches' media in order, the next ``depth`` batches decoding on a worker thread meanwhile.

    Args:
        batches: The batches to load, in the order they will be consumed.
        strict: Raise at the first unusable sample (when its batch is consumed), instead of giving its reason.
        depth: Batches loaded ahead of the one being consumed; 0 loads each batch in line when it is asked for.
        prepare: Also run on each batch's decoded images on the worker (with ``depth`` > 0), e.g. the model's
            image processor (:meth:`harness.calls.AdapterCalls.prefetching`).

    Yields:
        An iterator of :data:`Media`, one per batch. On exit the worker finishes the batch it is decoding (if
        any); batches not started are dropped.
    """
    if depth < 0:
        raise ValueError(f"prefetch depth must be >= 0, got {depth}")
    if depth == 0:
        yield (load_media(batch, strict) for batch in batches)
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="harness-media")
    try:
        yield _ahead(pool, iter(batches), strict, depth, prepare)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ahead(
    pool: ThreadPoolExecutor, batches: Iterator[list[Sample]], strict: bool, depth: int, prepare: Prepare | None
) -> Iterator[Media]:
    """Media in batch order, keeping ``depth`` batches queued on ``pool`` behind the one handed out."""
    queued: deque[Future[Media]] = deque()

    def submit() -> None:
        batch = next(batches, None)
        if batch is not None:
            queued.append(pool.submit(_load_and_prepare, batch, strict, prepare))

    for _ in range(depth + 1):
        submit()
    while queued:
        media = queued.popleft().result()  # a loader's exception (strict mode) is raised here, in batch order
        submit()
        yield media
