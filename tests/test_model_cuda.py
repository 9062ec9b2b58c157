"""Whole tiny models on the device: the same logits and greedy tokens as on the CPU.

Tiny random checkpoints built from config alone (transformers), converted to q4_0 (with the
q8_0 edge tensors and f32 norms that implies), then run with ``device="cuda"`` and with the
NumPy reference backend, through the runtime's own ``logits``/``eval`` (prefill, then one
decode step per greedy token on the device KV cache). Without a GPU this runs under Numba's
CUDA simulator (see tests/cuda_support.py); the architectures between them use every kernel: GQA + RoPE +
RMSNorm + SwiGLU (LLaMA), partial RoPE + biased LayerNorm + tanh GELU + parallel residual
(GPT-J), ALiBi + clip_qkv + exact GELU (MPT).
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import tinyllm
from tinyllm.converters.convert import convert_hf

from .conftest import shared
from .cuda_support import cuda_backend
from .hf_oracle import save_random_model

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=512, bos_token_id=1, eos_token_id=2)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM",
             dict(n_embd=64, n_head=4, n_layer=1, rotary_dim=8, n_positions=64)),
    "mpt": ("MptConfig", "MptForCausalLM",
            dict(d_model=64, n_heads=4, n_layers=1, max_seq_len=64, attn_config={"alibi": True, "clip_qkv": 0.5})),
}
PROMPT = [1, 400, 301, 22, 87]   # 5 tokens: prefill takes the tiled matmul (> 4 tokens)
N_NEW = 3


def _checkpoint(arch: str, folder):
    """A tiny random checkpoint of ``arch`` converted to q4_0: the .q4 path."""
    config_cls, model_cls, kwargs = ARCHS[arch]
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**COMMON, **kwargs)).eval()
    tok = shared("stories260K-hf")
    save_random_model(model, folder, [tok / "tokenizer.model", tok / "tokenizer_config.json",
                                      tok / "special_tokens_map.json"])
    return convert_hf(folder, folder / "model.q4", quant="q4_0")


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, tmp_path_factory):
    cuda_backend()  # skip before building anything when there is no device
    return _checkpoint(request.param, tmp_path_factory.mktemp(request.param))


def test_device_generates_the_cpus_greedy_tokens(checkpoint):
    cpu = tinyllm.load(checkpoint, backend="numpy", n_ctx=16, cache_type="f32")  # the cuda backend's cache type
    gpu = tinyllm.load(checkpoint, device="cuda", n_ctx=16)
    assert gpu.ops.name == "cuda"
    tokens = list(PROMPT)
    want, got = cpu.logits(tokens), gpu.logits(tokens)          # prefill: logits at every position
    for step in range(N_NEW):
        assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max()), f"step {step}"
        assert got[-1].argmax() == want[-1].argmax(), f"greedy token {step}"
        tokens.append(int(want[-1].argmax()))
        want, got = cpu.eval(tokens)[None], gpu.eval(tokens)[None]   # one decode step on the cache
    assert gpu.tokens == tokens



def test_cli_generates_the_same_text_on_the_device(tmp_path):
    """`tinyllm generate --device cuda` end to end, in a fresh process (inheriting the
    simulator setting when there is no GPU), against the NumPy reference on the CPU."""
    cuda_backend()
    path = _checkpoint("llama", tmp_path)

    def generate(*device_args):
        run = subprocess.run([sys.executable, "-c", "from tinyllm.cli import main; main()", "generate", str(path),
                              "-p", "Once upon", "-n", "3", "--temperature", "0", "--ctx", "16", *device_args],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout

    assert generate("--device", "cuda") == generate("--device", "cpu", "--backend", "numpy")
