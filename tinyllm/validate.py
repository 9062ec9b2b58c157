"""Validate, then map: what a model source must satisfy before any of it reaches a kernel.

A source (a .q4 file, a GGUF file converted in memory) hands ``Model`` a metadata dict and
a tensor dict. Both are untrusted. The contract checked here, in this order:

    metadata     the keys Model reads, each of the type it is used as
    config       built by the architecture's Config, which checks every field (arch/common.py)
    weights      exactly the architecture's declared weight set ``arch.weights(cfg)``: no
                 tensor missing or extra, each of the declared logical shape, each part of
                 exactly the dtype and shape its format's layout implies, every float finite
    memory       what the KV cache will allocate, against the memory the machine has free

After this the kernels may trust their inputs: every index a kernel computes from a shape
is inside the arrays it is handed (the shapes agree with each other and with the config).
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from tinyllm.errors import FormatError, TinyLLMError
from tinyllm.kernels.quant import FORMATS, part_layout

# generation defaults a file may carry -> the types they must have
GENERATION_TYPES = {"temperature": (int, float), "top_k": (int,), "top_p": (int, float), "min_p": (int, float),
                    "repetition_penalty": (int, float), "do_sample": (bool,), "max_new_tokens": (int,)}


def _type_name(value) -> str:
    return type(value).__name__


def check_metadata(meta, where: str) -> None:
    """The header keys Model reads: architecture, config, tokenizer, chat_template, generation."""
    if not isinstance(meta, dict):
        raise FormatError(f"{where}: header must be a JSON object, got {_type_name(meta)}")
    for key, kind in (("architecture", str), ("config", dict), ("tokenizer", dict)):
        if not isinstance(meta.get(key), kind):
            raise FormatError(f"{where}: header {key!r} must be a {kind.__name__}, got {_type_name(meta.get(key))}")
    if not isinstance(meta.get("chat_template"), (str, type(None))):
        raise FormatError(f"{where}: header 'chat_template' must be a string or null")
    generation = meta.get("generation")
    if generation is None:
        return
    if not isinstance(generation, dict):
        raise FormatError(f"{where}: header 'generation' must be an object or null")
    for key, value in generation.items():
        kinds = GENERATION_TYPES.get(key)
        if kinds is None:
            raise FormatError(f"{where}: unknown generation default {key!r}")
        numeric = bool not in kinds
        if not isinstance(value, kinds) or (numeric and (isinstance(value, bool) or not math.isfinite(value))):
            raise FormatError(f"{where}: generation default {key}={value!r} has the wrong type")


def build_config(arch, raw: dict, where: str):
    """The architecture's Config from a header's config object: only its own field names,
    every required one present; the dataclass then checks each value."""
    fields = {f.name: f for f in dataclasses.fields(arch.Config) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise FormatError(f"{where}: config has key(s) {', '.join(map(repr, unknown[:8]))} "
                          f"that {arch.ARCH} does not define")
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in raw]
    if missing:
        raise FormatError(f"{where}: config lacks {', '.join(missing)}")
    try:
        return arch.Config(**raw)
    except TinyLLMError as e:
        raise type(e)(f"{where}: {e}") from None


def check_source(source, where: str):
    """The whole contract for a source (``metadata`` and ``tensors``): returns (architecture
    module, its validated Config). Model, `tinyllm info` and GGUF conversion all call this."""
    from tinyllm.arch import get_arch

    check_metadata(source.metadata, where)
    arch = get_arch(source.metadata["architecture"])
    cfg = build_config(arch, source.metadata["config"], where)
    check_weights(arch.weights(cfg), source.tensors, where)
    return arch, cfg


def check_weights(expected: dict, tensors: dict, where: str) -> None:
    """``tensors`` (name -> QTensor) is exactly the weight set ``expected`` (name -> shape)."""
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise FormatError(f"{where}: lacks tensor(s) {', '.join(missing[:8])}"
                          + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""))
    extra = [n for n in tensors if n not in expected]
    if extra:
        raise FormatError(f"{where}: has tensor(s) its config does not use: {', '.join(extra[:8])}")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise FormatError(f"{where}: tensor {name} has shape {tuple(t.shape)}, its config implies {tuple(shape)}")
        check_parts(name, t, where)


def check_parts(name: str, t, where: str) -> None:
    """Each part of QTensor ``t`` has exactly the dtype and shape its format's layout implies,
    and every floating-point value in it is finite (a NaN scale would poison whole rows)."""
    if t.format not in FORMATS:
        raise FormatError(f"{where}: tensor {name} has unknown format {t.format!r}")
    try:
        layout = part_layout(t.format, tuple(t.shape))
    except ValueError as e:
        raise FormatError(f"{where}: tensor {name}: {e}") from None
    if set(t.parts) != set(layout):
        raise FormatError(f"{where}: tensor {name} ({t.format}) has parts {sorted(t.parts)}, expected {sorted(layout)}")
    for part, (dtype, shape) in layout.items():
        arr = t.parts[part]
        if arr.dtype != dtype or tuple(arr.shape) != shape:
            raise FormatError(f"{where}: tensor {name} part {part} is {arr.dtype.str} {tuple(arr.shape)}, "
                              f"{t.format} of shape {tuple(t.shape)} needs {dtype.str} {shape}")
        if dtype.kind == "f" and not _all_finite(arr):
            raise FormatError(f"{where}: tensor {name} part {part} holds NaN or infinite values")


def _all_finite(arr, chunk: int = 1 << 24) -> bool:
    flat = np.asarray(arr).reshape(-1)
    return all(np.isfinite(flat[i:i + chunk]).all() for i in range(0, flat.size, chunk))


def available_memory() -> int | None:
    """Bytes this machine can still give (MemAvailable), or None where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_allocation(nbytes: int, what: str, hint: str) -> None:
    """Refuse to allocate more than the machine has free, before trying."""
    free = available_memory()
    if free is not None and nbytes > free:
        raise TinyLLMError(f"{what} needs {nbytes / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB of memory "
                           f"is available; {hint}")
