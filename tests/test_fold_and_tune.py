"""benchmarks.fold_and_tune: the AWQ fold is the same function, and its imatrix follows the scales."""
from __future__ import annotations

import json
import shutil

import numpy as np

import tinyllm
from benchmarks.fold_and_tune import awq
from benchmarks.grid_bounds import gguf_name


def _statistics(weights: dict, rng) -> tuple[dict, dict]:
    """Made-up input statistics for every matrix: uneven channel scales, correlated channels."""
    imp, cov = {}, {}
    for name, w in weights.items():
        if w.ndim == 2 and ".layers." in name:
            a = rng.standard_normal((4 * w.shape[1], w.shape[1])) * rng.uniform(0.1, 3.0, w.shape[1])
            h = a.T @ a / len(a)
            imp[gguf_name(name)], cov[gguf_name(name)] = np.diag(h).copy(), h
    return imp, cov


def test_awq_fold_is_the_same_function_and_rescales_the_imatrix(stories_hf, tmp_path):
    from safetensors.numpy import load_file, save_file

    from tinyllm.converters.convert import convert_hf

    original = load_file(stories_hf / "model.safetensors")
    weights = {k: v.astype(np.float64) for k, v in original.items()}
    imp, cov = _statistics(weights, np.random.default_rng(3))
    cfg = json.loads((stories_hf / "config.json").read_text())
    new_imp, new_cov = awq(weights, imp, cov, cfg, [0.0, 0.5, 1.0])

    changed = [k for k in original if not np.allclose(weights[k], original[k])]
    assert any("norm" in k for k in changed) and any("v_proj" in k for k in changed)   # something was scaled
    for g in new_imp:                                        # E[x'^2] = E[x^2] / s^2, the same s in H
        s = np.sqrt(imp[g] / new_imp[g])
        np.testing.assert_allclose(new_cov[g], cov[g] / np.outer(s, s), rtol=1e-10)
    for name in original:                                    # ... the s the matrix's columns were scaled by
        if any(m in name for m in ("q_proj", "k_proj", "gate_proj", "down_proj", "o_proj")):   # columns only
            g = gguf_name(name)
            np.testing.assert_allclose(weights[name][0] / original[name][0], np.sqrt(imp[g] / new_imp[g]), rtol=1e-5)

    folded = tmp_path / "folded"
    shutil.copytree(stories_hf, folded)
    save_file({k: v.astype(np.float32) for k, v in weights.items()}, folded / "model.safetensors")
    # an f32 key/value cache: in float16, v's rescaled rows would round differently
    a = tinyllm.load(convert_hf(stories_hf, tmp_path / "a.q4", quant="f32"), backend="numpy", cache_type="f32")
    b = tinyllm.load(convert_hf(folded, tmp_path / "b.q4", quant="f32"), backend="numpy", cache_type="f32")
    ids = a.tokenize("Once upon a time there was")
    expected = a.logits(ids)
    np.testing.assert_allclose(b.logits(ids), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
