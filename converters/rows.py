"""Row surgery, written once: the converters split fused matrices and reorder rows so the
runtime sees one layout. Every function here works alike on a float array (a Hugging Face
checkpoint's tensor) and on a QTensor (GGUF blocks, regrouped): rows are output features,
and quantization blocks run along rows, so taking rows is exact in every format."""
from __future__ import annotations

import numpy as np

from tinyllm.kernels.quant import QTensor


def take_rows(w, rows):
    """Rows ``rows`` (an index array, or a slice: then views, nothing copied) of a matrix or
    a 1-D bias."""
    if isinstance(w, QTensor):
        return w.take_rows(rows)
    return w[rows]


def taking(rows):
    """A plan transform that takes ``rows``."""
    return lambda w: take_rows(w, rows)


def stacked(*sizes: int) -> list[slice]:
    """Row ranges of matrices stacked on top of each other (a fused q | k | v)."""
    bounds = np.cumsum((0,) + sizes)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def rotate_half_from_pairs(n_heads: int, head_dim: int) -> np.ndarray:
    """Row order that turns q/k rows permuted to adjacent RoPE pairs (2i, 2i+1), as llama.cpp's
    converter writes LLaMA files, back into Hugging Face's rotate-half pairing (i, i + d/2) that
    tinyllm's RoPE uses: HF row (head, half, i) is GGUF row (head, i, half)."""
    return np.arange(n_heads * head_dim).reshape(n_heads, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)


def pairs_to_rotate_half(n_heads: int, head_dim: int, rotary_dim: int) -> np.ndarray:
    """Row order of GPT-J's Wq/Wk, whose RoPE rotates adjacent pairs of the first rotary_dim
    dims of each head: within each head, the even rotary dims first, then the odd ones, then
    the rest as they were. Each pair then meets the same frequency in tinyllm's rotate-half
    RoPE, and q.k is unchanged because q and k are permuted alike."""
    within = np.concatenate([np.arange(0, rotary_dim, 2), np.arange(1, rotary_dim, 2),
                             np.arange(rotary_dim, head_dim)])
    return (np.arange(n_heads)[:, None] * head_dim + within[None, :]).reshape(-1)
