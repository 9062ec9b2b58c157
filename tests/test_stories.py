"""Golden end-to-end test: the real trained stories260K reproduces llama2.c's output."""
from __future__ import annotations

import numpy as np
import pytest

import tinyllm
from tinyllm.converters.convert import convert_hf
from tinyllm.generate import generate_ids
from tinyllm.sampling import Sampler, SamplingParams

# karpathy/llama2.c test_all.py: greedy, 200 steps from BOS
EXPECTED = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
            "One day, she saw a big, red ball. She wanted to play with it, but it was too high.\nLily's mom said, "
            "\"Lily, let's go to the park.\" Lily was sad and didn't know what to do. She said, \"I want to play "
            "with your ball, but I can't find it.\"\nLily was sad and didn't know what to do. She said, \"I'm sorry, "
            "Lily. I didn't know what to do.\"\nLily didn't want to help her mom, so she")


@pytest.fixture(scope="module")
def converted(stories_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("stories")
    return {q: convert_hf(stories_hf, out / f"stories-{q}.q4", quant=q) for q in ("f32", "q8_0", "q4_0")}


def _greedy_text(path, steps=200):
    m = tinyllm.load(path, backend="numpy")
    ids = list(generate_ids(m, [m.tokenizer.bos_id], steps, Sampler(SamplingParams(temperature=0)), stop_ids=[]))
    return m.tokenizer.decode(ids)


def test_f32_greedy_reproduces_llama2c(converted):
    assert _greedy_text(converted["f32"]) == EXPECTED


def test_q8_0_follows_llama2c_except_at_near_ties(converted):
    """Teacher-forced over llama2.c's 200 tokens, the q8_0 model picks the same token at
    every step whose f32 margin (best minus second-best logit) is not a near-tie. The
    real model has one: at step 114 the f32 margin is 0.042 and q8_0 rounding flips it,
    so free-running greedy q8_0 text departs from the expected text there."""
    f32 = tinyllm.load(converted["f32"], backend="numpy")
    q8 = tinyllm.load(converted["q8_0"], backend="numpy")
    ids = [f32.tokenizer.bos_id] + f32.tokenizer.encode(EXPECTED, add_bos=False)
    assert len(ids) == 201
    ref, got = f32.logits(ids[:-1]), q8.logits(ids[:-1])        # (200, vocab) each
    assert (ref.argmax(-1) == ids[1:]).all()                     # f32 is exactly llama2.c
    top2 = np.sort(ref, axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    flipped = got.argmax(-1) != ref.argmax(-1)
    assert flipped.sum() <= 2 and (margin[flipped] < 0.05).all()
    assert np.sqrt(np.mean((got - ref) ** 2)) / ref.std() < 0.04  # the tolerance stated for q8_0


def test_q4_0_writes_readable_text(converted):
    text = _greedy_text(converted["q4_0"], steps=60)
    words = text.split()
    assert len(words) > 20 and text.isprintable() or "\n" in text
    assert sum(w.strip('.,"!?\n').isalpha() for w in words) / len(words) > 0.9


def test_generate_api_streams_text(converted):
    m = tinyllm.load(converted["f32"], backend="numpy")
    pieces = list(m.generate("Once upon a time", max_new_tokens=20, temperature=0))
    assert len(pieces) > 5 and "".join(pieces) == m.generate("Once upon a time", max_new_tokens=20,
                                                              temperature=0, stream=False)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_f16_cache_keeps_the_f32_model_on_llama2c(converted, backend):
    """An f16 KV cache rounds only keys and values: teacher-forced over llama2.c's 200
    tokens, the f32 model with it picks llama2.c's token wherever f32's margin is not a
    near-tie, and its logits stay within a tenth of q8_0's tolerance."""
    f32 = tinyllm.load(converted["f32"], backend=backend, cache_type="f32")
    half = tinyllm.load(converted["f32"], backend=backend)  # the default cache type
    assert half.cache[0][0].dtype == np.float16
    ids = [f32.tokenizer.bos_id] + f32.tokenizer.encode(EXPECTED, add_bos=False)
    ref, got = f32.logits(ids[:-1]), half.logits(ids[:-1])
    top2 = np.sort(ref, axis=-1)[:, -2:]
    flipped = got.argmax(-1) != ref.argmax(-1)
    assert (top2[flipped, 1] - top2[flipped, 0] < 0.05).all()
    assert 0 < np.sqrt(np.mean((got - ref) ** 2)) / ref.std() < 0.004
