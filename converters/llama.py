"""LLaMA checkpoint -> tinyllm tensor names. Hugging Face LLaMA weights already use the
rotate-half RoPE pairing tinyllm's kernel uses, so no permutation is needed here."""
from __future__ import annotations

# per-layer tensors: Hugging Face name -> tinyllm name
LAYER_TENSORS = {
    "input_layernorm.weight": "attention_norm",
    "self_attn.q_proj.weight": "attention.wq",
    "self_attn.k_proj.weight": "attention.wk",
    "self_attn.v_proj.weight": "attention.wv",
    "self_attn.o_proj.weight": "attention.wo",
    "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "feed_forward.w1",
    "mlp.down_proj.weight": "feed_forward.w2",
    "mlp.up_proj.weight": "feed_forward.w3",
}
IGNORED = (r"\.rotary_emb\.inv_freq$",)  # buffers some checkpoints save; recomputed at load


def tensor_plan(cfg):
    """[(tinyllm name, hf name, transform or None)] in file order."""
    plan = [("tok_embeddings", "model.embed_tokens.weight", None)]
    for i in range(cfg.num_hidden_layers):
        plan += [(f"layers.{i}.{ours}", f"model.layers.{i}.{hf}", None) for hf, ours in LAYER_TENSORS.items()]
    plan.append(("norm", "model.norm.weight", None))
    if not cfg.tie_word_embeddings:
        plan.append(("output", "lm_head.weight", None))
    return plan
