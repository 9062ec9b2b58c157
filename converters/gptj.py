"""GPT-J checkpoints -> tinyllm tensors: Hugging Face (``tensor_plan``) and GGUF (``GGUF``).

GPT-J's rotary embedding rotates adjacent pairs (x[2i], x[2i+1]) of the first rotary_dim
dims of each head; tinyllm's RoPE rotates (x[i], x[i + rotary_dim/2]). Reordering the rows
of Wq and Wk within each head's rotary dims to [0, 2, 4, ..., 1, 3, 5, ...] makes the two
identical (rows.pairs_to_rotate_half), in both plans. Wv and everything after attention are
untouched.
"""
from __future__ import annotations

from tinyllm.converters.gguf_arch import GGUFArch, clean_float
from tinyllm.converters.rows import pairs_to_rotate_half, taking
from tinyllm.errors import UnsupportedError

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


def tensor_plan(cfg):
    """[(tinyllm name, hf name, transform or None)] in file order."""
    permute = taking(pairs_to_rotate_half(cfg.n_head, cfg.head_dim, cfg.rotary_dim))
    plan = [("tok_embeddings", "transformer.wte.weight", None)]
    for i in range(cfg.n_layer):
        plan += [(f"layers.{i}.{ours}", f"transformer.h.{i}.{hf}", permute if ours in ROTARY else None)
                 for hf, ours in LAYER_TENSORS.items()]
    plan += [("norm", "transformer.ln_f.weight", None), ("norm_bias", "transformer.ln_f.bias", None)]
    if not cfg.tie_word_embeddings:
        plan.append(("output", "lm_head.weight", None))
    plan.append(("output_bias", "lm_head.bias", None))
    return plan


class GGUF(GGUFArch):
    """GPT-J: arch "gptj" as convert_hf_to_gguf.py's GPTJModel writes it: the Hugging Face
    tensors renamed (biases included), q/k rows untouched. GPT-J rotates adjacent pairs, so
    the Hugging Face converter's row reordering (converters/gptj.py) applies here too."""

    arch = "gptj"
    KNOWN_KEYS = {"context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
                  "attention.head_count", "attention.layer_norm_epsilon", "rope.dimension_count", "rope.freq_base"}
    LAYER_TENSORS = {"attn_norm.weight": "attention_norm", "attn_norm.bias": "attention_norm_bias",
                     "attn_q.weight": "attention.wq", "attn_k.weight": "attention.wk", "attn_v.weight": "attention.wv",
                     "attn_output.weight": "attention.wo", "ffn_up.weight": "feed_forward.w1",
                     "ffn_up.bias": "feed_forward.w1_bias", "ffn_down.weight": "feed_forward.w2",
                     "ffn_down.bias": "feed_forward.w2_bias"}

    @classmethod
    def hf_config(cls, get, tensors: dict) -> dict:
        d, heads = get("embedding_length"), get("attention.head_count")
        if clean_float(get("rope.freq_base", 10000.0)) != 10000.0:
            raise UnsupportedError(f"GGUF gptj rope.freq_base={get('rope.freq_base')} is not supported "
                                   "(GPT-J uses 10000)")
        return {"n_embd": d, "n_layer": get("block_count"), "n_head": heads,
                "vocab_size": get("vocab_size", None) or tensors["token_embd.weight"].shape[0],
                "rotary_dim": get("rope.dimension_count", d // heads),
                "n_inner": (tensors["blk.0.ffn_up.weight"].shape[0] if "blk.0.ffn_up.weight" in tensors
                            else get("feed_forward_length", 4 * d)),
                "n_positions": get("context_length", 2048),
                "layer_norm_epsilon": clean_float(get("attention.layer_norm_epsilon", 1e-5)),
                "tie_word_embeddings": "output.weight" not in tensors}

    @classmethod
    def plan(cls, cfg) -> list:
        order = taking(pairs_to_rotate_half(cfg.n_head, cfg.head_dim, cfg.rotary_dim))
        fix = {"attention.wq": order, "attention.wk": order}
        plan = [("tok_embeddings", "token_embd.weight", None)]
        for i in range(cfg.n_layer):
            plan += [(f"layers.{i}.{ours}", f"blk.{i}.{g}", fix.get(ours)) for g, ours in cls.LAYER_TENSORS.items()]
        plan += [("norm", "output_norm.weight", None), ("norm_bias", "output_norm.bias", None)]
        if not cfg.tie_word_embeddings:
            plan.append(("output", "output.weight", None))
        return plan + [("output_bias", "output.bias", None)]
