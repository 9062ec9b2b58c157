"""What every architecture shares: config validation, RoPE frequencies, the layer walk."""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Protocol, runtime_checkable

import numpy as np

from tinyllm.errors import FormatError, UnsupportedError

# Bounds on any config value (a header or config.json from a stranger must not size an
# allocation or a loop by itself): every size and count, and the number of layers.
MAX_SIZE = 1 << 24
MAX_LAYERS = 1024
LAYER_FIELDS = ("num_hidden_layers", "n_layer", "n_layers")

# config.json keys that describe the checkpoint or training, never the forward pass.
METADATA_KEYS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "initializer_range", "use_cache", "tie_word_embeddings", "auto_map", "id2label", "label2id",
    "output_attentions", "output_hidden_states", "return_dict", "is_decoder", "is_encoder_decoder",
    "pretraining_tp", "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop",
    "attn_pdrop", "emb_pdrop", "summary_type", "summary_use_proj", "summary_activation",
    "summary_proj_to_labels", "summary_first_dropout", "gradient_checkpointing", "quantization_config",
    "task_specific_params", "torchscript", "use_return_dict", "chunk_size_feed_forward",
    "problem_type", "tokenizer_class", "prefix", "finetuning_task", "max_length", "min_length",
    "num_beams", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "typical_p",
    "bad_words_ids", "num_return_sequences", "remove_invalid_values", "early_stopping",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "diversity_penalty",
    "num_beam_groups", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "tf_legacy_loss", "pruned_heads", "cross_attention_hidden_size",
    "add_cross_attention", "is_composition", "use_bfloat16", "max_batch_size", "max_seq_len",
    "layer_types",
}


def config_from_hf(cls, config: dict, known: dict, must_equal: dict | None = None):
    """Build dataclass ``cls`` from a config.json dict.

    known:      config key -> dataclass field (or None: understood, validated by ``cls``)
    must_equal: config key -> the only value(s) tinyllm implements; anything else is refused.
    Keys in neither table nor METADATA_KEYS are refused by name: a silently ignored
    option would mean silently wrong output.
    """
    must_equal = must_equal or {}
    unknown = sorted(k for k in config if k not in known and k not in must_equal and k not in METADATA_KEYS)
    if unknown:
        raise UnsupportedError(f"unsupported config option(s) {', '.join(unknown)}: tinyllm does not implement them")
    for key, allowed in must_equal.items():
        if key in config and config[key] not in (allowed if isinstance(allowed, tuple) else (allowed,)):
            raise UnsupportedError(f"unsupported config option {key}={config[key]!r} "
                                   f"(tinyllm implements {key}={allowed!r})")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {field: config[key] for key, field in known.items()
              if field is not None and key in config and config[key] is not None and field in fields}
    return cls(**kwargs)


@runtime_checkable
class ArchConfig(Protocol):
    """What every layer outside an architecture reads from its Config, under one naming
    (each Config keeps its checkpoint's own field names and derives these)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_kv_heads: int
    head_dim: int
    context_length: int
    tie_word_embeddings: bool


class ArchModule(Protocol):
    """An architecture module (tinyllm/arch/<name>.py)."""

    ARCH: str                    # its name in a .q4 header
    HF_CLASSES: tuple            # config.json "architectures" names it reads
    Config: type                 # dataclass; ``Config.from_hf(config_json)`` refuses unknown options by name

    def weights(self, cfg) -> dict: ...        # the declared weight set: name -> shape ((out, in) for matrices)
    def forward(self, cfg, w: dict, ops, batch, tokens, last_only: bool = False,
                head=None): ...        # tokens (T,), rows of batch's sequences -> logits (T, vocab), a row
    #                                        per sequence if last_only; head(cfg, w, ops, final hidden (T, D))
    def describe(self, cfg) -> dict: ...       # architecture-specific rows for `tinyllm info`


def check_config(cfg) -> None:
    """Every init field of a Config dataclass has the type its annotation names and a sane
    value: sizes and counts are integers in 1..MAX_SIZE (layers 1..MAX_LAYERS), floats are
    finite and positive, flags are booleans. Called first thing in each ``__post_init__``,
    so a config from a .q4 header, a config.json or GGUF metadata is checked the same way
    before anything is derived from it. Raises FormatError naming the field."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        value, allowed = getattr(cfg, f.name), typing.get_args(hints[f.name]) or (hints[f.name],)
        if value is None:
            if type(None) in allowed:
                continue
            raise FormatError(f"config {f.name} is required (got null)")
        if bool in allowed:
            ok, want = isinstance(value, bool), "true or false"
        elif int in allowed:
            top = MAX_LAYERS if f.name in LAYER_FIELDS else MAX_SIZE
            ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= top
            want = f"an integer in 1..{top}"
        elif float in allowed:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
            want = "a finite number > 0"
        elif str in allowed:
            ok, want = isinstance(value, str), "a string"
        elif dict in allowed:
            ok, want = isinstance(value, dict), "an object"
        else:  # pragma: no cover - a field type this checker does not know is a programming error
            raise TypeError(f"check_config: field {f.name} has unsupported type {hints[f.name]}")
        if not ok:
            raise FormatError(f"config {f.name}={value!r} is invalid: must be {want}")


def require(ok: bool, message: str) -> None:
    """An invariant the forward pass and the kernels rely on; refused as an unsupported config."""
    if not ok:
        raise UnsupportedError(f"unsupported config option {message}")


def weight_set(n_layers: int, per_layer: dict, top: dict) -> dict:
    """The full weight set {name: shape} from the per-layer tensors and the top-level ones."""
    names = dict(top)
    for i in range(n_layers):
        names.update({f"layers.{i}.{name}": shape for name, shape in per_layer.items()})
    return names


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """Per-pair rotation frequencies theta^(-2i/d), (rotary_dim/2,) float32, with the
    context-extension schemes folded in (they only rescale frequencies)."""
    inv = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        pass
    elif kind == "linear":  # positions / factor
        inv = inv / _scaling_number(scaling, "factor")
    elif kind == "llama3":  # Llama 3.1: long wavelengths slowed down, short ones kept, smooth between
        factor, lo, hi, old_ctx = (_scaling_number(scaling, k) for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
        if not hi > lo:
            raise FormatError(f"rope_scaling high_freq_factor={hi} must exceed low_freq_factor={lo}")
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = np.where(wavelen > old_ctx / lo, inv / factor, np.where(wavelen < old_ctx / hi, inv, mid))
    else:
        raise UnsupportedError(f"unsupported rope scaling type {kind!r} (tinyllm implements linear and llama3)")
    return inv.astype(np.float32)


def _scaling_number(scaling: dict, key: str) -> float:
    value = scaling.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise FormatError(f"rope_scaling {key}={value!r} is invalid: must be a finite number > 0")
    return float(value)


def rope_settings(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either the old top-level keys or the newer
    ``rope_parameters`` dict of transformers 5."""
    params = config.get("rope_parameters")
    if params:
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling = None if params.get("rope_type", "default") == "default" else params
        return float(theta), scaling
    return float(config.get("rope_theta", 10000.0)), config.get("rope_scaling")


def alibi_slopes(n_heads: int, bias_max: float = 8.0) -> np.ndarray:
    """ALiBi head slopes (Press et al., 2021): a geometric sequence for the next power of
    two, interleaving the odd ones of the doubled sequence when n_heads is not a power of two."""
    n = 2 ** math.ceil(math.log2(n_heads))
    m = np.arange(1, n + 1, dtype=np.float64) * (bias_max / n)
    slopes = 1.0 / np.power(2.0, m)
    if n != n_heads:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes.astype(np.float32)


def lm_head(cfg, w, ops, x):
    """Final projection to vocabulary logits: (T, D) -> (T, vocab)."""
    return ops.matmul(x, w["output"], w.get("output_bias"))


def hidden_states(cfg, w, ops, x):
    """The head for embeddings: the final normalized hidden states themselves, (T, D)."""
    return x
