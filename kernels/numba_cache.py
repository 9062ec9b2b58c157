"""Numba's on-disk kernel cache, invalidated when *any* kernel source file changes.

Numba keys each cached function on its own file only. The kernels inline helpers and
LLVM intrinsics from sibling modules (numba_math.py, numba_simd.py), so an edit there would
leave stale machine code in the cache of every module that uses them. These locators (the
same places Numba would use: NUMBA_CACHE_DIR, kernels/__pycache__, the user-wide cache)
stamp every function in kernels/ with a hash of all kernels/numba_*.py files instead.
Imported by each kernel module before its first @njit(cache=True).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os

from numba.core import caching

KERNELS_DIR = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def _stamp(files_and_mtimes: tuple) -> bytes:
    h = hashlib.sha256()
    for path, _, _ in files_and_mtimes:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.digest()


def kernels_stamp() -> bytes:
    files = sorted(glob.glob(os.path.join(KERNELS_DIR, "numba_*.py")))
    return _stamp(tuple((f, os.stat(f).st_mtime_ns, os.stat(f).st_size) for f in files))


def _covering_all_kernels(base):
    class Locator(base):
        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.dirname(os.path.abspath(py_file)) != KERNELS_DIR:
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            return kernels_stamp()

    Locator.__name__ = f"Kernels{base.__name__}"
    return Locator


# Numba internals (as of 0.68): without them the kernels still cache, per file, as Numba does.
_locators = getattr(getattr(caching, "CacheImpl", None), "_locator_classes", None)
if isinstance(_locators, list) and not any(getattr(c, "__name__", "").startswith("Kernels") for c in _locators):
    _locators[:0] = [_covering_all_kernels(c) for c in (
        caching.UserProvidedCacheLocator, caching.InTreeCacheLocator, caching.UserWideCacheLocator)]
