"""MPT checkpoints -> tinyllm tensors: Hugging Face (``tensor_plan``) and GGUF (``GGUF``).

The fused attention projection Wqkv (rows: d_model query | kv_n_heads*head_dim key |
kv_n_heads*head_dim value, as MosaicML's GroupedQueryAttention splits it) becomes three
matrices. Clipping q, k and v separately equals clipping the fused output.
"""
from __future__ import annotations

from tinyllm.converters.gguf_arch import GGUFArch, clean_float
from tinyllm.converters.rows import stacked, taking

# per-layer tensors besides Wqkv: Hugging Face name -> tinyllm name
LAYER_TENSORS = {
    "norm_1.weight": "attention_norm",
    "attn.out_proj.weight": "attention.wo",
    "norm_2.weight": "ffn_norm",
    "ffn.up_proj.weight": "feed_forward.w1",
    "ffn.down_proj.weight": "feed_forward.w2",
}
IGNORED = ()


def qkv_rows(cfg) -> dict:
    """tinyllm name -> row slice of Wqkv."""
    kv = cfg.kv_n_heads * cfg.head_dim
    return dict(zip(("attention.wq", "attention.wk", "attention.wv"), stacked(cfg.d_model, kv, kv)))


def tensor_plan(cfg):
    """[(tinyllm name, hf name, transform or None)] in file order."""
    plan = [("tok_embeddings", "transformer.wte.weight", None)]
    for i in range(cfg.n_layers):
        hf = f"transformer.blocks.{i}."
        plan += [(f"layers.{i}.{ours}", hf + "attn.Wqkv.weight", taking(rows))
                 for ours, rows in qkv_rows(cfg).items()]
        plan += [(f"layers.{i}.{ours}", hf + name, None) for name, ours in LAYER_TENSORS.items()]
    plan.append(("norm", "transformer.norm_f.weight", None))
    if not cfg.tie_word_embeddings:
        plan.append(("output", "lm_head.weight", None))
    return plan


class GGUF(GGUFArch):
    """MPT: llama.cpp arch "mpt". The fused Wqkv keeps MosaicML's q | k | v row order."""

    arch = "mpt"
    KNOWN_KEYS = {"context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
                  "attention.head_count", "attention.head_count_kv", "attention.layer_norm_epsilon",
                  "attention.clamp_kqv", "attention.max_alibi_bias"}

    @classmethod
    def hf_config(cls, get, tensors: dict) -> dict:
        d, heads = get("embedding_length"), get("attention.head_count")
        kv_heads = get("attention.head_count_kv", heads)
        alibi_max = get("attention.max_alibi_bias", 8.0)
        attn = {"alibi": alibi_max > 0, "alibi_bias_max": clean_float(alibi_max), "clip_qkv": None,
                "attn_type": "multihead_attention" if kv_heads == heads else "grouped_query_attention",
                "kv_n_heads": kv_heads}
        if get("attention.clamp_kqv", None) is not None:
            attn["clip_qkv"] = clean_float(get("attention.clamp_kqv"))
        return {"d_model": d, "n_heads": heads, "n_layers": get("block_count"),
                "vocab_size": get("vocab_size", None) or tensors["token_embd.weight"].shape[0],
                "max_seq_len": get("context_length", 2048),
                "layer_norm_epsilon": clean_float(get("attention.layer_norm_epsilon", 1e-5)),
                "expansion_ratio": get("feed_forward_length", 4 * d) / d,
                "tie_word_embeddings": "output.weight" not in tensors, "attn_config": attn}

    @classmethod
    def plan(cls, cfg) -> list:
        q, kv = cfg.d_model, cfg.kv_n_heads * cfg.head_dim
        split = dict(zip(("attention.wq", "attention.wk", "attention.wv"), map(taking, stacked(q, kv, kv))))
        plan = [("tok_embeddings", "token_embd.weight", None)]
        for i in range(cfg.n_layers):
            b, o = f"blk.{i}.", f"layers.{i}."
            plan += [(o + "attention_norm", b + "attn_norm.weight", None)]
            plan += [(o + ours, b + "attn_qkv.weight", fn) for ours, fn in split.items()]
            plan += [(o + "attention.wo", b + "attn_output.weight", None),
                     (o + "ffn_norm", b + "ffn_norm.weight", None),
                     (o + "feed_forward.w1", b + "ffn_up.weight", None),
                     (o + "feed_forward.w2", b + "ffn_down.weight", None)]
        plan.append(("norm", "output_norm.weight", None))
        if not cfg.tie_word_embeddings:
            plan.append(("output", "output.weight", None))
        return plan
