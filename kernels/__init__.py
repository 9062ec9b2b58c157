"""tinyllm.kernels: the hot path. ``reference`` is the NumPy truth; fast backends
(Numba CPU, numba.cuda) implement the same functions and are tested against it."""
from __future__ import annotations

import importlib

# backend name -> module implementing the reference op signatures
BACKENDS = {"numpy": "reference", "numba": "numba_cpu", "cuda": "cuda"}
DEFAULT_BACKEND = "numba"


def get_backend(name: str | None = None):
    """Return the module implementing the ops for ``name`` (default: the fastest available)."""
    name = name or DEFAULT_BACKEND
    if name not in BACKENDS:
        from tinyllm.errors import TinyLLMError  # absolute: tools import this folder as "kernels" too

        raise TinyLLMError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return importlib.import_module(f"{__name__}.{BACKENDS[name]}")
