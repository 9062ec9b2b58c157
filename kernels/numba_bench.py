"""The memory-bandwidth probe's kernel (tinyllm.benchmark.memory_bandwidth): read a buffer
once with every kernel thread, one contiguous slice each, with as little work per byte as
possible (a vectorized integer sum, lines prefetched ahead as the weight kernels do), so the
time is the memory system's."""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from tinyllm.kernels import numba_cache  # noqa: F401  (before any @njit(cache=True): see numba_cache.py)
from tinyllm.kernels.numba_attention_simd import prefetch_ahead


def sum_words(buf):
    """Sum of a uint64 buffer (wrapping), read as one slice per kernel thread."""
    return _sum_words(buf, numba.get_num_threads())


LINE_WORDS = 8  # uint64 per 64-byte cache line


@njit(parallel=True, cache=True)
def _sum_words(buf, threads):
    # Read as the weight kernels read: whole lines into 8 independent sums (vector adds), each
    # line prefetched ahead at the kernels' distances. A scalar running sum measured the loop,
    # not the memory, on a Zen 5 VM: 13 GB/s, where this reads 53 and decode streams 37-46.
    n = buf.shape[0]
    partial = np.zeros(threads, np.uint64)
    lines = n // LINE_WORDS
    step = (lines + threads - 1) // threads
    for t in prange(threads):
        acc = np.zeros(LINE_WORDS, np.uint64)
        for line in range(t * step, min(lines, (t + 1) * step)):
            base = line * LINE_WORDS
            prefetch_ahead(buf, base, LINE_WORDS)
            for e in range(LINE_WORDS):
                acc[e] += buf[base + e]
        partial[t] = acc.sum()
    tail = np.uint64(0)
    for i in range(lines * LINE_WORDS, n):
        tail += buf[i]
    return partial.sum() + tail
