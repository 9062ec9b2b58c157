"""The contract between the architectures and the kernels: the ops a forward pass calls.

Every backend (``reference`` = numpy, ``numba_cpu`` = numba, ``cuda``) is an object made by
``tinyllm.kernels.get_backend(name, threads=...)`` that provides exactly these, with these
signatures; its settings (threads, SIMD width, device) are its own attributes, never
process state set at import, and ``tests/test_backend_conformance.py`` checks each one against the
NumPy reference. Conventions: activations are 2-D float32 ``(T, features)`` in the backend's
own array type (``from_numpy`` / ``to_numpy`` cross the boundary), heads contiguous in a row;
weights are what ``prepare`` returns for a loaded ``QTensor`` (matrices, ``(out, in)``) or a
1-D float32 array (norms, biases); a layer's KV cache is whatever ``new_kv_cache`` gives per
layer, written by ``kv_write`` at a position and read by ``attention``. Shapes and positions
are trusted: the loader (tinyllm/validate.py) and Model._forward check them beforehand.
"""
from __future__ import annotations

import sys
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tinyllm.errors import ShapeError, TinyLLMError

# How keys and values are stored (llama.cpp's --cache-type names): f16 halves the cache's
# memory and the bytes a long-context decode step reads; attention always computes in float32.
# f16 is the default, as in llama.cpp (its cost, measured: BENCHMARKS.md, long context); a
# backend that stores only some types lists them in its `cache_types`, its default first.
CACHE_TYPES = {"f16": np.float16, "f32": np.float32}
DEFAULT_CACHE_TYPE = "f16"


def cache_dtype(cache_type: str):
    """The NumPy dtype of a cache type name; an unknown name is refused."""
    if cache_type not in CACHE_TYPES:
        raise TinyLLMError(f"unknown KV cache type {cache_type!r}; choose one of {', '.join(CACHE_TYPES)}")
    return CACHE_TYPES[cache_type]


@runtime_checkable
class Backend(Protocol):
    name: str
    compiles: bool                                                        # kernels compile on first use
    cache_types: tuple[str, ...]                                          # KV cache types it stores, default first

    def begin(self, rows: int = 1) -> None: ...                           # before a forward of `rows` rows
    def end(self) -> None: ...                                            # after it, also when it failed

    # weights, buffers, and the host boundary
    def prepare(self, w) -> Any: ...                                      # QTensor / 1-D array -> backend weight
    def from_numpy(self, x: np.ndarray) -> Any: ...                       # (T, F) host -> backend
    def to_numpy(self, x) -> np.ndarray: ...                              # backend -> (T, F) host
    def new_kv_cache(self, n_layers: int, n_kv_heads: int, n_ctx: int, head_dim: int,
                     cache_type: str = DEFAULT_CACHE_TYPE) -> list: ...  # cache_type: a CACHE_TYPES name

    # products
    def embedding(self, table, tokens: np.ndarray) -> Any: ...            # (T,) ids -> (T, D)
    def matmul(self, x, w, bias=None) -> Any: ...                         # (T, K) @ W(N, K)^T (+ bias) -> (T, N)
    def matmuls(self, x, ws: list, biases=None) -> list: ...              # [matmul(x, W_i, bias_i)]: weights on one
                                                                          # input (q, k, v), each as matmul gives it

    # elementwise and normalization
    def add(self, a, b) -> Any: ...
    def rmsnorm(self, x, weight, eps: float) -> Any: ...
    def layernorm(self, x, weight, bias, eps: float) -> Any: ...          # bias None: no bias
    def gelu(self, x, approximate: bool = False) -> Any: ...              # approximate: the tanh form
    def swiglu(self, gate, up) -> Any: ...                                # SiLU(gate) * up
    def clip(self, x, limit: float) -> Any: ...                           # to [-limit, limit]

    # positions and attention
    def rope(self, x, positions: np.ndarray, inv_freq: np.ndarray, n_heads: int) -> Any: ...
    def concat_rows(self, parts: list) -> Any: ...                      # [(T_i, F)] -> (sum T_i, F)
    def kv_write(self, cache, k, v, start_pos: int) -> None: ...          # (T, Hkv*hd) at start_pos..
    def attention(self, q, cache, start_pos: int, n_heads: int, scale: float, alibi_slopes=None) -> Any: ...


BACKEND_OPS = tuple(name for name in Backend.__dict__ if not name.startswith("_") and callable(Backend.__dict__[name]))
OP_NAMES = tuple(name for name in BACKEND_OPS if name not in ("begin", "end"))  # the compute ops, without the hooks


def separate_matmuls(matmul, x, ws: list, biases=None) -> list:
    """matmuls as one matmul per weight: for a backend with nothing to share between them."""
    return [matmul(x, w, b) for w, b in zip(ws, checked_biases(ws, biases))]


def checked_biases(ws: list, biases) -> list:
    """matmuls' biases: None (no bias on any weight) or one entry (None or an array) per weight."""
    if biases is None:
        return [None] * len(ws)
    if len(biases) != len(ws):
        raise ShapeError(f"matmuls: {len(biases)} biases for {len(ws)} weights")
    return list(biases)


def module_ops(cls):
    """Class decorator for a backend class: every op the class does not define itself is the
    function of that name in the class's own module (so a module's functions, which the
    kernel tests call directly, and its Backend object cannot drift apart)."""
    module = sys.modules[cls.__module__]
    for name in OP_NAMES:
        if name not in cls.__dict__:
            setattr(cls, name, staticmethod(getattr(module, name)))
    return cls
