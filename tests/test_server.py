"""`tinyllm serve`: the official openai client against a real server on a free localhost port,
serving the real stories260K model. The library's own generate/chat is the oracle for every
answer; concurrency, disconnects, failures and bad input are each exercised for real."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

import tinyllm
from tinyllm.server import create_app

from .server_helpers import EvalHook, convert_stories, serving, wait_until

openai = pytest.importorskip("openai")

PROMPT = "Once upon a time"


@pytest.fixture(scope="session")
def model_path(stories_hf, tmp_path_factory):
    return convert_stories(stories_hf, tmp_path_factory)


def load(path):
    return tinyllm.load(path, backend="numpy")


@pytest.fixture(scope="module")
def reference(model_path):
    """A second copy of the model (its own KV cache): what the server must answer."""
    return load(model_path)


@pytest.fixture(scope="module")
def server(model_path):
    with serving(create_app(load(model_path), max_queue=8)) as s:
        yield s


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def post(server, path, body, **kw) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    return httpx.post(server.url + path, content=data, headers=headers, **{"timeout": 30, **kw})


def assert_openai_error(response: httpx.Response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


# -- the API, answer by answer ------------------------------------------------------------

def test_models_lists_the_loaded_model_with_its_context(client, reference):
    (card,) = client.models.list().data
    assert card.id == "stories260K" and card.context_length == reference.n_ctx == 512
    assert client.models.retrieve("stories260K").id == "stories260K"


def test_completion_matches_the_library_with_usage(client, reference):
    r = client.completions.create(model="stories260K", prompt=PROMPT, max_tokens=30, temperature=0)
    assert r.choices[0].text == reference.generate(PROMPT, max_new_tokens=30, temperature=0, stream=False)
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(reference.tokenize(PROMPT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 30, n_prompt + 30)


def test_completion_streams_the_same_text(client, reference):
    chunks = list(client.completions.create(model="stories260K", prompt=PROMPT, max_tokens=30, temperature=0,
                                            stream=True))
    texts = [c.choices[0].text for c in chunks]
    assert len([t for t in texts if t]) > 10  # piece by piece, not one blob
    assert "".join(texts) == reference.generate(PROMPT, max_new_tokens=30, temperature=0, stream=False)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_from_token_ids(client, reference):
    ids = reference.tokenize(PROMPT)
    r = client.completions.create(model="stories260K", prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == reference.generate(ids, max_new_tokens=12, temperature=0, stream=False)


CONVERSATION = [{"role": "system", "content": "A story about a cat."},
                {"role": "user", "content": "Tom the cat"},
                {"role": "assistant", "content": "was very happy."},
                {"role": "user", "content": "One day he"}]


def test_chat_matches_the_library_streaming_or_not(client, reference):
    expected = reference.chat(CONVERSATION, max_new_tokens=25, temperature=0)
    r = client.chat.completions.create(model="stories260K", messages=CONVERSATION, max_tokens=25, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected
    session = reference.chat_session()
    session.load_messages(CONVERSATION)
    assert r.usage.prompt_tokens == len(session.prompt_ids()) and r.usage.completion_tokens == 25

    chunks = list(client.chat.completions.create(model="stories260K", messages=CONVERSATION, max_tokens=25,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 5 and "".join(deltas) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 25
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_answer(client, reference, stream):
    full = reference.generate(PROMPT, max_new_tokens=40, temperature=0, stream=False)
    assert "park" in full and "named L" in full
    r = client.completions.create(model="stories260K", prompt=PROMPT, max_tokens=40, temperature=0,
                                  stop=["park", "named L"], stream=stream)
    if stream:
        chunks = list(r)
        text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        text, finish = r.choices[0].text, r.choices[0].finish_reason
    assert text == full[:full.index("named L")] and finish == "stop"


def test_seed_reproduces_sampling(client, reference):
    def sample(seed):
        r = client.completions.create(model="stories260K", prompt=PROMPT, max_tokens=40, temperature=1.0, seed=seed)
        return r.choices[0].text

    a, b, c = sample(42), sample(42), sample(43)
    assert a == b != c
    assert a == reference.generate(PROMPT, max_new_tokens=40, temperature=1.0, seed=42, stream=False)


def test_tinyllm_sampling_options_are_honoured(client, reference):
    options = {"top_k": 5, "min_p": 0.1, "repeat_penalty": 1.3, "repeat_last_n": 16}
    r = client.completions.create(model="stories260K", prompt=PROMPT, max_tokens=40, temperature=1.2, top_p=0.9,
                                  seed=7, extra_body=options)
    assert r.choices[0].text == reference.generate(PROMPT, max_new_tokens=40, temperature=1.2, top_p=0.9, seed=7,
                                                   stream=False, **options)
    assert r.choices[0].text != client.completions.create(model="stories260K", prompt=PROMPT, max_tokens=40,
                                                          temperature=1.2, top_p=0.9, seed=7).choices[0].text


def test_omitted_max_tokens_uses_openai_default_for_completions(client):
    r = client.completions.create(model="stories260K", prompt=PROMPT, temperature=0)
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


# -- concurrency ------------------------------------------------------------------------------

def test_eight_concurrent_streams_complete_independently(server, reference):
    prompts = ["Once upon a time", "Lily and Tom", "The big dog", "One day, a bird",
               "Sam had a red ball", "The sun was", "Mia wanted to", "A little fish"]
    expected = [reference.generate(p, max_new_tokens=24, temperature=0, stream=False) for p in prompts]

    async def one(client, prompt):
        raw = await client.completions.with_raw_response.create(model="stories260K", prompt=prompt, max_tokens=24,
                                                                temperature=0, stream=True)
        text = "".join([chunk.choices[0].text async for chunk in raw.parse()])
        return int(raw.headers["x-queue-position"]), text

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    with EvalHook(server.app.state.service.model, delay=0.003):  # ~75 ms per request: they overlap
        results = asyncio.run(main())
    assert [text for _, text in results] == expected
    assert max(pos for pos, _ in results) >= 3  # they really queued behind one another


def test_full_queue_answers_503(model_path):
    model = load(model_path)
    with serving(create_app(model, max_queue=1)) as server, EvalHook(model, gated=True) as hook:
        body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0}
        results = {}

        def send(name):
            results[name] = post(server, "/v1/completions", body)

        running = threading.Thread(target=send, args=("running",))
        running.start()
        wait_until(lambda: hook.calls == 1)  # the model is busy with it, held at the gate
        waiting = threading.Thread(target=send, args=("waiting",))
        waiting.start()
        wait_until(lambda: server.worker.stats()["waiting"] == 1)
        refused = post(server, "/v1/completions", body)
        error = assert_openai_error(refused, 503, code="queue_full")
        assert "busy" in error["message"] and refused.headers["retry-after"] == "1"
        with pytest.raises(openai.InternalServerError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).completions.create(
                model="stories260K", prompt=PROMPT, max_tokens=3)
        hook.gate.set()
        running.join(10), waiting.join(10)
        assert results["running"].status_code == results["waiting"].status_code == 200


def test_client_disconnect_mid_stream_frees_the_model(model_path):
    model = load(model_path)
    with serving(create_app(model)) as server, EvalHook(model, delay=0.01) as hook:  # 400 tokens would take 4 s
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", server.url + "/v1/completions",
                             json={"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}) as r:
                chunks = 0
                for line in r.iter_lines():
                    chunks += line.startswith("data: {")
                    if chunks == 5:
                        break
        disconnected = time.monotonic()  # the connection is closed as the client exits
        freed = wait_until(lambda: not server.worker.stats()["busy"], timeout=5)
        calls_at_stop = hook.calls
        start = time.monotonic()
        r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "temperature": 0})
        next_request = time.monotonic() - start
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert calls_at_stop < 40, "generation went on after the client left"
    assert freed < 1.0 and next_request < 1.0, (freed, next_request)  # vs ~3.9 s had it run on
    assert server.worker.counts["cancelled"] == 1
    print(f"\nstream disconnect: model free {freed * 1000:.0f} ms after the client left, after {calls_at_stop} of 400 "
          f"forward passes; next request answered in {next_request * 1000:.0f} ms "
          f"(disconnected at t={disconnected - hook.times[0]:.2f} s)")


def test_client_disconnect_while_waiting_for_a_full_answer_frees_the_model(model_path):
    model = load(model_path)
    with serving(create_app(model)) as server, EvalHook(model, delay=0.01) as hook:
        with pytest.raises(httpx.ReadTimeout):
            post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 400, "temperature": 0},
                 timeout=httpx.Timeout(30, read=0.3))
        freed = wait_until(lambda: not server.worker.stats()["busy"], timeout=5)
    assert hook.calls < 80 and freed < 0.5, (hook.calls, freed)
    assert server.worker.counts["cancelled"] == 1


def test_a_failing_request_does_not_take_the_server_down(model_path):
    model = load(model_path)
    with serving(create_app(model)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        with EvalHook(model, fail_once=True):
            error = assert_openai_error(post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5}), 500,
                                        code="generation_failed")
            assert "injected failure" in error["message"]
        with EvalHook(model, fail_once=True):
            with pytest.raises(openai.APIError, match="injected failure"):
                list(client.chat.completions.create(model="stories260K", messages=[{"role": "user", "content": "Hi"}],
                                                    max_tokens=5, stream=True))
        r = client.completions.create(model="stories260K", prompt=PROMPT, max_tokens=5, temperature=0)
        assert r.usage.completion_tokens == 5
        assert server.worker.counts["failed"] == 2


# -- bad input --------------------------------------------------------------------------------

def test_malformed_json_is_a_400(server):
    assert_openai_error(post(server, "/v1/completions", b'{"prompt": "x",'), 400, code="invalid_json")
    assert_openai_error(post(server, "/v1/chat/completions", b"\xff\xfe"), 400, code="invalid_json")
    assert_openai_error(post(server, "/v1/completions", b"[1, 2]"), 400, code="invalid_json")
    assert_openai_error(post(server, "/v1/completions", b'{"prompt": "x", "temperature": NaN}'), 400,
                        code="invalid_json")


CHAT = {"messages": [{"role": "user", "content": "Hi"}]}
BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature", "must be a number"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "10"}, "max_tokens", "must be an integer"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", ">= 1"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream", "true or false"),
    ("/v1/completions", {"prompt": "x", "temperature": 2.5}, "temperature", "<= 2"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p", "> 0"),
    ("/v1/completions", {"prompt": "x", "seed": True}, "seed", "integer"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "stop", "string"),
    ("/v1/completions", {"prompt": "x", "stop": [f"s{i}" for i in range(17)]}, "stop", "at most 16"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs", "<= 20"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs", "integer"),
    ("/v1/completions", {"prompt": "x", "echo": "yes"}, "echo", "true or false"),
    ("/v1/chat/completions", {**CHAT, "logprobs": 2}, "logprobs", "true or false"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, "top_logprobs", "needs logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "<= 20"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens", ">= 1"),
    ("/v1/chat/completions", {**CHAT, "response_format": "json"}, "response_format", "object with a type"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, "response_format.json_schema",
     "schema"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}},
     "response_format.json_schema.schema", "cannot be used"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"scheme": {}}}},
     "response_format.json_schema.scheme", "Unrecognized"),
    ("/v1/completions", {"prompt": "x", "grammar": "root ::= ("}, "grammar", "GBNF"),
    ("/v1/completions", {"prompt": "x", "grammar": 5}, "grammar", "string"),
    ("/v1/completions", {"prompt": "x", "grammar": 'root ::= "a"', "response_format": {"type": "json_object"}},
     "grammar", "not both"),
    ("/v1/completions", {"prompt": 5}, "prompt", "string or a list of token ids"),
    ("/v1/completions", {"prompt": [1, 999999]}, "prompt", "token ids must be in"),
    ("/v1/completions", {}, "prompt", "required"),
    ("/v1/completions", {"prompt": "x", "model": 7}, "model", "string"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ("/v1/completions", {"prompt": "x", "temprature": 0.5}, "temprature", "Unrecognized"),
    ("/v1/chat/completions", {"messages": "Hi"}, "messages", "non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "Hi"}]}, "messages", "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages", "content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     "messages", "system message may only come first"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens",
     "disagree"),
]


@pytest.mark.parametrize("path,body,param,words", BAD_REQUESTS, ids=[f"{b}" for _, b, _, _ in BAD_REQUESTS])
def test_wrong_types_and_values_are_400_naming_the_field(server, path, body, param, words):
    error = assert_openai_error(post(server, path, body), 400, param=param)
    assert words in error["message"], error


UNSUPPORTED = [
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "x", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages[0].content[].type"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "42", "tool_call_id": "1"}]},
     "messages[0].role"),
]


@pytest.mark.parametrize("path,body,param", UNSUPPORTED, ids=[p for _, _, p in UNSUPPORTED])
def test_unsupported_options_are_400_naming_the_option(server, path, body, param):
    error = assert_openai_error(post(server, path, body), 400, param=param, code="unsupported_parameter")
    assert error["message"].startswith(param) and "not supported" in error["message"]


def test_neutral_values_of_unsupported_options_are_accepted(server):
    body = {"prompt": PROMPT, "max_tokens": 3, "n": 1, "presence_penalty": 0, "frequency_penalty": 0.0,
            "logprobs": None, "echo": False, "best_of": 1, "user": "me"}
    assert post(server, "/v1/completions", body).status_code == 200
    chat = {**CHAT, "max_tokens": 3, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
            "logprobs": False, "messages": [{"role": "developer", "content": "Be brief."},
                                            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    assert post(server, "/v1/chat/completions", chat).status_code == 200


def test_max_tokens_and_context_bounds(model_path, reference):
    with serving(create_app(load(model_path), max_tokens=64)) as server:
        error = assert_openai_error(post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 65}), 400,
                                    param="max_tokens")
        assert "limit of 64" in error["message"]
        ids = reference.tokenize(" ".join(["the cat sat on the mat"] * 200))
        assert len(ids) > 600
        assert_openai_error(post(server, "/v1/completions", {"prompt": ids[:600]}), 400, param="prompt",
                            code="context_length_exceeded")
        prompt, n = ids[:480], 480
        error = assert_openai_error(post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 64}), 400,
                                    param="max_tokens", code="context_length_exceeded")
        assert "480 in the prompt" in error["message"]
        r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": reference.n_ctx - n, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] <= reference.n_ctx


def test_oversized_bodies_are_413(model_path):
    with serving(create_app(load(model_path), max_body_bytes=2000)) as server:
        big = {"prompt": "x" * 3000}
        assert_openai_error(post(server, "/v1/completions", big), 413, code="request_too_large")

        def chunked():  # no Content-Length: the server has to count
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        r = httpx.post(server.url + "/v1/completions", content=chunked(), timeout=30,
                       headers={"Content-Type": "application/json"})
        assert "content-length" not in r.request.headers
        assert_openai_error(r, 413, code="request_too_large")
        assert post(server, "/v1/completions", {"prompt": "x" * 100, "max_tokens": 2}).status_code == 200


def test_any_model_name_is_served_by_the_one_model(server, client):
    # llama-server's rule: one model is served, whatever name a client was written for
    r = post(server, "/v1/completions", {"prompt": "x", "model": "gpt-4", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "stories260K"
    answer = client.chat.completions.create(model="model", messages=CHAT["messages"], max_tokens=2)
    assert answer.model == "stories260K"
    # retrieving a model by name still says which one is served
    assert_openai_error(httpx.get(server.url + "/v1/models/gpt-4"), 404, code="model_not_found")


def test_unknown_routes_and_methods_get_openai_errors(server):
    assert_openai_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_openai_error(httpx.get(server.url + "/v1/embeddings"), 405)
    assert_openai_error(httpx.get(server.url + "/v1/completions"), 405)


def test_api_key(model_path):
    with serving(create_app(load(model_path), api_key="s3cret")) as server:
        error = assert_openai_error(httpx.get(server.url + "/v1/models"), 401, code="invalid_api_key")
        assert "Authorization: Bearer" in error["message"]
        wrong = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"})
        assert assert_openai_error(wrong, 401)["message"] == "Incorrect API key provided."
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="stories260K", prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3
        page = httpx.get(server.url + "/")  # the page itself is public; it asks for the key on a 401
        assert page.status_code == 200 and 'id="api-key"' in page.text


def test_page_and_health(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="conversation"' in page.text
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["busy"] is False


# -- the command -------------------------------------------------------------------------------

def test_cli_serves_on_localhost_and_stops_on_ctrl_c(model_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-c", "from tinyllm.cli import main; main()", "serve", str(model_path),
                             "--port", str(port), "--backend", "numpy", "--model-id", "tiny"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NUMBA_NUM_THREADS": "1"})
    try:
        wait_until(lambda: _listening(port) or proc.poll() is not None, timeout=30, interval=0.05)
        r = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0).completions.create(
            model="tiny", prompt=PROMPT, max_tokens=4)
        assert r.model == "tiny" and r.usage.completion_tokens == 4
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/" in err and "context 512" in err


def _listening(port) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_cli_rejects_an_unknown_template(model_path):
    r = subprocess.run([sys.executable, "-c", "from tinyllm.cli import main; main()", "serve", str(model_path),
                        "--backend", "numpy", "--template", "nonesuch"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "unknown chat template 'nonesuch'" in r.stderr
