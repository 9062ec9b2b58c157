"""Falcon checkpoints -> tinyllm tensors: Hugging Face (``tensor_plan``) and GGUF (``GGUF``).

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

from tinyllm.converters.gguf_arch import GGUFArch, clean_float
from tinyllm.converters.rows import stacked, taking
from tinyllm.errors import UnsupportedError

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

    row = np.arange(int(np.prod(layout))).reshape(layout)       # fused row index, by layout position
    rows = [np.ascontiguousarray(row[:, part]).reshape(-1) for part in parts]
    return dict(zip(("attention.wq", "attention.wk", "attention.wv"), map(taking, rows)))


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


class GGUF(GGUFArch):
    """Falcon 7B/40B/180B-style: llama.cpp arch "falcon". llama.cpp's converter regroups the
    fused query_key_value rows as all query heads, then all key heads, then all value heads,
    and keeps Hugging Face's rotate-half RoPE: so q, k, v are three row ranges here."""

    arch = "falcon"
    KNOWN_KEYS = {"context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
                  "attention.head_count", "attention.head_count_kv", "attention.layer_norm_epsilon",
                  "rope.freq_base", "rope.dimension_count", "tensor_data_layout"}

    @classmethod
    def hf_config(cls, get, tensors: dict) -> dict:
        if get("tensor_data_layout", "jploski") != "jploski":
            raise UnsupportedError(f"GGUF falcon tensor_data_layout {get('tensor_data_layout')!r} is not supported "
                                   "(tinyllm reads llama.cpp's 'jploski' query/key/value grouping)")
        hidden, heads = get("embedding_length"), get("attention.head_count")
        kv_heads = get("attention.head_count_kv", 1)
        if get("rope.dimension_count", hidden // heads) != hidden // heads:
            raise UnsupportedError("GGUF falcon with partial rotary is not supported")
        two_norms = "blk.0.attn_norm_2.weight" in tensors
        config = {"hidden_size": hidden, "num_hidden_layers": get("block_count"), "num_attention_heads": heads,
                  "vocab_size": get("vocab_size", None) or tensors["token_embd.weight"].shape[0],
                  # llama.cpp writes feed_forward_length = 4 * hidden whatever the model has
                  "ffn_hidden_size": (tensors["blk.0.ffn_up.weight"].shape[0] if "blk.0.ffn_up.weight" in tensors
                                      else get("feed_forward_length", 4 * hidden)),
                  "layer_norm_epsilon": clean_float(get("attention.layer_norm_epsilon", 1e-5)),
                  "max_position_embeddings": get("context_length", 2048),
                  "rope_theta": clean_float(get("rope.freq_base", 10000.0)),
                  "tie_word_embeddings": "output.weight" not in tensors, "bias": False, "alibi": False,
                  "parallel_attn": True}
        if kv_heads == 1 and not two_norms:  # Falcon-7B: one shared LayerNorm, one kv head
            config.update(multi_query=True, new_decoder_architecture=False)
        else:                                # Falcon-40B/180B (two LayerNorms), Falcon2-11B (one)
            config.update(new_decoder_architecture=True, num_kv_heads=kv_heads,
                          num_ln_in_parallel_attn=2 if two_norms else 1)
        return config

    @classmethod
    def plan(cls, cfg) -> list:
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        split = dict(zip(("attention.wq", "attention.wk", "attention.wv"), map(taking, stacked(q, kv, kv))))
        norms = [("attn_norm", "attention_norm")] + ([("attn_norm_2", "ffn_norm")] if cfg.norms_per_layer == 2 else [])
        plan = [("tok_embeddings", "token_embd.weight", None)]
        for i in range(cfg.num_hidden_layers):
            b, o = f"blk.{i}.", f"layers.{i}."
            for g, ours in norms:
                plan += [(o + ours, b + g + ".weight", None), (o + ours + "_bias", b + g + ".bias", None)]
            plan += [(o + ours, b + "attn_qkv.weight", fn) for ours, fn in split.items()]
            plan += [(o + "attention.wo", b + "attn_output.weight", None),
                     (o + "feed_forward.w1", b + "ffn_up.weight", None),
                     (o + "feed_forward.w2", b + "ffn_down.weight", None)]
        plan += [("norm", "output_norm.weight", None), ("norm_bias", "output_norm.bias", None)]
        if not cfg.tie_word_embeddings:
            plan.append(("output", "output.weight", None))
        return plan
