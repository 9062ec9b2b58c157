"""Helpers for the server tests: a real uvicorn server on a free localhost port, in a thread,
and ways to make the tiny model slow or failing on purpose (it decodes ~1 ms per token)."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import uvicorn

from tinyllm.errors import TinyLLMError
from tinyllm.server.guards import guarded_protocol


class LiveServer:
    """``app`` served by uvicorn on 127.0.0.1:<free port> until :meth:`close`."""

    def __init__(self, app, header_timeout: float | None = None, max_connections: int = 128):
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        limits = {}
        if header_timeout is not None:  # as `tinyllm serve` runs it (tinyllm/server/http.py)
            limits = {"http": guarded_protocol(header_timeout, max_connections), "limit_concurrency": max_connections}
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **limits))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    @property
    def worker(self):
        return self.app.state.service.worker

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextmanager
def serving(app, **limits):
    server = LiveServer(app, **limits)
    try:
        yield server
    finally:
        server.close()


class EvalHook:
    """Wraps ``model.eval`` (one call per forward pass) to count calls, add a delay per call,
    hold calls at a gate, or raise once; restores the method on exit."""

    def __init__(self, model, delay: float = 0.0, gated: bool = False, fail_once: bool = False):
        self.model, self.delay, self.fail_once = model, delay, fail_once
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.calls = 0
        self.times: list[float] = []
        self._eval = model.eval

    def __call__(self, tokens):
        self.calls += 1
        self.times.append(time.monotonic())
        if not self.gate.wait(30):
            raise RuntimeError("test gate never opened")
        if self.fail_once:
            self.fail_once = False
            raise TinyLLMError("injected failure")  # a model-side error: its message reaches the client
        if self.delay:
            time.sleep(self.delay)
        return self._eval(tokens)

    def __enter__(self):
        self.model.eval = self
        return self

    def __exit__(self, *exc):
        self.gate.set()
        del self.model.eval  # back to the class's method


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.005) -> float:
    """Poll until ``predicate()`` is true; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)
    return time.monotonic() - start


def convert_stories(stories_hf, tmp_path_factory):
    """stories260K as a q8_0 .q4 file (the model the server tests serve)."""
    from tinyllm.converters.convert import convert_hf

    return convert_hf(stories_hf, tmp_path_factory.mktemp("serve") / "stories260K.q4", quant="q8_0")

