"""Whole-model speed on a TinyLlama-1.1B-shaped q4_0 LLaMA (bench_model.py), side by side
with llama.cpp (llama-cpp-python) on the same weights in GGUF Q4_0 with the same threads.

    prefill   one eval of 128 / 512 tokens from an empty cache      tokens/s
    decode    128 one-token evals after a one-token prompt           tokens/s, GB/s of weights,
                                                                      fraction of the probe's bandwidth
    start     `tinyllm generate -n 1`, wall time, first-ever (empty kernel cache) and second
    memory    peak RSS of `tinyllm generate -n 128` vs file + KV cache + 300 MB

The summary (benchmarks/conftest.py) prints every figure and the ratios tinyllm / llama.cpp.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import tinyllm
from tinyllm.benchmark import memory_bandwidth, prompt_ids, weight_bytes_per_token

from .bench_model import bench_model
from .conftest import bench_threads, record

PREFILL = [128, 512]
DECODE = 128
N_CTX = 1024
ROUNDS = 5

try:
    import llama_cpp
except ImportError:  # not a test dependency: measured only where it is installed
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed: "
                                     "no side-by-side (pip install llama-cpp-python to measure it)")


@pytest.fixture(scope="module")
def paths():
    try:
        return bench_model(gguf_too=llama_cpp is not None)
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def model(paths):
    return tinyllm.load(paths[0], backend="numba", threads=bench_threads(), n_ctx=N_CTX)


@pytest.fixture(scope="module")
def bandwidth():
    s = memory_bandwidth(1 << 30, repeats=7)
    best = s.bytes_read / min(s.seconds) / 1e9
    record("memory bandwidth (1 GiB read, all threads)", median_gb_s=s.gb_per_second, best_gb_s=best)
    return s.gb_per_second


def _speeds(benchmark, tokens):
    stats = benchmark.stats.stats
    return dict(median_tok_s=tokens / stats.median, slowest_tok_s=tokens / stats.max,
                fastest_tok_s=tokens / stats.min, rounds=stats.rounds)


@pytest.mark.parametrize("n", PREFILL)
def test_prefill_tinyllm(benchmark, model, n):
    tokens = prompt_ids(n, model.config.vocab_size)
    model.reset()
    model.eval(tokens[:8])  # compile / page in outside the timing
    benchmark.pedantic(model.eval, args=(tokens,), setup=model.reset, rounds=ROUNDS, iterations=1)
    record(f"prefill {n} tinyllm", **_speeds(benchmark, n))


def test_decode_tinyllm(benchmark, model, bandwidth):
    tokens = prompt_ids(DECODE + 1, model.config.vocab_size, seed=1)

    def setup():
        model.reset()
        model.eval(tokens[:1])

    def decode():
        for i in range(2, DECODE + 2):
            model.eval(tokens[:i])

    setup()
    decode()  # warm-up round
    benchmark.pedantic(decode, setup=setup, rounds=ROUNDS, iterations=1)
    speeds = _speeds(benchmark, DECODE)
    gbs = weight_bytes_per_token(model) * speeds["median_tok_s"] / 1e9
    benchmark.extra_info.update(tok_s=speeds["median_tok_s"], gb_s=gbs, of_bandwidth=gbs / bandwidth)
    record(f"decode {DECODE} tinyllm", **speeds, weights_gb_s=gbs, fraction_of_bandwidth=gbs / bandwidth)


# -- llama.cpp on the same weights --------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(paths, model):
    n = bench_threads()
    llm = llama_cpp.Llama(model_path=str(paths[1]), n_ctx=N_CTX, n_batch=512, n_ubatch=512, n_threads=n,
                          n_threads_batch=n, verbose=False)
    # the same model? last-token logits of one prompt must agree (both round activations to int8)
    tokens = prompt_ids(16, model.config.vocab_size, seed=2)
    llm.reset()
    llm.eval(tokens)
    theirs = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(model.config.vocab_size,)).copy()
    model.reset()
    ours = model.eval(tokens)
    rel = float(np.sqrt(np.mean((ours - theirs) ** 2)) / ours.std())
    record("llama.cpp vs tinyllm logits (same weights)", rms_over_std=rel,
           llama_cpp_version=llama_cpp.__version__)
    assert rel < 0.05, f"llama.cpp and tinyllm disagree (RMS {rel:.3f} x std): not the same model"
    return llm


@needs_llama_cpp
@pytest.mark.parametrize("n", PREFILL)
def test_prefill_llama_cpp(benchmark, llama, model, n):
    tokens = prompt_ids(n, model.config.vocab_size)
    benchmark.pedantic(llama.eval, args=(tokens,), setup=llama.reset, rounds=ROUNDS, iterations=1)
    record(f"prefill {n} llama.cpp", **_speeds(benchmark, n))


@needs_llama_cpp
def test_decode_llama_cpp(benchmark, llama, model, bandwidth):
    tokens = prompt_ids(DECODE + 1, model.config.vocab_size, seed=1)

    def setup():
        llama.reset()
        llama.eval(tokens[:1])

    def decode():
        for t in tokens[1:]:
            llama.eval([t])

    setup()
    decode()
    benchmark.pedantic(decode, setup=setup, rounds=ROUNDS, iterations=1)
    speeds = _speeds(benchmark, DECODE)
    gbs = weight_bytes_per_token(model) * speeds["median_tok_s"] / 1e9
    record(f"decode {DECODE} llama.cpp", **speeds, weights_gb_s=gbs, fraction_of_bandwidth=gbs / bandwidth)


# -- start time and memory of the CLI --------------------------------------------------------

def _peak_rss(pid: int) -> int:
    """VmHWM of a running process, bytes (0 once it is gone). Unlike the rusage of a child,
    it covers only the program the child exec'd, not the forked copy of this process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def _cli(args, env=None) -> tuple[float, int]:
    """Run `tinyllm ARGS` in a fresh process: (wall seconds, peak RSS bytes, sampled every 10 ms)."""
    cmd = [sys.executable, "-c", "from tinyllm.cli import main; main()", *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _peak_rss(proc.pid))
        time.sleep(0.01)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr.read().decode()
    return seconds, peak


def test_start_to_first_token(benchmark, paths):
    """`tinyllm generate -n 1`: load, compile (first start only), prefill a short prompt, one
    token, exit. The kernel cache lives in a fresh directory: first start compiles into it."""
    args = ["generate", str(paths[0]), "-p", "Once upon a time", "-n", "1", "--temperature", "0",
            "--threads", str(bench_threads())]
    with tempfile.TemporaryDirectory() as cache:
        env = {"NUMBA_CACHE_DIR": cache}
        first, _ = _cli(args, env)
        benchmark.pedantic(_cli, args=(args, env), rounds=3, iterations=1)
    record("start to first token (tinyllm generate -n 1)", first_ever_s=first,
           second_start_median_s=benchmark.stats.stats.median, second_start_max_s=benchmark.stats.stats.max)


def test_peak_memory_while_decoding(benchmark, paths):
    m = tinyllm.load(paths[0], backend="numpy")  # just for the sizes
    cfg = m.config
    kv_bytes = cfg.num_hidden_layers * 2 * cfg.n_kv_heads * m.n_ctx * cfg.head_dim * 4
    file_bytes = paths[0].stat().st_size
    del m
    args = ["generate", str(paths[0]), "-p", "Once upon a time", "-n", str(DECODE), "--temperature", "0",
            "--threads", str(bench_threads())]
    _, rss = benchmark.pedantic(_cli, args=(args,), rounds=1, iterations=1)
    bound = file_bytes + kv_bytes + 300e6
    record("peak RSS decoding (tinyllm generate -n 128)", rss_mb=rss / 1e6, file_mb=file_bytes / 1e6,
           kv_cache_mb=kv_bytes / 1e6, bound_mb=bound / 1e6, within_bound=bool(rss <= bound))
