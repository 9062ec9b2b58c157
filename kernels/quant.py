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
    f16   w  float16 (rows, cols)
    f32   w  float32 (...)              also every 1-D tensor (norms, biases)

Encoders are bit-exact with ggml's reference quantizers (as in the `gguf` package);
``to_ggml_blocks``/``from_ggml_blocks`` convert to and from ggml's interleaved blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK = 32  # weights per block

# Bytes per weight, for sizes and bandwidth figures.
BITS_PER_WEIGHT = {"q4_0": 4.5, "q4_1": 5.0, "q8_0": 8.5, "f16": 16.0, "f32": 32.0}
QUANT_FORMATS = ("q4_0", "q4_1", "q8_0")
FORMATS = QUANT_FORMATS + ("f16", "f32")


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

    def dequantize_rows(self, rows) -> np.ndarray:
        """Decode only the selected rows (an index array or slice): (n, cols) float32."""
        sub = {k: v[rows] for k, v in self.parts.items()}
        n = next(iter(sub.values())).shape[0]
        return dequantize(QTensor(self.format, (n,) + tuple(self.shape[1:]), sub))


def n_blocks(cols: int) -> int:
    return (cols + QK - 1) // QK


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


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(rows, nb, 32) values 0..15 -> (rows, 16, nb) bytes: q[j] | q[j+16] << 4."""
    packed = q[..., :16] | (q[..., 16:] << np.uint8(4))
    return np.ascontiguousarray(packed.transpose(0, 2, 1))


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
    # q8_0
    d = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = _round_half_away(x * inv).astype(np.int8)
    return QTensor(fmt, w.shape, {"d": d[..., 0].astype(np.float16),
                                  "qs": np.ascontiguousarray(q.transpose(0, 2, 1))})


def dequantize(t: QTensor) -> np.ndarray:
    """Decode to float32 with the logical shape (padding dropped)."""
    if t.format in ("f32", "f16"):
        return np.asarray(t.parts["w"], dtype=np.float32).reshape(t.shape)
    rows, cols = t.shape
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


# ggml interchange: blocks as ggml stores them, one row of bytes per block.
_GGML_HEAD = {"q4_0": ("d",), "q4_1": ("d", "m"), "q8_0": ("d",)}


def to_ggml_blocks(t: QTensor) -> np.ndarray:
    """QTensor -> (rows * nb, block_bytes) uint8, ggml's block layout."""
    rows = t.shape[0]
    heads = [np.asarray(t.parts[k]).reshape(rows, -1, 1).view(np.uint8) for k in _GGML_HEAD[t.format]]
    qs = np.asarray(t.parts["qs"]).transpose(0, 2, 1).view(np.uint8)  # (rows, nb, 16|32)
    return np.concatenate(heads + [qs], axis=-1).reshape(-1, sum(h.shape[-1] for h in heads) + qs.shape[-1])


def from_ggml_blocks(blocks: np.ndarray, fmt: str, shape: tuple) -> QTensor:
    """ggml's blocks (any shape of uint8 that flattens to whole blocks) -> QTensor."""
    rows, cols = shape
    nb = n_blocks(cols)
    heads = _GGML_HEAD[fmt]
    raw = np.asarray(blocks, dtype=np.uint8).reshape(rows, nb, -1)
    parts = {}
    for i, name in enumerate(heads):
        parts[name] = np.ascontiguousarray(raw[..., 2 * i:2 * i + 2]).view(np.float16)[..., 0]
    qs = raw[..., 2 * len(heads):]
    if fmt == "q8_0":
        qs = qs.view(np.int8)
    parts["qs"] = np.ascontiguousarray(qs.transpose(0, 2, 1))
    return QTensor(fmt, tuple(shape), parts)
