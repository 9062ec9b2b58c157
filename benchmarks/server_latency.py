"""How responsive `tinyllm serve` stays while it generates: /health latency during a stream.

    python -m benchmarks.server_latency MODEL [--tokens 400] [--probes 60]

Starts the server on a free port, streams one long chat completion, and meanwhile times
GET /health every 50 ms over one kept-alive connection (a fresh client per probe would time
its own set-up, ~25 ms, not the server). Prints the latency median, p90 and max, and the
stream's decode rate.
"""
from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with code {server.returncode}")
        try:
            httpx.get(url + "/health", timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.5)
    raise SystemExit(f"server did not answer within {timeout_s:.0f} s")


def stream_story(url: str, model_id: str, tokens: int, stats: dict) -> None:
    body = {"model": model_id, "stream": True, "max_tokens": tokens,
            "messages": [{"role": "user", "content": "Tell me a long story about the sea."}]}
    chunks, start = 0, time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            chunks += line.startswith("data: {")
    stats["chunks"], stats["seconds"] = chunks, time.perf_counter() - start


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--tokens", default=400, show_default=True, help="Tokens the stream asks for.")
@click.option("--probes", default=60, show_default=True, help="Most /health requests to time.")
def main(model: str, tokens: int, probes: int) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-c", "from tinyllm.cli import main; main()",
               "serve", model, "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(url, server)
        model_id = Path(model).stem
        stream_story(url, model_id, 8, {})  # compile / warm up before timing
        stats: dict = {}
        streamer = threading.Thread(target=stream_story, args=(url, model_id, tokens, stats))
        streamer.start()
        time.sleep(1.0)  # past prefill: probe during decode
        latencies_ms = []
        with httpx.Client() as client:
            while streamer.is_alive() and len(latencies_ms) < probes:
                start = time.perf_counter()
                client.get(url + "/health", timeout=30)
                latencies_ms.append((time.perf_counter() - start) * 1000)
                time.sleep(0.05)
        streamer.join()
    finally:
        server.terminate()
        server.wait(10)
    if not latencies_ms:
        raise SystemExit("the stream ended before the first probe; ask for more --tokens")
    latencies_ms.sort()
    print(f"/health during generation: n={len(latencies_ms)} median={statistics.median(latencies_ms):.1f} ms "
          f"p90={latencies_ms[int(0.9 * len(latencies_ms))]:.1f} ms max={latencies_ms[-1]:.1f} ms")
    print(f"stream: {stats['chunks']} chunks in {stats['seconds']:.2f} s "
          f"({stats['chunks'] / stats['seconds']:.0f} chunks/s)")


if __name__ == "__main__":
    main()
