"""Runs the CUDA kernel and whole-model tests under Numba's CUDA simulator.

The simulator must be switched on before numba.cuda is first imported, so those tests
need a process of their own; this test starts it, so the one README test command covers
them. On a machine with a real GPU the main run executes them on the GPU instead.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tinyllm.device import check_cuda
from tinyllm.errors import TinyLLMError

from .conftest import REPO

CUDA_TESTS = ["tests/test_kernels_cuda.py", "tests/test_model_cuda.py", "tests/test_backend_conformance.py"]
ALLOWED_SKIP = "the cuda extra (numba-cuda) is not installed"


def _real_gpu() -> bool:
    try:
        check_cuda()
        return True
    except TinyLLMError:
        return False


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", reason="already inside the simulator run")
def test_cuda_kernels_under_simulator():
    if _real_gpu():
        pytest.skip("a real GPU is present: the CUDA tests run on it in the main test run")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *CUDA_TESTS],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, f"simulator run failed:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    assert "passed" in summary, summary
    # every simulated CUDA test ran; the one allowed skip is the check that needs a real GPU
    # compiler (numba-cuda's NVVM), which the simulator cannot stand in for
    skips = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    assert all(ALLOWED_SKIP in line for line in skips), skips
