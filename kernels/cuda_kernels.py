"""The numba.cuda kernels behind the ``cuda`` backend (``kernels/cuda.py`` launches them).

Each kernel mirrors one op of ``kernels/reference.py``. Conventions:

Trust: these kernels index without bounds checks (that is what makes them fast). They rely on
their callers for every shape and index: weights whose parts match their format's layout and
the architecture's declared shapes (checked when a model is loaded, tinyllm/validate.py),
token ids inside the embedding table and positions inside the KV cache (checked by
Model._forward before every forward pass).

* Activations are float32 ``(T, features)`` device arrays, heads contiguous in a row.
* A weight is passed as ``fmt, d, m, qs, wd`` (see ``cuda.DeviceWeight``): ``fmt`` picks the
  decoder at run time (one branch, uniform across the whole grid), so one compiled kernel
  serves q4_0, q4_1, q8_0 and dense f16/f32 without closures, which keeps ``cache=True`` working.
  Unused parts are 1-element dummies of a fixed dtype.
* Reductions go through shared memory with ``syncthreads`` rather than warp shuffles:
  Numba's CUDA simulator, which runs these kernels in CI, has no shuffles.
* Scalars that take part in float32 arithmetic are passed as ``np.float32`` and literals are
  wrapped in ``float32()``: Numba promotes float32 op float64 to float64.

Importing this module imports ``numba.cuda``; only the cuda backend does that.
"""
from __future__ import annotations

import math

from numba import cuda, float32, float64, int32

from tinyllm.kernels.quant import QK  # weights per quant block

# Weight decoders, selected by ``fmt``.
FMT_Q4_0, FMT_Q4_1, FMT_Q8_0, FMT_DENSE, FMT_Q4_K, FMT_Q6_K = 0, 1, 2, 3, 4, 5

MAX_BLOCK = 256        # threads of a 1-D block; shared scratch arrays are this long
MATVEC_THREADS = 128   # threads of a matrix-vector block: (lanes per row) x (rows per block)
GEMM_BT, GEMM_BN = 32, 64   # tokens x rows of output per matrix-matrix block
GEMM_TX, GEMM_TY = 16, 16   # its 256 threads; each computes 2 tokens x 4 rows
GEMM_WS_SHAPE = (QK, GEMM_BN + 1)   # shared tiles [k, row] / [k, token]; +1 against bank conflicts
GEMM_XS_SHAPE = (QK, GEMM_BT + 1)
ATTN_MAX_HEAD_DIM = 512
ATTN_ACC = 4           # head dims per thread in attention: head_dim <= 4 * blockDim

_NEG_INF = float32(-math.inf)


# -- shared helpers --------------------------------------------------------------------

@cuda.jit(device=True)
def q4_k_scale_min(scales, sb, k):
    """6-bit scale and minimum of block k of q4_k super-block sb (quant.unpack_scales)."""
    if k < 4:
        return int32(scales[sb, k]) & 63, int32(scales[sb, k + 4]) & 63
    return ((int32(scales[sb, k + 4]) & 15) | ((int32(scales[sb, k - 4]) >> 6) << 4),
            (int32(scales[sb, k + 4]) >> 4) | ((int32(scales[sb, k]) >> 6) << 4))


@cuda.jit(device=True)
def weight_pair(fmt, d, m, qs, wd, r, b, j, K):
    """W[r, 32b + j] and W[r, 32b + j + 16] as float32; zero past column K (dense only:
    quantized rows are zero-padded to whole blocks already)."""
    k = b * QK + j
    if fmt == FMT_DENSE:
        lo = float32(0)
        hi = float32(0)
        if k < K:
            lo = float32(wd[r, k])
        if k + 16 < K:
            hi = float32(wd[r, k + 16])
        return lo, hi
    byte = int32(qs[r, j, b])           # q[j] in the low nibble, q[j + 16] in the high one
    if fmt == FMT_Q6_K:                 # d (nsb, 1) float16, m: the (nsb, 16) int8 half-block scales
        g = r * qs.shape[2] + b
        sb, h = g >> 3, 2 * (g & 7)
        top = int32(qs[r, 16 + (j & 7), b]) >> (2 * (j >> 3))   # top bits of q[j] (bits 0-1), q[j+16] (4-5)
        lo = float32(((byte & 15) | ((top & 3) << 4)) - 32)
        hi = float32(((byte >> 4) | (top & 48)) - 32)
        dd = float32(d[sb, 0])
        return (dd * float32(m[sb, h])) * lo, (dd * float32(m[sb, h + 1])) * hi
    if fmt == FMT_Q4_K:                 # d (nsb, 2) float16, m: the (nsb, 12) 6-bit scales
        g = r * qs.shape[2] + b
        sb = g >> 3
        sc, mn = q4_k_scale_min(m, sb, g & 7)
        scale = float32(d[sb, 0]) * float32(sc)
        low = float32(d[sb, 1]) * float32(mn)
        return scale * float32(byte & 15) - low, scale * float32(byte >> 4) - low
    scale = float32(d[r, b])
    if fmt == FMT_Q8_0:
        return scale * float32(qs[r, j, b]), scale * float32(qs[r, j + 16, b])
    lo = float32(byte & 15)
    hi = float32(byte >> 4)
    if fmt == FMT_Q4_0:
        return scale * (lo - float32(8)), scale * (hi - float32(8))
    mn = float32(m[r, b])              # q4_1
    return scale * lo + mn, scale * hi + mn


@cuda.jit(device=True)
def block_sum(buf, v):
    """Sum of ``v`` over a 1-D block (blockDim.x a power of two <= len(buf)); all threads get it."""
    tid = cuda.threadIdx.x
    buf[tid] = v
    cuda.syncthreads()
    s = cuda.blockDim.x // 2
    while s > 0:
        if tid < s:
            buf[tid] += buf[tid + s]
        cuda.syncthreads()
        s //= 2
    total = buf[0]
    cuda.syncthreads()  # everyone has read buf[0] before buf is reused
    return total


@cuda.jit(device=True)
def block_max(buf, v):
    """Maximum of ``v`` over a 1-D block, as ``block_sum``."""
    tid = cuda.threadIdx.x
    buf[tid] = v
    cuda.syncthreads()
    s = cuda.blockDim.x // 2
    while s > 0:
        if tid < s:
            buf[tid] = max(buf[tid], buf[tid + s])
        cuda.syncthreads()
        s //= 2
    top = buf[0]
    cuda.syncthreads()
    return top


# -- buffers ---------------------------------------------------------------------------

@cuda.jit(cache=True)
def fill_zero(a):
    """a (rows, cols) <- 0, one thread per row (few threads: cheap in the simulator too)."""
    r = cuda.grid(1)
    if r < a.shape[0]:
        for c in range(a.shape[1]):
            a[r, c] = 0


# -- matrix products -------------------------------------------------------------------

@cuda.jit(cache=True)
def embedding(tokens, fmt, d, m, qs, wd, K, out):
    """out (T, K) <- rows tokens (T,) of the table. One thread per (token, block, byte j)."""
    i = cuda.grid(1)
    nb = (K + QK - 1) // QK
    t = i // (nb * 16)
    if t >= out.shape[0]:
        return
    b = (i // 16) % nb
    j = i % 16
    lo, hi = weight_pair(fmt, d, m, qs, wd, tokens[t], b, j, K)
    k = b * QK + j
    if k < K:
        out[t, k] = lo
    if k + 16 < K:
        out[t, k + 16] = hi


@cuda.jit(cache=True)
def matvec(x, fmt, d, m, qs, wd, bias, has_bias, K, out):
    """out (T, N) <- x (T, K) @ W(N, K)^T (+ bias) for a few tokens (decode).

    Block (lanes, rows): each row of W is read by ``lanes`` threads, lane l taking quant
    blocks l, l + lanes, ...; in the plane-major layout byte j of neighbouring blocks sits
    side by side, so the lanes' loads coalesce. Partial sums meet in shared memory.
    """
    lanes = cuda.blockDim.x
    lane = cuda.threadIdx.x
    tid = cuda.threadIdx.y * lanes + lane
    r = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
    T, N = out.shape
    nb = (K + QK - 1) // QK
    red = cuda.shared.array(MATVEC_THREADS, float32)
    for t in range(T):
        acc = float32(0)
        if r < N:
            for b in range(lane, nb, lanes):
                for j in range(16):
                    lo, hi = weight_pair(fmt, d, m, qs, wd, r, b, j, K)
                    k = b * QK + j
                    if k < K:
                        acc += lo * x[t, k]
                    if k + 16 < K:
                        acc += hi * x[t, k + 16]
        red[tid] = acc
        cuda.syncthreads()
        s = lanes // 2
        while s > 0:
            if lane < s:
                red[tid] += red[tid + s]
            cuda.syncthreads()
            s //= 2
        if lane == 0 and r < N:
            v = red[tid]
            if has_bias:
                v += bias[r]
            out[t, r] = v
        cuda.syncthreads()


@cuda.jit(cache=True)
def gemm(x, fmt, d, m, qs, wd, bias, has_bias, K, out):
    """out (T, N) <- x (T, K) @ W(N, K)^T (+ bias) for many tokens (prefill).

    Each block computes a GEMM_BT x GEMM_BN tile of out, stepping through K one quant block
    at a time: dequantize 64 rows x 32 weights and load 32 tokens x 32 activations into
    shared memory, then every thread accumulates its 2 x 4 outputs from them.
    """
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tid = ty * GEMM_TX + tx
    t0 = cuda.blockIdx.y * GEMM_BT
    n0 = cuda.blockIdx.x * GEMM_BN
    T, N = out.shape
    nb = (K + QK - 1) // QK
    ws = cuda.shared.array(GEMM_WS_SHAPE, float32)
    xs = cuda.shared.array(GEMM_XS_SHAPE, float32)
    acc = cuda.local.array((2, 4), float32)
    for u in range(2):
        for v in range(4):
            acc[u, v] = 0
    for b in range(nb):
        for p in range(tid, GEMM_BN * 16, GEMM_TX * GEMM_TY):
            n = p % GEMM_BN
            j = p // GEMM_BN
            lo = float32(0)
            hi = float32(0)
            if n0 + n < N:
                lo, hi = weight_pair(fmt, d, m, qs, wd, n0 + n, b, j, K)
            ws[j, n] = lo
            ws[j + 16, n] = hi
        for p in range(tid, GEMM_BT * QK, GEMM_TX * GEMM_TY):
            kk = p % QK
            tt = p // QK
            k = b * QK + kk
            xv = float32(0)
            if t0 + tt < T and k < K:
                xv = x[t0 + tt, k]
            xs[kk, tt] = xv
        cuda.syncthreads()
        for kk in range(QK):
            x0 = xs[kk, ty]
            x1 = xs[kk, ty + 16]
            for v in range(4):
                w = ws[kk, tx + 16 * v]
                acc[0, v] += x0 * w
                acc[1, v] += x1 * w
        cuda.syncthreads()
    for u in range(2):
        t = t0 + ty + 16 * u
        for v in range(4):
            n = n0 + tx + 16 * v
            if t < T and n < N:
                y = acc[u, v]
                if has_bias:
                    y += bias[n]
                out[t, n] = y


# -- elementwise -----------------------------------------------------------------------

@cuda.jit(cache=True)
def add(a, b, out):
    """out (n,) <- a + b; b has n elements or is one row (F,) repeated."""
    i = cuda.grid(1)
    if i < out.shape[0]:
        out[i] = a[i] + b[i % b.shape[0]]


@cuda.jit(cache=True)
def silu(x, out):
    i = cuda.grid(1)
    if i < out.shape[0]:
        v = x[i]
        out[i] = v / (float32(1) + math.exp(-v))


@cuda.jit(cache=True)
def swiglu(gate, up, out):
    """out <- SiLU(gate) * up."""
    i = cuda.grid(1)
    if i < out.shape[0]:
        g = gate[i]
        out[i] = g / (float32(1) + math.exp(-g)) * up[i]


@cuda.jit(cache=True)
def gelu_erf(x, out):
    """Exact GELU; erf in float64 as the reference computes it."""
    i = cuda.grid(1)
    if i < out.shape[0]:
        v = float64(x[i])
        out[i] = 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))


@cuda.jit(cache=True)
def gelu_tanh(x, out):
    """GELU's tanh approximation (GPT-J), in float32 as the reference."""
    i = cuda.grid(1)
    if i < out.shape[0]:
        v = x[i]
        inner = float32(0.7978845608028654) * (v + float32(0.044715) * v * v * v)
        out[i] = float32(0.5) * v * (float32(1) + math.tanh(inner))


@cuda.jit(cache=True)
def clip(x, limit, out):
    i = cuda.grid(1)
    if i < out.shape[0]:
        out[i] = min(max(x[i], -limit), limit)


# -- per-row normalizations (one block per row) ------------------------------------------

@cuda.jit(cache=True)
def rmsnorm(x, weight, eps, out):
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    F = x.shape[1]
    buf = cuda.shared.array(MAX_BLOCK, float32)
    ss = float32(0)
    for i in range(tid, F, cuda.blockDim.x):
        ss += x[row, i] * x[row, i]
    ss = block_sum(buf, ss)
    denom = math.sqrt(ss / float32(F) + eps)
    for i in range(tid, F, cuda.blockDim.x):
        out[row, i] = x[row, i] / denom * weight[i]


@cuda.jit(cache=True)
def layernorm(x, weight, bias, has_bias, eps, out):
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    F = x.shape[1]
    buf = cuda.shared.array(MAX_BLOCK, float32)
    s = float32(0)
    for i in range(tid, F, cuda.blockDim.x):
        s += x[row, i]
    mu = block_sum(buf, s) / float32(F)
    s = float32(0)
    for i in range(tid, F, cuda.blockDim.x):
        c = x[row, i] - mu
        s += c * c
    denom = math.sqrt(block_sum(buf, s) / float32(F) + eps)
    for i in range(tid, F, cuda.blockDim.x):
        y = (x[row, i] - mu) / denom * weight[i]
        if has_bias:
            y += bias[i]
        out[row, i] = y


@cuda.jit(cache=True)
def softmax(x, out):
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    F = x.shape[1]
    buf = cuda.shared.array(MAX_BLOCK, float32)
    top = _NEG_INF
    for i in range(tid, F, cuda.blockDim.x):
        top = max(top, x[row, i])
    top = block_max(buf, top)
    s = float32(0)
    for i in range(tid, F, cuda.blockDim.x):
        e = math.exp(x[row, i] - top)
        out[row, i] = e
        s += e
    s = block_sum(buf, s)
    for i in range(tid, F, cuda.blockDim.x):
        out[row, i] = out[row, i] / s


# -- position --------------------------------------------------------------------------

@cuda.jit(cache=True)
def rope(x, positions, pos0, inv_freq, head_dim, out):
    """Rotate-half RoPE on the first 2*len(inv_freq) dims of each head; one thread per element.

    positions (T,) int64, or empty meaning pos0, pos0 + 1, ...; angles in float64 as the
    reference, cos/sin rounded to float32 before the multiply.
    """
    i = cuda.grid(1)
    T, D = x.shape
    if i >= T * D:
        return
    t = i // D
    c = i % D
    dim = c % head_dim
    half = inv_freq.shape[0]
    if dim >= 2 * half:
        out[t, c] = x[t, c]
        return
    pos = pos0 + t
    if positions.shape[0] > 0:
        pos = positions[t]
    f = dim % half
    angle = float64(pos) * inv_freq[f]
    cs = float32(math.cos(angle))
    sn = float32(math.sin(angle))
    if dim < half:
        out[t, c] = x[t, c] * cs - x[t, c + half] * sn
    else:
        out[t, c] = x[t, c] * cs + x[t, c - half] * sn


# -- attention -------------------------------------------------------------------------

@cuda.jit(cache=True)
def kv_write(k, v, k_cache, v_cache, start_pos):
    """caches (n_kv, n_ctx, hd)[:, start_pos + t] <- k, v (T, n_kv * hd); one thread per element."""
    i = cuda.grid(1)
    n_kv, _, hd = k_cache.shape
    T = k.shape[0]
    if i >= T * n_kv * hd:
        return
    t = i // (n_kv * hd)
    c = i % (n_kv * hd)
    h = c // hd
    e = c % hd
    k_cache[h, start_pos + t, e] = k[t, c]
    v_cache[h, start_pos + t, e] = v[t, c]


@cuda.jit(cache=True)
def attention(q, k_cache, v_cache, start_pos, scale, slopes, has_alibi, group, out):
    """One block per (query t, head h): causal softmax(q k^T * scale [+ ALiBi]) v.

    Keys are taken blockDim.x at a time (one per thread) with an online softmax (running
    max and sum, Milakov & Gimelshein, 2018), so any context length fits in shared memory.
    """
    t = cuda.blockIdx.x
    h = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    hd = k_cache.shape[2]
    kvh = h // group
    qv = cuda.shared.array(ATTN_MAX_HEAD_DIM, float32)
    probs = cuda.shared.array(MAX_BLOCK, float32)
    buf = cuda.shared.array(MAX_BLOCK, float32)
    for e in range(tid, hd, nt):
        qv[e] = q[t, h * hd + e]
    cuda.syncthreads()
    i = start_pos + t            # this query's absolute position: it sees keys 0..i
    n_keys = i + 1
    slope = float32(0)
    if has_alibi:
        slope = slopes[h]
    acc = cuda.local.array(ATTN_ACC, float32)
    for a in range(ATTN_ACC):
        acc[a] = 0
    m_run = _NEG_INF
    l_run = float32(0)
    for j0 in range(0, n_keys, nt):
        j = j0 + tid
        s = _NEG_INF
        if j < n_keys:
            dot = float32(0)
            for e in range(hd):
                dot += qv[e] * k_cache[kvh, j, e]
            s = dot * scale
            if has_alibi:
                s += slope * float32(j - i)
        m_new = max(m_run, block_max(buf, s))   # finite: key j0 is always visible
        p = float32(0)
        if j < n_keys:
            p = math.exp(s - m_new)
        probs[tid] = p
        corr = math.exp(m_run - m_new)          # 0 on the first tile (m_run = -inf)
        l_run = l_run * corr + block_sum(buf, p)  # block_sum's syncs also publish probs
        n_tile = min(nt, n_keys - j0)
        for a in range(ATTN_ACC):
            e = tid + a * nt
            if e < hd:
                o = acc[a] * corr
                for jj in range(n_tile):
                    o += probs[jj] * v_cache[kvh, j0 + jj, e]
                acc[a] = o
        m_run = m_new
        cuda.syncthreads()                      # probs is rewritten by the next tile
    for a in range(ATTN_ACC):
        e = tid + a * nt
        if e < hd:
            out[t, h * hd + e] = acc[a] / l_run
