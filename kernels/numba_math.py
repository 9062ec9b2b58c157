"""Scalar math for the Numba kernels, written so LLVM can vectorize the loops that call it.

Numba's ``math.exp``/``math.erf`` are calls into libm that the vectorizer cannot widen (a
SwiGLU over 5632 values: ~20 us instead of ~3). These versions are branch-free float32
arithmetic (range reduction + polynomial, bits assembled with a bitcast), ~1-2 ulp for exp.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from tinyllm.kernels import numba_cache  # noqa: F401  (before any @njit(cache=True): see numba_cache.py)

# -- bit casts --------------------------------------------------------------------------


@intrinsic
def f16_bits_to_f32(typingctx, h):
    """uint16 holding float16 bits -> float32 (Numba's CPU target has no float16 arrays)."""
    if not isinstance(h, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        half = builder.bitcast(builder.trunc(args[0], ir.IntType(16)) if args[0].type.width > 16 else args[0],
                               ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return types.float32(h), codegen


def as_f32(x):
    """A stored value as float32: float16 bits (a uint16, as Numba sees float16 arrays) or a float."""


@overload(as_f32, inline="always")
def _as_f32(x):
    if isinstance(x, types.Integer):
        return lambda x: f16_bits_to_f32(x)
    return lambda x: np.float32(x)


@intrinsic
def i32_bits_to_f32(typingctx, i):
    """The float32 whose bits are the low 32 bits of integer i."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type.width != 32:
            v = builder.trunc(v, ir.IntType(32)) if v.type.width > 32 else builder.sext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(i), codegen


# -- exp and friends --------------------------------------------------------------------

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)


@njit(inline="always", cache=True, error_model="numpy")
def fast_exp(x):
    """exp(x) for float32 x (Cephes expf polynomial). Above 88 the result is exp(88) (callers
    use fastmath, which assumes no infinities); below -87.3 it is exactly 0, not a denormal:
    denormal softmax weights made a whole attention pass ~3x slower."""
    tiny = x < np.float32(-87.3)
    x = min(max(x, np.float32(-87.3)), np.float32(88.0))
    n = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    # 2^n assembled in two halves so n = 127 stays a normal float32
    n1 = np.int32(n) >> 1
    n2 = np.int32(n) - n1
    e = p * i32_bits_to_f32((n1 + np.int32(127)) << 23) * i32_bits_to_f32((n2 + np.int32(127)) << 23)
    return np.float32(0.0) if tiny else e


@njit(inline="always", cache=True, error_model="numpy")
def fast_sigmoid(x):
    """1 / (1 + exp(-x)), float32."""
    return np.float32(1.0) / (np.float32(1.0) + fast_exp(-x))


@njit(inline="always", cache=True, error_model="numpy")
def fast_normal_cdf(x):
    """Phi(x) = (1 + erf(x / sqrt 2)) / 2, float32, via Abramowitz & Stegun 7.1.26 for erfc
    (|error| < 1.5e-7 x 1/2); computed from erfc(|z|) so the left tail has no cancellation."""
    a = abs(x) * np.float32(0.7071067811865476)
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.3275911) * a)
    y = np.float32(1.061405429)
    y = y * t + np.float32(-1.453152027)
    y = y * t + np.float32(1.421413741)
    y = y * t + np.float32(-0.284496736)
    y = y * t + np.float32(0.254829592)
    half_erfc = np.float32(0.5) * y * t * fast_exp(-a * a)
    return np.float32(1.0) - half_erfc if x >= 0 else half_erfc
