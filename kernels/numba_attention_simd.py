"""Register tiles for attention over the KV cache, emitted as LLVM vector IR through Numba.

Why this exists. Decode attention at a long context is a (heads x hd) by (hd x keys) product
for the scores and a (heads x keys) by (keys x hd) one for the values, where GQA/MQA heads
share every key. Written as Numba loops (numba_ops._attend_group), LLVM keeps one vector
accumulator per dot product and reduces each one horizontally, or loads and stores the
value accumulators every few keys: the loads, stores and reductions, not the multiply-adds,
set the pace (~0.8 multiply-adds a cycle). These tiles hold eight 8-lane accumulators in
registers:

    score_tile   heads x keys = 2 x 4 (or 1 x 8): per 8 dims, 4 key loads + 2 query loads
                 feed 8 multiply-adds; one shuffle tree turns the 8 accumulators into 8 scores
    value_tile   heads x dims = 4 x 16 (or 2 x 32, 1 x 64): per key, 2 value loads + 4
                 weight broadcasts feed 8 multiply-adds, over a run of keys
    prefetch_ahead   the tiles' order (several rows, a few dims at a time) hides the cache
                 stream from the hardware prefetchers: the callers announce the rows ahead

The IR is target-independent vector code (LLVM lowers it with AVX2/AVX-512 where present,
and splits it elsewhere). Cache rows are float32, or float16 stored as their uint16 bits
(converted in registers: vcvtph2ps). Offsets are flat element indices into C-contiguous
arrays; the callers (numba_ops) check the shapes that make every load stay in bounds.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from tinyllm.kernels.numba_simd import F16, F32, I16, I32, _const, _prefetch, _splat, _vec_ptr

LANES = 8                     # float32 lanes per vector: one AVX2 register
TILE = 8                      # accumulators per tile
I64 = ir.IntType(64)
VF = ir.VectorType(F32, LANES)


def _data(context, builder, aryty, ary):
    return context.make_array(aryty)(context, builder, ary).data


def _load_f32x8(context, builder, aryty, ary, offset):
    """8 consecutive elements from flat ``offset`` as float32 (float16 bits converted)."""
    if aryty.dtype == types.uint16:
        raw = builder.load(_vec_ptr(context, builder, aryty, ary, offset, ir.VectorType(I16, LANES)), align=2)
        return builder.fpext(builder.bitcast(raw, ir.VectorType(F16, LANES)), VF)
    return builder.load(_vec_ptr(context, builder, aryty, ary, offset, VF), align=4)


def _splat_scalar(context, builder, aryty, ary, offset):
    """A float32 element broadcast to every lane."""
    x = builder.load(builder.gep(_data(context, builder, aryty, ary), [offset], inbounds=True))
    return _splat(builder, x, LANES)


def _fma_into(builder, slot, a, b):
    """*slot += a * b (one fused multiply-add on an accumulator)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(VF, [VF, VF, VF]), "llvm.fma.v8f32")
    builder.store(builder.call(fn, [a, b, builder.load(slot)]), slot)


def _offset(builder, base, index, stride, plus):
    """base + index * stride + plus (i64 values; index a Python int)."""
    return builder.add(base, builder.add(builder.mul(ir.Constant(I64, index), stride), plus))


def _pairwise(builder, a, b, width):
    """Lanes of a and b summed in adjacent groups of `width`, interleaved group by group:
    width 1 -> [a0+a1, b0+b1, a2+a3, b2+b3, ...]."""
    lo, hi = [], []
    for g in range(LANES // (2 * width)):
        for src in (0, LANES):                 # a's group, then b's
            lo += [src + 2 * g * width + i for i in range(width)]
            hi += [src + (2 * g + 1) * width + i for i in range(width)]
    return builder.fadd(builder.shuffle_vector(a, b, _const(I32, lo)), builder.shuffle_vector(a, b, _const(I32, hi)))


def _sums(builder, acc):
    """The 8 accumulators' horizontal sums as one vector, lane i = sum(acc[i]): three rounds
    of pairwise adds (the hadd tree) instead of eight separate reductions."""
    t = [_pairwise(builder, acc[2 * i], acc[2 * i + 1], 1) for i in range(4)]   # lane 2j+e: acc[e] part j
    u = [_pairwise(builder, t[2 * i], t[2 * i + 1], 2) for i in range(2)]       # lanes 0-3: 4 accs' lower half
    lo = [0, 1, 2, 3, 8, 9, 10, 11]
    hi = [4, 5, 6, 7, 12, 13, 14, 15]
    return builder.fadd(builder.shuffle_vector(u[0], u[1], _const(I32, lo)),
                        builder.shuffle_vector(u[0], u[1], _const(I32, hi)))


def _i64(context, builder, value, ty):
    return context.cast(builder, value, ty, types.int64)


def _accumulators(builder, n):
    slots = [cgutils.alloca_once(builder, VF) for _ in range(n)]   # promoted to registers by LLVM
    for s in slots:
        builder.store(ir.Constant(VF, [0.0] * LANES), s)
    return slots


@intrinsic
def score_tile(typingctx, qs, q_off, cache, k_off, hd, scores, s_off, s_stride, heads):
    """scores.flat[s_off + h * s_stride + k] = qs.flat[q_off + h * hd :][:hd] . cache.flat[k_off + k * hd :][:hd]
    for h < heads, k < 8 // heads. qs float32; cache float32 or float16 bits (uint16); scores
    float32; hd a multiple of 8; heads a literal 1 or 2."""
    if not isinstance(heads, types.IntegerLiteral):
        return None
    H = heads.literal_value
    if H not in (1, 2):
        raise ValueError(f"score_tile: heads must be 1 or 2, not {H}")
    K = TILE // H
    sig = types.void(qs, q_off, cache, k_off, hd, scores, s_off, s_stride, heads)

    def codegen(context, builder, signature, args):
        at = signature.args
        qs_, cache_, scores_ = args[0], args[2], args[5]
        q0, k0, hd_, s0, ss = (_i64(context, builder, args[i], at[i]) for i in (1, 3, 4, 6, 7))
        acc = _accumulators(builder, TILE)
        n_chunks = builder.udiv(hd_, ir.Constant(I64, LANES))
        with cgutils.for_range(builder, n_chunks) as loop:
            dim = builder.mul(loop.index, ir.Constant(I64, LANES))
            keys = [_load_f32x8(context, builder, at[2], cache_, _offset(builder, k0, k, hd_, dim)) for k in range(K)]
            for h in range(H):
                q = _load_f32x8(context, builder, at[0], qs_, _offset(builder, q0, h, hd_, dim))
                for k in range(K):
                    _fma_into(builder, acc[h * K + k], q, keys[k])
        total = _sums(builder, [builder.load(s) for s in acc])          # lane h * K + k
        out = _data(context, builder, at[5], scores_)
        vk = ir.VectorType(F32, K)
        for h in range(H):
            part = builder.shuffle_vector(total, total, _const(I32, [h * K + k for k in range(K)]))
            ptr = builder.gep(out, [_offset(builder, s0, h, ss, ir.Constant(I64, 0))], inbounds=True)
            builder.store(part, builder.bitcast(ptr, ir.PointerType(vk)), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def value_tile(typingctx, p, p_off, p_stride, cache, v_off, hd, n_keys, acc, a_off, heads):
    """acc.flat[a_off + h * hd + c * 8 :][:8] += sum over k < n_keys of
    p.flat[p_off + h * p_stride + k] * cache.flat[v_off + k * hd + c * 8 :][:8]
    for h < heads, c < 8 // heads (the tile's 64 // heads dims, from v_off's). p, acc float32;
    cache float32 or float16 bits (uint16); heads a literal 1, 2 or 4."""
    if not isinstance(heads, types.IntegerLiteral):
        return None
    H = heads.literal_value
    if H not in (1, 2, 4):
        raise ValueError(f"value_tile: heads must be 1, 2 or 4, not {H}")
    C = TILE // H
    sig = types.void(p, p_off, p_stride, cache, v_off, hd, n_keys, acc, a_off, heads)

    def codegen(context, builder, signature, args):
        at = signature.args
        p_, cache_, acc_ = args[0], args[3], args[7]
        p0, ps, v0, hd_, nk, a0 = (_i64(context, builder, args[i], at[i]) for i in (1, 2, 4, 5, 6, 8))
        regs = _accumulators(builder, TILE)
        with cgutils.for_range(builder, nk) as loop:
            k = loop.index
            row = builder.add(v0, builder.mul(k, hd_))
            values = [_load_f32x8(context, builder, at[3], cache_, builder.add(row, ir.Constant(I64, c * LANES)))
                      for c in range(C)]
            for h in range(H):
                w = _splat_scalar(context, builder, at[0], p_, _offset(builder, p0, h, ps, k))
                for c in range(C):
                    _fma_into(builder, regs[h * C + c], w, values[c])
        base = _data(context, builder, at[7], acc_)
        for h in range(H):
            for c in range(C):
                off = _offset(builder, a0, h, hd_, ir.Constant(I64, c * LANES))
                ptr = builder.bitcast(builder.gep(base, [off], inbounds=True), ir.PointerType(VF))
                builder.store(builder.fadd(builder.load(ptr, align=4), builder.load(regs[h * C + c])), ptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def prefetch_ahead(typingctx, ary, offset, count):
    """Prefetch the cache lines of ary.flat[offset:offset + count], shifted ahead by the weight
    stream's distances (numba_simd._prefetch: 4 KiB into L1, 16 KiB into L2; addresses past
    the array's end are harmless: a prefetch never faults)."""
    sig = types.void(ary, offset, count)

    def codegen(context, builder, signature, args):
        at = signature.args
        off, n = (_i64(context, builder, args[i], at[i]) for i in (1, 2))
        size = at[0].dtype.bitwidth // 8
        per_line = ir.Constant(I64, 64 // size)
        lines = builder.udiv(builder.add(n, builder.sub(per_line, ir.Constant(I64, 1))), per_line)
        data = _data(context, builder, at[0], args[0])
        with cgutils.for_range(builder, lines) as line:
            _prefetch(builder, builder.gep(data, [builder.add(off, builder.mul(line.index, per_line))]))
        return context.get_dummy_value()

    return sig, codegen
