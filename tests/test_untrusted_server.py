"""The server facing hostile clients and hostile model files: chat templates that never end,
stop strings built to be slow, slow and idle connections, cross-site requests, malformed
bodies, and shutdown with streams open. Each gets a 4xx in OpenAI's format (or a closed
connection), never a 500, and the server keeps serving everyone else."""
from __future__ import annotations

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
from tinyllm.errors import TinyLLMError
from tinyllm.server import create_app

from .server_helpers import serving
from .untrusted import BUNDLED

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def model():
    return tinyllm.load(BUNDLED, backend="numpy")


@pytest.fixture(scope="module")
def server(model):
    with serving(create_app(model, max_queue=8), header_timeout=1.0, max_connections=8) as s:
        yield s


def post(server, path, body, headers=JSON, client=httpx):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post(server.url + path, content=data, headers=headers, timeout=30)


def assert_error(r, status, code=None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code:
        assert error["code"] == code, error
    assert "Traceback" not in error["message"] and "File \"" not in error["message"]
    return error


COMPLETION = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}


# -- chat templates from the model file ---------------------------------------------------------

HANGING = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.mark.parametrize("template,words", [
    (HANGING, "longer than"),
    ("{{ range(10**9)|list }}", "out of range"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion"),
    ("{{ 'x' * 10**10 }}", "repeating"),
    ("{{ '%1000000000d' % 1 }}", "width"),
    ("{% for m in messages %}{{ m.content * 10000000 }}{% endfor %}", "repeating|limit"),
])
def test_a_hostile_chat_template_is_a_400_and_blocks_nobody(model, tmp_path, template, words):
    path = tmp_path / "t.jinja"
    path.write_text(template)
    with serving(create_app(model, chat_template=str(path))) as server:
        answer = {}

        def chat():
            answer["r"] = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
            answer["done"] = time.monotonic()

        t = threading.Thread(target=chat)
        t.start()
        health = httpx.get(server.url + "/health", timeout=30)
        completion = post(server, "/v1/completions", COMPLETION)
        others_done = time.monotonic()
        t.join(60)
        assert health.status_code == 200 and completion.status_code == 200
        error = assert_error(answer["r"], 400)
        assert "chat template" in error["message"] and any(w in error["message"] for w in words.split("|"))
        if template == HANGING:  # the others were answered while the template was still running
            assert others_done < answer["done"]


# -- stop strings ---------------------------------------------------------------------------------

def test_stop_strings_are_bounded_and_cheap(server):
    assert_error(post(server, "/v1/completions", {**COMPLETION, "stop": ["x" * 1025]}), 400)
    assert_error(post(server, "/v1/completions", {**COMPLETION, "stop": [f"s{i}" for i in range(17)]}), 400)
    worst = {**COMPLETION, "max_tokens": 40,
             "stop": [c * 1023 + "!" for c in "abcdefghijklmn"] + [" " * 1024, "t" * 1024]}  # 16, each 1024
    r = post(server, "/v1/completions", worst)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40


# -- connections ----------------------------------------------------------------------------------

def _closed_by_server(sock, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1024) == b""
    except (socket.timeout, ConnectionResetError):
        return False


def test_slow_headers_are_cut_off_and_the_server_keeps_answering(server):
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
    assert _closed_by_server(slow, within=10)
    slow.close()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_idle_connections_cannot_exhaust_the_server(server):
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]  # the cap
    extra = socket.create_connection(("127.0.0.1", server.port))
    assert _closed_by_server(extra, within=5)  # over the cap: closed on arrival
    for s in idle:
        assert _closed_by_server(s, within=10)  # no request within the header timeout
        s.close()
    extra.close()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_a_slow_body_is_a_408(model):
    with serving(create_app(model, timeout=1.0), header_timeout=5.0) as server:
        def trickle():
            yield b'{"prompt": "'
            time.sleep(3)
            yield b'x"}'

        r = httpx.post(server.url + "/v1/completions", content=trickle(), headers=JSON, timeout=30)
        assert_error(r, 408, code="request_timeout")


# -- cross-site requests --------------------------------------------------------------------------

def test_a_rebound_host_name_is_refused(server):
    for host in ("evil.example", "evil.example:8080", "127.0.0.1.evil.example", ""):
        assert_error(httpx.get(server.url + "/v1/models", headers={"Host": host}, timeout=10), 403,
                     code="host_not_allowed")
    for host in ("localhost", f"localhost:{server.port}", f"127.0.0.1:{server.port}", "[::1]:80"):
        assert httpx.get(server.url + "/v1/models", headers={"Host": host}, timeout=10).status_code == 200


def test_only_json_bodies_are_read(server):
    for headers in ({}, {"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"},
                    {"Content-Type": "multipart/form-data; boundary=x"}):
        assert_error(post(server, "/v1/completions", COMPLETION, headers=headers), 415, code="unsupported_media_type")
    r = post(server, "/v1/completions", COMPLETION, headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_a_public_bind_accepts_any_host(model):
    with serving(create_app(model, allowed_hosts=None)) as server:
        assert httpx.get(server.url + "/v1/models", headers={"Host": "my-box.lan"}, timeout=10).status_code == 200


# -- malformed bodies, and the connection stays usable --------------------------------------------

@pytest.mark.parametrize("body,status", [
    (b"[" * 100_000 + b"]" * 100_000, 400),                            # nesting deeper than the parser's stack
    (b'{"prompt": "\\ud800 lone surrogate", "max_tokens": 2}', 400),
    (b'{"prompt": "x", "temperature": 1e999}', 400),                   # parses as infinity
    (b'{"prompt": "x", "max_tokens": 2, "temperature": 1e-320}', 200),  # tiny but valid: greedy in effect
    (b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400),
])
def test_malformed_bodies_are_4xx_and_the_connection_survives(server, body, status):
    with httpx.Client(timeout=30) as client:
        r = post(server, "/v1/" + ("chat/completions" if b"messages" in body else "completions"), body, client=client)
        assert r.status_code == status, r.text
        if status != 200:
            assert_error(r, status)
        again = post(server, "/v1/completions", COMPLETION, client=client)  # same keep-alive connection
        assert again.status_code == 200


def test_an_unexpected_error_is_a_500_without_internals(model, monkeypatch):
    with serving(create_app(model)) as server:
        def broken(self, req):
            raise RuntimeError("secret internal detail")

        monkeypatch.setattr("tinyllm.server.app.Service._prepare", broken)
        with httpx.Client(timeout=30) as client:
            error = assert_error(post(server, "/v1/completions", COMPLETION, client=client), 500, code="internal_error")
            assert "secret" not in error["message"]
            assert client.get(server.url + "/health").status_code == 200  # the connection still works


def test_a_bug_during_generation_is_reported_without_its_details(model, monkeypatch):
    with serving(create_app(model)) as server:
        def broken(self, tokens):
            raise RuntimeError("secret internal detail")

        monkeypatch.setattr(type(model), "eval", broken)
        error = assert_error(post(server, "/v1/completions", COMPLETION), 500, code="generation_failed")
        assert "secret" not in error["message"] and "server log" in error["message"]


def test_an_empty_api_key_is_refused(model):
    with pytest.raises(TinyLLMError, match="empty"):
        create_app(model, api_key="")
    r = subprocess.run([sys.executable, "-c", "from tinyllm.cli import main; main()", "serve", str(BUNDLED),
                        "--api-key", "", "--backend", "numpy"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "--api-key is empty" in r.stderr and "Traceback" not in r.stderr


# -- shutdown -------------------------------------------------------------------------------------

def test_ctrl_c_ends_open_streams_with_an_error_event(model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    slow = ("import time, tinyllm.model as m; e = m.Model.eval; "
            "m.Model.eval = lambda self, t: (time.sleep(0.05), e(self, t))[1]; "
            "from tinyllm.cli import main; main()")
    proc = subprocess.Popen([sys.executable, "-c", slow, "serve", str(BUNDLED), "--port", str(port),
                             "--backend", "numpy"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NUMBA_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.1)
        events = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", headers=JSON, timeout=30,
                          content=json.dumps({"prompt": "Once", "max_tokens": 400, "stream": True})) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "server_shutdown"
    assert proc.returncode == 0
    assert "Traceback" not in err and "CancelledError" not in err


def test_the_limits_refuse_what_is_expensive_not_what_looks_odd():
    from tinyllm.templates import render_template

    messages = [{"role": "user", "content": "50% off {1234567} %1000000d"}]
    for template in ("{{ messages[0].content|trim }}", "{{ 100000000|string }}", "{{ '%s!' % messages[0].content }}",
                     "{{ messages[0].content.replace('a', 'b') }}", "{{ '%05d'|format(3) }}"):
        render_template(template, messages)
    for template in ("{{ '%1000000000d'|format(1) }}", "{{ '{:>1000000000}'.format('x') }}", "{{ 'x'.ljust(10**9) }}",
                     "{{ 'a'|indent(100000000) }}", "{{ 'x'|center(1000000000) }}"):
        with pytest.raises(TinyLLMError, match="chat template error"):
            render_template(template, messages)
