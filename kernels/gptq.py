"""GPTQ rounding: the codes of a fixed grid chosen so that the errors cancel in the output.

The searched quantizer (quantizer.py) fits each block's grid and rounds every weight to its
nearest point, weighting weight i by E[a_i^2]: it treats input channels as uncorrelated. They
are not. The error of y = W a for one row w is e = sum_i dw_i a_i, and

    E[e^2] = dw^T H dw,    H = E[a a^T]   (the input covariance, tinyllm imatrix --covariance)

GPTQ (Frantar et al., 2022, after Optimal Brain Surgeon) rounds the columns one at a time and
moves each column's rounding error onto the columns not yet rounded, in proportion to how the
inputs co-vary, so that later roundings compensate it: with U the upper Cholesky factor of
H^-1, rounding column j to q_j costs err_j = (w_j - q_j) / U_jj and updates
w_k -= err_j U_jk for k > j. Here the grid itself (every block's scale and minimum, and for
the K formats the super-block's) is the searched one and stays fixed; only the integer codes
change, so the result is the same format, read by every backend and exported to GGUF as is.

Columns are processed in blocks of BLOCK (the update inside a block column by column, the rest
of the matrix once per block by one matrix product), as the paper's lazy batch updates do.
Each row keeps the GPTQ codes only where they lower its output error dw^T H dw below the
searched rounding's (rows are independent given the grid), so the result is never worse in
that measure.
"""
from __future__ import annotations

import numpy as np

from tinyllm.kernels.quant import QTensor, _pack_nibbles, _unpack_nibbles, pack_q6, unpack_q6

TOP_CODE = {"q4_0": 15, "q4_1": 15, "q4_k": 15, "q6_k": 63}   # codes 0..top; value = step * code - offset
GPTQ_FORMATS = tuple(TOP_CODE)
BLOCK = 128
DAMP = 0.1   # x mean(diag H), added to H; stories260K q4_k KLD: damp 0.01 -> 0.0483, 0.1 -> 0.0477, 1 -> 0.0493


def codes(t: QTensor) -> np.ndarray:
    """The integer codes of an encoding: (rows, nb, 32) uint8, padding included."""
    qs = np.asarray(t.parts["qs"])
    return unpack_q6(qs) if t.format == "q6_k" else _unpack_nibbles(qs)


def with_codes(t: QTensor, q: np.ndarray) -> QTensor:
    """Encoding t with its grid (every scale part) kept and its codes replaced by q (rows, nb, 32)."""
    q = np.asarray(q, np.uint8)
    return QTensor(t.format, t.shape, {**t.parts, "qs": pack_q6(q) if t.format == "q6_k" else _pack_nibbles(q)})


def grid_of(t: QTensor) -> tuple[np.ndarray, np.ndarray]:
    """Every weight's grid step and offset (rows, cols): value = step * code - offset, read off
    the format's own dequantizer at codes 0 and 1 (no per-format arithmetic to keep in step)."""
    zero = np.zeros_like(codes(t))
    v0, v1 = with_codes(t, zero).dequantize(), with_codes(t, zero + 1).dequantize()
    return (v1 - v0).astype(np.float64), -v0.astype(np.float64)


def upper_inverse_factor(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """U, upper triangular with U^T U = (H + damp mean(diag H) I)^-1; channels never active
    (a zero diagonal) get a unit diagonal: their weights cost nothing and carry no error on."""
    h = np.array(h, np.float64)
    dead = np.diag(h) <= 0
    h[dead, :], h[:, dead] = 0, 0
    h[dead, dead] = 1
    mean = float(np.mean(np.diag(h)))
    for extra in (damp, 10 * damp, 100 * damp):   # a badly conditioned H gets more damping
        try:
            inv = np.linalg.inv(h + extra * mean * np.eye(len(h)))
            return np.linalg.cholesky((inv + inv.T) / 2).T
        except np.linalg.LinAlgError:
            continue
    raise ValueError("the covariance is not positive definite even with damping (NaN in the calibration run?)")


def output_error(w: np.ndarray, value: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Per row, dw^T H dw: the expected squared error of that output under inputs of covariance H."""
    d = np.asarray(w, np.float64) - np.asarray(value, np.float64)
    return np.einsum("ij,jk,ik->i", d, h, d)


def gptq(w: np.ndarray, h: np.ndarray, grid: QTensor, damp: float = DAMP) -> QTensor:
    """Matrix w (rows, cols) in grid's format and grid, its codes chosen by GPTQ against the
    input covariance h (cols, cols)."""
    rows, cols = w.shape
    if np.shape(h) != (cols, cols):
        raise ValueError(f"covariance has shape {np.shape(h)}, expected ({cols}, {cols})")
    top = TOP_CODE[grid.format]
    step, offset = grid_of(grid)
    u = upper_inverse_factor(h, damp)
    work = np.array(w, np.float64)
    chosen = np.zeros((rows, cols), np.float64)
    for start in range(0, cols, BLOCK):
        end = min(start + BLOCK, cols)
        errors = np.zeros((rows, end - start))
        for j in range(start, end):
            s = step[:, j]
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.where(s != 0, np.clip(np.rint((work[:, j] + offset[:, j]) / s), 0, top), 0)
            chosen[:, j] = q
            err = (work[:, j] - (s * q - offset[:, j])) / u[j, j]
            work[:, j + 1:end] -= np.outer(err, u[j, j + 1:end])
            errors[:, j - start] = err
        work[:, end:] -= errors @ u[start:end, end:]
    q = codes(grid).copy()
    q.reshape(rows, -1)[:, :cols] = chosen.astype(np.uint8)
    result = with_codes(grid, q)
    worse = output_error(w, result.dequantize(), h) > output_error(w, grid.dequantize(), h)
    if worse.any():
        q[worse] = codes(grid)[worse]
        result = with_codes(grid, q)
    return result
