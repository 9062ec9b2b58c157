"""GPTQ rounding (kernels/gptq.py) and the covariance imatrix that feeds it: the same grid, codes
that lower the output error, exactly nearest rounding when inputs are uncorrelated, and every
way to ask for it wrongly refused."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from tinyllm.cli import main
from tinyllm.errors import FormatError
from tinyllm.kernels import quant
from tinyllm.kernels.gptq import GPTQ_FORMATS, codes, gptq, output_error
from tinyllm.kernels.quantizer import quantize_searched

from .conftest import SHARED_MODELS

gguf = pytest.importorskip("gguf")
STORIES = SHARED_MODELS / "stories260K-hf"


def correlated_inputs(cols, seed=0, tokens=2000):
    """Activations whose channels co-vary (a random mixing of few sources) and differ in scale."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((tokens, cols // 4)) @ rng.standard_normal((cols // 4, cols))
    a = a + 0.3 * rng.standard_normal((tokens, cols))
    return a * rng.gamma(2, 1, cols)


@pytest.mark.parametrize("fmt", GPTQ_FORMATS)
@pytest.mark.parametrize("cols", [256, 172])          # whole super-blocks, and rows padded past their end
def test_gptq_keeps_the_grid_and_lowers_the_output_error(fmt, cols):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((24, cols)) * rng.gamma(2, 1, (1, cols))).astype(np.float32)
    a = correlated_inputs(cols)
    h = a.T @ a / len(a)
    grid = quantize_searched(w, fmt, np.diag(h).astype(np.float32))
    got = gptq(w, h, grid)
    assert got.format == fmt and got.shape == grid.shape
    for name, part in grid.parts.items():                # every scale as it was; only the codes moved
        if name != "qs":
            np.testing.assert_array_equal(got.parts[name], part)
    before, after = output_error(w, grid.dequantize(), h), output_error(w, got.dequantize(), h)
    assert (after <= before * (1 + 1e-12)).all()        # never worse, row by row
    assert after.sum() < 0.9 * before.sum()               # and, with correlated inputs, clearly better
    y, y_grid, y_gptq = a @ w.T, a @ grid.dequantize().T, a @ got.dequantize().T
    assert np.mean((y - y_gptq) ** 2) < np.mean((y - y_grid) ** 2)   # measured on the activations themselves
    if fmt in ("q4_k", "q6_k"):                          # and ggml decodes the result as tinyllm does
        ggml = {"q4_k": gguf.GGMLQuantizationType.Q4_K, "q6_k": gguf.GGMLQuantizationType.Q6_K}[fmt]
        if cols % 256 == 0:
            theirs = gguf.quants.dequantize(quant.to_ggml_blocks(got), ggml).reshape(got.shape)
            np.testing.assert_array_equal(theirs, got.dequantize())


@pytest.mark.parametrize("fmt", GPTQ_FORMATS)
def test_uncorrelated_inputs_leave_nearest_rounding_on_the_grid(fmt):
    """With a diagonal H no error can be carried to another column: GPTQ is round-to-nearest on
    the grid, which is what the searched encoding already holds (an exact oracle)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    h = np.diag(rng.gamma(2, 1, 256))
    grid = quantize_searched(w, fmt, np.diag(h).astype(np.float32))
    np.testing.assert_array_equal(codes(gptq(w, h, grid, damp=0.0)), codes(grid))


def test_gptq_handles_dead_channels_and_refuses_wrong_shapes():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    a = correlated_inputs(64)
    a[:, :10] = 0                                          # channels never active
    h = a.T @ a / len(a)
    got = gptq(w, h, quantize_searched(w, "q4_k", np.diag(h).astype(np.float32)))
    assert np.isfinite(got.dequantize()).all()
    with pytest.raises(ValueError, match="covariance has shape"):
        gptq(w, h[:32, :32], quantize_searched(w, "q4_k"))


# -- the covariance imatrix and `convert --quantizer gptq` on stories260K -------------------------

@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    if not STORIES.is_dir():
        pytest.skip("needs ../shared/models")
    import tinyllm

    d = tmp_path_factory.mktemp("gptq")
    run = CliRunner()
    r = run.invoke(main, ["convert", str(STORIES), "--quant", "f32", "-o", str(d / "f32.q4")])
    assert r.exit_code == 0, r.output
    m = tinyllm.load(d / "f32.q4", backend="numba")
    for name, seed in (("calib", 1), ("eval", 2)):        # the model's own stories, disjoint seeds
        (d / f"{name}.txt").write_text("\n".join(m.generate("", max_new_tokens=300, temperature=1.0,
                                                             seed=seed + 10 * i, stream=False) for i in range(3)))
    for flag, out in (([], "plain.imatrix"), (["--covariance"], "cov.imatrix")):
        r = run.invoke(main, ["imatrix", str(d / "f32.q4"), str(d / "calib.txt"), "-o", str(d / out), "--ctx", "128",
                              *flag])
        assert r.exit_code == 0, r.output
    return d


def test_covariance_imatrix_stays_a_llama_cpp_imatrix(stories):
    from tinyllm.imatrix import read_covariances, read_imatrix

    plain, cov = read_imatrix(stories / "plain.imatrix"), read_imatrix(stories / "cov.imatrix")
    assert plain.keys() == cov.keys()                     # the same in_sum2 / counts a llama.cpp reader takes
    for name in plain:
        np.testing.assert_allclose(plain[name], cov[name], rtol=1e-6)
    h = read_covariances(stories / "cov.imatrix")
    assert len(h) == len(plain) and not read_covariances(stories / "plain.imatrix")
    down = h["blk.0.ffn_down.weight"]
    assert down.shape == (plain["blk.0.ffn_down.weight"].size,) * 2
    np.testing.assert_allclose(np.diag(down), plain["blk.0.ffn_down.weight"], rtol=1e-4)   # E[x x^T]'s diagonal
    assert np.linalg.eigvalsh(down).min() > -1e-6 * np.abs(down).max()                  # a covariance


def test_gptq_file_is_closer_to_the_reference(stories):
    import tinyllm
    from tinyllm.perplexity import kl_divergence

    run = CliRunner()
    for name, extra in (("searched", []), ("gptq", ["--quantizer", "gptq"])):
        r = run.invoke(main, ["convert", str(STORIES), "--quant", "q4_k", "--imatrix", str(stories / "cov.imatrix"),
                              "-o", str(stories / f"{name}.q4"), *extra])
        assert r.exit_code == 0, r.output
    ref = tinyllm.load(stories / "f32.q4", backend="numba")
    text = (stories / "eval.txt").read_text()
    kld = {name: kl_divergence(tinyllm.load(stories / f"{name}.q4", backend="numba"), ref, text, n_ctx=128).kld[0]
           for name in ("searched", "gptq")}
    assert kld["gptq"] < 0.95 * kld["searched"], kld      # measured: 0.0478 against 0.0578 at ctx 512
    info = run.invoke(main, ["info", str(stories / "gptq.q4")])
    assert info.exit_code == 0 and "q4_k" in info.output


def test_gptq_asked_for_wrongly_is_refused(stories, tmp_path):
    run = CliRunner()
    out = tmp_path / "o.q4"
    cases = [
        (["--quant", "q4_k", "--quantizer", "gptq"], "needs input covariances"),
        (["--quant", "q4_k", "--quantizer", "gptq", "--imatrix", str(stories / "plain.imatrix")],
         "tinyllm imatrix --covariance"),
        (["--quant", "q8_0", "--quantizer", "gptq", "--imatrix", str(stories / "cov.imatrix")], "not q8_0"),
    ]
    for options, message in cases:
        r = run.invoke(main, ["convert", str(STORIES), "-o", str(out), *options])
        assert r.exit_code == 1 and message in r.output, r.output
        assert not out.exists()


def test_corrupt_covariances_are_refused(stories, tmp_path):
    from tinyllm.imatrix import read_covariances, read_imatrix

    means = read_imatrix(stories / "plain.imatrix")
    name = "blk.0.attn_q.weight"
    n = means[name].size

    def write(path, cov, size=None):
        w = gguf.GGUFWriter(str(path), arch="imatrix")
        w.add_tensor(f"{name}.in_sum2", means[name].astype(np.float32))
        w.add_tensor(f"{name}.counts", np.ones(1, np.float32))
        w.add_tensor(f"{name}.in_cov", cov.astype(np.float32))
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        return path

    with pytest.raises(FormatError, match="does not match"):
        read_covariances(write(tmp_path / "small.imatrix", np.eye(n - 1)))
    skew = np.eye(n)
    skew[0, 1] = 5
    with pytest.raises(FormatError, match="not a covariance"):
        read_covariances(write(tmp_path / "skew.imatrix", skew))[name]
    bad = write(tmp_path / "nan.imatrix", np.full((n, n), np.nan))
    r = CliRunner().invoke(main, ["convert", str(STORIES), "--quant", "q4_k", "--quantizer", "gptq", "--imatrix",
                                  str(bad), "-o", str(tmp_path / "o.q4")])
    assert r.exit_code == 1 and "not a covariance" in r.output and not (tmp_path / "o.q4").exists()
