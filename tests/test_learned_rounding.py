"""`tinyllm convert --learn-rounding`: the grid it differentiates is the file's (every learned format), learning lowers
the KL divergence it minimizes, the result is the same format moved at most one code, and every
misuse is a clear error that writes nothing."""
from __future__ import annotations

import builtins
import json
import shutil

import numpy as np
import pytest

import tinyllm
from tinyllm.converters import learned_rounding as lr
from tinyllm.converters.convert import convert
from tinyllm.errors import TinyLLMError
from tinyllm.fileformat import ModelFile
from tinyllm.kernels.quant import quantize, unpack_scales

pytest.importorskip("torch")


@pytest.mark.parametrize("fmt", lr.LEARNED)
def test_the_grid_is_the_tensor(fmt):
    w = np.random.default_rng(0).standard_normal((172, 70)).astype(np.float32)   # padded; q4_k: across rows
    t = quantize(w, fmt)
    g = lr.block_grid(t)
    np.testing.assert_array_equal(lr.decode(g, g["h"], g["codes"])[:, :70], t.dequantize())
    again = lr.with_grid(t, g["codes"], g["h"])
    assert again.parts.keys() == t.parts.keys()
    for part in t.parts:
        np.testing.assert_array_equal(again.parts[part], t.parts[part])


@pytest.fixture(scope="module")
def calibration(stories_hf, tmp_path_factory):
    from benchmarks.quality import sample_text

    d = tmp_path_factory.mktemp("learn")
    f32 = convert(stories_hf, d / "f32.q4", quant="f32")
    text = d / "calibration.txt"
    text.write_text(sample_text(tinyllm.load(f32, backend="numpy"), 5000, 4 * 511))
    return f32, text


def _kld(model_path, reference, ids) -> float:
    p = tinyllm.load(reference, backend="numpy", cache_type="f32").logits(ids).astype(np.float64)
    q = tinyllm.load(model_path, backend="numpy", cache_type="f32").logits(ids).astype(np.float64)
    logp, logq = (a - a.max(-1, keepdims=True) for a in (p, q))
    logp, logq = (a - np.log(np.exp(a).sum(-1, keepdims=True)) for a in (logp, logq))
    return float((np.exp(logp) * (logp - logq)).sum(-1).mean())


def test_learning_lowers_the_kl_divergence(stories_hf, calibration, tmp_path):
    f32, text = calibration
    start = convert(stories_hf, tmp_path / "start.q4", quant="q4_k")
    steps = []
    learned = lr.learn_rounding(stories_hf, start, text.read_text(), tmp_path / "learned.q4", steps=12, batch=2,
                                progress=lambda step, n, kld: steps.append((step, kld)))
    assert [s for s, _ in steps] == list(range(1, 13))
    ids = tinyllm.load(f32, backend="numpy").tokenize(text.read_text(), special=False)[:511]
    assert _kld(learned, f32, ids) < 0.9 * _kld(start, f32, ids)


@pytest.mark.parametrize("fmt", lr.LEARNED)
def test_codes_move_one_step_at_most_and_the_format_is_kept(fmt, stories_hf, calibration, tmp_path):
    _, text = calibration
    start = convert(stories_hf, tmp_path / "start.q4", quant=fmt)
    # a learning rate that moves many codes in 12 steps (too many to help: the real default moves them slowly)
    learned = lr.learn_rounding(stories_hf, start, text.read_text(), tmp_path / "learned.q4", steps=12, batch=2,
                                lr_codes=0.1)
    a, b = ModelFile(start), ModelFile(learned)
    assert sum(t.nbytes for t in b.tensors.values()) == sum(t.nbytes for t in a.tensors.values())
    def layout(f):
        return {k: (t.format, t.shape) for k, t in f.tensors.items()}
    assert layout(a) == layout(b)
    moved = 0
    for name, t in a.tensors.items():
        u = b.tensors[name]
        if t.format == "q4_k":
            for s, v in zip(unpack_scales(np.asarray(t.parts["scales"])), unpack_scales(np.asarray(u.parts["scales"]))):
                np.testing.assert_array_equal(s, v)                                   # the 6-bit block scales kept
        if t.format in lr.LEARNED:
            dq = lr.block_grid(u)["codes"] - lr.block_grid(t)["codes"]   # q6_k: a q4_k_m mix's tensors
            assert np.abs(dq).max() <= 1                                              # a code moves one step at most
            moved += int((dq != 0).sum())
        elif t.format == "q8_0":
            for part in t.parts:
                np.testing.assert_array_equal(t.parts[part], u.parts[part])           # the embedding kept
    assert moved > 0


def test_the_reference_computed_per_step_gives_the_same_file(stories_hf, calibration, tmp_path, monkeypatch):
    _, text = calibration
    start = convert(stories_hf, tmp_path / "start.q4", quant="q4_k")
    kept = lr.learn_rounding(stories_hf, start, text.read_text(), tmp_path / "kept.q4", steps=3, batch=2)
    monkeypatch.setattr(lr, "KEPT_BYTES", 0)   # as for a big vocabulary
    again = lr.learn_rounding(stories_hf, start, text.read_text(), tmp_path / "again.q4", steps=3, batch=2)
    a, b = ModelFile(kept), ModelFile(again)
    for name, t in a.tensors.items():
        for part in t.parts:
            np.testing.assert_allclose(b.tensors[name].parts[part], t.parts[part], rtol=1e-6)


def test_convert_learns_through_the_cli_options(stories_hf, calibration, tmp_path):
    from click.testing import CliRunner

    from tinyllm.cli import main

    _, text = calibration
    out = tmp_path / "m.q4"
    r = CliRunner().invoke(main, ["convert", str(stories_hf), "-o", str(out), "--quant", "q4_k_m",
                                  "--learn-rounding", str(text), "--learn-steps", "2"])
    assert r.exit_code == 0, r.output
    formats = {t.format for t in ModelFile(out).tensors.values()}
    assert formats == {"q4_k", "q6_k", "f32"}                     # the mix kept: its q6_k tensors stay q6_k
    assert list(tmp_path.iterdir()) == [out]                        # the starting file was temporary


def _falcon_config(stories_hf, tmp_path):
    d = tmp_path / "falcon"
    shutil.copytree(stories_hf, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, model_type="falcon", architectures=["FalconForCausalLM"])))
    return d


@pytest.mark.parametrize("case, message", [
    ("steps only", "give --learn-rounding TEXT too"),
    ("q8_0", "give --quant q4_0"),
    ("gguf source", "give a Hugging Face checkpoint directory"),
    ("falcon", "LLaMA-family"),
    ("no text", "cannot read the calibration text"),
    ("short text", "needs at least 512"),
    ("not UTF-8", "malformed"),
    ("zero steps", "at least 1"),
    ("no torch", "pip install 'tinyllm[tune]'"),
])
def test_misuse_is_a_clear_error_that_writes_nothing(case, message, stories_hf, calibration, tmp_path, monkeypatch):
    _, text = calibration
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time")
    src, kw = stories_hf, {"quant": "q4_k", "learn_rounding": text}
    if case == "steps only":
        kw = {"quant": "q4_k", "learn_steps": 5}
    elif case == "q8_0":
        kw["quant"] = "q8_0"
    elif case == "gguf source":
        src = tmp_path / "m.gguf"
        src.write_bytes(b"GGUF" + bytes(60))   # told by its magic; refused before it is parsed
    elif case == "falcon":
        src = _falcon_config(stories_hf, tmp_path)
    elif case == "no text":
        kw["learn_rounding"] = tmp_path / "missing.txt"
    elif case == "short text":
        kw["learn_rounding"] = short
    elif case == "not UTF-8":
        short.write_bytes(b"\xff\xfe\xfa once")
        kw["learn_rounding"] = short
    elif case == "zero steps":
        kw["learn_steps"] = 0
    elif case == "no torch":
        real = builtins.__import__
        monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                            if name in ("torch", "transformers") else real(name, *a, **k))
    out = tmp_path / "out.q4"
    with pytest.raises(TinyLLMError, match=message.replace("[", r"\[").replace("]", r"\]")):
        convert(src, out, **kw)
    assert not out.exists()
