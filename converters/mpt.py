"""MPT checkpoint -> tinyllm tensor names.

The fused attention projection Wqkv (rows: d_model query | kv_n_heads*head_dim key |
kv_n_heads*head_dim value, as MosaicML's GroupedQueryAttention splits it) becomes three
matrices. Clipping q, k and v separately equals clipping the fused output.
"""
from __future__ import annotations

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
    q, kv = cfg.d_model, cfg.kv_n_heads * cfg.head_dim
    return {"attention.wq": slice(0, q), "attention.wk": slice(q, q + kv), "attention.wv": slice(q + kv, q + 2 * kv)}


def tensor_plan(cfg):
    """[(tinyllm name, hf name, transform or None)] in file order."""
    plan = [("tok_embeddings", "transformer.wte.weight", None)]
    for i in range(cfg.n_layers):
        hf = f"transformer.blocks.{i}."
        plan += [(f"layers.{i}.{ours}", hf + "attn.Wqkv.weight", lambda w, rows=rows: w[rows])
                 for ours, rows in qkv_rows(cfg).items()]
        plan += [(f"layers.{i}.{ours}", hf + name, None) for name, ours in LAYER_TENSORS.items()]
    plan.append(("norm", "transformer.norm_f.weight", None))
    if not cfg.tie_word_embeddings:
        plan.append(("output", "lm_head.weight", None))
    return plan
