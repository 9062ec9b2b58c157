"""Normalization, activations, RoPE and attention for the Numba backend.

Each function mirrors its twin in reference.py (same arguments, same result up to float32
rounding; the activations use numba_math's vectorizable exp/erf). Rows of the (T, D)
activations are split across threads only where there is enough work to pay for it.

Trust: these kernels index without bounds checks (that is what makes them fast). They rely on
their callers for every shape and index: weights whose parts match their format's layout and
the architecture's declared shapes (checked when a model is loaded, tinyllm/validate.py),
token ids inside the embedding table and positions inside the KV cache (checked by
Model._forward before every forward pass).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from tinyllm.kernels import numba_cache  # noqa: F401  (before any @njit(cache=True): see numba_cache.py)
from tinyllm.kernels.numba_attention_simd import prefetch_ahead, score_tile, value_tile
from tinyllm.kernels.numba_math import as_f32, fast_exp, fast_normal_cdf, fast_sigmoid

# fastmath without the no-infs/no-NaNs assumptions, for kernels that see -inf masks
FASTMATH_KEEP_INF = {"nsz", "arcp", "contract", "afn", "reassoc"}

_SQRT_2_OVER_PI = np.float32(math.sqrt(2.0 / math.pi))


# -- normalization -----------------------------------------------------------------------

# Row loops run on all threads only from this many rows: waking the thread pool costs a few
# microseconds on an idle machine and up to a scheduler tick on a busy one.
PARALLEL_MIN_ROWS = 4


@njit(inline="always", cache=True, fastmath=True, error_model="numpy")
def _rmsnorm_row(x, weight, eps, out, t):
    D = x.shape[1]
    ss = 0.0
    for i in range(D):
        ss += np.float64(x[t, i]) * x[t, i]
    inv = np.float32(1.0 / math.sqrt(ss / D + eps))
    for i in range(D):
        out[t, i] = x[t, i] * inv * weight[i]


@njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def rmsnorm(x, weight, eps):
    """(T, D) -> x / sqrt(mean(x^2) + eps) * weight."""
    T = x.shape[0]
    out = np.empty_like(x)
    if T < PARALLEL_MIN_ROWS:
        for t in range(T):
            _rmsnorm_row(x, weight, eps, out, t)
    else:
        for t in prange(T):
            _rmsnorm_row(x, weight, eps, out, t)
    return out


@njit(inline="always", cache=True, fastmath=True, error_model="numpy")
def _layernorm_row(x, weight, bias, eps, out, t):
    D = x.shape[1]
    s = 0.0
    for i in range(D):
        s += x[t, i]
    mu = s / D
    v = 0.0
    for i in range(D):
        v += (x[t, i] - mu) ** 2
    inv = np.float32(1.0 / math.sqrt(v / D + eps))
    mu32 = np.float32(mu)
    for i in range(D):
        y = (x[t, i] - mu32) * inv * weight[i]
        out[t, i] = y + bias[i] if bias is not None else y


@njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def layernorm(x, weight, bias, eps):
    """(T, D) -> (x - mean) / sqrt(var + eps) * weight (+ bias); two-pass variance."""
    T = x.shape[0]
    out = np.empty_like(x)
    if T < PARALLEL_MIN_ROWS:
        for t in range(T):
            _layernorm_row(x, weight, bias, eps, out, t)
    else:
        for t in prange(T):
            _layernorm_row(x, weight, bias, eps, out, t)
    return out


# -- activations ---------------------------------------------------------------------------

@njit(cache=True, fastmath=True, error_model="numpy")
def silu_flat(x, out):
    for i in range(x.shape[0]):
        out[i] = x[i] * fast_sigmoid(x[i])


@njit(cache=True, fastmath=True, error_model="numpy")
def swiglu_flat(gate, up, out):
    """SiLU(gate) * up in one pass."""
    for i in range(gate.shape[0]):
        out[i] = gate[i] * fast_sigmoid(gate[i]) * up[i]


@njit(cache=True, fastmath=True, error_model="numpy")
def gelu_flat(x, out, approximate):
    """Exact GELU x * Phi(x), or the tanh form, written as x * sigmoid(2y) since
    (1 + tanh y) / 2 = sigmoid(2y) (no cancellation for large negative x)."""
    if approximate:
        for i in range(x.shape[0]):
            v = x[i]
            y = _SQRT_2_OVER_PI * (v + np.float32(0.044715) * v * v * v)
            out[i] = v * fast_sigmoid(np.float32(2.0) * y)
    else:
        for i in range(x.shape[0]):
            out[i] = x[i] * fast_normal_cdf(x[i])


@njit(inline="always", cache=True, fastmath=FASTMATH_KEEP_INF, error_model="numpy")
def _softmax_row(x, out, r):
    S = x.shape[1]
    mx = -np.inf
    for s in range(S):
        mx = max(mx, x[r, s])
    total = np.float32(0.0)
    for s in range(S):
        e = fast_exp(x[r, s] - mx) if x[r, s] != -np.inf else np.float32(0.0)
        out[r, s] = e
        total += e
    inv = np.float32(1.0) / total
    for s in range(S):
        out[r, s] *= inv


@njit(parallel=True, cache=True, fastmath=FASTMATH_KEEP_INF, error_model="numpy")
def softmax_rows(x, out):
    """Row-wise softmax of a (R, S) array; -inf entries get exactly 0."""
    R = x.shape[0]
    if R < PARALLEL_MIN_ROWS:
        for r in range(R):
            _softmax_row(x, out, r)
    else:
        for r in prange(R):
            _softmax_row(x, out, r)


# -- position ------------------------------------------------------------------------------

@njit(cache=True, fastmath=True, error_model="numpy")
def rope(x, positions, inv_freq, n_heads):
    """Rotate-half RoPE on the first 2*len(inv_freq) dims of each head: (T, H*hd) -> new array."""
    T = x.shape[0]
    half = inv_freq.shape[0]
    hd = x.shape[1] // n_heads
    out = x.copy()
    cos = np.empty(half, np.float32)
    sin = np.empty(half, np.float32)
    for t in range(T):
        for i in range(half):
            a = np.float64(positions[t]) * np.float64(inv_freq[i])
            cos[i] = np.float32(math.cos(a))
            sin[i] = np.float32(math.sin(a))
        for h in range(n_heads):
            base = h * hd
            for i in range(half):
                x1 = x[t, base + i]
                x2 = x[t, base + half + i]
                out[t, base + i] = x1 * cos[i] - x2 * sin[i]
                out[t, base + half + i] = x2 * cos[i] + x1 * sin[i]
    return out


# -- attention -----------------------------------------------------------------------------
# The cache is reference.new_kv_cache's: keys and values (n_kv, n_ctx, head_dim), float32 or
# float16 (passed in as its uint16 bits: Numba's CPU target has no float16 arrays). Every query
# head of a GQA/MQA group uses each key and value row while it is in registers or L1: on
# numba_attention_simd's register tiles (see attention() for when), else on loops that take
# KEYS_AT_ONCE rows at a time, converted once into float32 `rows`, so that each q load serves
# four dot products and each accumulator load/store four products (BENCHMARKS.md, long context).
KEYS_AT_ONCE = 4
# Keys per value_tile call: a run of values (8-32 KB for head dims 64-128) stays in L1/L2
# while each (heads x dims) tile of the group passes over it (runs of 1024 measured slower).
VALUE_RUN = 64


@njit(inline="always", cache=True, error_model="numpy")
def _attention_scratch(group, hd, S):
    """One task's scratch for _attend_group: qs, rows, scores, acc."""
    return (np.empty((group, hd), np.float32), np.empty((KEYS_AT_ONCE, hd), np.float32),
            np.empty((group, S), np.float32), np.empty((group, hd), np.float32))


@njit(inline="always", cache=True, error_model="numpy")
def _load_rows(cache, kv, s, count, rows):
    """rows[j] = cache[kv, s + j] as float32, for j < count."""
    for j in range(count):
        for i in range(cache.shape[2]):
            rows[j, i] = as_f32(cache[kv, s + j, i])


@njit(inline="always", cache=True, error_model="numpy")
def _tiled_scores(qs, k_cache, kv, n, group, scores):
    """scores[g, s] = qs[g] . K[s] by register tiles (hd a multiple of 8), for s below the
    returned count: n rounded down to the tile's keys (4 with an even group, else 8)."""
    hd, S = k_cache.shape[2], scores.shape[1]
    base = kv * k_cache.shape[1] * hd
    if group % 2 == 0:
        whole = n - n % 4
        for s in range(0, whole, 4):
            prefetch_ahead(k_cache, base + s * hd, 4 * hd)
            for g in range(0, group, 2):
                score_tile(qs, g * hd, k_cache, base + s * hd, hd, scores, g * S + s, S, 2)
    else:
        whole = n - n % 8
        for s in range(0, whole, 8):
            prefetch_ahead(k_cache, base + s * hd, 8 * hd)
            for g in range(group):
                score_tile(qs, g * hd, k_cache, base + s * hd, hd, scores, g * S + s, S, 1)
    return whole


@njit(inline="always", cache=True, error_model="numpy")
def _value_tile_heads(group, hd):
    """Heads per value_tile for this shape (its 8 registers hold 64 // heads dims of each
    head), or 0 where no tile fits."""
    if group % 4 == 0 and hd % 16 == 0:
        return 4
    if group % 2 == 0 and hd % 32 == 0:
        return 2
    if hd % 64 == 0:
        return 1
    return 0


@njit(inline="always", cache=True, error_model="numpy")
def _tiled_values(p, v_cache, kv, n, group, heads, acc):
    """acc[g] += sum over s < n of p[g, s] V[s], by value tiles of `heads` heads."""
    hd, S = v_cache.shape[2], p.shape[1]
    base = kv * v_cache.shape[1] * hd
    for s0 in range(0, n, VALUE_RUN):
        run = min(VALUE_RUN, n - s0)
        prefetch_ahead(v_cache, base + s0 * hd, run * hd)
        for g in range(0, group, heads):
            if heads == 4:
                for d0 in range(0, hd, 16):
                    value_tile(p, g * S + s0, S, v_cache, base + s0 * hd + d0, hd, run, acc, g * hd + d0, 4)
            elif heads == 2:
                for d0 in range(0, hd, 32):
                    value_tile(p, g * S + s0, S, v_cache, base + s0 * hd + d0, hd, run, acc, g * hd + d0, 2)
            else:
                for d0 in range(0, hd, 64):
                    value_tile(p, g * S + s0, S, v_cache, base + s0 * hd + d0, hd, run, acc, g * hd + d0, 1)


@njit(inline="always", cache=True, fastmath=True, error_model="numpy")
def _attend_group(q, k_cache, v_cache, start_pos, group, scale, alibi_slopes, tiles, out, kv, t, qs, rows, scores, acc):
    """Query t of the `group` heads sharing kv head `kv`: out[t, heads] = softmax(q K^T) V,
    on the register tiles where `tiles` (see attention). Scratch: qs, acc (group, hd); rows
    (KEYS_AT_ONCE, hd); scores (group, >= n)."""
    hd = k_cache.shape[2]
    n = start_pos + t + 1                                # keys this query sees
    h0 = kv * group
    for g in range(group):
        for i in range(hd):
            qs[g, i] = q[t, (h0 + g) * hd + i] * scale
    if tiles:                                            # scores[g, s] = q[g] . K[s]
        done = _tiled_scores(qs, k_cache, kv, n, group, scores)
    else:
        done = n - n % KEYS_AT_ONCE
        for s in range(0, done, KEYS_AT_ONCE):
            _load_rows(k_cache, kv, s, KEYS_AT_ONCE, rows)
            for g in range(group):
                d0 = d1 = d2 = d3 = np.float32(0.0)
                for i in range(hd):
                    x = qs[g, i]
                    d0 += x * rows[0, i]
                    d1 += x * rows[1, i]
                    d2 += x * rows[2, i]
                    d3 += x * rows[3, i]
                scores[g, s], scores[g, s + 1], scores[g, s + 2], scores[g, s + 3] = d0, d1, d2, d3
    for s in range(done, n):
        _load_rows(k_cache, kv, s, 1, rows)
        for g in range(group):
            d0 = np.float32(0.0)
            for i in range(hd):
                d0 += qs[g, i] * rows[0, i]
            scores[g, s] = d0
    for g in range(group):
        if alibi_slopes is not None:
            slope = alibi_slopes[h0 + g]
            for s in range(n):
                scores[g, s] += slope * np.float32(s - (n - 1))
        mx = scores[g, 0]
        for s in range(n):
            mx = max(mx, scores[g, s])
        total = np.float32(0.0)
        for s in range(n):
            e = fast_exp(scores[g, s] - mx)
            scores[g, s] = e
            total += e
        inv = np.float32(1.0) / total
        for s in range(n):
            scores[g, s] *= inv
    acc[:group] = 0.0                                    # acc[g] = sum_s p[g, s] V[s]
    heads = _value_tile_heads(group, hd) if tiles else 0
    if heads > 0:
        _tiled_values(scores, v_cache, kv, n, group, heads, acc)
    else:
        whole = n - n % KEYS_AT_ONCE
        for s in range(0, whole, KEYS_AT_ONCE):
            _load_rows(v_cache, kv, s, KEYS_AT_ONCE, rows)
            for g in range(group):
                p0, p1, p2, p3 = scores[g, s], scores[g, s + 1], scores[g, s + 2], scores[g, s + 3]
                for i in range(hd):
                    acc[g, i] += p0 * rows[0, i] + p1 * rows[1, i] + p2 * rows[2, i] + p3 * rows[3, i]
        for s in range(whole, n):
            _load_rows(v_cache, kv, s, 1, rows)
            for g in range(group):
                p = scores[g, s]
                for i in range(hd):
                    acc[g, i] += p * rows[0, i]
    for g in range(group):
        for i in range(hd):
            out[t, (h0 + g) * hd + i] = acc[g, i]


@njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def attention(q, k_cache, v_cache, start_pos, n_heads, scale, alibi_slopes, parallel):
    """Causal attention of T queries over the cache (query t at position start_pos + t),
    one task per (kv head, query): the heads of a GQA/MQA group read each key once.
    q (T, H*hd); k_cache, v_cache (n_kv, n_ctx, hd) float32 or float16 bits -> (T, H*hd).
    parallel: spread the tasks over the threads (worth it beyond a few thousand MACs)."""
    T = q.shape[0]
    n_kv, _, hd = k_cache.shape
    group = n_heads // n_kv
    S = start_pos + T
    out = np.empty((T, n_heads * hd), np.float32)
    # Register tiles need head dims in whole vectors. They win wherever a key row serves
    # several queries (GQA/MQA groups, prefill); one query per key (MHA decode) streams the
    # cache from DRAM faster in the loops' row order (BENCHMARKS.md, long context).
    tiles = hd % 8 == 0 and (group > 1 or T > 1)
    if not parallel:
        qs, rows, scores, acc = _attention_scratch(group, hd, S)
        for task in range(n_kv * T):
            _attend_group(q, k_cache, v_cache, start_pos, group, scale, alibi_slopes, tiles, out,
                          task // T, task % T, qs, rows, scores, acc)
    else:
        for task in prange(n_kv * T):
            qs, rows, scores, acc = _attention_scratch(group, hd, S)
            _attend_group(q, k_cache, v_cache, start_pos, group, scale, alibi_slopes, tiles, out,
                          task // T, task % T, qs, rows, scores, acc)
    return out
