"""MPT (MosaicML, 2023): a pre-norm decoder with bias-free LayerNorms and linears, ALiBi
instead of position embeddings, optional clipping of q/k/v, and an exact-GELU MLP.

    x = embed(tokens)
    for each layer:
        x = x + Wo · Attention(clip(Wq·h), clip(Wk·h), clip(Wv·h), ALiBi)   where h = LayerNorm(x)
        x = x + W2 · GELU(W1·h)                                           where h = LayerNorm(x)
    logits = Wout · LayerNorm(x)

The checkpoint's fused Wqkv is split into Wq | Wk | Wv at conversion. Semantics follow
MosaicML's modeling_mpt.py (which trained the checkpoints) where transformers' MptForCausalLM
supports less: grouped/multi-query attention (kv_n_heads) and alibi_bias_max are honoured.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tinyllm.arch.common import METADATA_KEYS, alibi_slopes, check_config, config_from_hf, lm_head, require, weight_set
from tinyllm.errors import UnsupportedError
from tinyllm.kernels.backend import Backend
from tinyllm.kvcache import Batch

ARCH = "mpt"
HF_CLASSES = ("MptForCausalLM", "MPTForCausalLM")  # config.json "architectures" names

# Nested config dicts are flattened to "attn_config.<key>" so every option is checked by name.
NESTED = ("attn_config", "ffn_config")
KNOWN = {
    "d_model": "d_model", "n_heads": "n_heads", "n_layers": "n_layers", "vocab_size": "vocab_size",
    "max_seq_len": "max_seq_len", "layer_norm_epsilon": "layer_norm_epsilon",
    "tie_word_embeddings": "tie_word_embeddings",
    "attn_config.clip_qkv": "clip_qkv", "attn_config.softmax_scale": "softmax_scale",
    "attn_config.alibi_bias_max": "alibi_bias_max", "attn_config.kv_n_heads": None,  # resolved in from_hf
    "attn_config.attn_type": None,
    # Understood and without effect on inference: implementation choices (same math),
    # training-only settings, and learned_pos_emb, which MPT itself turns off when alibi is on.
    "attn_config.attn_impl": None, "attn_config.attn_pdrop": None, "attn_config.attn_uses_sequence_id": None,
    "attn_config.rope_theta": None, "attn_config.rope_impl": None, "attn_config.rope_dail_config": None,
    "attn_config.rope_hf_config": None, "attn_config.flash_attn_version": None,
    "learned_pos_emb": None, "init_device": None, "init_config": None, "embedding_fraction": None,
    "emb_pdrop": None, "verbose": None, "tokenizer_name": None, "name": None, "loss_fn": None,
}
MUST_EQUAL = {
    "expansion_ratio": 4, "no_bias": True, "logit_scale": None,
    "norm_type": ("low_precision_layernorm", "layernorm"), "fc_type": "torch",
    "ffn_config.ffn_type": "mptmlp", "ffn_config.fc_type": "torch",
    "attn_config.attn_type": ("multihead_attention", "multiquery_attention", "grouped_query_attention"),
    "attn_config.alibi": True, "attn_config.qk_ln": False, "attn_config.qk_gn": False,
    "attn_config.prefix_lm": False, "attn_config.rope": False, "attn_config.sliding_window_size": -1,
    "attn_config.fused_qkv": True,
}


@dataclass
class Config:
    d_model: int
    n_heads: int
    n_layers: int
    vocab_size: int
    kv_n_heads: int | None = None              # None: multi-head attention
    max_seq_len: int = 2048
    layer_norm_epsilon: float = 1e-5
    clip_qkv: float | None = None
    softmax_scale: float | None = None         # None: 1/sqrt(head_dim)
    alibi_bias_max: float = 8
    tie_word_embeddings: bool = True
    alibi_slopes: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        check_config(self)
        self.kv_n_heads = self.kv_n_heads or self.n_heads
        require(self.d_model % self.n_heads == 0, f"n_heads={self.n_heads} (must divide d_model={self.d_model})")
        require(self.n_heads % self.kv_n_heads == 0,
                f"attn_config.kv_n_heads={self.kv_n_heads} (must divide n_heads={self.n_heads})")
        self.softmax_scale = self.softmax_scale or self.head_dim ** -0.5
        self.alibi_slopes = alibi_slopes(self.n_heads, self.alibi_bias_max)

    @classmethod
    def from_hf(cls, config: dict) -> "Config":
        flat = {k: v for k, v in config.items() if k not in NESTED}
        for section in NESTED:
            for key, value in (config.get(section) or {}).items():
                if key not in METADATA_KEYS:  # transformers saves sub-configs with its own bookkeeping
                    flat[f"{section}.{key}"] = value
        clip = flat.get("attn_config.clip_qkv")
        if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
            raise UnsupportedError(f"unsupported config option attn_config.clip_qkv={clip!r} (must be > 0)")
        cfg = config_from_hf(cls, flat, KNOWN, MUST_EQUAL)
        attn_type = flat.get("attn_config.attn_type", "multihead_attention")
        cfg.kv_n_heads = {"multihead_attention": cfg.n_heads, "multiquery_attention": 1,
                          "grouped_query_attention": flat.get("attn_config.kv_n_heads", cfg.n_heads)}[attn_type]
        if cfg.kv_n_heads < 1 or cfg.n_heads % cfg.kv_n_heads:
            raise UnsupportedError(f"unsupported config option attn_config.kv_n_heads={cfg.kv_n_heads} "
                                   f"(must divide n_heads={cfg.n_heads})")
        return cfg

    hidden_size = property(lambda self: self.d_model)
    num_hidden_layers = property(lambda self: self.n_layers)
    num_attention_heads = property(lambda self: self.n_heads)
    n_kv_heads = property(lambda self: self.kv_n_heads)
    head_dim = property(lambda self: self.d_model // self.n_heads)
    context_length = property(lambda self: self.max_seq_len)


def weights(cfg: Config) -> dict:
    """The weight set: every tensor this config needs, name -> shape ((out, in) for matrices)."""
    D, V, kv = cfg.d_model, cfg.vocab_size, cfg.kv_n_heads * cfg.head_dim
    layer = {"attention_norm": (D,), "attention.wq": (D, D), "attention.wk": (kv, D), "attention.wv": (kv, D),
             "attention.wo": (D, D), "ffn_norm": (D,), "feed_forward.w1": (4 * D, D), "feed_forward.w2": (D, 4 * D)}
    top = {"tok_embeddings": (V, D), "norm": (D,), **({} if cfg.tie_word_embeddings else {"output": (V, D)})}
    return weight_set(cfg.n_layers, layer, top)


def forward(cfg: Config, w: dict, ops: Backend, batch: Batch, tokens: np.ndarray, last_only: bool = False,
            head=lm_head):
    """MPT's pre-norm blocks: LayerNorm, ALiBi attention (optionally clipped QKV), GELU MLP (ArchModule.forward)."""
    eps, H = cfg.layer_norm_epsilon, cfg.n_heads

    def clipped(y):
        return y if cfg.clip_qkv is None else ops.clip(y, cfg.clip_qkv)

    x = ops.embedding(w["tok_embeddings"], tokens)                                  # (T, D)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = ops.layernorm(x, w[p + "attention_norm"], None, eps)
        qkv = ops.matmuls(h, [w[p + "attention.wq"], w[p + "attention.wk"], w[p + "attention.wv"]])
        q, k, v = (clipped(y) for y in qkv)                                         # (T, H*hd), 2x (T, Hkv*hd)
        a = batch.attend(ops, i, q, k, v, H, cfg.softmax_scale, cfg.alibi_slopes)
        x = ops.add(x, ops.matmul(a, w[p + "attention.wo"]))

        h = ops.layernorm(x, w[p + "ffn_norm"], None, eps)
        up = ops.gelu(ops.matmul(h, w[p + "feed_forward.w1"]))                      # (T, 4D)
        x = ops.add(x, ops.matmul(up, w[p + "feed_forward.w2"]))                    # (T, D)
    if last_only:
        x = batch.last_rows(ops, x)
    return head(cfg, w, ops, ops.layernorm(x, w["norm"], None, eps))            # (T, vocab)


def describe(cfg: Config) -> dict:
    if cfg.kv_n_heads == cfg.n_heads:
        attention = "multi-head"
    elif cfg.kv_n_heads == 1:
        attention = f"multi-query ({cfg.n_heads} query heads, 1 kv head)"
    else:
        attention = f"grouped-query ({cfg.n_heads} query heads, {cfg.kv_n_heads} kv heads)"
    if cfg.softmax_scale != cfg.head_dim ** -0.5:
        attention += f", softmax scale {cfg.softmax_scale:g}"
    return {"attention": attention + (f", q/k/v clipped to ±{cfg.clip_qkv:g}" if cfg.clip_qkv else ""),
            "position": f"ALiBi (alibi_bias_max={cfg.alibi_bias_max:g})",
            "residual": "sequential",
            "norm": f"LayerNorm without bias, eps={cfg.layer_norm_epsilon:g}",
            "mlp": f"GELU (exact), {4 * cfg.d_model} hidden, no bias",
            "embeddings": "tied" if cfg.tie_word_embeddings else "untied"}
