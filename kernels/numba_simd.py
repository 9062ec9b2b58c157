"""x86 SIMD building blocks for the 4-bit dot products, emitted as LLVM IR through Numba.

Why this exists. LLVM's auto-vectorizer turns the portable q4 loop (numba_quant.py) into
about 16 vector instructions per 64 weight bytes: zero-extend to 16 bits, mask/shift,
pmullw, paddw, and a store/reload of the per-block accumulator. The x86 instruction made
for 4-bit x int8 is ``pmaddubsw`` (unsigned 8-bit x signed 8-bit, adjacent products summed
to int16), and the vectorizer never emits it. Emitting it directly takes 8 instructions per
64 bytes and doubles the throughput, which is what makes decode memory-bound.

The weight layout is the file's plane-major one (quant.py): ``qs[r, j, b]`` is byte j of
block b, so one vector load brings byte j of W consecutive blocks (W = 64 with AVX-512BW,
32 with AVX2). Per plane j:

    lo, hi = w & 15, (w >> 4) & 15                 # q[j] and q[j+16] of W blocks
    p1, p2 = unpacklo(lo, hi), unpackhi(lo, hi)    # (q[j], q[j+16]) byte pairs, per block
    acc1 += pmaddubsw(p1, x1); acc2 += pmaddubsw(p2, x2)   # int16: q[j]x[j] + q[j+16]x[j+16]

``x1``/``x2`` are the activation's int8 values laid out in the same pair order
(``quantize_for_simd`` in numba_quant.py prepares them once per matmul). The int16 sums wrap:
the unsigned nibble sum can exceed int16, but the wanted value sum((q - 8) * x) =
acc - 8 * sum(x) always fits (|.| <= 32 * 8 * 127 = 32512), so subtracting the per-block
correction in the same wrapping arithmetic gives it exactly. One float pass per block then
applies the weight and activation scales.

With AVX-512 VNNI (``vnni``, off by default: see numba_cpu.default_vnni) the q4 kernels
interleave the pairs of planes j and j+1 by words, so each int32 lane holds four weights of one
block, and vpdpbusd multiplies, sums and accumulates them exactly in one instruction (the
activation is laid out to match: q4_activation_layout); q8_0 / q6_k use vpdpwssd for pmaddwd + add.

Each call computes one chunk of W blocks of one weight row against ``tt`` tokens (the weight
bytes are unpacked once and reused by all of them: that is the prefill kernel), and adds the
chunk's sums into ``out``. Everything is specialized at compile time on W, tt, vnni and the format
(q4_1 when m is given).
"""
from __future__ import annotations

import functools
import platform
from collections import namedtuple

import llvmlite.binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic

I1, I8, I16, I32, F16, F32 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.HalfType(), ir.FloatType()

# LLVM names per vector width in blocks (= bytes per load): pmaddubsw (u8 x s8 -> i16 pair
# sums) and pmaddwd (i16 x i16 -> i32 pair sums)
_PMADDUBSW = {64: "llvm.x86.avx512.pmaddubs.w.512", 32: "llvm.x86.avx2.pmadd.ub.sw"}
_PMADDWD = {64: "llvm.x86.avx512.pmaddw.d.512", 32: "llvm.x86.avx2.pmadd.wd"}
# AVX-512 VNNI: vpdpbusd (u8 x s8, four adjacent products summed into each int32 lane and added to
# it) does pmaddubsw's work and the accumulation in one instruction, without int16 wrapping;
# vpdpwssd is pmaddwd plus the add. 256-bit forms with AVX-512VL (EVEX: 32 registers)
_VPDPBUSD = {64: "llvm.x86.avx512.vpdpbusd.512", 32: "llvm.x86.avx512.vpdpbusd.256"}
_VPDPWSSD = {64: "llvm.x86.avx512.vpdpwssd.512", 32: "llvm.x86.avx512.vpdpwssd.256"}

# The chunk kernels' operands, bundled by role. Numba passes a namedtuple by value and LLVM
# takes it apart again after inlining: the compiled loop is the same as with loose arguments.
# Offsets are flat element indices; a format without a part passes None for it.
WeightChunk = namedtuple("WeightChunk", [
    "qs", "q_off", "plane_stride",    # quants; the chunk's plane j at q_off + j * plane_stride
    "d", "m", "d_off"])               # scales, minimums (q4_1) or q4_k's packed 6-bit scales; chunk at d_off
ActivationChunk = namedtuple("ActivationChunk", [
    "xq", "x_off", "x_tstride",       # int8 (q4) / int16 (q8) values; token t's chunk at x_off + t * x_tstride
    "corr", "dx", "sxf",              # per block: 8*sum(x) (q4), scale, scale*sum(x) (q4_1)
    "c_off", "c_tstride"])            # token t's per-block values at c_off + t * c_tstride
OutputSlot = namedtuple("OutputSlot", ["out", "o_off", "o_tstride"])  # out.flat[o_off + t * o_tstride] +=


def _fields(context, builder, signature, args) -> tuple[dict, dict]:
    """The bundles' fields (and the trailing nvalid) by name: LLVM values, integers as i64,
    and their Numba types."""
    values, kinds = {}, {}
    for bundle_type, bundle in zip(signature.args[:3], args[:3]):
        for k, (name, kind) in enumerate(zip(bundle_type.fields, bundle_type.types)):
            values[name], kinds[name] = builder.extract_value(bundle, k), kind
    values["nvalid"], kinds["nvalid"] = args[3], signature.args[3]
    for name, kind in kinds.items():
        if isinstance(kind, types.Integer):
            values[name], kinds[name] = context.cast(builder, values[name], kind, types.int64), types.int64
    return values, kinds


def compile_features() -> set[str]:
    """The CPU features Numba compiles for (NUMBA_CPU_FEATURES, else the host's)."""
    flat = config.CPU_FEATURES if config.CPU_FEATURES is not None else llvm_binding.get_host_cpu_features().flatten()
    return {f[1:] for f in flat.split(",") if f.startswith("+")}


def native_width() -> int:
    """Blocks per SIMD chunk this CPU supports: 64 (AVX-512BW), 32 (AVX2), 0 (no x86 SIMD path)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return 0
    feats = compile_features()
    if {"avx512f", "avx512bw", "f16c"} <= feats:
        return 64
    if {"avx2", "f16c"} <= feats:
        return 32
    return 0


@functools.lru_cache(maxsize=None)
def has_vnni(width: int) -> bool:
    """Whether the kernels of this SIMD width can use AVX-512 VNNI here (the 256-bit forms need
    AVX-512VL; AVX-VNNI alone has 16 registers, too few for the prefill tiles' accumulators)."""
    feats = compile_features()
    return width in (32, 64) and width <= native_width() and \
        {"avx512vnni", "avx512vl" if width == 32 else "avx512f"} <= feats


# -- pair order ------------------------------------------------------------------------
# unpacklo/unpackhi interleave within 128-bit lanes (16 bytes): for lane L, unpacklo pairs
# bytes 16L+0..7 of its two inputs, unpackhi bytes 16L+8..15. So int16 result k of the
# unpacklo half belongs to block pair_blocks(W)[0][k].

def pair_blocks(width: int) -> tuple[list[int], list[int]]:
    """Block index of each int16 lane of acc1 (unpacklo) and acc2 (unpackhi)."""
    lo = [16 * (k // 8) + k % 8 for k in range(width // 2)]
    hi = [16 * (k // 8) + 8 + k % 8 for k in range(width // 2)]
    return lo, hi


def q8_pair_blocks(width: int) -> list[list[int]]:
    """q8_0 kernel: the block of each int32 lane of its four pmaddwd results. A plane's W
    bytes widen to two int16 registers (blocks 0..W/2-1, W/2..W-1); unpacklo/unpackhi of
    plane j with plane j+16 pair words within 128-bit lanes (8 words: 4 low, 4 high)."""
    half = width // 2
    return [[hf * half + 8 * (k // 4) + part * 4 + k % 4 for k in range(width // 4)]
            for hf in (0, 1) for part in (0, 1)]


def vnni_blocks(width: int) -> list[list[int]]:
    """VNNI q4 kernel: the block of each int32 lane of its four vpdpbusd accumulators. Planes j
    and j+1's (q[j], q[j+16]) pairs in pair_blocks order interleave by words within 128-bit lanes
    (unpacklo/unpackhi of words), so accumulator (half, part) lane 4L+m sums block
    pair_blocks(width)[half][8L + 4 part + m]: its weights j, j+16, j+1, j+17 in one int32."""
    return [[blocks[8 * (k // 4) + 4 * part + k % 4] for k in range(width // 4)]
            for blocks in pair_blocks(width) for part in (0, 1)]


def _word_interleave(W, part):
    """Byte indices into (a ++ b), two W-byte vectors of int16 words: unpacklo (part 0) or
    unpackhi (part 1) of words within 128-bit lanes, as vnni_blocks describes."""
    words = [8 * lane + 4 * part + m for lane in range(W // 16) for m in range(4)]
    return _const(I32, [i for w in words for i in (2 * w, 2 * w + 1, W + 2 * w, W + 2 * w + 1)])


def q4_activation_layout(width: int, vnni: bool) -> tuple[list[int], list[int]]:
    """Where the q4 kernel of ``width`` (pmaddubsw, or vpdpbusd with ``vnni``) reads the
    activation: byte (x[p], x[p+16])[h] of block b of a chunk lies at base[p] + slot[b] + h.
    pmaddubsw: plane p's 2W bytes are the pairs of pair_blocks' lo then hi blocks; VNNI: planes
    2g and 2g+1 share 4W bytes, four registers of (x[2g], x[2g+16], x[2g+1], x[2g+17]) quads in
    vnni_blocks order."""
    W = width
    slot = [0] * W
    if not vnni:
        for half, blocks in enumerate(pair_blocks(W)):
            for k, b in enumerate(blocks):
                slot[b] = half * W + 2 * k
        return [2 * W * p for p in range(16)], slot
    for r, blocks in enumerate(vnni_blocks(W)):
        for k, b in enumerate(blocks):
            slot[b] = r * W + 4 * k
    return [4 * W * (p // 2) + 2 * (p % 2) for p in range(16)], slot


def _const(t, values):
    return ir.Constant(ir.VectorType(t, len(values)), [ir.Constant(t, v) for v in values])


def _splat(builder, value, n):
    v = builder.insert_element(ir.Constant(ir.VectorType(value.type, n), None), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, ir.Constant(ir.VectorType(value.type, n), None), _const(I32, [0] * n))


def _vec_ptr(context, builder, aryty, ary, offset, vec_type):
    """Pointer to a vector of ``vec_type`` starting at flat element ``offset`` of an array."""
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.bitcast(builder.gep(data, [offset], inbounds=True), ir.PointerType(vec_type))


def _masked_load(builder, ptr, mask, align):
    vt = ptr.type.pointee
    element = "f32" if isinstance(vt.element, ir.FloatType) else f"i{vt.element.width}"
    name = f"llvm.masked.load.v{vt.count}{element}.p0"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [ptr.type, I32, mask.type, vt]), name)
    return builder.call(fn, [ptr, ir.Constant(I32, align), mask, ir.Constant(vt, [0] * vt.count)])


# How a chunk's operands are loaded: WHOLE (every lane inside the row), TAIL (the row's last,
# partial chunk, every vector inside its array: a plain load and a select), EDGE (a partial
# chunk near the end of an array: each load checks, and a masked load where it must).
WHOLE, TAIL, EDGE = 0, 1, 2


def _load_lanes(context, builder, aryty, ary, offset, vt, mask, align, mode=EDGE):
    """The lanes of a vector of ``vt`` at flat element ``offset`` of an array where ``mask`` is
    set, zero elsewhere. A plain load and a select where the whole vector lies inside the array
    (``mode`` TAIL: the caller checked; EDGE: checked here): AVX2 has no masked load of bytes or
    words, and LLVM turns one into a branch per lane; a masked load only at the array's end."""
    ptr = _vec_ptr(context, builder, aryty, ary, offset, vt)
    if mode == TAIL:
        return builder.select(mask, builder.load(ptr, align=align), ir.Constant(vt, [0] * vt.count))
    arr = context.make_array(aryty)(context, builder, ary)
    inside = builder.icmp_signed("<=", builder.add(offset, ir.Constant(offset.type, vt.count)), arr.nitems)
    with builder.if_else(inside) as (whole, edge):
        with whole:
            plain = builder.select(mask, builder.load(ptr, align=align), ir.Constant(vt, [0] * vt.count))
            plain_block = builder.basic_block
        with edge:
            masked = _masked_load(builder, ptr, mask, align)
            masked_block = builder.basic_block
    value = builder.phi(vt)
    value.add_incoming(plain, plain_block)
    value.add_incoming(masked, masked_block)
    return value


def _masked_store(builder, value, ptr, mask, align):
    vt = value.type
    element = "f32" if isinstance(vt.element, ir.FloatType) else f"i{vt.element.width}"
    fnty = ir.FunctionType(ir.VoidType(), [vt, ptr.type, I32, mask.type])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.masked.store.v{vt.count}{element}.p0")
    builder.call(fn, [value, ptr, ir.Constant(I32, align), mask])


# Software prefetch of the weight stream: decode reads each weight byte from DRAM exactly
# once, and with two cores the hardware prefetchers alone keep too few misses in flight on
# the plane-strided reads. Each plane load also prefetches 4 KiB ahead into L1 and 16 KiB
# ahead into L2 (matvec over 160 matrices of 5632x2048, 1 GB, more than the last-level
# cache: 19 GB/s without, 25 GB/s with both; see BENCHMARKS.md).
PREFETCH_L1_BYTES = 4096
PREFETCH_L2_BYTES = 16384


def _prefetch(builder, ptr):
    fnty = ir.FunctionType(ir.VoidType(), [ir.PointerType(I8), I32, I32, I32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    base = builder.bitcast(ptr, ir.PointerType(I8))
    for distance, locality in ((PREFETCH_L1_BYTES, 3), (PREFETCH_L2_BYTES, 2)):
        p = builder.gep(base, [ir.Constant(ir.IntType(64), distance)])
        builder.call(fn, [p, ir.Constant(I32, 0), ir.Constant(I32, locality), ir.Constant(I32, 1)])  # read, data


def _halves(builder, a, b, tokens_a, tokens_b, m):
    """Vectors a, b (b may be a) holding ``m`` partial sums per token, token by token -> one
    vector of a's then b's tokens with m/2 partials each: partial i plus partial i + m/2."""
    n, h = a.type.count, m // 2
    sources = [(0, k) for k in range(tokens_a)] + [(1, k) for k in range(tokens_b)]
    x, y = ([src * n + k * m + part * h + i for src, k in sources for i in range(h)] for part in (0, 1))
    return builder.fadd(builder.shuffle_vector(a, b, _const(I32, x)), builder.shuffle_vector(a, b, _const(I32, y)))


def _folded_products(builder, pairs):
    """sum of a * b over the (a, b) vector pairs (W lanes each), folded to W/4 lanes: one multiply,
    then one fma per further quarter, instead of full-width products and the first two levels of
    the horizontal sums' adds."""
    lanes = pairs[0][0].type.count // 4
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VectorType(F32, lanes), [
        ir.VectorType(F32, lanes)] * 3), f"llvm.fma.v{lanes}f32") if "fma" in compile_features() else None
    acc = None
    for a, b in pairs:
        for q in range(0, a.type.count, lanes):
            part = _const(I32, list(range(q, q + lanes)))
            x, y = builder.shuffle_vector(a, a, part), builder.shuffle_vector(b, b, part)
            if acc is None:
                acc = builder.fmul(x, y)
            else:  # compiled without FMA (NUMBA_CPU_FEATURES), llvm.fma would be a libm call per lane
                acc = builder.call(fma, [x, y, acc]) if fma else builder.fadd(acc, builder.fmul(x, y))
    return acc


def _sums(builder, values):
    """The horizontal sums of float vectors of one width (one per token), reduced together: two
    vectors' halves are added into one vector (a tree per pair, then per pair of pairs), so four
    tokens' sums cost about the adds of one tree and a few shuffles, not four trees."""
    assert len(values) & (len(values) - 1) == 0, "pairs all the way up: a power of two of tokens"
    groups = [(v, [t], v.type.count) for t, v in enumerate(values)]  # (vector, its tokens, partials each)
    while len(groups) > 1:
        (a, ta, m), (b, tb, _) = groups[0], groups[1]
        groups = groups[2:] + [(_halves(builder, a, b, len(ta), len(tb), m), ta + tb, m // 2)]
    v, order, m = groups[0]
    while m > 1:  # within the last vector: its upper half's partials onto the lower half's
        v, m = _halves(builder, v, v, len(order), 0, m), m // 2
    return [builder.extract_element(v, ir.Constant(I32, order.index(t))) for t in range(len(values))]


def _emit_q4_chunk(context, builder, v, at, W, tt, has_min, vnni, masked):
    """IR for one chunk; see q4_chunk_dot. v, at: the operands and their types by field name
    (_fields). ``masked``: WHOLE, TAIL or EDGE; ``vnni``: vpdpbusd in place of pmaddubsw + add."""
    qs, q_off, plane_stride, d, m, d_off = (v[k] for k in WeightChunk._fields)
    xq, x_off, x_tstride, corr, dx, sxf, c_off, c_tstride = (v[k] for k in ActivationChunk._fields)
    nvalid = v["nvalid"]
    i64 = q_off.type
    vb = ir.VectorType(I8, W)            # W weight bytes: byte j of W blocks
    vh = ir.VectorType(I16, W // 2)      # pmaddubsw result
    pmaddubsw = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vh, [vb, vb]), _PMADDUBSW[W])
    mask = None
    if masked:
        lanes = _const(I32, list(range(W)))
        mask = builder.icmp_signed("<", lanes, _splat(builder, builder.trunc(nvalid, I32), W))

    def load(aryty, ary, offset, vt, align):
        if masked:
            return _load_lanes(context, builder, aryty, ary, offset, vt, mask, align, masked)
        return builder.load(_vec_ptr(context, builder, aryty, ary, offset, vt), align=align)

    lo_mask, hi_mask = pair_blocks(W)
    unpack_lo = _const(I32, [i for b in lo_mask for i in (b, W + b)])
    unpack_hi = _const(I32, [i for b in hi_mask for i in (b, W + b)])
    natural = [0] * W                    # acc1 ++ acc2 -> blocks in order
    for k, b in enumerate(lo_mask):
        natural[b] = k
    for k, b in enumerate(hi_mask):
        natural[b] = W // 2 + k
    fifteen, four = _const(I8, [15] * W), _const(I8, [4] * W)

    zero = ir.Constant(vh, [0] * (W // 2))
    acc1, acc2 = [zero] * tt, [zero] * tt
    vd = ir.VectorType(I32, W // 4)
    dots = [[ir.Constant(vd, [0] * (W // 4))] * 4 for _ in range(tt)]   # VNNI: int32 per block
    vpdpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vd, [vd, vd, vd]),
                                              _VPDPBUSD[W]) if vnni else None
    previous = None

    def x_at(t, offset, vt):  # token t's activation vector at offset bytes into the chunk
        xo = builder.add(x_off, builder.add(builder.mul(x_tstride, ir.Constant(i64, t)), ir.Constant(i64, offset)))
        return builder.load(_vec_ptr(context, builder, at["xq"], xq, xo, vt), align=1)

    for j in range(16):
        offset = builder.add(q_off, builder.mul(plane_stride, ir.Constant(i64, j)))
        _prefetch(builder, _vec_ptr(context, builder, at["qs"], qs, offset, vb))
        w = load(at["qs"], qs, offset, vb, 1)
        lo = builder.and_(w, fifteen)
        hi = builder.and_(builder.lshr(w, four), fifteen)
        p1 = builder.shuffle_vector(lo, hi, unpack_lo)
        p2 = builder.shuffle_vector(lo, hi, unpack_hi)
        if not vnni:
            for t in range(tt):
                acc1[t] = builder.add(acc1[t], builder.call(pmaddubsw, [p1, x_at(t, 2 * W * j, vb)]))
                acc2[t] = builder.add(acc2[t], builder.call(pmaddubsw, [p2, x_at(t, 2 * W * j + W, vb)]))
        elif j % 2 == 0:
            previous = (p1, p2)
        else:  # planes j-1 and j: four int32 registers of (q[j-1], q[j+15], q[j], q[j+16]) per block
            regs = [builder.bitcast(builder.shuffle_vector(previous[h], now, _word_interleave(W, part)), vd)
                    for h, now in enumerate((p1, p2)) for part in (0, 1)]
            for t in range(tt):
                for r in range(4):
                    dots[t][r] = builder.call(vpdpbusd, [dots[t][r], regs[r], x_at(t, 2 * W * (j - 1) + r * W, vd)])

    vf = ir.VectorType(F32, W)
    vi = ir.VectorType(I16, W)
    def scales(aryty, ary):  # float16 bits (q4_0, q4_1) or float32 (q4_k's decoded block scales)
        if aryty.dtype == types.float32:
            return load(aryty, ary, d_off, vf, 4)
        return builder.fpext(builder.bitcast(load(aryty, ary, d_off, vi, 2), ir.VectorType(F16, W)), vf)

    if isinstance(at["m"], types.Array) and at["m"].dtype == types.uint8:  # q4_k: decode the chunk's super-blocks
        dw, mw = _q4_k_chunk_scales(context, builder, at["d"], d, at["m"], m, d_off, nvalid, W, masked)
    else:
        dw = scales(at["d"], d)
        mw = scales(at["m"], m) if has_min else None
    if has_min:
        # x = d*q + m = d*(q-8) + (m + 8d)
        mw = builder.fadd(mw, builder.fmul(dw, _const(F32, [8.0] * W)))
    products = []
    for t in range(tt):
        co = builder.add(c_off, builder.mul(c_tstride, ir.Constant(i64, t)))
        correction = builder.load(_vec_ptr(context, builder, at["corr"], corr, co, vi), align=2)
        if vnni:  # exact int32 sums
            centered = builder.sub(_block_totals(builder, dots[t], W, vnni_blocks(W)),
                                   builder.sext(correction, ir.VectorType(I32, W)))
        else:  # int16 sums, wrapping: the difference is exact
            centered = builder.sub(builder.shuffle_vector(acc1[t], acc2[t], _const(I32, natural)), correction)
        scale = builder.fmul(dw, builder.load(_vec_ptr(context, builder, at["dx"], dx, co, vf), align=4))
        pairs = [(builder.sitofp(centered, vf), scale)]
        if has_min:
            pairs.append((mw, builder.load(_vec_ptr(context, builder, at["sxf"], sxf, co, vf), align=4)))
        products.append(_folded_products(builder, pairs))
    _add_to_outputs(context, builder, v, at, products)


def _q4_k_chunk_scales(context, builder, d_type, d, scales_type, scales, sb0, nvalid, W, masked):
    """The chunk's W block scales and offsets (x = dw * q + mw) decoded from its W/8 whole q4_k
    super-blocks, starting at super-block sb0: d (nsb, 2) float16 bits, scales (nsb, 12) bytes
    in ggml's 6-bit packing (quant.unpack_scales). Constant shuffles spread each super-block's
    bytes over its 8 lanes; products in float32, as the reference computes them."""
    n = W // 8                                            # super-blocks in a full chunk
    i64 = sb0.type
    nsb_valid = builder.trunc(builder.lshr(nvalid, ir.Constant(nvalid.type, 3)), I32) if masked else None

    def lanes_below(count, per, limit):                   # mask of `count` lanes: lane < per * nsb_valid
        return builder.icmp_signed("<", _const(I32, list(range(count))),
                                   _splat(builder, builder.mul(nsb_valid, ir.Constant(I32, per)), count)) \
            if masked else _const(I1, [int(i < limit) for i in range(count)])

    vpair = ir.VectorType(I16, 2 * n)
    if masked:
        pairs = _load_lanes(context, builder, d_type, d, builder.mul(sb0, ir.Constant(i64, 2)), vpair,
                            lanes_below(2 * n, 2, 2 * n), 2, masked)
    else:
        pairs = builder.load(_vec_ptr(context, builder, d_type, d, builder.mul(sb0, ir.Constant(i64, 2)), vpair),
                             align=2)
    pairs = builder.fpext(builder.bitcast(pairs, ir.VectorType(F16, 2 * n)), ir.VectorType(F32, 2 * n))
    d0 = builder.shuffle_vector(pairs, pairs, _const(I32, [2 * (i // 8) for i in range(W)]))
    d1 = builder.shuffle_vector(pairs, pairs, _const(I32, [2 * (i // 8) + 1 for i in range(W)]))
    # the chunk's 12 * n scale bytes: a plain load of exactly those for a full chunk (AVX2 has no
    # byte-masked load: LLVM would emit one branch per byte), the valid lanes for the row's last chunk
    start = builder.mul(sb0, ir.Constant(i64, 12))
    if masked:
        raw = _load_lanes(context, builder, scales_type, scales, start, ir.VectorType(I8, 2 * W),
                          lanes_below(2 * W, 12, 12 * n), 1, masked)
    else:
        raw = builder.load(_vec_ptr(context, builder, scales_type, scales, start, ir.VectorType(I8, 12 * n)), align=1)

    def gather(offset):                                   # lane i <- byte 12 * (i // 8) + offset(i % 8)
        return builder.shuffle_vector(raw, raw, _const(I32, [12 * (i // 8) + offset(i % 8) for i in range(W)]))

    low = _const(I1, [int(i % 8 < 4) for i in range(W)])
    c63, c15, c6, c4 = (_const(I8, [v] * W) for v in (63, 15, 6, 4))
    a, b = gather(lambda j: j % 4), gather(lambda j: 4 + j % 4)   # bytes 0-3 and 4-7 of each super-block
    c = gather(lambda j: 8 + j % 4)                               # bytes 8-11
    high_bits = lambda v: builder.shl(builder.lshr(v, c6), c4)    # noqa: E731  (top 2 bits, moved to bits 4-5)
    sc = builder.select(low, builder.and_(a, c63), builder.or_(builder.and_(c, c15), high_bits(a)))
    mn = builder.select(low, builder.and_(b, c63), builder.or_(builder.lshr(c, c4), high_bits(b)))
    vf = ir.VectorType(F32, W)
    dw = builder.fmul(d0, builder.uitofp(sc, vf))
    mw = builder.fneg(builder.fmul(d1, builder.uitofp(mn, vf)))
    return dw, mw


def _word_pairs(builder, a, b, W):
    """Two vectors of W int8 (planes a and b of W blocks) -> 4 vectors of W/4 (a, b) int16 pairs,
    the pmaddwd operands: sign-extended, split in halves, unpacklo/unpackhi within 128-bit lanes
    (the blocks of each pair lane: q8_pair_blocks)."""
    half = W // 2
    unpack = [_const(I32, [i for lane in range(half // 8) for k in range(4) for i in
                           (8 * lane + 4 * part + k, half + 8 * lane + 4 * part + k)]) for part in (0, 1)]
    first, second = _const(I32, list(range(half))), _const(I32, list(range(half, W)))
    wide = []
    for v in (a, b):
        w16 = builder.sext(v, ir.VectorType(I16, W))
        wide.append([builder.shuffle_vector(w16, w16, first), builder.shuffle_vector(w16, w16, second)])
    return [builder.shuffle_vector(wide[0][hf], wide[1][hf], unpack[part]) for hf in (0, 1) for part in (0, 1)]


def _pair_sums(context, builder, v, at, W, tt, acc, pair, regs, vnni):
    """acc[t][r] += pmaddwd(regs[r], the activation's int16 pairs of plane pair ``pair``), t < tt
    (``vnni``: one vpdpwssd)."""
    half = W // 2
    vw, vd = ir.VectorType(I16, half), ir.VectorType(I32, W // 4)
    if vnni:
        vpdpwssd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vd, [vd, vd, vd]), _VPDPWSSD[W])
    else:
        pmaddwd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vd, [vw, vw]), _PMADDWD[W])
    i64 = v["x_off"].type
    for t in range(tt):
        xo = builder.add(v["x_off"], builder.add(builder.mul(v["x_tstride"], ir.Constant(i64, t)),
                                                 ir.Constant(i64, 2 * W * pair)))
        for r in range(4):
            xp = _vec_ptr(context, builder, at["xq"], v["xq"], builder.add(xo, ir.Constant(i64, r * half)), vw)
            if vnni:
                acc[t][r] = builder.call(vpdpwssd, [acc[t][r], builder.bitcast(regs[r], vd),
                                                    builder.bitcast(builder.load(xp, align=2), vd)])
            else:
                acc[t][r] = builder.add(acc[t][r], builder.call(pmaddwd, [regs[r], builder.load(xp, align=2)]))


def _block_totals(builder, acc, W, blocks):
    """4 int32 accumulators, lane k of register r summing block blocks[r][k] (q8_pair_blocks,
    vnni_blocks) -> W int32 per-block sums, blocks in order."""
    order = [b for reg in blocks for b in reg]
    lo = builder.shuffle_vector(acc[0], acc[1], _const(I32, list(range(W // 2))))
    hi = builder.shuffle_vector(acc[2], acc[3], _const(I32, list(range(W // 2))))
    return builder.shuffle_vector(lo, hi, _const(I32, [order.index(b) for b in range(W)]))


def _add_to_outputs(context, builder, v, at, values):
    """out.flat[o_off + t * o_tstride] += the horizontal sum of float vector values[t], each t."""
    i64 = v["o_off"].type
    data = context.make_array(at["out"])(context, builder, v["out"]).data
    for t, total in enumerate(_sums(builder, values)):
        optr = builder.gep(data, [builder.add(v["o_off"], builder.mul(v["o_tstride"], ir.Constant(i64, t)))],
                           inbounds=True)
        builder.store(builder.fadd(builder.load(optr), total), optr)


def _chunk_loader(context, builder, v, at, W, masked):
    """load(field, offset, vector type, align): a vector of a chunk operand, masked to the row's blocks."""
    mask = None
    if masked:
        nvalid = _splat(builder, builder.trunc(v["nvalid"], I32), W)
        mask = builder.icmp_signed("<", _const(I32, list(range(W))), nvalid)

    def load(name, offset, vt, align):
        if masked:
            return _load_lanes(context, builder, at[name], v[name], offset, vt, mask, align, masked)
        return builder.load(_vec_ptr(context, builder, at[name], v[name], offset, vt), align=align)

    return load


def _activation_scales(context, builder, v, at, t, W):
    i64 = v["c_off"].type
    co = builder.add(v["c_off"], builder.mul(v["c_tstride"], ir.Constant(i64, t)))
    return builder.load(_vec_ptr(context, builder, at["dx"], v["dx"], co, ir.VectorType(F32, W)), align=4)


def _plane(context, builder, v, at, load, W, j):
    """Plane j of the weight chunk (W bytes, one per block), its next bytes prefetched."""
    vb = ir.VectorType(I8, W)
    offset = builder.add(v["q_off"], builder.mul(v["plane_stride"], ir.Constant(v["q_off"].type, j)))
    _prefetch(builder, _vec_ptr(context, builder, at["qs"], v["qs"], offset, vb))
    return load("qs", offset, vb, 1)


def _emit_q8_chunk(context, builder, v, at, W, tt, vnni, masked):
    """IR for one q8_0 chunk; see q8_chunk_dot (v, at: as for _emit_q4_chunk)."""
    load = _chunk_loader(context, builder, v, at, W, masked)
    zero = ir.Constant(ir.VectorType(I32, W // 4), [0] * (W // 4))
    acc = [[zero] * 4 for _ in range(tt)]
    for j in range(16):
        regs = _word_pairs(builder, _plane(context, builder, v, at, load, W, j),
                           _plane(context, builder, v, at, load, W, j + 16), W)
        _pair_sums(context, builder, v, at, W, tt, acc, j, regs, vnni)
    vf = ir.VectorType(F32, W)
    dw = builder.fpext(builder.bitcast(load("d", v["d_off"], ir.VectorType(I16, W), 2), ir.VectorType(F16, W)), vf)
    products = []
    for t in range(tt):
        total = builder.sitofp(_block_totals(builder, acc[t], W, q8_pair_blocks(W)), vf)
        scale = builder.fmul(dw, _activation_scales(context, builder, v, at, t, W))
        products.append(_folded_products(builder, [(total, scale)]))
    _add_to_outputs(context, builder, v, at, products)


# q6_k's plane pairs, one half-block each: pair p multiplies weights (Q6_FIRST[p], Q6_SECOND[p]),
# p < 8 the first half of every block (j, j + 8), p >= 8 the second (j + 16, j + 24).
Q6_FIRST = list(range(8)) + list(range(16, 24))
Q6_SECOND = list(range(8, 16)) + list(range(24, 32))


def _emit_q6_chunk(context, builder, v, at, W, tt, vnni, masked):
    """IR for one q6_k chunk; see q6_chunk_dot. Per j < 8, three planes give weights j, j+8,
    j+16, j+24 of W blocks: low nibbles from planes j and j+8, top bit pairs from plane 16+j."""
    load = _chunk_loader(context, builder, v, at, W, masked)
    c = {k: _const(I8, [k] * W) for k in (2, 3, 4, 12, 15, 32, 48)}
    zero = ir.Constant(ir.VectorType(I32, W // 4), [0] * (W // 4))
    acc = [[[zero] * 4 for _ in range(tt)] for _half in (0, 1)]
    for j in range(8):
        la, lb, top = (_plane(context, builder, v, at, load, W, p) for p in (j, j + 8, 16 + j))
        low_a, low_b = builder.and_(la, c[15]), builder.and_(lb, c[15])
        high_a, high_b = builder.lshr(la, c[4]), builder.lshr(lb, c[4])
        q = [builder.or_(low_a, builder.shl(builder.and_(top, c[3]), c[4])),          # weight j
             builder.or_(low_b, builder.shl(builder.and_(top, c[12]), c[2])),         # j + 8
             builder.or_(high_a, builder.and_(top, c[48])),                           # j + 16
             builder.or_(high_b, builder.and_(builder.lshr(top, c[2]), c[48]))]       # j + 24
        k = [builder.sub(x, c[32]) for x in q]                                        # -32..31
        _pair_sums(context, builder, v, at, W, tt, acc[0], j, _word_pairs(builder, k[0], k[1], W), vnni)
        _pair_sums(context, builder, v, at, W, tt, acc[1], 8 + j, _word_pairs(builder, k[2], k[3], W), vnni)
    vf = ir.VectorType(F32, W)
    if at["m"].dtype == types.int8:  # whole super-blocks: decode their scales here
        step0, step1 = _q6_k_chunk_steps(context, builder, v, at, W, masked)
    else:
        step0, step1 = (load(name, v["d_off"], vf, 4) for name in ("d", "m"))
    products = []
    for t in range(tt):
        first = builder.fmul(builder.sitofp(_block_totals(builder, acc[0][t], W, q8_pair_blocks(W)), vf), step0)
        second = builder.fmul(builder.sitofp(_block_totals(builder, acc[1][t], W, q8_pair_blocks(W)), vf), step1)
        products.append(builder.fmul(builder.fadd(first, second), _activation_scales(context, builder, v, at, t, W)))
    _add_to_outputs(context, builder, v, at, products)


def _chunk_codegen(emit, spans):
    """The chunk intrinsics' codegen: unbundle the operands, then emit the chunk three times
    (``emit(context, builder, v, at, masked=)``): WHOLE for a full chunk; for the row's last,
    partial one TAIL where every vector it loads lies inside its array, EDGE otherwise (one check
    per chunk instead of one per load: those branches made a partial chunk cost ~3x a full one).
    ``spans(builder, v, at)``: (field, flat offset, elements) of the farthest vector the chunk
    loads from each of its arrays."""
    def codegen(context, builder, signature, args):
        v, at = _fields(context, builder, signature, args)
        full = builder.icmp_signed(">=", v["nvalid"], ir.Constant(v["nvalid"].type, _width_of(signature)))
        with builder.if_else(full) as (whole, partial):
            with whole:
                emit(context, builder, v, at, masked=WHOLE)
            with partial:
                inside = ir.Constant(I1, 1)
                for name, offset, count in spans(builder, v, at):
                    end = builder.add(offset, ir.Constant(offset.type, count))
                    nitems = context.make_array(at[name])(context, builder, v[name]).nitems
                    inside = builder.and_(inside, builder.icmp_signed("<=", end, nitems))
                with builder.if_else(inside) as (tail, edge):
                    with tail:
                        emit(context, builder, v, at, masked=TAIL)
                    with edge:
                        emit(context, builder, v, at, masked=EDGE)
        return context.get_dummy_value()

    return codegen


def _weight_spans(planes, W, super_block_bytes=None):
    """spans() for _chunk_codegen: the chunk's last plane of ``planes``; its scales: per block (W
    elements from d_off of d and of m, where given), or, when m holds super-block scales
    (``super_block_bytes`` (d elements, m bytes) per super-block, d_off the first one), the 2W
    scale bytes and the d pairs _q4_k_chunk_scales / _q6_k_chunk_steps load."""
    def spans(builder, v, at):
        i64 = v["q_off"].type
        last = builder.add(v["q_off"], builder.mul(v["plane_stride"], ir.Constant(i64, planes - 1)))
        out = [("qs", last, W)]
        if super_block_bytes and isinstance(at["m"], types.Array) and at["m"].dtype in (types.uint8, types.int8):
            d_per, m_per = super_block_bytes
            out += [("d", builder.mul(v["d_off"], ir.Constant(i64, d_per)), d_per * (W // 8)),
                    ("m", builder.mul(v["d_off"], ir.Constant(i64, m_per)), 2 * W)]
        else:
            out += [(name, v["d_off"], W) for name in ("d", "m") if isinstance(at[name], types.Array)]
        return out

    return spans


def _chunk_signature(weight, act, dest, nvalid, width, tt, vnni, instructions):
    """A chunk intrinsic's typing: (signature, W, TT, VNNI) once width, tt and vnni are literals
    (None, 0, 0, False until then, which makes Numba retry with literals); a width without an
    instruction is refused, and so is vnni where this CPU has no VNNI at that width."""
    if not all(isinstance(a, types.IntegerLiteral) for a in (width, tt, vnni)):
        return None, 0, 0, False
    W, TT, VNNI = width.literal_value, tt.literal_value, bool(vnni.literal_value)
    if W not in instructions:
        raise ValueError(f"unsupported SIMD width {W}")
    if VNNI and not has_vnni(W):
        raise ValueError(f"no AVX-512 VNNI at SIMD width {W} on this CPU")
    return types.void(weight, act, dest, nvalid, width, tt, vnni), W, TT, VNNI


def _width_of(signature) -> int:
    return signature.args[4].literal_value  # (weight, act, dest, nvalid, width, tt, vnni)


@intrinsic
def q8_chunk_dot(typingctx, weight, act, dest, nvalid, width, tt, vnni):
    """As q4_chunk_dot, for q8_0 weights (32 int8 planes; weight.m None): int16 products summed
    in pairs by pmaddwd into int32 per block (exact), then one float pass. act.xq: int16 from
    quantize_for_simd_q8, plane pair j of a chunk at 2*width*j, in q8_pair_blocks order
    (act.corr, act.sxf None)."""
    sig, W, TT, VNNI = _chunk_signature(weight, act, dest, nvalid, width, tt, vnni, _PMADDWD)
    return sig and (sig, _chunk_codegen(lambda *a, masked: _emit_q8_chunk(*a, W, TT, VNNI, masked=masked),
                                        _weight_spans(32, W)))


def _q6_k_chunk_steps(context, builder, v, at, W, masked):
    """The chunk's half-block steps (d * sc of each block's first and second 16 weights, W
    lanes each) from its W/8 whole q6_k super-blocks from d_off: d (nsb, 1) float16 bits, scales
    (nsb, 16) int8. Products in float32, as the reference computes them."""
    n, sb0 = W // 8, v["d_off"]
    i64 = sb0.type
    nsb_valid = builder.trunc(builder.lshr(v["nvalid"], ir.Constant(i64, 3)), I32) if masked else None

    def lanes_below(count, per):
        return builder.icmp_signed("<", _const(I32, list(range(count))),
                                   _splat(builder, builder.mul(nsb_valid, ir.Constant(I32, per)), count))

    def load(name, offset, vt, align, per):
        if masked:
            return _load_lanes(context, builder, at[name], v[name], offset, vt, lanes_below(vt.count, per), align,
                               masked)
        return builder.load(_vec_ptr(context, builder, at[name], v[name], offset, vt), align=align)

    d = load("d", sb0, ir.VectorType(I16, n), 2, 1)
    d = builder.fpext(builder.bitcast(d, ir.VectorType(F16, n)), ir.VectorType(F32, n))
    d = builder.shuffle_vector(d, d, _const(I32, [i // 8 for i in range(W)]))
    raw = load("m", builder.mul(sb0, ir.Constant(i64, 16)), ir.VectorType(I8, 2 * W), 1, 16)
    vf = ir.VectorType(F32, W)
    halves = [builder.shuffle_vector(raw, raw, _const(I32, [2 * i + h for i in range(W)])) for h in (0, 1)]
    return [builder.fmul(d, builder.sitofp(codes, vf)) for codes in halves]


@intrinsic
def q6_chunk_dot(typingctx, weight, act, dest, nvalid, width, tt, vnni):
    """As q8_chunk_dot, for q6_k weights (24 planes, quant.py): weight.d and weight.m are either
    the row's float32 half-block steps (d * sc of each block's first and second 16 weights), d_off
    the chunk's first block, or, for a chunk of whole super-blocks, the (nsb, 1) float16 bits and
    (nsb, 16) int8 scales, d_off its first super-block (decoded in registers); act.xq: int16
    from quantize_for_simd_q8 with the pairs Q6_FIRST / Q6_SECOND. Levels q - 32 times int16
    activations summed by pmaddwd into int32 per half-block (exact), then one float pass."""
    sig, W, TT, VNNI = _chunk_signature(weight, act, dest, nvalid, width, tt, vnni, _PMADDWD)
    return sig and (sig, _chunk_codegen(lambda *a, masked: _emit_q6_chunk(*a, W, TT, VNNI, masked=masked),
                                        _weight_spans(24, W, (1, 16))))


@intrinsic
def q4_chunk_dot(typingctx, weight, act, dest, nvalid, width, tt, vnni):
    """dest.out[o_off + t*o_tstride] += sum over the chunk's blocks of one q4 row . token t, t < tt.

    weight  a WeightChunk: uint8 quants; d, m uint16 (float16 bits) scales and q4_1 minimums
            (m None: q4_0); or float32 ones (q4_k's block scales, decoded per row); or for q4_k
            whose chunk is whole super-blocks, d (nsb, 2) uint16 and m the (nsb, 12) uint8
            6-bit scales, d_off the chunk's first super-block (decoded in vector registers,
            _q4_k_chunk_scales)
    act     an ActivationChunk: int8 values from quantize_for_simd in the layout of ``vnni``
            (q4_activation_layout); corr int16 8*sum(x) per block, dx float32 activation
            scale, sxf float32 dx*sum(x)
    dest    an OutputSlot
    nvalid  blocks of this chunk inside the row (< width only for the row's last chunk)
    width, tt, vnni: compile-time constants (64 or 32 blocks; tokens per call; 1: vpdpbusd)
    """
    sig, W, TT, VNNI = _chunk_signature(weight, act, dest, nvalid, width, tt, vnni, _PMADDUBSW)
    HAS_MIN = not isinstance(weight.types[weight.fields.index("m")], types.NoneType)
    return sig and (sig, _chunk_codegen(lambda *a, masked: _emit_q4_chunk(*a, W, TT, HAS_MIN, VNNI, masked=masked),
                                        _weight_spans(16, W, (2, 12))))


@intrinsic
def q4_k_scales_chunk(typingctx, d, scales, sb0, nvalid, ds, ms, off, width):
    """ds[off:off + nvalid], ms[...] (float32) = the block grids (x = ds q + ms) of ``nvalid``
    blocks (a multiple of 8, at most width) of whole q4_k super-blocks from sb0: the decoding
    the chunk kernel does in registers (_q4_k_chunk_scales), stored for the prefill tiles."""
    if not isinstance(width, types.IntegerLiteral):
        return None
    W = width.literal_value
    sig = types.void(d, scales, sb0, nvalid, ds, ms, off, width)

    def codegen(context, builder, signature, args):
        args = list(args)
        for i in (2, 3, 6):
            args[i] = context.cast(builder, args[i], signature.args[i], types.int64)
        d_, sc_, sb0_, nvalid_, ds_, ms_, off_ = args[:7]
        at = signature.args
        full = builder.icmp_signed(">=", nvalid_, ir.Constant(nvalid_.type, W))
        vf = ir.VectorType(F32, W)
        with builder.if_else(full) as (whole, tail):
            for masked, block in ((WHOLE, whole), (EDGE, tail)):  # once per row: EDGE's checks cost little
                with block:
                    dw, mw = _q4_k_chunk_scales(context, builder, at[0], d_, at[1], sc_, sb0_, nvalid_, W, masked)
                    for value, aryty, ary in ((dw, at[4], ds_), (mw, at[5], ms_)):
                        ptr = _vec_ptr(context, builder, aryty, ary, off_, vf)
                        if masked:
                            mask = builder.icmp_signed("<", _const(I32, list(range(W))),
                                                       _splat(builder, builder.trunc(nvalid_, I32), W))
                            _masked_store(builder, value, ptr, mask, 4)
                        else:
                            builder.store(value, ptr, align=4)
        return context.get_dummy_value()

    return sig, codegen
