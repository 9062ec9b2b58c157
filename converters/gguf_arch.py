"""GGUF architectures -> tinyllm: hyperparameters, tensor names, and layout fixes.

Each GGUF architecture maps its ``{arch}.*`` metadata to the Hugging Face config.json keys
of the tinyllm architecture (so ``Config.from_hf`` validates it exactly as for a checkpoint
directory), names its tensors, and undoes llama.cpp's layout choices where tinyllm's runtime
differs. Metadata keys a table does not know are refused by name: a silently ignored
option would mean silently wrong output.
"""
from __future__ import annotations

import numpy as np

from tinyllm.arch.common import rope_inv_freq
from tinyllm.errors import FormatError, UnsupportedError
from tinyllm.kernels.quant import QTensor


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


def row_slice(start: int, stop: int):
    """A transform taking rows [start, stop) of a fused matrix (views: nothing is copied)."""
    def take(t: QTensor) -> QTensor:
        return QTensor(t.format, (stop - start,) + tuple(t.shape[1:]), {k: v[start:stop] for k, v in t.parts.items()})
    return take


def gguf_shapes(plan: list, expected: dict) -> dict:
    """GGUF name -> the numpy-order shape it must have, from ``plan`` and the weight set
    ``expected`` (tinyllm name -> shape). Transforms keep shapes, except row slices of a fused
    matrix, whose rows add up."""
    parts: dict[str, list] = {}
    for ours, gname, _ in plan:
        parts.setdefault(gname, []).append(tuple(expected[ours]))
    return {g: shapes[0] if len(shapes) == 1 else (sum(s[0] for s in shapes),) + shapes[0][1:]
            for g, shapes in parts.items()}


class GGUFArch:
    """A GGUF architecture table. Besides these attributes each provides two classmethods:

        hf_config(get, tensors) -> dict   config.json keys for the tinyllm Config.from_hf;
                                          ``get(key, default)`` reads "<arch>.<key>", ``tensors``
                                          maps GGUF names to GGUFTensor (.shape, .load(fmt))
        plan(cfg) -> [(tinyllm name, GGUF name, transform of the loaded QTensor or None)]

    The shape each GGUF tensor must have follows from the plan and the architecture's weight
    set (``gguf_shapes``): a tensor read whole has its tinyllm tensor's shape, a fused one the
    rows of its slices stacked.
    """

    arch: str                       # tinyllm architecture name
    KNOWN_KEYS: set = set()         # "<arch>.<key>" suffixes this table reads or knows to be harmless
    EXTRA_TENSORS: set = set()      # GGUF tensors read into the config, not weights


class Llama(GGUFArch):
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
        divisors = tensors["rope_freqs.weight"].load("f32").dequantize().reshape(-1)
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
        fix = {"attention.wq": lambda t: unpermute_rope_rows(t, H),
               "attention.wk": lambda t: unpermute_rope_rows(t, Hkv)}
        plan = [("tok_embeddings", "token_embd.weight", None)]
        for i in range(cfg.num_hidden_layers):
            plan += [(f"layers.{i}.{ours}", f"blk.{i}.{g}", fix.get(ours)) for g, ours in cls.LAYER_TENSORS.items()]
        plan.append(("norm", "output_norm.weight", None))
        if not cfg.tie_word_embeddings:
            plan.append(("output", "output.weight", None))
        return plan


class Falcon(GGUFArch):
    """Falcon 7B/40B/180B-style: llama.cpp arch "falcon". llama.cpp's converter regroups the
    fused query_key_value rows as all query heads, then all key heads, then all value heads,
    and keeps Hugging Face's rotate-half RoPE: so q, k, v are three row ranges here."""

    arch = "falcon"
    KNOWN_KEYS = {"context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
                  "attention.head_count", "attention.head_count_kv", "attention.layer_norm_epsilon",
                  "rope.freq_base", "rope.dimension_count", "tensor_data_layout"}

    @classmethod
    def hf_config(cls, get, tensors: dict) -> dict:
        if get("tensor_data_layout", "jploski") != "jploski":
            raise UnsupportedError(f"GGUF falcon tensor_data_layout {get('tensor_data_layout')!r} is not supported "
                                   "(tinyllm reads llama.cpp's 'jploski' query/key/value grouping)")
        hidden, heads = get("embedding_length"), get("attention.head_count")
        kv_heads = get("attention.head_count_kv", 1)
        if get("rope.dimension_count", hidden // heads) != hidden // heads:
            raise UnsupportedError("GGUF falcon with partial rotary is not supported")
        two_norms = "blk.0.attn_norm_2.weight" in tensors
        config = {"hidden_size": hidden, "num_hidden_layers": get("block_count"), "num_attention_heads": heads,
                  "vocab_size": get("vocab_size", None) or tensors["token_embd.weight"].shape[0],
                  # llama.cpp writes feed_forward_length = 4 * hidden whatever the model has
                  "ffn_hidden_size": (tensors["blk.0.ffn_up.weight"].shape[0] if "blk.0.ffn_up.weight" in tensors
                                      else get("feed_forward_length", 4 * hidden)),
                  "layer_norm_epsilon": clean_float(get("attention.layer_norm_epsilon", 1e-5)),
                  "max_position_embeddings": get("context_length", 2048),
                  "rope_theta": clean_float(get("rope.freq_base", 10000.0)),
                  "tie_word_embeddings": "output.weight" not in tensors, "bias": False, "alibi": False,
                  "parallel_attn": True}
        if kv_heads == 1 and not two_norms:  # Falcon-7B: one shared LayerNorm, one kv head
            config.update(multi_query=True, new_decoder_architecture=False)
        else:                                # Falcon-40B/180B (two LayerNorms), Falcon2-11B (one)
            config.update(new_decoder_architecture=True, num_kv_heads=kv_heads,
                          num_ln_in_parallel_attn=2 if two_norms else 1)
        return config

    @classmethod
    def plan(cls, cfg) -> list:
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        split = {"attention.wq": row_slice(0, q), "attention.wk": row_slice(q, q + kv),
                 "attention.wv": row_slice(q + kv, q + 2 * kv)}
        norms = [("attn_norm", "attention_norm")] + ([("attn_norm_2", "ffn_norm")] if cfg.norms_per_layer == 2 else [])
        plan = [("tok_embeddings", "token_embd.weight", None)]
        for i in range(cfg.num_hidden_layers):
            b, o = f"blk.{i}.", f"layers.{i}."
            for g, ours in norms:
                plan += [(o + ours, b + g + ".weight", None), (o + ours + "_bias", b + g + ".bias", None)]
            plan += [(o + ours, b + "attn_qkv.weight", fn) for ours, fn in split.items()]
            plan += [(o + "attention.wo", b + "attn_output.weight", None),
                     (o + "feed_forward.w1", b + "ffn_up.weight", None),
                     (o + "feed_forward.w2", b + "ffn_down.weight", None)]
        plan += [("norm", "output_norm.weight", None), ("norm_bias", "output_norm.bias", None)]
        if not cfg.tie_word_embeddings:
            plan.append(("output", "output.weight", None))
        return plan


class MPT(GGUFArch):
    """MPT: llama.cpp arch "mpt". The fused Wqkv keeps MosaicML's q | k | v row order."""

    arch = "mpt"
    KNOWN_KEYS = {"context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
                  "attention.head_count", "attention.head_count_kv", "attention.layer_norm_epsilon",
                  "attention.clamp_kqv", "attention.max_alibi_bias"}

    @classmethod
    def hf_config(cls, get, tensors: dict) -> dict:
        d, heads = get("embedding_length"), get("attention.head_count")
        kv_heads = get("attention.head_count_kv", heads)
        alibi_max = get("attention.max_alibi_bias", 8.0)
        attn = {"alibi": alibi_max > 0, "alibi_bias_max": clean_float(alibi_max), "clip_qkv": None,
                "attn_type": "multihead_attention" if kv_heads == heads else "grouped_query_attention",
                "kv_n_heads": kv_heads}
        if get("attention.clamp_kqv", None) is not None:
            attn["clip_qkv"] = clean_float(get("attention.clamp_kqv"))
        return {"d_model": d, "n_heads": heads, "n_layers": get("block_count"),
                "vocab_size": get("vocab_size", None) or tensors["token_embd.weight"].shape[0],
                "max_seq_len": get("context_length", 2048),
                "layer_norm_epsilon": clean_float(get("attention.layer_norm_epsilon", 1e-5)),
                "expansion_ratio": get("feed_forward_length", 4 * d) / d,
                "tie_word_embeddings": "output.weight" not in tensors, "attn_config": attn}

    @classmethod
    def plan(cls, cfg) -> list:
        q, kv = cfg.d_model, cfg.kv_n_heads * cfg.head_dim
        split = {"attention.wq": row_slice(0, q), "attention.wk": row_slice(q, q + kv),
                 "attention.wv": row_slice(q + kv, q + 2 * kv)}
        plan = [("tok_embeddings", "token_embd.weight", None)]
        for i in range(cfg.n_layers):
            b, o = f"blk.{i}.", f"layers.{i}."
            plan += [(o + "attention_norm", b + "attn_norm.weight", None)]
            plan += [(o + ours, b + "attn_qkv.weight", fn) for ours, fn in split.items()]
            plan += [(o + "attention.wo", b + "attn_output.weight", None),
                     (o + "ffn_norm", b + "ffn_norm.weight", None),
                     (o + "feed_forward.w1", b + "ffn_up.weight", None),
                     (o + "feed_forward.w2", b + "ffn_down.weight", None)]
        plan.append(("norm", "output_norm.weight", None))
        if not cfg.tie_word_embeddings:
            plan.append(("output", "output.weight", None))
        return plan


class GPTJ(GGUFArch):
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
        from tinyllm.converters.gptj import rotary_row_order

        order = rotary_row_order(cfg.n_head, cfg.head_dim, cfg.rotary_dim)
        fix = {"attention.wq": lambda t: permute_rows(t, order), "attention.wk": lambda t: permute_rows(t, order)}
        plan = [("tok_embeddings", "token_embd.weight", None)]
        for i in range(cfg.n_layer):
            plan += [(f"layers.{i}.{ours}", f"blk.{i}.{g}", fix.get(ours)) for g, ours in cls.LAYER_TENSORS.items()]
        plan += [("norm", "output_norm.weight", None), ("norm_bias", "output_norm.bias", None)]
        if not cfg.tie_word_embeddings:
            plan.append(("output", "output.weight", None))
        return plan + [("output_bias", "output.bias", None)]


GGUF_ARCHITECTURES = {"llama": Llama, "falcon": Falcon, "mpt": MPT, "gptj": GPTJ}
