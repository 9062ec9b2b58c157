"""q4_k and q6_k (ggml's Q4_K / Q6_K values, bit-exact against the gguf package), the error-minimizing
quantizer (never worse than round to nearest), importance matrices and KL divergence."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tinyllm.cli import main
from tinyllm.converters.recipe import Recipe
from tinyllm.errors import FormatError, TinyLLMError
from tinyllm.kernels import quant
from tinyllm.kernels.quantizer import quantize_searched, weighted_error

from .conftest import SHARED_MODELS

gguf = pytest.importorskip("gguf")
Q4_K = gguf.GGMLQuantizationType.Q4_K
GGML_TYPE = {"q4_k": Q4_K, "q6_k": gguf.GGMLQuantizationType.Q6_K}
STORIES = SHARED_MODELS / "stories260K-hf"


def rand(*shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * rng.gamma(2, 1, (1, shape[-1]))).astype(np.float32)


def _bit_exact_with_ggml(t: quant.QTensor):
    blocks = quant.to_ggml_blocks(t)
    theirs = gguf.quants.dequantize(blocks, GGML_TYPE[t.format]).reshape(t.shape)
    np.testing.assert_array_equal(t.dequantize().view(np.uint32), theirs.view(np.uint32))
    back = quant.from_ggml_blocks(blocks, t.format, t.shape)
    for name, part in t.parts.items():
        np.testing.assert_array_equal(back.parts[name], part)


EDGE = {
    "random": rand(6, 512),
    "zeros": np.zeros((2, 256), np.float32),
    "constant": np.full((2, 256), 0.75, np.float32),
    "negative": np.full((1, 256), -3.0, np.float32),
    "spike": np.eye(256, dtype=np.float32)[:3] * 7,
    "tiny": np.full((1, 256), 1e-8, np.float32),
}


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k"])
@pytest.mark.parametrize("case", list(EDGE))
@pytest.mark.parametrize("encoder", ["nearest", "searched"])
def test_k_quants_decode_bit_exactly_as_ggml(fmt, case, encoder):
    w = EDGE[case]
    t = quant.quantize(w, fmt) if encoder == "nearest" else quantize_searched(w, fmt)
    assert {k: (v.dtype, v.shape) for k, v in t.parts.items()} == quant.part_layout(fmt, w.shape)
    _bit_exact_with_ggml(t)
    if case != "tiny":  # 1e-8 / 63 is below float16's range: it decodes to 0, in ggml too
        assert np.abs(t.dequantize() - w).max() <= (0.2 if fmt == "q4_k" else 0.05) * np.abs(w).max()


# ggml block bytes and where each format's float16 scales sit in them
GGML_BLOCK = {"q4_k": (144, slice(0, 4)), "q6_k": (210, slice(208, 210))}


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k"])
def test_random_ggml_k_blocks_convert_both_ways(fmt):
    """Any Q4_K / Q6_K bytes (every scale code, every quant) survive ggml -> tinyllm -> ggml unchanged."""
    rng = np.random.default_rng(3)
    rows, cols = 5, 512
    size, scales = GGML_BLOCK[fmt]
    blocks = rng.integers(0, 256, (rows * cols // 256, size), dtype=np.uint8)
    n = (scales.stop - scales.start) // 2
    blocks[:, scales] = np.abs(rng.standard_normal((len(blocks), n))).astype(np.float16).view(np.uint8)
    t = quant.from_ggml_blocks(blocks, fmt, (rows, cols))
    assert np.array_equal(quant.to_ggml_blocks(t), blocks)
    _bit_exact_with_ggml(t)


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k"])
@pytest.mark.parametrize("cols", [64, 172, 96])
def test_super_blocks_run_across_rows(fmt, cols):
    """Rows shorter than 256 weights share super-blocks; every row still decodes on its own."""
    w = rand(11, cols, seed=cols)
    t = quantize_searched(w, fmt)
    nb = quant.n_blocks(cols)
    assert t.parts["d"].shape == ((11 * nb + 7) // 8, 2 if fmt == "q4_k" else 1)
    full = t.dequantize()
    rows = np.array([10, 0, 5])
    np.testing.assert_array_equal(t.dequantize_rows(rows), full[rows])
    assert np.abs(full - w).max() < 0.25 * np.abs(w).max()
    with pytest.raises(ValueError, match="share super-blocks"):
        t.take_rows(rows)
    with pytest.raises(ValueError, match="multiple of 256"):
        quant.to_ggml_blocks(t)


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k"])
def test_k_rows_of_whole_super_blocks_can_be_taken(fmt):
    t = quantize_searched(rand(9, 512), fmt)
    rows = np.array([8, 2, 3])
    np.testing.assert_array_equal(t.take_rows(rows).dequantize(), t.dequantize()[rows])
    np.testing.assert_array_equal(t.take_rows(slice(1, 4)).dequantize(), t.dequantize()[1:4])


def _stories_matrices():
    from tinyllm.converters.hf import Checkpoint

    ckpt = Checkpoint(STORIES)
    return {n: ckpt.get(n) for n in ckpt.names() if len(ckpt.shape(n)) == 2 and "embed" not in n}


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q4_k", "q6_k"])
def test_search_never_worse_than_round_to_nearest(fmt):
    """In the quantizer's own objective (its cost weights): q4_0/q4_1 block by block, q6_k per
    super-block, q4_k per tensor; on random matrices, with and without an importance vector, and
    on real weights."""
    cases = [(rand(16, 320, seed=s), None) for s in range(3)]
    cases.append((rand(16, 320, seed=9), np.random.default_rng(9).gamma(1, 1, 320).astype(np.float32)))
    if STORIES.is_dir():
        cases += [(w, None) for w in _stories_matrices().values()]
    gains = []
    for w, imp in cases:
        searched = weighted_error(w, quantize_searched(w, fmt, imp), imp)
        nearest = weighted_error(w, quant.quantize(w, fmt), imp)
        assert searched <= nearest * (1 + 1e-6)
        gains.append(searched / nearest)
    assert np.median(gains) < 0.95  # and it does search: a real gain, not a copy


def test_q4_k_beats_q4_0_at_the_same_bits():
    """The point of q4_k: on real weights, much less squared error than q4_0 (measured ~0.67x)."""
    if not STORIES.is_dir():
        pytest.skip("needs ../shared/models")
    mats = _stories_matrices().values()
    ratio = (sum(float(((quantize_searched(w, "q4_k").dequantize() - w) ** 2).sum()) for w in mats)
             / sum(float(((quant.quantize(w, "q4_0").dequantize() - w) ** 2).sum()) for w in mats))
    assert ratio < 0.8
    assert quant.BITS_PER_WEIGHT["q4_k"] == quant.BITS_PER_WEIGHT["q4_0"]


def test_recipe_refuses_options_that_would_be_ignored():
    with pytest.raises(TinyLLMError, match="unknown quantizer"):
        Recipe("q4_0", quantizer="best")
    with pytest.raises(TinyLLMError, match="use --quantizer search"):
        Recipe("q4_0", imatrix={"x": np.ones(4)})
    with pytest.raises(TinyLLMError, match="only changes"):
        Recipe("q8_0", quantizer="search", imatrix={"x": np.ones(4)})
    Recipe("q4_k", imatrix={"x": np.ones(4)})  # q4_k always searches
    recipe = Recipe("q4_k", imatrix={"blk.0.attn_q.weight": np.ones(3)}, names={"layers.0.attention.wq":
                                                                                  "blk.0.attn_q.weight"})
    with pytest.raises(TinyLLMError, match="has 3 values .* 4 input features"):
        recipe.encode("layers.0.attention.wq", np.ones((2, 4), np.float32))


# -- importance matrices and KL divergence on the real stories260K model ------------------------

@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    if not STORIES.is_dir():
        pytest.skip("needs ../shared/models")
    d = tmp_path_factory.mktemp("kq")
    run = CliRunner()
    for q in ("f32", "q4_0"):
        r = run.invoke(main, ["convert", str(STORIES), "--quant", q, "-o", str(d / f"{q}.q4")])
        assert r.exit_code == 0, r.output
    import tinyllm

    m = tinyllm.load(d / "f32.q4", backend="numba")
    texts = {}
    for name, seed in (("calib", 1), ("eval", 2)):   # the model's own stories, two disjoint seeds
        texts[name] = d / f"{name}.txt"
        texts[name].write_text("\n".join(m.generate("", max_new_tokens=300, temperature=1.0, seed=seed + 10 * i,
                                                    stream=False) for i in range(3)))
    return d, texts


def test_imatrix_file_is_llama_cpp_s_format_and_drives_the_quantizer(stories):
    d, texts = stories
    run = CliRunner()
    r = run.invoke(main, ["imatrix", str(d / "f32.q4"), str(texts["calib"]), "-o", str(d / "s.imatrix"),
                          "--ctx", "128"])
    assert r.exit_code == 0, r.output
    reader = gguf.GGUFReader(d / "s.imatrix")
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.chunk_size"].contents() == 128
    names = {t.name for t in reader.tensors}
    cfg = json.loads((STORIES / "config.json").read_text())
    for layer in range(cfg["num_hidden_layers"]):
        for g in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            assert {f"blk.{layer}.{g}.weight.in_sum2", f"blk.{layer}.{g}.weight.counts"} <= names
    from tinyllm.imatrix import read_imatrix

    imp = read_imatrix(d / "s.imatrix")
    assert imp["blk.0.ffn_down.weight"].shape == (cfg["intermediate_size"],)
    assert all((v >= 0).all() and v.sum() > 0 for v in imp.values())

    r = run.invoke(main, ["convert", str(STORIES), "--quant", "q4_k", "--imatrix", str(d / "s.imatrix"),
                          "-o", str(d / "q4_k_imatrix.q4")])
    assert r.exit_code == 0, r.output
    plain = run.invoke(main, ["convert", str(STORIES), "--quant", "q4_k", "-o", str(d / "q4_k.q4")])
    assert plain.exit_code == 0
    assert (d / "q4_k_imatrix.q4").read_bytes() != (d / "q4_k.q4").read_bytes()


def test_bad_imatrix_files_are_refused(stories, tmp_path):
    d, _ = stories
    run = CliRunner()
    junk = tmp_path / "junk.imatrix"
    junk.write_bytes(b"not an imatrix at all")
    r = run.invoke(main, ["convert", str(STORIES), "--quant", "q4_k", "--imatrix", str(junk), "-o",
                          str(tmp_path / "o.q4")])
    assert r.exit_code == 1 and "not a GGUF imatrix file" in r.output and not (tmp_path / "o.q4").exists()
    other = tmp_path / "other.imatrix"
    w = gguf.GGUFWriter(str(other), arch="imatrix")
    w.add_tensor("blk.0.some_other_model.weight.in_sum2", np.ones(8, np.float32))
    w.add_tensor("blk.0.some_other_model.weight.counts", np.ones(1, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    r = run.invoke(main, ["convert", str(STORIES), "--quant", "q4_k", "--imatrix", str(other), "-o",
                          str(tmp_path / "o.q4")])
    assert r.exit_code == 1 and "no entry for any tensor" in r.output
    r = run.invoke(main, ["convert", str(STORIES), "--quant", "q4_0", "--imatrix", str(other), "-o",
                          str(tmp_path / "o.q4")])
    assert r.exit_code == 1 and "--quantizer search" in r.output
    with pytest.raises(FormatError, match="no importance data"):
        empty = tmp_path / "empty.imatrix"
        w = gguf.GGUFWriter(str(empty), arch="imatrix")
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        from tinyllm.imatrix import read_imatrix

        read_imatrix(empty)


def test_imatrix_refuses_what_it_cannot_use(stories, tmp_path):
    d, _ = stories
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("", encoding="utf-8")
    r = CliRunner().invoke(main, ["imatrix", str(d / "f32.q4"), str(tiny), "-o", str(tmp_path / "x.imatrix")])
    assert r.exit_code == 1 and "too short: 1 token (BOS included)" in r.output
    assert not (tmp_path / "x.imatrix").exists()
    r = CliRunner().invoke(main, ["imatrix", str(d / "f32.q4"), str(tiny), "-o", str(tmp_path / "x.imatrix"),
                                  "--device", "cuda"])
    assert r.exit_code == 2 and "imatrix runs on the CPU" in r.output


def test_kl_divergence_against_the_reference(stories):
    d, texts = stories
    import tinyllm
    from tinyllm.perplexity import kl_divergence, perplexity

    ref = tinyllm.load(d / "f32.q4", backend="numpy")
    same = kl_divergence(ref, ref, texts["eval"].read_text(), n_ctx=64)
    assert same.kld[0] < 1e-9 and same.same_top[0] == 1 and abs(same.ppl_ratio[0] - 1) < 1e-9
    q4 = tinyllm.load(d / "q4_0.q4", backend="numpy")
    got = kl_divergence(q4, ref, texts["eval"].read_text(), n_ctx=64)
    assert 0.01 < got.kld[0] < 1 and got.kld[1] > 0 and 0.5 < got.same_top[0] < 1
    assert got.kld_max >= got.kld_p99 >= got.kld[0]
    # its PPL figures are perplexity's own, on the same windows
    assert got.ppl[0] == pytest.approx(perplexity(q4, texts["eval"].read_text(), n_ctx=64).perplexity, rel=1e-9)
    assert got.ppl_reference[0] == pytest.approx(perplexity(ref, texts["eval"].read_text(), n_ctx=64).perplexity,
                                                 rel=1e-9)
    assert got.ppl_delta[0] == pytest.approx(got.ppl[0] - got.ppl_reference[0])

    r = CliRunner().invoke(main, ["perplexity", str(d / "q4_0.q4"), str(texts["eval"]), "--ctx", "64",
                                  "--kl-divergence", str(d / "f32.q4"), "--backend", "numpy"])
    assert r.exit_code == 0, r.output
    assert f"Mean KLD            : {got.kld[0]:.6f}" in r.output and "Same top token" in r.output


def test_kl_divergence_needs_the_same_vocabulary(stories, tmp_path):
    d, texts = stories
    from tinyllm.converters.convert import convert

    smol = SHARED_MODELS / "smollm2-135m-instruct-q4_1-gguf"
    gguf_file = next(smol.glob("*.gguf"), None) if smol.is_dir() else None
    if gguf_file is None:
        pytest.skip("needs the SmolLM2 GGUF")
    r = CliRunner().invoke(main, ["perplexity", str(d / "q4_0.q4"), str(texts["eval"]), "--ctx", "64",
                                  "--kl-divergence", str(gguf_file)])
    assert r.exit_code == 1 and "vocabulary" in r.output and "Traceback" not in r.output
    assert convert  # imported: the converter module loads with the recipe


def test_mixes_follow_llama_cpp_s_tensor_choices():
    from tinyllm.converters.recipe import MORE_BITS, mix_format

    n = 32  # llama.cpp's use_more_bits: layers 0-3, 28-31, and 6, 9, ..., 27
    more = [i for i in range(n) if mix_format("q4_k_m", f"blk.{i}.ffn_down.weight", n) == MORE_BITS]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert all(mix_format("q4_k_m", f"blk.{i}.{t}.weight", n) == "q4_k" for i in range(n)
               for t in ("attn_q", "attn_k", "attn_output", "ffn_up", "ffn_gate"))
    assert [i for i in range(n) if mix_format("q4_k_s", f"blk.{i}.attn_v.weight", n) == MORE_BITS] == [0, 1, 2, 3]
    assert [i for i in range(n) if mix_format("q4_k_s", f"blk.{i}.ffn_down.weight", n) == MORE_BITS] == [0, 1, 2, 3]


def test_q4_k_m_file_says_what_it_holds(stories):
    d, _ = stories
    # spelled as llama-quantize spells it: --quant is case-insensitive
    r = CliRunner().invoke(main, ["convert", str(STORIES), "--quant", "Q4_K_M", "-o", str(d / "m.q4")])
    assert r.exit_code == 0, r.output
    import tinyllm

    m = tinyllm.load(d / "m.q4", backend="numpy")
    formats = {name: t.format for name, t in m.file_tensors.items() if len(t.shape) == 2}
    # 5 layers: use_more_bits picks layers 2 and 4; the tied embedding is the head: q6_k, as llama.cpp's
    assert {n for n, f in formats.items() if f == "q6_k"} == {
        "tok_embeddings", "layers.2.attention.wv", "layers.4.attention.wv",
        "layers.2.feed_forward.w2", "layers.4.feed_forward.w2"}
    assert set(formats.values()) == {"q4_k", "q6_k"}
    assert m.metadata["quant"] == "q4_k_m"
    info = CliRunner().invoke(main, ["info", str(d / "m.q4")])
    assert "q4_k_m" in info.output and "bits/weight" in info.output and "bits per weight" in info.output
