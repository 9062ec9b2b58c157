"""The benchmark model: a TinyLlama-1.1B-shaped LLaMA with random q4_0 weights, written
once as a .q4 file and as a GGUF Q4_0 file holding the very same quantized blocks (for
llama.cpp), both cached outside the repository (``$TINYLLM_BENCH_DIR``, default
``~/.cache/tinyllm/bench``).

Random *quantized* weights are drawn directly (uniform nibbles / int8 values, float16 scales
giving a weight std of ~0.02) rather than quantizing random floats: 1.1 billion weights
are written in seconds and both files encode identical numbers. As in `tinyllm convert
--quant q4_0`, the embedding table and the output head are q8_0, norms f32. The tokenizer is
the real Llama 2 one (TinyLlama's) from ../shared/models/llama2-tokenizer.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tinyllm.arch.llama import Config
from tinyllm.converters.convert import config_dict
from tinyllm.converters.hf_tokenizer import tokenizer_spec_from_hf_dir
from tinyllm.fileformat import ModelWriter
from tinyllm.kernels.quant import QTensor, n_blocks, n_super_blocks, pack_scales, to_ggml_blocks

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=False)
REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO.parent / "shared" / "models" / "llama2-tokenizer"
NAME = "tinyllama-1.1b-random"
SEED = 1


def bench_dir() -> Path:
    d = Path(os.environ.get("TINYLLM_BENCH_DIR", Path.home() / ".cache" / "tinyllm" / "bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def random_tensor(shape, fmt: str, rng, std: float = 0.02) -> QTensor:
    """Random weights already in ``fmt`` (q4_0, q4_k, q6_k, q8_0, or f32 around 1 for norms)."""
    if len(shape) == 1:
        return QTensor("f32", shape, {"w": rng.uniform(0.8, 1.2, shape).astype(np.float32)})
    rows, cols = shape
    nb = n_blocks(cols)
    if fmt == "q4_0":   # q uniform on 0..15: (q - 8) has std ~4.6
        d = rng.uniform(0.5, 1.5, (rows, nb)) * (std / 4.6)
        qs = rng.integers(0, 256, (rows, 16, nb), dtype=np.uint8)
    elif fmt == "q4_k":  # 6-bit codes around 32 and 8, q uniform on 0..15: std ~ d0 * 32 * 4.6
        nsb = n_super_blocks(rows, cols)
        d = np.stack([rng.uniform(0.5, 1.5, nsb) * (std / 4.6 / 32), rng.uniform(0.5, 1.5, nsb) * (std / 8)], 1)
        codes = rng.integers(16, 48, (nsb, 8)), rng.integers(0, 16, (nsb, 8))
        return QTensor(fmt, tuple(shape), {"d": d.astype(np.float16), "scales": pack_scales(*codes),
                                           "qs": rng.integers(0, 256, (rows, 16, nb), dtype=np.uint8)})
    elif fmt == "q6_k":  # 8-bit codes around 64, q uniform on 0..63: std ~ d * 64 * 18.5
        nsb = n_super_blocks(rows, cols)
        d = (rng.uniform(0.5, 1.5, (nsb, 1)) * (std / 18.5 / 64)).astype(np.float16)
        return QTensor(fmt, tuple(shape), {"d": d, "scales": rng.integers(48, 81, (nsb, 16)).astype(np.int8),
                                           "qs": rng.integers(0, 256, (rows, 24, nb), dtype=np.uint8)})
    elif fmt == "q8_0":  # q uniform on -127..127: std ~73
        d = rng.uniform(0.5, 1.5, (rows, nb)) * (std / 73)
        qs = rng.integers(-127, 128, (rows, 32, nb), dtype=np.int8)
    else:
        raise ValueError(fmt)
    return QTensor(fmt, tuple(shape), {"d": d.astype(np.float16), "qs": qs})


def _format(name: str, quant: str = "q4_0", mix=None) -> str:
    if mix is not None:  # q4_k_m / q4_k_s: the converter's recipe decides each tensor
        return mix.format_of(name, 2)
    return "q8_0" if name in ("tok_embeddings", "output") else quant


def write_q4(path: Path, cfg: Config, seed: int = SEED, quant: str = "q4_0") -> Path:
    hf_config = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, **TINYLLAMA}
    return write_random("llama", path, cfg, hf_config, TOKENIZER_DIR, NAME, seed, quant)


def write_random(arch: str, path: Path, cfg, hf_config: dict, tokenizer_dir: Path, name: str, seed: int = SEED,
                 quant: str = "q4_0") -> Path:
    """A model of architecture ``arch`` (config ``cfg``, read from ``hf_config``) with random
    ``quant`` matrices (q8_0 embedding and head, f32 norms and biases), in the converter's
    tensor order, the tokenizer of ``tokenizer_dir``."""
    import importlib

    from tinyllm.arch import get_arch
    from tinyllm.converters.recipe import MIXES, Recipe

    rng = np.random.default_rng(seed)
    mix = Recipe(quant).bind(arch, cfg) if quant in MIXES else None
    shapes = get_arch(arch).weights(cfg)
    plan = importlib.import_module(f"tinyllm.converters.{arch}").tensor_plan(cfg)
    metadata = {"architecture": arch, "config": config_dict(cfg),
                "tokenizer": tokenizer_spec_from_hf_dir(tokenizer_dir, hf_config),
                "chat_template": None, "generation": {}, "quant": quant,
                "source": {"format": "random", "name": name, "seed": seed}}
    with ModelWriter(path, metadata) as out:
        for tensor in dict.fromkeys(ours for ours, _, _ in plan):
            shape = shapes[tensor]
            out.add(tensor, random_tensor(shape, _format(tensor, quant, mix) if len(shape) == 2 else "f32", rng))
    return path


# GGUF: llama.cpp's names, and its RoPE pairing (Meta's adjacent pairs) for q and k rows
GGUF_LAYER = {"attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
              "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
              "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}


def _gguf_name(name: str) -> str:
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return f"blk.{i}.{GGUF_LAYER[rest]}.weight"
    return {"tok_embeddings": "token_embd.weight", "norm": "output_norm.weight", "output": "output.weight"}[name]


def rope_rows_for_llama_cpp(rows: int, n_heads: int) -> np.ndarray:
    """Row order turning rotate-half q/k rows into llama.cpp's interleaved pairs
    (convert_hf_to_gguf.py's LlamaModel.permute, applied to row indices)."""
    return np.arange(rows).reshape(n_heads, 2, rows // n_heads // 2).swapaxes(1, 2).reshape(-1)


def write_gguf(q4_path: Path, path: Path) -> Path:
    """The .q4 file's tensors, block for block, as GGUF (llama.cpp's Q4_0 / Q8_0 / F32)."""
    import gguf

    from tinyllm.fileformat import ModelFile

    src = ModelFile(q4_path, verify=False)
    cfg = Config(**src.metadata["config"])
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(NAME)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    vocab = gguf.vocab.SentencePieceVocab(TOKENIZER_DIR)
    tokens, scores, types = zip(*vocab.all_tokens())
    w.add_tokenizer_model("llama")
    w.add_token_list(list(tokens))
    w.add_token_scores(list(scores))
    w.add_token_types([int(t) for t in types])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    qtypes = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    for name, t in src.tensors.items():
        if t.format == "f32":
            w.add_tensor(_gguf_name(name), np.asarray(t.parts["w"], np.float32))
            continue
        rows = t.shape[0]
        blocks = to_ggml_blocks(t).reshape(rows, -1)
        if name.endswith("attention.wq"):
            blocks = blocks[rope_rows_for_llama_cpp(rows, cfg.num_attention_heads)]
        elif name.endswith("attention.wk"):
            blocks = blocks[rope_rows_for_llama_cpp(rows, cfg.n_kv_heads)]
        w.add_tensor(_gguf_name(name), blocks, raw_shape=blocks.shape, raw_dtype=qtypes[t.format])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def bench_model(gguf_too: bool = False, quant: str = "q4_0") -> tuple[Path, Path | None]:
    """Paths of the cached benchmark model (.q4 with ``quant`` matrices (q4_0, q4_k, q6_k, or a mix
    q4_k_m / q4_k_s), and for
    q4_0 the .gguf when asked), created on first use."""
    if not (TOKENIZER_DIR / "tokenizer.model").is_file():
        raise FileNotFoundError(f"the Llama 2 tokenizer is needed to build the benchmark model: {TOKENIZER_DIR}")
    d = bench_dir()
    q4 = d / f"{NAME}-{quant}.q4"
    if not q4.exists():
        write_q4(q4, Config(**TINYLLAMA), quant=quant)
    gg = None
    if gguf_too:
        gg = d / f"{NAME}-q4_0.gguf"
        if not gg.exists() or gg.stat().st_mtime < q4.stat().st_mtime:
            tmp = gg.with_suffix(".gguf.partial")
            write_gguf(q4, tmp)
            os.replace(tmp, gg)
    return q4, gg


if __name__ == "__main__":
    import sys

    for p in bench_model(gguf_too=len(sys.argv) < 2, quant=sys.argv[1] if len(sys.argv) > 1 else "q4_0"):
        if p is not None:
            print(p, f"{p.stat().st_size / 1e6:.1f} MB")
