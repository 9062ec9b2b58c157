"""Sampling: greedy at temperature 0, reproducible with a seed, and each filter doing what
it says (checked on the distribution it samples from)."""
from __future__ import annotations

import numpy as np
import pytest

import tinyllm
from tinyllm.converters.convert import convert_hf
from tinyllm.sampling import Sampler, SamplingParams

LOGITS = np.random.default_rng(0).normal(0, 2, size=64).astype(np.float32)  # (vocab,)


def _draws(params: SamplingParams, n: int = 4000, logits=LOGITS, recent=()):
    sampler = Sampler(params)
    return np.array([sampler(logits, list(recent)) for _ in range(n)])


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_temperature_zero_is_argmax():
    for seed in range(5):
        logits = np.random.default_rng(seed).normal(size=100)
        assert Sampler(SamplingParams(temperature=0, seed=seed))(logits) == int(np.argmax(logits))
    assert Sampler(SamplingParams(temperature=1.5, top_k=1))(LOGITS) == int(np.argmax(LOGITS))


def test_seeded_sampling_is_reproducible():
    params = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = _draws(SamplingParams(**params, seed=42), 200)
    assert np.array_equal(a, _draws(SamplingParams(**params, seed=42), 200))
    assert not np.array_equal(a, _draws(SamplingParams(**params, seed=43), 200))
    assert len(set(a.tolist())) > 10  # it does sample


def test_unfiltered_sampling_follows_softmax_over_temperature():
    counts = np.bincount(_draws(SamplingParams(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, seed=1), 20000),
                         minlength=LOGITS.size)
    expected = _softmax(LOGITS / 0.7)
    assert np.abs(counts / counts.sum() - expected).max() < 0.015


def test_top_k_top_p_min_p_restrict_the_candidates():
    order = np.argsort(-LOGITS)
    probs = _softmax(LOGITS.astype(np.float64))
    top5 = _draws(SamplingParams(temperature=1.0, top_k=5, top_p=1.0, min_p=0.0, seed=2))
    assert set(top5.tolist()) == set(order[:5].tolist())
    nucleus = int(np.searchsorted(np.cumsum(probs[order]), 0.8) + 1)  # smallest head reaching 0.8
    top_p = _draws(SamplingParams(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0, seed=3))
    assert set(top_p.tolist()) == set(order[:nucleus].tolist())
    min_p = _draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2, seed=4))
    assert set(min_p.tolist()) == set(np.flatnonzero(probs >= 0.2 * probs.max()).tolist())


def test_repeat_penalty_within_its_window():
    logits = np.array([1.0, 3.0, 2.9, -1.0, -0.5])
    greedy = dict(temperature=0, repeat_penalty=1.5)
    assert Sampler(SamplingParams(**greedy))(logits, [1]) == 2        # 3.0 / 1.5 < 2.9
    assert Sampler(SamplingParams(**greedy, repeat_last_n=2))(logits, [1, 4, 4]) == 1  # token 1 is outside the window
    assert Sampler(SamplingParams(**greedy, repeat_last_n=0))(logits, [1]) == 1        # window 0: off
    # a negative logit is pushed further down (multiplied), never up
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=10.0))(np.array([-0.5, -1.0]), [1, 0]) == 0


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(min_p=1.0), "min_p"), (dict(top_k=-1), "top_k"), (dict(repeat_penalty=0), "repeat_penalty"),
    (dict(repeat_last_n=-2), "repeat_last_n"),
])
def test_bad_parameters_are_rejected(bad, message):
    with pytest.raises(tinyllm.TinyLLMError, match=message):
        SamplingParams(**bad)


@pytest.fixture(scope="module")
def model(stories_hf, tmp_path_factory):
    path = convert_hf(stories_hf, tmp_path_factory.mktemp("sampling") / "stories.q4", quant="f32")
    return tinyllm.load(path, backend="numpy")


def test_generation_config_defaults_then_overrides(model):
    model.generation_defaults = {"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1, "top_k": 20}
    p = model.sampling_params(top_k=None, top_p=0.5)
    assert (p.temperature, p.top_k, p.top_p, p.repeat_penalty) == (0.6, 20, 0.5, 1.1)
    model.generation_defaults = {"do_sample": False, "temperature": 0.6}
    assert model.sampling_params().temperature == 0.0
    model.generation_defaults = {}
    assert model.sampling_params() == SamplingParams()


def test_seeded_generation_is_reproducible_and_temperature_zero_is_greedy(model):
    kw = dict(max_new_tokens=30, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, stream=False)
    a = model.generate("Once upon a time", seed=5, **kw)
    assert a == model.generate("Once upon a time", seed=5, **kw)
    assert a != model.generate("Once upon a time", seed=6, **kw)
    greedy = model.generate("Once upon a time", max_new_tokens=30, temperature=0, stream=False)
    assert greedy == model.generate("Once upon a time", max_new_tokens=30, temperature=0, seed=9, stream=False)
    assert greedy == model.generate("Once upon a time", max_new_tokens=30, temperature=1.0, top_k=1, stream=False)
    assert greedy.startswith(", there was a little girl named Lily")  # llama2.c's greedy story
