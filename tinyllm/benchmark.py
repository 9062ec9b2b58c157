"""Speed measurements shared by `tinyllm bench` and the benchmarks/ suite.

Prefill is timed as one ``Model.eval`` of N tokens from an empty cache; decode as N
one-token ``Model.eval`` steps after a one-token prompt (llama-bench's pp/tg tests do the
same). Token ids are fixed pseudo-random ids, not sampled, so both engines compared in
benchmarks/ run identical work. Decode is memory-bound: every step reads every matrix
once, so it is also reported as GB/s of weights read and as a fraction of the machine's
read bandwidth, measured by ``memory_bandwidth`` in the same process.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Samples:
    """Repeated timings of one measurement (seconds) and the work each one did."""
    seconds: list = field(default_factory=list)
    tokens: int = 0          # tokens per sample (speeds are tokens / seconds)
    bytes_read: int = 0      # weight bytes read per sample (decode)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.median

    @property
    def spread(self) -> tuple[float, float]:
        """(slowest, fastest) tokens/s over the samples."""
        return self.tokens / max(self.seconds), self.tokens / min(self.seconds)

    @property
    def gb_per_second(self) -> float:
        return self.bytes_read / self.median / 1e9


def prompt_ids(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    """n fixed pseudo-random token ids, avoiding the first few (special) ids."""
    return [int(i) for i in np.random.default_rng(seed).integers(3, vocab_size, n)]


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every matrix once, except the embedding
    table, of which it reads one row (unless the table is also the output head)."""
    total = 0
    for name, t in model.file_tensors.items():
        if name == "tok_embeddings" and "output" in model.file_tensors:
            total += t.nbytes // t.shape[0]
        else:
            total += t.nbytes
    return total


def time_prefill(model, n_tokens: int, repeats: int = 3) -> Samples:
    tokens = prompt_ids(n_tokens, model.config.vocab_size)
    out = Samples(tokens=n_tokens)
    model.reset()
    model.eval(tokens[:4])  # first call: page in weights, compile anything not cached
    for _ in range(repeats):
        model.reset()
        start = time.perf_counter()
        model.eval(tokens)
        out.seconds.append(time.perf_counter() - start)
    return out


def time_decode(model, n_tokens: int, repeats: int = 3) -> Samples:
    """Seconds for n_tokens single-token steps after a one-token prompt, per repeat."""
    tokens = prompt_ids(n_tokens + 1, model.config.vocab_size, seed=1)
    out = Samples(tokens=n_tokens, bytes_read=n_tokens * weight_bytes_per_token(model))
    for r in range(repeats + 1):  # the first round warms up
        model.reset()
        model.eval(tokens[:1])
        start = time.perf_counter()
        for i in range(2, n_tokens + 2):
            model.eval(tokens[:i])
        if r:
            out.seconds.append(time.perf_counter() - start)
    return out


def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> Samples:
    """Read bandwidth with all kernel threads: sum a buffer larger than any cache.
    ``gb_per_second`` of the result is the median; ``bytes_read / min(seconds)`` the best."""
    from tinyllm.kernels.numba_bench import sum_words

    buf = np.ones(nbytes // 8, np.uint64)
    sum_words(buf)  # compile, page in
    out = Samples(tokens=1, bytes_read=buf.nbytes)
    for _ in range(repeats):
        start = time.perf_counter()
        sum_words(buf)
        out.seconds.append(time.perf_counter() - start)
    return out


@dataclass
class BenchReport:
    """What `tinyllm bench` prints."""
    model: str
    file_bytes: int
    weight_bytes: int
    threads: str | None           # kernel threads, in words (None: the backend has none)
    prefill: dict                 # n_tokens -> Samples
    decode: Samples
    bandwidth: Samples | None

    def lines(self) -> list[str]:
        threads = f", {self.threads}" if self.threads else ""
        rows = [(f"model      {self.model} ({_megabytes(self.file_bytes)}; {_megabytes(self.weight_bytes)} "
                 f"of weights read per decoded token){threads}")]
        for n, s in self.prefill.items():
            lo, hi = s.spread
            rows.append(f"prefill    {n:4d} tokens  {s.tokens_per_second:8.1f} tok/s   (range {lo:.1f}-{hi:.1f}, "
                        f"{len(s.seconds)} runs)")
        d = self.decode
        lo, hi = d.spread
        line = (f"decode     {d.tokens:4d} tokens  {d.tokens_per_second:8.1f} tok/s   (range {lo:.1f}-{hi:.1f}, "
                f"{len(d.seconds)} runs)  {d.gb_per_second:.1f} GB/s of weights")
        if self.bandwidth is not None:
            bw = self.bandwidth.gb_per_second
            line += f" = {d.gb_per_second / bw:.0%} of the measured {bw:.1f} GB/s read bandwidth"
        rows.append(line)
        return rows


def run_bench(model, prompt_tokens=(128, 512), gen_tokens: int = 128, repeats: int = 3,
              probe_bytes: int | None = 1 << 30) -> BenchReport:
    prefill = {n: time_prefill(model, n, repeats) for n in prompt_tokens if n + 1 <= model.n_ctx}
    decode = time_decode(model, min(gen_tokens, model.n_ctx - 2), repeats)
    bandwidth = memory_bandwidth(probe_bytes) if probe_bytes else None
    return BenchReport(model.name, model.path.stat().st_size, weight_bytes_per_token(model),
                       threads_in_words(model.ops), prefill, decode, bandwidth)


def threads_in_words(ops) -> str | None:
    """How a backend chooses its threads: "2 threads", or the adaptive governor's state."""
    if not hasattr(ops, "threads"):
        return None
    layer = f", Numba's {ops.threading_layer} threading layer" if hasattr(ops, "threading_layer") else ""
    quota = getattr(ops, "cpu_quota", None)
    layer += f", a cgroup CPU quota of {quota:.3g} CPU{'' if quota == 1 else 's'}" if quota else ""
    governor = getattr(ops, "governor", None)
    if governor is None:
        return f"{ops.threads} threads{layer}"
    return (f"adaptive threads up to {ops.threads} (decode on {governor.current} at the end, "
            f"{governor.switches} switches{layer})")


def _megabytes(n: int) -> str:
    """Sizes as people read them: "98 MB", "1.1 MB", "0.26 MB" (never "0 MB")."""
    mb = n / 1e6
    return f"{mb:.0f} MB" if mb >= 10 else f"{mb:.2g} MB"
