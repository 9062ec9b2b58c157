"""SmolLM2-135M-Instruct (real, chat-tuned, GGUF Q4_1) from ../shared/models: its tokenizer,
chat template, tensors and answers, as its SOURCE.txt documents them."""
from __future__ import annotations

import numpy as np
import pytest

import tinyllm
from tinyllm.chat import render_template
from tinyllm.generate import GenerationStats, generate_ids
from tinyllm.kernels.quant import to_ggml_blocks
from tinyllm.sampling import Sampler, SamplingParams

from .conftest import shared
from .gguf_writer import T, gguf, llama_cpp_unpermute

QUESTION = "What is the capital of France?"
# SOURCE.txt: the rendered chat template (with its default system prompt), tokenized
PROMPT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
              8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
ANSWER_IDS = [504, 3575, 282, 4649, 314, 7042, 30]  # "The capital of France is Paris." then eos (2)
# Fast backend vs the NumPy reference over PROMPT_IDS: RMS(logit difference) / std(logits).
# The fast kernels quantize activations to 8 bits before each 4/8-bit product (as llama.cpp
# does). Measured: 0.048 over all 37 positions, worst single position 0.36; the NumPy reference
# with its activations rounded through q8_0 differs from itself by 0.042 overall, 0.24 at worst:
# the same noise. Bounds are ~2x the overall figure and 1.4x the worst position.
FAST_TOLERANCE_ALL, FAST_TOLERANCE_POSITION = 0.1, 0.5


@pytest.fixture(scope="module")
def gguf_path():
    return shared("smollm2-135m-instruct-q4_1-gguf", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def reference(gguf_path):
    """The model on the NumPy backend, with its logits over the prompt (the cache then holds it)."""
    model = tinyllm.load(gguf_path, backend="numpy")
    return model, model.logits(PROMPT_IDS)


def _prompt(model, question: str) -> list[int]:
    text = render_template(model.chat_template, [{"role": "user", "content": question}], add_generation_prompt=True)
    return model.tokenize(text, add_bos=False)


def test_chat_template_and_tokenizer_give_the_documented_prompt(reference):
    model, _ = reference
    text = render_template(model.chat_template, [{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face")
    assert model.tokenize(text, add_bos=False) == PROMPT_IDS
    assert model.detokenize(PROMPT_IDS) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    tok = model.tokenizer
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.vocab_size) == (1, [2], False, 49152)


def test_greedy_answer_on_reference_backend(reference):
    model, _ = reference
    stats = GenerationStats()
    ids = list(generate_ids(model, PROMPT_IDS, 12, Sampler(SamplingParams(temperature=0)), stats=stats))
    assert ids == ANSWER_IDS and stats.finish_reason == "eos"
    assert model.detokenize(ids) == "The capital of France is Paris."


def test_config_from_gguf_metadata(reference):
    model, _ = reference
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (100000.0, 1e-5, 8192)
    assert cfg.tie_word_embeddings and "output" not in model.file_tensors


def test_tensors_bit_exact_against_gguf_package(reference, gguf_path):
    """Every Q4_1/Q8_0 tensor keeps ggml's bytes (regrouped); sampled ones decode to exactly
    what gguf.quants decodes (q/k after undoing llama.cpp's row permutation)."""
    model, _ = reference
    reader = gguf.GGUFReader(gguf_path)
    ours = {"token_embd.weight": "tok_embeddings"}
    for i in range(30):
        ours.update({f"blk.{i}.{g}": f"layers.{i}.{t}" for g, t in (
            ("attn_v.weight", "attention.wv"), ("attn_output.weight", "attention.wo"),
            ("ffn_gate.weight", "feed_forward.w1"), ("ffn_down.weight", "feed_forward.w2"),
            ("ffn_up.weight", "feed_forward.w3"))})
    checked = 0
    for t in reader.tensors:
        if t.name in ours:
            ggml = to_ggml_blocks(model.file_tensors[ours[t.name]]).reshape(-1)
            assert np.array_equal(ggml, t.data.reshape(-1)), t.name
            checked += 1
    assert checked == 1 + 30 * 5
    by_name = {t.name: t for t in reader.tensors}
    for i in (0, 29):
        for g, name, heads in (("ffn_down", "feed_forward.w2", None), ("attn_q", "attention.wq", 9),
                               ("attn_k", "attention.wk", 3)):
            t = by_name[f"blk.{i}.{g}.weight"]
            assert t.tensor_type == T.Q4_1
            want = gguf.quants.dequantize(t.data, T.Q4_1)
            if heads:
                want = llama_cpp_unpermute(want, heads)
            assert np.array_equal(model.file_tensors[f"layers.{i}.{name}"].dequantize(), want), t.name


# -- the fast backend ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fast(gguf_path):
    pytest.importorskip("tinyllm.kernels.numba_cpu", reason="the Numba backend is not available")
    return tinyllm.load(gguf_path, backend="numba")


def test_fast_backend_logits_agree_with_reference(reference, fast):
    _, want = reference
    got = fast.logits(PROMPT_IDS)
    err = np.sqrt(np.mean((got - want) ** 2, axis=1)) / want.std(axis=1)  # per position
    overall = np.sqrt(np.mean((got - want) ** 2)) / want.std()
    assert overall < FAST_TOLERANCE_ALL, f"overall {overall:.3f}"
    assert err.max() < FAST_TOLERANCE_POSITION, f"worst position {err.argmax()}: {err.max():.3f}"


def test_fast_backend_names_the_planet(fast):
    answer = fast.generate(_prompt(fast, "Name the planet we live on."), max_new_tokens=24, temperature=0, stream=False)
    assert "Earth" in answer
