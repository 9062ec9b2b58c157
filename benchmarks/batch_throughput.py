"""Aggregate decode throughput of continuous batching: B streams advancing together.

    python -m benchmarks.batch_throughput [MODEL] [--streams 1 4 8] [--tokens 32] [--repeats 3]

MODEL defaults to the TinyLlama-1.1B-shaped random q4_0 benchmark model (benchmarks/bench_model.py).
For each B: B sequences with their own KV caches each hold a 32-token prompt, then decode
``--tokens`` steps together through ``Model.eval_batch`` (one forward pass per step for all
B); the repeats alternate the B values. Reported per B, median over repeats (and the
spread): aggregate tokens/s, per-stream tokens/s, and the ratio to B = 1. Random weights:
the step costs what a real model's do, and greedy choice is skipped (the next token is
fixed), so only the forward is timed."""
from __future__ import annotations

import argparse
import os
import statistics
import time

import tinyllm

from .bench_model import bench_model


def decode_seconds(model, streams: int, tokens: int, prompt_len: int = 32) -> float:
    caches = [model.new_cache() for _ in range(streams)]
    seqs = [[1] + [(7 * s + 3 * i) % 1000 + 10 for i in range(prompt_len - 1)] for s in range(streams)]
    model.eval_batch(caches, seqs)  # the prompts, untimed
    start = time.perf_counter()
    for step in range(tokens):
        for s in seqs:
            s.append(100 + step)
        model.eval_batch(caches, seqs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    path = args.model or bench_model()[0]
    model = tinyllm.load(path, n_ctx=256)
    decode_seconds(model, max(args.streams), 2)  # compile / load every kernel shape first
    print(f"model {os.path.basename(str(path))}, {model.ops.threads} threads, load {os.getloadavg()[0]:.2f}")
    # Rounds alternate the batch sizes (1, 4, 8, 1, 4, 8, ...): one stream is bound by memory
    # bandwidth, which other tenants of a shared host take and give back over minutes, and the
    # batches by arithmetic; measured one after another, the ratio would compare two moments.
    rates = {b: [] for b in args.streams}
    for _ in range(args.repeats):
        for b in args.streams:
            rates[b].append(b * args.tokens / decode_seconds(model, b, args.tokens))
    base = None
    for b in args.streams:
        med = statistics.median(rates[b])
        base = med if base is None and b == 1 else base
        ratio = f"{med / base:.2f}x" if base else "-"
        print(f"streams {b}: aggregate {med:.1f} tok/s (min {min(rates[b]):.1f}, max {max(rates[b]):.1f}), "
              f"per stream {med / b:.1f} tok/s, {ratio} one stream")
    print(f"load at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
