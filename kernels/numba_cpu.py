"""The Numba CPU backend: reference.py's ops, compiled, threaded and SIMD where it pays.

Same functions and signatures as kernels/reference.py (read that first for the meaning of
each op); tests/test_kernels_numba.py holds every function here to its reference twin.
Where the NumPy version is already as fast as a kernel could be (an add, a cache write,
a clip) the reference function is used as is.

Quantized matmuls quantize the activation to int8 blocks and run integer block dot
products (numba_quant.py); on x86 with AVX2/AVX-512BW they go through hand-placed
pmaddubsw (q4_0, q4_1, q4_k) and pmaddwd (q8_0, q6_k) kernels (numba_simd.py), or with
AVX-512 VNNI their vpdpbusd / vpdpwssd forms. Set TINYLLM_SIMD=0 to force the portable
loops (or =32 to use the AVX2 width on an AVX-512 machine), TINYLLM_VNNI=1 for the VNNI
forms (not the default: slower where measured, see default_vnni).

The module's functions are the ops, with the SIMD width an argument; ``NumbaBackend`` is the
Backend object a model holds: its thread count and SIMD width are its own, set when it is
made, and applied (``begin``) in whichever thread runs a forward pass. Importing the module
changes no process state.
"""
from __future__ import annotations

import functools
import os
import threading
import warnings

import numba
import numpy as np
from numba import njit, prange

from tinyllm.errors import ShapeError, TinyLLMError
from tinyllm.kernels import numba_ops, numba_quant, numba_simd
from tinyllm.kernels.backend import CACHE_TYPES, checked_biases, module_ops
from tinyllm.kernels.cores import available_cores, cpu_quota  # noqa: F401  (this backend's core count)
from tinyllm.kernels.quant import QTensor
from tinyllm.kernels.reference import add, clip, concat_rows, from_numpy, kv_write, new_kv_cache, to_numpy  # noqa: F401
from tinyllm.kernels.threads import ThreadGovernor

name = "numba"

# Prefill (T > 1) on quantized weights: the SIMD integer kernels beat dequantize-a-tile-
# then-BLAS at every measured shape (BENCHMARKS.md). The portable integer loops (no SIMD) and
# the float-weight loops re-read the weights per token: BLAS wins from about this many on.
PORTABLE_BLAS_MIN_TOKENS = 16
BLAS_TILE_ROWS = 512          # rows dequantized per BLAS call (512 x 11008 floats = 23 MB)
# Attention spreads over the threads from this many multiply-adds in q.K (waking the pool
# costs microseconds on an idle machine, up to a scheduler tick on a busy one).
ATTENTION_PARALLEL_MIN_MACS = 1 << 13


@functools.lru_cache(maxsize=None)
def default_simd_width() -> int:
    """The widest pmaddubsw this CPU has (64: AVX-512BW, 32: AVX2, 0: none), or TINYLLM_SIMD's cap."""
    forced = os.environ.get("TINYLLM_SIMD")
    native = numba_simd.native_width()
    if forced is None:
        return native
    if forced not in ("0", "32", "64"):
        raise TinyLLMError(f"TINYLLM_SIMD={forced!r}: expected 0 (portable loops), 32 (AVX2 width) or 64 (AVX-512)")
    return min(int(forced), native) if int(forced) else 0


@functools.lru_cache(maxsize=None)
def default_vnni() -> bool:
    """Whether the SIMD kernels use AVX-512 VNNI where this CPU has it: only with TINYLLM_VNNI=1.
    On the one VNNI CPU measured (AMD Zen 5) the vpdpbusd kernel is 6 % slower end to end in
    prefill than pmaddubsw + paddw, decode equal (BENCHMARKS.md), so it is not the default."""
    forced = os.environ.get("TINYLLM_VNNI")
    if forced not in (None, "0", "1"):
        raise TinyLLMError(f"TINYLLM_VNNI={forced!r}: expected 0 (pmaddubsw/pmaddwd) or 1 (VNNI where the CPU has it)")
    return forced == "1"


def check_simd_width(width: int) -> int:
    if width not in (0, 32, 64):
        raise TinyLLMError(f"SIMD width {width!r}: expected 0 (portable loops), 32 (AVX2) or 64 (AVX-512)")
    if width > numba_simd.native_width():
        raise TinyLLMError(f"SIMD width {width} needs instructions this CPU lacks "
                           f"(widest: {numba_simd.native_width()})")
    return width


# -- threads -------------------------------------------------------------------------------

def thread_count(n: int | None = None) -> int:
    """A checked thread count for the parallel kernels (default: every core this process may
    use, its cgroup's CPU quota included: kernels/cores.py)."""
    n = available_cores() if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise TinyLLMError(f"threads must be an integer of at least 1, got {n!r}")
    return min(n, numba.config.NUMBA_NUM_THREADS)


# Numba picks one threading layer per process at its first parallel launch: TBB, else OpenMP,
# else its own workqueue. The workqueue is the fallback where neither runtime is installed (a
# slim container without libgomp): each parallel region costs ~70 us instead of ~1.5 (measured:
# 2-core Zen 4, an empty 2-item prange; a 1.1B decode step launches ~200), and launching
# from two threads at once aborts the process. With it, forwards run one at a time (begin/end).
THREADSAFE_LAYERS = ("tbb", "omp")
_one_forward_at_a_time = threading.Lock()


class ThreadingLayerWarning(UserWarning):
    """Numba runs on its slow, single-caller workqueue threading layer."""


@njit(parallel=True, cache=True)
def _launch(a):
    for i in prange(a.shape[0]):
        a[i] = i


@functools.lru_cache(maxsize=None)
def threading_layer() -> str:
    """The threading layer Numba uses in this process ("tbb", "omp" or "workqueue"), chosen
    now by one tiny parallel launch if no kernel has run yet."""
    _launch(np.zeros(2))
    return numba.threading_layer()


def _warn_serial(layer: str) -> None:
    warnings.warn(f"Numba found no OpenMP or TBB runtime and runs on its {layer} threading layer: every parallel "
                  "kernel costs ~70 us more (a 1.1B model decoded at half its speed) and kernels cannot run from "
                  "two threads at once, so tinyllm runs one forward pass at a time. Install the OpenMP "
                  "runtime (Debian/Ubuntu: apt install libgomp1; Fedora: dnf install libgomp; macOS: brew install "
                  "libomp).", ThreadingLayerWarning, stacklevel=3)


def set_threads(n: int | None = None) -> int:
    """Use ``n`` threads (default: every core) for parallel kernels called from this thread."""
    n = thread_count(n)
    numba.set_num_threads(n)  # Numba's count is per calling thread
    return n


def get_threads() -> int:
    return numba.get_num_threads()


# -- weights -------------------------------------------------------------------------------

class NumbaTensor(QTensor):
    """A QTensor plus read-only views its kernels take: float16 parts as uint16 bits
    (Numba's CPU target has no float16 arrays). Views only: a memory-mapped file stays
    mapped, nothing is copied."""

    def __init__(self, t: QTensor):
        super().__init__(t.format, tuple(t.shape), t.parts)
        self.views = {k: _readonly(v.view(np.uint16) if v.dtype == np.float16 else v)
                      for k, v in t.parts.items()}
        # what the compiled kernels see, one shared object per kind (compared with `is`, cheap
        # per call; a race can only make two objects of one kind, which then do not fuse)
        kind = (self.format, self.shape[1], tuple((k, numba.typeof(v)) for k, v in sorted(self.views.items())))
        self.kernel_kind = _KERNEL_KINDS.setdefault(kind, kind)


_KERNEL_KINDS: dict = {}   # (format, K, the views' Numba types), each its own canonical object


def _readonly(a):
    a = np.asarray(a).view()  # a plain ndarray view (np.memmap subclasses would retype)
    a.flags.writeable = False  # one compiled signature whether or not the file is mapped
    return a


def prepare(w):
    """QTensor -> NumbaTensor; 1-D float arrays -> contiguous float32."""
    if isinstance(w, NumbaTensor):
        return w
    if isinstance(w, QTensor):
        return NumbaTensor(w)
    return np.ascontiguousarray(w, dtype=np.float32)


def _rows_f32(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


# -- matrix products -----------------------------------------------------------------------

def embedding(table, tokens) -> np.ndarray:
    """(T,) token ids -> (T, D) rows of the embedding table."""
    t = prepare(table)
    ids = np.ascontiguousarray(tokens, dtype=np.int64)
    rows, cols = t.shape
    if ids.size and (ids.min() < 0 or ids.max() >= rows):
        raise ShapeError(f"token id out of range 0..{rows - 1}")
    out = np.empty((ids.shape[0], cols), np.float32)
    dequantize_rows_into(t, ids, out)
    return out


def matmul(x: np.ndarray, w, bias: np.ndarray | None = None, simd_width: int | None = None,
           vnni: bool | None = None) -> np.ndarray:
    """(T, K) @ W(N, K)^T (+ bias) -> (T, N); simd_width None: this CPU's default_simd_width();
    vnni None: default_vnni() (either way only where the CPU has VNNI at the chunk's width)."""
    w = prepare(w)
    x = _rows_f32(x)
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ShapeError(f"matmul: activation {x.shape} does not match weight {w.shape}")
    y = _matmul_nobias(x, w, default_simd_width() if simd_width is None else simd_width,
                       default_vnni() if vnni is None else vnni)
    if bias is not None:
        y += bias
    return y


def matmuls(x: np.ndarray, ws: list, biases=None, simd_width: int | None = None,
            vnni: bool | None = None) -> list:
    """[(T, K) @ W_i(N_i, K)^T (+ bias_i) -> (T, N_i)]: several weights on one input, each
    output bit-equal to matmul's. q4 weights of one format and K (a layer's q, k and v; gate
    and up) go through one kernel call: one activation quantization and one parallel region,
    so the small k/v projections no longer pay a call's fixed cost each (BENCHMARKS.md)."""
    biases = checked_biases(ws, biases)
    ws = [prepare(w) for w in ws]
    simd = default_simd_width() if simd_width is None else simd_width
    first = ws[0] if ws else None
    if not (simd and 1 < len(ws) <= numba_quant.MAX_FUSED and first.format in Q4_FORMATS
            and all(w.kernel_kind is first.kernel_kind for w in ws)):
        return [matmul(x, w, b, simd_width, vnni) for w, b in zip(ws, biases)]
    x = _rows_f32(x)
    if x.ndim != 2 or x.shape[1] != first.shape[1]:
        raise ShapeError(f"matmul: activation {x.shape} does not match weight {first.shape}")
    y = numba_quant.q4_matmuls_simd(x, [_q4_parts(w) for w in ws], _chunk_width(first, simd),
                                    default_vnni() if vnni is None else vnni)     # (T, N_0 + N_1 + ..)
    outs, col = [], 0
    for w, b in zip(ws, biases):
        part = np.ascontiguousarray(y[:, col:col + w.shape[0]])   # a view for one token
        outs.append(part if b is None else part + b)
        col += w.shape[0]
    return outs


def _q4_parts(w):
    v = w.views
    return v["qs"], v["d"], v.get("m"), v.get("scales")


Q4_FORMATS = ("q4_0", "q4_1", "q4_k")  # one family of kernels: 4-bit planes, per-block grids
SIMD_FORMATS = Q4_FORMATS + ("q6_k", "q8_0")  # with SIMD kernels for every token count


def _chunk_width(w, simd: int) -> int:
    """SIMD chunk (blocks per vector) for a weight: rows of at most 32 blocks (K <= 1024)
    would leave most of a 64-block AVX-512 chunk empty; 32-block (AVX2-width) chunks waste less."""
    return 32 if simd == 64 and w.views["qs"].shape[2] <= 32 else simd


def _matmul_nobias(x, w, simd: int, vnni: bool):
    T = x.shape[0]
    v = w.views
    if w.format in Q4_FORMATS:  # parts: d, qs, and m (q4_1) or scales (q4_k)
        if simd:
            return numba_quant.q4_matmuls_simd(x, [_q4_parts(w)], _chunk_width(w, simd), vnni)
        if T < PORTABLE_BLAS_MIN_TOKENS:
            out = np.empty((T, w.shape[0]), np.float32)
            numba_quant.q4_rows_portable(*_q4_parts(w), *numba_quant.quantize_planes(x), out)
            return out
        return _matmul_blas_tiles(x, w)
    if w.format == "q6_k":  # the AVX2-width SIMD kernel on any x86 SIMD path; else portable, BLAS for prefill
        if simd:
            return numba_quant.q6_matmul_simd(x, v["qs"], v["d"], v["scales"], vnni=vnni)
        if T < PORTABLE_BLAS_MIN_TOKENS:
            xq, _, dx, _ = numba_quant.quantize_planes(x)
            out = np.empty((T, w.shape[0]), np.float32)
            numba_quant.q6_rows_portable(v["qs"], v["d"], v["scales"], xq, dx, out)
            return out
        return _matmul_blas_tiles(x, w)
    if w.format == "q8_0":
        if simd:
            return numba_quant.q8_matmul_simd(x, v["qs"], v["d"], _chunk_width(w, simd), vnni=vnni)
        if T < PORTABLE_BLAS_MIN_TOKENS:
            xq, _, dx, _ = numba_quant.quantize_planes(x)
            out = np.empty((T, w.shape[0]), np.float32)
            numba_quant.q8_rows_portable(v["qs"], v["d"], xq, dx, out)
            return out
        return _matmul_blas_tiles(x, w)
    if T < PORTABLE_BLAS_MIN_TOKENS:  # float weights (f16 bits or f32), few tokens
        out = np.empty((T, w.shape[0]), np.float32)
        (numba_quant.f16_matvec if w.format == "f16" else numba_quant.f32_matvec)(v["w"].reshape(w.shape), x, out)
        return out
    if w.format == "f16":
        return _matmul_blas_tiles(x, w)
    return x @ v["w"].reshape(w.shape).T


def dequantize_rows_into(w: NumbaTensor, rows: np.ndarray, out: np.ndarray) -> None:
    """out (len(rows), K) float32 = the decoded rows of w."""
    v = w.views
    if w.format in Q4_FORMATS:
        numba_quant.dequantize_q4_rows(v["qs"], v["d"], v.get("m"), v.get("scales"), rows, out)
    elif w.format == "q6_k":
        numba_quant.dequantize_q6_rows(v["qs"], v["d"], v["scales"], rows, out)
    elif w.format == "q8_0":
        numba_quant.dequantize_q8_rows(v["qs"], v["d"], rows, out)
    elif w.format == "f16":
        numba_quant.f16_rows(v["w"], rows, out)
    else:
        out[:] = v["w"][rows]


def _matmul_blas_tiles(x, w):
    """Dequantize BLAS_TILE_ROWS weight rows at a time and multiply with BLAS."""
    N, K = w.shape
    out = np.empty((x.shape[0], N), np.float32)
    tile = np.empty((min(BLAS_TILE_ROWS, N), K), np.float32)
    for r0 in range(0, N, BLAS_TILE_ROWS):
        r1 = min(N, r0 + BLAS_TILE_ROWS)
        dequantize_rows_into(w, np.arange(r0, r1, dtype=np.int64), tile[:r1 - r0])
        np.matmul(x, tile[:r1 - r0].T, out=out[:, r0:r1])
    return out


# -- elementwise and normalization ---------------------------------------------------------

def rmsnorm(x, weight, eps: float):
    return numba_ops.rmsnorm(_rows_f32(np.atleast_2d(x)), _rows_f32(weight), float(eps)).reshape(np.shape(x))


def layernorm(x, weight, bias, eps: float):
    b = None if bias is None else _rows_f32(bias)
    return numba_ops.layernorm(_rows_f32(np.atleast_2d(x)), _rows_f32(weight), b, float(eps)).reshape(np.shape(x))


def _elementwise(kernel, *arrays, **extra):
    flat = [_rows_f32(a).reshape(-1) for a in arrays]
    out = np.empty_like(flat[0])
    kernel(*flat, out, *extra.values())
    return out.reshape(np.shape(arrays[0]))


def silu(x):
    return _elementwise(numba_ops.silu_flat, x)


def swiglu(gate, up):
    """SiLU(gate) * up in one pass."""
    return _elementwise(numba_ops.swiglu_flat, gate, up)


def gelu(x, approximate: bool = False):
    return _elementwise(numba_ops.gelu_flat, x, approximate=bool(approximate))


def softmax(x):
    x = _rows_f32(x)
    rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    out = np.empty_like(rows)
    numba_ops.softmax_rows(rows, out)
    return out.reshape(x.shape)


# -- position ------------------------------------------------------------------------------

def rope(x, positions, inv_freq, n_heads: int):
    return numba_ops.rope(_rows_f32(x), np.ascontiguousarray(positions, dtype=np.int64),
                          _rows_f32(inv_freq), int(n_heads))


# -- attention -----------------------------------------------------------------------------

def attention(q, cache, start_pos: int, n_heads: int, scale: float, alibi_slopes=None):
    """Causal attention of T new queries over the cache (see reference.attention)."""
    k_cache, v_cache = (a.view(np.uint16) if a.dtype == np.float16 else a for a in cache)  # see numba_ops
    q = _rows_f32(q)
    slopes = None if alibi_slopes is None else _rows_f32(alibi_slopes)
    T, n_kv, start_pos = q.shape[0], k_cache.shape[0], int(start_pos)
    parallel = q.shape[1] * T * (start_pos + T) >= ATTENTION_PARALLEL_MIN_MACS and n_kv * T > 1
    return numba_ops.attention(q, k_cache, v_cache, start_pos, int(n_heads), np.float32(scale), slopes, parallel)


# -- the backend object ----------------------------------------------------------------------

@module_ops
class NumbaBackend:
    """The Numba CPU ops with their settings: ``threads`` (default: adaptive, up to every core
    this process may use: kernels/threads.py; a number fixes it), ``simd_width`` (default:
    ``default_simd_width()``; 0 forces the portable loops) and ``vnni`` (default: default_vnni();
    True uses vpdpbusd/vpdpwssd where the CPU has AVX-512 VNNI)."""

    name = "numba"
    compiles = True  # kernels compile (or load from the on-disk cache) on first use
    cache_types = tuple(CACHE_TYPES)

    def __init__(self, threads: int | None = None, simd_width: int | None = None, vnni: bool | None = None):
        self.threads = thread_count(threads)    # the most a forward uses
        self.cpu_quota = cpu_quota()            # CPUs' worth the cgroup allows (None: no quota)
        self.governor = ThreadGovernor(self.threads) if threads is None else None
        self.simd_width = default_simd_width() if simd_width is None else check_simd_width(simd_width)
        self.vnni = default_vnni() if vnni is None else bool(vnni)
        self.threading_layer = threading_layer()
        self.serial = self.threading_layer not in THREADSAFE_LAYERS   # forwards hold _one_forward_at_a_time
        if self.serial:
            _warn_serial(self.threading_layer)

    @property
    def threads_now(self) -> int:
        """The count decode runs with now (the governor's choice, or the fixed count)."""
        return self.governor.current if self.governor else self.threads

    def begin(self, rows: int = 1) -> None:
        """Before a forward pass of ``rows`` rows, in the thread that runs it (Numba counts
        threads per calling thread): the governor's count, or the fixed one. Every begin is
        followed by an end, also when the forward fails."""
        if self.serial:
            _one_forward_at_a_time.acquire()
        n = self.governor.start(rows) if self.governor else self.threads
        if numba.get_num_threads() != n:
            numba.set_num_threads(n)

    def end(self) -> None:
        if self.governor:
            self.governor.finish()
        if self.serial:
            _one_forward_at_a_time.release()

    def matmul(self, x, w, bias=None):
        return matmul(x, w, bias, self.simd_width, self.vnni)

    def matmuls(self, x, ws, biases=None):
        return matmuls(x, ws, biases, self.simd_width, self.vnni)



__all__ = ["name", "prepare", "to_numpy", "from_numpy", "new_kv_cache", "embedding", "matmul", "matmuls", "add",
           "rmsnorm", "layernorm", "silu", "swiglu", "gelu", "clip", "softmax", "rope", "kv_write",
           "attention", "set_threads", "get_threads", "threading_layer", "default_simd_width", "default_vnni",
           "NumbaBackend"]
