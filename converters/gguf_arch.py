"""GGUF architectures -> tinyllm: what every architecture's GGUF table shares.

Each architecture's table (``GGUF`` in converters/<arch>.py, beside its Hugging Face plan)
maps its ``{arch}.*`` metadata to the Hugging Face config.json keys of the tinyllm
architecture (so ``Config.from_hf`` validates it exactly as for a checkpoint directory),
names its tensors, and undoes llama.cpp's layout choices where tinyllm's runtime differs.
Metadata keys a table does not know are refused by name: a silently ignored option would
mean silently wrong output.
"""
from __future__ import annotations

import numpy as np


def clean_float(value) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def gguf_shapes(plan: list, expected: dict) -> dict:
    """GGUF name -> the numpy-order shape it must have, from ``plan`` and the weight set
    ``expected`` (tinyllm name -> shape). Transforms keep shapes, except row slices of a fused
    matrix, whose rows add up."""
    parts: dict[str, list] = {}
    for ours, gname, _ in plan:
        parts.setdefault(gname, []).append(tuple(expected[ours]))
    return {g: shapes[0] if len(shapes) == 1 else (sum(s[0] for s in shapes),) + shapes[0][1:]
            for g, shapes in parts.items()}


class GGUFArch:
    """A GGUF architecture table. Besides these attributes each provides two classmethods:

        hf_config(get, tensors) -> dict   config.json keys for the tinyllm Config.from_hf;
                                          ``get(key, default)`` reads "<arch>.<key>", ``tensors``
                                          maps GGUF names to GGUFTensor (.shape, .load(), .decode())
        plan(cfg) -> [(tinyllm name, GGUF name, transform of the loaded QTensor or None)]

    The shape each GGUF tensor must have follows from the plan and the architecture's weight
    set (``gguf_shapes``): a tensor read whole has its tinyllm tensor's shape, a fused one the
    rows of its slices stacked.
    """

    arch: str                       # tinyllm architecture name
    KNOWN_KEYS: set = set()         # "<arch>.<key>" suffixes this table reads or knows to be harmless
    EXTRA_TENSORS: set = set()      # GGUF tensors read into the config, not weights
