"""benchmarks.grid_bounds: the fitted grids keep their promises, and the rotation is exact."""
from __future__ import annotations

import numpy as np
import pytest

import tinyllm
from benchmarks.grid_bounds import (
    IQ4_NL,
    fake_quantize,
    fit_affine_grid,
    fit_scaled_grid,
    fit_subscaled_grid,
    gguf_name,
    hadamard_rotated_checkpoint,
)

RNG = np.random.default_rng(7)


def _blocks(n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    x = RNG.standard_normal((n, 32)).astype(np.float32) * RNG.uniform(0.01, 2.0, (n, 1)).astype(np.float32)
    x[::7, 3] *= 6                                         # an outlier in some blocks
    return x, RNG.uniform(0.1, 3.0, x.shape).astype(np.float32)


def test_scaled_grid_values_are_a_float16_scale_times_a_level():
    x, w = _blocks()
    v = fit_scaled_grid(x, w, IQ4_NL)
    # each block's values divided by its scale land on the grid; the scale is a float16
    scales = np.array([_scale_of(values) for values in v])
    assert np.all(scales.astype(np.float16).astype(np.float32) == scales)
    levels = v / scales[:, None]
    assert np.allclose(levels, IQ4_NL[np.abs(levels[..., None] - IQ4_NL).argmin(-1)], atol=1e-3)


def test_subscaled_grid_scales_are_6_bit_multiples_of_one_float16_per_8_blocks():
    x, w = _blocks(296)                                    # 37 superblocks
    v = fit_subscaled_grid(x, w, IQ4_NL)
    scales = np.array([_scale_of(values) for values in v]).reshape(-1, 8)
    step = np.abs(scales).max(1, keepdims=True) / 31
    assert np.all(step.astype(np.float16).astype(np.float32) == step)
    codes = scales / step
    assert np.allclose(codes, np.round(codes), atol=1e-3) and np.all((codes >= -32) & (codes <= 31))
    assert (w * (x - v) ** 2).sum() > (w * (x - fit_scaled_grid(x, w, IQ4_NL)) ** 2).sum()  # coarser scales


def _scale_of(values: np.ndarray) -> np.float32:
    """The d of d * IQ4_NL[q] that produced a block: the one candidate d = value / level that
    explains every value (the largest-magnitude value is some level's multiple)."""
    big = values[np.argmax(np.abs(values))]
    if big == 0:
        return np.float32(0)                               # a scale rounded to code 0
    for level in IQ4_NL:
        d = np.float32(big / level)
        if np.allclose(values / d, IQ4_NL[np.abs(values[:, None] / d - IQ4_NL).argmin(-1)], atol=1e-3):
            return d
    raise AssertionError("block is not a scaled IQ4_NL grid")


def test_scaled_grid_search_beats_the_largest_weight_scale():
    x, w = _blocks()
    v = fit_scaled_grid(x, w, IQ4_NL)
    big = x[np.arange(len(x)), np.argmax(np.abs(x), axis=1)]
    d = (big / IQ4_NL[0]).astype(np.float16).astype(np.float32)   # the block's extreme on the grid's end
    plain = d[:, None] * IQ4_NL[np.abs(x[..., None] / d[:, None, None] - IQ4_NL).argmin(-1)]
    assert (w * (x - v) ** 2).sum() < 0.95 * (w * (x - plain) ** 2).sum()
    unsearched = fit_scaled_grid(x, w, IQ4_NL, tries=0)     # only the least-squares scale
    assert (w * (x - v) ** 2).sum() < 0.97 * (w * (x - unsearched) ** 2).sum()


@pytest.mark.parametrize("levels", [np.arange(16, dtype=np.float32) / 15,
                                    (IQ4_NL - IQ4_NL[0]) / (IQ4_NL[-1] - IQ4_NL[0])], ids=["uniform", "nl"])
def test_affine_grid_never_loses_to_min_max_rounding(levels):
    # the fit starts from min/max rounding and each alternating step can only lower the error
    x, w = _blocks()
    v = fit_affine_grid(x, w, levels)
    lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    plain = lo + (hi - lo) * levels[np.abs((x - lo)[..., None] / (hi - lo)[..., None] - levels).argmin(-1)]
    fitted, naive = (w * (x - v) ** 2).sum(1), (w * (x - plain) ** 2).sum(1)
    assert np.all(fitted <= naive * (1 + 1e-4) + 1e-9)
    assert fitted.sum() < 0.95 * naive.sum()
    assert max(len(np.unique(block)) for block in v) <= 16     # one value per level at most


def test_fake_quantize_keeps_the_shape_and_ignores_the_padding():
    weight = RNG.standard_normal((5, 48)).astype(np.float32)
    for grid in ("iq4_nl", "nl_affine", "uniform_affine"):
        out = fake_quantize(weight, grid, None)
        assert out.shape == weight.shape and np.all(np.isfinite(out))
        assert np.abs(out - weight).max() < 0.5 * np.abs(weight).max()
    importance = np.ones(48, np.float32)
    importance[40:] = 0                                    # weightless columns do not steer the fit
    out = fake_quantize(weight, "uniform_affine", importance)
    assert np.abs(out[:, :40] - weight[:, :40]).max() < 0.25 * np.abs(weight).max()


def test_gguf_names():
    assert gguf_name("model.layers.3.mlp.down_proj.weight") == "blk.3.ffn_down.weight"
    assert gguf_name("model.layers.0.self_attn.o_proj.weight") == "blk.0.attn_output.weight"


def test_hadamard_rotation_is_the_same_function(stories_hf, tmp_path):
    from tinyllm.converters.convert import convert_hf

    rotated = hadamard_rotated_checkpoint(tmp_path / "rotated")
    original = tinyllm.load(convert_hf(stories_hf, tmp_path / "a.q4", quant="f32"), backend="numpy")
    turned = tinyllm.load(convert_hf(rotated, tmp_path / "b.q4", quant="f32"), backend="numpy")
    ids = original.tokenize("Once upon a time there was")
    expected = original.logits(ids)
    np.testing.assert_allclose(turned.logits(ids), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
