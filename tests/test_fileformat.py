"""The .q4 container: round trip, memory mapping, and every way a file can be bad."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from tinyllm.errors import FormatError, TinyLLMError
from tinyllm.fileformat import ALIGN, PREAMBLE_SIZE, ModelFile, ModelWriter
from tinyllm.kernels.quant import quantize

META = {"architecture": "llama", "config": {"hidden_size": 8}, "tokenizer": {"kind": "none"}}


@pytest.fixture
def q4_file(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": quantize(rng.standard_normal((4, 64)), "q4_0"),
               "b": quantize(rng.standard_normal(7), "f32"),
               "c": quantize(rng.standard_normal((3, 40)), "q8_0")}
    path = tmp_path / "m.q4"
    with ModelWriter(path, META) as w:
        for name, t in tensors.items():
            w.add(name, t)
    return path, tensors


def test_round_trip_memmapped_and_aligned(q4_file):
    path, tensors = q4_file
    f = ModelFile(path)
    assert f.metadata["architecture"] == "llama" and f.metadata["format_version"] == 1
    for name, t in tensors.items():
        got = f.tensors[name]
        assert got.format == t.format and got.shape == t.shape
        for part, arr in t.parts.items():
            np.testing.assert_array_equal(got.parts[part], arr)
            assert isinstance(got.parts[part].base, (np.memmap, np.ndarray)) and not got.parts[part].flags.writeable
    for rec in f.metadata["tensors"]:
        assert all(p["offset"] % ALIGN == 0 for p in rec["parts"].values())


def _corrupt(path, offset, data=b"\xff"):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def test_wrong_magic(q4_file):
    path, _ = q4_file
    _corrupt(path, 0, b"GGUF")
    with pytest.raises(FormatError, match="bad magic"):
        ModelFile(path)


def test_not_a_model_at_all(tmp_path):
    p = tmp_path / "notes.q4"
    p.write_text("hello")
    with pytest.raises(FormatError, match="bad magic"):
        ModelFile(p)


def test_unsupported_version(q4_file):
    path, _ = q4_file
    _corrupt(path, 8, struct.pack("<I", 99))
    with pytest.raises(FormatError, match="version 99"):
        ModelFile(path)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated(q4_file, keep):
    path, _ = q4_file
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(FormatError, match="truncated"):
        ModelFile(path)


def test_corrupted_header(q4_file):
    path, _ = q4_file
    h_off = struct.unpack_from("<Q", path.read_bytes(), 16)[0]
    _corrupt(path, h_off + 5, b"#")
    with pytest.raises(FormatError, match="header checksum"):
        ModelFile(path)


def test_corrupted_tensor_bytes(q4_file):
    path, _ = q4_file
    rec = ModelFile(path).metadata["tensors"][2]
    _corrupt(path, rec["parts"]["qs"]["offset"] + 3, b"\x00\x11")
    with pytest.raises(FormatError, match="tensor c checksum"):
        ModelFile(path)
    assert ModelFile(path, verify=False).tensors["c"].shape == (3, 40)  # opt-out of the check


def test_missing_file(tmp_path):
    with pytest.raises(TinyLLMError, match="not found"):
        ModelFile(tmp_path / "nope.q4")


def test_writer_refuses_missing_directory(tmp_path):
    with pytest.raises(TinyLLMError, match="does not exist"):
        ModelWriter(tmp_path / "no" / "such" / "m.q4", META)


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "m.q4"
    with pytest.raises(RuntimeError):
        with ModelWriter(path, META) as w:
            w.add("a", quantize(np.ones((2, 32)), "q8_0"))
            raise RuntimeError("conversion failed midway")
    assert list(tmp_path.iterdir()) == []


def test_header_is_plain_json(q4_file):
    """Nothing executable: the header parses with json alone."""
    path, _ = q4_file
    raw = path.read_bytes()
    h_off, h_len = struct.unpack_from("<QQ", raw, 16)
    assert json.loads(raw[h_off:h_off + h_len])["tensors"][0]["name"] == "a"
    assert h_off >= PREAMBLE_SIZE
