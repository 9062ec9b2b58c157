"""Block quantization formats: the NumPy reference encoders and decoders.

A quantized matrix W (rows, cols) is cut into blocks of 32 consecutive weights along
each row. Rows whose length is not a multiple of 32 are zero-padded to the next
multiple: the padding decodes to exact zeros, so a dot product with a zero-padded
activation is unchanged.

In-memory (and in-file) layout, chosen for the kernels rather than copied from ggml:
every component is its own contiguous array ("part"), and the quant bytes are stored
*plane-major*: ``qs[r, j, b]`` is byte ``j`` of block ``b`` of row ``r``, so the
innermost loop of a matrix-vector kernel runs contiguously across blocks.

    q4_0  d  float16 (rows, nb)         x = d * (q - 8),   q in 0..15
          qs uint8   (rows, 16, nb)     byte j holds q[j] (low nibble), q[j+16] (high)
    q4_1  d, m float16 (rows, nb)       x = d * q + m,     q in 0..15
          qs uint8   (rows, 16, nb)     as q4_0
    q8_0  d  float16 (rows, nb)         x = d * q,         q in -127..127
          qs int8    (rows, 32, nb)
    q4_k  d      float16 (nsb, 2)       super-block scale and minimum scale (ggml's d, dmin)
          scales uint8   (nsb, 12)      6-bit sub-block scales sc and minimums m, ggml's packing
          qs     uint8   (rows, 16, nb) as q4_0
                                        x = (d sc) q - (dmin m),  q in 0..15
    q6_k  d      float16 (nsb, 1)       super-block scale
          scales int8    (nsb, 16)      a scale per 16 weights: block k's halves are 2k, 2k+1
          qs     uint8   (rows, 24, nb) bytes 0-15: the low 4 bits of q[j], q[j+16] as q4_0;
                                        bytes 16-23: byte 16+j the top 2 bits of q[j], q[j+8],
                                        q[j+16], q[j+24] (bits 0-1, 2-3, 4-5, 6-7)
                                        x = (d sc) (q - 32),  q in 0..63
    f16   w  float16 (rows, cols)
    f32   w  float32 (...)              also every 1-D tensor (norms, biases)

q4_k (ggml's Q4_K in values) groups every 8 consecutive blocks of the matrix, in row-major
order, into a super-block whose two float16 scales are shared and whose per-block scale and
minimum are 6-bit integers: 4.5 bits per weight. The grouping runs across row ends, so rows
of 64 or 172 weights get super-blocks too (ggml's Q4_K needs rows of a multiple of 256; for
those, tinyllm's super-blocks are exactly ggml's and the bytes convert either way). The
super-block holding block b of row r is g // 8, g = r * nb + b, and it is its (g % 8)-th.
q6_k (ggml's Q6_K in values: 6.5625 bits per weight) groups blocks into super-blocks the same
way, with one float16 scale per super-block and a signed 8-bit scale per half-block of 16.

The q4_0/q4_1/q8_0 encoders are bit-exact with ggml's reference quantizers (as in the `gguf`
package); q4_k's and q6_k's here round to nearest on each block's range, the starting point of
quantizer.py's search (what converters use). ``to_ggml_blocks``/``from_ggml_blocks`` convert to
and from ggml's interleaved blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK = 32  # weights per block
SUPER = 8  # blocks per q4_k super-block (256 weights)

# Bytes per weight, for sizes and bandwidth figures.
BITS_PER_WEIGHT = {"q4_0": 4.5, "q4_1": 5.0, "q4_k": 4.5, "q6_k": 6.5625, "q8_0": 8.5, "f16": 16.0, "f32": 32.0}
QUANT_FORMATS = ("q4_0", "q4_1", "q4_k", "q6_k", "q8_0")
K_FORMATS = ("q4_k", "q6_k")  # super-blocks of 8 blocks, grouped in row-major order across row ends
FORMATS = QUANT_FORMATS + ("f16", "f32")
VECTOR_ALIGN = 64  # bytes: where the SIMD kernels' arrays start (the file format aligns tensors so too)


def planes(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``a`` starting at a VECTOR_ALIGN-byte address. The SIMD kernels
    load the planes in whole vectors; NumPy's 16-byte alignment splits most AVX-512 loads over
    two cache lines (Zen 5, 5632x2048 q4_0 at 128 tokens: 3.9 ms aligned, 4.6 ms at 32 mod 64)."""
    buf = np.empty(a.nbytes + VECTOR_ALIGN, np.uint8)
    start = -buf.ctypes.data % VECTOR_ALIGN
    out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


@dataclass
class QTensor:
    """A weight matrix in one of FORMATS: logical shape plus its named parts."""

    format: str
    shape: tuple  # logical shape, e.g. (rows, cols)
    parts: dict  # part name -> np.ndarray (may be np.memmap)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values())

    def dequantize(self) -> np.ndarray:
        return dequantize(self)

    def take_rows(self, rows) -> "QTensor":
        """The matrix of the selected rows (an index array, or a slice: then views). q4_k and q6_k
        need rows of whole super-blocks (a multiple of 256 weights, as every GGUF K-quant tensor has)."""
        def take(v, per_row=1):
            v = v.reshape((self.shape[0], -1) + v.shape[1:]) if per_row != 1 else v
            v = v[rows] if isinstance(rows, slice) else np.ascontiguousarray(v[rows])
            return v.reshape((-1,) + v.shape[2:]) if per_row != 1 else v
        if self.format not in K_FORMATS:
            parts = {k: take(v) for k, v in self.parts.items()}
        elif n_blocks(self.shape[1]) % SUPER:
            raise ValueError(f"{self.format} rows of {self.shape[1]} weights share super-blocks; "
                             "rows cannot be taken apart")
        else:
            parts = {k: take(v, per_row=n_blocks(self.shape[1]) // SUPER if k != "qs" else 1)
                     for k, v in self.parts.items()}
        n = parts["qs" if "qs" in parts else "w"].shape[0]
        return QTensor(self.format, (n,) + tuple(self.shape[1:]), parts)

    def dequantize_rows(self, rows) -> np.ndarray:
        """Decode only the selected rows (an index array or slice): (n, cols) float32."""
        if self.format == "q4_k":
            rows = np.arange(self.shape[0])[rows]
            scale, offset = q4_k_block_scales(self.parts, rows, self.shape[1])
            q = _unpack_nibbles(np.asarray(self.parts["qs"])[rows]).astype(np.float32)
            return (scale[..., None] * q - offset[..., None]).reshape(len(rows), -1)[:, :self.shape[1]]
        if self.format == "q6_k":
            rows = np.arange(self.shape[0])[rows]
            scale = q6_k_half_scales(self.parts, rows, self.shape[1])                 # (n, nb, 2)
            q = unpack_q6(np.asarray(self.parts["qs"])[rows]).astype(np.float32) - np.float32(32)
            x = scale[..., None] * q.reshape(q.shape[:2] + (2, QK // 2))
            return x.reshape(len(rows), -1)[:, :self.shape[1]]
        sub = {k: v[rows] for k, v in self.parts.items()}
        n = next(iter(sub.values())).shape[0]
        return dequantize(QTensor(self.format, (n,) + tuple(self.shape[1:]), sub))


def n_blocks(cols: int) -> int:
    return (cols + QK - 1) // QK


def n_super_blocks(rows: int, cols: int) -> int:
    return (rows * n_blocks(cols) + SUPER - 1) // SUPER


def part_layout(fmt: str, shape: tuple) -> dict:
    """The parts a tensor of ``fmt`` and logical ``shape`` consists of: name -> (dtype, shape).
    The one statement of the layout above: writers produce exactly this, and the loader
    refuses a file whose parts differ in any dtype or dimension (so no kernel indexes past one)."""
    if fmt == "f32":
        return {"w": (np.dtype("<f4"), tuple(shape))}
    if fmt == "f16":
        return {"w": (np.dtype("<f2"), tuple(shape))}
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"unknown quant format {fmt!r}; expected one of {FORMATS}")
    if len(shape) != 2:
        raise ValueError(f"{fmt} needs a 2-D matrix, got shape {tuple(shape)}")
    rows, cols = shape
    nb = n_blocks(cols)
    if fmt == "q4_k":
        nsb = n_super_blocks(rows, cols)
        return {"d": (np.dtype("<f2"), (nsb, 2)), "scales": (np.dtype("u1"), (nsb, 12)),
                "qs": (np.dtype("u1"), (rows, QK // 2, nb))}
    if fmt == "q6_k":
        nsb = n_super_blocks(rows, cols)
        return {"d": (np.dtype("<f2"), (nsb, 1)), "scales": (np.dtype("i1"), (nsb, 16)),
                "qs": (np.dtype("u1"), (rows, Q6_PLANES, nb))}
    scales = {name: (np.dtype("<f2"), (rows, nb)) for name in _GGML_HEAD[fmt]}
    qs = (np.dtype("i1"), (rows, QK, nb)) if fmt == "q8_0" else (np.dtype("u1"), (rows, QK // 2, nb))
    return {**scales, "qs": qs}


def _blocks(w: np.ndarray) -> np.ndarray:
    """(rows, cols) float -> (rows, nb, 32) float32, zero-padded."""
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    nb = n_blocks(cols)
    if cols != nb * QK:
        w = np.concatenate([w, np.zeros((rows, nb * QK - cols), np.float32)], axis=1)
    return w.reshape(rows, nb, QK)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf (ggml's Q8_0 uses it), not NumPy's round-half-to-even."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def _nibble_planes(q: np.ndarray) -> np.ndarray:
    """(rows, nb, 32) values 0..15 -> a (rows, 16, nb) view of bytes q[j] | q[j+16] << 4."""
    return (q[..., :16] | (q[..., 16:] << np.uint8(4))).transpose(0, 2, 1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(rows, nb, 32) values 0..15 -> (rows, 16, nb) bytes: q[j] | q[j+16] << 4."""
    return planes(_nibble_planes(q))


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """(rows, 16, nb) bytes -> (rows, nb, 32) values 0..15."""
    qs = qs.transpose(0, 2, 1)
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def quantize(w: np.ndarray, fmt: str) -> QTensor:
    """Encode a float matrix (or any array for f16/f32) into ``fmt``."""
    w = np.asarray(w)
    if fmt == "f32":
        return QTensor(fmt, w.shape, {"w": np.ascontiguousarray(w, dtype=np.float32)})
    if fmt == "f16":
        return QTensor(fmt, w.shape, {"w": np.ascontiguousarray(w, dtype=np.float16)})
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"unknown quant format {fmt!r}; expected one of {FORMATS}")
    if w.ndim != 2:
        raise ValueError(f"{fmt} needs a 2-D matrix, got shape {w.shape}")
    x = _blocks(w)  # (rows, nb, 32)
    if fmt == "q4_0":
        imax = np.abs(x).argmax(axis=-1)[..., None]
        signed_max = np.take_along_axis(x, imax, axis=-1)  # keeps its sign
        d = signed_max / np.float32(-8)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
        q = np.trunc(x * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15)
        return QTensor(fmt, w.shape, {"d": d[..., 0].astype(np.float16), "qs": _pack_nibbles(q)})
    if fmt == "q4_1":
        lo = x.min(axis=-1, keepdims=True)
        hi = x.max(axis=-1, keepdims=True)
        d = (hi - lo) / np.float32(15)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
        q = np.trunc((x - lo) * inv + np.float32(0.5)).astype(np.uint8).clip(0, 15)
        return QTensor(fmt, w.shape, {"d": d[..., 0].astype(np.float16),
                                      "m": lo[..., 0].astype(np.float16), "qs": _pack_nibbles(q)})
    if fmt == "q4_k":  # round to nearest on each block's range: quantizer.py searches for better fits
        lo = np.minimum(x.min(axis=-1), 0)
        return encode_q4_k(x, (x.max(axis=-1) - lo) / np.float32(15), -lo, w.shape)
    if fmt == "q6_k":  # each half-block's largest weight at -32, as ggml's first candidate
        halves = x.reshape(x.shape[:2] + (2, QK // 2))
        peak = np.take_along_axis(halves, np.abs(halves).argmax(axis=-1)[..., None], axis=-1)[..., 0]
        return encode_q6_k(x, peak / np.float32(-32), w.shape)
    # q8_0
    d = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = _round_half_away(x * inv).astype(np.int8)
    return QTensor(fmt, w.shape, {"d": d[..., 0].astype(np.float16),
                                  "qs": planes(q.transpose(0, 2, 1))})


def dequantize(t: QTensor) -> np.ndarray:
    """Decode to float32 with the logical shape (padding dropped)."""
    if t.format in ("f32", "f16"):
        return np.asarray(t.parts["w"], dtype=np.float32).reshape(t.shape)
    rows, cols = t.shape
    if t.format in K_FORMATS:
        return t.dequantize_rows(slice(None))
    d = np.asarray(t.parts["d"], dtype=np.float32)[..., None]  # (rows, nb, 1)
    if t.format == "q8_0":
        x = d * np.asarray(t.parts["qs"]).transpose(0, 2, 1).astype(np.float32)
    else:
        q = _unpack_nibbles(np.asarray(t.parts["qs"])).astype(np.float32)
        if t.format == "q4_0":
            x = d * (q - np.float32(8))
        elif t.format == "q4_1":
            x = d * q + np.asarray(t.parts["m"], dtype=np.float32)[..., None]
        else:
            raise ValueError(f"unknown quant format {t.format!r}")
    return x.reshape(rows, -1)[:, :cols]


# -- q4_k: super-blocks of 8 blocks with 6-bit block scales ----------------------------------

def unpack_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 12) uint8 -> sc, m (n, 8), ggml's 6-bit packing: bytes 0-3 hold sc[0:4] in their low
    6 bits, bytes 4-7 m[0:4]; bytes 8-11 hold the low 4 bits of sc[4:8] (low nibble) and m[4:8]
    (high nibble), whose top 2 bits are the top bits of bytes 0-3 and 4-7."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=1)
    m = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=1)
    return sc, m


def pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """sc, m (n, 8) integers 0..63 -> (n, 12) uint8; the inverse of unpack_scales."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    a = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    b = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    c = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.ascontiguousarray(np.concatenate([a, b, c], axis=1))


def q4_k_block_scales(parts: dict, rows: np.ndarray, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Each block's affine grid for the selected rows: scale, offset (len(rows), nb) float32 with
    x = scale * q - offset, computed in float32 as ggml does (d * sc, dmin * m)."""
    nb = n_blocks(cols)
    g = np.asarray(rows, np.int64)[:, None] * nb + np.arange(nb)     # flat block index
    sb, k = g // SUPER, g % SUPER
    sc, m = unpack_scales(np.asarray(parts["scales"]))
    d = np.asarray(parts["d"], dtype=np.float32)
    return d[sb, 0] * sc[sb, k].astype(np.float32), d[sb, 1] * m[sb, k].astype(np.float32)


def super_blocks(v: np.ndarray, nsb: int) -> np.ndarray:
    """Per-block arrays (rows, nb, ...) -> (nsb, 8, ...) in flat block order, zero-filled past the end."""
    flat = v.reshape((-1,) + v.shape[2:])
    out = np.zeros((nsb * SUPER,) + flat.shape[1:], flat.dtype)
    out[:len(flat)] = flat
    return out.reshape((nsb, SUPER) + flat.shape[1:])


def encode_q4_k(x: np.ndarray, scale: np.ndarray, minimum: np.ndarray, shape: tuple) -> QTensor:
    """Blocks x (rows, nb, 32) with a fitted grid per block, x ~ scale * q - minimum (both >= 0,
    (rows, nb)) -> q4_k. The fits are quantized to 6 bits against the super-block's largest
    (d = max scale / 63 in float16, likewise dmin), then every q is recomputed on the grid
    actually stored, as ggml's quantize_row_q4_K does."""
    rows, nb, _ = x.shape
    nsb = n_super_blocks(rows, shape[1])
    fits = [super_blocks(np.maximum(v, 0), nsb) for v in (scale, minimum)]      # (nsb, 8) each
    heads, codes = [], []
    for v in fits:
        top = (v.max(axis=1) / np.float32(63)).astype(np.float16)              # (nsb,)
        step = top.astype(np.float32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            code = np.where(step > 0, np.rint(v / step), 0)
        heads.append(top)
        codes.append(np.clip(code, 0, 63).astype(np.uint8))
    parts = {"d": np.ascontiguousarray(np.stack(heads, axis=1)), "scales": pack_scales(*codes)}
    grid_scale, grid_offset = q4_k_block_scales(parts, np.arange(rows), shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((x + grid_offset[..., None]) / grid_scale[..., None])
    q = np.where(grid_scale[..., None] > 0, q, 0)
    parts["qs"] = _pack_nibbles(np.clip(q, 0, 15).astype(np.uint8))
    return QTensor("q4_k", tuple(shape), parts)


# -- q6_k: super-blocks of 8 blocks with 8-bit half-block scales ------------------------------

Q6_PLANES = 24  # bytes per block of 32: 16 of low nibbles, 8 of top bit pairs


def pack_q6(q: np.ndarray) -> np.ndarray:
    """(rows, nb, 32) values 0..63 -> (rows, 24, nb) bytes, the q6_k layout above."""
    top = q >> np.uint8(4)                                                            # 0..3
    pairs = top[..., 0:8] | (top[..., 8:16] << 2) | (top[..., 16:24] << 4) | (top[..., 24:32] << 6)
    return planes(np.concatenate([_nibble_planes(q & np.uint8(15)), pairs.transpose(0, 2, 1)], axis=1))


def unpack_q6(qs: np.ndarray) -> np.ndarray:
    """(rows, 24, nb) bytes -> (rows, nb, 32) values 0..63; the inverse of pack_q6."""
    pairs = qs[:, 16:].transpose(0, 2, 1)                                             # (rows, nb, 8)
    top = np.concatenate([(pairs >> np.uint8(s)) & np.uint8(3) for s in (0, 2, 4, 6)], axis=-1)
    return _unpack_nibbles(qs[:, :16]) | (top << np.uint8(4))


def q6_k_half_scales(parts: dict, rows: np.ndarray, cols: int) -> np.ndarray:
    """The grid step of each half-block of the selected rows: (len(rows), nb, 2) float32,
    d * sc computed in float32 as ggml does."""
    nb = n_blocks(cols)
    g = np.asarray(rows, np.int64)[:, None] * nb + np.arange(nb)                      # flat block index
    sb, k = g // SUPER, g % SUPER
    half = 2 * k[..., None] + np.arange(2)
    d = np.asarray(parts["d"], dtype=np.float32)[:, 0]
    return d[sb][..., None] * np.asarray(parts["scales"])[sb[..., None], half].astype(np.float32)


def encode_q6_k(x: np.ndarray, step: np.ndarray, shape: tuple) -> QTensor:
    """Blocks x (rows, nb, 32) with a fitted grid step per half-block (rows, nb, 2), x ~ step * k,
    k in -32..31 -> q6_k. The steps are quantized to 8 bits against the super-block's largest
    (d = -that / 128 in float16, so it lands on -128 as in ggml's quantize_row_q6_K), then every
    k is recomputed on the grid actually stored."""
    rows, nb, _ = x.shape
    nsb = n_super_blocks(rows, shape[1])
    fit = super_blocks(step, nsb).reshape(nsb, 16)
    peak = np.take_along_axis(fit, np.abs(fit).argmax(axis=1)[:, None], axis=1)[:, 0]
    d = (peak / np.float32(-128)).astype(np.float16)
    unit = d.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(unit != 0, np.rint(fit / unit), 0)
    parts = {"d": np.ascontiguousarray(d[:, None]), "scales": np.clip(codes, -128, 127).astype(np.int8)}
    parts["qs"] = pack_q6(q6_k_levels(x, q6_k_half_scales(parts, np.arange(rows), shape[1])))
    return QTensor("q6_k", tuple(shape), parts)


def q6_k_levels(x: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Blocks x (rows, nb, 32) rounded on half-block grid steps (rows, nb, 2) -> q (rows, nb, 32) uint8, 0..63."""
    halves = x.reshape(x.shape[:2] + (2, QK // 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(grid[..., None] != 0, np.rint(halves / grid[..., None]), 0)
    return (np.clip(k, -32, 31) + 32).astype(np.uint8).reshape(x.shape)


# ggml interchange: blocks as ggml stores them, one row of bytes per block.
_GGML_HEAD = {"q4_0": ("d",), "q4_1": ("d", "m"), "q8_0": ("d",)}


def to_ggml_blocks(t: QTensor) -> np.ndarray:
    """QTensor -> (rows * nb, block_bytes) uint8, ggml's block layout."""
    rows = t.shape[0]
    if t.format == "q4_k":
        return _q4_k_to_ggml(t)
    if t.format == "q6_k":
        return _q6_k_to_ggml(t)
    heads = [np.asarray(t.parts[k]).reshape(rows, -1, 1).view(np.uint8) for k in _GGML_HEAD[t.format]]
    qs = np.asarray(t.parts["qs"]).transpose(0, 2, 1).view(np.uint8)  # (rows, nb, 16|32)
    return np.concatenate(heads + [qs], axis=-1).reshape(-1, sum(h.shape[-1] for h in heads) + qs.shape[-1])


def from_ggml_blocks(blocks: np.ndarray, fmt: str, shape: tuple) -> QTensor:
    """ggml's blocks (any shape of uint8 that flattens to whole blocks) -> QTensor."""
    rows, cols = shape
    nb = n_blocks(cols)
    if fmt == "q4_k":
        return _q4_k_from_ggml(blocks, shape)
    if fmt == "q6_k":
        return _q6_k_from_ggml(blocks, shape)
    heads = _GGML_HEAD[fmt]
    raw = np.asarray(blocks, dtype=np.uint8).reshape(rows, nb, -1)
    parts = {}
    for i, name in enumerate(heads):
        parts[name] = np.ascontiguousarray(raw[..., 2 * i:2 * i + 2]).view(np.float16)[..., 0]
    qs = raw[..., 2 * len(heads):]
    if fmt == "q8_0":
        qs = qs.view(np.int8)
    parts["qs"] = planes(qs.transpose(0, 2, 1))
    return QTensor(fmt, tuple(shape), parts)


# ggml's Q4_K block (144 bytes, 256 weights): d, dmin (float16), scales (12 bytes), then qs as
# 4 chunks of 32 bytes, chunk c holding blocks 2c (low nibbles) and 2c+1 (high), byte l = weight l.
Q4_K_BYTES = 144


def _ggml_super_blocks(cols: int) -> int:
    if cols % (SUPER * QK):
        raise ValueError(f"ggml's K-quants need rows of a multiple of {SUPER * QK} weights, not {cols}")
    return cols // (SUPER * QK)


def _q4_k_to_ggml(t: QTensor) -> np.ndarray:
    rows, cols = t.shape
    nsb = rows * _ggml_super_blocks(cols)
    q = _unpack_nibbles(np.asarray(t.parts["qs"])).reshape(nsb, 4, 2, QK)   # chunk, low/high, weight
    out = np.empty((nsb, Q4_K_BYTES), np.uint8)
    out[:, 0:4] = np.asarray(t.parts["d"]).view(np.uint8).reshape(nsb, 4)
    out[:, 4:16] = t.parts["scales"]
    out[:, 16:] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nsb, 128)
    return out


def _q4_k_from_ggml(blocks: np.ndarray, shape: tuple) -> QTensor:
    rows, cols = shape
    nsb = rows * _ggml_super_blocks(cols)
    raw = np.asarray(blocks, dtype=np.uint8).reshape(nsb, Q4_K_BYTES)
    chunks = raw[:, 16:].reshape(nsb, 4, 1, QK) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (chunks & 0x0F).reshape(rows, -1, QK)                                # (rows, nb, 32)
    return QTensor("q4_k", tuple(shape), {"d": np.ascontiguousarray(raw[:, 0:4]).view(np.float16),
                                          "scales": np.ascontiguousarray(raw[:, 4:16]),
                                          "qs": _pack_nibbles(q)})


# ggml's Q6_K block (210 bytes, 256 weights): ql (128 bytes), qh (64), scales (16 int8), d (float16).
# Weight i = 128 h + 32 s + l (half h, quarter s, l < 32): its low nibble is in ql[64 h + 32 (s % 2) + l]
# (low for s < 2, high for s >= 2), its top bits in qh[32 h + l] at bits 2s, 2s+1.
Q6_K_BYTES = 210


def _q6_k_to_ggml(t: QTensor) -> np.ndarray:
    rows, cols = t.shape
    nsb = rows * _ggml_super_blocks(cols)
    q = unpack_q6(np.asarray(t.parts["qs"])).reshape(nsb, 2, 4, QK)                # half, quarter, l
    low, top = q & 15, q >> 4
    out = np.empty((nsb, Q6_K_BYTES), np.uint8)
    out[:, :128] = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(nsb, 128)
    out[:, 128:192] = (top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)).reshape(nsb, 64)
    out[:, 192:208] = np.asarray(t.parts["scales"]).view(np.uint8)
    out[:, 208:] = np.asarray(t.parts["d"]).view(np.uint8).reshape(nsb, 2)
    return out


def _q6_k_from_ggml(blocks: np.ndarray, shape: tuple) -> QTensor:
    rows, cols = shape
    nsb = rows * _ggml_super_blocks(cols)
    raw = np.asarray(blocks, dtype=np.uint8).reshape(nsb, Q6_K_BYTES)
    ql = raw[:, :128].reshape(nsb, 2, 1, 2, QK)
    low = ((ql >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1, 1)) & 15).reshape(nsb, 2, 4, QK)
    qh = raw[:, 128:192].reshape(nsb, 2, 1, QK)
    top = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (low | (top << 4)).reshape(rows, -1, QK)                                   # (rows, nb, 32)
    return QTensor("q6_k", tuple(shape), {"d": np.ascontiguousarray(raw[:, 208:]).view(np.float16),
                                          "scales": np.ascontiguousarray(raw[:, 192:208]).view(np.int8),
                                          "qs": pack_q6(q)})
