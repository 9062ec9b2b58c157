"""Can this machine run ``--device cuda``? ``check_cuda`` answers before any model is loaded.

Two things can be missing, and the message says which:
  * the ``cuda`` extra (numba-cuda, the maintained CUDA target for Numba, and the CUDA
    toolkit libraries it compiles with): ``pip install 'tinyllm[cuda]'``;
  * a usable NVIDIA GPU and driver (``numba.cuda.is_available()`` is false).
With ``NUMBA_ENABLE_CUDASIM=1`` Numba's CUDA simulator stands in for the GPU: slow, but it
runs the same kernels on the CPU, which is how CI tests them.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys

from tinyllm.errors import TinyLLMError

INSTALL_HINT = "pip install 'tinyllm[cuda]'"


def simulator_enabled() -> bool:
    """True when Numba's CUDA simulator is (or will be, at import) what numba.cuda means."""
    if "numba.cuda" in sys.modules:  # imported already: its mode is fixed
        return hasattr(sys.modules["numba.cuda"], "FakeCUDAKernel")
    return _sim_env()


def _sim_env() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0").strip() not in ("", "0")


def _gpu_report(cuda) -> str:
    """Why numba.cuda sees no GPU, in the driver's words (cuda.detect() prints or raises)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            cuda.detect()
    except Exception as e:  # noqa: BLE001 - the driver's own error is the explanation
        return " ".join(str(e).split()).rstrip(" :")
    return " ".join(out.getvalue().split())


def _extra_installed() -> bool:
    return importlib.util.find_spec("numba_cuda") is not None


def _nvvm_error() -> str | None:
    """Why NVVM (the compiler numba-cuda turns kernels into PTX with) cannot load, or None."""
    try:
        from numba.cuda.cudadrv import nvvm
        nvvm.NVVM()
    except Exception as e:  # noqa: BLE001 - a missing libnvvm surfaces as various errors
        return " ".join(str(e).split()) or type(e).__name__
    return None


def check_cuda() -> None:
    """Raise TinyLLMError saying what is missing for the CUDA backend; return if it can run."""
    if simulator_enabled():
        try:
            from numba import cuda  # noqa: F401 - the simulator needs no extra and no GPU
        except ImportError as e:
            raise TinyLLMError(f"NUMBA_ENABLE_CUDASIM=1 is set but numba.cuda failed to import ({e})") from None
        return
    if not _extra_installed():
        raise TinyLLMError("--device cuda needs the optional 'cuda' extra (numba-cuda), which is not "
                           f"installed: {INSTALL_HINT}")
    try:
        from numba import cuda
    except ImportError as e:
        raise TinyLLMError(f"numba-cuda is installed but does not import ({e}); reinstall it: {INSTALL_HINT}") from None
    if not cuda.is_available():
        raise TinyLLMError("--device cuda found no usable NVIDIA GPU or driver: "
                           + (_gpu_report(cuda) or "numba.cuda.is_available() is false")
                           + " (without --device cuda tinyllm runs on the CPU)")
    problem = _nvvm_error()
    if problem:
        raise TinyLLMError(f"a GPU is present but not the CUDA compiler library NVVM ({problem}); "
                           f"install it with {INSTALL_HINT}")
