"""q4_0 / q4_1 / q8_0 encoders and decoders, bit-exact against the gguf package (ggml's reference)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tinyllm.kernels.quant import dequantize, from_ggml_blocks, quantize, to_ggml_blocks

gguf = pytest.importorskip("gguf")
GGML = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
        "q8_0": gguf.GGMLQuantizationType.Q8_0}
FMTS = list(GGML)


def _check_bit_exact(w: np.ndarray, fmt: str):
    ours = quantize(w, fmt)
    theirs = gguf.quants.quantize(w, GGML[fmt])
    assert np.array_equal(to_ggml_blocks(ours).reshape(theirs.shape), theirs)
    np.testing.assert_array_equal(dequantize(ours), gguf.quants.dequantize(theirs, GGML[fmt]))
    back = from_ggml_blocks(theirs, fmt, w.shape)
    for name, part in ours.parts.items():
        np.testing.assert_array_equal(back.parts[name], part)


@pytest.mark.parametrize("fmt", FMTS)
def test_random_matrices_bit_exact(fmt):
    rng = np.random.default_rng(1)
    _check_bit_exact(rng.standard_normal((33, 256)).astype(np.float32), fmt)


EDGE_CASES = {
    "zeros": np.zeros((3, 64), np.float32),
    "constant": np.full((2, 64), 0.75, np.float32),
    "negative-constant": np.full((2, 32), -3.0, np.float32),
    "huge": np.array([[6.0e4, -6.0e4] * 16, [1e30] + [0.0] * 31], np.float32),
    "tiny": np.full((1, 32), 1e-8, np.float32),
    "one-spike": np.eye(32, dtype=np.float32)[:4] * 7,
}


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_edge_cases_bit_exact(fmt, case):
    with np.errstate(over="ignore", invalid="ignore"):  # 1e30 overflows fp16, in ggml too
        _check_bit_exact(EDGE_CASES[case], fmt)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 4), st.sampled_from([32, 64, 96])),
              elements=st.floats(-1e4, 1e4, width=32)), st.sampled_from(FMTS))
def test_property_bit_exact(w, fmt):
    _check_bit_exact(w, fmt)


@pytest.mark.parametrize("fmt", FMTS)
def test_odd_tail_is_zero_padded(fmt):
    """Rows of 45 weights: the last block is padded with zeros, which decode to zeros,
    and the first 45 values decode exactly as ggml decodes the padded row."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((5, 45)).astype(np.float32)
    t = quantize(w, fmt)
    assert t.shape == (5, 45) and t.parts["d"].shape == (5, 2)
    padded = np.concatenate([w, np.zeros((5, 19), np.float32)], axis=1)
    ref = gguf.quants.dequantize(gguf.quants.quantize(padded, GGML[fmt]), GGML[fmt])
    np.testing.assert_array_equal(dequantize(t), ref[:, :45])


def test_f16_f32_round_trip():
    w = np.random.default_rng(3).standard_normal((4, 10)).astype(np.float32)
    np.testing.assert_array_equal(dequantize(quantize(w, "f32")), w)
    np.testing.assert_array_equal(dequantize(quantize(w, "f16")), w.astype(np.float16).astype(np.float32))


def test_unknown_format_refused():
    with pytest.raises(ValueError, match="unknown quant format"):
        quantize(np.zeros((1, 32)), "q3_x")
