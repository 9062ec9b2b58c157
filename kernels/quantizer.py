"""The error-minimizing quantizer: each block's grid chosen by weighted least squares.

``quant.quantize`` rounds to the nearest point of a grid fixed by each block's range (for
q4_0/q4_1 exactly ggml's reference encoders). Here the grid is searched instead, after the
idea of llama.cpp's make_qx_quants / make_qkx2_quants: for about twenty candidate scales
near the range's, round every weight, then solve in closed form for the scale (and minimum)
that minimize

    E = sum_i w_i (x_i - grid(q_i))^2

given those q, and keep the candidate with the smallest E. The weights w_i say how much an
error on weight i costs. With an importance matrix they are the mean squared activation of
input channel i (tinyllm/imatrix.py), w_i = E[a_i^2]: the error of a product y = W a is
sum_i dW_i a_i, whose expected square (channels uncorrelated) is sum_i dW_i^2 E[a_i^2].
Without calibration data they favour the block's large weights, w_i = rms(block) + |x_i| (as
ggml's K-quants do). On stories260K, imp_i alone measured lower KL divergence than llama.cpp's
imp_i * sqrt(sigma^2 + x_i^2) (0.0578 against 0.0605, q4_k).

q4_k then gets a second-level refinement ggml does not do (refine_q4_k): the super-block's
float16 scales solved by least squares given the 6-bit codes, and the codes re-chosen.

The output is in the same formats, readable by every backend (and, exported, by ggml). For
q4_0 and q4_1 the final choice is made block by block against round-to-nearest, after both
are rounded to their stored float16 scales, so the searched blocks are never worse in E.
"""
from __future__ import annotations

import numpy as np

from tinyllm.kernels.quant import (
    QK,
    SUPER,
    QTensor,
    _blocks,
    _pack_nibbles,
    _unpack_nibbles,
    encode_q4_k,
    encode_q6_k,
    pack_q6,
    pack_scales,
    quantize,
    super_blocks,
    unpack_q6,
    unpack_scales,
)

SEARCHED = ("q4_0", "q4_1", "q4_k", "q6_k")  # formats with a search; the others are quant.quantize
CANDIDATES = np.arange(-10, 11) / 10  # candidate scales: levels + c over the range, as ggml's rdelta


def block_weights(x: np.ndarray, cols: int, importance: np.ndarray | None = None) -> np.ndarray:
    """The cost weight of every element of blocks x (rows, nb, 32); zero on the padding."""
    rows, nb, _ = x.shape
    valid = (np.arange(nb * QK) < cols).reshape(1, nb, QK)
    if importance is None:
        w = np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + np.abs(x)
    else:
        imp = np.zeros(nb * QK, np.float32)
        imp[:cols] = np.asarray(importance, np.float32)
        w = np.broadcast_to(imp.reshape(1, nb, QK), x.shape)
    return np.where(valid, w, 0).astype(np.float32)


def _weighted_error(x, w, value):
    return np.sum(w * (x - value) ** 2, axis=-1)


def fit_affine(x: np.ndarray, w: np.ndarray, levels: int, min_at_most_zero: bool):
    """Blocks x, weights w (..., 32) -> scale, low (...): x ~ scale * q + low, q in 0..levels,
    by weighted least squares over candidate roundings. ``min_at_most_zero``: low <= 0 (q4_k
    stores -low as an unsigned 6-bit code)."""
    valid = w > 0
    lo = np.where(valid, x, np.inf).min(-1)
    hi = np.where(valid, x, -np.inf).max(-1)
    lo, hi = np.where(np.isfinite(lo), lo, 0), np.where(np.isfinite(hi), hi, 0)
    if min_at_most_zero:
        lo = np.minimum(lo, 0)
    span = hi - lo
    flat = span <= 0
    span = np.where(flat, 1, span)
    best_scale = np.where(flat, 0, span / levels).astype(np.float32)          # round to nearest first
    best_low = lo.astype(np.float32)
    q = np.clip(np.rint((x - lo[..., None]) / best_scale[..., None].clip(1e-30)), 0, levels)
    best = _weighted_error(x, w, best_scale[..., None] * q + best_low[..., None])
    sw, sx = w.sum(-1), (w * x).sum(-1)
    for c in CANDIDATES:
        q = np.clip(np.rint((x - lo[..., None]) * ((levels + c) / span)[..., None]), 0, levels)
        sl, sl2, sxl = (w * q).sum(-1), (w * q * q).sum(-1), (w * x * q).sum(-1)
        det = sw * sl2 - sl * sl
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = (sw * sxl - sx * sl) / det
            low = (sl2 * sx - sl * sxl) / det
            if min_at_most_zero:
                positive = low > 0
                scale = np.where(positive, sxl / sl2, scale)
                low = np.where(positive, 0, low)
        ok = (det > 0) & np.isfinite(scale) & np.isfinite(low) & (scale >= 0)
        err = np.where(ok, _weighted_error(x, w, scale[..., None] * q + low[..., None]), np.inf)
        better = (err < best) & ~flat
        best = np.where(better, err, best)
        best_scale = np.where(better, scale, best_scale).astype(np.float32)
        best_low = np.where(better, low, best_low).astype(np.float32)
    return best_scale, best_low


def fit_symmetric(x: np.ndarray, w: np.ndarray, half: int = 8) -> np.ndarray:
    """Blocks x, weights w (..., n) -> d (...): x ~ d * k, k in -half..half-1 (q4_0: 8, q6_k: 32),
    by weighted least squares over candidate roundings of both orientations (the largest weight
    at -half or at half-1)."""
    imax = np.abs(x).argmax(-1)[..., None]
    peak = np.take_along_axis(x, imax, -1)[..., 0]                             # signed
    best_d = (peak / -half).astype(np.float32)
    best = _weighted_error(x, w, best_d[..., None] * np.clip(np.rint(x / _nonzero(best_d)[..., None]), -half, half - 1))
    for levels in (-float(half), half - 1.0):
        for c in CANDIDATES:
            with np.errstate(divide="ignore", invalid="ignore"):
                k = np.clip(np.rint(x * ((levels + np.sign(levels) * c) / peak)[..., None]), -half, half - 1)
            k = np.nan_to_num(k)
            skk, sxk = (w * k * k).sum(-1), (w * x * k).sum(-1)
            with np.errstate(divide="ignore", invalid="ignore"):
                d = np.where(skk > 0, sxk / skk, 0).astype(np.float32)
            err = _weighted_error(x, w, d[..., None] * k)
            better = err < best
            best = np.where(better, err, best)
            best_d = np.where(better, d, best_d).astype(np.float32)
    return best_d


def _nonzero(d):
    return np.where(d == 0, np.float32(1), d)


def _stored(v):
    return v.astype(np.float16).astype(np.float32)


def quantize_searched(w: np.ndarray, fmt: str, importance: np.ndarray | None = None) -> QTensor:
    """Encode matrix w (rows, cols) in ``fmt`` with searched grids; importance (cols,) is the
    mean squared activation per input channel, or None. Formats without a search (q8_0, f16,
    f32) are encoded as quant.quantize does."""
    w = np.asarray(w, np.float32)
    if fmt not in SEARCHED:
        return quantize(w, fmt)
    if importance is not None and np.shape(importance) != (w.shape[1],):
        raise ValueError(f"importance has shape {np.shape(importance)}, expected ({w.shape[1]},)")
    x = _blocks(w)                                                             # (rows, nb, 32)
    cost = block_weights(x, w.shape[1], importance)
    if fmt == "q4_k":
        scale, low = fit_affine(x, cost, 15, min_at_most_zero=True)
        return refine_q4_k(x, cost, encode_q4_k(x, scale, -low, w.shape), scale, -low)
    if fmt == "q6_k":  # x = (d sc) k per half-block of 16, k = q - 32
        halves = x.reshape(x.shape[:2] + (2, QK // 2))
        step = fit_symmetric(halves, cost.reshape(halves.shape), half=32)
        searched = refine_q6_k(x, cost, encode_q6_k(x, step, w.shape), step)
        return better_super_blocks(x, cost, searched, quantize(w, fmt))
    if fmt == "q4_0":  # x = d k, k = q - 8
        d = _stored(fit_symmetric(x, cost))
        k = np.clip(np.rint(x / _nonzero(d)[..., None]), -8, 7)
        return _better_blocks(x, cost, quantize(w, fmt), {"d": d}, k + 8)
    scale, low = fit_affine(x, cost, 15, min_at_most_zero=False)  # q4_1: x = d q + m
    d, m = _stored(scale), _stored(low)
    q = np.clip(np.rint((x - m[..., None]) / _nonzero(d)[..., None]), 0, 15)
    return _better_blocks(x, cost, quantize(w, fmt), {"d": d, "m": m}, q)


def _better_blocks(x, cost, nearest: QTensor, scales: dict, q: np.ndarray) -> QTensor:
    """Block by block, the searched encoding (float16-exact scales (rows, nb), quants q
    (rows, nb, 32)) where its weighted error is lower than round-to-nearest's, else that."""
    value = scales["d"][..., None] * (q - 8 if "m" not in scales else q)
    if "m" in scales:
        value = value + scales["m"][..., None]
    take = _weighted_error(x, cost, value) < _weighted_error(x, cost, _blocks(nearest.dequantize()))
    parts = {k: np.where(take, v, np.asarray(nearest.parts[k], np.float32)).astype(np.float16)
             for k, v in scales.items()}
    parts["qs"] = _pack_nibbles(np.where(take[..., None], q, _unpack(nearest)).astype(np.uint8))
    return QTensor(nearest.format, nearest.shape, parts)


def _unpack(t: QTensor) -> np.ndarray:
    return _unpack_nibbles(np.asarray(t.parts["qs"]))


def weighted_error(w: np.ndarray, t: QTensor, importance: np.ndarray | None = None) -> float:
    """E of a quantized tensor against its float original, with the quantizer's cost weights."""
    x = _blocks(w)
    return float(np.sum(block_weights(x, w.shape[1], importance) * (x - _blocks(t.dequantize())) ** 2))


def refine_q4_k(x: np.ndarray, cost: np.ndarray, t: QTensor, scale: np.ndarray, minimum: np.ndarray,
                rounds: int = 3) -> QTensor:
    """Improve a q4_k encoding of blocks x (rows, nb, 32) at its second level, where ggml stops:
    alternately (1) given every block's integer codes (sc, m) and quants q, solve for the
    super-block's (d, dmin) by weighted least squares, x ~ d (sc q) - dmin m, a 2x2 system;
    (2) given (d, dmin) in float16, choose each block's codes among the nearest to its fitted
    scale and minimum (3 x 3 candidates), re-rounding q on each candidate grid. Each round
    keeps a super-block's new encoding only where it lowers the weighted error."""
    rows, nb, _ = x.shape
    nsb = t.parts["d"].shape[0]
    X, C = super_blocks(x, nsb), super_blocks(cost, nsb)                         # (nsb, 8, 32)
    fit_s, fit_m = super_blocks(scale, nsb), super_blocks(minimum, nsb)          # (nsb, 8)
    sc, m = unpack_scales(np.asarray(t.parts["scales"]))
    sc, m = sc.astype(np.float32), m.astype(np.float32)
    d = np.asarray(t.parts["d"], np.float32).copy()                              # (nsb, 2)
    q = super_blocks(_unpack_nibbles(np.asarray(t.parts["qs"])), nsb).astype(np.float32)

    def requantize(d, sc, m):
        step = (d[:, 0, None] * sc)[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.rint((X + (d[:, 1, None] * m)[..., None]) / step)
        return np.clip(np.where(step > 0, q, 0), 0, 15)

    best = _block_error(X, C, d, sc, m, q).sum(axis=1)
    for _ in range(rounds):
        # (1) the super-block scales, codes and quants fixed
        a, b = sc[..., None] * q, -np.broadcast_to(m[..., None], q.shape)
        saa, sab, sbb = (np.sum(C * u * v, axis=(1, 2)) for u, v in ((a, a), (a, b), (b, b)))
        sax, sbx = np.sum(C * a * X, axis=(1, 2)), np.sum(C * b * X, axis=(1, 2))
        det = saa * sbb - sab * sab
        with np.errstate(divide="ignore", invalid="ignore"):
            nd = np.stack([(sax * sbb - sbx * sab) / det, (saa * sbx - sab * sax) / det], axis=1)
            only_d = np.where(saa > 0, sax / saa, 0)
        nd = np.where((det > 0)[:, None] & np.isfinite(nd), nd, d)
        nd[:, 1] = np.where(nd[:, 1] < 0, 0, nd[:, 1])
        nd[:, 0] = np.where(nd[:, 1] == 0, np.where(d[:, 1] == 0, nd[:, 0], only_d), nd[:, 0])
        nd = np.maximum(nd, 0).astype(np.float16).astype(np.float32)
        # (2) the codes, given the new super-block scales
        with np.errstate(divide="ignore", invalid="ignore"):
            s0 = np.where(nd[:, 0, None] > 0, np.rint(fit_s / nd[:, 0, None]), 0)
            m0 = np.where(nd[:, 1, None] > 0, np.rint(fit_m / nd[:, 1, None]), 0)
        nsc, nm = np.clip(s0, 0, 63), np.clip(m0, 0, 63)
        nq = requantize(nd, nsc, nm)
        block_err = _block_error(X, C, nd, nsc, nm, nq)
        for ds in (-1, 0, 1):
            for dm in (-1, 0, 1):
                if ds == dm == 0:
                    continue
                csc, cm = np.clip(s0 + ds, 0, 63), np.clip(m0 + dm, 0, 63)
                cq = requantize(nd, csc, cm)
                e = _block_error(X, C, nd, csc, cm, cq)
                better = e < block_err
                block_err = np.where(better, e, block_err)
                nsc, nm = np.where(better, csc, nsc), np.where(better, cm, nm)
                nq = np.where(better[..., None], cq, nq)
        new = block_err.sum(axis=1)
        take = new < best
        best = np.where(take, new, best)
        d = np.where(take[:, None], nd, d)
        sc, m = np.where(take[:, None], nsc, sc), np.where(take[:, None], nm, m)
        q = np.where(take[:, None, None], nq, q)
    qs = q.reshape(nsb * SUPER, QK)[:rows * nb].reshape(rows, nb, QK).astype(np.uint8)
    return QTensor("q4_k", t.shape, {"d": d.astype(np.float16), "scales": pack_scales(sc, m), "qs": _pack_nibbles(qs)})


def _block_error(X, C, d, sc, m, q):
    value = (d[:, 0, None] * sc)[..., None] * q - (d[:, 1, None] * m)[..., None]
    return np.sum(C * (X - value) ** 2, axis=-1)                                  # (nsb, 8)


def refine_q6_k(x: np.ndarray, cost: np.ndarray, t: QTensor, step: np.ndarray, rounds: int = 2) -> QTensor:
    """Improve a q6_k encoding of blocks x (rows, nb, 32) at its second level, as refine_q4_k
    does for q4_k: (1) given the half-block codes sc and levels k, the super-block's d by
    weighted least squares, x ~ d (sc k); (2) given d in float16, each half-block's code among
    the 3 nearest to its fitted step, k re-rounded on each. A super-block keeps a round's result
    only where it lowers the weighted error."""
    rows, nb, _ = x.shape
    nsb = t.parts["d"].shape[0]
    X = super_blocks(x, nsb).reshape(nsb, 16, QK // 2)
    C = super_blocks(cost, nsb).reshape(nsb, 16, QK // 2)
    fit = super_blocks(step, nsb).reshape(nsb, 16)
    d = np.asarray(t.parts["d"], np.float32)[:, 0]
    sc = np.asarray(t.parts["scales"], np.float32)
    k = super_blocks(unpack_q6(np.asarray(t.parts["qs"])), nsb).reshape(nsb, 16, QK // 2).astype(np.float32) - 32

    def levels(grid):                                                   # (nsb, 16) -> k (nsb, 16, 16)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.clip(np.where(grid[..., None] != 0, np.rint(X / grid[..., None]), 0), -32, 31)

    def half_error(grid, k):
        return np.sum(C * (X - grid[..., None] * k) ** 2, axis=-1)       # (nsb, 16)

    best = half_error(d[:, None] * sc, k).sum(axis=1)
    for _ in range(rounds):
        a = sc[..., None] * k
        saa, sax = np.sum(C * a * a, axis=(1, 2)), np.sum(C * a * X, axis=(1, 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            nd = np.where(saa > 0, sax / saa, d)
        nd = np.where(np.isfinite(nd), nd, d).astype(np.float16).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            s0 = np.where(nd[:, None] != 0, np.rint(fit / nd[:, None]), 0)
        nsc = np.clip(s0, -128, 127)
        nk = levels(nd[:, None] * nsc)
        err = half_error(nd[:, None] * nsc, nk)
        for delta in (-1, 1):
            csc = np.clip(s0 + delta, -128, 127)
            ck = levels(nd[:, None] * csc)
            e = half_error(nd[:, None] * csc, ck)
            better = e < err
            err, nsc, nk = np.where(better, e, err), np.where(better, csc, nsc), np.where(better[..., None], ck, nk)
        take = err.sum(axis=1) < best
        best = np.where(take, err.sum(axis=1), best)
        d, sc, k = np.where(take, nd, d), np.where(take[:, None], nsc, sc), np.where(take[:, None, None], nk, k)
    q = (k + 32).reshape(nsb * SUPER, QK)[:rows * nb].reshape(rows, nb, QK).astype(np.uint8)
    parts = {"d": d.astype(np.float16)[:, None], "scales": sc.astype(np.int8), "qs": pack_q6(q)}
    return QTensor("q6_k", t.shape, parts)


def better_super_blocks(x: np.ndarray, cost: np.ndarray, a: QTensor, b: QTensor) -> QTensor:
    """Two encodings of blocks x (rows, nb, 32) in the same K format: super-block by super-block,
    the one with the lower weighted error (a where they tie)."""
    rows, nb, _ = x.shape
    nsb = a.parts["d"].shape[0]
    errors = [super_blocks(_weighted_error(x, cost, _blocks(t.dequantize())), nsb).sum(axis=1) for t in (a, b)]
    take_b = errors[1] < errors[0]                                                  # (nsb,)
    parts = {k: np.where(take_b.reshape((-1,) + (1,) * (v.ndim - 1)), b.parts[k], v)
             for k, v in a.parts.items() if k != "qs"}
    per_block = take_b[(np.arange(rows)[:, None] * nb + np.arange(nb)) // SUPER]   # (rows, nb)
    parts["qs"] = np.where(per_block[:, None, :], b.parts["qs"], a.parts["qs"])
    return QTensor(a.format, a.shape, parts)
