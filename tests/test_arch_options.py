"""Architecture options: the ones tinyllm implements beyond what transformers runs (checked
against oracles built from transformers), and the ones it refuses, each by name."""
from __future__ import annotations

import json

import numpy as np
import pytest

import tinyllm
from tinyllm.arch import get_arch
from tinyllm.converters.convert import convert_hf
from tinyllm.errors import TinyLLMError, UnsupportedError

from .hf_oracle import hf_logits, save_random_model
from .hf_variants import mpt_gqa_checkpoint, mpt_with_alibi_bias_max
from .test_architectures import PROMPT, tokenizer_files

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MPT_TOKENIZER = "gpt-neox-20b-tokenizer-mpt"
BASE = {
    "gptj": dict(model_type="gptj", n_embd=64, n_head=4, n_layer=2, vocab_size=512, rotary_dim=8),
    "mpt": dict(model_type="mpt", d_model=96, n_heads=6, n_layers=2, vocab_size=512, max_seq_len=128,
                attn_config={"alibi": True}),
    "falcon": dict(model_type="falcon", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=512),
}
# (architecture, config change, the words the refusal must contain)
REFUSED = [
    ("gptj", {"rotary_dim": None}, "rotary_dim=None"),
    ("gptj", {"rotary_dim": 24}, "rotary_dim=24"),           # more than head_dim 16
    ("gptj", {"rotary_dim": 7}, "rotary_dim=7"),             # odd
    ("gptj", {"activation_function": "relu"}, "activation_function='relu'"),
    ("gptj", {"rotary": False}, "rotary=False"),
    ("gptj", {"scale_attn_weights": False}, "scale_attn_weights=False"),
    ("gptj", {"use_parallel_residual": False}, "use_parallel_residual"),
    ("mpt", {"attn_config": {"alibi": True, "qk_ln": True}}, "attn_config.qk_ln=True"),
    ("mpt", {"attn_config": {"alibi": False}}, "attn_config.alibi=False"),
    ("mpt", {"attn_config": {"alibi": True, "prefix_lm": True}}, "attn_config.prefix_lm=True"),
    ("mpt", {"attn_config": {"alibi": True, "rope": True}}, "attn_config.rope=True"),
    ("mpt", {"attn_config": {"alibi": True, "sliding_window_size": 64}}, "attn_config.sliding_window_size=64"),
    ("mpt", {"attn_config": {"alibi": True, "attn_type": "grouped_query_attention", "kv_n_heads": 4}},
     "attn_config.kv_n_heads=4"),
    ("mpt", {"attn_config": {"alibi": True, "clip_qkv": 0}}, "attn_config.clip_qkv=0"),
    ("mpt", {"logit_scale": 0.5}, "logit_scale=0.5"),
    ("mpt", {"logit_scale": "inv_sqrt_d_model"}, "logit_scale='inv_sqrt_d_model'"),
    ("mpt", {"expansion_ratio": 8}, "expansion_ratio=8"),
    ("mpt", {"no_bias": False}, "no_bias=False"),
    ("mpt", {"norm_type": "rmsnorm"}, "norm_type='rmsnorm'"),
    ("mpt", {"ffn_config": {"ffn_type": "te_ln_mlp"}}, "ffn_config.ffn_type='te_ln_mlp'"),
    ("mpt", {"ffn_config": {"ffn_type": "mptmlp", "ffn_act_fn": {"name": "silu"}}}, "ffn_config.ffn_act_fn"),
    ("falcon", {"activation": "relu"}, "activation='relu'"),
    ("falcon", {"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm=True"),
    ("falcon", {"new_decoder_architecture": True, "parallel_attn": False}, "parallel_attn=False"),
    ("falcon", {"num_ln_in_parallel_attn": 2}, "num_ln_in_parallel_attn=2"),
    ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 3}, "num_kv_heads=3"),
    ("falcon", {"multi_query": False, "num_kv_heads": 2}, "num_kv_heads=2"),
    ("falcon", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    ("falcon", {"sliding_window": 128}, "sliding_window"),
    ("falcon", {"num_key_value_heads": 4}, "num_key_value_heads=4"),  # multi_query: one kv head
]


@pytest.mark.parametrize("arch,change,words", REFUSED, ids=[f"{a}-{w}" for a, _, w in REFUSED])
def test_unsupported_option_is_refused_by_name(arch, change, words):
    with pytest.raises(UnsupportedError, match="unsupported") as err:
        get_arch(arch).Config.from_hf({**BASE[arch], **change})
    assert words in str(err.value)


@pytest.mark.parametrize("arch", list(BASE))
def test_base_configs_are_accepted(arch):
    get_arch(arch).Config.from_hf(BASE[arch])  # so each refusal above is caused by its change


@pytest.mark.parametrize("options,kv_heads", [({}, 1), ({"multi_query": False}, 4),
                                              ({"new_decoder_architecture": True, "num_kv_heads": 2}, 2)])
def test_falcon_num_key_value_heads_as_transformers_5_25_saves_it(options, kv_heads):
    """transformers >= 5.25 writes the derived kv head count into Falcon configs: accepted
    where it agrees with the options it derives from (a disagreeing one is refused above)."""
    cfg = get_arch("falcon").Config.from_hf({**BASE["falcon"], **options, "num_key_value_heads": kv_heads})
    assert cfg.n_kv_heads == kv_heads


def test_mpt_7b_style_config_is_accepted():
    # the keys of mosaicml/mpt-7b's config.json (sizes scaled down), as MosaicML's code wrote them
    config = {"architectures": ["MPTForCausalLM"], "model_type": "mpt", "d_model": 64, "n_heads": 4, "n_layers": 2,
              "expansion_ratio": 4, "max_seq_len": 2048, "vocab_size": 512, "emb_pdrop": 0, "resid_pdrop": 0,
              "embedding_fraction": 1.0, "learned_pos_emb": True, "logit_scale": None, "no_bias": True,
              "norm_type": "low_precision_layernorm", "init_device": "cpu", "tokenizer_name": "EleutherAI/gpt-neox-20b",
              "torch_dtype": "bfloat16", "use_cache": False, "verbose": 0,
              "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0,
                              "attn_type": "multihead_attention", "attn_uses_sequence_id": False, "clip_qkv": None,
                              "prefix_lm": False, "qk_ln": False, "softmax_scale": None},
              "init_config": {"name": "kaiming_normal_", "fan_mode": "fan_in", "init_nonlinearity": "relu"}}
    cfg = get_arch("mpt").Config.from_hf(config)
    assert (cfg.n_kv_heads, cfg.clip_qkv, cfg.softmax_scale, cfg.context_length) == (4, None, 16 ** -0.5, 2048)


@pytest.fixture(scope="module")
def mpt_folder(tmp_path_factory):
    model = transformers.MptForCausalLM(transformers.MptConfig(d_model=96, n_heads=6, n_layers=2, vocab_size=512,
                                                               max_seq_len=128)).eval()
    return save_random_model(model, tmp_path_factory.mktemp("mpt") / "hf", tokenizer_files(MPT_TOKENIZER))


def _edited_copy(folder, tmp_path, edit_config=None, extra_tensors=None):
    import shutil

    from safetensors.numpy import load_file, save_file

    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    if edit_config:
        config = json.loads((out / "config.json").read_text())
        edit_config(config)
        (out / "config.json").write_text(json.dumps(config))
    if extra_tensors:
        save_file({**load_file(out / "model.safetensors"), **extra_tensors}, out / "model.safetensors",
                  metadata={"format": "pt"})
    return out


def test_convert_refuses_mpt_qk_ln(mpt_folder, tmp_path):
    src = _edited_copy(mpt_folder, tmp_path, edit_config=lambda c: c["attn_config"].update(qk_ln=True))
    with pytest.raises(UnsupportedError, match=r"attn_config\.qk_ln=True"):
        convert_hf(src, tmp_path / "m.q4", quant="f32")
    assert not (tmp_path / "m.q4").exists()


def test_convert_refuses_learned_position_embeddings_in_the_checkpoint(mpt_folder, tmp_path):
    # learned_pos_emb=true is harmless in a config (MPT turns it off under ALiBi), but a
    # checkpoint that really has a position-embedding table is a model tinyllm would run wrong
    src = _edited_copy(mpt_folder, tmp_path, extra_tensors={"transformer.wpe.weight": np.zeros((128, 96), np.float32)})
    with pytest.raises(TinyLLMError, match=r"transformer\.wpe\.weight"):
        convert_hf(src, tmp_path / "m.q4", quant="f32")


def test_mpt_clip_qkv_changes_the_output():
    # the clip_qkv case of test_architectures only proves clipping if clipping is active there
    cfg = dict(d_model=96, n_heads=6, n_layers=2, vocab_size=512, max_seq_len=128)
    torch.manual_seed(0)
    clipped = transformers.MptForCausalLM(transformers.MptConfig(**cfg, attn_config={"clip_qkv": 0.25})).eval()
    with torch.no_grad():
        for p in clipped.parameters():
            p.normal_(0.0, 0.08) if p.ndim > 1 else p.uniform_(0.8, 1.2)
    plain = transformers.MptForCausalLM(transformers.MptConfig(**cfg)).eval()
    plain.load_state_dict(clipped.state_dict())
    assert np.abs(hf_logits(clipped, PROMPT) - hf_logits(plain, PROMPT)).max() > 0.1


def test_mpt_grouped_query_attention(tmp_path):
    config = dict(BASE["mpt"], architectures=["MPTForCausalLM"], d_model=96, n_heads=6,
                  attn_config={"alibi": True, "attn_type": "grouped_query_attention", "kv_n_heads": 2,
                               "clip_qkv": 0.5})
    oracle, folder = mpt_gqa_checkpoint(config, tmp_path / "hf", tokenizer_files(MPT_TOKENIZER))
    m = tinyllm.load(convert_hf(folder, tmp_path / "m.q4", quant="f32"), backend="numpy", cache_type="f32")
    assert m.config.n_kv_heads == 2
    expected = hf_logits(oracle, PROMPT)
    assert np.abs(m.logits(PROMPT) - expected).max() < 1e-4
    m.reset()
    steps = np.stack([m.eval(PROMPT[:t + 1]) for t in range(len(PROMPT))])
    assert np.abs(steps - expected).max() < 1e-4


def test_mpt_alibi_bias_max(tmp_path):
    config = transformers.MptConfig(d_model=96, n_heads=6, n_layers=2, vocab_size=512, max_seq_len=128,
                                    attn_config={"alibi_bias_max": 4})
    model = transformers.MptForCausalLM(config).eval()
    folder = save_random_model(model, tmp_path / "hf", tokenizer_files(MPT_TOKENIZER))
    ignored = hf_logits(model, PROMPT)                                   # transformers: slopes for 8
    expected = hf_logits(mpt_with_alibi_bias_max(model, 4), PROMPT)     # MosaicML: slopes for 4
    assert np.abs(expected - ignored).max() > 0.01                      # the option matters here
    m = tinyllm.load(convert_hf(folder, tmp_path / "m.q4", quant="f32"), backend="numpy", cache_type="f32")
    got = m.logits(PROMPT)
    assert np.abs(got - expected).max() < 1e-4


DESCRIBED = [  # `tinyllm info` rows: (architecture, config change, texts that must appear)
    ("gptj", {}, ["RoPE on 8 of 16 dims", "parallel", "untied (output head with bias)"]),
    ("mpt", {"attn_config": {"alibi": True, "attn_type": "multiquery_attention", "clip_qkv": 6}},
     ["multi-query (6 query heads, 1 kv head)", "clipped to ±6", "ALiBi (alibi_bias_max=8)"]),
    ("falcon", {}, ["multi-query (4 query heads, 1 kv head)", "7B-style", "parallel, one shared LayerNorm"]),
    ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2},
     ["grouped-query (4 query heads, 2 kv heads)", "separate attention and MLP LayerNorms"]),
    ("falcon", {"alibi": True, "multi_query": False, "parallel_attn": False}, ["ALiBi", "sequential", "multi-head"]),
]


@pytest.mark.parametrize("arch,change,texts", DESCRIBED)
def test_describe_shows_the_architecture_specific_settings(arch, change, texts):
    module = get_arch(arch)
    shown = " | ".join(f"{k}: {v}" for k, v in module.describe(module.Config.from_hf({**BASE[arch], **change})).items())
    for text in texts:
        assert text in shown
