"""Every numba.cuda kernel against its NumPy reference twin, on small and odd shapes.

Runs on a real GPU when there is one, else under Numba's CUDA simulator (see
tests/cuda_support.py for the command CI uses). The simulator runs each GPU thread as a
Python thread, so shapes are kept tiny. The last test compiles every kernel to PTX for a
real GPU, which the simulator (plain Python) cannot check; it needs NVVM, not a GPU.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tinyllm.errors import TinyLLMError
from tinyllm.kernels import reference as R
from tinyllm.kernels.quant import quantize

from .cuda_support import cuda_backend

FORMATS = ("q4_0", "q4_1", "q4_k", "q6_k", "q8_0", "f16", "f32")


@pytest.fixture(scope="module")
def C():
    """The cuda backend's module: its op functions, and the helpers (silu, softmax) outside the contract."""
    import importlib

    return importlib.import_module(type(cuda_backend()).__module__)


def rand(*shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def close(got, want, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


# -- matrix products ---------------------------------------------------------------------

# (T, N, K): decode of one token with cols not a multiple of 32; a single output row;
# three tokens (still the matrix-vector kernel); six tokens (the tiled kernel).
@pytest.mark.parametrize("shape", [(1, 40, 70), (3, 1, 64), (6, 37, 45)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_matches_reference(C, fmt, shape):
    T, N, K = shape
    w = quantize(rand(N, K, seed=1), fmt)
    x = rand(T, K, seed=2)
    bias = rand(N, seed=3) if T != 3 else None
    got = C.to_numpy(C.matmul(C.from_numpy(x), C.prepare(w), None if bias is None else C.prepare(bias)))
    assert got.shape == (T, N)
    close(got, R.matmul(x, w, bias), atol=1e-4)


def test_matmul_spans_several_tiles(C):
    """37 tokens x 67 rows: two tiles each way, edges partly filled."""
    w = quantize(rand(67, 40, seed=4), "q4_0")
    x = rand(37, 40, seed=5)
    close(C.to_numpy(C.matmul(C.from_numpy(x), C.prepare(w))), R.matmul(x, w), atol=1e-4)


def test_matmul_rejects_wrong_width(C):
    with pytest.raises(TinyLLMError, match="matmul shape mismatch"):
        C.matmul(C.from_numpy(rand(1, 31)), C.prepare(quantize(rand(4, 32), "q4_0")))


@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_dequantizes_rows_on_device(C, fmt):
    table = quantize(rand(9, 70, seed=6), fmt)
    tokens = np.array([8, 0, 3, 3, 8])  # last row, first row, a repeat
    close(C.to_numpy(C.embedding(C.prepare(table), tokens)), R.embedding(table, tokens), rtol=0, atol=0)


def test_embedding_rejects_out_of_range_token(C):
    with pytest.raises(TinyLLMError, match="token id out of range"):
        C.embedding(C.prepare(quantize(rand(9, 32), "q8_0")), np.array([2, 9]))


def test_prepare_keeps_vectors_and_reports_weight_bytes(C):
    v = rand(70, seed=7)
    close(C.to_numpy(C.prepare(v)), v, rtol=0, atol=0)
    w = quantize(rand(5, 70), "q4_1")
    assert C.prepare(w).nbytes == w.nbytes


# -- elementwise and normalization -------------------------------------------------------

def test_elementwise_ops(C):
    a, b = rand(3, 70, seed=8, scale=3), rand(3, 70, seed=9, scale=3)
    da, db = C.from_numpy(a), C.from_numpy(b)
    close(C.to_numpy(C.add(da, db)), R.add(a, b))
    row = rand(70, seed=10)
    close(C.to_numpy(C.add(da, C.prepare(row))), R.add(a, row))
    close(C.to_numpy(C.silu(da)), R.silu(a))
    close(C.to_numpy(C.swiglu(da, db)), R.swiglu(a, b))
    close(C.to_numpy(C.gelu(da)), R.gelu(a))
    close(C.to_numpy(C.gelu(da, approximate=True)), R.gelu(a, approximate=True))
    close(C.to_numpy(C.clip(da, 2.5)), R.clip(a, 2.5), rtol=0, atol=0)


def test_add_rejects_mismatched_shapes(C):
    with pytest.raises(TinyLLMError, match="add: shapes"):
        C.add(C.from_numpy(rand(2, 8)), C.from_numpy(rand(2, 7)))


# (rows, features): odd width; one row wider than a block (strided loop + reduction)
@pytest.mark.parametrize("shape", [(3, 70), (1, 300)], ids=["3x70", "1x300"])
def test_norms_and_softmax(C, shape):
    x = rand(*shape, seed=11, scale=2) + 0.5
    w, b = rand(shape[1], seed=12), rand(shape[1], seed=13)
    dx = C.from_numpy(x)
    close(C.to_numpy(C.rmsnorm(dx, C.prepare(w), 1e-5)), R.rmsnorm(x, w, 1e-5))
    close(C.to_numpy(C.layernorm(dx, C.prepare(w), C.prepare(b), 1e-5)), R.layernorm(x, w, b, 1e-5))
    close(C.to_numpy(C.layernorm(dx, C.prepare(w), None, 1e-5)), R.layernorm(x, w, None, 1e-5))
    close(C.to_numpy(C.softmax(dx)), R.softmax(x), atol=1e-7)


def test_softmax_on_three_dims(C):
    x = rand(2, 3, 5, seed=14, scale=4)
    close(C.to_numpy(C.softmax(C.from_numpy(x))), R.softmax(x), atol=1e-7)


# -- RoPE ---------------------------------------------------------------------------------

def _inv_freq(rotary_dim, theta=10000.0):
    return (1.0 / theta ** (np.arange(0, rotary_dim, 2) / rotary_dim)).astype(np.float32)


# full rotary over 3 heads of 16; partial (8 of 16 dims, as GPT-J/Falcon variants);
# one token far into the context; positions that are not consecutive
@pytest.mark.parametrize("rotary_dim,positions", [
    (16, [0, 1, 2, 3]), (8, [5, 6, 7, 8]), (16, [4095]), (8, [9, 2, 30, 0]),
], ids=["full", "partial", "T1-far", "gathered"])
def test_rope_matches_reference(C, rotary_dim, positions):
    pos = np.array(positions)
    x = rand(len(pos), 3 * 16, seed=15)
    inv = _inv_freq(rotary_dim)
    close(C.to_numpy(C.rope(C.from_numpy(x), pos, inv, 3)), R.rope(x, pos, inv, 3), atol=2e-6)


def test_rope_rejects_heads_that_do_not_split(C):
    with pytest.raises(TinyLLMError, match="do not split"):
        C.rope(C.from_numpy(rand(1, 30)), np.array([0]), _inv_freq(8), 4)


# -- KV cache and attention ---------------------------------------------------------------

HD = 16


def _step(C, ref_cache, dev_cache, n_heads, start, T, seed, alibi=None):
    """Write T new keys/values at ``start`` to both caches; attend; compare everything."""
    n_kv = ref_cache[0].shape[0]
    q, k, v = (rand(T, h * HD, seed=seed + i) for i, h in enumerate((n_heads, n_kv, n_kv)))
    R.kv_write(ref_cache, k, v, start)
    C.kv_write(dev_cache, C.from_numpy(k), C.from_numpy(v), start)
    for ref, dev in zip(ref_cache, dev_cache):
        close(C.to_numpy(dev), ref, rtol=0, atol=0)
    want = R.attention(q, ref_cache, start, n_heads, HD ** -0.5, alibi)
    got = C.attention(C.from_numpy(q), dev_cache, start, n_heads, HD ** -0.5, alibi)
    close(C.to_numpy(got), want, atol=2e-6)


def _caches(C, n_kv, n_ctx):
    ref = R.new_kv_cache(1, n_kv, n_ctx, HD, "f32")[0]  # the cuda backend's cache type
    dev = C.new_kv_cache(1, n_kv, n_ctx, HD)[0]
    close(C.to_numpy(dev[0]), ref[0], rtol=0, atol=0)  # zeroed on the device
    return ref, dev


# (n_heads, n_kv, ALiBi): multi-head, grouped-query, multi-query
@pytest.mark.parametrize("n_heads,n_kv,alibi", [(2, 2, False), (4, 2, False), (3, 1, False), (4, 2, True)],
                         ids=["mha", "gqa", "mqa", "gqa-alibi"])
def test_prefill_then_decode_to_the_last_position(C, n_heads, n_kv, alibi):
    slopes = np.array([0.5, 0.25, 0.125, 0.0625][:n_heads], np.float32) if alibi else None
    ref, dev = _caches(C, n_kv, n_ctx=6)
    _step(C, ref, dev, n_heads, start=0, T=3, seed=20, alibi=slopes)   # causal prefill
    _step(C, ref, dev, n_heads, start=3, T=2, seed=30, alibi=slopes)   # a second chunk
    _step(C, ref, dev, n_heads, start=5, T=1, seed=40, alibi=slopes)   # decode into the last slot


def test_attention_over_more_keys_than_threads(C):
    """70 keys: three tiles of the online softmax, the last one partial; then a decode
    step with large scores, which tests the running-max rescaling."""
    ref, dev = _caches(C, 1, n_ctx=72)
    k, v = rand(68, HD, seed=50), rand(68, HD, seed=51)
    R.kv_write(ref, k, v, 0)
    C.kv_write(dev, C.from_numpy(k), C.from_numpy(v), 0)
    _step(C, ref, dev, 2, start=68, T=1, seed=52, alibi=np.array([0.5, 0.25], np.float32))
    q = rand(1, 2 * HD, seed=60, scale=8)
    k, v = rand(1, HD, seed=61), rand(1, HD, seed=62)
    R.kv_write(ref, k, v, 69)
    C.kv_write(dev, C.from_numpy(k), C.from_numpy(v), 69)
    want = R.attention(q, ref, 69, 2, HD ** -0.5)
    close(C.to_numpy(C.attention(C.from_numpy(q), dev, 69, 2, HD ** -0.5)), want, atol=2e-6)


def test_f16_cache_is_refused_not_ignored(C):
    with pytest.raises(TinyLLMError, match="cuda backend keeps its KV cache in f32"):
        C.new_kv_cache(1, 1, 4, HD, "f16")
    with pytest.raises(TinyLLMError, match="unknown KV cache type"):
        C.new_kv_cache(1, 1, 4, HD, "f8")


def test_kv_write_past_the_cache_is_refused(C):
    _, dev = _caches(C, 1, n_ctx=4)
    with pytest.raises(TinyLLMError, match="exceed the KV cache of 4"):
        C.kv_write(dev, C.from_numpy(rand(2, HD)), C.from_numpy(rand(2, HD)), 3)


def test_attention_rejects_heads_that_do_not_group(C):
    _, dev = _caches(C, 2, n_ctx=4)
    with pytest.raises(TinyLLMError, match="do not match 3 heads"):
        C.attention(C.from_numpy(rand(1, 3 * HD)), dev, 0, 3, 1.0)


# -- a real GPU's compiler ------------------------------------------------------------------

PTX_CHECK = textwrap.dedent("""
    import numba.cuda.dispatcher as dispatcher, types as pytypes
    from numba import cuda, types as T
    from tinyllm.kernels import cuda_kernels as K
    # device functions normally compile for the current GPU; there is none, so name one
    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(8, 0))
    f32, f16, u8, i8, i64, i32, b1 = T.float32, T.float16, T.uint8, T.int8, T.int64, T.int32, T.boolean
    A = lambda dt, nd: T.Array(dt, nd, "C")
    sigs = []
    for qs, wd in ((A(u8, 3), A(f32, 2)), (A(i8, 3), A(f32, 2)), (A(u8, 3), A(f16, 2))):
        w = (i64, A(f16, 2), A(f16, 2), qs, wd)
        sigs.append(("embedding", (A(i32, 1),) + w + (i64, A(f32, 2))))
        sigs += [(k, (A(f32, 2),) + w + (A(f32, 1), b1, i64, A(f32, 2))) for k in ("matvec", "gemm")]
    v1 = A(f32, 1)
    sigs += [("fill_zero", (A(f32, 2),)), ("add", (v1,) * 3), ("silu", (v1,) * 2), ("swiglu", (v1,) * 3),
             ("gelu_erf", (v1,) * 2), ("gelu_tanh", (v1,) * 2), ("clip", (v1, f32, v1)),
             ("rmsnorm", (A(f32, 2), v1, f32, A(f32, 2))),
             ("layernorm", (A(f32, 2), v1, v1, b1, f32, A(f32, 2))),
             ("softmax", (A(f32, 2), A(f32, 2))),
             ("rope", (A(f32, 2), A(i64, 1), i64, A(T.float64, 1), i64, A(f32, 2))),
             ("kv_write", (A(f32, 2), A(f32, 2), A(f32, 3), A(f32, 3), i64)),
             ("attention", (A(f32, 2), A(f32, 3), A(f32, 3), i64, f32, v1, b1, i64, A(f32, 2)))]
    for name, sig in sigs:
        ptx, _ = cuda.compile_ptx(getattr(K, name).py_func, sig, cc=(8, 0))
        assert ".entry" in ptx, name
        # float64 only where the reference computes in it (erf GELU, RoPE angles)
        assert (".f64" in ptx) == (name in ("gelu_erf", "rope")), name
    print("compiled", len(sigs))
""")


def test_every_kernel_compiles_for_a_real_gpu(C):
    """Typing and lowering for sm_80 through NVVM, in a process without the simulator."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if importlib.util.find_spec("numba_cuda") is None:
        # a system CUDA toolkit alone is not enough: Numba's deprecated built-in CUDA target
        # finds its NVVM but compiles differently; tinyllm's CUDA path is the numba-cuda package
        pytest.skip("the cuda extra (numba-cuda) is not installed: pip install -e '.[cuda]'")
    probe = subprocess.run([sys.executable, "-c", "from numba.cuda.cudadrv import nvvm; nvvm.NVVM()"],
                           env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("NVVM (the CUDA compiler library, from the cuda extra) is not installed")
    run = subprocess.run([sys.executable, "-c", PTX_CHECK], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["compiled", "22"]
