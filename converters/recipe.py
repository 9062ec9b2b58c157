"""How a conversion encodes each tensor: which format, and with which quantizer.

One ``Recipe`` serves both converters (Hugging Face, GGUF requantization):

- the format of each tensor for a requested ``--quant``: matrices in that format, except that
  under a 4-bit format the embedding table and output head keep 8 bits (they are read one
  row per token, or dominate the logits' accuracy); 1-D tensors (norms, biases) stay f32;
- the encoder: round to nearest (``quant.quantize``: for q4_0/q4_1/q8_0 bit-identical to
  llama.cpp's reference quantizer), or the error-minimizing search (``quantizer.py``),
  weighted by an importance matrix when one is given. q4_k always searches.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from tinyllm.errors import TinyLLMError
from tinyllm.kernels.quant import FORMATS, SUPER, QTensor, quantize
from tinyllm.kernels.quantizer import SEARCHED, quantize_searched

FOUR_BIT = ("q4_0", "q4_1", "q4_k")
EDGE_TENSORS = ("tok_embeddings", "output")
# rows quantized at a time, bounding temporaries for big matrices; a multiple of q4_k's super-block
# so each chunk's super-blocks are whole and the chunks' parts simply concatenate
ROW_CHUNK = 4096
assert ROW_CHUNK % SUPER == 0
QUANTIZERS = ("nearest", "search")


@dataclass(frozen=True)
class Recipe:
    quant: str                           # the requested format of the weight matrices
    quantizer: str = "nearest"           # for q4_0 / q4_1 (q4_k always searches)
    imatrix: dict = field(default_factory=dict)   # GGUF tensor name -> (in_features,) mean squared activation
    names: dict = field(default_factory=dict)     # tinyllm tensor name -> GGUF name (see bind)

    def __post_init__(self):
        if self.quant not in FORMATS:
            raise TinyLLMError(f"unknown quant format {self.quant!r}; choose one of {', '.join(FORMATS)}")
        if self.quantizer not in QUANTIZERS:
            raise TinyLLMError(f"unknown quantizer {self.quantizer!r}; choose one of {', '.join(QUANTIZERS)}")
        if self.quantizer == "nearest" and self.imatrix and self.quant != "q4_k":
            raise TinyLLMError("an importance matrix weights the search quantizer: use --quantizer search")
        if self.imatrix and self.quant not in SEARCHED:
            raise TinyLLMError(f"an importance matrix only changes the {', '.join(SEARCHED)} quantizers, "
                               f"not {self.quant}")

    def bind(self, arch: str, cfg) -> "Recipe":
        """The recipe for one model: its tensors' names looked up in the imatrix (GGUF names)."""
        from tinyllm.imatrix import gguf_names

        bound = replace(self, names=gguf_names(arch, cfg))
        if self.imatrix and not any(g in self.imatrix for g in bound.names.values()):
            raise TinyLLMError("the importance matrix has no entry for any tensor of this model "
                               "(made for another one?)")
        return bound

    def importance(self, name: str):
        return self.imatrix.get(self.names.get(name, name))

    def format_of(self, name: str, ndim: int) -> str:
        return format_of(name, ndim, self.quant)

    def encode(self, name: str, w: np.ndarray, fmt: str | None = None) -> QTensor:
        """Tensor ``name`` (its float values) in ``fmt`` (default: the recipe's choice for it),
        by row chunks: the same bytes as one call, bounded temporary memory."""
        fmt = fmt or self.format_of(name, w.ndim)
        imp = self.importance(name)
        if imp is not None and np.shape(imp) != (w.shape[-1],):
            raise TinyLLMError(f"the importance matrix has {np.size(imp)} values for {name}, "
                               f"which has {w.shape[-1]} input features (made for another model?)")
        if fmt in ("f32", "f16") or w.ndim != 2:
            return quantize(w, fmt)
        chunks = [self._encode(w[r:r + ROW_CHUNK], fmt, imp) for r in range(0, w.shape[0], ROW_CHUNK)]
        if len(chunks) == 1:
            return chunks[0]
        parts = {k: np.concatenate([c.parts[k] for c in chunks]) for k in chunks[0].parts}
        return QTensor(fmt, tuple(w.shape), parts)

    def _encode(self, w, fmt, imp) -> QTensor:
        if fmt == "q4_k" or (fmt in SEARCHED and self.quantizer == "search"):
            return quantize_searched(w, fmt, imp)
        return quantize(w, fmt)


def format_of(name: str, ndim: int, quant: str) -> str:
    """Which format a tensor is stored in for a requested --quant."""
    if ndim != 2:
        return "f32"  # norms, biases
    if quant in FOUR_BIT and name in EDGE_TENSORS:
        return "q8_0"
    return quant
