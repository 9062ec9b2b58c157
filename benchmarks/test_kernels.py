"""One benchmark per kernel, at real model shapes, on both backends.

Matrix products at the LLaMA-7B / TinyLlama shapes for q4_0, q4_k and q8_0: decode (one token,
reported as GB/s of weights read) and prefill (128 tokens, reported as GOP/s), where the
Numba backend's SIMD integer kernel is also measured against dequantize-a-tile-then-BLAS.
The other ops at TinyLlama's sizes (hidden 2048, 32 heads of 64, 4 kv heads).
"""
from __future__ import annotations

import numpy as np
import pytest

from tinyllm.kernels import numba_cpu, reference

from .bench_model import random_tensor
from .conftest import record

SHAPES = [(2048, 2048), (5632, 2048), (2048, 5632), (4096, 4096), (11008, 4096), (4096, 11008)]
BACKENDS = {"numba": numba_cpu, "numpy": reference}
_weights: dict = {}


def weight(fmt, shape):
    if (fmt, shape) not in _weights:
        _weights.clear()  # one big matrix alive at a time
        _weights[fmt, shape] = numba_cpu.prepare(random_tensor(shape, fmt, np.random.default_rng(0)))
    return _weights[fmt, shape]


def run(benchmark, fn, *args, slow=False):
    if slow:  # the reference dequantizes the whole matrix per call: a few rounds say enough
        return benchmark.pedantic(fn, args=args, rounds=3, iterations=1, warmup_rounds=1)
    return benchmark(fn, *args)


def shape_id(shape):
    return f"{shape[0]}x{shape[1]}"


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("fmt", ["q4_0", "q4_k", "q8_0"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_matvec_decode(benchmark, backend, fmt, shape):
    w = weight(fmt, shape)
    x = np.random.default_rng(1).standard_normal((1, shape[1])).astype(np.float32)
    run(benchmark, BACKENDS[backend].matmul, x, w, slow=backend == "numpy")
    gbs = w.nbytes / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["GB/s"] = round(gbs, 2)
    record(f"matvec {fmt} {shape_id(shape)} {backend}", median_us=benchmark.stats.stats.median * 1e6, gb_s=gbs)


PREFILL_PATHS = {
    "numba-simd": lambda x, w: numba_cpu.matmul(x, w),
    "numba-blas": lambda x, w: numba_cpu._matmul_blas_tiles(x, w),
    "numpy": lambda x, w: reference.matmul(x, w),
}


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("fmt", ["q4_0", "q4_k", "q8_0"])
@pytest.mark.parametrize("path", list(PREFILL_PATHS))
def test_matmul_prefill_128(benchmark, path, fmt, shape):
    if path == "numba-simd" and not numba_cpu.default_simd_width():
        pytest.skip("no SIMD kernels on this CPU")
    w = weight(fmt, shape)
    x = np.random.default_rng(1).standard_normal((128, shape[1])).astype(np.float32)
    benchmark.pedantic(PREFILL_PATHS[path], args=(x, w), rounds=5, iterations=1, warmup_rounds=1)
    gops = 2 * 128 * shape[0] * shape[1] / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["GOP/s"] = round(gops, 1)
    record(f"prefill128 {fmt} {shape_id(shape)} {path}", median_ms=benchmark.stats.stats.median * 1e3, gop_s=gops)


# -- the other ops at TinyLlama's sizes -------------------------------------------------------

D, F, H, KV, HD = 2048, 5632, 32, 4, 64
rng = np.random.default_rng(2)


def _x(*shape):
    return rng.standard_normal(shape).astype(np.float32)


INV_FREQ = (1.0 / 10000 ** (np.arange(0, HD, 2) / HD)).astype(np.float32)
OPS = {
    "rmsnorm": lambda m, T: (m.rmsnorm, _x(T, D), np.ones(D, np.float32), 1e-5),
    "swiglu": lambda m, T: (m.swiglu, _x(T, F), _x(T, F)),
    "gelu": lambda m, T: (m.gelu, _x(T, F)),
    "softmax": lambda m, T: (m.softmax, _x(T * H, 512)),
    "rope": lambda m, T: (m.rope, _x(T, D), np.arange(T) + 100, INV_FREQ, H),
}


@pytest.mark.parametrize("T", [1, 128])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_op(benchmark, backend, op, T):
    fn, *args = OPS[op](BACKENDS[backend], T)
    benchmark(fn, *args)
    record(f"{op} T={T} {backend}", median_us=benchmark.stats.stats.median * 1e6)


@pytest.mark.parametrize("T,start", [(1, 127), (1, 2047), (1, 4063), (128, 0), (512, 0)], ids=lambda v: str(v))
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("cache_type", ["f32", "f16"])
def test_attention(benchmark, backend, T, start, cache_type):
    m = BACKENDS[backend]
    cache = m.new_kv_cache(1, KV, start + T, HD, cache_type)[0]
    m.kv_write(cache, _x(start + T, KV * HD), _x(start + T, KV * HD), 0)
    q = _x(T, H * HD)
    benchmark(m.attention, q, cache, start, H, HD ** -0.5)
    record(f"attention T={T} start={start} {cache_type} {backend}", median_us=benchmark.stats.stats.median * 1e6)


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_matvec_decode_from_dram(benchmark, fmt):
    """The decode matvec over ~1.1 GB of distinct 5632x2048 matrices, more than the last-level
    cache: each call streams its weights from memory, as in a real decode step."""
    base = random_tensor((5632, 2048), fmt, np.random.default_rng(0))
    n = (1100 << 20) // base.nbytes + 1
    ws = [numba_cpu.prepare(type(base)(fmt, base.shape, {k: v.copy() for k, v in base.parts.items()}))
          for _ in range(n)]
    x = np.random.default_rng(1).standard_normal((1, 2048)).astype(np.float32)

    def sweep():
        for w in ws:
            numba_cpu.matmul(x, w)

    benchmark.pedantic(sweep, rounds=5, iterations=1, warmup_rounds=1)
    gbs = n * base.nbytes / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["GB/s"] = round(gbs, 2)
    record(f"matvec {fmt} 5632x2048 x{n} matrices (from DRAM) numba", gb_s=gbs)
