"""Falcon (TII, 2023): LayerNorm decoder with a GELU MLP, rotary positions (or ALiBi) and
multi-query / grouped-query attention, in three families:

    7B-style  (multi_query, parallel_attn)    h = LN(x);  x = x + Attn(h) + MLP(h)
    40B/180B  (new_decoder_architecture)      x = x + Attn(LN_attn(x)) + MLP(LN_mlp(x))
    sequential (parallel_attn=False)          x = x + Attn(LN(x));  x = x + MLP(LN'(x))
    logits = Wout · LN(x)

The converter splits each family's fused query_key_value layout into Wq, Wk, Wv, so the
forward pass does not know which family it runs.

ALiBi (alibi=True, e.g. Falcon-RW) adds slope_h * j to the *unscaled* scores before the
1/sqrt(head_dim) scaling: that is folded into the slopes here, as are transformers' bfloat16
slopes. (transformers also rounds each product slope * j to bfloat16: exact while every
slope is a power of two, i.e. up to 8 heads; otherwise a relative error below 2^-8 of the
bias, which tinyllm does not reproduce.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tinyllm.arch.common import (
    alibi_slopes,
    check_config,
    config_from_hf,
    lm_head,
    require,
    rope_inv_freq,
    rope_settings,
    weight_set,
)
from tinyllm.errors import UnsupportedError
from tinyllm.kernels.backend import Backend
from tinyllm.kvcache import Batch

ARCH = "falcon"
HF_CLASSES = ("FalconForCausalLM", "RWForCausalLM")  # config.json "architectures" names
# activation -> use the tanh approximation of GELU?
ACTIVATIONS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}


def bfloat16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), returned as float32."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


@dataclass
class Config:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_kv_heads: int | None = None            # used by new_decoder_architecture (and plain MHA)
    multi_query: bool = True
    new_decoder_architecture: bool = False
    parallel_attn: bool = True
    num_ln_in_parallel_attn: int | None = None  # None: 2 with new_decoder_architecture, else 1
    alibi: bool = False
    bias: bool = False
    ffn_hidden_size: int | None = None         # None: 4 * hidden_size
    activation: str = "gelu"
    layer_norm_epsilon: float = 1e-5
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = True
    inv_freq: np.ndarray = field(init=False, repr=False, compare=False)
    alibi_slopes: np.ndarray | None = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        check_config(self)
        self.num_kv_heads = self.num_kv_heads or self.num_attention_heads
        self.ffn_hidden_size = self.ffn_hidden_size or 4 * self.hidden_size
        if self.num_ln_in_parallel_attn is None:
            self.num_ln_in_parallel_attn = 2 if self.new_decoder_architecture else 1
        H = self.num_attention_heads
        require(self.activation in ACTIVATIONS,
                f"activation={self.activation!r} (tinyllm implements {', '.join(ACTIVATIONS)})")
        require(self.num_ln_in_parallel_attn in (1, 2),
                f"num_ln_in_parallel_attn={self.num_ln_in_parallel_attn} (1 or 2)")
        require(self.hidden_size % H == 0, f"num_attention_heads={H} (must divide hidden_size={self.hidden_size})")
        require(self.alibi or self.head_dim % 2 == 0, f"head_dim={self.head_dim} (RoPE needs it even)")
        require(H % self.n_kv_heads == 0, f"num_kv_heads={self.n_kv_heads} (must divide num_attention_heads={H})")
        self.inv_freq = rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)
        self.alibi_slopes = (bfloat16_round(alibi_slopes(self.num_attention_heads)) * self.head_dim ** -0.5
                             if self.alibi else None)

    @classmethod
    def from_hf(cls, config: dict) -> "Config":
        theta, scaling = rope_settings(config)
        config = dict(config, rope_theta=theta, rope_scaling=scaling)
        config.pop("rope_parameters", None)
        if "n_embed" in config:  # the old name transformers still accepts
            config["hidden_size"] = config.pop("n_embed")
        known = {k: k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                                "num_kv_heads", "multi_query", "new_decoder_architecture", "parallel_attn",
                                "num_ln_in_parallel_attn", "alibi", "bias", "ffn_hidden_size", "activation",
                                "layer_norm_epsilon", "max_position_embeddings", "rope_theta", "rope_scaling",
                                "tie_word_embeddings")}
        known["num_key_value_heads"] = None  # derived; transformers >= 5.25 saves it (checked below)
        cfg = config_from_hf(cls, config, known, must_equal={
            "activation": tuple(ACTIVATIONS), "apply_residual_connection_post_layernorm": False,
            "num_ln_in_parallel_attn": (None, 1, 2)})
        H, Hkv = cfg.num_attention_heads, cfg.num_kv_heads
        if cfg.new_decoder_architecture:
            if not cfg.parallel_attn:  # transformers builds layers it then cannot run
                raise UnsupportedError("unsupported config option parallel_attn=False with "
                                       "new_decoder_architecture=True")
            if H % Hkv:
                raise UnsupportedError(f"unsupported config option num_kv_heads={Hkv} "
                                       f"(must divide num_attention_heads={H})")
        else:
            if cfg.num_ln_in_parallel_attn == 2:
                raise UnsupportedError("unsupported config option num_ln_in_parallel_attn=2 "
                                       "without new_decoder_architecture")
            if not cfg.multi_query and Hkv != H:  # the per-head (q, k, v) layout has one kv per head
                raise UnsupportedError(f"unsupported config option num_kv_heads={Hkv} with multi_query=False "
                                       "and new_decoder_architecture=False")
        saved = config.get("num_key_value_heads")
        if saved is not None and saved != cfg.n_kv_heads:
            raise UnsupportedError(f"unsupported config option num_key_value_heads={saved!r} (the other options "
                                   f"give {cfg.n_kv_heads} kv heads)")
        return cfg

    @property
    def n_kv_heads(self) -> int:
        """kv heads the attention actually has (multi_query means one)."""
        return 1 if self.multi_query and not self.new_decoder_architecture else self.num_kv_heads

    @property
    def norms_per_layer(self) -> int:
        """2: separate LayerNorms before attention and MLP; 1: one shared by both."""
        separate = self.new_decoder_architecture and self.num_ln_in_parallel_attn == 2
        return 2 if separate or not self.parallel else 1

    @property
    def parallel(self) -> bool:
        return self.new_decoder_architecture or self.parallel_attn

    head_dim = property(lambda self: self.hidden_size // self.num_attention_heads)
    context_length = property(lambda self: self.max_position_embeddings)


def weights(cfg: Config) -> dict:
    """The weight set: every tensor this config needs, name -> shape ((out, in) for matrices)."""
    D, F, V = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    kv = cfg.n_kv_heads * cfg.head_dim
    linears = {"attention.wq": (D, D), "attention.wk": (kv, D), "attention.wv": (kv, D), "attention.wo": (D, D),
               "feed_forward.w1": (F, D), "feed_forward.w2": (D, F)}
    norms = ["attention_norm"] + (["ffn_norm"] if cfg.norms_per_layer == 2 else [])
    layer = {**{n + s: (D,) for n in norms for s in ("", "_bias")}, **linears,
             **({n + "_bias": (shape[0],) for n, shape in linears.items()} if cfg.bias else {})}
    top = {"tok_embeddings": (V, D), "norm": (D,), "norm_bias": (D,),
           **({} if cfg.tie_word_embeddings else {"output": (V, D)})}
    return weight_set(cfg.num_hidden_layers, layer, top)


def forward(cfg: Config, w: dict, ops: Backend, batch: Batch, tokens: np.ndarray, last_only: bool = False,
            head=lm_head):
    """Falcon's blocks: rotary (or ALiBi) multi- or grouped-query attention, GELU MLP, parallel or in sequence."""
    positions = batch.positions
    eps, H, Hkv = cfg.layer_norm_epsilon, cfg.num_attention_heads, cfg.n_kv_heads
    approximate = ACTIVATIONS[cfg.activation]

    def linear(x, name):
        return ops.matmul(x, w[name], w.get(name + "_bias"))

    def linears(x, *names):  # weights on one input: one kernel call where the backend can
        return ops.matmuls(x, [w[n] for n in names], [w.get(n + "_bias") for n in names])

    def norm(x, name):
        return ops.layernorm(x, w[name], w[name + "_bias"], eps)

    x = ops.embedding(w["tok_embeddings"], tokens)                                  # (T, D)
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        h = norm(x, p + "attention_norm")
        q, k, v = linears(h, p + "attention.wq", p + "attention.wk", p + "attention.wv")  # (T, H*hd), 2x (T, Hkv*hd)
        if not cfg.alibi:
            q, k = ops.rope(q, positions, cfg.inv_freq, H), ops.rope(k, positions, cfg.inv_freq, Hkv)
        a = batch.attend(ops, i, q, k, v, H, cfg.head_dim ** -0.5, cfg.alibi_slopes)
        attn = linear(a, p + "attention.wo")                                         # (T, D)
        if not cfg.parallel:
            x = ops.add(x, attn)
        if cfg.norms_per_layer == 2:
            h = norm(x, p + "ffn_norm")
        mlp = linear(ops.gelu(linear(h, p + "feed_forward.w1"), approximate), p + "feed_forward.w2")
        x = ops.add(x, ops.add(attn, mlp) if cfg.parallel else mlp)                 # (T, D)
    if last_only:
        x = batch.last_rows(ops, x)
    return head(cfg, w, ops, norm(x, "norm"))                                     # (T, vocab)


def describe(cfg: Config) -> dict:
    H, Hkv = cfg.num_attention_heads, cfg.n_kv_heads
    attention = ("multi-head" if Hkv == H else f"multi-query ({H} query heads, 1 kv head)" if Hkv == 1
                 else f"grouped-query ({H} query heads, {Hkv} kv heads)")
    family = ("40B/180B-style new_decoder_architecture" if cfg.new_decoder_architecture
              else "7B-style multi_query" if cfg.multi_query else "multi-head")
    residual = "parallel" if cfg.parallel else "sequential"
    if cfg.parallel:
        residual += ", separate attention and MLP LayerNorms" if cfg.norms_per_layer == 2 else ", one shared LayerNorm"
    return {"attention": attention,
            "checkpoint family": family + (", biased linears" if cfg.bias else ""),
            "position": "ALiBi" if cfg.alibi else f"RoPE theta={cfg.rope_theta:g}"
                        + (f", scaling {cfg.rope_scaling}" if cfg.rope_scaling else ""),
            "residual": residual,
            "norm": f"LayerNorm eps={cfg.layer_norm_epsilon:g}",
            "mlp": f"GELU{' (tanh approximation)' if ACTIVATIONS[cfg.activation] else ''}, "
                   f"{cfg.ffn_hidden_size} hidden",
            "embeddings": "tied" if cfg.tie_word_embeddings else "untied"}
