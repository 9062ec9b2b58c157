"""The real checkpoint configs in ../shared/models, scaled down (fewer layers, a smaller
hidden size, random weights; the real vocabulary, tokenizer and every other key): they
parse, convert and match their transformers oracle, and the CLI converts, describes,
generates with and chats with them."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import tinyllm
from tinyllm.cli import main
from tinyllm.converters.convert import convert_hf

from .conftest import shared
from .hf_oracle import hf_logits, save_random_model
from .hf_variants import mpt_gqa_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# architecture -> (folder in ../shared/models, transformers class, what is scaled down, `tinyllm info` must show)
REAL = {
    "gptj": ("gpt-j-6b-tokenizer", "GPTJForCausalLM", dict(n_embd=64, n_head=4, n_layer=2, rotary_dim=8),
             ["RoPE on 8 of 16 dims", "parallel"]),
    # 7 heads stand in for Falcon-7B's 71: multi-query with a head count that is no power of two
    "falcon": ("falcon-7b-instruct-tokenizer", "FalconForCausalLM",
               dict(hidden_size=112, num_attention_heads=7, num_hidden_layers=2), ["multi-query", "parallel"]),
    # Replit Code v1.5 is grouped-query (24 heads, 8 kv heads): kept as 6 and 2
    "mpt": ("replit-code-v1_5-3b-mpt-config", None, dict(d_model=96, n_heads=6, n_layers=2, kv_n_heads=2),
            ["ALiBi", "grouped-query (6 query heads, 2 kv heads)"]),
}
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
TEXT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)  # Füße 日本"


def scaled_config(folder, changes: dict) -> dict:
    config = json.loads((folder / "config.json").read_text())
    if "kv_n_heads" in changes:
        changes = dict(changes)
        config["attn_config"] = dict(config["attn_config"], kv_n_heads=changes.pop("kv_n_heads"))
    return {**config, **changes}


@pytest.fixture(scope="module", params=list(REAL))
def real(request, tmp_path_factory):
    name, model_class, changes, _ = REAL[request.param]
    folder = shared(name)
    files = [folder / f for f in FILES if (folder / f).is_file()]
    config = scaled_config(folder, changes)
    out = tmp_path_factory.mktemp(request.param)
    if model_class is None:  # grouped-query MPT: transformers cannot run it; see hf_variants
        oracle, hf_dir = mpt_gqa_checkpoint(config, out / "hf", files)
    else:
        cls = getattr(transformers, model_class)
        oracle = cls(cls.config_class.from_dict(config)).eval()
        hf_dir = save_random_model(oracle, out / "hf", files)
        (hf_dir / "config.json").write_text(json.dumps(config))  # the real keys, not transformers' rewrite
    return request.param, oracle, hf_dir, out


def test_real_config_converts_and_matches_transformers(real):
    arch, oracle, hf_dir, out = real
    m = tinyllm.load(convert_hf(hf_dir, out / "f32.q4", quant="f32"), backend="numpy", cache_type="f32")
    assert m.metadata["architecture"] == arch
    tokens = m.tokenize(TEXT)
    assert len(tokens) > 20 and max(tokens) >= 512  # the real vocabulary is in use
    assert np.abs(m.logits(tokens) - hf_logits(oracle, tokens)).max() < 1e-4


def test_cli_convert_info_generate_chat(real):
    arch, _, hf_dir, out = real
    runner = CliRunner()
    path = str(out / "cli-q4_0.q4")
    result = runner.invoke(main, ["convert", str(hf_dir), "-o", path, "--quant", "q4_0"])
    assert result.exit_code == 0, result.output

    result = runner.invoke(main, ["info", path])
    assert result.exit_code == 0, result.output
    assert "architecture" in result.output and arch in result.output
    for words in REAL[arch][3]:
        assert words in result.output

    result = runner.invoke(main, ["generate", path, "-p", "def hello():", "-n", "8", "--temperature", "0",
                                  "--backend", "numpy"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("def hello():") and len(result.output) > len("def hello():\n")

    result = runner.invoke(main, ["chat", path, "-n", "8", "--temperature", "0", "--backend", "numpy"],
                           input="Hello there\n/quit\n")
    assert result.exit_code == 0, result.output
