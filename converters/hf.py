"""Reading a Hugging Face checkpoint directory, one tensor at a time.

Weights come from model.safetensors, sharded safetensors (model.safetensors.index.json),
or pytorch_model.bin (only through torch.load(weights_only=True), only if torch is
installed: a pickle is never unpickled any other way).
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from tinyllm.errors import TinyLLMError

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

    MAX_HEADER = 100 << 20  # the safetensors library's own limit

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise TinyLLMError(f"{path}: truncated safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > min(self.MAX_HEADER, size - 8):
                raise TinyLLMError(f"{path}: corrupt safetensors file (header length {n} in a {size}-byte file)")
            try:
                self.header = json.loads(f.read(n))
            except (ValueError, RecursionError) as e:
                raise TinyLLMError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(self.header, dict):
            raise TinyLLMError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.header.pop("__metadata__", None)
        self.data_start = 8 + n
        for name, info in self.header.items():
            self._check_entry(name, info, size - self.data_start)
        self._raw = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def _check_entry(self, name: str, info, data_size: int) -> None:
        """dtype known, shape a list of sizes, data_offsets [begin, end] inside the data and
        exactly as long as the shape needs."""
        ok = (isinstance(info, dict) and info.get("dtype") in _ST_DTYPES and isinstance(info.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"]))
        if not ok:
            raise TinyLLMError(f"{self.path}: corrupt safetensors header entry for {name!r}")
        begin, end = info["data_offsets"]
        need = math.prod(info["shape"]) * np.dtype(_ST_DTYPES[info["dtype"]]).itemsize
        if not 0 <= begin <= end or end - begin != need:
            raise TinyLLMError(f"{self.path}: tensor {name} has data_offsets {info['data_offsets']} that do not "
                               f"match its shape {info['shape']} ({info['dtype']})")
        if end > data_size:
            raise TinyLLMError(f"{self.path}: truncated (tensor {name} ends past the end of the file)")

    def names(self):
        return list(self.header)

    def shape(self, name: str) -> tuple:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        begin, end = (self.data_start + o for o in info["data_offsets"])
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
            index_data = read_json(index)
            weight_map = index_data.get("weight_map") if isinstance(index_data, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise TinyLLMError(f"{index}: needs a weight_map object of tensor name -> shard file name")
            files = sorted(set(weight_map.values()))
            for f in files:
                if Path(f).name != f or not (directory / f).is_file():
                    raise TinyLLMError(f"{index} names shard {f!r}, which is not a file in {str(directory)!r}")
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
