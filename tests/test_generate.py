"""The generation loop: stop strings under streaming, every eos id, max tokens, the end of
the context, an interrupted forward pass, and the generate() API."""
from __future__ import annotations

import numpy as np
import pytest

import tinyllm
from tinyllm.converters.convert import convert_hf
from tinyllm.generate import GenerationStats, StopStringFilter, cached_prefix, generate_ids
from tinyllm.sampling import Sampler, SamplingParams
from tinyllm.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def stories_path(stories_hf, tmp_path_factory):
    return convert_hf(stories_hf, tmp_path_factory.mktemp("gen") / "stories.q4", quant="f32")


@pytest.fixture
def model(stories_path):
    return tinyllm.load(stories_path, backend="numpy")


def _greedy_ids(model, n=40):
    return list(generate_ids(model, [model.tokenizer.bos_id], n, Sampler(GREEDY), stop_ids=[]))


# -- stop strings --------------------------------------------------------------------------


def _run(stops, pushes):
    f = StopStringFilter(stops)
    shown = [f.push(p) for p in pushes]
    return shown, f


def test_stop_string_split_across_pushes_is_never_shown():
    shown, f = _run(["STOP"], ["Hello S", "T", "OP and more"])
    assert shown == ["Hello ", "", ""] and f.stopped


def test_text_held_back_is_released_when_it_is_not_a_stop():
    shown, f = _run(["STOP"], ["a ST", "ART b"])
    assert shown == ["a ", "START b"] and not f.stopped
    shown, f = _run(["STOP"], ["end ST"])
    assert shown == ["end "] and f.flush() == "ST"  # generation ended: the held text is shown


def test_earliest_of_several_stop_strings_wins():
    shown, f = _run(["\nUser:", "###"], ["one ## two\nUs", "er: x ###"])
    assert "".join(shown) == "one ## two" and f.stopped


def test_overlapping_stop_prefixes():
    # "aab" must hold "aa" then find "aab" though the first "a" alone was a prefix too
    shown, f = _run(["aab"], ["x a", "a", "b y"])
    assert "".join(shown) == "x " and f.stopped
    shown, f = _run(["abc"], ["ab", "ab", "c"])
    assert "".join(shown) == "ab" and f.stopped


def test_stop_string_spanning_a_token_boundary(model):
    ids = _greedy_ids(model)
    pieces = [model.tokenizer.decode(ids[:i + 1])[len(model.tokenizer.decode(ids[:i])):] for i in range(len(ids))]
    k = next(i for i in range(5, len(ids)) if len(pieces[i]) >= 3 and len(pieces[i + 1]) >= 3)
    stop = pieces[k][-2:] + pieces[k + 1][:2]  # two characters of each token
    full = model.tokenizer.decode(ids)
    expected = full[:full.index(stop)]
    stats = GenerationStats()
    streamed = list(model.generate([model.tokenizer.bos_id], max_new_tokens=40, temperature=0, stop=[stop],
                                   stats=stats))
    assert "".join(streamed) == expected  # nothing of the stop string, nothing shown then retracted
    assert len(streamed) > 3 and stats.finish_reason == "stop"


def test_multiple_eos_ids_each_stop(model):
    ids = _greedy_ids(model, 20)
    fresh = [k for k in range(2, len(ids)) if ids[k] not in ids[:k]]  # tokens not generated before
    for position in (fresh[0], fresh[2]):
        extra = ids[position]
        model.tokenizer = Tokenizer.from_spec(dict(model.tokenizer.spec, eos_ids=[2, extra]))
        model.reset()
        stats = GenerationStats()
        got = list(generate_ids(model, [model.tokenizer.bos_id], 20, Sampler(GREEDY), stats=stats))
        assert got == ids[:position] and stats.finish_reason == "eos"


def test_max_tokens_and_context_end(stories_path):
    model = tinyllm.load(stories_path, backend="numpy", n_ctx=24)
    stats = GenerationStats()
    assert len(list(generate_ids(model, [1], 5, Sampler(GREEDY), stats=stats))) == 5
    assert stats.finish_reason == "length" and stats.new_tokens == 5 and stats.decode_steps == 4
    stats = GenerationStats()
    got = list(generate_ids(model, [1, 403], 100, Sampler(GREEDY), stop_ids=[], stats=stats))
    assert len(got) == 22 and stats.finish_reason == "context" and len(model.tokens) <= 24
    with pytest.raises(tinyllm.TinyLLMError, match="does not fit the context"):
        model.generate(list(range(3, 27)))


def test_interrupted_forward_leaves_a_consistent_cache(model, monkeypatch):
    model = tinyllm.load(model.path, backend="numpy", cache_type="f32")  # exact: no f16 rounding blurs a stale reuse
    prompt = [1, *_greedy_ids(model, 30)]
    model.eval(prompt)
    changed = prompt[:12] + [300, 301, 302]
    real = model._run

    def interrupted(tokens, batch, last_only):
        real(tokens, batch, last_only)  # the cache positions after the prefix are overwritten...
        raise KeyboardInterrupt         # ...then Ctrl-C arrives

    monkeypatch.setattr(model, "_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        list(generate_ids(model, changed, 5, Sampler(GREEDY)))
    assert model.tokens == prompt[:12]
    monkeypatch.undo()
    expected = tinyllm.load(model.path, backend="numpy", cache_type="f32").eval(prompt)
    assert np.allclose(model.eval(prompt), expected, atol=1e-5)  # nothing stale was reused


def test_cached_prefix_matches_eval():
    assert cached_prefix([1, 2, 3, 4], [1, 2, 3, 4, 5]) == 4
    assert cached_prefix([1, 2, 3, 4], [1, 2, 3, 4]) == 3  # the last token is recomputed for its logits
    assert cached_prefix([1, 2, 9], [1, 2, 3, 4]) == 2
    assert cached_prefix([], [1, 2]) == 0


def test_generate_api(model):
    streamed = list(model.generate("Once upon a time", max_new_tokens=20, temperature=0))
    assert len(streamed) > 5
    assert "".join(streamed) == model.generate("Once upon a time", max_new_tokens=20, temperature=0, stream=False)
    assert "".join(streamed).startswith(", there was")  # a continuation keeps its spaces...
    assert model.generate("Once upon a time,", max_new_tokens=3, temperature=0, stream=False).startswith(" there")
    from_bos = model.generate([model.tokenizer.bos_id], max_new_tokens=5, temperature=0, stream=False)
    assert from_bos.startswith("Once")  # ...from BOS, none
    text = model.generate("Once upon a time", max_new_tokens=20, temperature=0, stop="girl", stream=False)
    assert text == "".join(streamed).split("girl")[0]
    with pytest.raises(tinyllm.TinyLLMError, match="empty prompt"):
        model.generate("", add_bos=False)


def test_tokenize_and_detokenize(model):
    ids = model.tokenize("Once upon a time")
    assert ids[0] == model.tokenizer.bos_id and model.detokenize(ids) == "Once upon a time"
    assert model.tokenize("Hi</s>", add_bos=False)[-1] == 2
    assert 2 not in model.tokenize("Hi</s>", add_bos=False, special=False)


def test_stats_count_prompt_and_decode(model):
    stats = GenerationStats()
    "".join(model.generate("Once upon a time", max_new_tokens=10, temperature=0, stats=stats))
    n_prompt = len(model.tokenize("Once upon a time"))
    assert (stats.prompt_tokens, stats.cached_tokens, stats.new_tokens) == (n_prompt, 0, 10)
    assert stats.prompt_tokens_per_second > 0 and stats.decode_tokens_per_second > 0
    stats2 = GenerationStats()
    "".join(model.generate("Once upon a time, there", max_new_tokens=3, temperature=0, stats=stats2))
    assert stats2.cached_tokens == stats2.prompt_tokens - 1  # ", there" was generated before: all from the cache
    assert "prompt: " in stats.summary() and "decode: 10 tokens" in stats.summary()
