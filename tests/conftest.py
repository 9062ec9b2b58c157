"""Shared test fixtures: where the real model data lives, and tiny random HF models."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "models"


def _import_installed_kernels_package() -> None:
    """Import Hugging Face's `kernels` distribution, where installed, from site-packages. Newer
    transformers import it at start-up, and the checkout's own kernels/ directory (installed as
    tinyllm.kernels) would stand in for it whenever the repository root is on sys.path, as
    `python -m pytest` puts it; once imported, the real one is what `import kernels` finds."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if Path(p or ".").resolve() != REPO]
    try:
        importlib.import_module("kernels")
    finally:
        sys.path[:] = saved


_import_installed_kernels_package()


def shared(*parts) -> Path:
    """A path in ../shared/models; skips the test when that data is absent."""
    path = SHARED_MODELS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared model data not found: {path}")
    return path


@pytest.fixture(scope="session")
def stories_hf() -> Path:
    return shared("stories260K-hf")


@pytest.fixture(scope="session")
def stories_q8(stories_hf, tmp_path_factory) -> Path:
    """stories260K as a q8_0 .q4 file, converted once per run."""
    from .server_helpers import convert_stories

    return convert_stories(stories_hf, tmp_path_factory)


@pytest.fixture(scope="module")
def stories_model(stories_q8):
    """The q8_0 stories260K on the NumPy reference backend, one per test module."""
    import tinyllm

    return tinyllm.load(stories_q8, backend="numpy")


# The defaults of the server-facing test modules (a module defining its own wins):
@pytest.fixture(scope="module")
def model_path(stories_q8):
    return stories_q8


@pytest.fixture(scope="module")
def model(stories_model):
    return stories_model


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    # torch's own thread pool fights Numba's on 2 cores; one thread keeps oracle runs predictable
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
