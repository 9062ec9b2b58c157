"""LLaMA (Touvron et al., 2023): pre-norm decoder with RMSNorm, rotary positions,
grouped-query attention and a SwiGLU feed-forward block.

    x = embed(tokens)
    for each layer:
        x = x + Wo · Attention(RoPE(Wq·h), RoPE(Wk·h), Wv·h)   where h = RMSNorm(x)
        x = x + W2 · (SiLU(W1·h) ⊙ W3·h)                        where h = RMSNorm(x)
    logits = Wout · RMSNorm(x)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tinyllm.arch.common import check_config, config_from_hf, lm_head, require, rope_inv_freq, rope_settings, weight_set
from tinyllm.kernels.backend import Backend
from tinyllm.kvcache import Batch

ARCH = "llama"
HF_CLASSES = ("LlamaForCausalLM",)  # config.json "architectures" names


@dataclass
class Config:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None     # None: multi-head attention
    head_dim: int | None = None                # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None           # linear or llama3
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    inv_freq: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        check_config(self)
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        H, Hkv = self.num_attention_heads, self.num_key_value_heads
        require(self.head_dim >= 2 and self.head_dim % 2 == 0, f"head_dim={self.head_dim} (RoPE needs it even)")
        require(H % Hkv == 0, f"num_key_value_heads={Hkv} (must divide num_attention_heads={H})")
        self.inv_freq = rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)

    @classmethod
    def from_hf(cls, config: dict) -> "Config":
        theta, scaling = rope_settings(config)
        config = dict(config, rope_theta=theta, rope_scaling=scaling)
        config.pop("rope_parameters", None)
        known = {k: k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "vocab_size", "num_key_value_heads", "head_dim",
                                "rms_norm_eps", "rope_theta", "rope_scaling",
                                "max_position_embeddings", "tie_word_embeddings")}
        cfg = config_from_hf(cls, config, known, must_equal={
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False})
        rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # refuses unknown scaling now
        return cfg

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads


def weights(cfg: Config) -> dict:
    """The weight set: every tensor this config needs, name -> shape ((out, in) for matrices)."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    layer = {"attention_norm": (D,), "attention.wq": (q, D), "attention.wk": (kv, D), "attention.wv": (kv, D),
             "attention.wo": (D, q), "ffn_norm": (D,),
             "feed_forward.w1": (F, D), "feed_forward.w2": (D, F), "feed_forward.w3": (F, D)}
    top = {"tok_embeddings": (V, D), "norm": (D,), **({} if cfg.tie_word_embeddings else {"output": (V, D)})}
    return weight_set(cfg.num_hidden_layers, layer, top)


def forward(cfg: Config, w: dict, ops: Backend, batch: Batch, tokens: np.ndarray, last_only: bool = False,
            head=lm_head):
    """LLaMA's pre-norm blocks: RMSNorm, rotary grouped-query attention, SwiGLU MLP (ArchModule.forward)."""
    positions = batch.positions
    eps, H, Hkv = cfg.rms_norm_eps, cfg.num_attention_heads, cfg.n_kv_heads
    x = ops.embedding(w["tok_embeddings"], tokens)                              # (T, D)
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        h = ops.rmsnorm(x, w[p + "attention_norm"], eps)
        q, k, v = ops.matmuls(h, [w[p + "attention.wq"], w[p + "attention.wk"], w[p + "attention.wv"]])
        q = ops.rope(q, positions, cfg.inv_freq, H)                                        # (T, H*hd)
        k = ops.rope(k, positions, cfg.inv_freq, Hkv)                                      # (T, Hkv*hd)
        a = batch.attend(ops, i, q, k, v, H, cfg.head_dim ** -0.5)                  # (T, H*hd)
        x = ops.add(x, ops.matmul(a, w[p + "attention.wo"]))

        h = ops.rmsnorm(x, w[p + "ffn_norm"], eps)
        gate = ops.swiglu(*ops.matmuls(h, [w[p + "feed_forward.w1"], w[p + "feed_forward.w3"]]))  # (T, F)
        x = ops.add(x, ops.matmul(gate, w[p + "feed_forward.w2"]))                          # (T, D)
    if last_only:
        x = batch.last_rows(ops, x)
    return head(cfg, w, ops, ops.rmsnorm(x, w["norm"], eps))                            # (T, vocab)


def describe(cfg: Config) -> dict:
    rows = {"attention": "multi-head" if cfg.n_kv_heads == cfg.num_attention_heads
            else f"grouped-query ({cfg.num_attention_heads} query heads, {cfg.n_kv_heads} kv heads)",
            "position": f"RoPE theta={cfg.rope_theta:g}"
                        + (f", scaling {cfg.rope_scaling}" if cfg.rope_scaling else ""),
            "norm": f"RMSNorm eps={cfg.rms_norm_eps:g}", "mlp": "SwiGLU",
            "embeddings": "tied" if cfg.tie_word_embeddings else "untied"}
    return rows
