"""LLaMA checkpoints -> tinyllm tensors: Hugging Face (``tensor_plan``) and GGUF (``GGUF``).

Hugging Face LLaMA weights already use the rotate-half RoPE pairing tinyllm's kernel uses;
llama.cpp's converter permutes q/k rows to adjacent pairs, which the GGUF plan undoes.
"""
from __future__ import annotations

import numpy as np

from tinyllm.arch.common import rope_inv_freq
from tinyllm.converters.gguf_arch import GGUFArch, clean_float
from tinyllm.converters.rows import rotate_half_from_pairs, taking
from tinyllm.errors import UnsupportedError

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


class GGUF(GGUFArch):
    """LLaMA family (LLaMA 1/2/3, Mistral, SmolLM, TinyLlama, ...): llama.cpp arch "llama"."""

    arch = "llama"
    KNOWN_KEYS = {
        "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
        "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
        "attention.key_length", "attention.value_length", "rope.dimension_count", "rope.freq_base",
        "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
        "rope.scaling.finetuned", "expert_count", "expert_used_count", "tensor_data_layout",
    }
    LAYER_TENSORS = {
        "attn_norm.weight": "attention_norm",
        "attn_q.weight": "attention.wq",
        "attn_k.weight": "attention.wk",
        "attn_v.weight": "attention.wv",
        "attn_output.weight": "attention.wo",
        "ffn_norm.weight": "ffn_norm",
        "ffn_gate.weight": "feed_forward.w1",
        "ffn_down.weight": "feed_forward.w2",
        "ffn_up.weight": "feed_forward.w3",
    }
    EXTRA_TENSORS = {"rope_freqs.weight"}

    @classmethod
    def hf_config(cls, get, tensors: dict) -> dict:
        if get("expert_count", 0):
            raise UnsupportedError(f"mixture-of-experts GGUF ({get('expert_count')} experts) is not supported")
        hidden, heads = get("embedding_length"), get("attention.head_count")
        head_dim = get("attention.key_length", hidden // heads)
        if get("attention.value_length", head_dim) != head_dim:
            raise UnsupportedError("GGUF llama with value_length != key_length is not supported")
        if get("rope.dimension_count", head_dim) != head_dim:
            raise UnsupportedError(f"GGUF llama with partial rotary ({get('rope.dimension_count')} of {head_dim} dims) "
                                   "is not supported")
        theta = clean_float(get("rope.freq_base", 10000.0))
        config = {
            "hidden_size": hidden,
            "intermediate_size": get("feed_forward_length"),
            "num_hidden_layers": get("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": get("attention.head_count_kv", heads),
            "head_dim": head_dim,
            "rms_norm_eps": clean_float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": theta,
            "rope_scaling": cls._rope_scaling(get, tensors, head_dim, theta),
            "max_position_embeddings": get("context_length", 2048),
            "vocab_size": get("vocab_size", None) or tensors["token_embd.weight"].shape[0],
            "tie_word_embeddings": "output.weight" not in tensors,
        }
        return config

    @staticmethod
    def _rope_scaling(get, tensors, head_dim: int, theta: float) -> dict | None:
        kind = get("rope.scaling.type", "none")
        if kind == "linear":
            scaling = {"rope_type": "linear", "factor": clean_float(get("rope.scaling.factor"))}
        elif kind == "none":
            scaling = None
        else:
            raise UnsupportedError(f"GGUF rope scaling type {kind!r} is not supported (tinyllm implements linear "
                                   "and Llama 3's rope_freqs)")
        if "rope_freqs.weight" not in tensors:
            return scaling
        # Llama 3.1+: llama.cpp stores the per-frequency divisors as a tensor instead of the
        # scaling parameters. Recognize Llama 3's rule (low/high frequency factors 1 and 4) so
        # the runtime recomputes the same frequencies; refuse divisors of any other shape.
        divisors = tensors["rope_freqs.weight"].decode().reshape(-1)
        if scaling is not None or divisors.shape != (head_dim // 2,):
            raise UnsupportedError("GGUF rope_freqs tensor combined with other rope scaling is not supported")
        llama3 = {"rope_type": "llama3", "factor": clean_float(divisors.max()), "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0,
                  "original_max_position_embeddings": get("rope.scaling.original_context_length", 8192)}
        want = rope_inv_freq(head_dim, theta) / divisors
        if not np.allclose(rope_inv_freq(head_dim, theta, llama3), want, rtol=1e-5, atol=0):
            raise UnsupportedError("GGUF rope_freqs tensor does not follow Llama 3's frequency rule; "
                                   "such rope scaling is not supported")
        return llama3

    @classmethod
    def plan(cls, cfg) -> list:
        H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        fix = {"attention.wq": taking(rotate_half_from_pairs(H, cfg.head_dim)),
               "attention.wk": taking(rotate_half_from_pairs(Hkv, cfg.head_dim))}
        plan = [("tok_embeddings", "token_embd.weight", None)]
        for i in range(cfg.num_hidden_layers):
            plan += [(f"layers.{i}.{ours}", f"blk.{i}.{g}", fix.get(ours)) for g, ours in cls.LAYER_TENSORS.items()]
        plan.append(("norm", "output_norm.weight", None))
        if not cfg.tie_word_embeddings:
            plan.append(("output", "output.weight", None))
        return plan
