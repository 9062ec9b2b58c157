"""One conformance test over every backend: each op of the Backend contract
(kernels/backend.py) against the NumPy reference, on small and odd shapes. The CUDA backend
runs here on a GPU, or in the simulator process (tests/test_cuda_simulator.py)."""
from __future__ import annotations

import numpy as np
import pytest

from tinyllm.errors import ShapeError, TinyLLMError
from tinyllm.kernels import get_backend, quant
from tinyllm.kernels import reference as ref
from tinyllm.kernels.backend import BACKEND_OPS, CACHE_TYPES, Backend

from .cuda_support import cuda_backend

TOL = 2e-5        # float ops: float32 rounding, fast exp/erf
QUANT_TOL = 3e-2  # quantized matmuls: the int8 activation blocks of the fast kernels


@pytest.fixture(params=["numpy", "numba", "cuda"])
def ops(request):
    return cuda_backend() if request.param == "cuda" else get_backend(request.param)


def rel_err(got, want) -> float:
    want = np.asarray(want, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1.0))


def rand(*shape, seed=0):
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


def test_every_backend_provides_the_contract(ops):
    assert isinstance(ops, Backend)
    assert all(callable(getattr(ops, name)) for name in BACKEND_OPS)


def test_backends_are_objects_with_their_own_settings():
    a, b = get_backend("numba", threads=1), get_backend("numba")
    assert (a.threads, b.threads) == (1, nb_default_threads()) and a is not b
    with pytest.raises(TinyLLMError, match="does not take a thread count"):
        get_backend("numpy", threads=2)
    with pytest.raises(TinyLLMError, match="unknown backend"):
        get_backend("nonesuch")


def nb_default_threads() -> int:
    from tinyllm.kernels import numba_cpu

    return numba_cpu.thread_count()


def test_a_broken_contract_is_one_error_class_on_every_backend(ops):
    w = ops.prepare(quant.quantize(rand(4, 32), "q8_0"))
    with pytest.raises(ShapeError, match="matmul"):
        ops.matmul(ops.from_numpy(rand(2, 40)), w)


@pytest.mark.parametrize("fmt", ["f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k"])
@pytest.mark.parametrize("T,N,K", [(1, 7, 100), (5, 33, 64)])
def test_matmul_and_embedding(ops, fmt, T, N, K):
    w = quant.quantize(rand(N, K) + 0.1, fmt)
    x, bias = rand(T, K, seed=1), rand(N, seed=2)
    got = ops.to_numpy(ops.matmul(ops.from_numpy(x), ops.prepare(w), ops.prepare(bias)))
    assert got.shape == (T, N)
    assert rel_err(got, ref.matmul(x, w, bias)) < (TOL * 10 if fmt in ("f32", "f16") else QUANT_TOL)
    ids = np.array([0, N - 1, 3], dtype=np.int64)
    np.testing.assert_array_equal(ops.to_numpy(ops.embedding(ops.prepare(w), ids)), ref.embedding(w, ids))


def test_matmuls(ops):
    """Weights on one input, of one format (the Numba backend fuses them) or mixed, with biases."""
    x = rand(3, 64, seed=3)
    ws = [quant.quantize(rand(n, 64, seed=n), fmt) for n, fmt in ((32, "q4_0"), (8, "q4_0"), (8, "q4_0"), (16, "q8_0"))]
    biases = [None, rand(8, seed=4), None, rand(16, seed=5)]
    for n in (1, 3, 4):
        got = ops.matmuls(ops.from_numpy(x), [ops.prepare(w) for w in ws[:n]],
                          [None if b is None else ops.prepare(b) for b in biases[:n]])
        assert len(got) == n
        for y, w, b in zip(got, ws, biases):
            assert rel_err(ops.to_numpy(y), ref.matmul(x, w, b)) < QUANT_TOL
    with pytest.raises(ShapeError, match="biases"):
        ops.matmuls(ops.from_numpy(x), [ops.prepare(w) for w in ws[:2]], [None])


def test_elementwise_and_norms(ops):
    x, y = rand(3, 40), rand(3, 40, seed=5)
    w, b = rand(40, seed=6), rand(40, seed=7)
    X, Y = ops.from_numpy(x), ops.from_numpy(y)
    checks = [
        (ops.add(X, Y), ref.add(x, y)),
        (ops.rmsnorm(X, ops.prepare(w), 1e-5), ref.rmsnorm(x, w, 1e-5)),
        (ops.layernorm(X, ops.prepare(w), ops.prepare(b), 1e-5), ref.layernorm(x, w, b, 1e-5)),
        (ops.layernorm(X, ops.prepare(w), None, 1e-5), ref.layernorm(x, w, None, 1e-5)),
        (ops.gelu(X), ref.gelu(x)),
        (ops.gelu(X, True), ref.gelu(x, True)),
        (ops.swiglu(X, Y), ref.swiglu(x, y)),
        (ops.clip(X, 0.5), ref.clip(x, 0.5)),
        (ops.concat_rows([X, Y, ops.from_numpy(x[1:2])]), ref.concat_rows([x, y, x[1:2]])),  # batched rows
    ]
    for i, (got, want) in enumerate(checks):
        assert rel_err(ops.to_numpy(got), want) < TOL, i


@pytest.mark.parametrize("rotary", [8, 4])  # full and partial rotary
def test_rope(ops, rotary):
    x, positions = rand(3, 2 * 8), np.array([0, 5, 9], dtype=np.int64)
    inv = (1.0 / 10000 ** (np.arange(0, rotary, 2) / rotary)).astype(np.float32)
    got = ops.to_numpy(ops.rope(ops.from_numpy(x), positions, inv, 2))
    assert rel_err(got, ref.rope(x, positions, inv, 2)) < TOL


@pytest.mark.parametrize("heads,kv_heads,alibi", [(4, 4, False), (4, 2, False), (4, 1, True)])
@pytest.mark.parametrize("cache_type", list(CACHE_TYPES))
def test_kv_cache_and_attention(ops, heads, kv_heads, alibi, cache_type):
    hd, n_ctx = 8, 16
    if cache_type not in ops.cache_types:  # a type the backend does not list is refused, never ignored
        with pytest.raises(TinyLLMError, match=cache_type):
            ops.new_kv_cache(1, kv_heads, n_ctx, hd, cache_type)
        return
    slopes = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)[:heads] if alibi else None
    ours, theirs = (b.new_kv_cache(1, kv_heads, n_ctx, hd, cache_type)[0] for b in (ops, ref))
    for start, T in ((0, 5), (5, 1), (6, 3)):  # a prefill, then decode steps and a chunk
        k, v, q = rand(T, kv_heads * hd, seed=start), rand(T, kv_heads * hd, seed=start + 1), rand(T, heads * hd)
        ops.kv_write(ours, ops.from_numpy(k), ops.from_numpy(v), start)
        ref.kv_write(theirs, k, v, start)
        got = ops.to_numpy(ops.attention(ops.from_numpy(q), ours, start, heads, hd ** -0.5, slopes))
        assert rel_err(got, ref.attention(q, theirs, start, heads, hd ** -0.5, slopes)) < TOL, (start, T)
