"""Falcon checkpoint -> tinyllm tensor names.

query_key_value fuses Wq, Wk, Wv with a different row layout in each family (rows are
output features, head_dim rows per head):

    new_decoder_architecture  (num_kv_heads, H/num_kv_heads + 2, head_dim): per kv group,
                              its query heads, then its key, then its value
    multi_query               (H + 2, head_dim): all query heads, one key, one value
    neither (multi-head)      (H, 3, head_dim): per head, its query, key, value

Splitting by that layout gives query head h = group * (H/num_kv_heads) + j reading kv head
``group``, which is tinyllm's grouped-query convention (h // (H / n_kv)).
"""
from __future__ import annotations

import numpy as np

IGNORED = (r"\.rotary_emb\.inv_freq$",)  # a buffer some checkpoints saved; recomputed at load


def qkv_splits(cfg) -> dict:
    """tinyllm name -> function taking query_key_value's weight (rows, D) or bias (rows,)."""
    H, hd = cfg.num_attention_heads, cfg.head_dim
    if cfg.new_decoder_architecture:
        layout, parts = (cfg.num_kv_heads, H // cfg.num_kv_heads + 2, hd), (slice(0, -2), -2, -1)
    elif cfg.multi_query:  # the new layout with a single kv group
        layout, parts = (1, H + 2, hd), (slice(0, -2), -2, -1)
    else:
        layout, parts = (H, 3, hd), (0, 1, 2)

    def take(part):
        def split(w: np.ndarray) -> np.ndarray:
            picked = w.reshape(layout + w.shape[1:])[:, part]   # (groups, [heads,] hd, ...)
            return np.ascontiguousarray(picked).reshape((-1,) + w.shape[1:])
        return split

    return dict(zip(("attention.wq", "attention.wk", "attention.wv"), map(take, parts)))


def tensor_plan(cfg):
    """[(tinyllm name, hf name, transform or None)] in file order."""
    suffixes = [("", "weight")] + ([("_bias", "bias")] if cfg.bias else [])
    norm_suffixes = [("", "weight"), ("_bias", "bias")]
    if cfg.new_decoder_architecture and cfg.num_ln_in_parallel_attn == 2:
        norms = {"ln_attn": "attention_norm", "ln_mlp": "ffn_norm"}
    elif not cfg.parallel:
        norms = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    else:
        norms = {"input_layernorm": "attention_norm"}
    linears = {"self_attention.dense": "attention.wo", "mlp.dense_h_to_4h": "feed_forward.w1",
               "mlp.dense_4h_to_h": "feed_forward.w2"}

    plan = [("tok_embeddings", "transformer.word_embeddings.weight", None)]
    for i in range(cfg.num_hidden_layers):
        hf, ours = f"transformer.h.{i}.", f"layers.{i}."
        plan += [(ours + name + s, hf + f"{ln}.{kind}", None)
                 for ln, name in norms.items() for s, kind in norm_suffixes]
        plan += [(ours + name + s, hf + f"self_attention.query_key_value.{kind}", split)
                 for name, split in qkv_splits(cfg).items() for s, kind in suffixes]
        plan += [(ours + name + s, hf + f"{lin}.{kind}", None) for lin, name in linears.items() for s, kind in suffixes]
    plan += [("norm", "transformer.ln_f.weight", None), ("norm_bias", "transformer.ln_f.bias", None)]
    if not cfg.tie_word_embeddings:
        plan.append(("output", "lm_head.weight", None))
    return plan
