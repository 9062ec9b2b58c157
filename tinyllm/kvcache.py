"""The KV cache: what a model has seen, position by position.

It holds the token ids it has keys and values for (``tokens``) and, per layer, the backend's
own storage of those keys and values (``cache[layer]``, written by ``ops.kv_write`` at a
position, read by ``ops.attention``). One rule decides what of it a new token sequence can
reuse, here and nowhere else: the longest common prefix, except the sequence's last token,
which is always computed again because its logits are what the caller wants.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinyllm.kernels.backend import DEFAULT_CACHE_TYPE, cache_dtype


def reusable_prefix(cached: list[int], tokens: list[int]) -> int:
    """How many leading tokens of ``tokens`` a cache holding ``cached`` already has computed
    (the last token never counts: it is recomputed for its logits)."""
    keep = 0
    for a, b in zip(cached, tokens[:-1]):
        if a != b:
            break
        keep += 1
    return keep


def kv_cache_bytes(cfg, n_ctx: int, cache_type: str = DEFAULT_CACHE_TYPE) -> int:
    """Host memory of one sequence's KV cache: keys and values, every layer, n_ctx positions."""
    item = np.dtype(cache_dtype(cache_type)).itemsize
    return 2 * item * cfg.num_hidden_layers * cfg.n_kv_heads * cfg.head_dim * n_ctx


class KVCache:
    """``n_ctx`` positions of keys and values for every layer, allocated once by the backend."""

    def __init__(self, ops, n_layers: int, n_kv_heads: int, n_ctx: int, head_dim: int,
                 cache_type: str = DEFAULT_CACHE_TYPE):
        self.n_ctx = n_ctx
        self.cache_type = cache_type
        self.layers = ops.new_kv_cache(n_layers, n_kv_heads, n_ctx, head_dim, cache_type)  # per layer: (k, v) storage
        self.tokens: list[int] = []  # the ids whose keys and values positions 0.. hold

    def __getitem__(self, layer: int):
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.tokens)

    def reusable(self, tokens: list[int]) -> int:
        """How many leading tokens of ``tokens`` need not be computed again."""
        return reusable_prefix(self.tokens, tokens)

    def trim(self, n: int) -> None:
        """Forget every position from ``n`` on (before overwriting them: an interrupted forward
        then leaves a cache that claims only what it really holds)."""
        del self.tokens[n:]

    def clear(self) -> None:
        self.tokens = []


@dataclass(frozen=True)
class Segment:
    """One sequence's run of rows in a forward: positions start .. start+length-1 of ``cache``."""

    cache: KVCache
    start: int
    length: int


class Batch:
    """Which sequence, and which position in it, each row of one forward pass belongs to.

    The rows are consecutive runs (``segments``), one per sequence, each with its own KV
    cache: a single prompt is one segment; a step of batched decoding is one row per running
    sequence, plus a chunk of a newcomer's prompt. Everything per token (matmuls, norms, the
    MLP) runs once over all rows; only attention is per sequence, here.
    """

    def __init__(self, segments: list[Segment]):
        self.segments = [s for s in segments if s.length > 0]
        if not self.segments:
            raise ValueError("a batch needs at least one row")
        runs = [np.arange(s.start, s.start + s.length) for s in self.segments]
        self.positions = runs[0] if len(runs) == 1 else np.concatenate(runs)        # (T,)
        self.ends = np.cumsum([s.length for s in self.segments])                   # row after each segment

    @classmethod
    def single(cls, cache: KVCache, start_pos: int, length: int) -> "Batch":
        return cls([Segment(cache, start_pos, length)])

    def __len__(self) -> int:
        return int(self.ends[-1])

    def attend(self, ops, layer: int, q, k, v, n_heads: int, scale: float, alibi_slopes=None):
        """Write each segment's keys and values (T, Hkv*hd) at its positions in its cache, then
        causal attention of its queries (T, H*hd) over that cache -> (T, H*hd)."""
        if len(self.segments) == 1:
            s = self.segments[0]
            ops.kv_write(s.cache[layer], k, v, s.start)
            return ops.attention(q, s.cache[layer], s.start, n_heads, scale, alibi_slopes)
        out, r = [], 0
        for s in self.segments:
            rows = slice(r, r + s.length)
            ops.kv_write(s.cache[layer], k[rows], v[rows], s.start)
            out.append(ops.attention(q[rows], s.cache[layer], s.start, n_heads, scale, alibi_slopes))
            r += s.length
        return ops.concat_rows(out)

    def last_rows(self, ops, x):
        """(T, F) -> (segments, F): each segment's last row (the one whose logits are wanted)."""
        if len(self.segments) == 1:
            return x[len(self) - 1:]
        if len(self.segments) == len(self):
            return x
        return ops.concat_rows([x[e - 1:e] for e in self.ends])
