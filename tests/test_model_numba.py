"""Whole models on the Numba backend against the NumPy reference backend, for every
architecture tinyllm registers (the tiny random checkpoints of test_architectures.py).

f32 weights: the backends differ only in float32 rounding order, so logits agree to 1e-4.
Quantized weights: the Numba matmuls also round the activation to int8 blocks (as llama.cpp
does), which moves logits by ~1% of their spread through these random two-layer models;
the bound (RMS difference / std(logits) < 0.05) is ~3x the measured 0.011-0.016. The top
token must agree wherever the reference's lead over the runner-up exceeds MARGIN x std
(random tiny models have near-ties; the largest single-logit move measured was 0.078 x std).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tinyllm
from tinyllm.arch import ARCHITECTURES, HF_ARCHITECTURES
from tinyllm.converters.convert import convert_hf
from tinyllm.generate import generate_ids
from tinyllm.sampling import Sampler, SamplingParams

from .hf_oracle import save_random_model
from .test_architectures import CASES, PROMPT, tokenizer_files

transformers = pytest.importorskip("transformers")

QUANT_RMS_TOL = 0.05
MARGIN = 0.2
# one case per architecture and feature family: GQA/MQA/MHA, partial rotary, ALiBi,
# clip_qkv, parallel residual, biases
NUMBA_CASES = ["llama-gqa-tied", "llama-mqa-linear-rope", "gptj-partial-rotary", "mpt-6-heads-clip-qkv",
               "falcon-7b-style", "falcon-alibi-6-heads-bias", "falcon-sequential-mha-bias"]


def test_every_registered_architecture_is_covered():
    covered = {HF_ARCHITECTURES[CASES[c][0]] for c in NUMBA_CASES}
    assert covered == set(ARCHITECTURES), f"add a case for {set(ARCHITECTURES) - covered}"


@pytest.fixture(scope="module", params=NUMBA_CASES)
def checkpoint(request, tmp_path_factory):
    model_class, config, tokenizer = CASES[request.param]
    cls = getattr(transformers, model_class)
    model = cls(cls.config_class(**config)).eval()
    root = tmp_path_factory.mktemp(request.param)
    return save_random_model(model, root / "hf", tokenizer_files(tokenizer)), root


def _both(checkpoint, quant):
    folder, root = checkpoint
    path = root / f"m-{quant}.q4"
    if not path.exists():
        convert_hf(folder, path, quant=quant)
    return tinyllm.load(path, backend="numpy", cache_type="f32"), tinyllm.load(path, backend="numba", cache_type="f32")


def test_f32_logits_match_reference(checkpoint):
    ref, fast = _both(checkpoint, "f32")
    assert fast.ops.name == "numba"
    want = ref.logits(PROMPT)
    assert np.abs(fast.logits(PROMPT) - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    fast.reset()
    steps = np.stack([fast.eval(PROMPT[:t + 1]) for t in range(len(PROMPT))])   # decode path
    assert np.abs(steps - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    greedy = Sampler(SamplingParams(temperature=0))
    ref.reset()
    fast.reset()
    assert (list(generate_ids(fast, PROMPT[:6], 12, greedy, stop_ids=[]))
            == list(generate_ids(ref, PROMPT[:6], 12, greedy, stop_ids=[])))


def _assert_close(got, want):
    assert np.sqrt(np.mean((got - want) ** 2)) / want.std() < QUANT_RMS_TOL
    top2 = np.sort(want, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > MARGIN * want.std()
    assert np.array_equal(got.argmax(1)[clear], want.argmax(1)[clear])


@pytest.mark.parametrize("quant", ["q4_0", "q4_1", "q8_0"])
def test_quantized_logits_match_reference(checkpoint, quant):
    ref, fast = _both(checkpoint, quant)
    want = ref.logits(PROMPT)
    _assert_close(fast.logits(PROMPT), want)                                    # prefill path
    fast.reset()
    _assert_close(np.stack([fast.eval(PROMPT[:t + 1]) for t in range(len(PROMPT))]), want)   # decode path


def test_the_thread_count_follows_the_model_into_other_threads():
    """Numba's thread count is per thread: a model loaded with threads=1 and run on another
    thread (as `tinyllm serve` runs it) must still use one thread there."""
    import threading

    import numba

    from tinyllm.kernels import numba_cpu

    m = tinyllm.load(Path(__file__).resolve().parents[1] / "tinyllm" / "data" / "stories260K.q4", threads=1)
    seen = []
    forward = m.arch.forward

    def spy(*args, **kwargs):
        seen.append(numba.get_num_threads())
        return forward(*args, **kwargs)

    m.arch = type("Arch", (), {"forward": staticmethod(spy)})
    t = threading.Thread(target=m.logits, args=([1, 2, 3],))
    t.start()
    t.join()
    assert seen == [1]
    numba_cpu.set_threads()  # this thread back to the default
