"""Model files and checkpoints from strangers: every class of bad value gets a clear
TinyLLMError before anything reaches a kernel, allocates past the machine, or is written
over the input. (The fuzzers in test_fuzz.py try many more values of the same classes.)"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import tinyllm
from tinyllm.cli import main
from tinyllm.converters.convert import convert_hf
from tinyllm.errors import FormatError, TinyLLMError
from tinyllm.fileformat import partial_path

from .untrusted import (
    BUNDLED,
    bundled_gguf,
    gguf_contents,
    logits_ok,
    read_q4,
    requantized,
    run_files_in_child,
    write_gguf,
    write_q4,
)


@pytest.fixture(scope="module")
def q4_0_model(tmp_path_factory) -> Path:
    return requantized(BUNDLED, tmp_path_factory.mktemp("q4") / "stories-q4_0.q4", "q4_0")


def _edited(src: Path, dst: Path, edit, data_edit=None) -> Path:
    data, header = read_q4(src)
    edit(header)
    if data_edit is not None:
        data = data_edit(bytearray(data), header)
    return write_q4(dst, bytes(data), header)


def _tensor(header, name):
    return next(t for t in header["tensors"] if t["name"] == name)


def _cfg(**changes):
    return lambda h: h["config"].update(changes)


# -- 1. memory safety: header values that disagree with the tensors ---------------------------

def _part_too_small(h):
    part = next(iter(_tensor(h, "tok_embeddings")["parts"].values()))
    part["shape"][0] = 10  # placed as before, far smaller than the logical (512, 64)


def _moved_to_the_end(h):
    last = max(h["tensors"], key=lambda t: t["offset"])
    norm = _tensor(h, "norm")
    for rec in (norm,):
        rec["offset"] = rec["parts"]["w"]["offset"] = last["offset"] + last["nbytes"] - 64


def _overlap(h):
    a, b = _tensor(h, "layers.0.attention_norm"), _tensor(h, "layers.1.attention_norm")
    b["offset"], b["parts"] = a["offset"], json.loads(json.dumps(a["parts"]))


def _part_outside(h):
    _tensor(h, "norm")["parts"]["w"]["offset"] = 2**40


MEMORY_CASES = {
    "head_dim disagrees with wq": (_cfg(head_dim=16), "implies"),
    "hidden_size disagrees": (_cfg(hidden_size=128), "implies"),
    "part smaller than the tensor": (_part_too_small, "tok_embeddings part"),
    "tensor moved to the end of the data": (_moved_to_the_end, "outside|overlap"),
    "overlapping tensors": (_overlap, "overlap"),
    "part outside the file": (_part_outside, "outside"),
    "negative layer count": (_cfg(num_hidden_layers=-1), "num_hidden_layers"),
    "zero heads": (_cfg(num_attention_heads=0), "num_attention_heads"),
    "kv heads do not divide heads": (_cfg(num_key_value_heads=3), "num_key_value_heads"),
    "vocabulary larger than the table": (_cfg(vocab_size=100000), "implies"),
    "eps infinite (1e999 in JSON)": (_cfg(rms_norm_eps=float("inf")), "rms_norm_eps|not valid JSON"),
    "eps zero": (_cfg(rms_norm_eps=0.0), "rms_norm_eps"),
    "unknown config key": (_cfg(sliding_window=4), "sliding_window"),
    "missing tensor": (lambda h: h["tensors"].remove(_tensor(h, "layers.2.ffn_norm")), "lacks"),
    "extra tensor": (lambda h: h["tensors"].append(dict(_tensor(h, "norm"), name="layers.99.x")),
                     "does not use|overlap"),
    "untied without an output head": (_cfg(tie_word_embeddings=False), "lacks tensor.*output"),
    "unknown part dtype": (lambda h: _tensor(h, "norm")["parts"]["w"].update(dtype="<f8"), "dtype"),
    "string shape": (lambda h: _tensor(h, "norm").update(shape="64"), "shape"),
    "tensors not a list": (lambda h: h.update(tensors={"a": 1}), "must be a list"),
    "config a list": (lambda h: h.update(config=[1, 2]), "'config' must be"),
    "generation default of the wrong type": (lambda h: h.update(generation={"top_k": "many"}), "top_k"),
}


@pytest.mark.parametrize("case", MEMORY_CASES)
def test_header_values_that_disagree_with_the_tensors_are_refused(case, tmp_path):
    edit, words = MEMORY_CASES[case]
    path = _edited(BUNDLED, tmp_path / "bad.q4", edit)
    with pytest.raises(TinyLLMError, match=words):
        tinyllm.load(path, backend="numpy")


def test_the_same_files_never_crash_the_numba_kernels(tmp_path, q4_0_model):
    """Every case above, on the quantized model too, loaded and run on the Numba backend in a
    child process: a native crash there fails this test (it used to be a SIGSEGV)."""
    paths = []
    for i, (edit, _) in enumerate(MEMORY_CASES.values()):
        for j, src in enumerate((BUNDLED, q4_0_model)):
            try:
                paths.append(_edited(src, tmp_path / f"case{i}-{j}.q4", edit))
            except StopIteration:  # the edit names a tensor this file lacks
                pass
    results = run_files_in_child([BUNDLED, q4_0_model, *paths])
    assert len(results) == len(paths) + 2
    assert results.pop(str(BUNDLED))[0] == results.pop(str(q4_0_model))[0] == "ok"  # the child really runs models
    assert all(outcome == "tinyllm-error" for outcome, _ in results.values()), results


def test_nan_scales_are_refused(tmp_path, q4_0_model):
    def nan_scale(data, header):
        part = _tensor(header, "layers.0.attention.wq")["parts"]["d"]
        data[part["offset"]:part["offset"] + 2] = np.array([np.nan], np.float16).tobytes()
        return data

    path = _edited(q4_0_model, tmp_path / "nan.q4", lambda h: None, nan_scale)
    with pytest.raises(FormatError, match="NaN"):
        tinyllm.load(path, backend="numpy")


def test_weights_that_overflow_give_an_error_not_nan_text(tmp_path):
    def huge(data, header):
        part = _tensor(header, "layers.0.feed_forward.w2")["parts"]["w"]
        data[part["offset"]:part["offset"] + 4096] = np.full(1024, 3e38, np.float32).tobytes()
        return data

    m = tinyllm.load(_edited(BUNDLED, tmp_path / "big.q4", lambda h: None, huge), backend="numpy")
    with pytest.raises(TinyLLMError, match="NaN or infinite logits"):
        m.generate("Once", max_new_tokens=3, stream=False)


def test_valid_edits_still_load(tmp_path):
    """The checks refuse what is wrong, not what is unusual: a rewritten, unchanged header loads."""
    path = _edited(BUNDLED, tmp_path / "same.q4", lambda h: None)
    np.testing.assert_array_equal(logits_ok(path), logits_ok(BUNDLED))


# -- 2. resource exhaustion -----------------------------------------------------------------------

def test_a_kv_cache_larger_than_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    path = _edited(BUNDLED, tmp_path / "long.q4", _cfg(max_position_embeddings=1 << 24))
    tinyllm.load(path, backend="numpy")  # the default context (4096) is fine
    monkeypatch.setattr("tinyllm.validate.available_memory", lambda: 4 << 30)  # a 4 GiB machine
    with pytest.raises(TinyLLMError, match="KV cache .* 10.0 GiB"):
        tinyllm.load(path, backend="numpy", n_ctx=1 << 24)  # 16M positions x 5 layers x 4 x 8 x 2 x 2 bytes (f16)
    with pytest.raises(TinyLLMError, match=r"KV cache .* 20.0 GiB.*--cache-type f16"):
        tinyllm.load(path, backend="numpy", n_ctx=1 << 24, cache_type="f32")  # f32: twice, and the hint
    with pytest.raises(TinyLLMError, match="n_ctx"):
        tinyllm.load(path, backend="numpy", n_ctx=-1)


def test_huge_vocabulary_and_added_token_ids_are_refused(tmp_path):
    big_id = _edited(BUNDLED, tmp_path / "id.q4",
                     lambda h: h["tokenizer"]["added_tokens"].append({"id": 10**9, "content": "<x>", "special": True}))
    with pytest.raises(FormatError, match="added token"):
        tinyllm.load(big_id, backend="numpy")
    with pytest.raises(FormatError, match="vocab_size"):
        tinyllm.load(_edited(BUNDLED, tmp_path / "v.q4", _cfg(vocab_size=2**40)), backend="numpy")


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gguf")
    return bundled_gguf(d / "stories.gguf", d)


def _gguf_with(src: Path, dst: Path, **values) -> Path:
    arch, fields, tensors = gguf_contents(src)
    types = {k: (t, s) for k, t, s, _ in fields}
    fields = [(k, *types[k], values[k]) if k in values else (k, t, s, v) for k, t, s, v in fields]
    return write_gguf(dst, arch, fields, tensors)


def test_a_million_layers_in_a_gguf_is_refused_at_once(small_gguf, tmp_path):
    path = _gguf_with(small_gguf, tmp_path / "deep.gguf", **{"llama.block_count": 10**6})
    start = time.monotonic()
    with pytest.raises(FormatError, match="num_hidden_layers=1000000"):
        tinyllm.load(path, backend="numpy")
    assert time.monotonic() - start < 30  # a bound on work, not a speed claim: it used to take minutes


# -- 3. raw exceptions: GGUF metadata and converter input ------------------------------------

@pytest.mark.parametrize("key,value", [
    ("llama.attention.head_count", 0), ("llama.attention.head_count", 3), ("llama.embedding_length", 0),
    ("llama.context_length", 0), ("llama.attention.layer_norm_rms_epsilon", float("nan")),
    ("llama.feed_forward_length", 10**9), ("tokenizer.ggml.bos_token_id", 10**6),
])
def test_gguf_metadata_values_out_of_range(small_gguf, tmp_path, key, value):
    with pytest.raises(TinyLLMError):
        tinyllm.load(_gguf_with(small_gguf, tmp_path / "m.gguf", **{key: value}), backend="numpy")


def test_gguf_metadata_of_the_wrong_type(small_gguf, tmp_path):
    import gguf

    V = gguf.GGUFValueType
    arch, fields, tensors = gguf_contents(small_gguf)
    for i, (vtype, sub, value) in enumerate([(V.STRING, None, "eight"), (V.ARRAY, V.INT32, [8, 8]),
                                             (V.BOOL, None, True), (V.FLOAT32, None, 8.5)]):
        changed = [(k, vtype, sub, value) if k == "llama.attention.head_count" else (k, t, s, v)
                   for k, t, s, v in fields]
        with pytest.raises(TinyLLMError, match="head_count|num_attention_heads"):
            tinyllm.load(write_gguf(tmp_path / f"t{i}.gguf", arch, changed, tensors), backend="numpy")


@pytest.fixture
def hf_dir(stories_hf, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(stories_hf, d)
    return d


def _json(path: Path, value) -> None:
    path.write_text(json.dumps(value))


def _config_edit(**changes):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        _json(d / "config.json", cfg)
    return edit


def _st_header_length(d):
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[:8] = (2**40).to_bytes(8, "little")
    (d / "model.safetensors").write_bytes(raw)


def _st_offsets(d):
    raw = (d / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] -= 4  # fewer digits at most: the header stays the same length
    blob = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    (d / "model.safetensors").write_bytes(raw[:8] + blob[:n] + raw[8 + n:])


def _sharded(weight_map):
    def edit(d):
        (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
        _json(d / "model.safetensors.index.json", {"weight_map": weight_map})
    return edit


CHECKPOINT_CASES = {
    "config.json a list": (lambda d: _json(d / "config.json", [1, 2]), "JSON object"),
    "config.json hidden_size a string": (_config_edit(hidden_size="64"), "hidden_size"),
    "config.json architectures not a list of names": (_config_edit(architectures=[{"x": 1}]), "malformed|unsupported"),
    "config disagrees with the weights (head_dim)": (_config_edit(head_dim=16), "config and weights disagree"),
    "config disagrees with the weights (intermediate)": (_config_edit(intermediate_size=100), "disagree"),
    "config asks for more layers": (_config_edit(num_hidden_layers=7), "lacks tensor"),
    "safetensors header length 2^40": (_st_header_length, "header length"),
    "safetensors offsets that do not match the shape": (_st_offsets, "data_offsets"),
    "index.json naming a missing shard": (_sharded({"model.embed_tokens.weight": "model-00009.safetensors"}),
                                          "not a file"),
    "index.json shard outside the directory": (_sharded({"x": "../../etc/passwd"}), "not a file"),
    "index.json weight_map a list": (_sharded(["model-00001-of-00001.safetensors"]), "weight_map"),
    "generation_config.json top_k a string": (lambda d: _json(d / "generation_config.json", {"top_k": "x"}), "top_k"),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_bad_checkpoints_are_refused_and_write_nothing(hf_dir, tmp_path, case):
    edit, words = CHECKPOINT_CASES[case]
    edit(hf_dir)
    before = {p.name: p.read_bytes() for p in hf_dir.iterdir()}
    out = tmp_path / "out.q4"
    with pytest.raises(TinyLLMError, match=words):
        convert_hf(hf_dir, out)
    assert not out.exists() and not list(tmp_path.glob(".out.q4.*"))
    assert {p.name: p.read_bytes() for p in hf_dir.iterdir()} == before


def test_command_line_values_out_of_range_are_one_line_errors():
    runner = CliRunner()
    for args in (["generate", str(BUNDLED), "--ctx", "-1"], ["generate", str(BUNDLED), "--seed", "-1"],
                 ["generate", str(BUNDLED), "-t", "0"], ["generate", str(BUNDLED), "--top-p", "5"],
                 ["generate", str(BUNDLED), "-n", "-3"], ["chat", str(BUNDLED), "--min-p", "1"]):
        result = runner.invoke(main, args)
        assert result.exit_code != 0 and "Traceback" not in result.output, (args, result.output)
        assert "Invalid value" in result.output, (args, result.output)


def test_invalid_utf8_on_the_command_line():
    proc = subprocess.run([sys.executable, "-c", "from tinyllm.cli import main; main()", "generate", str(BUNDLED),
                           "-p", os.fsdecode(b"bad \xff bytes"), "-n", "2", "--backend", "numpy"],
                          capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode != 0 and b"Traceback" not in proc.stderr
    assert b"not valid UTF-8" in proc.stderr


def test_tiny_temperature_samples_like_greedy():
    m = tinyllm.load(BUNDLED, backend="numpy")
    assert (m.generate("Once", max_new_tokens=8, temperature=1e-320, seed=1, stream=False)
            == m.generate("Once", max_new_tokens=8, temperature=0, stream=False))


# -- 4. the converter never destroys its input ----------------------------------------------

def test_convert_refuses_to_write_into_its_input(hf_dir, small_gguf, tmp_path):
    weights = (hf_dir / "model.safetensors").read_bytes()
    (tmp_path / "link").symlink_to(hf_dir)
    for out in (hf_dir / "model.safetensors", tmp_path / "link" / "config.json", hf_dir / "tokenizer.model", hf_dir):
        with pytest.raises(TinyLLMError, match="would overwrite the input"):
            convert_hf(hf_dir, out)
    assert (hf_dir / "model.safetensors").read_bytes() == weights
    convert_hf(hf_dir, hf_dir / "new.q4", quant="f32")  # a new file beside the checkpoint is fine
    assert (hf_dir / "model.safetensors").read_bytes() == weights
    gguf_copy = tmp_path / "x.gguf"
    shutil.copy(small_gguf, gguf_copy)
    before = gguf_copy.read_bytes()
    result = CliRunner().invoke(main, ["convert", str(gguf_copy), "-o", str(gguf_copy)])
    assert result.exit_code == 1 and "would overwrite the input" in result.output
    assert gguf_copy.read_bytes() == before


def test_sigterm_mid_conversion_leaves_no_partial_file(hf_dir, tmp_path):
    out = tmp_path / "out.q4"
    slow = ("import time; from tinyllm.converters.recipe import Recipe as R; q = R.encode; "
            "R.encode = lambda *a, **k: (time.sleep(0.1), q(*a, **k))[1]; "
            "from tinyllm.cli import main; main()")
    proc = subprocess.Popen([sys.executable, "-c", slow, "convert", str(hf_dir), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not partial_path(out, proc.pid).exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the conversion never started writing"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert not out.exists() and not list(tmp_path.glob(".out.q4.*"))


def test_stale_partial_files_are_removed_on_the_next_run(hf_dir, tmp_path):
    out = tmp_path / "out.q4"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = partial_path(out, int(dead.stdout))
    stale.write_bytes(b"half a model")
    live = partial_path(out, os.getppid())  # a process that is running: its file is not ours to remove
    live.write_bytes(b"someone else's")
    result = CliRunner().invoke(main, ["convert", str(hf_dir), "-o", str(out), "--quant", "f32"])
    assert result.exit_code == 0, result.output
    assert not stale.exists() and live.exists()
    assert "interrupted conversion" in result.output
    logits_ok(out)


def test_messages_name_the_file_the_variable_and_the_next_step(hf_dir, monkeypatch, tmp_path):
    with pytest.raises(TinyLLMError, match="is a directory.*tinyllm convert"):
        tinyllm.load(hf_dir)
    monkeypatch.setenv("TINYLLM_MODEL", str(tmp_path / "gone.q4"))
    result = CliRunner().invoke(main, ["generate", "-n", "2"])
    assert result.exit_code == 1 and "$TINYLLM_MODEL" in result.output and "gone.q4" in result.output
    gguf_named_q4 = tmp_path / "model.q4"  # told apart by its magic bytes, not its name
    shutil.copy(BUNDLED, tmp_path / "real.q4")
    assert tinyllm.load(tmp_path / "real.q4", backend="numpy")
    gguf_named_q4.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(FormatError, match="GGUF"):
        tinyllm.load(gguf_named_q4, backend="numpy")
    truncated = tmp_path / "short.q4"
    truncated.write_bytes(BUNDLED.read_bytes()[:40])
    with pytest.raises(FormatError, match="truncated"):
        tinyllm.load(truncated, backend="numpy")
