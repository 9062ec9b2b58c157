"""Learned rounding: a converted file's codes and scales fitted to the original model end to end.

`tinyllm convert SRC --quant q4_k ... --learn-rounding TEXT` converts as usual, then fits the
result to SRC (AutoRound's idea, Cheng et al. 2023, with the whole model as the block). Every
block-quantized matrix (q4_0, q4_1, q4_k, q6_k) is a grid of codes times float16 scales
(block_grid), and three things in it are learned by Adam on the mean KL divergence of the
quantized model from the original over windows of the calibration text, the learning rate
falling linearly to 0:

- every code q = clamp(q0 + round(v), 0, top), one float v per weight starting at 0 and
  kept in [-1, 1]: a code moves at most one step from where the quantizer put it; round() is
  passed straight through in the backward pass;
- every float16 scale and minimum (q4_k: each super-block's d and dmin, q6_k: its d; their
  6-bit and 8-bit block scales are kept), each times a learned factor;
- the f32 norm gains.

Every other tensor (q8_0 embeddings and heads, f16) is kept as it is, so the output is
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
from tinyllm.kernels.gptq import GPTQ_FORMATS, TOP_CODE, with_codes
from tinyllm.kernels.gptq import codes as codes_of
from tinyllm.kernels.quant import SUPER, QTensor, n_blocks, quantize, unpack_scales

WINDOW = 512       # tokens per calibration window, BOS first
STEPS = 400
BATCH = 16         # windows per step
LR_CODES = 5e-3    # v moves about lr per step under Adam: a code can move after ~100 steps
LR_SCALES = 1e-3   # the d / dmin factors and the norm gains
KEPT_BYTES = 2**30  # the original's log-probabilities are computed once for every window up to this size


LEARNED = GPTQ_FORMATS   # the formats of integer codes on a grid (kernels/gptq.py): codes and heads learned


def check_settings(steps: int, batch: int = BATCH) -> None:
    if steps < 1:
        raise TinyLLMError(f"--learn-steps must be at least 1 (got {steps})")
    if batch < 1:
        raise TinyLLMError(f"the batch must be at least 1 window (got {batch})")


def block_grid(t: QTensor) -> dict:
    """A block-quantized tensor as x = (h[i, 0] a) (q - c) - h[i, 1] b per group of weights (a
    block of 32; q6_k: a half-block of 16), h its float16 "heads" (scales, minimums), i the head
    of each group, a and b fixed multipliers per group:

        q4_0  x = d (q - 8)                h = (d, 0) per block        a = 1,  b = 0, c = 8
        q4_1  x = d q + m                  h = (d, -m) per block       a = 1,  b = 1, c = 0
        q4_k  x = (d sc) q - (dmin mn)     h = (d, dmin) per super-block, a, b its 6-bit sc, mn
        q6_k  x = (d sc) (q - 32)          h = (d, 0) per super-block, a its 8-bit sc per half

    codes q (rows, nb, groups, 32 / groups) float32; i, a, b (rows, nb, groups); the products
    are ggml's, so the grid decodes to the tensor exactly."""
    rows, cols = t.shape
    nb = n_blocks(cols)
    g = np.arange(rows)[:, None] * nb + np.arange(nb)                              # flat block index
    sb, k = (g // SUPER)[..., None], (g % SUPER)[..., None]                         # (rows, nb, 1)
    ones = np.ones((rows, nb, 1), np.float32)
    codes = codes_of(t).astype(np.float32)                                          # (rows, nb, 32)
    if t.format == "q6_k":
        d = np.asarray(t.parts["d"], np.float32)                                     # (nsb, 1)
        half = 2 * k + np.arange(2)                                                  # (rows, nb, 2)
        return {"codes": codes.reshape(rows, nb, 2, 16), "c": np.float32(32),
                "a": np.asarray(t.parts["scales"])[sb, half].astype(np.float32), "b": np.zeros(half.shape, np.float32),
                "h": np.concatenate([d, np.zeros_like(d)], axis=1), "i": np.broadcast_to(sb, half.shape)}
    codes = codes[:, :, None]
    if t.format == "q4_k":
        sc, mn = unpack_scales(np.asarray(t.parts["scales"]))                         # (nsb, 8) each
        return {"codes": codes, "a": sc[sb, k].astype(np.float32), "b": mn[sb, k].astype(np.float32),
                "c": np.float32(0), "h": np.asarray(t.parts["d"], np.float32), "i": sb}
    d = np.asarray(t.parts["d"], np.float32).reshape(-1)
    m = np.zeros_like(d) if t.format == "q4_0" else -np.asarray(t.parts["m"], np.float32).reshape(-1)
    return {"codes": codes, "a": ones, "b": ones * (t.format == "q4_1"), "c": np.float32(8 * (t.format == "q4_0")),
            "h": np.stack([d, m], axis=1), "i": g[..., None]}


def decode(g: dict, h, codes):
    """The grid's weights (rows, nb * 32) from heads h and codes (NumPy arrays or torch tensors alike)."""
    x = (h[g["i"], 0] * g["a"])[..., None] * (codes - g["c"]) - (h[g["i"], 1] * g["b"])[..., None]
    return x.reshape(x.shape[0], -1)


def with_grid(t: QTensor, codes: np.ndarray, h: np.ndarray) -> QTensor:
    """``t`` with new codes and heads h (see block_grid), its other parts kept."""
    rows, nb = codes.shape[:2]
    parts = dict(with_codes(t, np.clip(np.rint(codes), 0, TOP_CODE[t.format]).reshape(rows, nb, 32)).parts)
    h16 = h.astype(np.float16)
    if t.format in ("q4_k", "q6_k"):    # the super-blocks' heads: (d, dmin), or d
        parts["d"] = np.ascontiguousarray(h16[:, :t.parts["d"].shape[1]])
    else:                               # one head (and a minimum) per block
        parts["d"] = np.ascontiguousarray(h16[:, 0].reshape(t.parts["d"].shape))
        if t.format == "q4_1":
            parts["m"] = np.ascontiguousarray((-h16[:, 1]).reshape(t.parts["m"].shape))
    return QTensor(t.format, t.shape, parts)


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
    its codes, their float16 scales and the norm gains fitted to ``src`` on ``text``.
    ``progress(step, steps, kld)`` after each step (kld: that step's batch mean KLD)."""
    from tinyllm.fileformat import ModelFile, ModelWriter
    from tinyllm.tokenizer import Tokenizer

    q = ModelFile(start)
    if q.metadata.get("architecture") != "llama":
        raise TinyLLMError(f"--learn-rounding reads LLaMA-family checkpoints; {src} is "
                           f"{q.metadata.get('architecture')}")
    if not any(t.format in LEARNED for t in q.tensors.values()):
        raise TinyLLMError("--learn-rounding fits block-quantized matrices: give --quant q4_0, q4_1, q4_k, q6_k, "
                           "q4_k_s or q4_k_m")
    check_settings(steps, batch)
    tokenizer = Tokenizer.from_spec(q.metadata["tokenizer"])
    ids = tokenizer.encode(text, add_bos=False, parse_special=False)
    span = WINDOW - (tokenizer.bos_id is not None)   # text tokens per window
    n = len(ids) // span
    if n < 1:
        raise TinyLLMError(f"the calibration text has {len(ids)} tokens; learned rounding needs at least {WINDOW}")
    torch, transformers = check_torch()
    from torch.func import functional_call

    hf = _hf_names(q.metadata["config"])
    transformers.utils.logging.disable_progress_bar()
    new = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)   # torch_dtype renamed dtype
    as_f32 = {"dtype" if new else "torch_dtype": torch.float32}
    teacher = transformers.AutoModelForCausalLM.from_pretrained(src, **as_f32).eval()
    student = transformers.AutoModelForCausalLM.from_pretrained(src, **as_f32).eval()
    for p in [*teacher.parameters(), *student.parameters()]:
        p.requires_grad_(False)

    grids, moves, factors, gains, fixed = {}, {}, {}, {}, {}
    for name, t in q.tensors.items():
        if t.format in LEARNED:
            g = grids[name] = {k: torch.as_tensor(np.array(v)) for k, v in block_grid(t).items()}
            moves[name] = torch.zeros_like(g["codes"], requires_grad=True)
            factors[name] = torch.ones_like(g["h"], requires_grad=True)
        elif t.format == "f32" and len(t.shape) == 1:
            gains[name] = torch.tensor(np.array(t.dequantize(), np.float32), requires_grad=True)
        else:
            fixed[name] = torch.tensor(np.array(t.dequantize(), np.float32))

    def codes(name, straight_through=True):
        v = moves[name]
        step = v + (torch.round(v) - v).detach() if straight_through else torch.round(v)
        return torch.clamp(grids[name]["codes"] + step, 0, TOP_CODE[q.tensors[name].format])

    def weights() -> dict:
        """Hugging Face name -> the quantized model's tensor, differentiable in codes, scales and gains."""
        out = {hf[n]: v for n, v in {**fixed, **gains}.items()}
        for name, g in grids.items():
            out[hf[name]] = decode(g, g["h"] * factors[name], codes(name))[:, :q.tensors[name].shape[1]]
        return out

    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    windows = torch.tensor([bos + ids[i * span:(i + 1) * span] for i in range(n)])

    def reference(pick):   # the original's log-probabilities (windows, 512, vocab)
        with torch.no_grad():
            return torch.log_softmax(teacher(windows[pick]).logits, -1)
    kept = None            # those of every window, computed once while they fit in KEPT_BYTES
    if n * WINDOW * q.metadata["config"]["vocab_size"] * 4 <= KEPT_BYTES:
        kept = torch.cat([reference(slice(i, i + batch)) for i in range(0, n, batch)])
    opt = torch.optim.Adam([{"params": list(moves.values()), "lr": lr_codes},
                            {"params": [*factors.values(), *gains.values()], "lr": lr_scales}])
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    rng = np.random.default_rng(0)
    for step in range(steps):
        pick = torch.from_numpy(rng.permutation(n)[:batch])
        logp_ref = kept[pick] if kept is not None else reference(pick)
        logp = torch.log_softmax(functional_call(student, weights(), (windows[pick],)).logits, -1)
        kld = (logp_ref.exp() * (logp_ref - logp)).sum(-1).mean()
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
                t = with_grid(t, codes(name, False).numpy(), (grids[name]["h"] * factors[name]).numpy())
            elif name in gains:
                t = quantize(gains[name].numpy(), "f32")
            writer.add(name, t)
    return out
