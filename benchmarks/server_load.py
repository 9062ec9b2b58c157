"""Many clients at once on `tinyllm serve`: request latency and refusals, by --parallel.

    python -m benchmarks.server_load [MODEL] [--clients 16] [--requests 4] [--tokens 48] [--parallel 1 4]
    python -m benchmarks.server_load --url http://127.0.0.1:8081 ...   # a server already running (llama-server)

For each --parallel value: starts `tinyllm serve MODEL --parallel N` on a free port (default
MODEL: the bundled stories260K), then ``--clients`` concurrent clients each send
``--requests`` completions one after another (``--tokens`` tokens, temperature 0.8, distinct
seeds). Prints per N: latency p50 / p90 / p99 / max of the answered requests, how many got
503, aggregate completion tokens/s over the run, and the load average.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

import httpx

import tinyllm

from .server_latency import free_port, wait_until_up

PROMPTS = ["Once upon a time", "Lily and Tom", "The big dog", "One day, a bird", "Sam had a red ball",
           "The sun was", "Mia wanted to", "A little fish"]


async def client(url: str, index: int, requests: int, tokens: int, out: list) -> None:
    async with httpx.AsyncClient(timeout=300) as http:
        for k in range(requests):
            body = {"prompt": PROMPTS[(index + k) % len(PROMPTS)], "max_tokens": tokens, "temperature": 0.8,
                    "seed": 1000 * index + k}
            start = time.perf_counter()
            r = await http.post(url + "/v1/completions", json=body)
            n = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
            out.append((r.status_code, time.perf_counter() - start, n))


def load(url: str, clients: int, requests: int, tokens: int) -> tuple[list, float]:
    """Every client's requests against ``url``: [(status, seconds, completion tokens)], wall seconds."""
    asyncio.run(client(url, 0, 1, 4, []))  # warm: kernels compiled before the clock starts
    out: list = []

    async def everyone():
        await asyncio.gather(*(client(url, i, requests, tokens, out) for i in range(clients)))

    start = time.perf_counter()
    asyncio.run(everyone())
    return out, time.perf_counter() - start


def summary(name: str, out: list, wall: float) -> str:
    ok = sorted(t for code, t, _ in out if code == 200)
    refused = sum(code == 503 for code, _, _ in out)
    q = statistics.quantiles(ok, n=100) if len(ok) > 1 else ok * 99
    return (f"{name}: {len(ok)} answered, {refused} refused (503); latency p50 {q[49]:.2f} s, "
            f"p90 {q[89]:.2f} s, p99 {q[98]:.2f} s, max {ok[-1]:.2f} s; "
            f"{sum(n for *_, n in out) / wall:.0f} completion tok/s; load {os.getloadavg()[0]:.2f}")


def run(model: str | None, parallel: int, clients: int, requests: int, tokens: int) -> str:
    port = free_port()
    model = model or os.path.join(os.path.dirname(tinyllm.__file__), "data", "stories260K.q4")
    cmd = [sys.executable, "-m", "tinyllm", "serve", model, "--port", str(port),
           "--parallel", str(parallel), "--max-queue", "16"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, server)
        out, wall = load(url, clients, requests, tokens)
    finally:
        server.terminate()
        server.wait(10)
    return summary(f"--parallel {parallel}", out, wall)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--parallel", type=int, nargs="+", default=[1, 4])
    p.add_argument("--url", help="load this running server instead of starting tinyllm's")
    args = p.parse_args()
    if args.url:
        print(summary(args.url, *load(args.url, args.clients, args.requests, args.tokens)))
        return
    for n in args.parallel:
        print(run(args.model, n, args.clients, args.requests, args.tokens), flush=True)


if __name__ == "__main__":
    main()
