"""Matrix products of two formats side by side, interleaved so both see the same machine.

    python -m benchmarks.format_speed [q4_0 q4_k]

For each matrix shape and token count (1: decode, 128: prefill), times ``numba_cpu.matmul``
on random weights of each format (bench_model.random_tensor), alternating formats for 7
rounds, and prints median [min-max] and the time ratio.
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from tinyllm.kernels import numba_cpu

from .bench_model import random_tensor

SHAPES = [(5632, 2048), (2048, 5632), (11008, 4096)]
ROUNDS = 7


def main(formats=("q4_0", "q4_k")) -> None:
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        weights = {f: numba_cpu.prepare(random_tensor(shape, f, np.random.default_rng(0))) for f in formats}
        for tokens, reps in ((1, 200), (128, 3)):
            x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
            times = {f: [] for f in formats}
            for f in formats:
                numba_cpu.matmul(x, weights[f])  # compile, warm
            for _ in range(ROUNDS):
                for f in formats:
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        numba_cpu.matmul(x, weights[f])
                    times[f].append((time.perf_counter() - t0) / reps * 1e6)
            cells = [f"{f} {statistics.median(v):.1f} us [{min(v):.1f}-{max(v):.1f}], {weights[f].nbytes} B"
                     for f, v in times.items()]
            ratio = statistics.median(times[formats[1]]) / statistics.median(times[formats[0]])
            print(f"{shape[0]}x{shape[1]} T={tokens}: " + "; ".join(cells) + f"; time ratio {ratio:.3f}")


if __name__ == "__main__":
    main(tuple(sys.argv[1:3]) if len(sys.argv) >= 3 else ("q4_0", "q4_k"))
