"""The KV cache: what a model has seen, position by position.

It holds the token ids it has keys and values for (``tokens``) and, per layer, the backend's
own storage of those keys and values (``cache[layer]``, written by ``ops.kv_write`` at a
position, read by ``ops.attention``). One rule decides what of it a new token sequence can
reuse, here and nowhere else: the longest common prefix, except the sequence's last token,
which is always computed again because its logits are what the caller wants.
"""
from __future__ import annotations


def reusable_prefix(cached: list[int], tokens: list[int]) -> int:
    """How many leading tokens of ``tokens`` a cache holding ``cached`` already has computed
    (the last token never counts: it is recomputed for its logits)."""
    keep = 0
    for a, b in zip(cached, tokens[:-1]):
        if a != b:
            break
        keep += 1
    return keep


class KVCache:
    """``n_ctx`` positions of keys and values for every layer, allocated once by the backend."""

    def __init__(self, ops, n_layers: int, n_kv_heads: int, n_ctx: int, head_dim: int):
        self.n_ctx = n_ctx
        self.layers = ops.new_kv_cache(n_layers, n_kv_heads, n_ctx, head_dim)  # per layer: (k, v) storage
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
