"""Per-image host work on a shared pool of threads, for work the device waits for.

A method's or an adapter's per-image host work (RITUAL's transformed views, CARVE's masks, an image processor run on
images nobody prepared ahead) sits between two model calls, so a GPU idles through it. Image libraries (Pillow,
NumPy, OpenCV, SciPy's filters) release the GIL while they work, so on a GPU machine's many cores a batch's images
cost about one image's time when each runs on its own thread (measured on 2 cores: RITUAL's 16 second views in
139 -> 75 ms).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: threads of the pool (at most 8: beyond that a batch's images are too few to gain)
HOST_THREADS = min(8, os.cpu_count() or 1)
PREFIX = "harness-host"
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def host_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]``, run on a shared pool of :data:`HOST_THREADS` host threads, results in order.

    ``fn`` must be a pure function of its item (e.g. each image draws from its own seeded generator), so the
    results are the loop's; the first exception in item order is raised, as the loop would. Fewer than two items,
    one thread, or a call from one of the pool's own threads (which would wait on the pool it occupies) run the
    loop in the calling thread.
    """
    global _pool
    items = list(items)
    if len(items) < 2 or HOST_THREADS < 2 or threading.current_thread().name.startswith(PREFIX):
        return [fn(x) for x in items]
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=HOST_THREADS, thread_name_prefix=PREFIX)
    return list(_pool.map(fn, items))
