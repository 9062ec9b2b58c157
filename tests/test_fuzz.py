"""Bounded fuzzing of the parsers and request handlers (hypothesis): .q4 headers and bytes,
GGUF metadata, and server request bodies. The property everywhere: bad input ends in a
TinyLLMError (a 4xx for the server), good input in finite logits (a 200); never a raw
exception, a 500, or a crash. The Numba backend runs in a child process, so a native crash
fails a test instead of killing pytest. Example counts keep CI quick; tests/fuzz_long.py
runs the same mutators for as long as you like."""
from __future__ import annotations

import json
import random

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinyllm
from tinyllm.errors import TinyLLMError
from tinyllm.server import create_app

from .server_helpers import serving
from .untrusted import (
    BUNDLED,
    bundled_gguf,
    gguf_contents,
    logits_ok,
    mutate_bytes,
    mutate_gguf_fields,
    mutate_header,
    read_q4,
    requantized,
    run_files_in_child,
    write_gguf,
    write_q4,
)

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                database=None)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def bases(workdir):
    """The bundled f32 model and a q4_0 / q8_0 copy: (data section, header) of each."""
    q4 = requantized(BUNDLED, workdir / "q4_0.q4", "q4_0")
    q8 = requantized(BUNDLED, workdir / "q8_0.q4", "q8_0", edge="q8_0")
    return [read_q4(p) for p in (BUNDLED, q4, q8)]


def load_and_run(path) -> str:
    """'ok' (finite logits of the declared shape, a few tokens generated) or 'refused'."""
    try:
        logits_ok(path)
        return "ok"
    except TinyLLMError:
        return "refused"


@settings(FUZZ, max_examples=150)
@given(rng=st.randoms(use_true_random=False), which=st.integers(0, 2), n=st.integers(1, 3))
def test_q4_header_mutations(bases, workdir, rng, which, n):
    data, header = bases[which]
    load_and_run(write_q4(workdir / "h.q4", data, mutate_header(header, rng, n)))


@settings(FUZZ, max_examples=60)
@given(rng=st.randoms(use_true_random=False), which=st.integers(0, 2), n=st.integers(1, 64))
def test_q4_byte_mutations_with_valid_checksums(bases, workdir, rng, which, n):
    data, header = bases[which]
    load_and_run(write_q4(workdir / "b.q4", mutate_bytes(data, rng, n), json.loads(json.dumps(header))))


def test_mutated_files_on_the_numba_backend_in_a_child(bases, workdir):
    """The same mutators, seeded, on the Numba kernels: no crash, no raw exception."""
    rng = random.Random(12)
    paths = []
    for i in range(90):
        data, header = bases[i % 3]
        if i % 3 == 2:
            data = mutate_bytes(data, rng, rng.randint(1, 64))
        else:
            header = mutate_header(header, rng, rng.randint(1, 3))
        paths.append(write_q4(workdir / f"numba{i}.q4", data, header))
    results = run_files_in_child(paths)
    assert len(results) == len(paths)
    raw = {p: r for p, r in results.items() if r[0] not in ("ok", "tinyllm-error")}
    assert not raw, raw
    assert any(r[0] == "ok" for r in results.values()) and any(r[0] == "tinyllm-error" for r in results.values())


@pytest.fixture(scope="module")
def gguf_base(workdir):
    return gguf_contents(bundled_gguf(workdir / "base.gguf", workdir))


@settings(FUZZ, max_examples=100)
@given(rng=st.randoms(use_true_random=False), n=st.integers(1, 3))
def test_gguf_metadata_mutations(gguf_base, workdir, rng, n):
    arch, fields, tensors = gguf_base
    for _ in range(n):
        fields = mutate_gguf_fields(fields, rng)
    try:
        path = write_gguf(workdir / "m.gguf", arch, fields, tensors)
    except (ValueError, TypeError, OverflowError, __import__("struct").error):
        return  # a value the gguf package itself cannot write: not a file anyone can hand us
    load_and_run(path)


# -- server request bodies ---------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stream",
          "seed", "stream_options", "logprobs", "n", "echo", "response_format", "repeat_penalty", "user", "tools",
          "top_logprobs", "grammar", "max_completion_tokens"]
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "x"]),
                                 "content": st.one_of(st.text(max_size=30), JSON_VALUES)})
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6) | st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE, max_size=3)},
    optional={"max_tokens": st.integers(-1, 8), "stop": JSON_VALUES, "temperature": JSON_VALUES,
              "stream": st.booleans()})


@pytest.fixture(scope="module")
def fuzz_server():
    with serving(create_app(tinyllm.load(BUNDLED, backend="numpy"), max_queue=4, max_tokens=8)) as server:
        with httpx.Client(base_url=server.url, timeout=30, headers={"Content-Type": "application/json"}) as client:
            yield client


@settings(FUZZ, max_examples=200)
@given(body=BODIES, chat=st.booleans())
def test_server_request_bodies(fuzz_server, body, chat):
    r = fuzz_server.post("/v1/chat/completions" if chat else "/v1/completions", content=json.dumps(body))
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text)
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


SCHEMA_KEYS = ["type", "properties", "required", "items", "enum", "const", "minimum", "maximum", "maxLength",
               "pattern", "anyOf", "additionalProperties", "$ref", "format"]
SCHEMAS = st.recursive(
    st.sampled_from([{}, {"type": "string"}, {"type": "integer"}, {"type": "object"}, True, False]),
    lambda children: st.dictionaries(st.sampled_from(SCHEMA_KEYS), children | JSON_VALUES, max_size=3), max_leaves=8)
FORMATS = st.one_of(
    st.fixed_dictionaries({"type": st.just("json_schema"),
                           "json_schema": st.fixed_dictionaries({"name": st.text(max_size=8), "schema": SCHEMAS})}),
    st.fixed_dictionaries({"type": st.sampled_from(["json_object", "text", "json_schema", "xml"])}),
    JSON_VALUES)


@settings(FUZZ, max_examples=60)
@given(fmt=FORMATS, grammar=st.none() | st.text(max_size=40) | st.sampled_from(['root ::= "a"', "root ::= [0-9]+"]),
       chat=st.booleans())
def test_server_structured_output_options(fuzz_server, fmt, grammar, chat):
    body = {"response_format": fmt, "max_tokens": 4, **({} if grammar is None else {"grammar": grammar})}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "Once"}
    r = fuzz_server.post("/v1/chat/completions" if chat else "/v1/completions", content=json.dumps(body))
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text)
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@settings(FUZZ, max_examples=60)
@given(route=st.sampled_from(["/v1/embeddings", "/tokenize", "/detokenize"]),
       body=st.dictionaries(st.sampled_from(["input", "prompt", "content", "tokens", "encoding_format", "model",
                                             "add_special_tokens", "dimensions"]), JSON_VALUES, max_size=3))
def test_server_embedding_and_tokenizer_bodies(fuzz_server, route, body):
    r = fuzz_server.post(route, content=json.dumps(body))
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text)


@settings(FUZZ, max_examples=80)
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_server_raw_bytes(fuzz_server, raw):
    r = fuzz_server.post("/v1/completions", content=raw)
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text)
