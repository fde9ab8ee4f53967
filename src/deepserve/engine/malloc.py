"""Process settings the engine makes at start: torch's threads, and glibc's heap kept.

A prefill step of 2048 tokens allocates and frees tens of activation tensors of 1-13 MB
each. glibc serves each of those from a fresh ``mmap`` (or trims them back to the OS on
free), so every step faults all their pages in again: about 70,000 page faults a step,
which on a 2-vCPU VM cost 15-25% of the step (BENCHMARKS.md, "Page faults"). Raising
``M_MMAP_THRESHOLD`` to its 32 MiB ceiling and ``M_TRIM_THRESHOLD`` to 512 MiB keeps
that memory in the heap for the next step, as vLLM's advice to preload tcmalloc does.
Peak memory is unchanged (the same tensors live at once); memory freed after a burst
returns to the OS once more than 512 MiB of it sits at the heap's top.

Left alone where the user chose: ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
set, or another allocator preloaded (``LD_PRELOAD``); and on a C library without
``mallopt`` (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os

import torch

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit
TRIM_THRESHOLD = 512 << 20

_done: list[bool] = []


def tune_process(num_threads: int | None) -> bool:
    """Set torch's threads (when given) and keep freed activations in the heap (once a
    process); returns whether the heap settings are in force."""
    if num_threads:
        torch.set_num_threads(num_threads)
    if not _done:
        _done.append(_keep_heap())
    return _done[0]


def _keep_heap() -> bool:
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) \
            or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None:
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and \
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    logger.debug("glibc heap kept for activations: %s", ok)
    return ok


def freeze_heap() -> None:
    """Collect once, then hide every object alive now (torch's and the model's modules,
    the tokenizer, the web framework) from Python's cyclic collector. Its full passes
    walked all of them (170,000-230,000 objects, 35-130 ms each) while holding the engine
    thread; after this they walk only what the requests create. Objects frozen here are
    still freed when their last reference goes; only cycles among them are kept."""
    gc.collect()
    gc.freeze()

