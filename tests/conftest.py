"""Shared test fixtures: where the real model data lives, and tiny random HF models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "models"


def shared(*parts) -> Path:
    """A path in ../shared/models; skips the test when that data is absent."""
    path = SHARED_MODELS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared model data not found: {path}")
    return path


@pytest.fixture(scope="session")
def stories_hf() -> Path:
    return shared("stories260K-hf")


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    # torch's own thread pool fights Numba's on 2 cores; one thread keeps oracle runs predictable
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
