"""GPU speed: each CUDA kernel at LLaMA-7B shapes, and whole-model decode/prefill tokens/s.

    pytest benchmarks/test_bench_cuda.py --benchmark-only

Needs a real NVIDIA GPU (the simulator's timings would mean nothing); skipped, saying why,
everywhere else. Decode is memory-bound, so its numbers are also given as GB/s of weights
read (``extra_info``), next to this GPU's own copy bandwidth measured here.

Weights are random bytes in the real formats (random nibbles and scales: the kernels' work
does not depend on the values). The model benchmarks run the LLaMA forward at 7B shapes with
one layer's weights shared by all 32 layers: one layer's q4_0 weights (~114 MB) are larger
than the GPU's L2 cache, so every layer still streams its weights from memory.
"""
from __future__ import annotations

import numpy as np
import pytest

from tinyllm.device import check_cuda, simulator_enabled
from tinyllm.errors import TinyLLMError
from tinyllm.kernels.quant import QTensor, n_blocks
from tinyllm.kvcache import Batch, KVCache


def _why_no_gpu() -> str | None:
    if simulator_enabled():
        return "NUMBA_ENABLE_CUDASIM=1: the CUDA simulator's timings mean nothing"
    try:
        check_cuda()
    except TinyLLMError as e:
        return f"GPU benchmarks need a GPU: {e}"
    return None


_REASON = _why_no_gpu()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

D, F, H, HD, VOCAB, LAYERS = 4096, 11008, 32, 128, 32000, 32   # LLaMA-7B


@pytest.fixture(scope="module")
def ops():
    from tinyllm.kernels import get_backend

    return get_backend("cuda")


@pytest.fixture(scope="module")
def cuda():
    from numba import cuda

    return cuda


def random_qtensor(rows: int, cols: int, fmt: str, seed: int = 0) -> QTensor:
    """A (rows, cols) weight with random quants and plausible scales, built directly."""
    rng = np.random.default_rng(seed)
    nb = n_blocks(cols)
    d = rng.uniform(0.002, 0.02, (rows, nb)).astype(np.float16)
    if fmt == "q8_0":
        return QTensor(fmt, (rows, cols), {"d": d, "qs": rng.integers(-127, 128, (rows, 32, nb), dtype=np.int8)})
    parts = {"d": d, "qs": rng.integers(0, 256, (rows, 16, nb), dtype=np.uint8)}
    if fmt == "q4_1":
        parts["m"] = rng.uniform(-0.1, 0.0, (rows, nb)).astype(np.float16)
    return QTensor(fmt, (rows, cols), parts)


def timed(benchmark, cuda, fn, rounds: int = 20):
    """Mean seconds of fn() including a device synchronize, after a compiling warm-up."""
    def run():
        fn()
        cuda.synchronize()
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=2)
    return benchmark.stats.stats.mean


@pytest.fixture(scope="module")
def copy_bandwidth(cuda):
    """This GPU's device-to-device copy bandwidth (GB/s of bytes read + written)."""
    import time

    @cuda.jit
    def copy(src, dst):
        i = cuda.grid(1)
        if i < src.shape[0]:
            dst[i] = src[i]

    n = 256 * 1024 * 1024  # 1 GiB of float32
    src, dst = cuda.device_array(n, np.float32), cuda.device_array(n, np.float32)
    grid = (n + 255) // 256
    copy[grid, 256](src, dst)
    cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        copy[grid, 256](src, dst)
    cuda.synchronize()
    return 10 * 2 * n * 4 / (time.perf_counter() - t) / 1e9


# -- kernels ---------------------------------------------------------------------------

MATVECS = [("q4_0", D, D), ("q4_0", F, D), ("q4_0", D, F), ("q4_1", F, D), ("q8_0", VOCAB, D)]


@pytest.mark.parametrize("fmt,rows,cols", MATVECS, ids=[f"{f}-{r}x{c}" for f, r, c in MATVECS])
def test_matvec_decode(benchmark, ops, cuda, copy_bandwidth, fmt, rows, cols):
    w = ops.prepare(random_qtensor(rows, cols, fmt))
    x = ops.from_numpy(np.random.default_rng(1).standard_normal((1, cols)).astype(np.float32))
    mean = timed(benchmark, cuda, lambda: ops.matmul(x, w), rounds=50)
    benchmark.extra_info.update(weight_GB_per_s=round(w.nbytes / mean / 1e9, 1),
                                device_copy_GB_per_s=round(copy_bandwidth, 1))


@pytest.mark.parametrize("T", [32, 512])
def test_matmul_prefill(benchmark, ops, cuda, T):
    w = ops.prepare(random_qtensor(F, D, "q4_0"))
    x = ops.from_numpy(np.random.default_rng(1).standard_normal((T, D)).astype(np.float32))
    mean = timed(benchmark, cuda, lambda: ops.matmul(x, w))
    benchmark.extra_info["TFLOP_per_s"] = round(2 * T * F * D / mean / 1e12, 2)


def test_rmsnorm(benchmark, ops, cuda):
    x = ops.from_numpy(np.ones((1, D), np.float32))
    g = ops.prepare(np.ones(D, np.float32))
    timed(benchmark, cuda, lambda: ops.rmsnorm(x, g, 1e-5), rounds=100)


@pytest.mark.parametrize("T", [1, 512])
def test_rope(benchmark, ops, cuda, T):
    x = ops.from_numpy(np.ones((T, D), np.float32))
    inv = (1.0 / 10000.0 ** (np.arange(0, HD, 2) / HD)).astype(np.float32)
    pos = np.arange(100, 100 + T)
    timed(benchmark, cuda, lambda: ops.rope(x, pos, inv, H), rounds=100)


@pytest.mark.parametrize("T,start", [(1, 1023), (1, 4095), (512, 0)], ids=["decode@1k", "decode@4k", "prefill512"])
def test_attention(benchmark, ops, cuda, T, start):
    cache = ops.new_kv_cache(1, H, 4096, HD)[0]
    q = ops.from_numpy(np.random.default_rng(2).standard_normal((T, H * HD)).astype(np.float32))
    mean = timed(benchmark, cuda, lambda: ops.attention(q, cache, start, H, HD ** -0.5))
    if T == 1:  # decode reads every cached key and value once
        benchmark.extra_info["kv_GB_per_s"] = round((start + 1) * H * HD * 4 * 2 / mean / 1e9, 1)


# -- whole model -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama7b(ops):
    """LLaMA-7B-shaped weights on the device (q4_0, q8_0 output), one layer shared by all."""
    from tinyllm.arch import llama

    cfg = llama.Config(hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS, num_attention_heads=H,
                       vocab_size=VOCAB, max_position_embeddings=4096)
    ones = ops.prepare(np.ones(D, np.float32))
    layer = {"attention_norm": ones, "ffn_norm": ones,
             "attention.wq": random_qtensor(D, D, "q4_0", 1), "attention.wk": random_qtensor(D, D, "q4_0", 2),
             "attention.wv": random_qtensor(D, D, "q4_0", 3), "attention.wo": random_qtensor(D, D, "q4_0", 4),
             "feed_forward.w1": random_qtensor(F, D, "q4_0", 5), "feed_forward.w3": random_qtensor(F, D, "q4_0", 6),
             "feed_forward.w2": random_qtensor(D, F, "q4_0", 7)}
    layer = {k: v if k.endswith("norm") else ops.prepare(v) for k, v in layer.items()}
    w = {"tok_embeddings": ops.prepare(random_qtensor(VOCAB, D, "q8_0", 8)), "norm": ones,
         "output": ops.prepare(random_qtensor(VOCAB, D, "q8_0", 9))}
    for i in range(LAYERS):
        w.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    read_per_token = LAYERS * sum(v.nbytes for k, v in layer.items() if not k.endswith("norm")) + w["output"].nbytes
    cache = KVCache(ops, LAYERS, H, 1024, HD)
    return llama, cfg, w, cache, read_per_token


def test_decode_tokens_per_second(benchmark, ops, cuda, llama7b, copy_bandwidth):
    """One token at position 255 (attention over 256 cached keys), logits copied to the host."""
    arch, cfg, w, cache, nbytes = llama7b
    token = np.array([7])
    batch = Batch.single(cache, 255, 1)
    mean = timed(benchmark, cuda, lambda: ops.to_numpy(arch.forward(cfg, w, ops, batch, token, True)), rounds=10)
    benchmark.extra_info.update(tokens_per_s=round(1 / mean, 1), weight_GB_per_token=round(nbytes / 1e9, 2),
                                weight_GB_per_s=round(nbytes / mean / 1e9, 1),
                                device_copy_GB_per_s=round(copy_bandwidth, 1))


def test_prefill_tokens_per_second(benchmark, ops, cuda, llama7b):
    """512 prompt tokens from an empty cache, last logits copied to the host."""
    arch, cfg, w, cache, _ = llama7b
    tokens = np.arange(512) % VOCAB
    batch = Batch.single(cache, 0, 512)
    mean = timed(benchmark, cuda, lambda: ops.to_numpy(arch.forward(cfg, w, ops, batch, tokens, True)), rounds=3)
    benchmark.extra_info["tokens_per_s"] = round(512 / mean, 1)
