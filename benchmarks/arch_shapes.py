"""Every architecture at real layer shapes, and a whole 7B model: decode and prefill speed.

    python -m benchmarks.arch_shapes --layers 4                 # LLaMA-7B, GPT-J-6B, MPT-7B, Falcon-7B shapes
    python -m benchmarks.arch_shapes --only llama-7b --layers 32 --rss   # the whole 7B model (3.8 GB)
    python -m benchmarks.arch_shapes --only llama-1.1b --layers 22 --positions 2048 4064  # attention at long context

Each model has its real config (../shared/models for GPT-J-6B and Falcon-7B; MPT-7B is Replit's
MPT config with MPT-7B's sizes: d_model 4096, 32 heads, no GQA, vocabulary 50432, ALiBi) with
``--layers`` layers and random q4_0 weights (q8_0 embedding and head, as `tinyllm convert
--quant q4_0` writes), its own tokenizer. Decode is reported as tokens/s and as GB/s of weights
read per token, the figure that compares architectures of different sizes: every step streams
all matrices once. ``--positions``: decode speed after a prompt of that many tokens (the cache
full to there), against the speed at position 1: the attention's share of a step. ``--rss``:
each model in a fresh process, peak resident memory reported. ``--llama-bench PATH``: the same
model written block for block as GGUF (LLaMA, MPT, Falcon: llama.cpp has no GPT-J graph) and
timed by llama-bench in the same run (``-p PROMPT -n STEPS -t 2``).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_model import REPO, TINYLLAMA, bench_dir, write_random
from tinyllm.kernels.backend import CACHE_TYPES, DEFAULT_CACHE_TYPE

SHARED = REPO.parent / "shared" / "models"
LLAMA_7B = dict(TINYLLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, max_position_embeddings=4096)
# name -> (architecture, config.json folder or a dict, tokenizer folder, changes)
SHAPES = {
    "llama-7b": ("llama", {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, **LLAMA_7B},
                 SHARED / "llama2-tokenizer", {}),
    "llama-1.1b": ("llama", {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
                             **dict(TINYLLAMA, max_position_embeddings=4096)}, SHARED / "llama2-tokenizer", {}),
    "gptj-6b": ("gptj", SHARED / "gpt-j-6b-tokenizer", SHARED / "gpt-j-6b-tokenizer", {}),
    "mpt-7b": ("mpt", SHARED / "replit-code-v1_5-3b-mpt-config", SHARED / "gpt-neox-20b-tokenizer-mpt",
               {"d_model": 4096, "n_heads": 32, "vocab_size": 50432, "kv_n_heads": 32, "max_seq_len": 4096}),
    "falcon-7b": ("falcon", SHARED / "falcon-7b-instruct-tokenizer", SHARED / "falcon-7b-instruct-tokenizer", {}),
}
LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers")


def hf_config(name: str, layers: int) -> dict:
    _, source, _, changes = SHAPES[name]
    config = dict(source) if isinstance(source, dict) else json.loads((source / "config.json").read_text())
    changes = dict(changes)
    if "kv_n_heads" in changes:
        config["attn_config"] = dict(config["attn_config"], kv_n_heads=changes.pop("kv_n_heads"),
                                     attn_type="multihead_attention")
    config.update(changes)
    for key in LAYER_KEYS:
        if key in config:
            config[key] = layers
    return config


def model_file(name: str, layers: int) -> Path:
    from tinyllm.arch import get_arch

    arch, _, tokenizer, _ = SHAPES[name]
    path = bench_dir() / f"{name}-{layers}l-random-q4_0.q4"
    if not path.exists():
        config = hf_config(name, layers)
        tmp = path.with_suffix(".partial")
        write_random(arch, tmp, get_arch(arch).Config.from_hf(config), config, tokenizer, f"{name}-random")
        tmp.replace(path)
    return path


def gguf_file(name: str, layers: int) -> Path:
    """The .q4 model's very blocks as a GGUF file in llama.cpp's layout for its architecture."""
    from benchmarks.bench_model import write_gguf

    q4 = model_file(name, layers)
    path = q4.with_suffix(".gguf")
    if not path.exists():
        arch, _, tokenizer, _ = SHAPES[name]
        tmp = path.with_suffix(".gguf.partial")
        if arch == "llama":
            write_gguf(q4, tmp)
        else:
            export_bpe_gguf(q4, tokenizer, tmp)
        tmp.replace(path)
    return path


def export_bpe_gguf(q4: Path, tokenizer: Path, out: Path) -> Path:
    """An MPT or Falcon .q4 file with q4_0/q8_0/f32 tensors -> GGUF, block for block: llama.cpp's
    tensor names and fused q | k | v rows (tinyllm's GGUF tables, read backwards), its metadata
    keys, and the tokenizer.json of ``tokenizer`` as a BPE vocabulary padded to the embedding."""
    import gguf

    from tests.gguf_writer import bpe_vocab_arrays
    from tinyllm.arch import get_arch
    from tinyllm.converters.gguf import GGUF_ARCHITECTURES
    from tinyllm.fileformat import ModelFile
    from tinyllm.kernels.quant import to_ggml_blocks

    src = ModelFile(q4, verify=False)
    arch = src.metadata["architecture"]
    if arch not in ("mpt", "falcon"):
        raise SystemExit(f"no GGUF export for {arch} here (llama: bench_model.write_gguf; llama.cpp has no GPT-J)")
    cfg = get_arch(arch).Config(**src.metadata["config"])
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(src.metadata["source"]["name"])
    if arch == "falcon":
        w.add_context_length(cfg.max_position_embeddings)
        w.add_tensor_data_layout("jploski")
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.ffn_hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(4 * cfg.d_model)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.kv_n_heads)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        w.add_max_alibi_bias(cfg.alibi_bias_max)
    tokens, types, merges = bpe_vocab_arrays(tokenizer / "tokenizer.json")
    pad = cfg.vocab_size - len(tokens)                    # embedding rows past the tokenizer's ids
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(arch)
    w.add_token_list(tokens + [f"[PAD{len(tokens) + i}]" for i in range(pad)])
    w.add_token_types(types + [int(gguf.TokenType.UNUSED)] * pad)
    w.add_token_merges(merges)
    w.add_eos_token_id(11 if arch == "falcon" else 0)
    qtypes = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    parts: dict[str, list] = {}
    for ours, gname, _ in GGUF_ARCHITECTURES[arch].plan(cfg):
        parts.setdefault(gname, []).append(src.tensors[ours])   # fused q | k | v: rows stacked in plan order
    for gname, tensors in parts.items():
        if tensors[0].format == "f32":
            w.add_tensor(gname, np.asarray(tensors[0].parts["w"], np.float32))
            continue
        blocks = np.concatenate([to_ggml_blocks(t).reshape(t.shape[0], -1) for t in tensors])
        w.add_tensor(gname, blocks, raw_shape=blocks.shape, raw_dtype=qtypes[tensors[0].format])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def llama_bench(binary: str, name: str, layers: int, prompt: int, steps: int, repeats: int,
                positions: list[int]) -> dict:
    """llama-bench's prefill and decode (and, for ``positions``, decode at that depth, its ``-d``)."""
    def run(*options):
        out = subprocess.run([binary, "-m", str(gguf_file(name, layers)), "-r", str(repeats), "-t", "2", "-o", "json",
                              *map(str, options)], capture_output=True, text=True, check=True).stdout
        return json.loads(out)

    speed = {("prefill" if r["n_prompt"] else "decode"): round(r["avg_ts"], 2)
             for r in run("-p", prompt, "-n", steps)}
    row = {"model": name, "engine": "llama-bench -t 2", "decode_tok_s": speed["decode"],
           f"prefill{prompt}_tok_s": speed["prefill"]}
    for p in positions:
        row[f"decode_at_{p}_tok_s"] = round(run("-p", 0, "-n", steps, "-d", p)[0]["avg_ts"], 2)
    return row


def decode_at(model, position: int, steps: int, repeats: int) -> tuple[list[float], list[float]]:
    """tok/s of ``steps`` decode steps after a prompt of ``position`` tokens, and the share of
    those steps' time spent in attention, per repeat."""
    from tinyllm.benchmark import prompt_ids

    ids = prompt_ids(position + steps + 1, model.config.vocab_size, seed=2)
    attention, in_attention = model.ops.attention, [0.0]

    def timed_attention(*args, **kwargs):
        start = time.perf_counter()
        try:
            return attention(*args, **kwargs)
        finally:
            in_attention[0] += time.perf_counter() - start

    speeds, shares = [], []
    for _ in range(repeats):
        model.reset()
        model.eval(ids[:position])
        model.ops.attention, in_attention[0] = timed_attention, 0.0
        start = time.perf_counter()
        try:
            for i in range(position + 1, position + steps + 1):
                model.eval(ids[:i])
        finally:
            model.ops.attention = attention
        elapsed = time.perf_counter() - start
        speeds.append(steps / elapsed)
        shares.append(in_attention[0] / elapsed)
    return speeds, shares


def peak_rss_mb() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1e3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3)


def measure(name: str, layers: int, prompt: int, steps: int, repeats: int, positions: list[int],
            cache_type: str = DEFAULT_CACHE_TYPE) -> dict:
    import tinyllm
    from tinyllm.benchmark import time_decode, time_prefill, weight_bytes_per_token

    path = model_file(name, layers)
    model = tinyllm.load(path, n_ctx=max([prompt + 2, steps + 2, *[p + steps + 1 for p in positions]]),
                         cache_type=cache_type)
    decode, prefill = time_decode(model, steps, repeats), time_prefill(model, prompt, repeats)
    row = {"model": name, "layers": layers, "cache_type": cache_type, "file_MB": round(path.stat().st_size / 1e6),
           "weights_per_token_MB": round(weight_bytes_per_token(model) / 1e6),
           "decode_tok_s": round(decode.tokens_per_second, 2), "decode_range": [round(v, 2) for v in decode.spread],
           "decode_GB_s": round(decode.gb_per_second, 2),
           f"prefill{prompt}_tok_s": round(prefill.tokens_per_second, 2),
           "prefill_range": [round(v, 2) for v in prefill.spread]}
    for p in positions:
        speeds, shares = decode_at(model, p, steps, repeats)
        row[f"decode_at_{p}_tok_s"] = round(float(np.median(speeds)), 2)
        row[f"decode_at_{p}_range"] = [round(min(speeds), 2), round(max(speeds), 2)]
        row[f"attention_share_at_{p}"] = round(float(np.median(shares)), 3)
    row["peak_rss_MB"] = peak_rss_mb()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=["llama-7b", "gptj-6b", "mpt-7b", "falcon-7b"], choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128, help="prefill length")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--positions", type=int, nargs="*", default=[], help="also decode after prompts this long")
    ap.add_argument("--rss", action="store_true", help="each model in its own process (peak RSS per model)")
    ap.add_argument("--llama-bench", default=None, help="llama-bench binary: time llama.cpp on the same blocks")
    ap.add_argument("--cache-type", default=DEFAULT_CACHE_TYPE, choices=list(CACHE_TYPES), help="KV cache storage")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.layers, args.prompt, args.steps, args.repeats, args.positions,
                                 args.cache_type)))
        return
    for name in args.only:
        if args.rss:
            model_file(name, args.layers)        # written before the measuring process starts
            out = subprocess.run([sys.executable, "-m", "benchmarks.arch_shapes", "--one", name, "--layers",
                                  str(args.layers), "--prompt", str(args.prompt), "--steps", str(args.steps),
                                  "--repeats", str(args.repeats), "--cache-type", args.cache_type,
                                  "--positions", *map(str, args.positions)],
                                 check=True, capture_output=True, text=True, cwd=REPO).stdout
            print(out.strip().splitlines()[-1], flush=True)
        else:
            print(json.dumps(measure(name, args.layers, args.prompt, args.steps, args.repeats, args.positions,
                                     args.cache_type)), flush=True)
        if args.llama_bench and SHAPES[name][0] != "gptj":
            print(json.dumps(llama_bench(args.llama_bench, name, args.layers, args.prompt, args.steps, args.repeats,
                                         args.positions)), flush=True)


if __name__ == "__main__":
    main()
