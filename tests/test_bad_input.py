"""Bad input gets a clear error and loses nothing: converter and runtime."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

import tinyllm
from tinyllm.cli import main
from tinyllm.converters.convert import convert_hf
from tinyllm.errors import TinyLLMError, UnsupportedError


@pytest.fixture
def hf_dir(stories_hf, tmp_path):
    """A writable copy of the stories260K checkpoint to break in various ways."""
    d = tmp_path / "hf"
    shutil.copytree(stories_hf, d)
    return d


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_unknown_architecture(hf_dir, tmp_path):
    _edit_config(hf_dir, architectures=["BertForMaskedLM"], model_type="bert")
    with pytest.raises(UnsupportedError, match="BertForMaskedLM"):
        convert_hf(hf_dir, tmp_path / "m.q4")


@pytest.mark.parametrize("option,value", [("hidden_act", "gelu"), ("attention_bias", True),
                                          ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
                                          ("sliding_window", 4096)])
def test_unsupported_config_option_named(hf_dir, tmp_path, option, value):
    _edit_config(hf_dir, **{option: value})
    with pytest.raises(UnsupportedError) as e:
        convert_hf(hf_dir, tmp_path / "m.q4")
    assert option in str(e.value) or "yarn" in str(e.value)
    assert not (tmp_path / "m.q4").exists()


def test_missing_tokenizer_files(hf_dir, tmp_path):
    (hf_dir / "tokenizer.model").unlink()
    with pytest.raises(TinyLLMError, match="tokenizer"):
        convert_hf(hf_dir, tmp_path / "m.q4")


def test_missing_weights(hf_dir, tmp_path):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(TinyLLMError, match="no weights"):
        convert_hf(hf_dir, tmp_path / "m.q4")


def test_output_directory_missing(hf_dir, tmp_path):
    with pytest.raises(TinyLLMError, match="does not exist"):
        convert_hf(hf_dir, tmp_path / "missing" / "m.q4")


def test_failure_midway_leaves_no_file(hf_dir, tmp_path):
    """A truncated weights file fails after some tensors are written: nothing is left."""
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:600_000])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TinyLLMError, match="truncated"):
        convert_hf(hf_dir, out / "m.q4")
    assert list(out.iterdir()) == []


def test_prompt_longer_than_context(stories_hf, tmp_path):
    m = tinyllm.load(convert_hf(stories_hf, tmp_path / "m.q4", quant="q8_0"), backend="numpy", n_ctx=32)
    with pytest.raises(TinyLLMError, match="context length"):
        m.generate("Once upon a time " * 20, max_new_tokens=4, stream=False)


def test_cli_reports_errors_without_traceback(hf_dir, tmp_path):
    _edit_config(hf_dir, hidden_act="relu")
    result = CliRunner().invoke(main, ["convert", str(hf_dir), "-o", str(tmp_path / "m.q4")])
    assert result.exit_code == 1
    assert "error: unsupported config option hidden_act='relu'" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "none.q4"), "-p", "hi"])
    assert result.exit_code == 1 and "not found" in result.output


def test_unknown_kv_cache_type_is_refused(stories_hf, tmp_path):
    path = convert_hf(stories_hf, tmp_path / "m.q4", quant="q8_0")
    with pytest.raises(TinyLLMError, match="unknown KV cache type 'q4_0'; choose one of f16, f32"):
        tinyllm.load(path, cache_type="q4_0")
    result = CliRunner().invoke(main, ["generate", str(path), "-p", "hi", "--cache-type", "q4_0"])
    assert result.exit_code == 2 and "'q4_0' is not one of 'f16', 'f32'" in result.output
    result = CliRunner().invoke(main, ["generate", str(path), "-p", "Once", "-n", "4", "--temperature", "0",
                                       "--cache-type", "f16"])
    assert result.exit_code == 0 and result.output.startswith("Once")
