"""Two more routes toward issue 16's q4_k + imatrix target, measured on stories260K (experiments).

    python -m benchmarks.quality --only q4_0 q4_k --out DIR     # the texts, reference and imatrix
    python -m benchmarks.fold_and_tune --quality DIR [--steps 100] [--calibration TEXT]

``awq``: AWQ's idea (Lin et al., 2023). Each matrix's input channels are multiplied by scales s
and the op before divides by them (attention and FFN norm gains for q/k/v and gate/up, up's rows
for down, v's rows for o: one scale per key/value channel, shared by its query heads), exact in
float; s = rms(x)^alpha, alpha searched per group on the output error sum_rows dw^T H dw of the
shipped quantizer (q4_k gptq + imatrix on the scaled weights, the imatrix rescaled to match).

``tune``: the f32 norm gains (free parameters of every q4_k file: 11 x 64 floats here) fitted end
to end, by Adam on the mean KL divergence of the quantized model from the f32 one over the
calibration text, the quantized matrices fixed (transformers' LLaMA as the differentiable model:
needs the test extra). The matrices' codes do not depend on the gains, so reconverting the tuned
checkpoint with the same recipe gives the same matrices and the tuned gains.

``awq`` then ``tune``: the folded model's gains tuned the same way. Every file is scored as
benchmarks.quality scores files, on its held-out text.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.grid_bounds import write_checkpoint
from benchmarks.quality import STORIES, kl_report, tinyllm

RECIPE = ["--quant", "q4_k", "--quantizer", "gptq"]


def score(path: Path, quality: Path) -> str:
    get = kl_report(path, quality / "evaluation.txt", quality / "f32.q4")
    return f"delta PPL {get['PPL difference']}, mean KLD {get['Mean KLD']}, same top {get['Same top token']}"


def awq(weights: dict, imp: dict, cov: dict, cfg: dict, alphas) -> tuple[dict, dict]:
    """weights (HF names, float64) scaled in place; the imatrix means and covariances to match."""
    from tinyllm.kernels.gptq import gptq, output_error
    from tinyllm.kernels.quantizer import quantize_searched

    def error(ws, s, im, h):
        im2, h2 = (im / s**2).astype(np.float32), h / np.outer(s, s)
        total = 0.0
        for w in ws:
            t = gptq((w * s).astype(np.float32), h2, quantize_searched((w * s).astype(np.float32), "q4_k", im2))
            total += output_error(w, t.dequantize() / s, h).sum()
        return total

    def best_scales(ws, im, h, tie=lambda s: s):
        rms = np.sqrt(np.maximum(im, 1e-12))
        cands = [tie(rms ** a) for a in alphas]
        cands = [s / np.sqrt(s.max() * s.min()) for s in cands]
        return min(cands, key=lambda s: error(ws, s, im, h))   # alpha 0 (no scaling) is a candidate

    imp, cov = dict(imp), dict(cov)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg["hidden_size"] // heads
    rep = heads // kv

    def rescale(gguf_names, s):
        for g in gguf_names:
            imp[g], cov[g] = imp[g] / s**2, cov[g] / np.outer(s, s)

    for i in range(cfg["num_hidden_layers"]):
        p, g = f"model.layers.{i}.", f"blk.{i}."
        qkv = [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        s = best_scales([weights[n] for n in qkv], imp[g + "attn_q.weight"], cov[g + "attn_q.weight"])
        weights[p + "input_layernorm.weight"] /= s
        for n in qkv:
            weights[n] *= s
        rescale([g + "attn_q.weight", g + "attn_k.weight", g + "attn_v.weight"], s)
        gate_up = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        s = best_scales([weights[n] for n in gate_up], imp[g + "ffn_gate.weight"], cov[g + "ffn_gate.weight"])
        weights[p + "post_attention_layernorm.weight"] /= s
        for n in gate_up:
            weights[n] *= s
        rescale([g + "ffn_gate.weight", g + "ffn_up.weight"], s)
        s = best_scales([weights[p + "mlp.down_proj.weight"]], imp[g + "ffn_down.weight"], cov[g + "ffn_down.weight"])
        weights[p + "mlp.up_proj.weight"] /= s[:, None]
        weights[p + "mlp.down_proj.weight"] *= s
        rescale([g + "ffn_down.weight"], s)

        def shared_by_query_heads(s):   # (heads * head_dim,): one value per key/value channel
            t = s.reshape(kv, rep, head_dim).mean(axis=1)
            return np.repeat(t[:, None], rep, axis=1).reshape(-1)
        o = p + "self_attn.o_proj.weight"
        s = best_scales([weights[o]], imp[g + "attn_output.weight"], cov[g + "attn_output.weight"],
                        shared_by_query_heads)
        weights[p + "self_attn.v_proj.weight"] /= s.reshape(kv, rep, head_dim)[:, 0].reshape(-1)[:, None]
        weights[o] *= s
        rescale([g + "attn_output.weight"], s)
    return imp, cov


def tune_norms(source: Path, quantized: Path, calibration: Path, steps: int, lr: float) -> dict:
    """The norm gains of ``quantized`` fitted to the f32 ``source`` on ``calibration``: HF name -> values."""
    import torch
    from transformers import LlamaForCausalLM

    import tinyllm as t
    from tinyllm.converters.llama import LAYER_TENSORS

    torch.manual_seed(0)
    ref = LlamaForCausalLM.from_pretrained(source, torch_dtype=torch.float32).eval()
    model = LlamaForCausalLM.from_pretrained(source, torch_dtype=torch.float32)
    q = t.load(quantized)
    hf = {ours: name for name, ours in LAYER_TENSORS.items() if "norm" not in ours}   # the matrices: ours -> HF
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in q.file_tensors.items():
            layer, _, rest = name.removeprefix("layers.").partition(".")
            key = "model.embed_tokens.weight" if name == "tok_embeddings" else \
                f"model.layers.{layer}.{hf[rest]}" if rest in hf else None
            if key is not None:
                state[key].copy_(torch.from_numpy(np.array(tensor.dequantize(), np.float32)).reshape(state[key].shape))
    gains = [p for n, p in model.named_parameters() if "norm" in n]
    for p in model.parameters():
        p.requires_grad_(any(p is g for g in gains))
    ids = q.tokenize(calibration.read_text(), special=False)
    x = torch.tensor([[1] + ids[i:i + 511] for i in range(0, len(ids) - 512, 511)])   # BOS + 511 per window
    with torch.no_grad():
        logp_ref = torch.log_softmax(ref(x).logits, -1)
    opt = torch.optim.Adam(gains, lr=lr)
    for step in range(steps):
        opt.zero_grad()
        loss = (logp_ref.exp() * (logp_ref - torch.log_softmax(model(x).logits, -1))).sum(-1).mean()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            print(f"  step {step}: calibration KLD {loss.item():.5f}", flush=True)
    return {n: p.detach().numpy().astype(np.float32) for n, p in model.named_parameters() if "norm" in n}


def main() -> None:
    import json

    from safetensors.numpy import load_file

    from tinyllm.converters.convert import convert_hf
    from tinyllm.converters.recipe import Recipe
    from tinyllm.imatrix import read_covariances, read_imatrix

    ap = argparse.ArgumentParser()
    ap.add_argument("--quality", type=Path, required=True, help="a benchmarks.quality --out directory")
    ap.add_argument("--calibration", type=Path, default=None, help="tuning text (default: DIR/calibration.txt)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    d = args.quality
    cfg = json.loads((STORIES / "config.json").read_text())
    imatrix = d / "model.imatrix"
    imp = read_imatrix(imatrix)
    cov = read_covariances(imatrix, imp)
    cov = {k: cov[k] for k in cov}
    original = load_file(STORIES / "model.safetensors")
    weights = {k: v.astype(np.float64) for k, v in original.items()}

    def checkpoint(path: Path, tensors: dict) -> Path:
        return write_checkpoint(path, tensors, cfg)

    shipped = d / "fold_shipped.q4"
    tinyllm("convert", STORIES, "-o", shipped, *RECIPE, "--imatrix", imatrix)
    print("q4_k gptq + imatrix (shipped):", score(shipped, d))

    scaled_imp, scaled_cov = awq(weights, imp, cov, cfg, np.linspace(0, 1, 11))
    folded_recipe = Recipe("q4_k", "gptq", {k: v.astype(np.float32) for k, v in scaled_imp.items()}, scaled_cov)

    def folded(name: str, tensors: dict) -> Path:   # the folded model's imatrix steers its quantizer
        (d / f"{name}.q4").unlink(missing_ok=True)
        return convert_hf(checkpoint(d / f"{name}.hf", tensors), d / f"{name}.q4", recipe=folded_recipe)

    awq_file = folded("fold_awq", weights)
    print("awq scales folded, then the same:", score(awq_file, d))

    calibration = args.calibration or d / "calibration.txt"
    gains = tune_norms(STORIES, shipped, calibration, args.steps, args.lr)
    tuned = d / "fold_tuned.q4"
    tinyllm("convert", checkpoint(d / "fold_tuned.hf", {**original, **gains}), "-o", tuned, *RECIPE,
            "--imatrix", imatrix)
    print("shipped matrices, norm gains tuned end to end:", score(tuned, d))

    gains = tune_norms(d / "fold_awq.hf", awq_file, calibration, args.steps, args.lr)
    print("awq folded, then norm gains tuned:", score(folded("fold_awq_tuned", {**weights, **gains}), d))


if __name__ == "__main__":
    main()
