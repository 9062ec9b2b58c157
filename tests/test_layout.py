"""The package is what it says it is: one importable copy, three folders mounted one way."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import tinyllm
import tinyllm.converters
import tinyllm.kernels
from tinyllm.errors import TinyLLMError

from .conftest import REPO


def test_one_importable_copy_of_the_package():
    with pytest.raises(ImportError):
        importlib.import_module("tinyllm.tinyllm")  # the old __path__ extension made this a second copy
    assert Path(tinyllm.kernels.__file__).parent == REPO / "kernels"
    assert Path(tinyllm.converters.__file__).parent == REPO / "converters"
    with pytest.raises(TinyLLMError):  # one error class, whichever folder raises it
        tinyllm.kernels.get_backend("nonesuch")


def test_imports_are_absolute():
    """`from tinyllm.x import y` everywhere: tools (import sorters, type checkers) read the
    layout right, and no import reaches for a parent folder that is not on disk."""
    relative = [f"{p.relative_to(REPO)}:{n}" for top in ("tinyllm", "kernels", "converters")
                for p in (REPO / top).rglob("*.py")
                for n, line in enumerate(p.read_text().splitlines(), 1) if re.match(r"\s*from \.", line)]
    assert not relative, relative


# -- one architecture: one runtime module, one converter module --------------------------------

CONFIGS = {
    "llama": [dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   vocab_size=100, num_key_value_heads=2),
              dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                   vocab_size=100, tie_word_embeddings=True)],
    "gptj": [dict(n_embd=64, n_layer=2, n_head=4, vocab_size=100, rotary_dim=8)],
    "mpt": [dict(d_model=96, n_heads=6, n_layers=2, vocab_size=100, kv_n_heads=2)],
    "falcon": [dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100),
               dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                    new_decoder_architecture=True, num_kv_heads=2, tie_word_embeddings=False),
               dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100,
                    multi_query=False, parallel_attn=False, bias=True)],
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_architecture_is_a_runtime_module_and_a_converter_module(name):
    from tinyllm.arch import ARCHITECTURES, HF_ARCHITECTURES, get_arch
    from tinyllm.arch.common import ArchConfig
    from tinyllm.converters.gguf import GGUF_ARCHITECTURES

    assert set(CONFIGS) == set(ARCHITECTURES)
    arch = get_arch(name)
    converter = importlib.import_module(f"tinyllm.converters.{name}")
    assert arch.ARCH == name and all(HF_ARCHITECTURES[c] == name for c in arch.HF_CLASSES)
    assert GGUF_ARCHITECTURES[name] is converter.GGUF and converter.GGUF.arch == name
    for raw in CONFIGS[name]:
        cfg = arch.Config(**raw)
        assert isinstance(cfg, ArchConfig)
        expected = arch.weights(cfg)
        plan = [ours for ours, _, _ in converter.tensor_plan(cfg)]  # the HF plan makes the weight set
        assert len(plan) == len(set(plan)) and set(plan) == set(expected)
        if not raw.get("bias"):  # llama.cpp's Falcon files have no biased linears (RW-style checkpoints)
            assert {ours for ours, _, _ in converter.GGUF.plan(cfg)} == set(expected)
