"""check_cuda: `--device cuda` fails before loading anything, saying what is missing;
and CPU users never import numba.cuda."""
from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from tinyllm import device
from tinyllm.errors import TinyLLMError


def _run(code: str, sim: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if sim:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


@pytest.fixture
def no_simulator(monkeypatch):
    monkeypatch.setattr(device, "simulator_enabled", lambda: False)


def _fake_numba_cuda(monkeypatch, available: bool, detect_error: str | None = None):
    import numba

    def detect():
        if detect_error:
            raise RuntimeError(detect_error)
        print("Found 1 CUDA devices")

    fake = types.SimpleNamespace(is_available=lambda: available, detect=detect)
    monkeypatch.setattr(numba, "cuda", fake, raising=False)
    monkeypatch.setitem(sys.modules, "numba.cuda", fake)
    monkeypatch.setattr(device, "_extra_installed", lambda: True)


def test_missing_extra_names_the_pip_command(monkeypatch, no_simulator):
    monkeypatch.setattr(device, "_extra_installed", lambda: False)
    with pytest.raises(TinyLLMError, match=r"'cuda' extra \(numba-cuda\).*pip install 'tinyllm\[cuda\]'"):
        device.check_cuda()


def test_missing_gpu_says_so_in_the_drivers_words(monkeypatch, no_simulator):
    _fake_numba_cuda(monkeypatch, available=False, detect_error="CUDA driver library cannot be found.")
    with pytest.raises(TinyLLMError, match="no usable NVIDIA GPU or driver: CUDA driver library cannot be found"):
        device.check_cuda()


def test_missing_nvvm_names_the_pip_command(monkeypatch, no_simulator):
    _fake_numba_cuda(monkeypatch, available=True)
    monkeypatch.setattr(device, "_nvvm_error", lambda: "libNVVM cannot be found")
    with pytest.raises(TinyLLMError, match=r"NVVM \(libNVVM cannot be found\).*pip install 'tinyllm\[cuda\]'"):
        device.check_cuda()


def test_this_machine_gets_a_verdict_that_names_what_is_missing():
    """The real path, in a fresh process: passes on a GPU machine, else names the gap."""
    run = _run("from tinyllm.device import check_cuda; check_cuda(); print('usable')", sim=False)
    if run.returncode == 0:
        assert run.stdout.strip() == "usable"
        return
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("tinyllm.errors.TinyLLMError: ")
    if device._extra_installed():
        assert "no usable NVIDIA GPU" in last or "NVVM" in last
    else:
        assert "pip install 'tinyllm[cuda]'" in last


def test_simulator_counts_as_a_device():
    run = _run("from tinyllm.device import check_cuda; check_cuda(); print('ok')", sim=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"


def test_cpu_paths_never_import_numba_cuda():
    run = _run("import sys, tinyllm, tinyllm.model, tinyllm.device\n"
               "from tinyllm.kernels import get_backend\n"
               "get_backend('numpy')\n"
               "print('numba.cuda' in sys.modules)", sim=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


def test_load_checks_the_device_before_touching_the_model():
    """No GPU: the CUDA verdict comes first, even for a file that does not exist."""
    run = _run("import tinyllm; tinyllm.load('no-such-model.q4', device='cuda')", sim=False)
    if run.returncode == 0 or "no-such-model" in run.stderr and "GPU" not in run.stderr:
        pytest.skip("this machine can run CUDA: the device check passes and the file check follows")
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("tinyllm.errors.TinyLLMError: ")
    assert "no-such-model" not in last and ("GPU" in last or "tinyllm[cuda]" in last or "NVVM" in last)
