"""Architectures: one short module each, registered here by name.

An architecture module provides (the ArchModule protocol in arch/common.py)
    ARCH            its name in the .q4 header ("llama", ...)
    HF_CLASSES      the config.json "architectures" class names it reads
    Config          a dataclass built by ``Config.from_hf(config_dict)``, fields named as
                    in the checkpoint's config.json; unsupported options are refused there
    forward(cfg, w, ops, batch, tokens) -> logits (T, vocab); batch: positions and KV caches
                    of the rows (tinyllm.kvcache.Batch)
    describe(cfg)   architecture-specific lines for `tinyllm info`
"""
from __future__ import annotations

import importlib

from tinyllm.errors import UnsupportedError

# architecture name -> its module (adding an architecture: its module here, its converter
# module in converters/, an entry in the tests' table; CONTRIBUTING.md has the steps)
ARCHITECTURES = {"llama": "llama", "gptj": "gptj", "mpt": "mpt", "falcon": "falcon"}


def get_arch(name: str):
    """The module implementing architecture ``name``."""
    if name not in ARCHITECTURES:
        raise UnsupportedError(f"unknown architecture {name!r}; tinyllm supports {', '.join(ARCHITECTURES)}")
    try:
        return importlib.import_module(f"{__name__}.{ARCHITECTURES[name]}")
    except ModuleNotFoundError as e:
        raise UnsupportedError(f"architecture {name!r} is not available in this build ({e})") from None


def arch_from_hf_config(config: dict) -> str:
    """Pick the architecture for a Hugging Face config.json."""
    for cls in config.get("architectures") or []:
        if cls in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[cls]
    model_type = config.get("model_type")
    if model_type in ARCHITECTURES:
        return model_type
    names = config.get("architectures") or model_type
    raise UnsupportedError(f"unsupported architecture {names!r}; tinyllm supports "
                           f"{', '.join(sorted(HF_ARCHITECTURES))}")


# config.json "architectures" class name -> architecture name, from each module's HF_CLASSES
HF_ARCHITECTURES = {cls: name for name in ARCHITECTURES for cls in get_arch(name).HF_CLASSES}
