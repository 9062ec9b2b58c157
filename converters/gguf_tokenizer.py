"""A GGUF file's vocabulary (``tokenizer.ggml.*`` metadata) -> a tinyllm tokenizer spec.

GGUF stores the vocabulary as arrays, not as a tokenizer file. The two kinds llama.cpp
writes are rebuilt here as the files the reference libraries read, so tokenization is
done by the same code paths as for Hugging Face checkpoints (tinyllm/tokenizer.py):

    "llama" (SentencePiece-style: tokens, scores, token types, <0xNN> byte pieces)
        -> a SentencePiece ModelProto (BPE model, byte fallback, identity normalizer,
           dummy prefix from tokenizer.ggml.add_space_prefix): llama.cpp's SPM tokenizer
           merges the highest-scoring adjacent pair first, exactly as SentencePiece's BPE.
           Whitespace is kept as written (llama.cpp does not apply a tokenizer.model's
           remove_extra_whitespaces, and GGUF does not record it unless
           tokenizer.ggml.remove_extra_whitespaces says so).
    "gpt2" (byte-level BPE: tokens, merges, pre-tokenizer name tokenizer.ggml.pre)
        -> a tokenizer.json with that BPE model and the pre-tokenizer of the model family
           the name stands for (PRE_TOKENIZERS below).

GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
(the same numbers as SentencePiece's piece types). Control tokens become special tokens,
user-defined ones non-special added tokens (matched literally in text, as llama.cpp does).
"""
from __future__ import annotations

import base64
import json
import struct

from tinyllm.errors import FormatError, UnsupportedError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# -- byte-level BPE pre-tokenizers, by llama.cpp's tokenizer.ggml.pre name ----------------
# Each is the "pre_tokenizer" (and "normalizer") of the Hugging Face tokenizer.json that
# llama.cpp's convert_hf_to_gguf_update.py identifies by that name.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_DIGITS_THEN_BYTE_LEVEL = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]}
_FALCON = {"type": "Sequence", "pretokenizers": [
    {"type": "Punctuation", "behavior": "Contiguous"}, _BYTE_LEVEL,
    {"type": "Digits", "individual_digits": False},
    {"type": "Split", "pattern": {"Regex": "[0-9][0-9][0-9]"}, "behavior": "Isolated", "invert": False}]}
_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_LLAMA3 = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": _LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
    dict(_BYTE_LEVEL, use_regex=False)]}

# name -> (normalizer, pre_tokenizer, ignore_merges)
PRE_TOKENIZERS = {
    "gpt-2": (None, _BYTE_LEVEL, False),            # GPT-2, GPT-J
    "mpt": ({"type": "NFC"}, _BYTE_LEVEL, False),   # MPT (the GPT-NeoX-20B tokenizer)
    "gpt-neox": ({"type": "NFC"}, _BYTE_LEVEL, False),
    "falcon": (None, _FALCON, False),
    "smollm": (None, _DIGITS_THEN_BYTE_LEVEL, False),   # SmolLM / SmolLM2
    "starcoder": (None, _DIGITS_THEN_BYTE_LEVEL, False),
    "refact": (None, _DIGITS_THEN_BYTE_LEVEL, False),
    "llama-bpe": (None, _LLAMA3, True),             # Llama 3 / 3.1 / 3.2
}
# Older GGUF files have no tokenizer.ggml.pre; llama.cpp then guesses "default", which is
# none of the above. The architecture says which tokenizer family the file must have.
PRE_BY_ARCHITECTURE = {"gptj": "gpt-2", "mpt": "mpt", "falcon": "falcon", "starcoder": "starcoder"}


def tokenizer_spec_from_gguf(meta: dict, architecture: str | None = None) -> dict:
    """GGUF key/values (``tokenizer.ggml.*`` and friends) -> a Tokenizer.from_spec dict."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise FormatError("GGUF file has no vocabulary (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise FormatError(f"GGUF vocabulary: {len(tokens)} tokens but {len(types)} token types")
    if kind == "llama":
        spec = _sentencepiece_spec(meta, tokens, types)
    elif kind == "gpt2":
        spec = _bpe_spec(meta, tokens, types, architecture)
    else:
        raise UnsupportedError(f"GGUF tokenizer model {kind!r} is not supported (tinyllm reads 'llama' and 'gpt2')")
    spec.update(_special_ids(meta, len(tokens), default_add_bos=(kind == "llama")))
    return spec


def _special_ids(meta: dict, n_tokens: int, default_add_bos: bool) -> dict:
    def token_id(key):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is None or value == -1 or value == 0xFFFFFFFF:
            return None
        if not 0 <= value < n_tokens:
            raise FormatError(f"GGUF tokenizer.ggml.{key} = {value} is outside the {n_tokens}-token vocabulary")
        return int(value)

    bos = token_id("bos_token_id")
    eos_ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):  # end of text / turn / message
        i = token_id(key)
        if i is not None and i not in eos_ids:
            eos_ids.append(i)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)) and bos is not None
    return {"bos_id": bos, "eos_ids": eos_ids, "pad_id": token_id("padding_token_id"), "add_bos": add_bos}


def _added_tokens(tokens: list[str], types: list[int], special_types: tuple) -> list[dict]:
    """Control tokens as special added tokens, user-defined ones as non-special."""
    return [{"id": i, "content": tokens[i], "special": t in special_types, "lstrip": False, "rstrip": False,
             "single_word": False, "normalized": False}
            for i, t in enumerate(types) if t in special_types or t == USER_DEFINED]


# -- "llama": SentencePiece ----------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_bytes(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _pb_int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _pb_float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def sentencepiece_model_proto(tokens, scores, types, unk_id: int, add_dummy_prefix: bool,
                              remove_extra_whitespaces: bool) -> bytes:
    """A serialized sentencepiece ModelProto (field numbers from sentencepiece_model.proto):
    pieces (1: piece, 2: score, 3: type), trainer_spec (3: model_type BPE=2, 4: vocab_size,
    35: byte_fallback, 40: unk_id), normalizer_spec (1: name, 3: add_dummy_prefix,
    4: remove_extra_whitespaces, 5: escape_whitespaces)."""
    pieces = b"".join(
        _pb_bytes(1, _pb_bytes(1, text.encode("utf-8")) + _pb_float(2, float(score)) + _pb_int(3, int(kind)))
        for text, score, kind in zip(tokens, scores, types))
    trainer = (_pb_int(3, 2) + _pb_int(4, len(tokens)) + _pb_int(35, int(BYTE in types)) + _pb_int(40, unk_id))
    normalizer = (_pb_bytes(1, b"identity") + _pb_int(3, int(add_dummy_prefix))
                  + _pb_int(4, int(remove_extra_whitespaces)) + _pb_int(5, 1))
    return pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)


def _sentencepiece_spec(meta: dict, tokens: list[str], types: list[int]) -> dict:
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise FormatError(f"GGUF vocabulary: {len(tokens)} tokens but {len(scores)} scores")
    if meta.get("tokenizer.ggml.precompiled_charsmap"):
        raise UnsupportedError("GGUF 'llama' vocabulary with a precompiled_charsmap normalizer is not supported")
    unk = [i for i, t in enumerate(types) if t == UNKNOWN]
    if not unk:  # SentencePiece needs exactly one unknown piece; the metadata may name it, or
        # a control token spelled "<unk>" is it (llama.cpp's converter writes some vocabularies so)
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        if unk_id is None and "<unk>" in tokens and types[tokens.index("<unk>")] == CONTROL:
            unk_id = tokens.index("<unk>")
        if unk_id is None or not 0 <= unk_id < len(tokens):
            raise FormatError("GGUF 'llama' vocabulary has no unknown token (no type-2 token, no unknown_token_id)")
        types[unk_id] = UNKNOWN
        unk = [unk_id]
    if len(unk) > 1:
        raise FormatError(f"GGUF 'llama' vocabulary has {len(unk)} unknown tokens (ids {unk[:5]}); expected one")
    # llama.cpp's defaults: a dummy-prefix space, whitespace kept as it is
    proto = sentencepiece_model_proto(tokens, scores, types, unk[0],
                                      bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                                      bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False)))
    return {"kind": "sentencepiece", "model": base64.b64encode(proto).decode("ascii"),
            "added_tokens": [t for t in _added_tokens(tokens, types, ()) if not t["special"]]}


# -- "gpt2": byte-level BPE as tokenizer.json -------------------------------------------

def _bpe_spec(meta: dict, tokens: list[str], types: list[int], architecture: str | None) -> dict:
    pre = meta.get("tokenizer.ggml.pre") or PRE_BY_ARCHITECTURE.get(architecture or "")
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedError(f"GGUF byte-level BPE pre-tokenizer {pre!r} is not supported "
                               f"(tinyllm knows {', '.join(sorted(PRE_TOKENIZERS))})")
    normalizer, pre_tokenizer, ignore_merges = PRE_TOKENIZERS[pre]
    merges = []
    for m in meta.get("tokenizer.ggml.merges") or []:
        pair = m.split(" ")
        if len(pair) != 2:
            raise FormatError(f"GGUF merge {m!r} is not two tokens separated by one space")
        merges.append(pair)
    vocab = {}
    for i, text in enumerate(tokens):
        vocab.setdefault(text, i)
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _added_tokens(tokens, types, (CONTROL, UNKNOWN)),
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
    }
    return {"kind": "tokenizer.json", "json": json.dumps(tokenizer_json, ensure_ascii=False), "pre_tokenizer": pre}
