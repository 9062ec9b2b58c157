"""Reading a Hugging Face checkpoint directory, one tensor at a time.

Weights come from model.safetensors, sharded safetensors (model.safetensors.index.json),
or pytorch_model.bin (only through torch.load(weights_only=True), only if torch is
installed: a pickle is never unpickled any other way).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..errors import TinyLLMError

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_json(path: Path, required: bool = True) -> dict | None:
    if not path.is_file():
        if required:
            raise TinyLLMError(f"{path.name} not found in {str(path.parent)!r}")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TinyLLMError(f"{path} is not valid JSON: {e}") from None


class SafetensorsFile:
    """A .safetensors file mapped read-only; ``get(name)`` returns float32 without
    reading other tensors (bf16 is widened by a 16-bit shift, exactly)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise TinyLLMError(f"{path}: truncated safetensors file")
            (n,) = struct.unpack("<Q", head)
            try:
                self.header = json.loads(f.read(n))
            except json.JSONDecodeError as e:
                raise TinyLLMError(f"{path}: corrupt safetensors header ({e})") from None
        self.header.pop("__metadata__", None)
        self.data_start = 8 + n
        self._raw = np.memmap(path, dtype=np.uint8, mode="r")

    def names(self):
        return list(self.header)

    def shape(self, name: str) -> tuple:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _ST_DTYPES:
            raise TinyLLMError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = (self.data_start + o for o in info["data_offsets"])
        if end > len(self._raw):
            raise TinyLLMError(f"{self.path}: truncated (tensor {name} ends past the end of the file)")
        arr = self._raw[begin:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(np.float32)


class TorchBinFile:
    """pytorch_model.bin through torch.load(weights_only=True): no arbitrary unpickling."""

    def __init__(self, path: Path):
        try:
            import torch
        except ImportError:
            raise TinyLLMError(f"{path.name} is a PyTorch pickle checkpoint; install torch to read it "
                               "safely (weights_only=True), or convert it to safetensors") from None
        try:
            self._state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for bad/unsafe pickles
            raise TinyLLMError(f"{path}: cannot be loaded safely with weights_only=True ({e})") from None

    def names(self):
        return list(self._state)

    def shape(self, name: str) -> tuple:
        return tuple(self._state[name].shape)

    def get(self, name: str) -> np.ndarray:
        return self._state[name].float().numpy()


class Checkpoint:
    """All weight files of a checkpoint directory behind one name -> array lookup."""

    def __init__(self, directory: Path):
        self.dir = directory
        self._where: dict[str, object] = {}
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(read_json(index)["weight_map"].values()))
            opened = [SafetensorsFile(directory / f) for f in files]
        elif (directory / "model.safetensors").is_file():
            opened = [SafetensorsFile(directory / "model.safetensors")]
        elif sorted(directory.glob("model-*.safetensors")):
            opened = [SafetensorsFile(p) for p in sorted(directory.glob("model-*.safetensors"))]
        elif (directory / "pytorch_model.bin").is_file():
            opened = [TorchBinFile(directory / "pytorch_model.bin")]
        else:
            raise TinyLLMError(f"no weights in {str(directory)!r}: looked for model.safetensors, "
                               "model.safetensors.index.json and pytorch_model.bin")
        for f in opened:
            for name in f.names():
                self._where[name] = f

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple:
        return self._where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise TinyLLMError(f"tensor {name} missing from the checkpoint in {str(self.dir)!r}")
        return self._where[name].get(name)


GENERATION_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty", "do_sample", "max_new_tokens", "min_p")


def generation_defaults(directory: Path) -> dict:
    """Sampling defaults from generation_config.json (only the keys tinyllm uses)."""
    gen = read_json(directory / "generation_config.json", required=False) or {}
    return {k: gen[k] for k in GENERATION_KEYS if gen.get(k) is not None}
