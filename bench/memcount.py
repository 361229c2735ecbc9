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
    events = sorted(_allocations(prof.profiler.kineto_results.experimental_event_tree()), key=lambda e: e[0])
    live, sizes = 0, {}  # bytes allocated inside the block and live; their sizes by address
    for _, ptr, nbytes in events:  # stable sort: events of one instant keep their order
        if nbytes > 0:
            sizes[ptr] = nbytes
        elif sizes.pop(ptr, None) is None:
            continue  # a free of memory allocated before the block (another thread's, a garbage collection's)
        live += nbytes
        out.peak = max(out.peak, live)
    out.retained, out.events = live, len(events)


def _allocations(roots: list) -> Iterator[tuple[int, int, int]]:
    """``(time_ns, address, nbytes)`` of every allocator event in the profiler's event tree (frees: ``nbytes < 0``).

    The tree's allocation events carry the address, which the flat event list does not: a free is matched to an
    allocation made inside the block, so freeing older memory (a collected cycle, another thread) never lowers the
    count.
    """
    stack = list(reversed(roots))  # depth first, in the tree's order: same-instant events keep theirs
    while stack:
        node = stack.pop()
        stack.extend(reversed(node.children))
        kind, fields = node.typed
        if kind.name == "Allocation":
            yield node.start_time_ns, fields.ptr, fields.alloc_size
