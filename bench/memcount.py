"""A CPU-countable proxy for GPU peak memory: the allocator's peak of live bytes during a block.

On CUDA, ``torch.cuda.max_memory_allocated`` says how much a call held at its peak. The CPU has no such counter,
and the resident set size is a poor stand-in: freed blocks stay mapped by the C allocator, fresh ones are mapped
lazily, and sampling it misses short peaks. torch's profiler, with ``profile_memory=True``, records every
allocation and free of torch's CPU allocator (the kernels' scratch buffers included) with its size; replaying them
in order gives the peak of the bytes allocated inside the block and still live, exactly. It is deterministic: the
same code on the same shapes allocates the same sizes in the same order, so tests can assert on it.

    with allocation_peak() as alloc:
        adapter.forward(inputs, logits_to_keep=1)
    alloc.peak, alloc.retained

What it does not see, compared with ``max_memory_allocated``: memory freed inside the block that was allocated
before it (it never lowers the count; torch warns once that such a free is not reported), and the rounding of the
CUDA caching allocator. Kernels differ by device: CPU attention (SDPA) works in blocks, as FlashAttention does on
a GPU, so neither materialises the ``[q, k]`` probabilities; an eager attention layer does on both.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from torch.profiler import ProfilerActivity, profile

# Kineto (the profiler's backend, torch 2.13) logs two lines to stderr at every profiler start and stop, which
# buried the benches' tables; read when the profiler first starts, so setting it here silences them (a value the
# user set is kept)
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

#: the profiler's name for an allocator event (``nbytes`` > 0: allocation, < 0: free)
MEMORY_EVENT = "[memory]"


@dataclass
class Allocations:
    """What :func:`allocation_peak` measured, in bytes (filled in when the block ends)."""

    peak: int = 0  # the most bytes allocated inside the block and live at once
    retained: int = 0  # allocated inside the block and still live at its end (kept by a cache, a method's state)
    events: int = 0  # allocations and frees seen


@contextlib.contextmanager
def allocation_peak() -> Iterator[Allocations]:
    """Measure the peak of live bytes allocated by torch's CPU allocator inside the block.

    Yields:
        An :class:`Allocations`, filled in on exit. Only CPU tensors count (a CUDA block has
        ``torch.cuda.max_memory_allocated``). Profilers do not nest: not for use inside another profiler.
    """
    out = Allocations()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == MEMORY_EVENT]
    live = 0
    for event in sorted(events, key=lambda e: e.start_ns()):  # stable: events of one instant keep their order
        live += event.nbytes()
        out.peak = max(out.peak, live)
    out.retained, out.events = live, len(events)
