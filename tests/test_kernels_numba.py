"""The Numba CPU backend against the NumPy reference, op by op, on small odd shapes.

Tolerances, relative to the largest expected magnitude (or 1, if smaller). Float ops (norms,
activations, RoPE, attention) differ from the reference only by float32 rounding order and
by numba_math's polynomial exp/erf: they must agree to 2e-6 (1e-5 where a long reduction
feeds an exp). Quantized
matmuls also quantize the activation to int8 blocks, so they are checked twice: exactly
(1e-5) against a NumPy model of the same integer arithmetic, and loosely (3e-2 of the
largest output) against the reference's float product; that loose bound is ~6x the
measured activation-rounding error, so a wrong block, nibble or scale still fails it.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tinyllm.errors import TinyLLMError
from tinyllm.kernels import numba_cpu as nb
from tinyllm.kernels import numba_math, numba_ops, numba_quant, numba_simd, quant
from tinyllm.kernels import reference as ref

FLOAT_TOL = 2e-6
REDUCTION_TOL = 1e-5
EXACT_TOL = 1e-5
QUANT_TOL = 3e-2

# (SIMD width, VNNI) pairs this CPU can run, plus the portable loops (width 0)
PATHS = [(w, v) for w in (64, 32) if w <= numba_simd.native_width()
         for v in (False, True) if not v or numba_simd.has_vnni(w)] + [(0, False)]


def rel_err(got, want) -> float:
    """Largest difference relative to the largest expected magnitude (at least 1)."""
    want = np.asarray(want, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1.0))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# -- float ops -------------------------------------------------------------------------------

@pytest.mark.parametrize("T,D", [(1, 64), (3, 100), (7, 33)])
def test_norms(rng, T, D):
    x = rng.standard_normal((T, D)).astype(np.float32) * 3 + 1
    w = rng.uniform(0.5, 1.5, D).astype(np.float32)
    b = rng.standard_normal(D).astype(np.float32)
    assert rel_err(nb.rmsnorm(x, w, 1e-5), ref.rmsnorm(x, w, 1e-5)) < FLOAT_TOL
    assert rel_err(nb.layernorm(x, w, b, 1e-5), ref.layernorm(x, w, b, 1e-5)) < FLOAT_TOL
    assert rel_err(nb.layernorm(x, w, None, 1e-6), ref.layernorm(x, w, None, 1e-6)) < FLOAT_TOL


@pytest.mark.parametrize("shape", [(1, 1), (1, 97), (3, 1000)])
def test_activations(rng, shape):
    x = (rng.standard_normal(shape) * 6).astype(np.float32)
    up = rng.standard_normal(shape).astype(np.float32)
    assert rel_err(nb.silu(x), ref.silu(x)) < FLOAT_TOL
    assert rel_err(nb.swiglu(x, up), ref.swiglu(x, up)) < FLOAT_TOL
    assert rel_err(nb.gelu(x), ref.gelu(x)) < FLOAT_TOL
    assert rel_err(nb.gelu(x, approximate=True), ref.gelu(x, approximate=True)) < FLOAT_TOL
    assert np.array_equal(nb.clip(x, 2.5), ref.clip(x, 2.5))
    assert np.array_equal(nb.add(x, up), ref.add(x, up))


def test_activations_at_extremes():
    x = np.array([[-1000.0, -90.0, -20.0, 0.0, 1e-8, 20.0, 90.0, 1000.0]], np.float32)
    with np.errstate(over="ignore"):  # the reference's exp overflows to inf, correctly
        for approximate in (False, True):
            got, want = nb.gelu(x, approximate), ref.gelu(x, approximate)
            assert np.allclose(got, want, rtol=1e-6, atol=1e-7) and np.all(np.isfinite(got))
        assert np.allclose(nb.silu(x), ref.silu(x), rtol=1e-6, atol=1e-30)


def test_fast_exp_accuracy():
    x = np.linspace(-87, 88, 200001, dtype=np.float32)  # the unclamped range
    out = np.empty_like(x)

    from numba import njit

    @njit
    def run(x, out):
        for i in range(x.shape[0]):
            out[i] = numba_math.fast_exp(x[i])

    run(x, out)
    assert np.max(np.abs(out / np.exp(x.astype(np.float64)) - 1)) < 3e-7   # ~2.5 ulp


@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (3, 4, 130)])
def test_softmax(rng, shape):
    x = (rng.standard_normal(shape) * 5).astype(np.float32)
    x.reshape(-1)[::3] = -np.inf                      # masked entries must give exactly 0
    x.reshape(-1, shape[-1])[:, 0] = 1.0              # ...but leave every row one finite value
    got = nb.softmax(x)
    assert rel_err(got, ref.softmax(x)) < FLOAT_TOL
    assert np.all(got[np.isneginf(x)] == 0)


@pytest.mark.parametrize("T,n_heads,head_dim,rot", [(1, 4, 16, 16), (5, 3, 16, 8), (2, 2, 10, 4)])
def test_rope_full_and_partial(rng, T, n_heads, head_dim, rot):
    x = rng.standard_normal((T, n_heads * head_dim)).astype(np.float32)
    inv_freq = (1.0 / 10000 ** (np.arange(0, rot, 2) / rot)).astype(np.float32)
    positions = np.arange(1000, 1000 + T)              # large positions: angle precision matters
    got = nb.rope(x, positions, inv_freq, n_heads)
    assert rel_err(got, ref.rope(x, positions, inv_freq, n_heads)) < FLOAT_TOL
    assert np.array_equal(got.reshape(T, n_heads, -1)[..., rot:], x.reshape(T, n_heads, -1)[..., rot:])


# -- attention ------------------------------------------------------------------------------

ATTN_CASES = [  # n_heads, n_kv, head_dim, n_ctx, [(T, start_pos), ...] written in order
    (4, 4, 16, 12, [(5, 0), (1, 5), (6, 6)]),          # MHA
    (4, 2, 16, 9, [(1, 0), (1, 1), (7, 2)]),           # GQA from an empty cache, one token at a time
    (6, 1, 8, 20, [(3, 0), (17, 3)]),                  # MQA, a long prefill after a short one
    # the register tiles (head dims a multiple of 8): scores 2 heads x 4 keys or 1 x 8, values
    # 4 heads x 16 dims, 2 x 32 or 1 x 64, over runs of VALUE_RUN keys and a partial one
    (8, 2, 64, 300, [(7, 0), (1, 7), (292, 8)]),       # GQA group 4: value tiles of 4 heads
    (4, 4, 64, 270, [(1, 0), (268, 1), (1, 269)]),     # MHA: 1 x 8 score tiles, 1 x 64 value tiles
    (4, 2, 32, 13, [(6, 0), (7, 6)]),                  # group 2: 2 x 32 value tiles
    (6, 2, 64, 11, [(11, 0)]),                         # group 3: 1 x 8 score tiles, 1 x 64 value tiles
    (8, 2, 16, 9, [(2, 0), (7, 2)]),                   # group 4, head_dim 16: one value tile per head row
]


@pytest.mark.parametrize("n_heads,n_kv,hd,n_ctx,steps", ATTN_CASES)
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("cache_type", ["f32", "f16"])
def test_kv_write_and_attention(rng, n_heads, n_kv, hd, n_ctx, steps, alibi, cache_type):
    cache_ref = ref.new_kv_cache(1, n_kv, n_ctx, hd, cache_type)[0]
    cache_nb = nb.new_kv_cache(1, n_kv, n_ctx, hd, cache_type)[0]
    slopes = rng.uniform(0.05, 1.0, n_heads).astype(np.float32) if alibi else None
    for T, start in steps:
        k, v = (rng.standard_normal((T, n_kv * hd)).astype(np.float32) for _ in range(2))
        q = rng.standard_normal((T, n_heads * hd)).astype(np.float32) * 2
        ref.kv_write(cache_ref, k, v, start)
        nb.kv_write(cache_nb, k, v, start)
        want = ref.attention(q, cache_ref, start, n_heads, hd ** -0.5, slopes)
        assert rel_err(nb.attention(q, cache_nb, start, n_heads, hd ** -0.5, slopes), want) < REDUCTION_TOL
        stored = [a.view(np.uint16) if a.dtype == np.float16 else a for a in cache_nb]  # as numba_cpu passes them
        for parallel in (False, True):  # both, whatever the work-size threshold picks
            got = numba_ops.attention(q, *stored, start, n_heads, np.float32(hd ** -0.5), slopes, parallel)
            assert rel_err(got, want) < REDUCTION_TOL
    assert start + T == n_ctx  # every case ends with a query at the context's last position


def test_f16_cache_rounds_keys_and_values_only(rng):
    """An f16 cache holds exactly the float16 roundings of what was written; attention over
    it equals float32 attention over those rounded keys and values."""
    n_heads, n_kv, hd, n_ctx = 4, 2, 16, 8
    half = nb.new_kv_cache(1, n_kv, n_ctx, hd, "f16")[0]
    full = nb.new_kv_cache(1, n_kv, n_ctx, hd, "f32")[0]
    assert half[0].dtype == np.float16 and half[0].nbytes * 2 == full[0].nbytes
    k, v = (rng.standard_normal((n_ctx, n_kv * hd)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((n_ctx, n_heads * hd)).astype(np.float32)
    nb.kv_write(half, k, v, 0)
    nb.kv_write(full, k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32), 0)
    assert np.array_equal(half[0].astype(np.float32), full[0]) and np.array_equal(half[1].astype(np.float32), full[1])
    got, want = (nb.attention(q, c, 0, n_heads, hd ** -0.5) for c in (half, full))
    assert rel_err(got, want) < REDUCTION_TOL


def test_unknown_cache_type_is_refused():
    for backend in (ref, nb):
        with pytest.raises(TinyLLMError, match="unknown KV cache type 'q8_0'"):
            backend.new_kv_cache(1, 1, 4, 8, "q8_0")


# -- quantized products --------------------------------------------------------------------

# the kernels' exact arithmetic, from the reference backend
emulate_int8_matmul = ref.matmul_int8_activations


MATMUL_SHAPES = [  # (T, N, K): one row, rows not a multiple of the threads, K not a multiple of 32,
    (1, 1, 32),    # K spanning a full 64-block SIMD chunk plus a tail, T past the prefill tile
    (1, 7, 100),
    (3, 33, 200),
    (5, 16, 64 * 32 + 17 * 32 + 5),
    (17, 5, 96),
    (1, 9, 256),           # q4_k rows of whole super-blocks: scales decoded in the chunk kernel,
    (1, 6, 80 * 32),       # a full chunk and a masked tail of 2 super-blocks
    (5, 6, 80 * 32),
    (4, 12, 5632),         # rows of 5.5 AVX2 chunks (TinyLlama's ffn_down): the tail chunk loads plainly
]                          # in every row but the last few, where it checks each load (numba_simd.EDGE)


@pytest.fixture(params=PATHS, ids=lambda p: (f"simd{p[0]}" + ("-vnni" if p[1] else "")) if p[0] else "portable")
def path(request):
    """A Numba backend object with one SIMD width (0: the portable loops), with or without VNNI."""
    width, vnni = request.param
    return nb.NumbaBackend(simd_width=width, vnni=vnni)


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q4_k"])
@pytest.mark.parametrize("T,N,K", MATMUL_SHAPES)
def test_q4_matmul_exact_and_close(rng, path, fmt, T, N, K):
    w = quant.quantize(rng.standard_normal((N, K)).astype(np.float32) + 0.3, fmt)
    x = rng.standard_normal((T, K)).astype(np.float32)
    got = path.matmul(x, nb.prepare(w))
    assert got.shape == (T, N) and got.dtype == np.float32
    if path.simd_width or T < nb.PORTABLE_BLAS_MIN_TOKENS:   # integer kernels (else: dequantize + BLAS)
        assert rel_err(got, emulate_int8_matmul(x, w)) < EXACT_TOL
    else:
        assert rel_err(got, ref.matmul(x, w)) < EXACT_TOL
    assert rel_err(got, ref.matmul(x, w)) < QUANT_TOL


@pytest.mark.parametrize("fmt", ["q6_k", "q8_0"])
@pytest.mark.parametrize("T,N,K", MATMUL_SHAPES)
def test_q6_k_and_q8_0_matmul(rng, path, fmt, T, N, K):
    w = quant.quantize(rng.standard_normal((N, K)).astype(np.float32), fmt)
    x = rng.standard_normal((T, K)).astype(np.float32)
    got = path.matmul(x, nb.prepare(w))
    integer = (path.simd_width and fmt in nb.SIMD_FORMATS) or T < nb.PORTABLE_BLAS_MIN_TOKENS
    want = emulate_int8_matmul(x, w) if integer else ref.matmul(x, w)
    assert rel_err(got, want) < EXACT_TOL
    assert rel_err(got, ref.matmul(x, w)) < QUANT_TOL


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q4_k"])
@pytest.mark.parametrize("T", [1, 3, 9])
def test_matmuls_share_one_call_and_equal_matmul(rng, path, fmt, T):
    """q, k, v (and GPT-J's fc_in) in one q4 kernel call: every output bit-equal to its own
    matmul, row counts that are not multiples of the kernel's row block included."""
    K = 512
    ws = [nb.prepare(quant.quantize(rng.standard_normal((n, K)).astype(np.float32), fmt)) for n in (48, 16, 23, 40)]
    x = rng.standard_normal((T, K)).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)
    for n in (2, 3, 4):
        biases = [None] * (n - 1) + [bias[:ws[n - 1].shape[0]]]
        got = path.matmuls(x, ws[:n], biases)
        for y, w, b in zip(got, ws[:n], biases):
            assert y.shape == (T, w.shape[0]) and y.flags.c_contiguous
            np.testing.assert_array_equal(y, path.matmul(x, w, b))


def test_matmuls_of_mixed_weights_fall_back_to_one_call_each(rng, monkeypatch):
    K = 256
    ws = [nb.prepare(quant.quantize(rng.standard_normal((n, K)).astype(np.float32), fmt))
          for n, fmt in ((32, "q4_k"), (16, "q6_k"), (16, "q4_0"), (8, "q4_k"), (8, "q4_k"))]
    x = rng.standard_normal((2, K)).astype(np.float32)
    fused = []
    real = numba_quant.q4_matmuls_simd
    monkeypatch.setattr(numba_quant, "q4_matmuls_simd", lambda x, weights, *a: fused.append(len(weights)) or
                        real(x, weights, *a))
    for y, w in zip(nb.matmuls(x, ws), ws):   # mixed formats, and five: more than one call takes
        np.testing.assert_array_equal(y, nb.matmul(x, w))
    if numba_simd.native_width():
        assert fused == [1] * 8                 # 3 q4 weights above, and again for the comparison
        fused.clear()
        nb.matmuls(x, ws[3:])
        assert fused == [2]
    assert nb.matmuls(x, []) == []
    with pytest.raises(TinyLLMError, match="2 biases for 3 weights"):
        nb.matmuls(x, ws[:3], [None, None])
    with pytest.raises(TinyLLMError, match="does not match"):
        nb.matmuls(rng.standard_normal((1, 100)).astype(np.float32), ws[3:])


@pytest.mark.parametrize("fmt", ["f16", "f32"])
@pytest.mark.parametrize("T", [1, 17])
def test_float_matmul_with_bias(rng, fmt, T):
    w = quant.quantize(rng.standard_normal((13, 70)).astype(np.float32), fmt)
    x = rng.standard_normal((T, 70)).astype(np.float32)
    bias = rng.standard_normal(13).astype(np.float32)
    assert rel_err(nb.matmul(x, nb.prepare(w), bias), ref.matmul(x, w, bias)) < FLOAT_TOL


def test_quantized_matmul_bias_and_unprepared_weight(rng):
    w = quant.quantize(rng.standard_normal((8, 64)).astype(np.float32), "q4_0")
    x = rng.standard_normal((2, 64)).astype(np.float32)
    bias = np.arange(8, dtype=np.float32)
    assert rel_err(nb.matmul(x, w, bias) - bias, emulate_int8_matmul(x, w)) < EXACT_TOL


def test_blas_tile_path_matches_reference(rng, monkeypatch):
    monkeypatch.setattr(nb, "BLAS_TILE_ROWS", 4)      # several tiles and a ragged last one
    for fmt in ("q4_0", "q4_1", "q4_k", "q6_k", "q8_0", "f16"):
        w = nb.prepare(quant.quantize(rng.standard_normal((10, 50)).astype(np.float32), fmt))
        x = rng.standard_normal((3, 50)).astype(np.float32)
        assert rel_err(nb._matmul_blas_tiles(x, w), ref.matmul(x, w)) < FLOAT_TOL


def test_zero_activation_blocks(rng, path):
    """An all-zero activation block has scale 0: it must contribute exactly 0, not NaN."""
    w = quant.quantize(rng.standard_normal((4, 96)).astype(np.float32), "q4_0")
    x = rng.standard_normal((1, 96)).astype(np.float32)
    x[:, 32:64] = 0
    got = path.matmul(x, w)
    assert np.all(np.isfinite(got)) and rel_err(got, emulate_int8_matmul(x, w)) < EXACT_TOL


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_embedding_is_exact(rng, fmt):
    t = quant.quantize(rng.standard_normal((37, 100)).astype(np.float32), fmt)
    tokens = np.array([0, 36, 5, 5])
    assert np.array_equal(nb.embedding(nb.prepare(t), tokens), ref.embedding(t, tokens))


def test_prepare_keeps_memory_mapped_weights_mapped(tmp_path, rng):
    t = quant.quantize(rng.standard_normal((8, 64)).astype(np.float32), "q4_0")
    parts = {}
    for k, v in t.parts.items():
        path = tmp_path / k
        v.tofile(path)
        parts[k] = np.memmap(path, dtype=v.dtype, mode="r", shape=v.shape)
    p = nb.prepare(quant.QTensor("q4_0", t.shape, parts))
    for k, v in p.views.items():
        assert np.shares_memory(v, parts[k]) and not v.flags.writeable
    x = rng.standard_normal((1, 64)).astype(np.float32)
    assert rel_err(nb.matmul(x, p), emulate_int8_matmul(x, t)) < EXACT_TOL
    assert nb.prepare(p) is p
    norm = nb.prepare(np.ones(4, np.float64))
    assert norm.dtype == np.float32 and norm.flags.c_contiguous


def test_matmul_shape_mismatch_is_refused(rng):
    w = quant.quantize(rng.standard_normal((4, 64)).astype(np.float32), "q4_0")
    with pytest.raises(ValueError, match="does not match"):
        nb.matmul(np.zeros((1, 65), np.float32), w)


# -- threads ----------------------------------------------------------------------------------

def test_threads_default_to_all_cores_and_results_do_not_depend_on_them(rng):
    # A fresh process: importing the backend sets no threads; a backend object's default is every core.
    code = ("import numba, tinyllm.kernels.numba_cpu as nb; before = numba.get_num_threads(); "
            "b = nb.NumbaBackend(); b.begin(); "
            "print(b.threads == numba.get_num_threads() == min(nb.available_cores(), numba.config.NUMBA_NUM_THREADS))")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == "True"
    w = quant.quantize(rng.standard_normal((33, 200)).astype(np.float32), "q4_0")
    x = rng.standard_normal((2, 200)).astype(np.float32)
    before = nb.matmul(x, w)
    try:
        assert nb.set_threads(1) == 1
        assert np.array_equal(nb.matmul(x, w), before)
    finally:
        nb.set_threads()
    with pytest.raises(TinyLLMError, match="at least 1"):
        nb.set_threads(0)
    with pytest.raises(TinyLLMError, match="at least 1"):
        nb.NumbaBackend(threads=0)


def test_simd_override_is_checked():
    code = "import tinyllm.kernels.numba_cpu as nb; print(nb.NumbaBackend().simd_width)"
    run = [sys.executable, "-c", code]
    ok = subprocess.run(run, env={**os.environ, "TINYLLM_SIMD": "0"}, capture_output=True, text=True, check=True)
    assert ok.stdout.strip() == "0"
    bad = subprocess.run(run, env={**os.environ, "TINYLLM_SIMD": "48"}, capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "TINYLLM_SIMD='48'" in bad.stderr
    with pytest.raises(TinyLLMError, match="SIMD width 48"):
        nb.NumbaBackend(simd_width=48)


def test_vnni_override_is_checked():
    code = "import tinyllm.kernels.numba_cpu as nb; print(nb.NumbaBackend().vnni)"
    run = [sys.executable, "-c", code]
    for value, want in ((None, "False"), ("1", "True"), ("0", "False")):
        env = {k: v for k, v in os.environ.items() if k != "TINYLLM_VNNI"} | ({"TINYLLM_VNNI": value} if value else {})
        assert subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout.strip() == want
    bad = subprocess.run(run, env={**os.environ, "TINYLLM_VNNI": "yes"}, capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "TINYLLM_VNNI='yes'" in bad.stderr


def test_vnni_layout_places_every_activation_byte_once():
    # Where the q4 kernels read (x[p], x[p+16]) of each block: every byte of a chunk exactly once.
    for width in (32, 64):
        for vnni in (False, True):
            base, slot = numba_simd.q4_activation_layout(width, vnni)
            places = sorted(b + s + h for b in base for s in slot for h in (0, 1))
            assert places == list(range(32 * width)), (width, vnni)
    blocks = numba_simd.vnni_blocks(64)
    assert sorted(b for reg in blocks for b in reg) == list(range(64))


@pytest.mark.skipif(not numba_simd.has_vnni(64), reason="no AVX-512 VNNI on this CPU")
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q4_k", "q6_k", "q8_0"])
@pytest.mark.parametrize("T", [1, 4, 9])
def test_vnni_kernels_equal_the_pmaddubsw_ones(rng, fmt, T):
    # Integer sums are exact either way and the float epilogue adds in the same order: bit-equal.
    w = nb.prepare(quant.quantize(rng.standard_normal((40, 5632)).astype(np.float32), fmt))
    x = rng.standard_normal((T, 5632)).astype(np.float32)
    for width in (64, 32):
        assert np.array_equal(nb.matmul(x, w, None, width, True), nb.matmul(x, w, None, width, False))


def test_interface_matches_reference():
    for fn in ("prepare", "to_numpy", "from_numpy", "new_kv_cache", "embedding", "matmul", "add", "rmsnorm",
               "layernorm", "silu", "swiglu", "gelu", "clip", "softmax", "rope", "kv_write", "attention"):
        assert callable(getattr(nb, fn)), fn
    assert nb.name == "numba"


def test_kernel_cache_is_stamped_with_every_kernel_source():
    """A cached kernel must not outlive an edit of a helper module it inlines (numba_cache.py)."""
    from tinyllm.kernels import numba_cache

    for fn in (numba_ops.rmsnorm, numba_quant.q4_simd64, numba_quant.q8_rows_portable):
        locator = fn._cache._impl._locator
        assert type(locator).__name__.startswith("Kernels")
        assert locator.get_source_stamp() == numba_cache.kernels_stamp()


def test_simd_operands_start_on_64_byte_addresses(rng):
    # Unaligned AVX-512 loads straddle cache lines (BENCHMARKS.md: ~30 % of a prefill matmul).
    for T, K in ((1, 100), (5, 2048), (9, 5632)):
        x = rng.standard_normal((T, K)).astype(np.float32)
        for width in (32, 64):
            q4 = numba_quant.quantize_for_simd(x, width, 4, *numba_quant._q4_layout(width, False))[0]
            q8 = numba_quant.quantize_for_simd_q8(x, width, 4, *numba_quant._q8_layout(width), *numba_quant.Q8_PAIRS)[0]
            assert q4.ctypes.data % 64 == 0 and q8.ctypes.data % 64 == 0
    for fmt in ("q4_0", "q4_1", "q4_k", "q6_k", "q8_0"):  # planes made in memory (quantizing, GGUF loads)
        w = quant.quantize(rng.standard_normal((24, 512)).astype(np.float32), fmt)
        assert w.parts["qs"].ctypes.data % 64 == 0 and w.parts["qs"].flags.c_contiguous, fmt
