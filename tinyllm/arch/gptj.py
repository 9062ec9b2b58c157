"""GPT-J (Wang & Komatsuzaki, 2021): one LayerNorm feeds attention and the MLP in
parallel, rotary positions on the first rotary_dim dims of each head, a biased GELU MLP
and a biased output head.

    x = embed(tokens)
    for each layer:
        h = LayerNorm(x)
        x = x + Wo · Attention(RoPE(Wq·h), RoPE(Wk·h), Wv·h) + W2 · GELU(W1·h + b1) + b2
    logits = Wout · LayerNorm(x) + bout

GPT-J rotates adjacent pairs (2i, 2i+1); the converter permutes the q/k rows so the
runtime's rotate-half RoPE (pairs i, i + rotary_dim/2) computes the same thing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tinyllm.arch.common import check_config, config_from_hf, lm_head, require, rope_inv_freq, weight_set
from tinyllm.errors import UnsupportedError
from tinyllm.kernels.backend import Backend
from tinyllm.kvcache import Batch

ARCH = "gptj"
HF_CLASSES = ("GPTJForCausalLM",)  # config.json "architectures" names
# activation_function -> use the tanh approximation of GELU?
ACTIVATIONS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu": False}


@dataclass
class Config:
    n_embd: int
    n_layer: int
    n_head: int
    vocab_size: int
    rotary_dim: int
    n_inner: int | None = None                 # None: 4 * n_embd
    n_positions: int = 2048
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    inv_freq: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        check_config(self)
        self.n_inner = self.n_inner or 4 * self.n_embd
        require(self.activation_function in ACTIVATIONS, f"activation_function={self.activation_function!r} "
                f"(tinyllm implements {', '.join(ACTIVATIONS)})")
        require(self.n_embd % self.n_head == 0, f"n_head={self.n_head} (must divide n_embd={self.n_embd})")
        require(self.rotary_dim % 2 == 0 and self.rotary_dim <= self.head_dim,
                f"rotary_dim={self.rotary_dim} (must be even and at most head_dim={self.head_dim})")
        self.inv_freq = rope_inv_freq(self.rotary_dim, 10000.0)

    @classmethod
    def from_hf(cls, config: dict) -> "Config":
        known = {k: k for k in ("n_embd", "n_layer", "n_head", "vocab_size", "rotary_dim", "n_inner",
                                "n_positions", "activation_function", "layer_norm_epsilon", "tie_word_embeddings")}
        # "rotary" and "scale_attn_weights" are GPT-2 leftovers in GPT-J configs; transformers
        # always rotates and always scales by 1/sqrt(head_dim)
        if config.get("rotary_dim", 64) is None:
            # transformers' GPT-J then builds sin/cos of width n_embd against heads of
            # width head_dim: it only runs with a single head
            raise UnsupportedError("unsupported config option rotary_dim=None (tinyllm needs an explicit rotary_dim)")
        return config_from_hf(cls, {"rotary_dim": 64, **config}, known, must_equal={
            "activation_function": tuple(ACTIVATIONS), "rotary": True, "scale_attn_weights": True})

    hidden_size = property(lambda self: self.n_embd)
    num_hidden_layers = property(lambda self: self.n_layer)
    num_attention_heads = property(lambda self: self.n_head)
    n_kv_heads = property(lambda self: self.n_head)
    head_dim = property(lambda self: self.n_embd // self.n_head)
    context_length = property(lambda self: self.n_positions)


def weights(cfg: Config) -> dict:
    """The weight set: every tensor this config needs, name -> shape ((out, in) for matrices)."""
    D, F, V = cfg.n_embd, cfg.n_inner, cfg.vocab_size
    layer = {"attention_norm": (D,), "attention_norm_bias": (D,),
             **{f"attention.{n}": (D, D) for n in ("wq", "wk", "wv", "wo")},
             "feed_forward.w1": (F, D), "feed_forward.w1_bias": (F,),
             "feed_forward.w2": (D, F), "feed_forward.w2_bias": (D,)}
    top = {"tok_embeddings": (V, D), "norm": (D,), "norm_bias": (D,), "output_bias": (V,),
           **({} if cfg.tie_word_embeddings else {"output": (V, D)})}
    return weight_set(cfg.n_layer, layer, top)


def forward(cfg: Config, w: dict, ops: Backend, batch: Batch, tokens: np.ndarray, last_only: bool = False,
            head=lm_head):
    """GPT-J's parallel blocks: one LayerNorm feeds rotary attention and the GELU MLP (ArchModule.forward)."""
    positions = batch.positions
    eps, H = cfg.layer_norm_epsilon, cfg.n_head
    approximate = ACTIVATIONS[cfg.activation_function]
    x = ops.embedding(w["tok_embeddings"], tokens)                                        # (T, D)
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        h = ops.layernorm(x, w[p + "attention_norm"], w[p + "attention_norm_bias"], eps)
        q, k, v, up = ops.matmuls(h, [w[p + "attention.wq"], w[p + "attention.wk"], w[p + "attention.wv"],
                                      w[p + "feed_forward.w1"]], [None, None, None, w[p + "feed_forward.w1_bias"]])
        q = ops.rope(q, positions, cfg.inv_freq, H)                                       # (T, H*hd)
        k = ops.rope(k, positions, cfg.inv_freq, H)
        a = batch.attend(ops, i, q, k, v, H, cfg.head_dim ** -0.5)                # (T, H*hd)
        attn = ops.matmul(a, w[p + "attention.wo"])                                       # (T, D)

        up = ops.gelu(up, approximate)                                                    # (T, F)
        mlp = ops.matmul(up, w[p + "feed_forward.w2"], w[p + "feed_forward.w2_bias"])    # (T, D)
        x = ops.add(x, ops.add(attn, mlp))                                                # parallel residual
    if last_only:
        x = batch.last_rows(ops, x)
    return head(cfg, w, ops, ops.layernorm(x, w["norm"], w["norm_bias"], eps))        # (T, vocab)


def describe(cfg: Config) -> dict:
    return {"attention": "multi-head",
            "position": f"RoPE on {cfg.rotary_dim} of {cfg.head_dim} dims per head "
                        "(GPT-J pairing, permuted at conversion)",
            "residual": "parallel (attention and MLP share one LayerNorm)",
            "norm": f"LayerNorm eps={cfg.layer_norm_epsilon:g}",
            "mlp": f"GELU{' (tanh approximation)' if ACTIVATIONS[cfg.activation_function] else ''}, "
                   f"{cfg.n_inner} hidden, with bias",
            "embeddings": "tied" if cfg.tie_word_embeddings else "untied (output head with bias)"}
