"""The package is what it says it is: one importable copy, three folders mounted one way."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import tinyllm
import tinyllm.converters
import tinyllm.kernels
from tinyllm.errors import TinyLLMError

from .conftest import REPO


def test_one_importable_copy_of_the_package():
    with pytest.raises(ImportError):
        importlib.import_module("tinyllm.tinyllm")  # the old __path__ extension made this a second copy
    assert Path(tinyllm.kernels.__file__).parent == REPO / "kernels"
    assert Path(tinyllm.converters.__file__).parent == REPO / "converters"
    with pytest.raises(TinyLLMError):  # one error class, whichever folder raises it
        tinyllm.kernels.get_backend("nonesuch")


def test_imports_are_absolute():
    """`from tinyllm.x import y` everywhere: tools (import sorters, type checkers) read the
    layout right, and no import reaches for a parent folder that is not on disk."""
    relative = [f"{p.relative_to(REPO)}:{n}" for top in ("tinyllm", "kernels", "converters")
                for p in (REPO / top).rglob("*.py")
                for n, line in enumerate(p.read_text().splitlines(), 1) if re.match(r"\s*from \.", line)]
    assert not relative, relative
