"""LLaMA against Hugging Face transformers on tiny random models built from config alone."""
from __future__ import annotations

import numpy as np
import pytest

import tinyllm
from tinyllm.converters.convert import convert_hf
from tinyllm.generate import generate_ids
from tinyllm.sampling import Sampler, SamplingParams

from .conftest import shared
from .hf_oracle import hf_greedy, hf_logits, save_random_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=512, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
VARIANTS = {
    "mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mqa-linear-rope": dict(num_key_value_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama3-rope": dict(num_key_value_heads=2, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}
PROMPT = [1, 400, 301, 22, 87, 260, 511, 3, 270, 45, 300, 301, 99, 460, 12, 7, 33, 281]  # 18 tokens
# Quantized paths vs the f32 oracle: RMS(logit error) / std(logits). Rounding a Gaussian
# weight to q8_0's grid (step max/127) adds ~0.6% noise per weight, to q4_0's (step max/8)
# ~9%; through a random two-layer model that measured 0.018 (q8_0) and 0.21-0.27 (q4_0).
# The bounds are ~2x that: they catch a wrong block, scale or nibble, not rounding.
TOLERANCE = {"q8_0": 0.04, "q4_0": 0.40}


def _tokenizer_files():
    d = shared("stories260K-hf")
    return [d / "tokenizer.model", d / "tokenizer_config.json", d / "special_tokens_map.json"]


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_llama(request, tmp_path_factory):
    cfg = transformers.LlamaConfig(**BASE, **VARIANTS[request.param])
    model = transformers.LlamaForCausalLM(cfg).eval()
    folder = save_random_model(model, tmp_path_factory.mktemp(request.param), _tokenizer_files())
    return model, folder


def _convert(folder, quant, tmp_path):
    return tinyllm.load(convert_hf(folder, tmp_path / f"m-{quant}.q4", quant=quant), backend="numpy")


def test_f32_prefill_and_decode_match_transformers(hf_llama, tmp_path):
    model, folder = hf_llama
    expected = hf_logits(model, PROMPT)
    m = _convert(folder, "f32", tmp_path)
    prefill = m.logits(PROMPT)
    assert np.abs(prefill - expected).max() < 1e-4
    m.reset()
    steps = np.stack([m.eval(PROMPT[:t + 1]) for t in range(len(PROMPT))])  # one token at a time
    assert np.abs(steps - expected).max() < 1e-4


def test_f32_greedy_matches_transformers(hf_llama, tmp_path):
    model, folder = hf_llama
    m = _convert(folder, "f32", tmp_path)
    greedy = Sampler(SamplingParams(temperature=0))
    ours = list(generate_ids(m, PROMPT[:6], 32, greedy, stop_ids=[]))
    assert ours == hf_greedy(model, PROMPT[:6], 32)


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_quantized_logits_close(hf_llama, tmp_path, quant):
    model, folder = hf_llama
    expected = hf_logits(model, PROMPT)
    got = _convert(folder, quant, tmp_path).logits(PROMPT)
    rel = np.sqrt(np.mean((got - expected) ** 2)) / expected.std()
    assert rel < TOLERANCE[quant], f"{quant}: RMS error {rel:.3f} x std(logits)"
