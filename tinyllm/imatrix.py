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

With ``covariance`` the file also holds, per matrix, "<name>.in_cov" (n_in, n_in): the sums of
x x^T, whose mean is the input covariance H = E[x x^T] that GPTQ rounding needs
(kernels/gptq.py, ``tinyllm convert --quantizer gptq``). llama.cpp's reader skips tensors of
other names, so such a file still serves llama-quantize. It grows as n_in^2 float32 per
matrix: 1.1 MB for stories260K, about 0.5 GB for SmolLM2-135M, about 28 GB for a 7B model.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tinyllm.errors import FormatError, TinyLLMError
from tinyllm.kernels.backend import separate_matmuls

GENERAL_TYPE = "imatrix"


def gguf_names(arch: str, cfg) -> dict[str, str]:
    """tinyllm tensor name -> GGUF tensor name, for architecture ``arch`` with config ``cfg``."""
    from tinyllm.converters.gguf import GGUF_ARCHITECTURES

    table = next(t for t in GGUF_ARCHITECTURES.values() if t.arch == arch)
    return {ours: theirs for ours, theirs, _ in table.plan(cfg)}


class _Recorder:
    """A backend that is another backend, except that matmul also records its input's x^2 sums
    (and with ``covariance`` its x x^T sums)."""

    def __init__(self, ops, names: dict, covariance: bool = False):
        self._ops, self._names = ops, names          # names: id(prepared weight) -> tensor name
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.covariances: dict[str, np.ndarray] | None = {} if covariance else None
        self._last = (None, None)                    # q, k, v (gate, up) share one input: one x^T x

    def __getattr__(self, attr):
        return getattr(self._ops, attr)

    def matmul(self, x, w, bias=None):
        name = self._names.get(id(w))
        if name is not None:
            a = np.asarray(self._ops.to_numpy(x), np.float64)
            self.sums[name] = self.sums.get(name, 0) + (a * a).sum(axis=0)
            self.counts[name] = self.counts.get(name, 0) + a.shape[0]
            if self.covariances is not None:
                if self._last[0] is None or not np.array_equal(self._last[0], a):
                    self._last = (a, a.T @ a)
                self.covariances[name] = self.covariances.get(name, 0) + self._last[1]
        return self._ops.matmul(x, w, bias)

    def matmuls(self, x, ws, biases=None):  # each weight recorded: the inner backend's would bypass matmul
        return separate_matmuls(self.matmul, x, ws, biases)


def collect(model, text, n_ctx: int | None = None, max_chunks: int | None = None, progress=None,
            covariance: bool = False):
    """Run ``model`` over ``text`` (a string or token ids) in windows of ``n_ctx`` tokens, as
    perplexity does; returns (sums, counts, chunks, chunk size, covariances): tensor name ->
    (n_in,) float64 sums of x^2, name -> tokens seen, and with ``covariance`` name -> (n_in, n_in)
    sums of x x^T (else None). ``progress(done, total)`` after each window."""
    from tinyllm.perplexity import DEFAULT_CTX, text_tokens, windows

    tokens = text_tokens(model, text)
    n_ctx = n_ctx or min(DEFAULT_CTX, model.n_ctx)
    names = {}
    for name, w in model.weights.items():      # a tied output head is the embedding table: one name
        if getattr(w, "shape", None) is not None and len(w.shape) == 2:
            names.setdefault(id(w), name)
    recorder, ops = _Recorder(model.ops, names, covariance), model.ops
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
    return recorder.sums, recorder.counts, len(chunks), n_ctx, recorder.covariances


def write_imatrix(path, arch: str, cfg, sums: dict, counts: dict, dataset: str, chunks: int, chunk_size: int,
                  covariances: dict | None = None) -> None:
    """Save sums / counts (and covariance sums; tinyllm names) as a GGUF imatrix file (GGUF tensor names)."""
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
        if covariances:
            writer.add_tensor(f"{gname}.in_cov", np.asarray(covariances[name], np.float32))
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



class Covariances(Mapping):
    """GGUF tensor name -> (n_in, n_in) float64 mean input covariance, read from an imatrix
    file's "<name>.in_cov" tensors when asked for (they stay memory-mapped until then)."""

    def __init__(self, path, sums: dict, counts: dict):
        self.path, self._sums, self._counts = path, sums, counts

    def __getitem__(self, name):
        h = np.asarray(self._sums[name], np.float64) / self._counts[name]
        if not (np.isfinite(h).all() and (np.diag(h) >= 0).all() and np.allclose(h, h.T, rtol=1e-4, atol=1e-6)):
            raise FormatError(f"{self.path}: {name}.in_cov is not a covariance (non-finite, negative diagonal "
                              "or not symmetric)")
        return h

    def __iter__(self):
        return iter(self._sums)

    def __len__(self):
        return len(self._sums)


def read_covariances(path, means: dict | None = None) -> Covariances:
    """The input covariances of an imatrix file written by ``tinyllm imatrix --covariance``
    (empty when it has none, as llama-imatrix's files); ``means``: its read_imatrix, if read."""
    import gguf

    path = Path(path)
    means = read_imatrix(path) if means is None else means   # validates the file and every sum and count
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    sums, counts = {}, {}
    for key, t in tensors.items():
        if not key.endswith(".in_cov"):
            continue
        name = key[:-len(".in_cov")]
        n = means.get(name, np.empty(0)).size
        if name not in means or t.data.size != n * n:
            raise FormatError(f"{path}: {key} does not match {name}.in_sum2 ({n} inputs)")
        sums[name] = np.asarray(t.data, np.float32).reshape(n, n)
        counts[name] = float(np.asarray(tensors[name + ".counts"].data).reshape(-1)[0])
    return Covariances(path, sums, counts)
