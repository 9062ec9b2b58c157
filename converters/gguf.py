"""GGUF files (llama.cpp's format, the one GPT4All and llama.cpp users hold) -> tinyllm.

``open_gguf(path)`` reads a GGUF file into what ``Model`` takes from a .q4 file: ``metadata``
(architecture, config, tokenizer, chat template, generation defaults) and ``tensors``
(tinyllm name -> QTensor). ``tinyllm chat model.gguf`` uses it directly: the file is
converted in memory at load time, nothing is written to disk. ``convert_gguf(src, out)``
writes the same tensors as a .q4 file (memory-mapped at load, no conversion work).

Architectures (the ``GGUF`` table in each converters/<arch>.py): llama (LLaMA 1-3, Mistral, SmolLM, ...: GQA, tied
embeddings, q/k un-permuted back to rotate-half), falcon and mpt (fused q/k/v split into row
ranges), gptj. Vocabularies (converters/gguf_tokenizer.py): "llama" SentencePiece-style and
"gpt2" byte-level BPE.

Tensor types (GGUF -> tinyllm), decided per tensor by ``GGUFTensor.target_format``:

    F32, F16, Q4_0, Q4_1,        the same format, without loss: ggml's interleaved blocks
    Q4_K, Q6_K, Q8_0             are regrouped into tinyllm's plane-major parts, bit for bit
    BF16                         f32 (exact)
    Q5_0, IQ4_NL                 q8_0, without loss: a block's values are its float16 d times
                                 small integers (q - 16; the IQ4_NL codebook entry), which q8_0
                                 holds exactly with the same d (8.5 bits a weight instead of 5.5/4.5)
    Q2_K, Q3_K                   dequantized with gguf.quants, requantized to q4_k (searched)
    Q5_1, Q5_K, IQ4_XS           dequantized with gguf.quants, requantized to q8_0
    anything else                refused, naming the type and the tensor
    (a token embedding or output head whose choice is 4-bit gets q8_0: tinyllm's policy)

Why those targets: q4_k keeps the 2-3 bit types in their size class (4.5 bits a weight);
the others would lose precision in a 4-bit grid. No tinyllm format holds Q5_1's or Q5_K's
values exactly (a minimum per block: q6_k and q8_0 are symmetric), nor IQ4_XS's (its block
scale d (ls - 32) is not a float16), so they go to q8_0 (measured on random blocks: RMS
requantization error ~0.5% of the weights' std). Which re-encodings and widenings happened is
printed once per load. ``quant=`` (``tinyllm convert --quant``)
instead requantizes every matrix to one format, with the HF converter's policy (8-bit
embedding and output head under a 4-bit quant).
"""
from __future__ import annotations

import importlib
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from tinyllm.arch import ARCHITECTURES, get_arch
from tinyllm.converters.convert import config_dict, refuse_overwriting_input
from tinyllm.converters.gguf_arch import clean_float, gguf_shapes
from tinyllm.converters.gguf_tokenizer import tokenizer_spec_from_gguf
from tinyllm.converters.recipe import CHOICES, ROW_CHUNK, Recipe, format_of
from tinyllm.errors import FormatError, TinyLLMError, UnsupportedError, reading
from tinyllm.fileformat import ModelWriter, no_model_file
from tinyllm.kernels.quant import QTensor, from_ggml_blocks, planes
from tinyllm.validate import check_source

# GGUF architecture name -> its table: each tinyllm architecture's converter module has one
GGUF_ARCHITECTURES = {t.arch: t for t in (importlib.import_module(f"tinyllm.converters.{name}").GGUF
                                          for name in ARCHITECTURES)}
GGUF_MAGIC = b"GGUF"
LOSSLESS = {"F32": "f32", "F16": "f16", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q4_K": "q4_k", "Q6_K": "q6_k",
            "Q8_0": "q8_0"}
WIDENED = {"Q5_0": "q8_0", "IQ4_NL": "q8_0"}   # blocks of 32: float16 d (their first 2 bytes) x small integers
REQUANT = {"BF16": "f32", "Q2_K": "q4_k", "Q3_K": "q4_k", "Q5_1": "q8_0", "Q5_K": "q8_0", "IQ4_XS": "q8_0"}
# metadata values that are strings (or flags); every other "<arch>.<key>" tinyllm reads is a number
STRING_KEYS = {"rope.scaling.type", "tensor_data_layout"}
FLAG_KEYS = {"rope.scaling.finetuned"}
COUNT_KEYS = {"context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
              "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
              "rope.dimension_count"}  # sizes: whole numbers >= 1
# general.sampling.* (the file author's recommended sampling) -> generation_config.json keys
SAMPLING_KEYS = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "penalty_repeat": "repetition_penalty"}
_REQUIRED = object()

# The types of the tokenizer and general keys tinyllm reads (the "<arch>.*" keys are checked
# as they are read): "list of X" values must be lists whose every element is an X.
NUMBER = (int, float)
KEY_TYPES = {
    "tokenizer.ggml.model": str, "tokenizer.ggml.pre": str, "tokenizer.chat_template": str,
    "tokenizer.ggml.tokens": [str], "tokenizer.ggml.token_type": [int], "tokenizer.ggml.scores": [NUMBER],
    "tokenizer.ggml.merges": [str], "tokenizer.ggml.precompiled_charsmap": [int],
    **{f"tokenizer.ggml.{k}_token_id": int for k in ("bos", "eos", "eot", "eom", "padding", "unknown")},
    **{f"tokenizer.ggml.{k}": bool for k in ("add_bos_token", "add_eos_token", "add_space_prefix",
                                               "remove_extra_whitespaces")},
    **{f"general.sampling.{k}": NUMBER for k in SAMPLING_KEYS}, "general.name": str,
}


def _has_type(value, kind) -> bool:
    if isinstance(kind, list):
        return isinstance(value, list) and all(_has_type(v, kind[0]) for v in value)
    if kind is bool:
        return isinstance(value, bool)
    return isinstance(value, kind) and not isinstance(value, bool)


def check_key_types(meta: dict, path) -> None:
    for key, kind in KEY_TYPES.items():
        if key in meta and not _has_type(meta[key], kind):
            if isinstance(kind, list):
                want = f"a list of {kind[0].__name__ if isinstance(kind[0], type) else 'numbers'}"
            else:
                want = getattr(kind, "__name__", "a number")
            raise FormatError(f"{path}: GGUF metadata {key} has the wrong type (expected {want})")


def _clean(value):
    return clean_float(value) if isinstance(value, float) else value


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


class GGUFTensor:
    """One tensor of a GGUF file: its type, its numpy-order shape, and import to a QTensor."""

    def __init__(self, reader_tensor, path: Path):
        self._t = reader_tensor
        self.name = reader_tensor.name
        self.type = reader_tensor.tensor_type.name  # "Q4_1", "F32", ...
        # ggml lists dimensions fastest first (ne0 = columns): numpy order is the reverse
        self.shape = tuple(int(n) for n in reversed(reader_tensor.shape.tolist()))
        if len(self.shape) > 2:
            raise UnsupportedError(f"{path}: tensor {self.name} has {len(self.shape)} dimensions "
                                   "(tinyllm reads 1 and 2)")
        if self.type not in LOSSLESS and self.type not in WIDENED and self.type not in REQUANT:
            raise UnsupportedError(f"{path}: tensor {self.name} has GGUF type {self.type}, which tinyllm cannot read "
                                   f"(supported: {', '.join([*LOSSLESS, *WIDENED, *REQUANT])})")

    def target_format(self, name: str, quant: str | None, recipe: Recipe) -> str:
        """The tinyllm format for this tensor (tinyllm name ``name``): when ``quant`` is given, the
        (bound) recipe's choice, as the HF converter makes it; otherwise its own format, or for a
        type tinyllm lacks the REQUANT choice, again with 8-bit embedding and output head under a
        4-bit choice."""
        if quant:
            return recipe.format_of(name, len(self.shape))
        if len(self.shape) == 1:
            return "f32"
        return LOSSLESS.get(self.type) or WIDENED.get(self.type) or format_of(name, 2, REQUANT[self.type])

    def keeps(self, fmt: str) -> bool:
        """Whether this tensor becomes ``fmt`` without re-encoding (its blocks regrouped, or widened)."""
        return (LOSSLESS.get(self.type) or (WIDENED.get(self.type) if len(self.shape) == 2 else None)) == fmt

    def load(self) -> QTensor:
        """The tensor in tinyllm's format for it, every value exact (``keeps`` is true for it)."""
        if self.type in WIDENED:
            return self._widen()
        fmt, data = LOSSLESS[self.type], self._t.data
        if len(self.shape) == 1 or fmt in ("f32", "f16"):
            return QTensor(fmt, self.shape, {"w": np.asarray(data).reshape(self.shape)})
        return from_ggml_blocks(data, fmt, self.shape)

    def _widen(self) -> QTensor:
        """A Q5_0 / IQ4_NL matrix as q8_0 with the same float16 scales: value = d * integer, and
        that integer (|.| <= 127) is recovered exactly from the decoded float32 value."""
        import gguf

        rows = self.shape[0]
        blocks = np.asarray(self._t.data).reshape(rows, -1, gguf.GGML_QUANT_SIZES[self._t.tensor_type][1])
        d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]            # (rows, nb)
        values = self.decode().reshape(rows, -1, 32)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(d[..., None] != 0, np.rint(values / d.astype(np.float32)[..., None]), 0)
        q = np.nan_to_num(q).clip(-127, 127).astype(np.int8)   # non-finite d: refused by the loader's check
        return QTensor("q8_0", self.shape, {"d": np.ascontiguousarray(d), "qs": planes(q.transpose(0, 2, 1))})

    def decode(self) -> np.ndarray:
        """The tensor's values as float32 in numpy shape, for re-encoding (by row chunks: the
        dequantizer's temporaries stay bounded)."""
        rows = self.shape[0] if len(self.shape) == 2 else 1
        data = np.asarray(self._t.data).reshape(rows, -1)  # one row of ggml blocks (or floats) per matrix row
        out = np.concatenate([self._decode(data[r:r + ROW_CHUNK]) for r in range(0, rows, ROW_CHUNK)])
        return out.reshape(self.shape)

    def _decode(self, data) -> np.ndarray:
        """GGUF bytes (or floats) -> float32, last axis = columns."""
        import gguf

        qtype = self._t.tensor_type
        if self.type in ("F32", "F16"):
            return np.asarray(data, dtype=np.float32)
        return gguf.quants.dequantize(np.asarray(data), qtype).astype(np.float32, copy=False)


def _read_gguf(path: Path):
    """(key/value metadata, {name: GGUFTensor}) with clear errors for files that are not
    GGUF, truncated or corrupt. Tensor data stays memory-mapped."""
    import gguf

    if not path.is_file():
        raise no_model_file(path)
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise FormatError(f"{path}: not a GGUF file (bad magic)")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, MemoryError) as e:
        raise FormatError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
    check_key_types(meta, path)
    tensors = {}
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise FormatError(f"{path}: truncated GGUF file (tensor {t.name} ends past the end of the file)")
        tensors[t.name] = GGUFTensor(t, path)
    return meta, tensors


class GGUFModel:
    """A GGUF file in tinyllm terms; the ``source`` that ``Model`` takes (like ModelFile)."""

    def __init__(self, path, quant: str | None = None, notice=_stderr, recipe: Recipe | None = None, progress=None):
        self.path = Path(path)
        if quant is not None and quant not in CHOICES:
            raise TinyLLMError(f"unknown quant format {quant!r}; choose one of {', '.join(CHOICES)}")
        with reading(self.path):
            self._read(quant, notice, recipe, progress)

    def _read(self, quant: str | None, notice, recipe: Recipe | None, progress) -> None:
        meta, gtensors = _read_gguf(self.path)
        arch_name = meta.get("general.architecture")
        if arch_name not in GGUF_ARCHITECTURES:
            raise UnsupportedError(f"{self.path}: GGUF architecture {arch_name!r} is not supported "
                                   f"(tinyllm reads {', '.join(GGUF_ARCHITECTURES)})")
        table = GGUF_ARCHITECTURES[arch_name]
        prefix = arch_name + "."
        unknown = sorted(k for k in meta if k.startswith(prefix) and k[len(prefix):] not in table.KNOWN_KEYS)
        if unknown:
            raise UnsupportedError(f"{self.path}: unsupported GGUF option(s) {', '.join(unknown)}: "
                                   "tinyllm does not implement them")

        def get(key, default=_REQUIRED):
            value = meta.get(f"{arch_name}.{key}", default)
            if value is _REQUIRED:
                raise FormatError(f"{self.path}: GGUF metadata {arch_name}.{key} is missing")
            if value is default:
                return value
            kinds = (str,) if key in STRING_KEYS else (bool,) if key in FLAG_KEYS else (int, float)
            if not isinstance(value, kinds) or (kinds == (int, float) and isinstance(value, bool)):
                raise FormatError(f"{self.path}: GGUF metadata {arch_name}.{key}={value!r:.60} has the wrong type "
                                  f"(expected {' or '.join(k.__name__ for k in kinds)})")
            if key in COUNT_KEYS and not (isinstance(value, int) and value >= 1):
                raise FormatError(f"{self.path}: GGUF metadata {arch_name}.{key}={value!r} must be a whole number >= 1")
            return value

        arch = get_arch(table.arch)
        self.config = arch.Config.from_hf(table.hf_config(get, gtensors))
        plan = table.plan(self.config)
        used = {g for _, g, _ in plan}
        unused = sorted(set(gtensors) - used - table.EXTRA_TENSORS)
        if unused:
            raise UnsupportedError(f"{self.path}: tensors tinyllm's {table.arch} does not use "
                                   f"(an unsupported variant?): {', '.join(unused[:8])}")
        missing = sorted(used - set(gtensors))
        if missing:
            raise FormatError(f"{self.path}: GGUF file lacks tensor(s) {', '.join(missing[:8])}")

        shapes = gguf_shapes(plan, arch.weights(self.config))
        # the recipe encodes what is requantized: --quant's, else the defaults (round to nearest, q4_k searched)
        recipe = (recipe or Recipe(quant or "q4_k")).bind(table.arch, self.config)
        self.tensors: dict[str, QTensor] = {}
        # A fused GGUF tensor is read once, then sliced. Re-encoded tensors are decoded to floats
        # first and encoded after their row surgery, as the Hugging Face converter does: the rows
        # of formats whose blocks span rows (q4_k on short rows) cannot be taken apart afterwards.
        kept: dict[str, QTensor] = {}
        floats: dict[str, np.ndarray] = {}
        uses = Counter(g for _, g, _ in plan)
        recoded = Counter()
        for done, (name, gname, transform) in enumerate(plan, 1):
            if progress:
                progress(done - 1, len(plan))
            g = gtensors[gname]
            if g.shape != tuple(shapes[gname]):
                raise FormatError(f"{self.path}: tensor {gname} has shape {g.shape}, expected {tuple(shapes[gname])}")
            fmt = g.target_format(name, quant, recipe)
            uses[gname] -= 1
            if g.keeps(fmt):
                if gname not in kept:
                    kept[gname] = g.load()
                    if g.type in WIDENED:
                        recoded[g.type, "widened without loss", fmt] += 1
                t = kept[gname]
                self.tensors[name] = transform(t) if transform else t
                continue
            if gname not in floats:
                floats[gname] = g.decode()
                recoded[g.type, "widened" if g.type == "BF16" else "dequantized and requantized", fmt] += 1
            w = transform(floats[gname]) if transform else floats[gname]
            self.tensors[name] = recipe.encode(name, w, fmt)
            if uses[gname] == 0:
                del floats[gname]
        if progress:
            progress(len(plan), len(plan))
        for (src, how, fmt), n in sorted(recoded.items()):
            notice(f"{self.path.name}: {n} {src} tensor(s) {how} to {fmt}"
                   + ("" if quant else f" (tinyllm has no {src} format)"))

        matrix_formats = Counter(t.format for t in self.tensors.values() if len(t.shape) == 2)
        self.metadata = {
            "architecture": table.arch,
            "config": config_dict(self.config),
            "tokenizer": tokenizer_spec_from_gguf(meta, arch_name),
            "chat_template": meta.get("tokenizer.chat_template"),
            "generation": {ours: _clean(meta[f"general.sampling.{k}"]) for k, ours in SAMPLING_KEYS.items()
                           if f"general.sampling.{k}" in meta},
            "quant": quant or matrix_formats.most_common(1)[0][0],
            "source": {"format": "gguf", "name": meta.get("general.name") or self.path.stem},
        }


def open_gguf(path, quant: str | None = None, notice=_stderr, recipe: Recipe | None = None,
              progress=None) -> GGUFModel:
    """Read a GGUF file for ``Model``; ``notice(line)`` reports re-encoded tensor types; ``recipe``
    says how requantized tensors are encoded (default: round to nearest, q4_k searched);
    ``progress(done, total)`` as the tensors are read (done counts from 0)."""
    return GGUFModel(path, quant=quant, notice=notice, recipe=recipe, progress=progress)


def convert_gguf(src, out, quant: str | None = None, progress=None, notice=_stderr,
                 recipe: Recipe | None = None) -> Path:
    """Write GGUF file ``src`` as the .q4 file ``out``: the file's own formats where tinyllm
    has them (quant=None), or every matrix requantized to ``quant``. ``progress(done, total)``
    is called as the tensors are read and re-encoded (the slow part; writing them is a copy)."""
    out = Path(out)
    refuse_overwriting_input(Path(src), out)
    model = open_gguf(src, quant=quant, notice=notice, recipe=recipe, progress=progress)
    check_source(model, str(src))
    with ModelWriter(out, model.metadata) as writer:
        for name, t in model.tensors.items():
            writer.add(name, t)
    return out
