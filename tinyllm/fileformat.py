"""The .q4 file: one self-describing model file (spec: FORMAT.md).

    offset 0   preamble, 64 bytes (little-endian)
               magic b"TINYLLM\\0" | version u32 | reserved u32 | header_offset u64 |
               header_len u64 | header_crc32 u32 | reserved u32 | file_size u64 | zeros
    offset 64  tensor data: every part of every tensor starts on a 64-byte boundary
    header_offset   the JSON header (UTF-8): architecture, config, tokenizer, chat
               template, generation defaults, and the tensor table with offsets and CRC32s

The header sits after the data so a converter can stream tensors to disk one at a time
and write the table last. Reading maps tensor parts with np.memmap: nothing is copied.
Loading never executes anything from the file (JSON and raw arrays only).
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

from .errors import FormatError, TinyLLMError
from .kernels.quant import FORMATS, QTensor

MAGIC = b"TINYLLM\0"
VERSION = 1
ALIGN = 64
_PREAMBLE = struct.Struct("<8sIIQQIIQ")  # 48 bytes, padded to 64
PREAMBLE_SIZE = 64
_CRC_CHUNK = 1 << 24


def _crc32(buf, crc: int = 0) -> int:
    view = memoryview(buf).cast("B")
    for i in range(0, len(view), _CRC_CHUNK):
        crc = zlib.crc32(view[i:i + _CRC_CHUNK], crc)
    return crc


class ModelWriter:
    """Streams tensors into a temporary file beside ``path``; ``close()`` writes the
    header and renames it into place. On any error the temporary file is removed, so a
    failed conversion never leaves a half-written model behind.

        with ModelWriter(path, metadata) as out:
            out.add("tok_embeddings", qtensor)
    """

    def __init__(self, path, metadata: dict):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise TinyLLMError(f"output directory {str(self.path.parent)!r} does not exist")
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent)
        self._tmp = Path(tmp)
        self._f = os.fdopen(fd, "wb")
        self._f.write(b"\0" * PREAMBLE_SIZE)
        self.metadata = dict(metadata)
        self.tensors: list[dict] = []

    def _pad(self) -> int:
        pos = self._f.tell()
        pad = -pos % ALIGN
        self._f.write(b"\0" * pad)
        return pos + pad

    def add(self, name: str, t: QTensor) -> None:
        if t.format not in FORMATS:
            raise TinyLLMError(f"tensor {name}: unknown format {t.format!r}")
        start = self._pad()
        parts = {}
        for part, arr in t.parts.items():
            arr = np.ascontiguousarray(arr)
            offset = self._pad()
            self._f.write(arr.tobytes(order="C"))
            parts[part] = {"offset": offset, "dtype": arr.dtype.str, "shape": list(arr.shape)}
        end = self._f.tell()
        self.tensors.append({"name": name, "format": t.format, "shape": list(t.shape),
                             "offset": start, "nbytes": end - start, "parts": parts})

    def close(self) -> Path:
        header_offset = self._pad()
        self._f.flush()
        # checksum each tensor's byte range (parts and the padding between them) as written
        with open(self._tmp, "rb") as src:
            for rec in self.tensors:
                src.seek(rec["offset"])
                crc, left = 0, rec["nbytes"]
                while left:
                    chunk = src.read(min(left, _CRC_CHUNK))
                    crc = zlib.crc32(chunk, crc)
                    left -= len(chunk)
                rec["crc32"] = crc
        header = dict(self.metadata, format_version=VERSION, tensors=self.tensors)
        blob = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        self._f.write(blob)
        file_size = self._f.tell()
        self._f.seek(0)
        self._f.write(_PREAMBLE.pack(MAGIC, VERSION, 0, header_offset, len(blob), zlib.crc32(blob), 0, file_size))
        self._f.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._tmp, 0o666 & ~umask)  # mkstemp made it private; give it normal permissions
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class ModelFile:
    """A .q4 file opened for reading: ``metadata`` (the header dict) and ``tensors``
    (name -> QTensor whose parts are read-only np.memmap views)."""

    def __init__(self, path, verify: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise TinyLLMError(f"model file {str(self.path)!r} not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            pre = f.read(PREAMBLE_SIZE)
            if len(pre) < PREAMBLE_SIZE or pre[:8] != MAGIC:
                raise FormatError(f"{self.path}: not a tinyllm .q4 file (bad magic)")
            _, version, _, h_off, h_len, h_crc, _, file_size = _PREAMBLE.unpack(pre[:_PREAMBLE.size])
            if version != VERSION:
                raise FormatError(f"{self.path}: format version {version} is not supported (this tinyllm reads {VERSION})")
            if size != file_size or h_off + h_len > size:
                raise FormatError(f"{self.path}: truncated or extended file ({size} bytes, header says {file_size})")
            f.seek(h_off)
            blob = f.read(h_len)
        if zlib.crc32(blob) != h_crc:
            raise FormatError(f"{self.path}: header checksum mismatch (file corrupted)")
        try:
            self.metadata = json.loads(blob.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{self.path}: header is not valid JSON ({e})") from None
        self.tensors = {}
        raw = np.memmap(self.path, dtype=np.uint8, mode="r")
        for rec in self.metadata["tensors"]:
            end = rec["offset"] + rec["nbytes"]
            if end > h_off:
                raise FormatError(f"{self.path}: tensor {rec['name']} lies outside the data section")
            if verify and _crc32(raw[rec["offset"]:end]) != rec["crc32"]:
                raise FormatError(f"{self.path}: tensor {rec['name']} checksum mismatch (file corrupted)")
            parts = {}
            for part, p in rec["parts"].items():
                dtype = np.dtype(p["dtype"])
                count = int(np.prod(p["shape"], dtype=np.int64))
                parts[part] = np.frombuffer(raw, dtype=dtype, count=count, offset=p["offset"]).reshape(p["shape"])
            self.tensors[rec["name"]] = QTensor(rec["format"], tuple(rec["shape"]), parts)
        self.file_size = size
