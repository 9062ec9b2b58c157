"""tinyllm.kernels: the hot path. ``reference`` is the NumPy truth; fast backends
(Numba CPU, numba.cuda) implement the same functions and are tested against it."""
from __future__ import annotations

import importlib

# backend name -> (module, Backend class) implementing the ops of kernels/backend.py
BACKENDS = {"numpy": ("reference", "NumpyBackend"), "numba": ("numba_cpu", "NumbaBackend"),
            "cuda": ("cuda", "CudaBackend")}
DEFAULT_BACKEND = "numba"


def get_backend(name: str | None = None, threads: int | None = None):
    """A Backend object for ``name`` (default: the fastest CPU one), with its own thread count
    (None: the backend's default; refused where the backend has none to set)."""
    from tinyllm.errors import TinyLLMError  # absolute: tools import this folder as "kernels" too

    name = name or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise TinyLLMError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "cuda":  # before numba.cuda is imported: a missing extra or GPU is a clear error
        from tinyllm.device import check_cuda

        check_cuda()
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)(threads=threads)
