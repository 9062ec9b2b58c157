"""tinyllm: a readable transformer inference engine for 4-bit block-quantized models."""
from __future__ import annotations

import os as _os

# Running from a source checkout (no install): kernels/ and converters/ live beside
# this package but are imported as tinyllm.kernels / tinyllm.converters.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")) and _root not in __path__:
    __path__.append(_root)

__version__ = "0.1.0"

from .errors import FormatError, TinyLLMError, UnsupportedError  # noqa: E402


def load(path, **kwargs):
    """Load a model file (.q4, or .gguf) and return a ready-to-use :class:`tinyllm.model.Model`."""
    from .model import Model

    return Model.load(path, **kwargs)


__all__ = ["load", "TinyLLMError", "FormatError", "UnsupportedError", "__version__"]
