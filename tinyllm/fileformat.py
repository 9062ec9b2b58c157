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
import math
import os
import signal
import struct
import sys
import threading
import zlib
from pathlib import Path

import numpy as np

from tinyllm.errors import FormatError, TinyLLMError
from tinyllm.kernels.quant import FORMATS, QTensor, part_layout

MAGIC = b"TINYLLM\0"
VERSION = 1
ALIGN = 64
_PREAMBLE = struct.Struct("<8sIIQQIIQ")  # 48 bytes, padded to 64
PREAMBLE_SIZE = 64
_CRC_CHUNK = 1 << 24
PART_DTYPES = ("<f4", "<f2", "|u1", "|i1")  # the only element types a part may have
MAX_DIM = 1 << 31                          # any one dimension of a tensor or part


def _crc32(buf, crc: int = 0) -> int:
    view = memoryview(buf).cast("B")
    for i in range(0, len(view), _CRC_CHUNK):
        crc = zlib.crc32(view[i:i + _CRC_CHUNK], crc)
    return crc


def file_kind(path) -> str | None:
    """"q4" or "gguf" by the file's magic bytes (not its name), None for anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
    except OSError:
        return None
    if head == MAGIC:
        return "q4"
    return "gguf" if head[:4] == b"GGUF" else None


def no_model_file(path: Path) -> TinyLLMError:
    """The error for a model path that is not a file, saying what it is and what to do."""
    if path.is_dir():
        hint = (": it holds a Hugging Face checkpoint, convert it first with `tinyllm convert DIR -o model.q4`"
                if (path / "config.json").is_file() else "")
        return TinyLLMError(f"{str(path)!r} is a directory, not a model file{hint}")
    return TinyLLMError(f"model file {str(path)!r} not found")


def partial_path(path: Path, pid: int) -> Path:
    """Where process ``pid`` writes ``path`` until it is complete: a hidden file beside it."""
    return path.parent / f".{path.name}.{pid}.partial"


def remove_stale_partials(path: Path, notice=None) -> list[Path]:
    """Delete partial files of ``path`` left by conversions that were killed (their process
    is gone); a partial file of a conversion still running is left alone."""
    removed = []
    for p in path.parent.glob(f".{path.name}.*.partial"):
        pid = p.name[len(path.name) + 2:-len(".partial")]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        try:
            p.unlink()
        except OSError:
            continue
        removed.append(p)
        if notice:
            notice(f"removed {p.name}, left by an interrupted conversion")
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


class _TerminationAsExit:
    """While active (main thread only), SIGTERM raises SystemExit, so ``with`` blocks unwind
    and the writer removes its partial file instead of leaving it behind."""

    def __enter__(self):
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


class ModelWriter:
    """Streams tensors into a partial file beside ``path``; ``close()`` writes the header
    and renames it into place. On any error (and on SIGTERM) the partial file is removed,
    so a failed conversion never leaves a half-written model behind; partial files of
    earlier conversions that were killed outright are removed when the next one starts.

        with ModelWriter(path, metadata) as out:
            out.add("tok_embeddings", qtensor)
    """

    def __init__(self, path, metadata: dict, notice=None):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise TinyLLMError(f"output directory {str(self.path.parent)!r} does not exist")
        if self.path.is_dir():
            raise TinyLLMError(f"output {str(self.path)!r} is a directory; give a file name")
        remove_stale_partials(self.path, notice or (lambda line: print(line, file=sys.stderr)))
        self._tmp = partial_path(self.path, os.getpid())
        try:
            self._f = open(self._tmp, "xb")
        except FileExistsError:
            raise TinyLLMError(f"{self._tmp} exists: another conversion to {self.path} is running") from None
        except OSError as e:
            raise TinyLLMError(f"cannot write {self._tmp}: {e.strerror}") from None
        self._term = _TerminationAsExit().__enter__()
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
        layout = part_layout(t.format, tuple(t.shape))
        if {k: (np.dtype(v.dtype), tuple(v.shape)) for k, v in t.parts.items()} != layout:
            raise TinyLLMError(f"tensor {name}: parts do not match the {t.format} layout of shape {tuple(t.shape)}")
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
        os.replace(self._tmp, self.path)
        self._term.__exit__()
        return self.path

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)
        self._term.__exit__()

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
            raise no_model_file(self.path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            pre = f.read(PREAMBLE_SIZE)
            if pre[:len(MAGIC)] != MAGIC[:len(pre)] or not pre:
                raise FormatError(f"{self.path}: not a tinyllm .q4 file (bad magic)")
            if len(pre) < PREAMBLE_SIZE:
                raise FormatError(f"{self.path}: truncated .q4 file ({size} bytes, shorter than its preamble)")
            _, version, _, h_off, h_len, h_crc, _, file_size = _PREAMBLE.unpack(pre[:_PREAMBLE.size])
            if version != VERSION:
                raise FormatError(f"{self.path}: format version {version} is not supported "
                                  f"(this tinyllm reads {VERSION})")
            if size != file_size:
                raise FormatError(f"{self.path}: truncated or extended file ({size} bytes, header says {file_size})")
            if not PREAMBLE_SIZE <= h_off <= size or h_len > size - h_off:
                raise FormatError(f"{self.path}: header position {h_off}+{h_len} lies outside the {size}-byte file")
            f.seek(h_off)
            blob = f.read(h_len)
        if zlib.crc32(blob) != h_crc:
            raise FormatError(f"{self.path}: header checksum mismatch (file corrupted)")
        try:
            self.metadata = json.loads(blob.decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise FormatError(f"{self.path}: header is not valid JSON ({type(e).__name__}: {e})") from None
        if not isinstance(self.metadata, dict):
            raise FormatError(f"{self.path}: header is not a JSON object")
        table = check_tensor_table(self.metadata.get("tensors"), h_off, str(self.path))
        self.tensors = {}
        raw = np.memmap(self.path, dtype=np.uint8, mode="r")
        for rec in table:
            end = rec["offset"] + rec["nbytes"]
            if verify and _crc32(raw[rec["offset"]:end]) != rec["crc32"]:
                raise FormatError(f"{self.path}: tensor {rec['name']} checksum mismatch (file corrupted)")
            parts = {}
            for part, p in rec["parts"].items():
                dtype = np.dtype(p["dtype"])
                count = math.prod(p["shape"])
                parts[part] = np.frombuffer(raw, dtype=dtype, count=count, offset=p["offset"]).reshape(p["shape"])
            self.tensors[rec["name"]] = QTensor(rec["format"], tuple(rec["shape"]), parts)
        self.file_size = size


def _no_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _is_int(value, lo: int = 0, hi: int = 1 << 62) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def check_tensor_table(table, data_end: int, where: str) -> list:
    """The header's tensor table, checked before anything is mapped: every field of the type
    the reader uses, every tensor's bytes inside the data section [64, data_end), every part
    aligned, of a known dtype and inside its tensor's bytes, and no two tensors overlapping.
    Whether parts fit their format and the architecture is checked by the loader (validate.py)."""
    if not isinstance(table, list):
        raise FormatError(f"{where}: header 'tensors' must be a list")
    seen, spans = set(), []
    for i, rec in enumerate(table):
        if not isinstance(rec, dict) or not isinstance(rec.get("name"), str) or not rec["name"]:
            raise FormatError(f"{where}: tensor table entry {i} has no name")
        name = rec["name"]
        if name in seen:
            raise FormatError(f"{where}: tensor {name} appears twice")
        seen.add(name)
        shape, parts = rec.get("shape"), rec.get("parts")
        if rec.get("format") not in FORMATS:
            raise FormatError(f"{where}: tensor {name} has unknown format {rec.get('format')!r}")
        if not isinstance(shape, list) or not 1 <= len(shape) <= 2 or not all(_is_int(n, 1, MAX_DIM) for n in shape):
            raise FormatError(f"{where}: tensor {name} has invalid shape {shape!r} (1 or 2 positive dimensions)")
        if not all(_is_int(rec.get(k)) for k in ("offset", "nbytes", "crc32")):
            raise FormatError(f"{where}: tensor {name} needs integer offset, nbytes and crc32")
        start, end = rec["offset"], rec["offset"] + rec["nbytes"]
        if start < PREAMBLE_SIZE or end > data_end:
            raise FormatError(f"{where}: tensor {name} lies outside the data section")
        if not isinstance(parts, dict) or not parts:
            raise FormatError(f"{where}: tensor {name} has no parts")
        for part, p in parts.items():
            if (not isinstance(p, dict) or not _is_int(p.get("offset")) or p.get("dtype") not in PART_DTYPES
                    or not isinstance(p.get("shape"), list) or not 1 <= len(p["shape"]) <= 3
                    or not all(_is_int(n, 0, MAX_DIM) for n in p["shape"])):
                raise FormatError(f"{where}: tensor {name} part {part!r} needs an integer offset, a dtype of "
                                  f"{', '.join(PART_DTYPES)} and a shape of 1-3 dimensions")
            nbytes = math.prod(p["shape"]) * np.dtype(p["dtype"]).itemsize
            if p["offset"] % ALIGN or p["offset"] < start or p["offset"] + nbytes > end:
                raise FormatError(f"{where}: tensor {name} part {part!r} is misaligned or lies outside its tensor")
        spans.append((start, end, name))
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise FormatError(f"{where}: tensors {a} and {b} overlap")
    return table
