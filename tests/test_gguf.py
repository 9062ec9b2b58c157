"""GGUF import against two oracles: the same weights converted from a Hugging Face directory
(bit-identical tensors, identical logits) and transformers itself; GGUF vocabularies against
llama.cpp's tokenizer test vectors; and the errors for files tinyllm cannot read."""
from __future__ import annotations

import numpy as np
import pytest

import tinyllm
from tinyllm.converters.convert import config_dict, convert_hf
from tinyllm.converters.gguf import convert_gguf, open_gguf
from tinyllm.converters.gguf_tokenizer import tokenizer_spec_from_gguf
from tinyllm.converters.llama import LAYER_TENSORS as HF_LAYER
from tinyllm.errors import FormatError, TinyLLMError, UnsupportedError
from tinyllm.model import Model
from tinyllm.tokenizer import Tokenizer

from .conftest import shared
from .gguf_writer import (
    LLAMA_LAYER,
    T,
    bpe_vocab_arrays,
    gguf,
    llama_cpp_unpermute,
    random_k_blocks,
    write_falcon_gguf,
    write_gptj_gguf,
    write_llama_gguf,
    write_mpt_gguf,
)
from .hf_oracle import hf_logits, save_random_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=512, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
VARIANTS = {"gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
            "mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False)}
PROMPT = [1, 400, 301, 22, 87, 260, 511, 3, 270, 45, 300, 301, 99, 460, 12, 7, 33, 281]
QUANT_OF = {T.F32: "f32", T.Q4_0: "q4_0", T.Q8_0: "q8_0", T.Q4_1: "q4_1"}


@pytest.fixture(scope="module")
def vocab_dir():
    return shared("stories260K-hf")


def _hf_model(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_llama(request, tmp_path_factory, vocab_dir):
    model = _hf_model(dict(BASE, **VARIANTS[request.param]))
    files = [vocab_dir / f for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")]
    folder = save_random_model(model, tmp_path_factory.mktemp(request.param), files)
    return model, folder


def _load(path):
    return tinyllm.load(path, backend="numpy", cache_type="f32")  # exact against the oracles


# -- the same weights, from GGUF and from a Hugging Face directory -------------------------

@pytest.mark.parametrize("qtype", list(QUANT_OF), ids=lambda t: t.name)
def test_gguf_equals_hf_conversion(hf_llama, vocab_dir, tmp_path, qtype):
    """llama.cpp's layout (permuted q/k, ggml blocks) imports to exactly the tensors tinyllm's
    own converter makes from the same weights, so the logits are the same numbers."""
    model, folder = hf_llama
    quant = QUANT_OF[qtype]
    edge = T.Q8_0 if quant in ("q4_0", "q4_1") else qtype  # tinyllm keeps embedding/output 8-bit
    from_gguf = _load(write_llama_gguf(tmp_path / "m.gguf", model, vocab_dir, qtype, edge))
    from_hf = _load(convert_hf(folder, tmp_path / "m.q4", quant=quant))
    assert from_gguf.file_tensors.keys() == from_hf.file_tensors.keys()
    for name, want in from_hf.file_tensors.items():
        got = from_gguf.file_tensors[name]
        assert (got.format, got.shape) == (want.format, want.shape), name
        for part in want.parts:
            assert np.array_equal(got.parts[part], want.parts[part]), f"{name}.{part}"
    ours = from_gguf.logits(PROMPT)
    assert np.array_equal(ours, from_hf.logits(PROMPT))
    if qtype == T.F32:
        assert np.abs(ours - hf_logits(model, PROMPT)).max() < 1e-4
    assert from_gguf.config == from_hf.config


@pytest.mark.parametrize("quant", ["q4_k", "q4_k_m"])
def test_gguf_requantized_after_its_row_surgery(hf_llama, vocab_dir, tmp_path, quant):
    """Requantizing a GGUF file to q4_k, whose super-blocks span these short rows, encodes
    each tensor after llama.cpp's q/k permutation is undone: the very tensors the Hugging Face
    converter makes (rows of a q4_k tensor could not be reordered afterwards)."""
    model, folder = hf_llama
    path = write_llama_gguf(tmp_path / "m.gguf", model, vocab_dir, T.F32)
    lines = []
    from_gguf = Model(open_gguf(path, quant=quant, notice=lines.append), backend="numpy")
    from_hf = _load(convert_hf(folder, tmp_path / "m.q4", quant=quant))
    assert any(t.format == "q4_k" for t in from_hf.file_tensors.values())
    for name, want in from_hf.file_tensors.items():
        got = from_gguf.file_tensors[name]
        assert got.format == want.format, name
        for part in want.parts:
            assert np.array_equal(got.parts[part], want.parts[part]), f"{name}.{part}"
    assert lines and all("requantized" in line for line in lines)


def test_gguf_tokenizer_and_chat_metadata(hf_llama, vocab_dir, tmp_path):
    model, folder = hf_llama

    def sampling(w):  # the file author's recommended sampling (general.sampling.*)
        w.add_sampling_temp(0.3)
        w.add_sampling_top_k(20)
        w.add_sampling_penalty_repeat(1.1)

    g = _load(write_llama_gguf(tmp_path / "m.gguf", model, vocab_dir, T.F32, metadata=sampling))
    h = _load(convert_hf(folder, tmp_path / "m.q4", quant="f32"))
    assert g.generation_defaults == {"temperature": 0.3, "top_k": 20, "repetition_penalty": 1.1}
    assert g.sampling_params().top_k == 20
    # single spaces only: GGUF (like llama.cpp) drops this tokenizer.model's remove_extra_whitespaces
    for text in ("Once upon a time, there was a dog.", "Lily said: \"Hi!\" 123<s>x</s>", "ü€ 🦙 日本"):
        assert g.tokenize(text) == h.tokenize(text)
        assert g.detokenize(g.tokenize(text)) == h.detokenize(h.tokenize(text))
    tok = g.tokenizer
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, [2], True)
    assert g.chat_template.startswith("{% for m in messages %}")
    assert g.metadata["source"] == {"format": "gguf", "name": "tiny-random-llama"}


def test_convert_gguf_writes_the_same_model(hf_llama, vocab_dir, tmp_path):
    model, _ = hf_llama
    src = write_llama_gguf(tmp_path / "m.gguf", model, vocab_dir, T.Q4_1, T.Q8_0)
    q4 = _load(convert_gguf(src, tmp_path / "m.q4"))
    assert q4.metadata["quant"] == "q4_1" and q4.metadata["source"]["format"] == "gguf"
    assert np.array_equal(q4.logits(PROMPT), _load(src).logits(PROMPT))
    # --quant requantizes every matrix from the decoded weights, with the HF converter's policy
    q8 = _load(convert_gguf(src, tmp_path / "m8.q4", quant="q8_0", notice=lambda line: None))
    assert {t.format for t in q8.file_tensors.values() if len(t.shape) == 2} == {"q8_0"}


def test_cli_convert_and_generate_from_gguf(hf_llama, vocab_dir, tmp_path):
    from click.testing import CliRunner

    from tinyllm.cli import main

    model, _ = hf_llama
    src = write_llama_gguf(tmp_path / "m.gguf", model, vocab_dir, T.Q8_0)
    run = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "out.q4")])
    assert run.exit_code == 0, run.output
    assert (tmp_path / "out.q4").is_file()
    direct = CliRunner().invoke(main, ["generate", str(src), "-p", "Once", "-n", "5", "--temperature", "0",
                                       "--backend", "numpy"])
    converted = CliRunner().invoke(main, ["generate", str(tmp_path / "out.q4"), "-p", "Once", "-n", "5",
                                          "--temperature", "0", "--backend", "numpy"])
    assert direct.exit_code == 0 and direct.output == converted.output and direct.output.startswith("Once")


# -- types tinyllm has no format for --------------------------------------------------------

K_CONFIG = dict(BASE, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=1, tie_word_embeddings=True)
K_TARGET = {T.Q2_K: "q4_k", T.Q3_K: "q4_k", T.Q5_K: "q8_0", T.Q5_1: "q8_0", T.IQ4_XS: "q8_0"}
# RMS(logit error) / std(logits) against transformers running the exact decoded K-quant weights:
# the price of re-encoding. Measured on these random blocks: Q5_K 0.0011, Q2_K 0.0041, Q3_K 0.040,
# Q6_K 0.057 (random per-16 scales differ wildly inside one 32-block; real files' neighbouring
# scales are close). Bounds are ~3x.
K_TOLERANCE = {T.Q2_K: 0.015, T.Q3_K: 0.12, T.Q5_K: 0.005, T.Q5_1: 0.02, T.IQ4_XS: 0.02}


def _k_quant_model(qtype, vocab_dir, tmp_path):
    """A tiny LLaMA whose matrices (and tied embedding) are random K-quant blocks: the GGUF
    file holds the blocks, the transformers model the weights they decode to (gguf.quants).
    ``qtype``: one type for every matrix, or a function of the GGUF tensor name."""
    type_of = qtype if callable(qtype) else (lambda _name: qtype)
    model = _hf_model(K_CONFIG)
    rng = np.random.default_rng(1)
    raw, sd = {}, model.state_dict()
    heads = {"attn_q": K_CONFIG["num_attention_heads"], "attn_k": K_CONFIG["num_key_value_heads"]}
    names = {"token_embd.weight": "model.embed_tokens.weight"}
    names.update({f"blk.0.{g}": f"model.layers.0.{hf}" for hf, g in LLAMA_LAYER.items() if "norm" not in g})
    with torch.no_grad():
        for gname, hfname in names.items():
            rows, cols = sd[hfname].shape
            qtype = type_of(gname)
            blocks = random_k_blocks(qtype, rows, cols, rng)
            w = gguf.quants.dequantize(blocks, qtype).reshape(rows, cols)
            kind = gname.split(".")[-2]
            if kind in heads:
                w = llama_cpp_unpermute(w, heads[kind])
            sd[hfname].copy_(torch.from_numpy(w.copy()))
            raw[gname] = (blocks, qtype)
    return model, write_llama_gguf(tmp_path / "k.gguf", model, vocab_dir, raw=raw)


@pytest.mark.parametrize("qtype", list(K_TARGET), ids=lambda t: t.name)
def test_k_quants_reencoded_with_notice(vocab_dir, tmp_path, qtype):
    model, path = _k_quant_model(qtype, vocab_dir, tmp_path)
    lines = []
    m = Model(open_gguf(path, notice=lines.append), backend="numpy", cache_type="f32")
    target, name = K_TARGET[qtype], qtype.name
    how = "dequantized and requantized"
    if target == "q8_0":
        assert lines == [f"k.gguf: 8 {name} tensor(s) {how} to q8_0 (tinyllm has no {name} format)"]
    else:  # the tied embedding keeps 8 bits, as tinyllm's converter does under a 4-bit quant
        assert sorted(lines) == [
            f"k.gguf: 1 {name} tensor(s) {how} to q8_0 (tinyllm has no {name} format)",
            f"k.gguf: 7 {name} tensor(s) {how} to {target} (tinyllm has no {name} format)"]

    # requantized: exactly the tensors tinyllm's own converter makes from the decoded weights
    folder = tmp_path / "hf"
    model.save_pretrained(folder, safe_serialization=True)
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / f).write_bytes((vocab_dir / f).read_bytes())
    h = _load(convert_hf(folder, tmp_path / "k.q4", quant=target))
    for tname, want in h.file_tensors.items():
        got = m.file_tensors[tname]
        assert got.format == want.format, tname
        for part in want.parts:
            assert np.array_equal(got.parts[part], want.parts[part]), f"{tname}.{part}"

    expected = hf_logits(model, PROMPT)
    rel = np.sqrt(np.mean((m.logits(PROMPT) - expected) ** 2)) / expected.std()
    assert rel < K_TOLERANCE[qtype], f"{name} -> {target}: RMS error {rel:.4f} x std(logits)"


# GGUF type -> the tinyllm format that holds its values exactly (Q5_0, IQ4_NL: widened to q8_0)
EXACT = {T.Q4_K: "q4_k", T.Q6_K: "q6_k", T.Q5_0: "q8_0", T.IQ4_NL: "q8_0"}


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("qtype", list(EXACT), ids=lambda t: t.name)
def test_k_quant_file_loads_without_loss(vocab_dir, tmp_path, backend, qtype):
    """Q4_K / Q6_K blocks become q4_k / q6_k without any re-encoding (no notice), Q5_0 and IQ4_NL
    become q8_0 with the same scales (one notice saying so), bit for bit, and the model computes
    what transformers computes on the weights the blocks decode to."""
    model, path = _k_quant_model(qtype, vocab_dir, tmp_path)
    lines = []
    m = Model(open_gguf(path, notice=lines.append), backend=backend, cache_type="f32")  # exact cache: oracle
    fmt, name = EXACT[qtype], qtype.name
    widened = [f"k.gguf: 8 {name} tensor(s) widened without loss to q8_0 (tinyllm has no {name} format)"]
    assert lines == (widened if fmt == "q8_0" else [])
    reader = gguf.GGUFReader(path)
    blocks = {t.name: t for t in reader.tensors}
    got = m.file_tensors["layers.0.feed_forward.w2"]
    assert got.format == fmt
    want = gguf.quants.dequantize(blocks["blk.0.ffn_down.weight"].data, qtype).reshape(got.shape)
    np.testing.assert_array_equal(got.dequantize().view(np.uint32), want.view(np.uint32))
    assert all(t.format == fmt for t in m.file_tensors.values() if len(t.shape) == 2)
    expected = hf_logits(model, PROMPT)
    # measured: numpy 7e-7 (float rounding). numba quantizes activations to int8 blocks (its
    # kernels match that arithmetic exactly: test_kernels_numba): 8e-4 (Q4_K) to 7.5e-3 (IQ4_NL),
    # and 0.036 for Q6_K, whose random 16-weight scales make ffn_down inputs reach 180 x their rms
    tol = 1e-5 if backend == "numpy" else (0.06 if qtype == T.Q6_K else 0.015)
    assert np.sqrt(np.mean((m.logits(PROMPT) - expected) ** 2)) / expected.std() < tol


def q4_k_m_types(gname: str):
    """llama.cpp's Q4_K_M choice on a one-layer model: Q6_K for the (tied) head, attn_v, ffn_down."""
    return T.Q6_K if gname.split(".")[-2] in ("token_embd", "attn_v", "ffn_down") else T.Q4_K


def test_q4_k_m_file_loads_without_loss(vocab_dir, tmp_path):
    """A file mixing Q4_K and Q6_K as llama.cpp's Q4_K_M does: no notice, every tensor in its own
    format, and transformers' logits on the weights its blocks decode to."""
    model, path = _k_quant_model(q4_k_m_types, vocab_dir, tmp_path)
    lines = []
    m = Model(open_gguf(path, notice=lines.append), backend="numpy", cache_type="f32")
    assert lines == []
    formats = {name: t.format for name, t in m.file_tensors.items() if len(t.shape) == 2}
    assert {formats[n] for n in ("tok_embeddings", "layers.0.attention.wv", "layers.0.feed_forward.w2")} == {"q6_k"}
    assert formats["layers.0.attention.wq"] == formats["layers.0.feed_forward.w1"] == "q4_k"
    expected = hf_logits(model, PROMPT)
    assert np.sqrt(np.mean((m.logits(PROMPT) - expected) ** 2)) / expected.std() < 1e-5


def hf_weight(model, tinyllm_name: str) -> np.ndarray:
    hf = {f"layers.0.{ours}": f"model.layers.0.{theirs}" for theirs, ours in HF_LAYER.items()}
    hf["tok_embeddings"] = "model.embed_tokens.weight"
    return model.state_dict()[hf[tinyllm_name]].numpy()


def test_k_quant_scale_offsets(tmp_path):
    """The test's K-quant generator writes the scale fields where ggml has them: zeroing
    them must zero every decoded weight."""
    rng = np.random.default_rng(0)
    from .gguf_writer import K_SCALE_FIELDS

    for qtype, offsets in K_SCALE_FIELDS.items():
        blocks = random_k_blocks(qtype, 2, 512, rng).reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
        assert np.abs(gguf.quants.dequantize(blocks.reshape(2, -1), qtype)).max() > 0
        for o in offsets:
            blocks[:, o:o + 2] = 0
        assert not gguf.quants.dequantize(blocks.reshape(2, -1), qtype).any(), qtype.name


def test_bf16_widened_exactly(hf_llama, vocab_dir, tmp_path):
    model, folder = hf_llama
    lines = []
    m = Model(open_gguf(write_llama_gguf(tmp_path / "b.gguf", model, vocab_dir, T.BF16),
                                notice=lines.append), backend="numpy")
    assert lines and all("BF16 tensor(s) widened to f32" in line for line in lines)
    sd = model.state_dict()
    bf16 = sd["model.layers.0.mlp.down_proj.weight"].to(torch.bfloat16).float().numpy()
    assert np.array_equal(m.file_tensors["layers.0.feed_forward.w2"].dequantize(), bf16)


# -- Llama 3's rope_freqs tensor ---------------------------------------------------------------

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


def _llama3_rope_freqs(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: per-frequency divisors."""
    base = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    factor, lo, hi, old = (scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings"))
    out = []
    for freq in base:
        wavelen = 2 * np.pi / freq
        if wavelen < old / hi:
            out.append(1)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_freqs_tensor(vocab_dir, tmp_path):
    config = dict(BASE, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
    model = _hf_model(config)
    freqs = _llama3_rope_freqs(16, 500000.0, LLAMA3_ROPE)
    path = write_llama_gguf(tmp_path / "l3.gguf", model, vocab_dir, extra_tensors={"rope_freqs.weight": freqs},
                            metadata=lambda w: w.add_rope_scaling_orig_ctx_len(32))
    m = _load(path)
    assert m.config.rope_scaling["rope_type"] == "llama3"
    positions = list(range(1, 100, 3))  # past original_max_position_embeddings, where scaling matters
    assert np.abs(m.logits(positions) - hf_logits(model, positions)).max() < 1e-4

    bent = freqs.copy()
    bent[3] *= 1.5
    bad = write_llama_gguf(tmp_path / "bad.gguf", model, vocab_dir, extra_tensors={"rope_freqs.weight": bent})
    with pytest.raises(UnsupportedError, match="rope_freqs"):
        open_gguf(bad)


# -- Falcon, MPT and GPT-J GGUF files ------------------------------------------------------------------

FALCON = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=512,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
MPT = dict(d_model=96, n_heads=6, n_layers=2, vocab_size=512, max_seq_len=128, bos_token_id=1, eos_token_id=2)
GPTJ = dict(n_embd=64, n_head=4, n_layer=2, vocab_size=512, n_positions=128, bos_token_id=1, eos_token_id=2)
OTHER_ARCHS = {  # case -> (transformers class, config, GGUF writer, tokenizer folder)
    "falcon-7b-style": ("FalconForCausalLM", dict(FALCON, multi_query=True, parallel_attn=True),
                        write_falcon_gguf, "falcon-7b-instruct-tokenizer"),
    "falcon-40b-style": ("FalconForCausalLM", dict(FALCON, new_decoder_architecture=True, num_kv_heads=2,
                         rope_theta=25000.0, tie_word_embeddings=False),
                         write_falcon_gguf, "falcon-7b-instruct-tokenizer"),
    "falcon-one-norm-ffn96": ("FalconForCausalLM", dict(FALCON, new_decoder_architecture=True, num_kv_heads=2,
                              num_ln_in_parallel_attn=1, ffn_hidden_size=96), write_falcon_gguf,
                              "falcon-7b-instruct-tokenizer"),
    "mpt-6-heads-clip-qkv": ("MptForCausalLM", dict(MPT, attn_config={"clip_qkv": 0.25}), write_mpt_gguf,
                             "gpt-neox-20b-tokenizer-mpt"),
    "mpt-untied": ("MptForCausalLM", dict(MPT, n_heads=4, tie_word_embeddings=False), write_mpt_gguf,
                   "gpt-neox-20b-tokenizer-mpt"),
    "gptj-partial-rotary": ("GPTJForCausalLM", dict(GPTJ, rotary_dim=8), write_gptj_gguf, "gpt-j-6b-tokenizer"),
}


@pytest.fixture(scope="module")
def other_arch(request, tmp_path_factory):
    cls, config, writer, tok = OTHER_ARCHS[request.param]
    tok_dir = shared(tok)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, cls.replace("ForCausalLM", "Config"))(**config)).eval()
    files = [tok_dir / f for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
             if (tok_dir / f).is_file()]
    folder = save_random_model(model, tmp_path_factory.mktemp(request.param), files)
    return model, folder, writer, tok_dir / "tokenizer.json"


# every case in f32; two also in q4_0 (row slices of a fused quantized q/k/v)
OTHER_ARCH_RUNS = [(case, T.F32) for case in OTHER_ARCHS] + [
    ("falcon-40b-style", T.Q4_0), ("mpt-6-heads-clip-qkv", T.Q4_0), ("gptj-partial-rotary", T.Q4_0)]


@pytest.mark.parametrize("other_arch,qtype", OTHER_ARCH_RUNS, indirect=["other_arch"],
                         ids=[f"{case}-{q.name}" for case, q in OTHER_ARCH_RUNS])
def test_falcon_mpt_gptj_gguf_equal_hf_conversion(other_arch, tmp_path, qtype):
    model, folder, writer, tokenizer_json = other_arch
    quant = QUANT_OF[qtype]
    edge = T.Q8_0 if quant == "q4_0" else qtype
    g = _load(writer(tmp_path / "m.gguf", model, tokenizer_json, qtype, edge))
    h = _load(convert_hf(folder, tmp_path / "m.q4", quant=quant))
    gc, hc = config_dict(g.config), config_dict(h.config)
    gc.pop("max_position_embeddings", None), hc.pop("max_position_embeddings", None)  # llama.cpp: Falcon 2048
    assert gc == hc
    assert g.file_tensors.keys() == h.file_tensors.keys()
    for name, want in h.file_tensors.items():
        for part in want.parts:
            assert np.array_equal(g.file_tensors[name].parts[part], want.parts[part]), f"{name}.{part}"
    ours = g.logits(PROMPT)
    assert np.array_equal(ours, h.logits(PROMPT))
    if qtype == T.F32:
        assert np.abs(ours - hf_logits(model, PROMPT)).max() < 1e-4
        text = "Hello world, 12345 times!\n  indented"
        assert g.tokenize(text) == h.tokenize(text)


# -- vocabularies against llama.cpp's tokenizer test vectors ------------------------------------

def _vectors(folder, name):
    texts = (folder / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (folder / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts, ids)]


def _bpe_metadata(tokenizer_json, pre: str) -> dict:
    tokens, types, merges = bpe_vocab_arrays(tokenizer_json)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}


@pytest.mark.parametrize("folder,name", [("gpt-j-6b-tokenizer", "gpt-2"), ("falcon-7b-instruct-tokenizer", "falcon"),
                                         ("gpt-neox-20b-tokenizer-mpt", "mpt")])
def test_gpt2_vocab_matches_llama_cpp_vectors(folder, name):
    d = shared(folder)
    tok = Tokenizer.from_spec(tokenizer_spec_from_gguf(_bpe_metadata(d / "tokenizer.json", name)))
    cases = _vectors(d, name)
    assert len(cases) > 40
    for text, ids in cases:
        assert tok.encode(text, add_bos=False) == ids, text
        assert tok.decode(ids) == text, text


def test_llama_spm_vocab_matches_llama_cpp_vectors():
    d = shared("llama2-tokenizer")
    tokens, scores, types = zip(*gguf.vocab.SentencePieceVocab(d).all_tokens())
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [t.decode("utf-8") for t in tokens],
            "tokenizer.ggml.scores": list(scores), "tokenizer.ggml.token_type": [int(t) for t in types],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    tok = Tokenizer.from_spec(tokenizer_spec_from_gguf(meta))
    assert (tok.vocab_size, tok.add_bos) == (32000, True)
    cases = _vectors(d, "llama-spm")
    assert len(cases) > 40
    for text, ids in cases:
        assert tok.encode(text, add_bos=False) == ids, text


# llama.cpp's LLAMA3 pre-tokenizer regex (src/llama-vocab.cpp), its case-insensitive
# contractions spelled out as llama.cpp adapted them from the tokenizer.json original
LLAMA_CPP_LLAMA3_REGEX = ("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+"
                          "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def test_llama3_pre_tokenizer_splits_as_llama_cpp():
    """No Llama 3 vocabulary is at hand, so the "llama-bpe" pre-tokenizer is checked on its
    own: it splits llama.cpp's tokenizer test strings exactly where llama.cpp's regex does."""
    regex = pytest.importorskip("regex")
    tokenizers = pytest.importorskip("tokenizers")
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
            "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    pre = tokenizers.Tokenizer.from_str(tokenizer_spec_from_gguf(meta)["json"]).pre_tokenizer
    texts = [t for t, _ in _vectors(shared("llama2-tokenizer"), "llama-spm")]
    for text in texts + ["I'LL say: it's 12345 o'Clock!\r\n\n  x"]:
        assert [text[a:b] for _, (a, b) in pre.pre_tokenize_str(text)] == regex.findall(LLAMA_CPP_LLAMA3_REGEX, text)


def test_pre_tokenizer_guessed_from_architecture_or_refused():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    spec = tokenizer_spec_from_gguf(meta, "falcon")  # old files have no tokenizer.ggml.pre
    assert spec["pre_tokenizer"] == "falcon" and Tokenizer.from_spec(spec).encode("ab") == [2]
    with pytest.raises(UnsupportedError, match="pre-tokenizer 'qwen9'"):
        tokenizer_spec_from_gguf(dict(meta, **{"tokenizer.ggml.pre": "qwen9"}))
    with pytest.raises(UnsupportedError, match="tokenizer model 'rwkv'"):
        tokenizer_spec_from_gguf(dict(meta, **{"tokenizer.ggml.model": "rwkv"}))


# -- files tinyllm cannot read: clear errors ---------------------------------------------------

@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory, vocab_dir):
    model = _hf_model(dict(BASE, num_key_value_heads=2, tie_word_embeddings=True))
    return model, write_llama_gguf(tmp_path_factory.mktemp("small") / "s.gguf", model, vocab_dir, T.Q4_0)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated_gguf_refused(small_gguf, tmp_path, keep):
    _, path = small_gguf
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(FormatError, match="truncated"):
        open_gguf(cut)


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGML" + b"\0" * 100)
    with pytest.raises(FormatError, match="not a GGUF file"):
        open_gguf(p)
    with pytest.raises(TinyLLMError, match="not found"):
        open_gguf(tmp_path / "missing.gguf")


def test_unsupported_tensor_type_named(small_gguf, vocab_dir, tmp_path):
    model, _ = small_gguf
    q8_1 = np.random.default_rng(0).integers(0, 255, size=(64, 2 * 40), dtype=np.uint8)  # Q8_1: 40-byte blocks
    path = write_llama_gguf(tmp_path / "iq.gguf", model, vocab_dir, T.Q4_0,
                            raw={"blk.1.attn_v.weight": (q8_1, T.Q8_1)})
    with pytest.raises(UnsupportedError, match=r"blk\.1\.attn_v\.weight has GGUF type Q8_1"):
        open_gguf(path)


def test_widened_tensor_with_a_non_finite_scale_is_refused(small_gguf, vocab_dir, tmp_path):
    """A Q5_0 block whose float16 d is NaN: widening to q8_0 keeps the NaN scale, and the loader's
    finite check refuses the file (no NaN reaches a kernel)."""
    model, _ = small_gguf
    q5 = np.random.default_rng(0).integers(0, 255, size=(32, 2 * 22), dtype=np.uint8)   # Q5_0: 22-byte blocks
    q5.reshape(32, 2, 22)[..., :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    q5[3, :2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
    path = write_llama_gguf(tmp_path / "nan.gguf", model, vocab_dir, T.Q4_0, raw={"blk.1.attn_v.weight": (q5, T.Q5_0)})
    with pytest.raises(FormatError, match="NaN or infinite"):
        Model(open_gguf(path, notice=lambda line: None), backend="numpy")


@pytest.mark.parametrize("case,error,match", [
    ("arch", UnsupportedError, "GGUF architecture 'gemma' is not supported"),
    ("option", UnsupportedError, r"llama\.attention\.sliding_window"),
    ("experts", UnsupportedError, "mixture-of-experts"),
    ("yarn", UnsupportedError, "rope scaling type 'yarn'"),
    ("tensor", UnsupportedError, r"blk\.0\.attn_q_norm\.weight"),
    ("shape", FormatError, r"token_embd\.weight has shape"),
])
def test_unsupported_variants_refused(small_gguf, vocab_dir, tmp_path, case, error, match):
    model, _ = small_gguf
    meta = {"option": lambda w: w.add_uint32("llama.attention.sliding_window", 64),
            "experts": lambda w: w.add_expert_count(8),
            "yarn": lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.YARN), w.add_rope_scaling_factor(4.0))}
    extra = {"blk.0.attn_q_norm.weight": np.ones(16, np.float32)} if case == "tensor" else None
    path = write_llama_gguf(tmp_path / "v.gguf", model, vocab_dir, T.F32, metadata=meta.get(case), extra_tensors=extra)
    if case == "arch":  # general.architecture is the first string "llama" (u64 length 5) in the file
        length = (5).to_bytes(8, "little")
        path.write_bytes(path.read_bytes().replace(length + b"llama", length + b"gemma", 1))
    if case == "shape":  # a vocab_size that disagrees with the embedding table, patched in place
        r = gguf.GGUFReader(path, "r+")
        r.fields["llama.vocab_size"].parts[-1][0] = 500
        r.data.flush()
        del r
    with pytest.raises(error, match=match):
        open_gguf(path)


def test_unk_written_as_a_control_token_is_the_unknown_piece(vocab_dir):
    """llama.cpp's converter writes some SentencePiece vocabularies (stories260K's) with <unk> as
    a control token and no unknown_token_id: the piece spelled <unk> is still the unknown one."""
    from tinyllm.tokenizer import Tokenizer

    tokens, scores, types = zip(*gguf.vocab.SentencePieceVocab(vocab_dir).all_tokens())
    tokens = [t.decode() if isinstance(t, bytes) else t for t in tokens]
    types = [3 if t == "<unk>" else int(k) for t, k in zip(tokens, types)]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": list(tokens),
            "tokenizer.ggml.scores": list(scores), "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    tok = Tokenizer.from_spec(tokenizer_spec_from_gguf(meta, "llama"))
    assert tok.decode(tok.encode("Once upon a time")) == "Once upon a time"
    meta["tokenizer.ggml.token_type"] = [1 if t == "<unk>" else k for t, k in zip(tokens, types)]
    with pytest.raises(FormatError, match="no unknown token"):
        tokenizer_spec_from_gguf(meta, "llama")
