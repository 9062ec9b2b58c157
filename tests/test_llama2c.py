"""llama2.c checkpoints: the published stories260K.bin (legacy layout) converts to exactly the
tensors of its Hugging Face twin and reproduces llama2.c's golden output; the version 1 (float32)
and version 2 (int8) layouts, written here as llama2.c's export.py writes them, convert to the
same weights (int8: to what runq.c dequantizes); bad files get one clear error."""
from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
from click.testing import CliRunner

import tinyllm
from tinyllm.cli import main
from tinyllm.converters.convert import convert, convert_hf
from tinyllm.converters.llama2c import MAGIC, Llama2cCheckpoint
from tinyllm.errors import TinyLLMError

from .conftest import shared
from .test_stories import EXPECTED, _greedy_text

L2C = "stories260K-llama2c"


@pytest.fixture(scope="module")
def legacy():
    return shared(L2C, "stories260K.bin")


@pytest.fixture(scope="module")
def tok512():
    return shared(L2C, "tok512.bin")


@pytest.fixture(scope="module")
def hf_f32(stories_hf, tmp_path_factory):
    return convert_hf(stories_hf, tmp_path_factory.mktemp("hf") / "hf.q4", quant="f32")


def tensors(path) -> dict:
    m = tinyllm.load(path, backend="numpy")
    return {name: np.asarray(t.parts["w"]) for name, t in m.file_tensors.items()}


def test_legacy_checkpoint_is_its_hugging_face_twin(legacy, hf_f32, tmp_path):
    out = convert(legacy, tmp_path / "l2c.q4", quant="f32")  # finds tok512.bin beside it
    ours, theirs = tensors(out), tensors(hf_f32)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert np.array_equal(ours[name], theirs[name]), name
    assert _greedy_text(out) == EXPECTED


def test_the_rebuilt_tokenizer_encodes_as_the_hugging_face_one(legacy, hf_f32, tmp_path):
    a = tinyllm.load(convert(legacy, tmp_path / "l2c.q4", quant="q8_0"), backend="numpy")
    b = tinyllm.load(hf_f32, backend="numpy")
    for text in ["Once upon a time, there was a little girl named Lily.", "She said, \"I can't!\"\nThe end.",
                 "héllo wörld 😀 ~{}", "Tom and Ben ran to the park. They saw a big dog."]:
        assert a.tokenize(text) == b.tokenize(text), text
        assert a.detokenize(a.tokenize(text)) == text
    assert (a.tokenizer.bos_id, a.tokenizer.eos_ids) == (1, [2])


def _weights_in_llama2c_order(ckpt: Llama2cCheckpoint) -> dict:
    """The legacy file's own arrays, by llama2.c name (not permuted)."""
    return {name: np.array(ckpt._read(name)) for name in ckpt._entries}


def write_version(path, ckpt: Llama2cCheckpoint, version: int, group: int = 32) -> None:
    """export.py's version1_export / version2_export, from the legacy file's weights."""
    p, w = ckpt.params, _weights_in_llama2c_order(ckpt)
    header = struct.pack("<Ii", MAGIC, version) + struct.pack("<7i", p["dim"], p["hidden"], p["n_layers"],
                                                               p["n_heads"], p["n_kv"], p["vocab"], p["seq_len"])
    header += struct.pack("<B", int(ckpt.shared)) + (struct.pack("<i", group) if version == 2 else b"")
    header += b"\0" * (256 - len(header))
    norms = [w["rms_att"], w["rms_ffn"], w["rms_final"]]
    matrices = [w["tok_embeddings"]] + [w[k] for k in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")]
    with open(path, "wb") as f:
        f.write(header)
        for a in norms:
            f.write(a.astype("<f4").tobytes())
        for m in matrices:
            if version == 1:
                f.write(m.astype("<f4").tobytes())
                continue
            for layer in (m if m.ndim == 3 else [m]):  # export.py quantizes each layer's matrix alone
                q, s = quantize_q80(layer, group)
                f.write(q.tobytes())
                f.write(s.astype("<f4").tobytes())


def quantize_q80(w: np.ndarray, group: int):
    """export.py's quantize_q80: per group of ``group`` values, scale = max|w| / 127, q = round(w / scale)."""
    g = w.astype(np.float32).reshape(-1, group)
    scale = np.abs(g).max(axis=1) / 127.0
    q = np.round(g / scale[:, None]).astype(np.int8)
    return q, scale.astype(np.float32)


def test_version_1_is_the_same_model(legacy, tok512, hf_f32, tmp_path):
    write_version(tmp_path / "v1.bin", Llama2cCheckpoint(legacy), 1)
    out = convert(tmp_path / "v1.bin", tmp_path / "v1.q4", quant="f32", tokenizer=tok512)
    ours, theirs = tensors(out), tensors(hf_f32)
    assert all(np.array_equal(ours[n], theirs[n]) for n in theirs)


def test_version_2_int8_is_what_runq_dequantizes(legacy, tok512, hf_f32, tmp_path):
    ckpt = Llama2cCheckpoint(legacy)
    write_version(tmp_path / "v2.bin", ckpt, 2, group=32)
    v2 = Llama2cCheckpoint(tmp_path / "v2.bin")
    assert v2.version == 2 and v2.group == 32
    raw = _weights_in_llama2c_order(ckpt)
    q, s = quantize_q80(raw["w1"][3], 32)
    expected = (q.astype(np.float32) * s[:, None]).reshape(raw["w1"][3].shape)
    np.testing.assert_array_equal(v2.get("model.layers.3.mlp.gate_proj.weight"), expected)
    out = convert(tmp_path / "v2.bin", tmp_path / "v2.q4", quant="f32", tokenizer=tok512)
    ours, theirs = tensors(out), tensors(hf_f32)
    np.testing.assert_array_equal(ours["norm"], theirs["norm"])  # norms stay float32
    for name in theirs:
        assert np.abs(ours[name] - theirs[name]).max() <= np.abs(theirs[name]).max() / 127 / 2 + 1e-7, name
    assert _greedy_text(out, steps=40) == _greedy_text(hf_f32, steps=40)  # int8 keeps the story's start


def test_the_cli_converts_and_finds_the_tokenizer(legacy, tmp_path):
    r = CliRunner().invoke(main, ["convert", str(legacy), "-o", str(tmp_path / "s.q4")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["generate", str(tmp_path / "s.q4"), "-n", "12", "--temperature", "0"])
    assert r.exit_code == 0 and r.output.startswith("Once upon a time"), r.output


@pytest.mark.parametrize("damage,words", [
    (lambda b: b[:1000], "truncated, or not a llama2.c file"),
    (lambda b: struct.pack("<7i", 64, 172, 5, 7, 4, 512, 512) + b[28:], "neither"),      # heads do not divide
    (lambda b: struct.pack("<7i", 64, 172, 5, 8, 4, 512, 1 << 30) + b[28:], "neither"),  # a size past the file
    (lambda b: struct.pack("<Ii", MAGIC, 3) + b[8:], "version 3 is not supported"),
    (lambda b: b"\x01\x02" * 10, "neither"),
])
def test_bad_llama2c_files_are_clear_errors(legacy, tok512, tmp_path, damage, words):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(damage(legacy.read_bytes()))
    shutil.copy(tok512, tmp_path / "tok512.bin")
    with pytest.raises(TinyLLMError, match=words):
        if "version" in words:
            Llama2cCheckpoint(bad)
        convert(bad, tmp_path / "out.q4")
    assert not (tmp_path / "out.q4").exists()


def test_tokenizer_problems_are_clear_errors(legacy, tmp_path, stories_hf):
    lonely = tmp_path / "model.bin"
    shutil.copy(legacy, lonely)
    with pytest.raises(TinyLLMError, match="--tokenizer"):
        convert(lonely, tmp_path / "out.q4")
    short = tmp_path / "short.bin"
    short.write_bytes(shared(L2C, "tok512.bin").read_bytes()[:3000])
    with pytest.raises(TinyLLMError, match="truncated llama2.c tokenizer"):
        convert(lonely, tmp_path / "out.q4", tokenizer=short)
    with pytest.raises(TinyLLMError, match="--tokenizer names a llama2.c"):
        convert(stories_hf, tmp_path / "out.q4", tokenizer=shared(L2C, "tok512.bin"))
    assert not (tmp_path / "out.q4").exists()


def test_loading_a_llama2c_file_says_to_convert_it(legacy):
    with pytest.raises(TinyLLMError, match="llama2.c checkpoint: convert it"):
        tinyllm.load(legacy)
