"""N replicas of `tinyllm serve` behind Ray Serve (tinyllm/server/ray.py): a local Ray
instance on this machine, two replicas, concurrent OpenAI-client requests through Ray's own
HTTP proxy; both replicas answer, and each answer is the one the model gives alone."""
from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import pytest

import tinyllm

ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed: pip install 'tinyllm[ray]'")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

MODEL = Path(tinyllm.__file__).parent / "data" / "stories260K.q4"
PROMPTS = ["Once upon a time", "Lily and Tom", "The big dog", "One day, a bird",
           "Sam had a red ball", "The sun was", "Mia wanted to", "A little fish"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_replicas_until_ctrl_c():
    """`tinyllm serve MODEL --replicas 2`: Ray's proxy on the given port, answers tagged by
    replica; Ctrl-C shuts Ray down and exits cleanly. (Runs before the module's own Ray
    instance starts: one local Ray at a time.)"""
    import signal
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tinyllm", "serve", str(MODEL), "--replicas", "2", "--port",
                               str(port), "--parallel", "1", "--threads", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(server.stderr), daemon=True)
    reader.start()
    try:
        deadline, answer = time.monotonic() + 180, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                                    json={"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0})
                if answer.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        assert answer is not None and answer.status_code == 200, server.poll()
        assert answer.json()["usage"]["completion_tokens"] == 4 and answer.headers["x-tinyllm-replica"]
        # Ray's proxy answers as soon as the replicas run, a moment before serve.run returns
        while time.monotonic() < deadline and not any("on 2 Ray Serve replicas" in line for line in err):
            time.sleep(0.2)
        assert any("on 2 Ray Serve replicas" in line for line in err), "".join(err)[-2000:]
        server.send_signal(signal.SIGINT)
        server.wait(90)
        reader.join(10)
        assert server.returncode == 0, "".join(err)[-2000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def ray_url():
    from tinyllm.server.ray import deployment

    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(MODEL, replicas=2, parallel=2, threads=1, cpus_per_replica=0.5), name="tinyllm",
                  route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_through_rays_proxy(ray_url):
    alone = tinyllm.load(MODEL)
    expected = [alone.generate(p, max_new_tokens=16, temperature=0, stream=False) for p in PROMPTS]

    async def one(client, prompt):
        raw = await client.completions.with_raw_response.create(model="stories260K", prompt=prompt, max_tokens=16,
                                                                temperature=0)
        return raw.headers["x-tinyllm-replica"], raw.parse().choices[0].text

    async def main():
        async with openai.AsyncOpenAI(base_url=ray_url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
            results = []
            for _ in range(3):  # rounds of concurrent requests, until both replicas have answered
                results += await asyncio.gather(*(one(client, p) for p in PROMPTS))
                if len({r for r, _ in results}) == 2:
                    break
            return results

    results = asyncio.run(main())
    assert len({replica for replica, _ in results}) == 2
    assert [text for _, text in results[:len(PROMPTS)]] == expected


def test_builder_arguments_are_checked():
    from tinyllm.errors import TinyLLMError
    from tinyllm.server.ray import app

    with pytest.raises(TinyLLMError, match="needs model=PATH"):
        app({})
    with pytest.raises(TinyLLMError, match="unknown argument 'replica'"):
        app({"model": str(MODEL), "replica": "2"})
    with pytest.raises(TinyLLMError, match="replicas must be a positive integer"):
        app({"model": str(MODEL), "replicas": "0"})
