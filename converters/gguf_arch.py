"""GGUF architectures -> tinyllm: hyperparameters, tensor names, and layout fixes.

Each GGUF architecture maps its ``{arch}.*`` metadata to the Hugging Face config.json keys
of the tinyllm architecture (so ``Config.from_hf`` validates it exactly as for a checkpoint
directory), names its tensors, and undoes llama.cpp's layout choices where tinyllm's runtime
differs. Metadata keys a table does not know are refused by name: a silently ignored
option would mean silently wrong output.
"""
from __future__ import annotations

import numpy as np

from ..arch.common import rope_inv_freq
from ..errors import FormatError, UnsupportedError
from ..kernels.quant import QTensor


def clean_float(value) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def permute_rows(t: QTensor, perm: np.ndarray) -> QTensor:
    """Reorder the output rows of a matrix: exact in every format, since blocks run along rows."""
    return QTensor(t.format, t.shape, {k: np.ascontiguousarray(v[perm]) for k, v in t.parts.items()})


def unpermute_rope_rows(t: QTensor, n_heads: int) -> QTensor:
    """llama.cpp's converter reorders q/k rows per head from Hugging Face's rotate-half pairing
    (i, i + d/2) to Meta's adjacent pairing (2i, 2i+1); tinyllm's RoPE is rotate-half, so undo it:
    HF row (head, half, i) is GGUF row (head, i, half)."""
    rows = t.shape[0]
    head_dim = rows // n_heads
    if head_dim * n_heads != rows or head_dim % 2:
        raise FormatError(f"q/k matrix with {rows} rows does not split into {n_heads} heads of even size")
    perm = np.arange(rows).reshape(n_heads, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)
    return permute_rows(t, perm)


class Llama:
    """LLaMA family (LLaMA 1/2/3, Mistral, SmolLM, TinyLlama, ...): llama.cpp arch "llama"."""

    arch = "llama"
    KNOWN_KEYS = {
        "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
        "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
        "attention.key_length", "attention.value_length", "rope.dimension_count", "rope.freq_base",
        "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
        "rope.scaling.finetuned", "expert_count", "expert_used_count", "tensor_data_layout",
    }
    GLOBAL_TENSORS = {"token_embd.weight": "tok_embeddings", "output_norm.weight": "norm", "output.weight": "output"}
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
    EXTRA_TENSORS = {"rope_freqs.weight"}  # read into the config, not a weight

    @classmethod
    def hf_config(cls, get, tensors: dict) -> dict:
        """``get(key, default)`` reads ``llama.<key>``; ``tensors`` maps GGUF names to
        GGUFTensor (``.shape``, ``.load()`` -> QTensor)."""
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
        divisors = tensors["rope_freqs.weight"].load("f32").dequantize().reshape(-1)
        if scaling is not None or divisors.shape != (head_dim // 2,):
            raise UnsupportedError("GGUF rope_freqs tensor combined with other rope scaling is not supported")
        llama3 = {"rope_type": "llama3", "factor": clean_float(divisors.max()), "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": get("rope.scaling.original_context_length", 8192)}
        want = rope_inv_freq(head_dim, theta) / divisors
        if not np.allclose(rope_inv_freq(head_dim, theta, llama3), want, rtol=1e-5, atol=0):
            raise UnsupportedError("GGUF rope_freqs tensor does not follow Llama 3's frequency rule; "
                                   "such rope scaling is not supported")
        return llama3

    @classmethod
    def tensor_names(cls, cfg) -> dict:
        """GGUF tensor name -> tinyllm name, for every weight the model needs."""
        names = {k: v for k, v in cls.GLOBAL_TENSORS.items() if k != "output.weight" or not cfg.tie_word_embeddings}
        for i in range(cfg.num_hidden_layers):
            names.update({f"blk.{i}.{k}": f"layers.{i}.{v}" for k, v in cls.LAYER_TENSORS.items()})
        return names

    @staticmethod
    def expected_shapes(cfg) -> dict:
        """tinyllm name (without the layer prefix) -> shape, (out, in) for matrices."""
        d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        return {"tok_embeddings": (cfg.vocab_size, d), "output": (cfg.vocab_size, d), "norm": (d,),
                "attention_norm": (d,), "ffn_norm": (d,), "attention.wq": (q, d), "attention.wk": (kv, d),
                "attention.wv": (kv, d), "attention.wo": (d, q), "feed_forward.w1": (f, d),
                "feed_forward.w2": (d, f), "feed_forward.w3": (f, d)}

    @staticmethod
    def fix_layout(name: str, t: QTensor, cfg) -> QTensor:
        if name.endswith("attention.wq"):
            return unpermute_rope_rows(t, cfg.num_attention_heads)
        if name.endswith("attention.wk"):
            return unpermute_rope_rows(t, cfg.num_key_value_heads)
        return t


GGUF_ARCHITECTURES = {"llama": Llama}
