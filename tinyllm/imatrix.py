"""Importance matrices: how much each input channel of each weight matrix matters.

``collect`` runs a model over calibration text and, for every matrix product y = x W^T,
adds up x^2 per input channel (column of W) and counts the tokens: the mean squared
activation E[x_k^2] is the weight an error on column k gets in the quantizer's objective
(kernels/quantizer.py), since the error of y is sum_k dW_k x_k.

The file is llama.cpp's GGUF imatrix format, so the two tools exchange them: general.type
"imatrix", imatrix.datasets / chunk_count / chunk_size, and per matrix two float32 tensors
named after the GGUF tensor: "<name>.in_sum2" (n_in,) sums of x^2 and "<name>.counts" (1,)
tokens. tinyllm's tensor names map to GGUF's through each architecture's GGUF table
(converters/<arch>.py), the same one the GGUF importer uses (converters/recipe.py looks them up).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tinyllm.errors import FormatError, TinyLLMError

GENERAL_TYPE = "imatrix"


def gguf_names(arch: str, cfg) -> dict[str, str]:
    """tinyllm tensor name -> GGUF tensor name, for architecture ``arch`` with config ``cfg``."""
    from tinyllm.converters.gguf import GGUF_ARCHITECTURES

    table = next(t for t in GGUF_ARCHITECTURES.values() if t.arch == arch)
    return {ours: theirs for ours, theirs, _ in table.plan(cfg)}


class _Recorder:
    """A backend that is another backend, except that matmul also records its input's x^2 sums."""

    def __init__(self, ops, names: dict):
        self._ops, self._names = ops, names          # names: id(prepared weight) -> tensor name
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def __getattr__(self, attr):
        return getattr(self._ops, attr)

    def matmul(self, x, w, bias=None):
        name = self._names.get(id(w))
        if name is not None:
            a = np.asarray(self._ops.to_numpy(x), np.float64)
            self.sums[name] = self.sums.get(name, 0) + (a * a).sum(axis=0)
            self.counts[name] = self.counts.get(name, 0) + a.shape[0]
        return self._ops.matmul(x, w, bias)


def collect(model, text, n_ctx: int | None = None, max_chunks: int | None = None, progress=None):
    """Run ``model`` over ``text`` (a string or token ids) in windows of ``n_ctx`` tokens, as
    perplexity does; returns (sums, counts): tensor name -> (n_in,) float64 sums of x^2, and
    name -> tokens seen. ``progress(done, total)`` after each window."""
    from tinyllm.perplexity import DEFAULT_CTX, text_tokens, windows

    tokens = text_tokens(model, text)
    n_ctx = n_ctx or min(DEFAULT_CTX, model.n_ctx)
    names = {}
    for name, w in model.weights.items():      # a tied output head is the embedding table: one name
        if getattr(w, "shape", None) is not None and len(w.shape) == 2:
            names.setdefault(id(w), name)
    recorder, ops = _Recorder(model.ops, names), model.ops
    chunks = windows(model, tokens, n_ctx, max_chunks) if len(tokens) >= 2 * n_ctx else [tokens[:n_ctx]]
    if len(chunks[0]) < 2:
        raise TinyLLMError(f"the calibration text is too short: {len(tokens)} token{'s' * (len(tokens) != 1)} "
                           "(BOS included), at least 2 are needed")
    model.ops = recorder
    try:
        for done, window in enumerate(chunks, 1):
            model.logits(window)
            if progress:
                progress(done, len(chunks))
    finally:
        model.ops = ops
    return recorder.sums, recorder.counts, len(chunks), n_ctx


def write_imatrix(path, arch: str, cfg, sums: dict, counts: dict, dataset: str, chunks: int, chunk_size: int) -> None:
    """Save sums / counts (tinyllm names) as a GGUF imatrix file (GGUF tensor names)."""
    import gguf

    from tinyllm.fileformat import partial_path

    to_gguf = gguf_names(arch, cfg)
    path = Path(path)
    tmp = partial_path(path, os.getpid())
    writer = gguf.GGUFWriter(str(tmp), arch=GENERAL_TYPE)
    writer.add_type(GENERAL_TYPE)
    writer.add_array("imatrix.datasets", [dataset])
    writer.add_uint32("imatrix.chunk_count", chunks)
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    written = set()
    for name in sorted(sums):
        gname = to_gguf.get(name, name)
        if gname in written:                        # fused GGUF tensors share their input
            continue
        written.add(gname)
        writer.add_tensor(f"{gname}.in_sum2", np.asarray(sums[name], np.float32))
        writer.add_tensor(f"{gname}.counts", np.array([counts[name]], np.float32))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_imatrix(path) -> dict[str, np.ndarray]:
    """A GGUF imatrix file -> GGUF tensor name -> (n_in,) float32 mean squared activation."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise TinyLLMError(f"importance matrix {str(path)!r} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise FormatError(f"{path}: not a GGUF imatrix file (llama.cpp's older .dat imatrix files are not read: "
                              "convert them with llama-imatrix --output-format gguf)")
    try:
        reader = gguf.GGUFReader(path)
        tensors = {t.name: np.asarray(t.data, np.float32).reshape(-1) for t in reader.tensors}
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, MemoryError) as e:
        raise FormatError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
    out = {}
    for key, sums in tensors.items():
        if not key.endswith(".in_sum2"):
            continue
        name = key[:-len(".in_sum2")]
        counts = tensors.get(name + ".counts")
        if counts is None or counts.size != 1:
            raise FormatError(f"{path}: {name} has sums but no single token count (a mixture-of-experts imatrix?)")
        if not (np.isfinite(sums).all() and (sums >= 0).all() and np.isfinite(counts).all() and counts[0] > 0):
            raise FormatError(f"{path}: {name} holds negative, non-finite or zero-count values")
        out[name] = sums / counts[0]
    if not out:
        raise FormatError(f"{path}: no importance data (no <tensor>.in_sum2 entries)")
    return out

