"""Normalization, activations, RoPE and attention for the Numba backend.

Each function mirrors its twin in reference.py (same arguments, same result up to float32
rounding; the activations use numba_math's vectorizable exp/erf). Rows of the (T, D)
activations are split across threads only where there is enough work to pay for it.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .numba_math import fast_erf, fast_exp, fast_tanh

# fastmath without the no-infs/no-NaNs assumptions, for kernels that see -inf masks
FASTMATH_KEEP_INF = {"nsz", "arcp", "contract", "afn", "reassoc"}

_SQRT_2_OVER_PI = np.float32(math.sqrt(2.0 / math.pi))
_INV_SQRT2 = np.float32(1.0 / math.sqrt(2.0))


# -- normalization -----------------------------------------------------------------------

@njit(parallel=True, cache=True, fastmath=True)
def rmsnorm(x, weight, eps):
    """(T, D) -> x / sqrt(mean(x^2) + eps) * weight."""
    T, D = x.shape
    out = np.empty_like(x)
    for t in prange(T):
        ss = 0.0
        for i in range(D):
            ss += np.float64(x[t, i]) * x[t, i]
        inv = np.float32(1.0 / math.sqrt(ss / D + eps))
        for i in range(D):
            out[t, i] = x[t, i] * inv * weight[i]
    return out


@njit(parallel=True, cache=True, fastmath=True)
def layernorm(x, weight, bias, eps):
    """(T, D) -> (x - mean) / sqrt(var + eps) * weight (+ bias); two-pass variance."""
    T, D = x.shape
    out = np.empty_like(x)
    for t in prange(T):
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
    return out


# -- activations ---------------------------------------------------------------------------

@njit(cache=True, fastmath=True)
def silu_flat(x, out):
    for i in range(x.shape[0]):
        out[i] = x[i] / (np.float32(1.0) + fast_exp(-x[i]))


@njit(cache=True, fastmath=True)
def swiglu_flat(gate, up, out):
    """SiLU(gate) * up in one pass."""
    for i in range(gate.shape[0]):
        g = gate[i]
        out[i] = g / (np.float32(1.0) + fast_exp(-g)) * up[i]


@njit(cache=True, fastmath=True)
def gelu_flat(x, out, approximate):
    if approximate:
        for i in range(x.shape[0]):
            v = x[i]
            out[i] = np.float32(0.5) * v * (np.float32(1.0) + fast_tanh(
                _SQRT_2_OVER_PI * (v + np.float32(0.044715) * v * v * v)))
    else:
        for i in range(x.shape[0]):
            v = x[i]
            out[i] = np.float32(0.5) * v * (np.float32(1.0) + fast_erf(v * _INV_SQRT2))


@njit(parallel=True, cache=True, fastmath=FASTMATH_KEEP_INF)
def softmax_rows(x, out):
    """Row-wise softmax of a (R, S) array; -inf entries get exactly 0."""
    R, S = x.shape
    for r in prange(R):
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


# -- position ------------------------------------------------------------------------------

@njit(cache=True, fastmath=True)
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

@njit(parallel=True, cache=True, fastmath=True)
def attention_direct(q, k_cache, v_cache, start_pos, n_heads, scale, alibi_slopes):
    """Causal attention of T queries over the cache, one kv head's query group per task.

    q (T, H*hd); caches (n_kv, n_ctx, hd); query t sits at start_pos + t. Each key and value
    row is read once per kv head and used by every query head of its group (GQA/MQA).
    """
    T = q.shape[0]
    n_kv, _, hd = k_cache.shape
    group = n_heads // n_kv
    S = start_pos + T
    out = np.empty((T, n_heads * hd), np.float32)
    for task in prange(n_kv * T):
        kv, t = task // T, task % T
        n = start_pos + t + 1                      # keys this query sees
        scores = np.empty((group, n), np.float32)
        for s in range(n):
            for g in range(group):
                h = kv * group + g
                acc = np.float32(0.0)
                for i in range(hd):
                    acc += q[t, h * hd + i] * k_cache[kv, s, i]
                scores[g, s] = acc * scale
        if alibi_slopes is not None:
            for g in range(group):
                for s in range(n):
                    scores[g, s] += alibi_slopes[kv * group + g] * np.float32(s - (n - 1))
        acc_out = np.zeros((group, hd), np.float32)
        for g in range(group):
            mx = -np.inf
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
        for s in range(n):
            for g in range(group):
                p = scores[g, s]
                for i in range(hd):
                    acc_out[g, i] += p * v_cache[kv, s, i]
        for g in range(group):
            h = kv * group + g
            for i in range(hd):
                out[t, h * hd + i] = acc_out[g, i]
    return out


@njit(parallel=True, cache=True, fastmath=True)
def causal_softmax(scores, T, start_pos, scale, slopes):
    """In place: scores (G*T, S) of G heads x T queries -> masked, scaled, softmaxed.

    Row g*T + t is query t (position start_pos + t) of head g; keys past it get 0.
    slopes: (G,) ALiBi slopes or None.
    """
    R, S = scores.shape
    for row in prange(R):
        g, t = row // T, row % T
        n = start_pos + t + 1
        mx = -np.inf
        for s in range(n):
            v = scores[row, s] * scale
            if slopes is not None:
                v += slopes[g] * np.float32(s - (n - 1))
            scores[row, s] = v
            mx = max(mx, v)
        total = np.float32(0.0)
        for s in range(n):
            e = fast_exp(scores[row, s] - mx)
            scores[row, s] = e
            total += e
        inv = np.float32(1.0) / total
        for s in range(n):
            scores[row, s] *= inv
        for s in range(n, S):
            scores[row, s] = 0.0


def attention_blas(q, k_cache, v_cache, start_pos, n_heads, scale, alibi_slopes):
    """Same result as attention_direct for many queries: per kv head, scores = Q K^T and
    Q' = P V as two BLAS products over the whole query group (the masked upper triangle is
    computed and zeroed: BLAS's speed more than pays for it)."""
    T = q.shape[0]
    n_kv, _, hd = k_cache.shape
    group = n_heads // n_kv
    S = start_pos + T
    qh = q.reshape(T, n_kv, group, hd)
    out = np.empty((T, n_kv, group, hd), np.float32)
    for kv in range(n_kv):
        Q = np.ascontiguousarray(qh[:, kv].transpose(1, 0, 2)).reshape(group * T, hd)
        scores = Q @ k_cache[kv, :S].T                                           # (group*T, S)
        slopes = None if alibi_slopes is None else alibi_slopes[kv * group:(kv + 1) * group]
        causal_softmax(scores, T, start_pos, np.float32(scale), slopes)
        out[:, kv] = (scores @ v_cache[kv, :S]).reshape(group, T, hd).transpose(1, 0, 2)
    return out.reshape(T, n_heads * hd)
