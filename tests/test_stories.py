"""Golden end-to-end test: the real trained stories260K reproduces llama2.c's output."""
from __future__ import annotations

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


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_greedy_reproduces_llama2c(converted, quant):
    assert _greedy_text(converted[quant]) == EXPECTED


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
