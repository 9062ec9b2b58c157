"""The numba.cuda backend: the ops of ``kernels/reference.py`` on an NVIDIA GPU.

Weights are copied to the device once by ``prepare``; activations and the KV cache stay
there. ``from_numpy``/``to_numpy`` are the only bulk transfers: per token the token ids go in
(``embedding``) and the logits come out (``to_numpy``). Small constants the runtime passes as
NumPy arrays (RoPE frequencies, ALiBi slopes) are uploaded once and cached.

Importing this module imports ``numba.cuda``; ``tinyllm.kernels.get_backend("cuda")`` runs
``tinyllm.device.check_cuda`` before it, so a missing extra or GPU is a clear
``TinyLLMError``. Under ``NUMBA_ENABLE_CUDASIM=1`` Numba's
CUDA simulator stands in for the GPU (that is how CI tests these kernels).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np
from numba import cuda

from tinyllm.errors import ShapeError, TinyLLMError, UnsupportedError
from tinyllm.kernels import cuda_kernels as K
from tinyllm.kernels.backend import cache_dtype, module_ops, separate_matmuls
from tinyllm.kernels.quant import QTensor, n_blocks

name = "cuda"


def _quiet_small_grid_warnings() -> None:
    """Decoding one token launches small grids by design (a norm of one row is one block);
    Numba would print an under-utilization warning for each new grid size mid-chat."""
    for config in ("numba.cuda.core.config", "numba.core.config"):  # numba-cuda, built-in
        try:
            importlib.import_module(config).CUDA_LOW_OCCUPANCY_WARNINGS = 0
        except ImportError:
            pass


_quiet_small_grid_warnings()

MATVEC_MAX_T = 4   # up to this many tokens a matmul streams W once per token (decode); beyond, tiled
_FMT = {"q4_0": K.FMT_Q4_0, "q4_1": K.FMT_Q4_1, "q4_k": K.FMT_Q4_K, "q6_k": K.FMT_Q6_K, "q8_0": K.FMT_Q8_0,
        "f16": K.FMT_DENSE, "f32": K.FMT_DENSE}


@dataclass
class DeviceWeight:
    """A (rows, cols) weight on the device, in the kernels' argument order ``fmt, d, m, qs, wd``.

    d, m: (rows, nb) float16 scales/minimums (q4_k: d (nsb, 2) float16, m its (nsb, 12) uint8
    6-bit block scales; q6_k: d (nsb, 1) float16, m its (nsb, 16) int8 half-block scales);
    qs: (rows, 16|24|32, nb) plane-major quants;
    wd: (rows, cols) dense f16/f32. Parts a format lacks are 1-element dummies.
    """

    format: str
    shape: tuple
    parts: dict   # the QTensor's parts, on the device
    fmt: int
    d: object
    m: object
    qs: object
    wd: object

    @property
    def args(self) -> tuple:
        return self.fmt, self.d, self.m, self.qs, self.wd

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values())


# -- small helpers -----------------------------------------------------------------------

_dummies: dict = {}
_constants: dict = {}


def _dummy(dtype, ndim: int):
    key = (np.dtype(dtype).str, ndim)
    if key not in _dummies:
        _dummies[key] = cuda.to_device(np.zeros((1,) * ndim, dtype))
    return _dummies[key]


def _no_positions():
    """An empty int64 array: tells the rope kernel positions are pos0, pos0 + 1, ..."""
    if "positions" not in _dummies:
        _dummies["positions"] = cuda.device_array(0, np.int64)
    return _dummies["positions"]


def _is_device(x) -> bool:
    return hasattr(x, "copy_to_host")  # DeviceNDArray, or the simulator's FakeCUDAArray


def _device(x, dtype=np.float32):
    """A device array as is; a host array is uploaded (activations should already be there)."""
    if _is_device(x):
        return x
    return cuda.to_device(np.ascontiguousarray(x, dtype=dtype))


def _constant(x, dtype):
    """Upload a small host array once (RoPE frequencies, ALiBi slopes), keyed by its bytes."""
    if _is_device(x):
        return x
    host = np.ascontiguousarray(x, dtype=dtype)
    key = (host.dtype.str, host.shape, host.tobytes())
    if key not in _constants:
        _constants[key] = cuda.to_device(host)
    return _constants[key]


def _empty(shape):
    return cuda.device_array(shape, np.float32)


def _grid(n: int, threads: int = K.MAX_BLOCK) -> int:
    return max(1, (n + threads - 1) // threads)


def _pow2(n: int, lo: int, hi: int) -> int:
    """Smallest power of two >= n, clamped to [lo, hi]: small rows get small blocks."""
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def _flat(x):
    return x.reshape(x.size)


# -- weights and buffers -------------------------------------------------------------------

def prepare(w):
    """Copy a loaded tensor to the device once: a QTensor matrix -> DeviceWeight,
    a 1-D tensor (norm weight, bias) -> float32 device array."""
    if isinstance(w, QTensor):
        if len(w.shape) == 1:
            return cuda.to_device(np.ascontiguousarray(w.dequantize(), np.float32))
        if w.format not in _FMT or len(w.shape) != 2:
            raise UnsupportedError(f"the cuda backend cannot run a {w.format} tensor of shape {w.shape}")
        parts = {k: cuda.to_device(np.ascontiguousarray(v)) for k, v in w.parts.items()}
        dense = w.format in ("f16", "f32")
        return DeviceWeight(
            w.format, tuple(w.shape), parts, _FMT[w.format],
            d=_dummy(np.float16, 2) if dense else parts["d"],
            m=parts.get("m", parts.get("scales", _dummy(np.float16, 2))),  # q4_k, q6_k: their scales
            qs=_dummy(np.uint8, 3) if dense else parts["qs"],
            wd=parts["w"] if dense else _dummy(np.float32, 2))
    arr = np.asarray(w)
    if arr.ndim != 1:
        raise UnsupportedError(f"prepare expects a QTensor or a 1-D array, got an array of shape {arr.shape}")
    return cuda.to_device(np.ascontiguousarray(arr, np.float32))


def to_numpy(x) -> np.ndarray:
    return x.copy_to_host() if _is_device(x) else np.asarray(x)


def from_numpy(x: np.ndarray):
    return cuda.to_device(np.ascontiguousarray(x, dtype=np.float32))


def new_kv_cache(n_layers: int, n_kv_heads: int, n_ctx: int, head_dim: int, cache_type: str = "f32"):
    """Zeroed (k, v) device arrays (n_kv_heads, n_ctx, head_dim) per layer, filled on the device."""
    cache_dtype(cache_type)  # an unknown name is refused as everywhere
    if cache_type != "f32":
        raise UnsupportedError(f"the cuda backend keeps its KV cache in f32; --cache-type {cache_type} runs on the CPU")
    shape = (n_kv_heads, n_ctx, head_dim)
    caches = []
    for _ in range(n_layers):
        pair = (cuda.device_array(shape, np.float32), cuda.device_array(shape, np.float32))
        for a in pair:
            K.fill_zero[_grid(n_kv_heads * n_ctx), K.MAX_BLOCK](a.reshape(n_kv_heads * n_ctx, head_dim))
        caches.append(pair)
    return caches


# -- matrix products -------------------------------------------------------------------------

def embedding(table: DeviceWeight, tokens) -> object:
    """(T,) token ids (host) -> (T, D) rows of the table, dequantized on the device."""
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    rows, cols = table.shape
    if ids.size and (ids.min() < 0 or ids.max() >= rows):
        raise ShapeError(f"token id out of range 0..{rows - 1}")
    out = _empty((ids.size, cols))
    if ids.size:
        n = ids.size * n_blocks(cols) * 16
        K.embedding[_grid(n), K.MAX_BLOCK](cuda.to_device(ids.astype(np.int32)), *table.args, cols, out)
    return out


def matmul(x, w: DeviceWeight, bias=None):
    """(T, K) @ W(N, K)^T (+ bias) -> (T, N)."""
    x = _device(x)
    T, cols = x.shape
    N, Kw = w.shape
    if cols != Kw:
        raise ShapeError(f"matmul shape mismatch: activations have {cols} features, weight expects {Kw}")
    out = _empty((T, N))
    if T == 0:
        return out
    b = _device(bias) if bias is not None else _dummy(np.float32, 1)
    args = (x, *w.args, b, bias is not None, cols, out)
    if T <= MATVEC_MAX_T:
        lanes = _pow2(n_blocks(cols), 1, 32)
        rows = K.MATVEC_THREADS // lanes
        K.matvec[_grid(N, rows), (lanes, rows)](*args)
    else:
        grid = (_grid(N, K.GEMM_BN), _grid(T, K.GEMM_BT))
        K.gemm[grid, (K.GEMM_TX, K.GEMM_TY)](*args)
    return out


def matmuls(x, ws: list, biases=None) -> list:
    """[(T, K) @ W_i(N_i, K)^T (+ bias_i)]: one launch per weight."""
    return separate_matmuls(matmul, x, ws, biases)


# -- elementwise and normalization -----------------------------------------------------------

def _elementwise(kernel, out_shape, *arrays_and_scalars):
    out = _empty(out_shape)
    n = int(np.prod(out_shape))
    if n:
        args = [_flat(a) if _is_device(a) else a for a in arrays_and_scalars]
        kernel[_grid(n), K.MAX_BLOCK](*args, _flat(out))
    return out


def add(a, b):
    """a + b for equal shapes, or a (T, F) + b (F,) broadcast over rows."""
    a, b = _device(a), _device(b)
    if a.shape != b.shape and not (b.ndim == 1 and a.shape[a.ndim - 1] == b.shape[0]):
        raise ShapeError(f"add: shapes {a.shape} and {b.shape} do not match")
    return _elementwise(K.add, a.shape, a, b)


def silu(x):
    x = _device(x)
    return _elementwise(K.silu, x.shape, x)


def swiglu(gate, up):
    gate, up = _device(gate), _device(up)
    if gate.shape != up.shape:
        raise ShapeError(f"swiglu: shapes {gate.shape} and {up.shape} do not match")
    return _elementwise(K.swiglu, gate.shape, gate, up)


def gelu(x, approximate: bool = False):
    x = _device(x)
    return _elementwise(K.gelu_tanh if approximate else K.gelu_erf, x.shape, x)


def clip(x, limit: float):
    x = _device(x)
    return _elementwise(K.clip, x.shape, x, np.float32(limit))


def _rows(x):
    """View any array as (rows, last dim) for the one-block-per-row kernels."""
    return x.reshape(x.size // x.shape[x.ndim - 1], x.shape[x.ndim - 1]) if x.ndim != 2 else x


def _per_row(kernel, x, *args):
    x = _device(x)
    x2 = _rows(x)
    out = _empty(x2.shape)
    if x2.shape[0] and x2.shape[1]:
        threads = _pow2((x2.shape[1] + 3) // 4, 32, K.MAX_BLOCK)   # >= 4 elements per thread
        kernel[x2.shape[0], threads](x2, *args, out)
    return out.reshape(x.shape) if x.ndim != 2 else out


def rmsnorm(x, weight, eps: float):
    return _per_row(K.rmsnorm, x, _device(weight), np.float32(eps))


def layernorm(x, weight, bias, eps: float):
    b = _device(bias) if bias is not None else _dummy(np.float32, 1)
    return _per_row(K.layernorm, x, _device(weight), b, bias is not None, np.float32(eps))


def softmax(x):
    return _per_row(K.softmax, x)


# -- position --------------------------------------------------------------------------------

def rope(x, positions, inv_freq, n_heads: int):
    """Rotary embedding, rotate-half, on the first 2*len(inv_freq) dims of each head."""
    x = _device(x)
    T, D = x.shape
    head_dim = D // n_heads
    if head_dim * n_heads != D or 2 * len(inv_freq) > head_dim:
        raise ShapeError(f"rope: {D} features do not split into {n_heads} heads with "
                           f"{2 * len(inv_freq)} rotary dims each")
    pos = np.asarray(positions, dtype=np.int64).reshape(-1)
    if pos.size != T:
        raise ShapeError(f"rope: {pos.size} positions for {T} tokens")
    out = _empty((T, D))
    if T == 0:
        return out
    if np.array_equal(pos, pos[0] + np.arange(T)):   # the usual case: no upload
        pos_dev, pos0 = _no_positions(), int(pos[0])
    else:
        pos_dev, pos0 = cuda.to_device(pos), 0
    K.rope[_grid(T * D), K.MAX_BLOCK](x, pos_dev, pos0, _constant(inv_freq, np.float64), head_dim, out)
    return out


# -- attention -------------------------------------------------------------------------------

def concat_rows(parts: list):
    """[(T_i, F)] device arrays -> (sum T_i, F), copied on the device."""
    out = _empty((sum(p.shape[0] for p in parts), parts[0].shape[1]))
    r = 0
    for p in parts:
        out[r:r + p.shape[0]].copy_to_device(p)
        r += p.shape[0]
    return out


def kv_write(cache, k, v, start_pos: int) -> None:
    """Store (T, n_kv * head_dim) keys/values at positions start_pos .. start_pos+T-1."""
    k_cache, v_cache = cache
    k, v = _device(k), _device(v)
    n_kv, n_ctx, hd = k_cache.shape
    T = k.shape[0]
    if k.shape != (T, n_kv * hd) or v.shape != k.shape:
        raise ShapeError(f"kv_write: keys {k.shape} / values {v.shape} do not fit a cache of "
                           f"{n_kv} heads x {hd} dims")
    if start_pos < 0 or start_pos + T > n_ctx:
        raise ShapeError(f"kv_write: positions {start_pos}..{start_pos + T - 1} exceed the "
                           f"KV cache of {n_ctx} positions")
    if T:
        K.kv_write[_grid(T * n_kv * hd), K.MAX_BLOCK](k, v, k_cache, v_cache, start_pos)


def attention(q, cache, start_pos: int, n_heads: int, scale: float, alibi_slopes=None):
    """Causal attention of T new queries (T, n_heads * head_dim) over the cache, which holds
    keys 0 .. start_pos + T - 1; GQA when the cache has fewer heads; optional ALiBi."""
    k_cache, v_cache = cache
    q = _device(q)
    n_kv, n_ctx, hd = k_cache.shape
    T = q.shape[0]
    if q.shape[1] != n_heads * hd or n_heads % n_kv:
        raise ShapeError(f"attention: queries {q.shape} do not match {n_heads} heads over a "
                           f"cache of {n_kv} heads x {hd} dims")
    if start_pos + T > n_ctx:
        raise ShapeError(f"attention: {start_pos + T} positions exceed the KV cache of {n_ctx}")
    if hd > K.ATTN_MAX_HEAD_DIM:
        raise UnsupportedError(f"the cuda attention kernel supports head_dim <= {K.ATTN_MAX_HEAD_DIM}, got {hd}")
    out = _empty((T, n_heads * hd))
    if T == 0:
        return out
    if alibi_slopes is not None:
        slopes, has_alibi = _constant(alibi_slopes, np.float32), True
    else:
        slopes, has_alibi = _dummy(np.float32, 1), False
    threads = _pow2(hd, 16, 128)   # one head dim per thread up to 128, then ATTN_ACC each
    K.attention[(T, n_heads), threads](q, k_cache, v_cache, start_pos, np.float32(scale),
                                       slopes, has_alibi, n_heads // n_kv, out)
    return out


def _device_name() -> str:
    get = getattr(cuda, "get_current_device", None)  # the simulator has none
    name = get().name if get else "CUDA simulator"
    return name.decode() if isinstance(name, bytes) else str(name)


@module_ops
class CudaBackend:
    """The CUDA ops as a Backend object, on the current device (``device``: its name). Kernels
    run on the GPU's own threads, so a CPU thread count is refused rather than ignored."""

    name = "cuda"
    compiles = True
    cache_types = ("f32",)

    def __init__(self, threads: int | None = None):
        if threads is not None:
            raise TinyLLMError("the cuda backend does not take a CPU thread count (its kernels run on the GPU)")
        self.device = _device_name()

    def begin(self, rows: int = 1) -> None:
        pass

    def end(self) -> None:
        pass
