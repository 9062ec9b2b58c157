"""The random models of benchmarks/arch_shapes.py: every architecture writes, loads and runs,
and the GGUF export llama-bench reads holds the same model (tinyllm's own GGUF reader, tested
against the gguf package and llama.cpp's layout elsewhere, gives the same logits)."""
from __future__ import annotations

import numpy as np
import pytest

import tinyllm
from benchmarks.arch_shapes import SHAPES, export_bpe_gguf, hf_config
from benchmarks.bench_model import write_random
from tinyllm.arch import get_arch

from .conftest import SHARED_MODELS

pytest.importorskip("gguf")
SMALL = {"llama-7b": {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
                      "num_key_value_heads": 4},
         "gptj-6b": {"n_embd": 64, "n_head": 4, "rotary_dim": 8},
         "mpt-7b": {"d_model": 64, "n_heads": 4},
         "falcon-7b": {"hidden_size": 64, "num_attention_heads": 4}}


@pytest.mark.parametrize("name", list(SMALL))
def test_random_model_of_each_architecture_runs_and_exports(name, tmp_path):
    if not SHARED_MODELS.is_dir():
        pytest.skip("needs ../shared/models (the tokenizers)")
    arch, _, tokenizer, _ = SHAPES[name]
    config = hf_config(name, layers=2)
    config.update(SMALL[name])
    if arch == "mpt":
        config["attn_config"] = dict(config["attn_config"], kv_n_heads=4)
    cfg = get_arch(arch).Config.from_hf(config)
    q4 = write_random(arch, tmp_path / "m.q4", cfg, config, tokenizer, name)
    model = tinyllm.load(q4, backend="numpy")
    assert model.metadata["architecture"] == arch
    ids = [5, 17, 300, 42]
    logits = model.logits(ids)
    assert logits.shape == (len(ids), cfg.vocab_size) and np.isfinite(logits).all()
    if arch in ("mpt", "falcon"):
        gguf_path = export_bpe_gguf(q4, tokenizer, tmp_path / "m.gguf")
        again = tinyllm.load(gguf_path, backend="numpy")
        np.testing.assert_allclose(again.logits(ids), logits, rtol=1e-5, atol=1e-5)


def test_decode_at_times_attention_and_puts_it_back(stories_hf, tmp_path):
    from benchmarks.arch_shapes import decode_at
    from tinyllm.converters.convert import convert_hf

    model = tinyllm.load(convert_hf(stories_hf, tmp_path / "s.q4", quant="q8_0"), backend="numpy", cache_type="f16")
    attention = model.ops.attention
    speeds, shares = decode_at(model, position=40, steps=3, repeats=2)
    assert len(speeds) == len(shares) == 2 and all(s > 0 for s in speeds)
    assert all(0 < share < 1 for share in shares)
    assert model.ops.attention == attention and len(model.tokens) == 43
