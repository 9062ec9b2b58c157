"""Log-probabilities, echo, structured output, embeddings and the tokenizer routes: the Python
API against a direct computation from the model's logits, and `tinyllm serve` through the
official openai client against the Python API."""
from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

import tinyllm
from tinyllm.cli import main
from tinyllm.errors import TinyLLMError
from tinyllm.logprobs import log_softmax
from tinyllm.server import create_app
from tinyllm.structured import Grammar

from .server_helpers import serving

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

PROMPT = "Once upon a time"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "enum": ["Lily", "Tom", "Ben"]},
                                           "age": {"type": "integer", "minimum": 1, "maximum": 99},
                                           "happy": {"type": "boolean"}},
          "required": ["name", "age", "happy"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(model_path):
    with serving(create_app(tinyllm.load(model_path, backend="numpy"))) as s:
        yield s


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def direct_logprobs(model, ids):
    """log P(ids[t] | ids[:t]) for t >= 1, from the logits of the whole sequence."""
    lp = log_softmax(model.logits(ids))
    return np.array([lp[t - 1, ids[t]] for t in range(1, len(ids))])


# -- Python API ---------------------------------------------------------------------------------

def test_token_logprobs_match_the_logits_and_reuse_the_cache(model):
    ids = model.tokenize("Once upon a time there was a little girl")
    expected = direct_logprobs(model, ids)
    model.eval(ids[:5])  # a cached prefix: scored again from it, same numbers
    entries = model.token_logprobs(ids, top=3)
    assert [e.token for e in entries] == ids[1:]
    np.testing.assert_allclose([e.logprob for e in entries], expected, atol=1e-5)
    for e in entries:
        assert len(e.top) == 3 and e.top[0][1] >= e.top[1][1] >= e.top[2][1]
        assert e.logprob <= e.top[0][1] + 1e-9
    with pytest.raises(TinyLLMError, match="start"):
        model.token_logprobs(ids, start=len(ids))


def test_loglikelihood_sums_the_continuation_and_knows_greedy(model):
    greedy = model.generate(PROMPT, max_new_tokens=6, temperature=0, stream=False)
    total, is_greedy = model.loglikelihood(PROMPT, greedy)
    context, continuation = model.encode_pair(PROMPT, greedy)
    assert context == model.tokenize(PROMPT)
    assert is_greedy
    np.testing.assert_allclose(total, direct_logprobs(model, context + continuation)[len(context) - 1:].sum(),
                               atol=1e-5)
    other, other_greedy = model.loglikelihood(PROMPT + " ", "zebra")  # the space moves to the continuation
    assert not other_greedy and other < total
    assert model.encode_pair("a ", "b") == model.encode_pair("a", " b")


def test_embed_is_mean_pooled_unit_length_hidden_states(model):
    vectors = model.embed(["Once upon a time", "The dog ran"])
    assert vectors.shape == (2, model.config.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])
    np.testing.assert_allclose(model.embed("Once upon a time")[0], vectors[0], atol=1e-6)
    last = model.embed("Once upon a time", pooling="last", normalize=False)[0]
    assert not np.allclose(last / np.linalg.norm(last), vectors[0])
    with pytest.raises(TinyLLMError, match="pooling"):
        model.embed("x", pooling="max")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generate_with_a_json_schema_always_validates(model, seed):
    text = model.generate(PROMPT, max_new_tokens=60, temperature=1.0, seed=seed, json_schema=SCHEMA, stream=False)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_gbnf_and_regex_grammars_hold(model):
    for seed in range(3):
        text = model.generate(PROMPT, max_new_tokens=10, temperature=1.0, seed=seed,
                              grammar='root ::= ("yes" | "no") "!"', stream=False)
        assert text in ("yes!", "no!")
    text = model.generate(PROMPT, max_new_tokens=10, temperature=1.0, seed=3, grammar=Grammar.regex("[a-z]{3} [0-9]"),
                          stream=False)
    assert len(text) == 5 and text[:3].isalpha() and text[4].isdigit()
    answer = model.chat([{"role": "user", "content": "Tell me"}], max_new_tokens=60, json_schema=SCHEMA)
    jsonschema.validate(json.loads(answer), SCHEMA)


@pytest.mark.parametrize("bad,words", [
    ({"json_schema": {"type": "nonsense"}}, "cannot be used"),
    ({"json_schema": "{not json"}, "not valid JSON"),
    ({"json_schema": [1]}, "must be an object"),
    ({"grammar": "root ::= ("}, "GBNF"),
    ({"grammar": ""}, "non-empty"),
    ({"grammar": 'root ::= "a"', "json_schema": True}, "not both"),
])
def test_bad_grammars_are_clear_errors(model, bad, words):
    with pytest.raises(TinyLLMError, match=words):
        model.generate(PROMPT, max_new_tokens=2, **bad)


def test_generate_cli_takes_a_schema_file_and_a_grammar_file(model_path, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    grammar = tmp_path / "answer.gbnf"
    grammar.write_text('root ::= "yes" | "no"\n')

    def run(*args):
        return CliRunner().invoke(main, ["generate", str(model_path), "-p", "Once", "--seed", "1", "-n", "60", *args])

    out = run("--json-schema", str(schema))
    assert out.exit_code == 0, out.output
    jsonschema.validate(json.loads(out.stdout[len("Once"):]), SCHEMA)
    assert run("--grammar-file", str(grammar)).stdout.strip()[len("Once"):] in ("yes", "no")
    inline = run("-j", '{"enum": ["red", "blue"]}')
    assert json.loads(inline.stdout[len("Once"):]) in ("red", "blue")
    bad = run("-j", '{"type": 5}')
    assert bad.exit_code != 0 and "json schema cannot be used" in bad.output and "Traceback" not in bad.output


# -- the server -----------------------------------------------------------------------------------

def test_chat_logprobs_in_openai_shape(client, model):
    messages = [{"role": "user", "content": "Tell me a story"}]
    answer = client.chat.completions.create(model="any", messages=messages, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token or entry.token.startswith("bytes:")
    assert b"".join(bytes(e.bytes) for e in content).decode().strip() == answer.choices[0].message.content.strip()
    # the same numbers streamed, chunk by chunk
    streamed = []
    for chunk in client.chat.completions.create(model="any", messages=messages, max_tokens=8, temperature=0,
                                                logprobs=True, top_logprobs=3, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [e.token for e in streamed] == [e.token for e in content]
    np.testing.assert_allclose([e.logprob for e in streamed], [e.logprob for e in content], atol=1e-4)


def test_completion_echo_gives_the_prompt_logprobs(client, model):
    ids = model.tokenize("Once upon a time there was a girl")
    expected = direct_logprobs(model, ids)
    for max_tokens in (0, 1):
        out = client.completions.create(model="m", prompt=ids, max_tokens=max_tokens, echo=True, logprobs=1,
                                        temperature=0)
        lp = out.choices[0].logprobs
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], expected, atol=1e-4)
        assert len(lp.tokens) == len(ids) + max_tokens
        assert out.choices[0].text.startswith(model.detokenize(ids))
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    generated = lp.tokens[-1]
    assert out.choices[0].text[lp.text_offset[-1]:] == generated
    assert max(lp.top_logprobs[-1].values()) == pytest.approx(lp.token_logprobs[-1])  # greedy


def test_completion_logprobs_stream_as_they_come(client, model):
    ids = model.tokenize(PROMPT)
    whole = client.completions.create(model="m", prompt=ids, max_tokens=6, echo=True, logprobs=2, temperature=0)
    tokens, values, offsets, text = [], [], [], ""
    for chunk in client.completions.create(model="m", prompt=ids, max_tokens=6, echo=True, logprobs=2,
                                           temperature=0, stream=True):
        choice = chunk.choices[0]
        text += choice.text
        if choice.logprobs:
            tokens += choice.logprobs.tokens
            values += choice.logprobs.token_logprobs
            offsets += choice.logprobs.text_offset
    lp = whole.choices[0].logprobs
    assert text == whole.choices[0].text and tokens == lp.tokens and offsets == lp.text_offset
    assert values[0] is None and lp.token_logprobs[0] is None
    np.testing.assert_allclose(values[1:], lp.token_logprobs[1:], atol=1e-4)


def test_completion_logprobs_stop_at_the_stop_string(client):
    out = client.completions.create(model="m", prompt=PROMPT, max_tokens=30, temperature=0, logprobs=2,
                                    stop=["girl"])
    lp = out.choices[0].logprobs
    text = out.choices[0].text
    assert "girl" not in text and out.choices[0].finish_reason == "stop"
    assert "".join(lp.tokens).startswith(text) and len("".join(lp.tokens)) < len(text) + len("girl")
    assert all(len(t) <= 2 for t in lp.top_logprobs)


def test_response_format_json_schema_and_json_object(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Who?"}],
                                                max_tokens=60, temperature=1.0, seed=seed, response_format=fmt)
        jsonschema.validate(json.loads(answer.choices[0].message.content), SCHEMA)
    answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=40,
                                            temperature=0, response_format={"type": "json_object"})
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(answer.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a valid prefix of a JSON object
        assert answer.choices[0].message.content.startswith("{")
    out = client.completions.create(model="m", prompt=PROMPT, max_tokens=5, extra_body={"grammar": 'root ::= "ok"'})
    assert out.choices[0].text == "ok" and out.choices[0].finish_reason == "stop"


def test_embeddings_through_the_openai_client(client, model):
    texts = ["Once upon a time", "The cat sat"]
    out = client.embeddings.create(model="m", input=texts)
    got = np.array([d.embedding for d in out.data])
    np.testing.assert_allclose(got, model.embed(texts), atol=1e-5)
    assert out.usage.prompt_tokens == sum(len(model.tokenize(t)) for t in texts)
    raw = httpx.post(str(client.base_url) + "embeddings", json={"input": texts[0], "encoding_format": "base64"})
    vector = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, got[0], atol=1e-6)
    ids = model.tokenize(texts[1])
    by_ids = client.embeddings.create(model="m", input=[ids])
    np.testing.assert_allclose(by_ids.data[0].embedding, got[1], atol=1e-6)


@pytest.mark.parametrize("body,param", [
    ({"input": ""}, "input"), ({"input": 5}, "input"), ({}, "input"), ({"input": [[1, 99999]]}, "input"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"), ({"input": "x", "dimensions": 8}, "dimensions"),
    ({"input": "x", "pooling": "max"}, "pooling"), ({"input": ["x"] * 300}, "input"),
])
def test_bad_embedding_requests_are_400_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/embeddings", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_tokenizer_routes(server, model):
    r = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    assert r["tokens"] == model.tokenize(PROMPT, add_bos=False) and r["count"] == len(r["tokens"])
    assert httpx.post(server.url + "/tokenize", json={"content": PROMPT}).json()["tokens"] == model.tokenize(PROMPT)
    back = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == back["content"] == PROMPT
    info = httpx.get(server.url + "/tokenizer_info").json()
    eos = httpx.post(server.url + "/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False})
    assert eos.json()["tokens"] == model.tokenizer.eos_ids[:1]
    for path, body in (("/tokenize", {"prompt": 3}), ("/detokenize", {"tokens": [-1]}), ("/tokenize", {"x": 1})):
        assert httpx.post(server.url + path, json=body).status_code == 400
