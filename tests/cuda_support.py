"""Who runs the CUDA tests, and where.

On a machine with a usable GPU they run on it. Without one they run under Numba's CUDA
simulator, which must be switched on before ``numba.cuda`` is first imported, so CI runs
them in their own pytest process:

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_kernels_cuda.py tests/test_model_cuda.py

In any other process (the main test run on a machine without a GPU) they skip, saying so.
"""
from __future__ import annotations

import pytest

from tinyllm.device import check_cuda, simulator_enabled
from tinyllm.errors import TinyLLMError

SIM_COMMAND = ("NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_kernels_cuda.py tests/test_model_cuda.py "
               "tests/test_backend_conformance.py")


def cuda_backend():
    """The cuda backend module, or a skip that says why and how CI runs these tests."""
    try:
        check_cuda()
    except TinyLLMError as e:
        pytest.skip(f"no CUDA device here ({e}); CI runs these under the simulator: {SIM_COMMAND}")
    from tinyllm.kernels import get_backend

    return get_backend("cuda")


def on_simulator() -> bool:
    return simulator_enabled()
