"""llama2.c checkpoints (Karpathy's run.c format) and tokenizers, read as a Hugging Face LLaMA
checkpoint: a config.json-like dict, tensors under Hugging Face names, and a SentencePiece
tokenizer spec, so the one LLaMA conversion path (converters/convert.py) writes the .q4 file.

Three weight layouts, all little-endian:

- legacy (version 0, the published stories*.bin): 7 int32 (dim, hidden_dim, n_layers,
  n_heads, n_kv_heads, vocab_size, seq_len; a negative vocab_size means an unshared
  classifier), then float32: token embedding, every layer's attention norm, wq, wk, wv, wo,
  ffn norm, w1, w2, w3 (each stacked over layers), the final norm, RoPE tables (skipped: the
  runtime computes them) and the classifier when unshared;
- version 1 (export.py --version 1): a 256-byte header (magic "ak42", version, the 7 ints,
  a shared-classifier byte), then float32: the norms first, then the embedding and the matrices;
- version 2 (export.py --version 2, "int8"): the same header plus the group size, the norms
  in float32, then each matrix as int8 values followed by one float32 scale per group
  (value = q * scale), exactly what runq.c dequantizes.

llama2.c rotates adjacent pairs (2i, 2i+1) as Meta's code does; Hugging Face's rotate-half
layout takes q/k rows in another order, restored here as for a GGUF file.
"""
from __future__ import annotations

import base64
import struct
from pathlib import Path

import numpy as np

from tinyllm.converters.rows import rotate_half_from_pairs
from tinyllm.errors import TinyLLMError

MAGIC = 0x616B3432  # "ak42"
HEADER_BYTES = 256
MAX_DIM = 1 << 16  # far past any llama2.c model; keeps a hostile header's sizes in int64


def _params(values, where: str) -> dict:
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = values
    for name, v in (("dim", dim), ("hidden_dim", hidden), ("n_layers", n_layers), ("n_heads", n_heads),
                    ("n_kv_heads", n_kv), ("seq_len", seq_len), ("vocab_size", abs(vocab))):
        if not 0 < v <= MAX_DIM * 16:
            raise TinyLLMError(f"{where}: llama2.c header {name}={v} is out of range")
    if dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        raise TinyLLMError(f"{where}: llama2.c header dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv} "
                           "do not make whole, even heads")
    return {"dim": dim, "hidden": hidden, "n_layers": n_layers, "n_heads": n_heads, "n_kv": n_kv,
            "vocab": abs(vocab), "seq_len": seq_len}


def _layout(p: dict, shared: bool, version: int) -> list[tuple[str, tuple]]:
    """(llama2.c tensor name, shape) in file order; "*" names are stacked over layers."""
    D, F, L, V = p["dim"], p["hidden"], p["n_layers"], p["vocab"]
    kv = p["n_kv"] * (D // p["n_heads"])
    matrices = [("wq", (L, D, D)), ("wk", (L, kv, D)), ("wv", (L, kv, D)), ("wo", (L, D, D)),
                ("w1", (L, F, D)), ("w2", (L, D, F)), ("w3", (L, F, D))]
    head = [] if shared else [("wcls", (V, D))]
    if version == 0:
        half = D // p["n_heads"] // 2
        return ([("tok_embeddings", (V, D)), ("rms_att", (L, D))] + matrices[:4] + [("rms_ffn", (L, D))]
                + matrices[4:] + [("rms_final", (D,)), ("freq_cis_real", (p["seq_len"], half)),
                                  ("freq_cis_imag", (p["seq_len"], half))] + head)
    return [("rms_att", (L, D)), ("rms_ffn", (L, D)), ("rms_final", (D,)), ("tok_embeddings", (V, D))] \
        + matrices + head


class Llama2cCheckpoint:
    """A llama2.c .bin file, mapped read-only, with the Checkpoint interface the converter
    reads (``names``, ``shape``, ``get`` -> float32) and ``hf_config``."""

    def __init__(self, path):
        self.path = Path(path)
        where = str(self.path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < 28:
            raise TinyLLMError(f"{where}: too short for a llama2.c checkpoint ({size} bytes)")
        group = None
        if struct.unpack_from("<I", head)[0] == MAGIC:
            if len(head) < HEADER_BYTES:
                raise TinyLLMError(f"{where}: truncated llama2.c header")
            self.version = struct.unpack_from("<i", head, 4)[0]
            if self.version not in (1, 2):
                raise TinyLLMError(f"{where}: llama2.c checkpoint version {self.version} is not supported "
                                   "(versions 0, 1 and 2 are)")
            p = _params(struct.unpack_from("<7i", head, 8), where)
            shared = bool(head[36])
            if self.version == 2:
                group = struct.unpack_from("<i", head, 37)[0]
                if not 0 < group <= p["dim"] or p["dim"] % group:
                    raise TinyLLMError(f"{where}: llama2.c int8 group size {group} does not divide dim {p['dim']}")
            offset = HEADER_BYTES
        else:
            self.version = 0
            values = struct.unpack_from("<7i", head)
            p = _params(values, where)
            shared = values[5] > 0
            offset = 28
        self.params, self.shared, self.group = p, shared, group
        # name -> (offsets, shape, "f32" | "q8"); int8 matrices are stored layer by layer, each
        # its values then its scales, so a stacked one has an offset per layer
        self._entries: dict[str, tuple[list[int], tuple, str]] = {}
        for name, shape in _layout(p, shared, self.version):
            if group is not None and name.startswith(("w", "tok_")):
                layers, each = (shape[0], shape[1:]) if len(shape) == 3 else (1, shape)
                n = int(np.prod(each))
                offsets = [offset + i * (n + 4 * (n // group)) for i in range(layers)]
                self._entries[name] = (offsets, shape, "q8")
                offset += layers * (n + 4 * (n // group))
            else:
                self._entries[name] = ([offset], shape, "f32")
                offset += 4 * int(np.prod(shape))
        if offset != size:
            raise TinyLLMError(f"{where}: {size} bytes, but a llama2.c version {self.version} checkpoint with this "
                               f"header holds {offset} (truncated, or not a llama2.c file)")
        self._raw = np.memmap(self.path, dtype=np.uint8, mode="r")

    @property
    def hf_config(self) -> dict:
        p = self.params
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": p["dim"],
                "intermediate_size": p["hidden"], "num_hidden_layers": p["n_layers"],
                "num_attention_heads": p["n_heads"], "num_key_value_heads": p["n_kv"], "vocab_size": p["vocab"],
                "max_position_embeddings": p["seq_len"], "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "hidden_act": "silu", "tie_word_embeddings": self.shared}

    # -- the Checkpoint interface, under Hugging Face names ----------------------------

    def _hf_names(self) -> dict[str, tuple[str, int | None]]:
        """Hugging Face name -> (llama2.c name, layer or None)."""
        out = {"model.embed_tokens.weight": ("tok_embeddings", None), "model.norm.weight": ("rms_final", None)}
        if not self.shared:
            out["lm_head.weight"] = ("wcls", None)
        per_layer = {"input_layernorm.weight": "rms_att", "self_attn.q_proj.weight": "wq",
                     "self_attn.k_proj.weight": "wk", "self_attn.v_proj.weight": "wv",
                     "self_attn.o_proj.weight": "wo", "post_attention_layernorm.weight": "rms_ffn",
                     "mlp.gate_proj.weight": "w1", "mlp.down_proj.weight": "w2", "mlp.up_proj.weight": "w3"}
        for i in range(self.params["n_layers"]):
            out |= {f"model.layers.{i}.{hf}": (ours, i) for hf, ours in per_layer.items()}
        return out

    def names(self) -> list[str]:
        return list(self._hf_names())

    def shape(self, name: str) -> tuple:
        ours, layer = self._hf_names()[name]
        shape = self._entries[ours][1]
        return shape[1:] if layer is not None else shape

    def get(self, name: str) -> np.ndarray:
        ours, layer = self._hf_names()[name]
        w = self._read(ours)
        w = w[layer] if layer is not None else w
        p = self.params
        head_dim = p["dim"] // p["n_heads"]
        if ours in ("wq", "wk"):  # adjacent RoPE pairs -> rotate-half rows
            w = w[rotate_half_from_pairs(p["n_heads"] if ours == "wq" else p["n_kv"], head_dim)]
        return np.ascontiguousarray(w, dtype=np.float32)

    def _read(self, ours: str) -> np.ndarray:
        offsets, shape, kind = self._entries[ours]
        if kind == "f32":
            n = int(np.prod(shape))
            return self._raw[offsets[0]:offsets[0] + 4 * n].view("<f4").reshape(shape)
        n = int(np.prod(shape)) // len(offsets)  # one layer's values: q * scale, per group (runq.c)
        layers = []
        for offset in offsets:
            q = self._raw[offset:offset + n].view(np.int8).astype(np.float32)
            scales = self._raw[offset + n:offset + n + 4 * (n // self.group)].view("<f4")
            layers.append(q.reshape(-1, self.group) * scales[:, None])
        return np.stack(layers).reshape(shape)


def is_llama2c(path) -> bool:
    """Whether ``path`` looks like a llama2.c checkpoint: its magic, or a legacy header of
    plausible sizes (whether the file then holds what they promise, Llama2cCheckpoint checks)."""
    try:
        with open(path, "rb") as f:
            head = f.read(28)
        if len(head) < 28:
            return False
        if struct.unpack_from("<I", head)[0] == MAGIC:
            return True
        _params(struct.unpack_from("<7i", head), str(path))
    except (TinyLLMError, OSError):
        return False
    return True


# -- the tokenizer ---------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, value) -> bytes:
    """One protobuf field: int (varint), float (32-bit) or bytes (length-delimited)."""
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    return _varint(number << 3 | 2) + _varint(len(value)) + value


NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6  # sentencepiece's piece types


def sentencepiece_model_from_llama2c(path) -> bytes:
    """A SentencePiece BPE model (the bytes of a tokenizer.model) holding a llama2.c
    tokenizer.bin's pieces and scores. llama2.c's export wrote '▁' as ' ' and BOS/EOS as
    "\\n<s>\\n" / "\\n</s>\\n"; both are undone. The normalizer is run.c's: a dummy prefix
    space, whitespace kept as it is, byte fallback for what no piece covers."""
    path = Path(path)
    data = path.read_bytes()
    where = str(path)
    if len(data) < 4:
        raise TinyLLMError(f"{where}: too short for a llama2.c tokenizer")
    pos, pieces = 4, []
    while pos < len(data):
        if pos + 8 > len(data):
            raise TinyLLMError(f"{where}: truncated llama2.c tokenizer (piece {len(pieces)})")
        score, n = struct.unpack_from("<fi", data, pos)
        if not 0 <= n <= 1024 or pos + 8 + n > len(data):
            raise TinyLLMError(f"{where}: llama2.c tokenizer piece {len(pieces)} has a bad length {n}")
        try:
            text = data[pos + 8:pos + 8 + n].decode("utf-8")
        except UnicodeDecodeError:
            raise TinyLLMError(f"{where}: llama2.c tokenizer piece {len(pieces)} is not UTF-8") from None
        pieces.append((text, score))
        pos += 8 + n
    if len(pieces) < 3:
        raise TinyLLMError(f"{where}: a llama2.c tokenizer needs <unk>, <s> and </s> first")
    proto = b""
    seen = set()
    for i, (text, score) in enumerate(pieces):
        text = {"\n<s>\n": "<s>", "\n</s>\n": "</s>"}.get(text, text)
        kind = {0: UNKNOWN, 1: CONTROL, 2: CONTROL}.get(i, NORMAL)
        if kind == NORMAL and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            kind = BYTE
        elif kind == NORMAL:
            text = text.replace(" ", "\u2581")
        if text in seen or not text:
            raise TinyLLMError(f"{where}: llama2.c tokenizer piece {i} ({text!r}) is empty or repeated")
        seen.add(text)
        proto += _field(1, _field(1, text.encode("utf-8")) + _field(2, float(score)) + _field(3, kind))
    trainer = (_field(3, 2) + _field(4, len(pieces)) + _field(35, 1) + _field(40, 0) + _field(41, 1)
               + _field(42, 2) + _field(43, -1))
    normalizer = _field(1, b"identity") + _field(3, 1) + _field(4, 0)
    return proto + _field(2, trainer) + _field(3, normalizer)


def tokenizer_spec_from_llama2c(path) -> dict:
    """The .q4 tokenizer spec of a llama2.c tokenizer.bin: BOS 1 added, EOS 2, as run.c uses them."""
    model = sentencepiece_model_from_llama2c(path)
    return {"kind": "sentencepiece", "model": base64.b64encode(model).decode("ascii"), "added_tokens": [],
            "bos_id": 1, "eos_ids": [2], "pad_id": None, "add_bos": True}


def find_tokenizer(checkpoint: Path) -> Path:
    """The tokenizer beside a llama2.c checkpoint: tokenizer.bin, else the one tok*.bin there."""
    folder = checkpoint.parent
    if (folder / "tokenizer.bin").is_file():
        return folder / "tokenizer.bin"
    candidates = sorted(p for p in folder.glob("tok*.bin") if p != checkpoint)
    if len(candidates) == 1:
        return candidates[0]
    raise TinyLLMError(f"no llama2.c tokenizer beside {str(checkpoint)!r} (looked for tokenizer.bin and tok*.bin): "
                       "give it with --tokenizer FILE")
