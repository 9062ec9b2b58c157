"""Continuous batching (tinyllm/batching.py, Model.eval_batch, Model.generate_batch): the same
answers as alone, sequences joining and leaving between steps, chunked prefill, bad input.
Every architecture's batched forward is checked against its lone one in test_architectures.py."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import tinyllm
from tinyllm.batching import Batcher
from tinyllm.errors import TinyLLMError
from tinyllm.generate import Decoding
from tinyllm.sampling import Sampler, SamplingParams

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park. They saw a big", "One day"]


@pytest.fixture(scope="module")
def fast(stories_q8):
    return tinyllm.load(stories_q8)  # the numba backend: the one a server batches on


def test_generate_batch_leaves_no_step_thread_behind(fast):
    before = {t for t in threading.enumerate() if t.name == "tinyllm-batcher"}
    fast.generate_batch(PROMPTS[:2], max_new_tokens=4, temperature=0)
    assert {t for t in threading.enumerate() if t.name == "tinyllm-batcher"} == before


def test_generate_batch_gives_each_prompt_its_answer_alone(fast):
    alone = [fast.generate(p, max_new_tokens=24, temperature=0, stream=False) for p in PROMPTS]
    seen = {i: [] for i in range(len(PROMPTS))}
    texts = fast.generate_batch(PROMPTS, max_new_tokens=24, temperature=0,
                                on_text=lambda i, piece: seen[i].append(piece))
    assert texts == alone
    assert ["".join(seen[i]) for i in range(len(PROMPTS))] == texts  # streamed, piece by piece


def test_fewer_slots_than_prompts_and_seeded_sampling(fast):
    """Two slots for four prompts: each next prompt joins as one finishes; a seeded sampler
    draws the same text batched as alone."""
    options = dict(temperature=0.8, top_k=40, seed=7)
    alone = [fast.generate(p, max_new_tokens=16, stream=False, **options) for p in PROMPTS]
    assert fast.generate_batch(PROMPTS, max_new_tokens=16, parallel=2, **options) == alone


def test_one_step_serves_every_running_sequence(fast):
    """Sequences that run together share forward passes: far fewer steps than tokens."""
    batcher = Batcher(fast, slots=4)
    go = threading.Barrier(4)
    out = {}

    def run(i):
        ids = fast.tokenize(PROMPTS[i])
        go.wait()
        with batcher.slot() as slot:
            decoding = Decoding(Sampler(SamplingParams(temperature=0)), [], [])  # no stop id: all 20 tokens
            out[i] = "".join(decoding.stream(slot, ids, 20))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 4
    assert batcher.steps < 0.6 * 4 * 20  # 80 sequence-steps alone; together about 20-30


def test_long_prompt_is_prefilled_in_chunks(fast):
    ids = fast.tokenize(" ".join(PROMPTS * 3))
    assert len(ids) > 40
    fast.reset()
    want = fast.eval(ids)
    batcher = Batcher(fast, slots=1, chunk=16)
    with batcher.slot() as slot:
        got = slot.eval(ids)
    assert batcher.steps == -(-len(ids) // 16)  # 16 new tokens a step
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    assert slot.tokens == ids


def test_prefix_held_by_a_free_slot_is_reused(fast):
    batcher = Batcher(fast, slots=1)
    ids = fast.tokenize(PROMPTS[2])
    with batcher.slot() as slot:
        slot.eval(ids)
    rows = batcher.rows
    with batcher.slot() as slot:  # the same slot, the same conversation one token longer
        slot.eval(ids + [fast.tokenize(" dog", add_bos=False)[0]])
    assert batcher.rows - rows == 1  # only the new token is computed


def test_a_returning_conversation_gets_the_slot_holding_it(fast):
    batcher = Batcher(fast, slots=3)
    first, second = fast.tokenize(PROMPTS[2]), fast.tokenize(PROMPTS[1])
    with batcher.slot(first) as a, batcher.slot(second) as b:
        a.eval(first)
        b.eval(second)
    rows = batcher.rows
    follow_up = first + fast.tokenize(" dog", add_bos=False)
    with batcher.slot(follow_up) as slot:
        assert slot.cache is a.cache
        slot.eval(follow_up)
    assert batcher.rows - rows == len(follow_up) - len(first)


def test_default_slots_fit_in_half_the_free_memory(fast, monkeypatch):
    from tinyllm import batching, validate

    per_slot = batching.slot_bytes(fast)
    monkeypatch.setattr(validate, "available_memory", lambda: 10 * per_slot)
    assert batching.default_slots(fast) == 4
    monkeypatch.setattr(validate, "available_memory", lambda: 5 * per_slot)
    assert batching.default_slots(fast) == 2
    monkeypatch.setattr(validate, "available_memory", lambda: per_slot // 2)
    assert batching.default_slots(fast) == 1
    with pytest.raises(TinyLLMError, match="use fewer parallel slots"):
        Batcher(fast, slots=3)


def test_bad_batches_are_refused(fast):
    cache = fast.new_cache()
    with pytest.raises(TinyLLMError, match="cache of its own"):
        fast.eval_batch([cache, cache], [[1, 2], [1, 3]])
    with pytest.raises(TinyLLMError, match="one cache per sequence"):
        fast.eval_batch([cache], [[1], [2]])
    with pytest.raises(TinyLLMError, match="empty token sequence"):
        fast.eval_batch([cache], [[]])
    with pytest.raises(TinyLLMError, match="exceeds the context"):
        fast.eval_batch([cache], [[1] * (fast.n_ctx + 1)])
    with pytest.raises(TinyLLMError, match="token id out of range"):
        fast.eval_batch([cache, fast.new_cache()], [[1, 2], [1, 10 ** 6]])
    with pytest.raises(TinyLLMError, match="list of prompts"):
        fast.generate_batch("Once upon a time")
    with pytest.raises(TinyLLMError, match="unknown option 'temprature'"):
        fast.generate_batch(PROMPTS, temprature=0.5)
    with pytest.raises(TinyLLMError, match="empty prompt"):
        fast.generate_batch(["fine", ""], add_bos=False)
    with pytest.raises(TinyLLMError, match="positive integer"):
        Batcher(fast, slots=0)
    with pytest.raises(TinyLLMError, match="prefill chunk must be a positive integer"):
        Batcher(fast, slots=1, chunk=0)
    from tinyllm.server import create_app

    with pytest.raises(TinyLLMError, match="parallel must be a positive integer"):
        create_app(fast, parallel=0)
    closed = Batcher(fast, slots=1)
    closed.close()
    with pytest.raises(TinyLLMError, match="closed"):
        closed.slot().__enter__()
    batcher = Batcher(fast, slots=1)
    with batcher.slot():
        with pytest.raises(TinyLLMError, match="all 1 parallel slots are busy"):
            batcher.slot().__enter__()


def test_an_error_in_a_step_reaches_the_waiting_sequence(fast):
    batcher = Batcher(fast, slots=1)
    with batcher.slot() as slot:
        with pytest.raises(TinyLLMError, match="token id out of range"):
            slot.eval([1, 10 ** 6])
        assert len(slot.eval([1, 2])) == fast.config.vocab_size  # the slot still works


# -- the server with parallel slots ------------------------------------------------------------

def test_server_decodes_concurrent_streams_together_with_the_answers_alone(fast):
    """Eight OpenAI streaming clients on four slots: each gets its text alone, in fewer steps."""
    import asyncio

    openai = pytest.importorskip("openai")
    from tinyllm.server import create_app

    from .server_helpers import serving

    prompts = ["Once upon a time", "Lily and Tom", "The big dog", "One day, a bird",
               "Sam had a red ball", "The sun was", "Mia wanted to", "A little fish"]
    expected = [fast.generate(p, max_new_tokens=24, temperature=0, stream=False) for p in prompts]

    async def one(client, prompt):
        stream = await client.completions.create(model="m", prompt=prompt, max_tokens=24, temperature=0, stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream])

    with serving(create_app(fast, parallel=4)) as server:
        async def main():
            async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
                return await asyncio.gather(*(one(client, p) for p in prompts))

        assert asyncio.run(main()) == expected
        batcher = server.worker._batcher
        stats = server.worker.stats()
    assert stats["slots"] == 4 and stats["completed"] == 8 and stats["running"] == 0
    assert batcher.steps < 0.75 * sum(len(fast.tokenize(t, add_bos=False)) + 1 for t in expected)


class GatedSteps:
    """Holds every batched step at a gate (Model.eval_batch), counting them."""

    def __init__(self, model):
        self.model, self.real, self.gate, self.calls = model, model.eval_batch, threading.Event(), 0

    def __enter__(self):
        def gated(caches, sequences):
            self.calls += 1
            self.gate.wait(10)
            return self.real(caches, sequences)

        self.model.eval_batch = gated
        return self

    def __exit__(self, *exc):
        self.gate.set()
        del self.model.eval_batch


def test_server_queue_and_disconnect_with_parallel_slots(stories_q8):
    """Two slots and max_queue 1: two requests run, one waits, the next gets 503; a client
    that disconnects frees its slot for the waiting one."""
    import httpx

    from tinyllm.server import create_app

    from .server_helpers import serving, wait_until

    model = tinyllm.load(stories_q8)
    body = {"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0}
    with serving(create_app(model, parallel=2, max_queue=1)) as server, GatedSteps(model) as steps:
        results = {}

        def send(name):
            with httpx.Client(timeout=30) as http:
                results[name] = http.post(server.url + "/v1/completions", json=body)

        threads = [threading.Thread(target=send, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        wait_until(lambda: server.worker.stats()["running"] == 2, timeout=20)
        threads.append(threading.Thread(target=send, args=("waiting",)))
        threads[-1].start()
        wait_until(lambda: server.worker.stats()["waiting"] == 1)
        with httpx.Client(timeout=30) as http:
            refused = http.post(server.url + "/v1/completions", json=body)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
        steps.gate.set()
        for t in threads:
            t.join(10)
        assert [results[n].status_code for n in ("a", "b", "waiting")] == [200, 200, 200]

        with httpx.Client(timeout=30) as http:  # a stream of 400 tokens, left after 5 chunks
            with http.stream("POST", server.url + "/v1/completions",
                             json={**body, "max_tokens": 400, "stream": True}) as r:
                chunks = 0
                for line in r.iter_lines():
                    chunks += line.startswith("data: {")
                    if chunks == 5:
                        break
        wait_until(lambda: server.worker.stats()["running"] == 0, timeout=5)
        assert server.worker.counts["cancelled"] == 1
