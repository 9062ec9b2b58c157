"""Learned rounding: a converted file's q4_k codes and scales fitted to the original model end to end.

`tinyllm convert SRC --quant q4_k ... --learn-rounding TEXT` converts as usual, then fits the
result to SRC (AutoRound's idea, Cheng et al. 2023, with the whole model as the block). Each
q4_k matrix is x = (d sc) q - (dmin mn) per block of 32 (kernels/quant.py), and three things
in it are learned by Adam on the mean KL divergence of the quantized model from the original
over windows of the calibration text, the learning rate falling linearly to 0:

- every 4-bit code q = clamp(q0 + round(v), 0, 15), one float v per weight starting at 0 and
  kept in [-1, 1]: a code moves at most one step from where the quantizer put it; round() is
  passed straight through in the backward pass;
- every super-block's float16 d and dmin, each times a learned factor (the 6-bit sc and mn
  are kept);
- the f32 norm gains.

Every other tensor (q8_0 embeddings, a mix's q6_k tensors) is kept as it is, so the output is
the same format, size and mix as the input. The gradients come from PyTorch, with transformers'
model of SRC's architecture as the differentiable function (the `tune` extra: torch and
transformers); the original is SRC read by transformers in float32. LLaMA-family checkpoints
only: their tensors map one to one onto tinyllm's (converters/llama.py).

Cost: every step is a forward and backward pass over ``batch`` windows of 512 tokens, so it is
practical for small models (stories260K: 400 steps in about 4 minutes on 2 cores); big models
would need AutoRound's layer-by-layer form, not built.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tinyllm.errors import TinyLLMError
from tinyllm.kernels.quant import SUPER, QTensor, _pack_nibbles, _unpack_nibbles, n_blocks, quantize, unpack_scales

WINDOW = 512       # tokens per calibration window, BOS first
STEPS = 400
BATCH = 16         # windows per step
LR_CODES = 5e-3    # v moves about lr per step under Adam: a code can move after ~100 steps
LR_SCALES = 1e-3   # the d / dmin factors and the norm gains


def q4_k_grid(t: QTensor) -> dict:
    """A q4_k tensor as x = d[sb, 0] sc q - d[sb, 1] mn per block: codes q (rows, nb, 32), the 6-bit
    sc and mn (rows, nb), d (nsb, 2) float32, sb (rows, nb) the super-block of each block."""
    rows, cols = t.shape
    g = np.arange(rows)[:, None] * n_blocks(cols) + np.arange(n_blocks(cols))   # flat block index
    sc, mn = unpack_scales(np.asarray(t.parts["scales"]))                         # (nsb, 8) each
    sb, k = g // SUPER, g % SUPER
    return {"codes": _unpack_nibbles(np.asarray(t.parts["qs"])).astype(np.float32),
            "sc": sc[sb, k].astype(np.float32), "mn": mn[sb, k].astype(np.float32),
            "d": np.asarray(t.parts["d"], np.float32), "sb": sb}


def with_codes(t: QTensor, codes: np.ndarray, d: np.ndarray) -> QTensor:
    """``t`` with new codes (rows, nb, 32) and super-block scales d (nsb, 2), its 6-bit block scales kept."""
    qs = _pack_nibbles(np.clip(np.rint(codes), 0, 15).astype(np.uint8))
    return QTensor("q4_k", t.shape, dict(t.parts, qs=qs, d=np.ascontiguousarray(d.astype(np.float16))))


def check_torch():
    """PyTorch and transformers, or a clear error saying how to get them."""
    try:
        import torch
        import transformers
    except ImportError:
        raise TinyLLMError("--learn-rounding needs PyTorch and transformers: pip install 'tinyllm[tune]'") from None
    return torch, transformers


def _hf_names(cfg: dict) -> dict:
    """tinyllm tensor name -> the Hugging Face parameter it is (converters/llama.py's plan)."""
    from tinyllm.arch import get_arch
    from tinyllm.converters.llama import tensor_plan

    return {ours: hf for ours, hf, _ in tensor_plan(get_arch("llama").Config(**cfg))}


def learn_rounding(src: Path, start: Path, text: str, out: Path, steps: int = STEPS, batch: int = BATCH,
                   lr_codes: float = LR_CODES, lr_scales: float = LR_SCALES, progress=None) -> Path:
    """Write ``out``: the .q4 file ``start`` (converted from the checkpoint directory ``src``) with
    its q4_k codes, super-block scales and norm gains fitted to ``src`` on ``text``.
    ``progress(step, steps, kld)`` after each step (kld: that step's batch mean KLD)."""
    from tinyllm.fileformat import ModelFile, ModelWriter
    from tinyllm.tokenizer import Tokenizer

    q = ModelFile(start)
    if q.metadata.get("architecture") != "llama":
        raise TinyLLMError(f"--learn-rounding reads LLaMA-family checkpoints; {src} is "
                           f"{q.metadata.get('architecture')}")
    if not any(t.format == "q4_k" for t in q.tensors.values()):
        raise TinyLLMError("--learn-rounding fits q4_k matrices: give --quant q4_k, q4_k_s or q4_k_m")
    if steps < 1:
        raise TinyLLMError(f"--learn-steps must be at least 1 (got {steps})")
    if batch < 1:
        raise TinyLLMError(f"the batch must be at least 1 window (got {batch})")
    tokenizer = Tokenizer.from_spec(q.metadata["tokenizer"])
    ids = tokenizer.encode(text, add_bos=False, parse_special=False)
    span = WINDOW - (tokenizer.bos_id is not None)   # text tokens per window
    n = len(ids) // span
    if n < 1:
        raise TinyLLMError(f"the calibration text has {len(ids)} tokens; learned rounding needs at least {WINDOW}")
    torch, transformers = check_torch()
    from torch.func import functional_call

    hf = _hf_names(q.metadata["config"])
    teacher = transformers.AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    student = transformers.AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    for p in [*teacher.parameters(), *student.parameters()]:
        p.requires_grad_(False)

    grids, moves, factors, gains, fixed = {}, {}, {}, {}, {}
    for name, t in q.tensors.items():
        if t.format == "q4_k":
            g = grids[name] = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in q4_k_grid(t).items()}
            moves[name] = torch.zeros_like(g["codes"], requires_grad=True)
            factors[name] = torch.ones_like(g["d"], requires_grad=True)
        elif t.format == "f32" and len(t.shape) == 1:
            gains[name] = torch.tensor(np.array(t.dequantize(), np.float32), requires_grad=True)
        else:
            fixed[name] = torch.tensor(np.array(t.dequantize(), np.float32))

    def codes(name, straight_through=True):
        v = moves[name]
        step = v + (torch.round(v) - v).detach() if straight_through else torch.round(v)
        return torch.clamp(grids[name]["codes"] + step, 0, 15)

    def weights() -> dict:
        """Hugging Face name -> the quantized model's tensor, differentiable in codes, scales and gains."""
        out = {hf[n]: v for n, v in {**fixed, **gains}.items()}
        for name, g in grids.items():
            d = g["d"] * factors[name]                                              # (nsb, 2)
            x = (d[g["sb"], 0] * g["sc"])[..., None] * codes(name) - (d[g["sb"], 1] * g["mn"])[..., None]
            rows, cols = q.tensors[name].shape
            out[hf[name]] = x.reshape(rows, -1)[:, :cols]
        return out

    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    windows = torch.tensor([bos + ids[i * span:(i + 1) * span] for i in range(n)])
    with torch.no_grad():
        logp_ref = torch.cat([torch.log_softmax(teacher(w).logits, -1) for w in windows.split(batch)])
    opt = torch.optim.Adam([{"params": list(moves.values()), "lr": lr_codes},
                            {"params": [*factors.values(), *gains.values()], "lr": lr_scales}])
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    rng = np.random.default_rng(0)
    for step in range(steps):
        pick = torch.from_numpy(rng.permutation(n)[:batch])
        logp = torch.log_softmax(functional_call(student, weights(), (windows[pick],)).logits, -1)
        kld = (logp_ref[pick].exp() * (logp_ref[pick] - logp)).sum(-1).mean()
        opt.zero_grad()
        kld.backward()
        opt.step()
        decay.step()
        with torch.no_grad():
            for v in moves.values():
                v.clamp_(-1, 1)
        if progress:
            progress(step + 1, steps, kld.item())

    metadata = {k: v for k, v in q.metadata.items() if k not in ("format_version", "tensors")}
    with torch.no_grad(), ModelWriter(out, metadata) as writer:
        for name, t in q.tensors.items():
            if name in grids:
                t = with_codes(t, codes(name, False).numpy(), (grids[name]["d"] * factors[name]).numpy())
            elif name in gains:
                t = quantize(gains[name].numpy(), "f32")
            writer.add(name, t)
    return out
