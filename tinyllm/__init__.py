"""tinyllm: a readable transformer inference engine for 4-bit block-quantized models."""
from __future__ import annotations

# kernels/ and converters/ join the package as tinyllm.kernels and tinyllm.converters in one
# way only: the package-dir mapping in pyproject.toml (install with `pip install -e .`).
__version__ = "0.1.0"

from tinyllm.errors import FormatError, TinyLLMError, UnsupportedError


def load(path, **kwargs):
    """Load a model file (.q4, or .gguf) and return a ready-to-use :class:`tinyllm.model.Model`."""
    from tinyllm.model import Model

    return Model.load(path, **kwargs)


__all__ = ["load", "TinyLLMError", "FormatError", "UnsupportedError", "__version__"]
