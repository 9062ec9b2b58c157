"""The memory-bandwidth probe's kernel (tinyllm.benchmark.memory_bandwidth): read a buffer
once with every kernel thread, one contiguous slice each, with as little work per byte as
possible (a vectorized integer sum), so the time is the memory system's."""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from tinyllm.kernels import numba_cache  # noqa: F401  (before any @njit(cache=True): see numba_cache.py)


def sum_words(buf):
    """Sum of a uint64 buffer (wrapping), read as one slice per kernel thread."""
    return _sum_words(buf, numba.get_num_threads())


@njit(parallel=True, cache=True)
def _sum_words(buf, threads):
    n = buf.shape[0]
    partial = np.zeros(threads, np.uint64)
    step = (n + threads - 1) // threads
    for t in prange(threads):
        acc = np.uint64(0)
        for i in range(t * step, min(n, (t + 1) * step)):
            acc += buf[i]
        partial[t] = acc
    return partial.sum()
