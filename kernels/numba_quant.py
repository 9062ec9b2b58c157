"""Quantized matrix products for the Numba backend.

Every product first quantizes the activation rows to int8 blocks of 32 (q8_0 style: a float32
scale per block, amax / 127, round half away from zero as ggml does), then takes integer block
dot products with the weight's blocks and applies scale_w * scale_x once per block.

Two implementations of the q4 product share that activation format:

- SIMD (x86 with AVX2 or AVX-512BW): numba_simd.q4_chunk_dot, pmaddubsw on the plane-major
  bytes. Decode (one token) runs one token per weight chunk; prefill runs PREFILL_TILE tokens
  per chunk so each weight byte is unpacked once per tile.
- portable: plain loops over the planes that LLVM vectorizes on any CPU (16-bit lanes,
  per-block int16 accumulators in a small array, the same wrapping trick as the SIMD path).

q8_0 and q6_k have SIMD kernels too (numba_simd: pmaddwd on int16 pairs, q6_k's paired within
each 16-weight half-block) and portable loops with int32 per-block accumulators.
Float weights (f16/f32) and the dequantize-a-tile path feed BLAS.

Shapes: weights are (N, K) as in PyTorch, activations (T, K), results (T, N); nb = ceil(K/32).

Trust: these kernels index without bounds checks (that is what makes them fast). They rely on
their callers for every shape and index: weights whose parts match their format's layout and
the architecture's declared shapes (checked when a model is loaded, tinyllm/validate.py),
token ids inside the embedding table and positions inside the KV cache (checked by
Model._forward before every forward pass).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from tinyllm.kernels import numba_cache, numba_simd  # noqa: F401  (numba_cache first: see numba_cache.py)
from tinyllm.kernels.numba_math import f16_bits_to_f32
from tinyllm.kernels.numba_simd import ActivationChunk, OutputSlot, WeightChunk
from tinyllm.kernels.quant import VECTOR_ALIGN

QK = 32
PREFILL_TILE = 4     # tokens per weight-chunk pass in the SIMD q4 prefill kernel (8 measured slower end to end)
Q8_PREFILL_TILE = 4  # q8_0 keeps 4 int32 accumulators per token: 8 tokens spill registers
ROW_BLOCK = 16       # weight rows whose bytes stay in L2 while all token tiles pass over them


# -- activation quantization ----------------------------------------------------------

@njit(inline="always", cache=True, error_model="numpy")
def _quantize_block(x, t, b, q):
    """Block b of row t of x -> q[0:32] int32; returns (scale, sum of q). Zero past the row."""
    K = x.shape[1]
    start = b * QK
    n = min(QK, K - start)
    amax = np.float32(0.0)
    for i in range(n):
        amax = max(amax, abs(x[t, start + i]))
    d = amax / np.float32(127.0)
    inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    s = 0
    for i in range(QK):
        v = x[t, start + i] * inv if i < n else np.float32(0.0)
        r = np.int32(np.floor(abs(v) + np.float32(0.5)))
        q[i] = -r if v < 0 else r
        s += q[i]
    return d, s


@njit(cache=True, error_model="numpy")
def quantize_planes(x):
    """x (T, K) float32 -> the portable kernels' activation:
    xq (T, 32, nb) int16 plane-major, corr (T, nb) int16 = 8*sum(q) (wrapping),
    dx (T, nb) float32 scales, sxf (T, nb) float32 = dx * sum(q)."""
    T, K = x.shape
    nb = (K + QK - 1) // QK
    xq = np.empty((T, QK, nb), np.int16)
    corr = np.empty((T, nb), np.int16)
    dx = np.empty((T, nb), np.float32)
    sxf = np.empty((T, nb), np.float32)
    q = np.empty(QK, np.int32)
    for t in range(T):
        for b in range(nb):
            d, s = _quantize_block(x, t, b, q)
            for i in range(QK):
                xq[t, i, b] = q[i]
            corr[t, b] = np.int16(8 * s)
            dx[t, b] = d
            sxf[t, b] = d * np.float32(s)
    return xq, corr, dx, sxf


# Prefill quantizes every token's row before the product: serial it was 7-8 % of a 128-token
# q4_0 matmul (1.1B shapes), so from PARALLEL_TOKENS tokens on the rows are split over the threads (below it a
# parallel region's start-up would cost more than it saves: decode is one token).
PARALLEL_TOKENS = 8
Q4_FIRST, Q4_SECOND = np.arange(16), np.arange(16, 32)  # q4's plane pairs (j, j+16): constants, not per call


@njit(inline="always", cache=True, error_model="numpy")
def _simd_row(x, t, width, base, slots, first, second, q, xq, dx, corr, sxf):
    """Row t of x into a SIMD kernel's activation xq (Tp, nch, 32*width): plane pair p of each
    block holds (q[first[p]], q[second[p]]) at base[p] + slots[block in chunk] of its chunk;
    q4 also corr, sxf (else None)."""
    for b in range((x.shape[1] + QK - 1) // QK):
        d, s = _quantize_block(x, t, b, q)
        c, o = b // width, slots[b % width]
        for p in range(16):
            xq[t, c, base[p] + o] = q[first[p]]
            xq[t, c, base[p] + o + 1] = q[second[p]]
        dx[t, b] = d
        if corr is not None:
            corr[t, b] = np.int16(8 * s)
            sxf[t, b] = d * np.float32(s)


@njit(parallel=True, cache=True, error_model="numpy")
def _simd_rows_parallel(x, width, base, slots, first, second, xq, dx, corr, sxf):
    for t in prange(x.shape[0]):
        _simd_row(x, t, width, base, slots, first, second, np.empty(QK, np.int32), xq, dx, corr, sxf)


@njit(cache=True, error_model="numpy")
def _simd_rows(x, width, base, slots, first, second, xq, dx, corr, sxf):
    if x.shape[0] >= PARALLEL_TOKENS:
        _simd_rows_parallel(x, width, base, slots, first, second, xq, dx, corr, sxf)
    else:
        q = np.empty(QK, np.int32)
        for t in range(x.shape[0]):
            _simd_row(x, t, width, base, slots, first, second, q, xq, dx, corr, sxf)


# The SIMD kernels load the activation in whole vectors, one per pmaddubsw / vpdpbusd: a buffer
# at an address that is not a multiple of VECTOR_ALIGN (64) bytes splits each AVX-512 load over
# two cache lines (NumPy aligns to 16; measured on Zen 5, 5632x2048 at 128 tokens: 3.9 ms
# aligned, 5.1 ms at 32 mod 64).


@njit(inline="always", cache=True, error_model="numpy")
def _aligned_zeros(n, dtype):
    """n zeros of ``dtype``, the first at an address that is a multiple of VECTOR_ALIGN."""
    buf = np.zeros(n + VECTOR_ALIGN, dtype)
    size = buf.itemsize
    start = (-(buf.ctypes.data // size)) % (VECTOR_ALIGN // size)
    return buf[start:start + n]


@njit(cache=True, error_model="numpy")
def quantize_for_simd(x, width, tile, base, slots):
    """x (T, K) float32 -> numba_simd's q4 activation, tokens padded with zeros to a multiple of
    tile: xq (Tp, nch, 32*width) int8, chunk c's (q[j], q[j+16]) byte pairs where
    numba_simd.q4_activation_layout puts them (base, slots); corr, dx, sxf as in quantize_planes
    but (Tp, nch*width), natural block order, zero past the row."""
    T, K = x.shape
    nch = ((K + QK - 1) // QK + width - 1) // width
    Tp = (T + tile - 1) // tile * tile
    xq = _aligned_zeros(Tp * nch * 32 * width, np.int8).reshape((Tp, nch, 32 * width))
    corr = np.zeros((Tp, nch * width), np.int16)
    dx = np.zeros((Tp, nch * width), np.float32)
    sxf = np.zeros((Tp, nch * width), np.float32)
    _simd_rows(x, width, base, slots, Q4_FIRST, Q4_SECOND, xq, dx, corr, sxf)
    return xq, corr, dx, sxf


@njit(cache=True, error_model="numpy")
def quantize_for_simd_q8(x, width, tile, base, slots, first, second):
    """x (T, K) -> the q8_0 / q6_k SIMD kernels' activation: xq (Tp, nch, 32*width) int16
    holding, for plane pair p, the (q[first[p]], q[second[p]]) pairs of each block at
    base[p] + slots[block in chunk] (base[p] = 2*width*p; q8_0: pairs (j, j+16); q6_k:
    numba_simd.Q6_FIRST/Q6_SECOND); dx (Tp, nch*width) float32 scales."""
    T, K = x.shape
    nch = ((K + QK - 1) // QK + width - 1) // width
    Tp = (T + tile - 1) // tile * tile
    xq = _aligned_zeros(Tp * nch * 32 * width, np.int16).reshape((Tp, nch, 32 * width))
    dx = np.zeros((Tp, nch * width), np.float32)
    _simd_rows(x, width, base, slots, first, second, xq, dx, None, None)
    return xq, dx


# -- q4_k: block scales decoded per row ------------------------------------------------------
# A q4_k block is a q4_1 block whose scale and minimum come from its super-block (quant.py):
# x = (d sc) q - (dmin m). Each row's block scales are decoded to float32 once per call into a
# scratch array that the q4 kernels read in place of q4_1's float16 d and m.

@njit(inline="always", cache=True, error_model="numpy")
def _scale_min(scales, sb, k):
    """6-bit scale and minimum of block k (0..7) of super-block sb (ggml's get_scale_min_k4)."""
    if k < 4:
        return scales[sb, k] & 63, scales[sb, k + 4] & 63
    return ((scales[sb, k + 4] & 15) | ((scales[sb, k - 4] >> 6) << 4),
            (scales[sb, k + 4] >> 4) | ((scales[sb, k] >> 6) << 4))


@njit(inline="always", cache=True, error_model="numpy")
def q4k_row_scales(d, scales, r, nb, ds, ms):
    """Blocks of row r -> ds, ms (nb,) float32 with x = ds * q + ms (ms = -dmin m)."""
    for b in range(nb):
        g = r * nb + b
        sb = g >> 3
        sc, mn = _scale_min(scales, sb, g & 7)
        ds[b] = f16_bits_to_f32(d[sb, 0]) * np.float32(sc)
        ms[b] = -(f16_bits_to_f32(d[sb, 1]) * np.float32(mn))


# -- q4 products: SIMD ------------------------------------------------------------------

MAX_FUSED = 4  # weights one q4 call may share an activation over (GPT-J: q, k, v and fc_in)


def _pick(parts, i):
    """parts[i] for a tuple of arrays, None for None (a typed None, so branches on it prune)."""


@overload(_pick, jit_options={"cache": True})
def _pick_typed(parts, i):
    if isinstance(parts, types.NoneType):
        return lambda parts, i: None
    return lambda parts, i: parts[i]


@njit(parallel=True, cache=True, error_model="numpy")
def _q4_rows_simd(qs_t, d_t, m_t, scales_t, n_mats, xq, corr, dx, sxf, out, width, tt, vnni):
    """out (Tp, N_0 + .. + N_{n-1}) += [q4 weight_i (N_i, 16, nb)] . activations: the first
    n_mats weights of the tuples (padded to MAX_FUSED; m_t, scales_t None where the format has
    none), their outputs side by side in out's columns, one parallel region over all their row
    blocks (the small k/v projections of a decode step then share the activation, the threads
    and the memory stream of wq's). width, tt, vnni: compile-time constants."""
    numba.literally(width)
    numba.literally(tt)
    numba.literally(vnni)
    first_block, first_col = np.zeros(n_mats + 1, np.int64), np.zeros(n_mats + 1, np.int64)
    for i in range(n_mats):  # weight i's row blocks and output columns follow weight i-1's
        first_block[i + 1] = first_block[i] + (qs_t[i].shape[0] + ROW_BLOCK - 1) // ROW_BLOCK
        first_col[i + 1] = first_col[i] + qs_t[i].shape[0]
    for j in prange(first_block[n_mats]):
        i = 0
        while j >= first_block[i + 1]:
            i += 1
        r0 = (j - first_block[i]) * ROW_BLOCK
        _q4_row_block(qs_t[i], d_t[i], _pick(m_t, i), _pick(scales_t, i), r0, min(qs_t[i].shape[0], r0 + ROW_BLOCK),
                      first_col[i], xq, corr, dx, sxf, out, width, tt, vnni)


@njit(cache=True, error_model="numpy")
def _q4_row_block(qs, d, m, scales, r0, r1, col, xq, corr, dx, sxf, out, width, tt, vnni):
    """out[:, col + r] += rows r0..r1 of one q4 weight (N, 16, nb) . activations, every token
    tile. q4_0 / q4_1: d, m (N, nb) float16 bits, scales None. q4_k: d (nsb, 2) float16 bits,
    m None, scales (nsb, 12). Decoding one token over rows of whole super-blocks (nb % 8 == 0,
    every real model's big matrices), the chunk kernel decodes the scales in registers;
    otherwise (prefill, where the tiles reuse them, or rows sharing super-blocks) the block's
    rows' scales are decoded first."""
    numba.literally(width)
    numba.literally(tt)
    numba.literally(vnni)
    nb = qs.shape[2]
    Tp, nch, n_out = xq.shape[0], xq.shape[1], out.shape[1]
    x_tstride = nch * 16 * 2 * width
    c_tstride = nch * width
    in_chunk = scales is not None and nb % 8 == 0 and tt == 1
    if scales is not None and not in_chunk:  # decode each row's scales once, for all token tiles
        ds = np.empty((ROW_BLOCK, nb), np.float32)
        ms = np.empty((ROW_BLOCK, nb), np.float32)
        for r in range(r0, r1):
            if nb % 8 == 0:  # whole super-blocks: the chunk kernel's vector decoding
                for c in range(nch):
                    numba_simd.q4_k_scales_chunk(d, scales, (r * nb + c * width) >> 3, min(width, nb - c * width),
                                                 ds, ms, (r - r0) * nb + c * width, width)
            else:
                q4k_row_scales(d, scales, r, nb, ds[r - r0], ms[r - r0])
    for t0 in range(0, Tp, tt):
        for r in range(r0, r1):
            for c in range(nch):
                b0 = c * width
                act = ActivationChunk(xq, t0 * x_tstride + c * 16 * 2 * width, x_tstride,
                                      corr, dx, sxf, t0 * c_tstride + b0, c_tstride)
                dest = OutputSlot(out, t0 * n_out + col + r, n_out)
                n_valid, q_off = min(width, nb - b0), r * 16 * nb + b0
                if in_chunk:  # decode, whole super-blocks: the chunk kernel decodes them in registers
                    weight = WeightChunk(qs, q_off, nb, d, scales, (r * nb + b0) >> 3)
                    numba_simd.q4_chunk_dot(weight, act, dest, n_valid, width, tt, vnni)
                elif scales is None:  # q4_0, q4_1: float16 scales (and minimums) per block
                    weight = WeightChunk(qs, q_off, nb, d, m, r * nb + b0)
                    numba_simd.q4_chunk_dot(weight, act, dest, n_valid, width, tt, vnni)
                else:  # q4_k, scales decoded above for this row block
                    weight = WeightChunk(qs, q_off, nb, ds, ms, (r - r0) * nb + b0)
                    numba_simd.q4_chunk_dot(weight, act, dest, n_valid, width, tt, vnni)


@njit(cache=True, error_model="numpy")
def _q4_simd(qs_t, d_t, m_t, scales_t, n_mats, x, tile, base, slots, width, vnni):
    numba.literally(width)
    numba.literally(vnni)
    xq, corr, dx, sxf = quantize_for_simd(x, width, tile, base, slots)
    n_out = 0
    for i in range(n_mats):
        n_out += qs_t[i].shape[0]
    out = np.zeros((xq.shape[0], n_out), np.float32)
    if tile == 1:
        _q4_rows_simd(qs_t, d_t, m_t, scales_t, n_mats, xq, corr, dx, sxf, out, width, 1, vnni)
    else:
        _q4_rows_simd(qs_t, d_t, m_t, scales_t, n_mats, xq, corr, dx, sxf, out, width, PREFILL_TILE, vnni)
    return out


# Entry points: activation in, product out, the constants fixed (calling a literally()
# function from Python would re-type it on every call), one per (width, vnni) so that only
# the kernels a CPU runs are compiled. One call per matmul (or per group of weights on one
# input): quantizing the activation and allocating inside the same compiled function keeps
# the per-call overhead of a decode step's ~150 matmuls small.
@njit(cache=True, error_model="numpy")
def q4_simd64(qs_t, d_t, m_t, scales_t, n_mats, x, tile, base, slots):
    return _q4_simd(qs_t, d_t, m_t, scales_t, n_mats, x, tile, base, slots, 64, 0)


@njit(cache=True, error_model="numpy")
def q4_simd64_vnni(qs_t, d_t, m_t, scales_t, n_mats, x, tile, base, slots):
    return _q4_simd(qs_t, d_t, m_t, scales_t, n_mats, x, tile, base, slots, 64, 1)


@njit(cache=True, error_model="numpy")
def q4_simd32(qs_t, d_t, m_t, scales_t, n_mats, x, tile, base, slots):
    return _q4_simd(qs_t, d_t, m_t, scales_t, n_mats, x, tile, base, slots, 32, 0)


@njit(cache=True, error_model="numpy")
def q4_simd32_vnni(qs_t, d_t, m_t, scales_t, n_mats, x, tile, base, slots):
    return _q4_simd(qs_t, d_t, m_t, scales_t, n_mats, x, tile, base, slots, 32, 1)


SIMD_KERNELS = {(64, False): q4_simd64, (64, True): q4_simd64_vnni, (32, False): q4_simd32, (32, True): q4_simd32_vnni}


def q4_matmuls_simd(x, weights, width, vnni=False):
    """(T, K) float32 @ [q4 weight_i (N_i, K)]^T -> (T, N_0 + N_1 + ..), one call for up to
    MAX_FUSED weights of one format and K (``weights``: (qs, d, m, scales) each, arrays of one
    Numba type: numba_cpu.matmuls checks their kernel_kind)."""
    T, n = x.shape[0], len(weights)
    padded = list(weights) + [weights[0]] * (MAX_FUSED - n)
    qs_t, d_t, m_t, scales_t = (tuple(part) for part in zip(*padded))
    vnni = vnni and numba_simd.has_vnni(width)
    return SIMD_KERNELS[width, vnni](qs_t, d_t, None if m_t[0] is None else m_t,
                                     None if scales_t[0] is None else scales_t, n,
                                     x, 1 if T == 1 else PREFILL_TILE, *_q4_layout(width, vnni))[:T]


_LAYOUTS: dict = {}


def _q4_layout(width, vnni):
    if (width, vnni) not in _LAYOUTS:
        _LAYOUTS[width, vnni] = tuple(np.array(a, np.int64) for a in numba_simd.q4_activation_layout(width, vnni))
    return _LAYOUTS[width, vnni]


# -- q8_0 products: SIMD ----------------------------------------------------------------------

@njit(parallel=True, cache=True, error_model="numpy")
def _q8_rows_simd(qs, d, xq, dx, out, width, tt, vnni):
    """out (Tp, N) += q8_0 weight (N, 32, nb) . activations; width, tt, vnni: compile-time constants."""
    numba.literally(width)
    numba.literally(tt)
    numba.literally(vnni)
    N, _, nb = qs.shape
    Tp, nch = xq.shape[0], xq.shape[1]
    x_tstride = nch * 16 * 2 * width
    c_tstride = nch * width
    for rb in prange((N + ROW_BLOCK - 1) // ROW_BLOCK):
        for t0 in range(0, Tp, tt):
            for r in range(rb * ROW_BLOCK, min(N, rb * ROW_BLOCK + ROW_BLOCK)):
                for c in range(nch):
                    b0 = c * width
                    weight = WeightChunk(qs, r * 32 * nb + b0, nb, d, None, r * nb + b0)
                    act = ActivationChunk(xq, t0 * x_tstride + c * 16 * 2 * width, x_tstride,
                                          None, dx, None, t0 * c_tstride + b0, c_tstride)
                    numba_simd.q8_chunk_dot(weight, act, OutputSlot(out, t0 * N + r, N),
                                            min(width, nb - b0), width, tt, vnni)


@njit(cache=True, error_model="numpy")
def _q8_simd(qs, d, x, tile, base, slots, first, second, width, vnni):
    numba.literally(width)
    numba.literally(vnni)
    xq, dx = quantize_for_simd_q8(x, width, tile, base, slots, first, second)
    out = np.zeros((xq.shape[0], qs.shape[0]), np.float32)
    if tile == 1:
        _q8_rows_simd(qs, d, xq, dx, out, width, 1, vnni)
    else:
        _q8_rows_simd(qs, d, xq, dx, out, width, Q8_PREFILL_TILE, vnni)
    return out


@njit(cache=True, error_model="numpy")
def q8_simd64(qs, d, x, tile, base, slots, first, second):
    return _q8_simd(qs, d, x, tile, base, slots, first, second, 64, 0)


@njit(cache=True, error_model="numpy")
def q8_simd64_vnni(qs, d, x, tile, base, slots, first, second):
    return _q8_simd(qs, d, x, tile, base, slots, first, second, 64, 1)


@njit(cache=True, error_model="numpy")
def q8_simd32(qs, d, x, tile, base, slots, first, second):
    return _q8_simd(qs, d, x, tile, base, slots, first, second, 32, 0)


@njit(cache=True, error_model="numpy")
def q8_simd32_vnni(qs, d, x, tile, base, slots, first, second):
    return _q8_simd(qs, d, x, tile, base, slots, first, second, 32, 1)


Q8_SIMD_KERNELS = {(64, False): q8_simd64, (64, True): q8_simd64_vnni,
                   (32, False): q8_simd32, (32, True): q8_simd32_vnni}
_Q8_LAYOUTS: dict = {}
Q8_PAIRS = (np.arange(16, dtype=np.int64), np.arange(16, 32, dtype=np.int64))   # plane pairs (j, j + 16)
Q6_PAIRS = (np.array(numba_simd.Q6_FIRST, np.int64), np.array(numba_simd.Q6_SECOND, np.int64))


def _q8_layout(width):
    """(base, slots) of the q8_0 / q6_k activation: plane pair p at 2*width*p, each block's
    int16 pair where q8_pair_blocks puts it (the same with and without VNNI)."""
    if width not in _Q8_LAYOUTS:
        slots = np.empty(width, np.int64)
        for r, blocks in enumerate(numba_simd.q8_pair_blocks(width)):
            for k, b in enumerate(blocks):
                slots[b] = r * (width // 2) + 2 * k
        _Q8_LAYOUTS[width] = (2 * width * np.arange(16, dtype=np.int64), slots)
    return _Q8_LAYOUTS[width]


def q8_matmul_simd(x, qs, d, width, vnni=False):
    """(T, K) float32 @ q8_0 weight^T -> (T, N) through the SIMD kernels (``vnni``: vpdpwssd
    where this CPU has it at ``width``)."""
    T = x.shape[0]
    vnni = vnni and numba_simd.has_vnni(width)
    return Q8_SIMD_KERNELS[width, vnni](qs, d, x, 1 if T == 1 else Q8_PREFILL_TILE,
                                        *_q8_layout(width), *Q8_PAIRS)[:T]


# -- q6_k products: SIMD ----------------------------------------------------------------------
# AVX2 width only: the kernel is the q8_0 one with q6_k's decoding, and it runs unchanged on
# AVX-512 machines. A 64-block variant was measured on Zen 5 (BENCHMARKS.md): prefill slower
# (its tiles spill registers), decode 1.6x faster on cached weights but no faster end to end
# (q4_k_m 1.1B: the q6_k tensors stream at the memory's rate either way), so it is not kept.

Q6_SIMD_WIDTH = 32
Q6_PREFILL_TILE = 4   # tokens per weight-chunk pass (5632x2048, 128 tokens, AVX2: tile 1 59 ms, 2 39 ms, 4 32 ms)


@njit(parallel=True, cache=True, error_model="numpy")
def _q6_rows_simd(qs, d, scales, xq, dx, out, width, tt, vnni):
    """out (Tp, N) += q6_k weight (N, 24, nb) . activations; width, tt, vnni: compile-time constants.
    Rows of whole super-blocks (nb % 8 == 0: every real model's big matrices) have their scales
    decoded in the chunk kernel; otherwise each row block's half-block steps are decoded once into
    scratch, for all token tiles."""
    numba.literally(width)
    numba.literally(tt)
    numba.literally(vnni)
    N, _, nb = qs.shape
    Tp, nch = xq.shape[0], xq.shape[1]
    x_tstride = nch * 16 * 2 * width
    c_tstride = nch * width
    in_chunk = nb % 8 == 0   # rows of whole super-blocks: the chunk kernel decodes the scales
    for rb in prange((N + ROW_BLOCK - 1) // ROW_BLOCK):
        r0, r1 = rb * ROW_BLOCK, min(N, rb * ROW_BLOCK + ROW_BLOCK)
        steps = np.empty((ROW_BLOCK, 2, nch * width), np.float32)
        if not in_chunk:
            for r in range(r0, r1):
                for b in range(nb):
                    g = r * nb + b
                    sb, h = g >> 3, 2 * (g & 7)
                    dd = f16_bits_to_f32(d[sb, 0])
                    steps[r - r0, 0, b] = dd * np.float32(scales[sb, h])
                    steps[r - r0, 1, b] = dd * np.float32(scales[sb, h + 1])
        for t0 in range(0, Tp, tt):
            for r in range(r0, r1):
                for c in range(nch):
                    b0 = c * width
                    act = ActivationChunk(xq, t0 * x_tstride + c * 16 * 2 * width, x_tstride,
                                          None, dx, None, t0 * c_tstride + b0, c_tstride)
                    dest, n_valid, q_off = OutputSlot(out, t0 * N + r, N), min(width, nb - b0), r * 24 * nb + b0
                    if in_chunk:
                        weight = WeightChunk(qs, q_off, nb, d, scales, (r * nb + b0) >> 3)
                        numba_simd.q6_chunk_dot(weight, act, dest, n_valid, width, tt, vnni)
                    else:
                        weight = WeightChunk(qs, q_off, nb, steps[r - r0, 0], steps[r - r0, 1], b0)
                        numba_simd.q6_chunk_dot(weight, act, dest, n_valid, width, tt, vnni)


@njit(cache=True, error_model="numpy")
def _q6_simd(qs, d, scales, x, tile, base, slots, first, second, vnni):
    numba.literally(vnni)
    xq, dx = quantize_for_simd_q8(x, 32, tile, base, slots, first, second)
    out = np.zeros((xq.shape[0], qs.shape[0]), np.float32)
    if tile == 1:
        _q6_rows_simd(qs, d, scales, xq, dx, out, 32, 1, vnni)
    else:
        _q6_rows_simd(qs, d, scales, xq, dx, out, 32, Q6_PREFILL_TILE, vnni)
    return out


@njit(cache=True, error_model="numpy")
def q6_simd32(qs, d, scales, x, tile, base, slots, first, second):
    return _q6_simd(qs, d, scales, x, tile, base, slots, first, second, 0)


@njit(cache=True, error_model="numpy")
def q6_simd32_vnni(qs, d, scales, x, tile, base, slots, first, second):
    return _q6_simd(qs, d, scales, x, tile, base, slots, first, second, 1)


def q6_matmul_simd(x, qs, d, scales, vnni=False):
    """(T, K) float32 @ q6_k weight^T -> (T, N) through the SIMD kernel (AVX2 width; ``vnni``:
    vpdpwssd where this CPU has it at that width)."""
    T = x.shape[0]
    tile = 1 if T == 1 else Q6_PREFILL_TILE
    kernel = q6_simd32_vnni if vnni and numba_simd.has_vnni(Q6_SIMD_WIDTH) else q6_simd32
    return kernel(qs, d, scales, x, tile, *_q8_layout(Q6_SIMD_WIDTH), *Q6_PAIRS)[:T]


# -- q4 products: portable ----------------------------------------------------------------

@njit(inline="always", cache=True, error_model="numpy")
def q4_row_scales(d, m, r, ds, ms):
    """Blocks of row r of a q4_0 / q4_1 weight -> ds, ms (nb,) float32, x = ds * q + ms."""
    for b in range(ds.shape[0]):
        ds[b] = f16_bits_to_f32(d[r, b])
        ms[b] = -np.float32(8.0) * ds[b] if m is None else f16_bits_to_f32(m[r, b])


@njit(inline="always", cache=True, error_model="numpy")
def q4_any_row_scales(d, m, scales, r, ds, ms):
    """Row r's block grids (x = ds * q + ms) for any q4 format: q4_k when scales is given."""
    if scales is None:
        q4_row_scales(d, m, r, ds, ms)
    else:
        q4k_row_scales(d, scales, r, ds.shape[0], ds, ms)


@njit(inline="always", cache=True, fastmath=True, error_model="numpy")
def _q4_row_portable(w, ds, ms, xq, corr, dx, sxf, out, r, acc):
    """out[:, r] = one q4 row (16, nb) with block grids x = ds * q + ms . every token."""
    nb = w.shape[1]
    for t in range(xq.shape[0]):
        acc[:] = 0
        for j in range(16):
            lo_x, hi_x, plane = xq[t, j], xq[t, j + 16], w[j]
            for b in range(nb):
                byte = np.int16(plane[b])
                acc[b] += (byte & np.int16(15)) * lo_x[b] + (byte >> np.int16(4)) * hi_x[b]
        s = np.float32(0.0)
        for b in range(nb):
            centered = np.float32(np.int16(acc[b] - corr[t, b]))  # sum((q - 8) x), exact
            # x = ds q + ms = ds (q - 8) + (ms + 8 ds)
            s += centered * ds[b] * dx[t, b] + (ms[b] + np.float32(8.0) * ds[b]) * sxf[t, b]
        out[t, r] = s


@njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def q4_rows_portable(qs, d, m, scales, xq, corr, dx, sxf, out):
    """out (T, N) = q4 weight (N, 16, nb) . activations from quantize_planes; the weight's parts
    as in _q4_rows_simd (q4_k: m None, scales given)."""
    N, _, nb = qs.shape
    for r in prange(N):
        acc = np.empty(nb, np.int16)
        ds, ms = np.empty(nb, np.float32), np.empty(nb, np.float32)
        q4_any_row_scales(d, m, scales, r, ds, ms)
        _q4_row_portable(qs[r], ds, ms, xq, corr, dx, sxf, out, r, acc)


@njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def q8_rows_portable(qs, d, xq, dx, out):
    """out (T, N) = q8_0 weight (N, 32, nb) . activations from quantize_planes (int32 sums)."""
    N, _, nb = qs.shape
    T = xq.shape[0]
    for r in prange(N):
        acc = np.empty(nb, np.int32)
        w = qs[r]
        for t in range(T):
            acc[:] = 0
            for j in range(16):
                x1, x2, w1, w2 = xq[t, j], xq[t, j + 16], w[j], w[j + 16]
                for b in range(nb):
                    acc[b] += np.int32(w1[b]) * np.int32(x1[b]) + np.int32(w2[b]) * np.int32(x2[b])
            s = np.float32(0.0)
            for b in range(nb):
                s += np.float32(acc[b]) * f16_bits_to_f32(d[r, b]) * dx[t, b]
            out[t, r] = s


# -- q6_k products: portable ----------------------------------------------------------------
# Six-bit levels times int8 activations overflow pmaddubsw's int16 pair sums, so q6_k sums in
# int32 lanes, one sum per half-block of 16 (its own scale): LLVM vectorizes these loops.

LOW4, TOP0, TOP1, TOP2, FOUR, TWO, BIAS6 = (np.int16(v) for v in (15, 3, 12, 48, 4, 2, 32))


@njit(inline="always", cache=True, error_model="numpy")
def q6k_row_steps(d, scales, r, steps):
    """Row r's half-block grid steps -> steps (nb, 2) float32, d * sc (quant.q6_k_half_scales)."""
    nb = steps.shape[0]
    for b in range(nb):
        g = r * nb + b
        sb, h = g >> 3, 2 * (g & 7)
        dd = f16_bits_to_f32(d[sb, 0])
        steps[b, 0] = dd * np.float32(scales[sb, h])
        steps[b, 1] = dd * np.float32(scales[sb, h + 1])


@njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def q6_rows_portable(qs, d, scales, xq, dx, out):
    """out (T, N) = q6_k weight (N, 24, nb) . activations from quantize_planes."""
    N, _, nb = qs.shape
    T = xq.shape[0]
    for r in prange(N):
        acc0, acc1 = np.empty(nb, np.int32), np.empty(nb, np.int32)
        steps = np.empty((nb, 2), np.float32)
        q6k_row_steps(d, scales, r, steps)
        w = qs[r]
        for t in range(T):
            acc0[:] = 0
            acc1[:] = 0
            for j in range(8):  # weights j, j+8 (first half) and j+16, j+24 (second) of every block
                lo_a, lo_b, top = w[j], w[j + 8], w[16 + j]
                xa, xb, xc, xd = xq[t, j], xq[t, j + 8], xq[t, j + 16], xq[t, j + 24]
                # int16 levels (an int64 constant would widen the lanes); one accumulator per loop
                for b in range(nb):  # so that LLVM vectorizes without alias checks between them
                    a, c, h = np.int16(lo_a[b]), np.int16(lo_b[b]), np.int16(top[b])
                    k0 = ((a & LOW4) | ((h & TOP0) << FOUR)) - BIAS6
                    k1 = ((c & LOW4) | ((h & TOP1) << TWO)) - BIAS6
                    acc0[b] += np.int32(k0) * np.int32(xa[b]) + np.int32(k1) * np.int32(xb[b])
                for b in range(nb):
                    a, c, h = np.int16(lo_a[b]), np.int16(lo_b[b]), np.int16(top[b])
                    k2 = ((a >> FOUR) | (h & TOP2)) - BIAS6
                    k3 = ((c >> FOUR) | ((h >> TWO) & TOP2)) - BIAS6
                    acc1[b] += np.int32(k2) * np.int32(xc[b]) + np.int32(k3) * np.int32(xd[b])
            s = np.float32(0.0)
            for b in range(nb):
                s += (np.float32(acc0[b]) * steps[b, 0] + np.float32(acc1[b]) * steps[b, 1]) * dx[t, b]
            out[t, r] = s


# -- dequantization (embedding rows, BLAS tiles) --------------------------------------------
# Single-threaded on purpose: these feed BLAS, and Numba's thread pool still spinning while
# OpenBLAS's starts made a tiled product 7x slower (60 ms instead of 9 for 2048x2048 x 128).

@njit(inline="always", cache=True, error_model="numpy")
def _decode_q4_row(qs, r, ds, ms, out_row):
    K = out_row.shape[0]
    for b in range(ds.shape[0]):
        base = b * QK
        for j in range(16):
            byte = qs[r, j, b]
            if base + j < K:
                out_row[base + j] = np.float32(byte & 15) * ds[b] + ms[b]
            if base + j + 16 < K:
                out_row[base + j + 16] = np.float32(byte >> 4) * ds[b] + ms[b]


@njit(cache=True, error_model="numpy")
def dequantize_q4_rows(qs, d, m, scales, rows, out):
    """out (len(rows), K) = decoded q4_0 (m None) / q4_1 / q4_k (m None, scales given) rows;
    K = out.shape[1] <= nb*32."""
    nb = qs.shape[2]
    ds, ms = np.empty(nb, np.float32), np.empty(nb, np.float32)
    for i in range(rows.shape[0]):
        q4_any_row_scales(d, m, scales, rows[i], ds, ms)
        _decode_q4_row(qs, rows[i], ds, ms, out[i])


@njit(cache=True, error_model="numpy")
def dequantize_q6_rows(qs, d, scales, rows, out):
    """out (len(rows), K) = decoded q6_k rows; K = out.shape[1] <= nb*32."""
    K = out.shape[1]
    nb = qs.shape[2]
    steps = np.empty((nb, 2), np.float32)
    for i in range(rows.shape[0]):
        r = rows[i]
        q6k_row_steps(d, scales, r, steps)
        for b in range(nb):
            for j in range(QK):
                k = b * QK + j
                if k < K:
                    byte, top = np.int32(qs[r, j & 15, b]), np.int32(qs[r, 16 + (j & 7), b])
                    q = ((byte >> 4) if j >= 16 else (byte & 15)) | (((top >> (2 * (j >> 3))) & 3) << 4)
                    out[i, k] = steps[b, j >> 4] * (np.float32(q) - np.float32(32.0))


@njit(cache=True, error_model="numpy")
def dequantize_q8_rows(qs, d, rows, out):
    K = out.shape[1]
    nb = qs.shape[2]
    for i in range(rows.shape[0]):
        r = rows[i]
        for b in range(nb):
            scale = f16_bits_to_f32(d[r, b])
            for j in range(min(QK, K - b * QK)):
                out[i, b * QK + j] = np.float32(qs[r, j, b]) * scale


@njit(cache=True, error_model="numpy")
def f16_rows(w, rows, out):
    """out (len(rows), K) float32 = float16 bits w[rows]."""
    for i in range(rows.shape[0]):
        r = rows[i]
        for k in range(out.shape[1]):
            out[i, k] = f16_bits_to_f32(w[r, k])


# -- float weights, few tokens (a Numba loop rather than BLAS: see above) ----------------------

@njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def f16_matvec(w, x, out):
    """out (T, N) = x (T, K) @ float16-bits w (N, K)^T, for small T."""
    N, K = w.shape
    for r in prange(N):
        for t in range(x.shape[0]):
            s = np.float32(0.0)
            for k in range(K):
                s += f16_bits_to_f32(w[r, k]) * x[t, k]
            out[t, r] = s


@njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def f32_matvec(w, x, out):
    """out (T, N) = x (T, K) @ w (N, K)^T, for small T."""
    N, K = w.shape
    for r in prange(N):
        for t in range(x.shape[0]):
            s = np.float32(0.0)
            for k in range(K):
                s += w[r, k] * x[t, k]
            out[t, r] = s
