"""The NumPy reference ops: the truth every fast kernel is tested against.

Every backend (this one, Numba CPU, numba.cuda) exposes these same functions with the
same signatures, as the methods of its Backend object (``NumpyBackend`` here, at the end).
Activations are 2-D float32 arrays ``(T, features)``, one row per token; heads are laid
out contiguously inside a row (``(T, n_heads * head_dim)``).
Weights are ``QTensor``s of shape ``(out_features, in_features)``, as in PyTorch.
The KV cache of one layer is a pair of float32 arrays ``(n_kv_heads, n_ctx, head_dim)``.
"""
from __future__ import annotations

import math

import numpy as np

from tinyllm.errors import ShapeError, TinyLLMError
from tinyllm.kernels.backend import CACHE_TYPES, DEFAULT_CACHE_TYPE, cache_dtype, module_ops, separate_matmuls
from tinyllm.kernels.quant import (
    QK,
    QTensor,
    _round_half_away,
    _unpack_nibbles,
    dequantize,
    n_blocks,
    q4_k_block_scales,
    q6_k_half_scales,
    unpack_q6,
)

name = "numpy"


# -- weights and buffers --------------------------------------------------------------

def prepare(w):
    """Make a loaded tensor (QTensor or 1-D float32 array) ready for this backend."""
    return w


def to_numpy(x) -> np.ndarray:
    return np.asarray(x)


def from_numpy(x: np.ndarray):
    return np.ascontiguousarray(x, dtype=np.float32)


def new_kv_cache(n_layers: int, n_kv_heads: int, n_ctx: int, head_dim: int, cache_type: str = DEFAULT_CACHE_TYPE):
    """Preallocated caches, written by position: a list of (k, v) per layer, each
    (n_kv_heads, n_ctx, head_dim) of the cache type's dtype (kv_write rounds into it)."""
    shape, dtype = (n_kv_heads, n_ctx, head_dim), cache_dtype(cache_type)
    return [(np.zeros(shape, dtype), np.zeros(shape, dtype)) for _ in range(n_layers)]


# -- matrix products ------------------------------------------------------------------

def embedding(table: QTensor, tokens: np.ndarray) -> np.ndarray:
    """(T,) token ids -> (T, D) rows of the embedding table."""
    return table.dequantize_rows(np.asarray(tokens, dtype=np.int64))


def matmul(x: np.ndarray, w: QTensor, bias: np.ndarray | None = None) -> np.ndarray:
    """(T, K) @ W(N, K)^T (+ bias) -> (T, N)."""
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ShapeError(f"matmul: activation {x.shape} does not match weight {tuple(w.shape)}")
    y = x @ dequantize(w).T
    return y + bias if bias is not None else y


def matmuls(x: np.ndarray, ws: list, biases=None) -> list:
    """[(T, K) @ W_i(N_i, K)^T (+ bias_i) -> (T, N_i)]: several weights on one input."""
    return separate_matmuls(matmul, x, ws, biases)


def matmul_int8_activations(x: np.ndarray, w: QTensor) -> np.ndarray:
    """(T, K) @ W(N, K)^T as the fast kernels compute it for q4_0 / q4_1 / q4_k / q6_k / q8_0 weights: the
    exact twin of their arithmetic, not an approximation of the float product. Activation
    blocks of 32 are quantized to int8 with a float32 scale amax / 127 (round half away from
    zero, as ggml's q8_0), block dot products are exact integers, scales apply once per block."""
    T, K = x.shape
    nb = n_blocks(K)
    xb = np.zeros((T, nb * QK), np.float32)
    xb[:, :K] = x
    xb = xb.reshape(T, nb, QK)
    dx = np.abs(xb).max(-1) / np.float32(127)                                          # (T, nb)
    with np.errstate(divide="ignore"):
        inv = np.where(dx == 0, np.float32(0), np.float32(1) / dx).astype(np.float32)
    qx = _round_half_away(xb * inv[..., None]).astype(np.int64)                         # (T, nb, 32)
    if w.format == "q8_0":
        d = np.asarray(w.parts["d"], dtype=np.float64)                                  # (N, nb)
        qw = np.asarray(w.parts["qs"]).transpose(0, 2, 1).astype(np.int64)               # (N, nb, 32)
        dots = np.einsum("nbj,tbj->tnb", qw, qx)
        return np.einsum("tnb,nb,tb->tn", dots, d, dx).astype(np.float32)
    if w.format == "q6_k":  # an exact integer dot per half-block of 16, its step d * sc once per half
        step = q6_k_half_scales(w.parts, np.arange(w.shape[0]), K).astype(np.float64)  # (N, nb, 2)
        k = unpack_q6(np.asarray(w.parts["qs"])).astype(np.int64) - 32                   # (N, nb, 32)
        dots = np.einsum("nbhj,tbhj->tnbh", k.reshape(k.shape[:2] + (2, 16)), qx.reshape(T, nb, 2, 16))
        return np.einsum("tnbh,nbh,tb->tn", dots, step, dx).astype(np.float32)
    scale, offset = q4_block_grids(w)                                                   # x = scale q + offset
    qw = _unpack_nibbles(np.asarray(w.parts["qs"])).astype(np.int64)                    # (N, nb, 32), 0..15
    # x = scale (q - 8) + (offset + 8 scale): the kernels' centered integer dot plus one term per block
    y = np.einsum("tnb,nb,tb->tn", np.einsum("nbj,tbj->tnb", qw - 8, qx), scale, dx)
    return (y + np.einsum("nb,tb->tn", offset + 8 * scale, dx * qx.sum(-1))).astype(np.float32)


def q4_block_grids(w: QTensor) -> tuple[np.ndarray, np.ndarray]:
    """A 4-bit weight's per-block grid, scale and offset (N, nb) float64: x = scale * q + offset."""
    if w.format == "q4_k":
        scale, minimum = q4_k_block_scales(w.parts, np.arange(w.shape[0]), w.shape[1])
        return scale.astype(np.float64), -minimum.astype(np.float64)
    d = np.asarray(w.parts["d"], dtype=np.float64)
    if w.format == "q4_1":
        return d, np.asarray(w.parts["m"], dtype=np.float64)
    return d, -8 * d


# -- elementwise and normalization ---------------------------------------------------

def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich, 2019)."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def layernorm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, eps: float) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * weight + bias (Ba et al., 2016)."""
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * weight
    return y + bias if bias is not None else y


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """SiLU(gate) * up, the LLaMA MLP's gating (Shazeer, 2020)."""
    return silu(gate) * up


def gelu(x: np.ndarray, approximate: bool = False) -> np.ndarray:
    """Exact erf GELU, or the tanh approximation GPT-J uses."""
    if approximate:
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return (0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))).astype(x.dtype)


def clip(x: np.ndarray, limit: float) -> np.ndarray:
    return np.clip(x, -limit, limit)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# -- position -------------------------------------------------------------------------

def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, n_heads: int) -> np.ndarray:
    """Rotary embedding (Su et al., 2021), rotate-half convention, on the first
    ``rotary_dim = 2 * len(inv_freq)`` dims of each head; the rest pass through.

    x: (T, n_heads * head_dim); positions: (T,) absolute positions; inv_freq: (rotary_dim/2,).
    The converter permutes checkpoints with other pairings (GPT-J's adjacent pairs,
    Meta/GGUF LLaMA) into this one.
    """
    T = x.shape[0]
    half = inv_freq.shape[0]
    heads = x.reshape(T, n_heads, -1).copy()
    angles = positions.astype(np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]  # (T, half)
    cos = np.cos(angles).astype(np.float32)[:, None, :]
    sin = np.sin(angles).astype(np.float32)[:, None, :]
    x1 = heads[:, :, :half].copy()
    x2 = heads[:, :, half:2 * half].copy()
    heads[:, :, :half] = x1 * cos - x2 * sin
    heads[:, :, half:2 * half] = x2 * cos + x1 * sin
    return heads.reshape(T, -1)


def concat_rows(parts: list) -> np.ndarray:
    """[(T_i, F)] -> (sum T_i, F): the rows of several sequences, one after another."""
    return np.concatenate(parts, axis=0)


# -- attention ------------------------------------------------------------------------

def kv_write(cache, k: np.ndarray, v: np.ndarray, start_pos: int) -> None:
    """Store (T, n_kv * head_dim) keys/values at positions start_pos .. start_pos+T-1."""
    k_cache, v_cache = cache
    n_kv, _, hd = k_cache.shape
    T = k.shape[0]
    k_cache[:, start_pos:start_pos + T] = k.reshape(T, n_kv, hd).transpose(1, 0, 2)
    v_cache[:, start_pos:start_pos + T] = v.reshape(T, n_kv, hd).transpose(1, 0, 2)


def attention(q: np.ndarray, cache, start_pos: int, n_heads: int, scale: float,
              alibi_slopes: np.ndarray | None = None) -> np.ndarray:
    """Causal scaled dot-product attention of T new queries over the cache.

    q: (T, n_heads * head_dim), query t at absolute position start_pos + t, which sees
    keys 0 .. start_pos + t. Grouped-query: query head h reads kv head h // (n_heads / n_kv).
    ALiBi (Press et al., 2021) adds slope_h * (j - i) to the scores.
    Returns (T, n_heads * head_dim).
    """
    k_cache, v_cache = cache
    n_kv, _, hd = k_cache.shape
    T = q.shape[0]
    S = start_pos + T
    group = n_heads // n_kv
    qh = q.reshape(T, n_kv, group, hd).transpose(1, 2, 0, 3)          # (n_kv, group, T, hd)
    k = k_cache[:, None, :S].astype(np.float32, copy=False)           # (n_kv, 1, S, hd)
    v = v_cache[:, None, :S].astype(np.float32, copy=False)
    scores = (qh @ k.transpose(0, 1, 3, 2)) * scale                   # (n_kv, group, T, S)
    i = start_pos + np.arange(T)[:, None]
    j = np.arange(S)[None, :]
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.reshape(n_kv, group, 1, 1) * (j - i).astype(np.float32)
    scores = np.where(j <= i, scores, -np.inf)
    out = softmax(scores) @ v                                         # (n_kv, group, T, hd)
    return np.ascontiguousarray(out.transpose(2, 0, 1, 3)).reshape(T, n_heads * hd).astype(np.float32)


@module_ops
class NumpyBackend:
    """The reference ops as a Backend object. It has no settings: NumPy's BLAS picks its own
    threads, so a thread count is refused rather than ignored."""

    name = "numpy"
    compiles = False
    cache_types = tuple(CACHE_TYPES)

    def __init__(self, threads: int | None = None):
        if threads is not None:
            raise TinyLLMError("the numpy backend does not take a thread count (its BLAS library chooses)")

    def begin(self, rows: int = 1) -> None:
        pass

    def end(self) -> None:
        pass
