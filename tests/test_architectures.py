"""Every architecture against Hugging Face transformers, one runner over a table of tiny
random models built from config alone (as mlx-lm tests its models).

Each case: f32 logits within 1e-4 (whole-prompt prefill, and one token at a time through
the KV cache), 32 greedy tokens identical, q8_0 and q4_0 logits within the RMS tolerance.
"""
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

LLAMA = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=512, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
GPTJ = dict(n_embd=64, n_head=4, n_layer=2, vocab_size=512, n_positions=128, bos_token_id=1, eos_token_id=2)
MPT = dict(d_model=96, n_heads=6, n_layers=2, vocab_size=512, max_seq_len=128, bos_token_id=1, eos_token_id=2)
FALCON = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=512,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2)

# case -> (transformers model class, config, tokenizer folder in ../shared/models)
CASES = {
    "llama-mha-untied": ("LlamaForCausalLM", dict(LLAMA, num_key_value_heads=4, tie_word_embeddings=False),
                         "stories260K-hf"),
    "llama-gqa-tied": ("LlamaForCausalLM", dict(LLAMA, num_key_value_heads=2, tie_word_embeddings=True),
                       "stories260K-hf"),
    "llama-mqa-linear-rope": ("LlamaForCausalLM", dict(LLAMA, num_key_value_heads=1,
                              rope_scaling={"rope_type": "linear", "factor": 2.0}), "stories260K-hf"),
    "llama3-rope": ("LlamaForCausalLM", dict(LLAMA, num_key_value_heads=2, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
                    "stories260K-hf"),
    # head_dim 16, rotary on 8: the pass-through dims must stay where they are
    "gptj-partial-rotary": ("GPTJForCausalLM", dict(GPTJ, rotary_dim=8), "gpt-j-6b-tokenizer"),
    "gptj-full-rotary-exact-gelu-tied": ("GPTJForCausalLM", dict(GPTJ, rotary_dim=16, activation_function="gelu",
                                         tie_word_embeddings=True), "gpt-j-6b-tokenizer"),
    # 6 heads: the ALiBi slope rule for a head count that is no power of two
    "mpt-6-heads-clip-qkv": ("MptForCausalLM", dict(MPT, attn_config={"clip_qkv": 0.25}), "gpt-neox-20b-tokenizer-mpt"),
    "mpt-untied-softmax-scale": ("MptForCausalLM", dict(MPT, n_heads=4, tie_word_embeddings=False,
                                 attn_config={"softmax_scale": 0.3}), "gpt-neox-20b-tokenizer-mpt"),
    "falcon-7b-style": ("FalconForCausalLM", dict(FALCON, multi_query=True, parallel_attn=True),
                        "falcon-7b-instruct-tokenizer"),
    "falcon-40b-style": ("FalconForCausalLM", dict(FALCON, new_decoder_architecture=True, num_kv_heads=2,
                         rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 25000.0}),
                         "falcon-7b-instruct-tokenizer"),
    "falcon-40b-style-one-norm": ("FalconForCausalLM", dict(FALCON, new_decoder_architecture=True, num_kv_heads=2,
                                  num_ln_in_parallel_attn=1, ffn_hidden_size=96), "falcon-7b-instruct-tokenizer"),
    "falcon-sequential-mha-bias": ("FalconForCausalLM", dict(FALCON, multi_query=False, parallel_attn=False,
                                   bias=True, tie_word_embeddings=False), "falcon-7b-instruct-tokenizer"),
    "falcon-alibi-6-heads-bias": ("FalconForCausalLM", dict(FALCON, hidden_size=96, num_attention_heads=6,
                                  alibi=True, multi_query=False, bias=True), "falcon-7b-instruct-tokenizer"),
}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PROMPT = [1, 400, 301, 22, 87, 260, 511, 3, 270, 45, 300, 301, 99, 460, 12, 7, 33, 281]  # 18 tokens
# Quantized paths vs the f32 oracle: RMS(logit error) / std(logits), the bounds stated for
# LLaMA (~2x the measured rounding noise: 0.004-0.018 for q8_0, 0.15-0.27 for q4_0 here).
TOLERANCE = {"q8_0": 0.04, "q4_0": 0.40}


def tokenizer_files(folder: str) -> list:
    d = shared(folder)
    return [d / name for name in TOKENIZER_FILES if (d / name).is_file()]


class Converted:
    """A random transformers model, its checkpoint folder, and its conversions (made once)."""

    def __init__(self, model, folder, out):
        self.model, self.folder, self.out, self._paths = model, folder, out, {}
        self.expected = hf_logits(model, PROMPT)

    def load(self, quant: str, backend: str = "numpy", cache_type: str | None = "f32"):
        """The converted model; the oracle tests hold the exact (f32) KV cache, the default
        (f16, cache_type None) has its own test and tolerance."""
        if quant not in self._paths:
            self._paths[quant] = convert_hf(self.folder, self.out / f"m-{quant}.q4", quant=quant)
        return tinyllm.load(self._paths[quant], backend=backend, cache_type=cache_type)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    model_class, config, tokenizer = CASES[request.param]
    cls = getattr(transformers, model_class)
    model = cls(cls.config_class(**config)).eval()
    root = tmp_path_factory.mktemp(request.param)
    folder = save_random_model(model, root / "hf", tokenizer_files(tokenizer))
    return Converted(model, folder, root)


def test_f32_prefill_and_decode_match_transformers(case):
    m = case.load("f32")
    prefill = m.logits(PROMPT)
    assert np.abs(prefill - case.expected).max() < 1e-4
    m.reset()
    steps = np.stack([m.eval(PROMPT[:t + 1]) for t in range(len(PROMPT))])  # one token at a time
    assert np.abs(steps - case.expected).max() < 1e-4


def test_f32_greedy_matches_transformers(case):
    m = case.load("f32")
    ours = list(generate_ids(m, PROMPT[:6], 32, Sampler(SamplingParams(temperature=0)), stop_ids=[]))
    assert ours == hf_greedy(case.model, PROMPT[:6], 32)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_f16_cache_prefill_and_decode_close_to_transformers(case, backend):
    """An f16 KV cache rounds keys and values only: within a fortieth of q8_0's tolerance."""
    m = case.load("f32", backend, cache_type=None)
    assert m.cache_type == "f16"  # the default
    m.reset()
    steps = np.stack([m.eval(PROMPT[:t + 1]) for t in range(len(PROMPT))])  # decode reads the f16 cache
    for got in (m.logits(PROMPT), steps):
        rel = np.sqrt(np.mean((got - case.expected) ** 2)) / case.expected.std()
        assert 0 < rel < TOLERANCE["q8_0"] / 40, f"RMS error {rel:.5f} x std(logits)"


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_quantized_logits_close(case, quant):
    got = case.load(quant).logits(PROMPT)
    rel = np.sqrt(np.mean((got - case.expected) ** 2)) / case.expected.std()
    assert rel < TOLERANCE[quant], f"{quant}: RMS error {rel:.3f} x std(logits)"


def greedy_alone(m, prompt, n):
    """n greedy tokens and the logits that chose them, the sequence alone in the model's cache."""
    m.reset()
    seq, logits = list(prompt), []
    for _ in range(n):
        logits.append(m.eval(seq))
        seq.append(int(np.argmax(logits[-1])))
    return seq[len(prompt):], np.stack(logits)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_batched_decoding_matches_alone(case, backend):
    """Continuous batching: three sequences join at steps 0, 2 and 3 (prompts of 18, 5 and 11
    tokens, so steps mix a prefill with decodes) and leave when done; each gets the tokens it
    gets alone, from logits within 1e-4 (numpy: the same arithmetic; numba: a row's int8
    activation blocks do not depend on the other rows)."""
    m = case.load("q4_0", backend)
    prompts, joins, n = [PROMPT, PROMPT[3:8], PROMPT[7:]], [0, 2, 3], 8
    alone = [greedy_alone(m, p, n) for p in prompts]
    caches = [m.new_cache() for _ in prompts]
    seqs, logits, step = [list(p) for p in prompts], [[] for _ in prompts], 0
    while any(len(rows) < n for rows in logits):
        live = [i for i in range(len(prompts)) if joins[i] <= step and len(logits[i]) < n]
        for i, row in zip(live, m.eval_batch([caches[i] for i in live], [seqs[i] for i in live])):
            logits[i].append(row)
            seqs[i].append(int(np.argmax(row)))
        step += 1
    for i, (tokens, want) in enumerate(alone):
        assert seqs[i][len(prompts[i]):] == tokens
        assert np.abs(np.stack(logits[i]) - want).max() < 1e-4 * max(1.0, np.abs(want).max())
