"""Would another 4-bit grid, or a rotation, reach issue 16's target? Bounds on stories260K.

    python -m benchmarks.quality --only q4_0 q4_k --out DIR     # the texts, reference and imatrix
    python -m benchmarks.grid_bounds --quality DIR

Each candidate is *fake-quantized*: every matrix of the HF checkpoint is replaced by its
quantized-then-decoded values (the embedding, which is also the tied head, by q8_0 as q4_k files
keep it), ``tinyllm convert --quant f32`` stores them exactly and ``tinyllm perplexity
--kl-divergence`` scores them against the f32 reference. A format holding the same values scores
the same; rows with free float scales are bounds (nothing rounded to a stored code).

Grids: ``iq4_nl`` (ggml's 16 non-uniform levels, one float16 scale per 32 weights, llama.cpp's
scale search), ``iq4_xs`` (the same scales as signed 6-bit multiples of a float16 per 256
weights), ``nl_affine`` (those levels with a free float scale and minimum per 32),
``uniform_affine`` (16 uniform levels, free float scale and minimum). ``hadamard``: the residual
stream rotated by a randomized Hadamard matrix (QuaRot's idea; norm gains folded into the next
matrices, the head untied), exact in float, then quantized by tinyllm's own converter.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from benchmarks.quality import STORIES, kl_report, tinyllm

IQ4_NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
QK = 32
HF_TO_GGUF = [("model.layers.", "blk."), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
              ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"),
              ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")]


def _nearest(v: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """grid's value nearest to each of v (grid ascending)."""
    return grid[np.searchsorted((grid[1:] + grid[:-1]) / 2, v)]


def _scaled_grid_scales(x: np.ndarray, w: np.ndarray, grid: np.ndarray, tries: int) -> np.ndarray:
    """Blocks x, weights w (n, 32) -> one float scale d per block, chosen as llama.cpp's IQ4_NL
    search does: the block's largest-magnitude weight near either grid end, then the weighted
    least-squares scale of each candidate rounding; the best candidate's."""
    big = x[np.arange(len(x)), np.argmax(np.abs(x), axis=1)]
    big = np.where(big == 0, 1e-30, big)
    best, best_d = np.full(len(x), -np.inf), np.zeros(len(x))
    for t in range(-tries, tries + 1):
        q = _nearest(x * ((t + grid[0]) / big)[:, None], grid)
        sqx, sqq = (w * q * x).sum(1), (w * q * q).sum(1)
        ok = sqq > 0
        score = np.where(ok, sqx * sqx / np.where(ok, sqq, 1), -np.inf)   # error reduction of the LS scale
        better = score > best
        best, best_d = np.where(better, score, best), np.where(better & ok, sqx / np.where(ok, sqq, 1), best_d)
    return best_d


def _on_grid(x: np.ndarray, d: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """(n, 32) blocks rounded to d * grid[q] with their (n,) stored scales d."""
    return d[:, None] * _nearest(x / np.where(d == 0, 1, d)[:, None], grid)


def fit_scaled_grid(x: np.ndarray, w: np.ndarray, grid: np.ndarray, tries: int = 7) -> np.ndarray:
    """Blocks x, weights w (n, 32) -> decoded values d * grid[q], d one float16 per block (IQ4_NL)."""
    d = _scaled_grid_scales(x, w, grid, tries).astype(np.float16).astype(np.float32)
    return _on_grid(x, d, grid)


def fit_subscaled_grid(x: np.ndarray, w: np.ndarray, grid: np.ndarray, tries: int = 7) -> np.ndarray:
    """Blocks x, weights w (n, 32) -> d * grid[q] with d a signed 6-bit multiple of one float16
    per 8 consecutive blocks (IQ4_XS's 256-weight superblock; across rows where a row is shorter)."""
    d = _scaled_grid_scales(x, w, grid, tries)
    groups = np.zeros(-(-len(d) // 8) * 8)
    groups[:len(d)] = d
    groups = groups.reshape(-1, 8)
    step = (np.abs(groups).max(1) / 31).astype(np.float16).astype(np.float32)[:, None]
    codes = np.clip(np.round(groups / np.where(step == 0, 1, step)), -32, 31)
    return _on_grid(x, (codes * step).reshape(-1)[:len(d)].astype(np.float32), grid)


def fit_affine_grid(x: np.ndarray, w: np.ndarray, levels: np.ndarray, rounds: int = 6) -> np.ndarray:
    """Blocks x, weights w (n, 32) -> s * levels[q] + m (levels on [0, 1]), s and m free floats:
    from each of seven shrinks of the block's range, alternate rounding and the weighted
    least-squares (s, m); keep the best."""
    valid = w > 0
    lo = np.where(valid, x, np.inf).min(1)
    hi = np.where(valid, x, -np.inf).max(1)
    lo, hi = np.where(np.isfinite(lo), lo, 0), np.where(np.isfinite(hi), hi, 0)
    best_v, best_e = np.zeros_like(x), np.full(len(x), np.inf)
    for shrink in np.linspace(0.7, 1.0, 7):
        s, m = (hi - lo) * shrink, (lo + hi) / 2 - (hi - lo) * shrink / 2
        for _ in range(rounds + 1):
            q = _nearest((x - m[:, None]) / np.where(s == 0, 1, s)[:, None], levels)
            sw, sq, sqq = w.sum(1), (w * q).sum(1), (w * q * q).sum(1)
            sx, sqx = (w * x).sum(1), (w * q * x).sum(1)
            det = sw * sqq - sq * sq
            ok = np.abs(det) > 1e-20
            s = np.where(ok, (sw * sqx - sq * sx) / np.where(ok, det, 1), s)
            m = np.where(ok, (sqq * sx - sq * sqx) / np.where(ok, det, 1), m)
        v = s[:, None] * _nearest((x - m[:, None]) / np.where(s == 0, 1, s)[:, None], levels) + m[:, None]
        e = (w * (x - v) ** 2).sum(1)
        better = e < best_e
        best_e, best_v = np.where(better, e, best_e), np.where(better[:, None], v, best_v)
    return best_v


GRIDS = {
    "iq4_nl": lambda x, w: fit_scaled_grid(x, w, IQ4_NL),
    "iq4_xs": lambda x, w: fit_subscaled_grid(x, w, IQ4_NL),
    "nl_affine": lambda x, w: fit_affine_grid(x, w, (IQ4_NL - IQ4_NL[0]) / (IQ4_NL[-1] - IQ4_NL[0])),
    "uniform_affine": lambda x, w: fit_affine_grid(x, w, np.arange(16, dtype=np.float32) / 15),
}


def fake_quantize(weight: np.ndarray, grid: str, importance: np.ndarray | None) -> np.ndarray:
    """(rows, cols) -> the same shape of decoded values, blocks of 32 along each row (the last
    padded with weightless zeros), weighted as the shipped quantizers weight them."""
    from tinyllm.kernels.quantizer import block_weights

    rows, cols = weight.shape
    padded = -(-cols // QK) * QK
    x = np.zeros((rows, padded), np.float32)
    x[:, :cols] = weight
    blocks = x.reshape(rows, -1, QK)
    w = block_weights(blocks, cols, importance)
    return GRIDS[grid](blocks.reshape(-1, QK), w.reshape(-1, QK)).reshape(rows, padded)[:, :cols]


def gguf_name(hf_name: str) -> str:
    for a, b in HF_TO_GGUF:
        hf_name = hf_name.replace(a, b)
    return hf_name


def write_checkpoint(out: Path, tensors: dict, config: dict) -> Path:
    from safetensors.numpy import save_file

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(STORIES, out)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def fake_quantized_checkpoint(out: Path, grid: str, importance: dict | None) -> Path:
    """stories260K with every matrix through ``grid`` (see fake_quantize), the embedding q8_0."""
    from safetensors.numpy import load_file

    from tinyllm.kernels import quant

    tensors = load_file(STORIES / "model.safetensors")
    for name, t in tensors.items():
        if name == "model.embed_tokens.weight":
            tensors[name] = quant.dequantize(quant.quantize(t, "q8_0")).reshape(t.shape)
        elif t.ndim == 2:
            tensors[name] = fake_quantize(t, grid, None if importance is None else importance[gguf_name(name)])
    return write_checkpoint(out, tensors, json.loads((STORIES / "config.json").read_text()))


def hadamard_rotated_checkpoint(out: Path, seed: int = 0) -> Path:
    """stories260K with the residual stream h -> h Q (Q a randomized Hadamard matrix): the same
    function in float. Matrices reading the stream become W diag(g) Q (the norm gain g folded,
    the norm's own gain 1), matrices writing it Q^T W; the head E diag(g_final) Q, untied."""
    from safetensors.numpy import load_file

    f = {k: v.astype(np.float64) for k, v in load_file(STORIES / "model.safetensors").items()}
    config = json.loads((STORIES / "config.json").read_text())
    n = config["hidden_size"]
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    assert h.shape[0] == n, "a Hadamard matrix of the hidden size (a power of two)"
    rotation = h * np.random.default_rng(seed).choice([-1.0, 1.0], n)[:, None] / np.sqrt(n)
    ones = np.ones(n)
    out_tensors = {"model.embed_tokens.weight": f["model.embed_tokens.weight"] @ rotation,
                   "lm_head.weight": f["model.embed_tokens.weight"] * f["model.norm.weight"] @ rotation,
                   "model.norm.weight": ones}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for norm, reads, writes in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                     "self_attn.o_proj"),
                                    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")):
            for name in reads:
                out_tensors[p + name + ".weight"] = f[p + name + ".weight"] * f[p + norm + ".weight"] @ rotation
            out_tensors[p + writes + ".weight"] = rotation.T @ f[p + writes + ".weight"]
            out_tensors[p + norm + ".weight"] = ones
    return write_checkpoint(out, out_tensors, dict(config, tie_word_embeddings=False))


def score(label: str, model: Path, quality: Path) -> str:
    """One table row: label | delta PPL | mean KLD, from tinyllm perplexity --kl-divergence."""
    fields = kl_report(model, quality / "evaluation.txt", quality / "f32.q4")
    return f"| {label} | {fields['PPL difference']} | {fields['Mean KLD']} |"


def main() -> None:
    from tinyllm.imatrix import read_imatrix

    ap = argparse.ArgumentParser()
    ap.add_argument("--quality", type=Path, default=Path.home() / ".cache" / "tinyllm" / "quality",
                    help="benchmarks.quality's --out: f32.q4, evaluation.txt, calibration.txt, model.imatrix")
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache" / "tinyllm" / "grid_bounds")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    importance = read_imatrix(args.quality / "model.imatrix")
    print("| values of every matrix | delta PPL | mean KLD |\n|---|---|---|")
    for grid in GRIDS:
        for imp in (None, importance):
            label = grid + (" + imatrix" if imp is not None else "")
            ckpt = fake_quantized_checkpoint(args.out / label.replace(" + ", "_"), grid, imp)
            tinyllm("convert", ckpt, "-o", ckpt.with_suffix(".q4"), "--quant", "f32")
            print(score(label, ckpt.with_suffix(".q4"), args.quality), flush=True)
    rotated = hadamard_rotated_checkpoint(args.out / "hadamard")
    tinyllm("convert", rotated, "-o", args.out / "hadamard_f32.q4", "--quant", "f32")
    print(score("hadamard, f32", args.out / "hadamard_f32.q4", args.quality), flush=True)
    tinyllm("imatrix", args.out / "hadamard_f32.q4", args.quality / "calibration.txt", "-o",
            args.out / "hadamard.imatrix", "--covariance")
    for label, options in (("q4_0", ["--quant", "q4_0"]), ("q4_k", ["--quant", "q4_k"]),
                           ("q4_k + imatrix", ["--quant", "q4_k", "--imatrix", args.out / "hadamard.imatrix"]),
                           ("q4_k gptq + imatrix", ["--quant", "q4_k", "--quantizer", "gptq",
                                                    "--imatrix", args.out / "hadamard.imatrix"])):
        path = args.out / f"hadamard_{label.replace(' + ', '_').replace(' ', '_')}.q4"
        tinyllm("convert", rotated, "-o", path, *options)
        print(score(f"hadamard, {label}", path, args.quality), flush=True)


if __name__ == "__main__":
    main()
