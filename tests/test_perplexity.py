"""Perplexity as llama.cpp computes it, against the same computation on transformers' logits."""
from __future__ import annotations

import math

import numpy as np
import pytest
from click.testing import CliRunner

import tinyllm
from tinyllm.cli import main
from tinyllm.converters.convert import convert_hf
from tinyllm.perplexity import perplexity, token_nll, windows

from .conftest import shared
from .hf_oracle import hf_logits, save_random_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
        "friends. One day, she saw a big red ball under a tree. She ran to get it, but a small dog got there first. "
        "The dog wagged its tail and looked at Lily. Lily laughed and threw the ball far away. The dog ran after it "
        "and brought it back. They played all day until the sun went down. Then Lily went home and told her mom "
        "about her new friend. Her mom smiled and said she could play with the dog again tomorrow.")
N_CTX = 32


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = shared("stories260K-hf")
    folder = save_random_model(model, tmp_path_factory.mktemp("ppl-hf"),
                               [d / "tokenizer.model", d / "tokenizer_config.json", d / "special_tokens_map.json"])
    return model, folder


@pytest.fixture(scope="module")
def ours(hf_model, tmp_path_factory):
    path = convert_hf(hf_model[1], tmp_path_factory.mktemp("ppl") / "random.q4", quant="f32")
    return tinyllm.load(path, backend="numpy")


def _reference(model, tokens, n_ctx):
    """llama.cpp's perplexity loop, written out on transformers' logits."""
    first, nll = n_ctx // 2, []
    for i in range(len(tokens) // n_ctx):
        window = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        window[0] = 1  # BOS
        logp = torch.log_softmax(torch.from_numpy(hf_logits(model, window)).double(), dim=-1).numpy()
        nll += [-logp[j, window[j + 1]] for j in range(first, n_ctx - 1)]
    nll = np.array(nll)
    ppl = math.exp(nll.mean())
    return ppl, ppl * math.sqrt((np.mean(nll ** 2) - nll.mean() ** 2) / (len(nll) - 1)), len(nll)


def test_perplexity_matches_transformers(hf_model, ours):
    model, folder = hf_model
    tokens = transformers.AutoTokenizer.from_pretrained(folder)(TEXT)["input_ids"]  # BOS + text
    assert ours.tokenize(TEXT) == tokens
    assert len(tokens) // N_CTX >= 3
    ppl, se, count = _reference(model, tokens, N_CTX)
    result = perplexity(ours, TEXT, n_ctx=N_CTX)
    assert result.tokens == count == (len(tokens) // N_CTX) * (N_CTX - 1 - N_CTX // 2)
    assert abs(result.perplexity - ppl) / ppl < 1e-3
    assert abs(result.stderr - se) / se < 1e-3
    assert len(result.running) == len(tokens) // N_CTX and result.running[-1] == result.perplexity


def test_windows_start_with_bos(ours):
    tokens = ours.tokenize(TEXT)
    chunks = windows(ours, tokens, N_CTX)
    assert all(w[0] == 1 and len(w) == N_CTX for w in chunks)
    assert [w[1:] for w in chunks] == [tokens[i * N_CTX + 1:(i + 1) * N_CTX] for i in range(len(chunks))]
    assert len(windows(ours, tokens, N_CTX, max_chunks=2)) == 2


def test_token_nll_is_cross_entropy():
    logits = np.random.default_rng(0).normal(size=(5, 11)).astype(np.float32)
    targets = [0, 3, 10, 4, 4]
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits).double(), torch.tensor(targets),
                                                 reduction="none").numpy()
    assert np.allclose(token_nll(logits, targets), expected, atol=1e-12)


def test_bad_input(ours):
    with pytest.raises(tinyllm.TinyLLMError, match="at least 220 tokens .* context of 110; .* only 205"):
        perplexity(ours, TEXT, n_ctx=110)
    with pytest.raises(tinyllm.TinyLLMError, match="exceeds the model's context"):
        perplexity(ours, TEXT * 20, n_ctx=4096)
    with pytest.raises(tinyllm.TinyLLMError, match="at least 1"):
        perplexity(ours, TEXT, n_ctx=N_CTX, max_chunks=0)


def test_cli(ours, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    result = CliRunner().invoke(main, ["perplexity", str(ours.path), str(text), "--ctx", str(N_CTX),
                                       "--backend", "numpy"])
    assert result.exit_code == 0, result.output
    expected = perplexity(ours, TEXT, n_ctx=N_CTX)
    assert f"Final estimate: PPL = {expected.perplexity:.4f} +/- {expected.stderr:.5f}" in result.output
    assert f"[1]{expected.running[0]:.4f}," in result.output
    missing = CliRunner().invoke(main, ["perplexity", str(ours.path), str(tmp_path / "nope.txt")])
    assert missing.exit_code == 1 and "cannot read" in missing.output
    short = CliRunner().invoke(main, ["perplexity", str(ours.path), str(text), "--backend", "numpy"])
    assert short.exit_code == 1 and "you need at least" in short.output
