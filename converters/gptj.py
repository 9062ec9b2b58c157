"""GPT-J checkpoint -> tinyllm tensor names.

GPT-J's rotary embedding rotates adjacent pairs (x[2i], x[2i+1]) of the first rotary_dim
dims of each head; tinyllm's RoPE rotates (x[i], x[i + rotary_dim/2]). Reordering the rows
of Wq and Wk within each head's rotary dims to [0, 2, 4, ..., 1, 3, 5, ...] makes the two
identical: each pair meets the same frequency, and q·k is unchanged because q and k are
permuted alike. Wv and everything after attention are untouched.
"""
from __future__ import annotations

import numpy as np

# per-layer tensors: Hugging Face name -> tinyllm name
LAYER_TENSORS = {
    "ln_1.weight": "attention_norm",
    "ln_1.bias": "attention_norm_bias",
    "attn.q_proj.weight": "attention.wq",
    "attn.k_proj.weight": "attention.wk",
    "attn.v_proj.weight": "attention.wv",
    "attn.out_proj.weight": "attention.wo",
    "mlp.fc_in.weight": "feed_forward.w1",
    "mlp.fc_in.bias": "feed_forward.w1_bias",
    "mlp.fc_out.weight": "feed_forward.w2",
    "mlp.fc_out.bias": "feed_forward.w2_bias",
}
ROTARY = ("attention.wq", "attention.wk")
# causal-mask buffers that older GPT-J checkpoints saved; the runtime builds its own mask
IGNORED = (r"\.attn\.(masked_)?bias$",)


def rotary_row_order(n_heads: int, head_dim: int, rotary_dim: int) -> np.ndarray:
    """Row permutation of Wq/Wk (n_heads * head_dim rows): within each head, the even
    rotary dims first, then the odd ones, then the non-rotary dims as they were."""
    within = np.concatenate([np.arange(0, rotary_dim, 2), np.arange(1, rotary_dim, 2),
                             np.arange(rotary_dim, head_dim)])
    return (np.arange(n_heads)[:, None] * head_dim + within[None, :]).reshape(-1)


def tensor_plan(cfg):
    """[(tinyllm name, hf name, transform or None)] in file order."""
    order = rotary_row_order(cfg.n_head, cfg.head_dim, cfg.rotary_dim)

    def permute(w):  # rows of an (n_embd, n_embd) matrix
        return w[order]

    plan = [("tok_embeddings", "transformer.wte.weight", None)]
    for i in range(cfg.n_layer):
        plan += [(f"layers.{i}.{ours}", f"transformer.h.{i}.{hf}", permute if ours in ROTARY else None)
                 for hf, ours in LAYER_TENSORS.items()]
    plan += [("norm", "transformer.ln_f.weight", None), ("norm_bias", "transformer.ln_f.bias", None)]
    if not cfg.tie_word_embeddings:
        plan.append(("output", "lm_head.weight", None))
    plan.append(("output_bias", "lm_head.bias", None))
    return plan
