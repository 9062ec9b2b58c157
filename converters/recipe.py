"""How a conversion encodes each tensor: which format, and with which quantizer.

One ``Recipe`` serves both converters (Hugging Face, GGUF requantization):

- the format of each tensor for a requested ``--quant``: matrices in that format, except that
  under a 4-bit format the embedding table and output head keep 8 bits (they are read one
  row per token, or dominate the logits' accuracy); 1-D tensors (norms, biases) stay f32;
- or a mix (``q4_k_m``, ``q4_k_s``): q4_k, with more bits for the tensors llama.cpp's mixes of
  those names favour (its llama_tensor_get_type): the output head at q6_k (a tied embedding
  table is the head), an untied embedding table at q4_k, and under q4_k_m the value projection
  (attn_v, or a fused attn_qkv) and ffn_down of the first and last eighth of the layers and of
  every third layer between at q6_k (ggml's Q6_K); under q4_k_s attn_v of the first 4 layers
  and ffn_down of the first eighth, where llama.cpp uses Q5_K: tinyllm has no 5-bit K format
  and uses q6_k (MORE_BITS) there, one bit more on those tensors, never fewer;
- the encoder: round to nearest (``quant.quantize``: for q4_0/q4_1/q8_0 bit-identical to
  llama.cpp's reference quantizer), or the error-minimizing search (``quantizer.py``),
  weighted by an importance matrix when one is given. q4_k and q6_k always search. ``gptq``:
  the searched grid, its codes chosen by GPTQ against each matrix's input covariance
  (``gptq.py``; the imatrix file's in_cov tensors); q8_0 tensors stay round-to-nearest.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from tinyllm.errors import TinyLLMError
from tinyllm.kernels.gptq import GPTQ_FORMATS, gptq
from tinyllm.kernels.quant import FORMATS, K_FORMATS, SUPER, QTensor, quantize
from tinyllm.kernels.quantizer import SEARCHED, quantize_searched

FOUR_BIT = ("q4_0", "q4_1", "q4_k")
EDGE_TENSORS = ("tok_embeddings", "output")
# rows quantized at a time, bounding temporaries for big matrices; a multiple of q4_k's super-block
# so each chunk's super-blocks are whole and the chunks' parts simply concatenate
ROW_CHUNK = 4096
assert ROW_CHUNK % SUPER == 0
QUANTIZERS = ("nearest", "search", "gptq")
MIXES = ("q4_k_s", "q4_k_m")
CHOICES = FORMATS + MIXES   # what --quant accepts
MORE_BITS = "q6_k"          # the mixes' format for the tensors that matter most (ggml: Q5_K / Q6_K)


@dataclass(frozen=True)
class Recipe:
    quant: str                           # the requested format of the weight matrices
    quantizer: str = "nearest"           # for q4_0 / q4_1 (q4_k and q6_k always search)
    imatrix: dict = field(default_factory=dict)   # GGUF tensor name -> (in_features,) mean squared activation
    covariance: Mapping = field(default_factory=dict)  # GGUF tensor name -> (in, in) E[x x^T], for gptq
    names: dict = field(default_factory=dict)     # tinyllm tensor name -> GGUF name (see bind)
    n_layers: int = 0                             # (see bind)

    def __post_init__(self):
        if self.quant not in CHOICES:
            raise TinyLLMError(f"unknown quant format {self.quant!r}; choose one of {', '.join(CHOICES)}")
        if self.quantizer not in QUANTIZERS:
            raise TinyLLMError(f"unknown quantizer {self.quantizer!r}; choose one of {', '.join(QUANTIZERS)}")
        if self.quantizer == "nearest" and self.imatrix and self.quant not in K_FORMATS + MIXES:
            raise TinyLLMError("an importance matrix weights the search quantizer: use --quantizer search")
        if self.quantizer == "gptq" and not self.covariance:
            raise TinyLLMError("--quantizer gptq needs input covariances: an --imatrix file made with "
                               "`tinyllm imatrix --covariance`")
        if self.quantizer == "gptq" and self.quant not in GPTQ_FORMATS + MIXES:
            raise TinyLLMError(f"--quantizer gptq rounds {', '.join(GPTQ_FORMATS)} codes, not {self.quant}")
        if self.imatrix and self.quant not in SEARCHED + MIXES:
            raise TinyLLMError(f"an importance matrix only changes the {', '.join(SEARCHED)} quantizers, "
                               f"not {self.quant}")

    def bind(self, arch: str, cfg) -> "Recipe":
        """The recipe for one model: its tensors' names looked up in the imatrix (GGUF names)."""
        from tinyllm.imatrix import gguf_names

        bound = replace(self, names=gguf_names(arch, cfg), n_layers=cfg.num_hidden_layers)
        if self.imatrix and not any(g in self.imatrix for g in bound.names.values()):
            raise TinyLLMError("the importance matrix has no entry for any tensor of this model "
                               "(made for another one?)")
        return bound

    def importance(self, name: str):
        return self.imatrix.get(self.names.get(name, name))

    def format_of(self, name: str, ndim: int) -> str:
        if self.quant not in MIXES:
            return format_of(name, ndim, self.quant)
        if not self.names:
            raise TinyLLMError(f"{self.quant} assigns formats by tensor: the recipe must be bound to a model first")
        if ndim != 2:
            return "f32"
        if name == "output" or (name == "tok_embeddings" and "output" not in self.names):
            return MORE_BITS  # the head (llama.cpp: Q6_K)
        if name == "tok_embeddings":
            return "q4_k"
        return mix_format(self.quant, self.names.get(name, name), self.n_layers)

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
        cov = self.covariance.get(self.names.get(name, name)) if self.quantizer == "gptq" else None
        if cov is not None and np.shape(cov) != (w.shape[-1],) * 2:
            raise TinyLLMError(f"the importance matrix's covariance for {name} is {np.shape(cov)}, but it has "
                               f"{w.shape[-1]} input features (made for another model?)")
        chunks = [self._encode(w[r:r + ROW_CHUNK], fmt, imp, cov) for r in range(0, w.shape[0], ROW_CHUNK)]
        if len(chunks) == 1:
            return chunks[0]
        parts = {k: np.concatenate([c.parts[k] for c in chunks]) for k in chunks[0].parts}
        return QTensor(fmt, tuple(w.shape), parts)

    def _encode(self, w, fmt, imp, cov) -> QTensor:
        if cov is not None and fmt in GPTQ_FORMATS:
            return gptq(w, cov, quantize_searched(w, fmt, np.diag(cov).astype(np.float32) if imp is None else imp))
        if fmt in K_FORMATS or (fmt in SEARCHED and self.quantizer != "nearest"):
            return quantize_searched(w, fmt, imp)
        return quantize(w, fmt)


def format_of(name: str, ndim: int, quant: str) -> str:
    """Which format a tensor is stored in for a requested --quant."""
    if ndim != 2:
        return "f32"  # norms, biases
    if quant in FOUR_BIT and name in EDGE_TENSORS:
        return "q8_0"
    return quant


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def mix_format(mix: str, gguf_name: str, n_layers: int) -> str:
    """The format of weight matrix ``gguf_name`` (GGUF's tensor names, llama.cpp's policy
    language) in ``mix``; the embedding table and output head are decided before this."""
    m = re.fullmatch(r"blk\.(\d+)\.(attn_v|attn_qkv|ffn_down)\.weight", gguf_name)
    if m is None:
        return "q4_k"
    layer, kind = int(m[1]), m[2]
    if mix == "q4_k_m":
        return MORE_BITS if _more_bits(layer, n_layers) else "q4_k"
    limit = 4 if kind != "ffn_down" else max(n_layers // 8, 0)  # q4_k_s
    return MORE_BITS if layer < limit else "q4_k"
