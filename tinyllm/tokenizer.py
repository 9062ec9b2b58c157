"""Tokenizers: text <-> token ids, and byte-correct streaming detokenization.

A model file stores its tokenizer as a JSON-serialisable *spec* dict in its header;
:meth:`Tokenizer.from_spec` rebuilds the tokenizer from it. Two kinds exist.

SentencePiece (LLaMA, Llama-2, Mistral, ... ``tokenizer.model``), run by the ``sentencepiece`` package::

    {"kind": "sentencepiece",
     "model": "<base64 of the tokenizer.model bytes (a SentencePiece ModelProto)>",
     "added_tokens": [{"id": 32000, "content": "<|im_start|>", "special": true,
                       "lstrip": false, "rstrip": false}, ...],     # optional, default []
     "bos_id": 1, "eos_ids": [2], "pad_id": null, "add_bos": true}

  ``added_tokens`` are Hugging Face "added tokens" (tokenizer_config.json ``added_tokens_decoder``):
  extra ids beyond the SentencePiece pieces, or overrides of existing ids. They are matched
  literally in the text before SentencePiece sees it (``lstrip``/``rstrip``: the match also
  swallows whitespace on that side, as in HF); ``special`` ones only when ``parse_special``.

tokenizer.json (GPT-2/GPT-J, GPT-NeoX/MPT, Falcon, HF LLaMA, ...), run by the ``tokenizers`` package::

    {"kind": "tokenizer.json",
     "json": "<the text of tokenizer.json>",
     "bos_id": null, "eos_ids": [11], "pad_id": null, "add_bos": false}

Common keys, all required: ``bos_id`` (int or null), ``eos_ids`` (list of int: every id that ends
a sequence or a turn; ``eos_ids[0]`` is the tokenizer's own eos token when it names one),
``pad_id`` (int or null), ``add_bos`` (bool: whether :meth:`Tokenizer.encode` prepends ``bos_id``).
Unknown extra keys are kept in ``spec`` and otherwise ignored.

Behaviour, with the reference each part matches:

* encode: SentencePiece ``encode`` (no BOS; BOS is added here from ``add_bos``), resp. tokenizers'
  ``encode(text, add_special_tokens=False)``. ``parse_special=True`` turns literal special-token
  strings in the text (``<s>``, ``</s>``, ``<unk>``, special added tokens) into their ids, as HF
  does for chat templates. In a SentencePiece model each text run between such tokens is encoded
  on its own, so it gets its own dummy-prefix space ("<s>Hi" -> <s> "▁Hi"), as Meta's reference
  code, HF's ``legacy=True`` LLaMA tokenizer and transformers 5 do. Non-special added tokens
  are always matched (as HF does).
* decode / streaming: every token contributes raw bytes (:meth:`Tokenizer.token_bytes`); the
  concatenation is decoded as UTF-8 incrementally, so a character split across tokens is emitted
  once complete. SentencePiece-style vocabularies map '▁' to ' ' and ``<0xNN>`` byte-fallback
  pieces to that byte; byte-level BPE vocabularies invert GPT-2's ``bytes_to_unicode`` (tokens
  with a character outside that table, e.g. added tokens of plain spaces, are their own UTF-8, as
  in ``tokenizers``). Special tokens contribute nothing (``skip_special=False`` in
  :meth:`Tokenizer.decode` shows their text instead). At the start of a sequence the leading
  space is dropped exactly as the reference decoder does: SentencePiece's rule (the first piece
  loses its '▁' when the model has ``add_dummy_prefix`` or ``remove_extra_whitespaces``),
  tokenizers' ``Strip`` decoder (one leading space of the whole text) or ``Metaspace`` decoder
  (the first token loses its '▁'). Invalid UTF-8 becomes U+FFFD: one per byte for
  SentencePiece-style vocabularies (as sentencepiece does), one per maximal invalid sequence for
  byte-level BPE (as tokenizers' ByteLevel decoder does).
* Known, deliberate differences: ``<unk>`` is a special token here (HF: dropped by
  ``skip_special_tokens``; sentencepiece's own decode would print " ⁇ "); HF's
  ``clean_up_tokenization_spaces`` is never applied (it would make streaming and decode disagree);
  a run of byte-fallback tokens that is not valid UTF-8 decodes per sentencepiece, not per HF's
  ByteFallback decoder (which turns every byte of such a run into U+FFFD).

Loading never executes code from the spec: the SentencePiece model is a protobuf, tokenizer.json
is JSON.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import json
import operator
import re
import threading
from typing import Iterable

from tinyllm.errors import FormatError, TinyLLMError, UnsupportedError

SPACE_SYMBOL = "\u2581"  # '▁', SentencePiece's visible space
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_COMMON_KEYS = ("bos_id", "eos_ids", "pad_id", "add_bos")
MAX_VOCAB = 1 << 24  # no real vocabulary comes near; a file claiming more is refused


def _replace_per_byte(error: UnicodeDecodeError) -> tuple[str, int]:
    # sentencepiece replaces each invalid byte with U+FFFD; Python's "replace" would use one
    # U+FFFD for a whole truncated sequence.
    return "\ufffd" * (error.end - error.start), error.end


codecs.register_error("tinyllm.replace_per_byte", _replace_per_byte)


class StreamDecoder:
    """Turns token ids into text as they arrive, never emitting a broken UTF-8 character."""

    def __init__(self, tokenizer: "Tokenizer", skip_leading_space: bool, skip_special: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._at_start = skip_leading_space  # still before the first visible text of the sequence
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=tokenizer._utf8_errors)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is incomplete)."""
        tok = self._tokenizer
        token_id = tok._check_token(token_id)
        if tok.is_special(token_id) and not self._skip_special:
            data, kind = tok.token_text(token_id).encode("utf-8"), "special"
        else:
            data, kind = tok.token_bytes(token_id), tok._token_kind(token_id)
        if self._at_start:
            data, finished = tok._strip_start(token_id, kind, data)
            self._at_start = not finished
        if kind == "special" and tok._special_ends_byte_run:
            return self._utf8.decode(data, final=True)  # sentencepiece: bytes never join across <s>
        return self._utf8.decode(data)

    def flush(self) -> str:
        """End of stream: return what is left; an incomplete trailing character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """Common interface of the SentencePiece and tokenizer.json tokenizers; build with from_spec."""

    spec: dict
    vocab_size: int
    bos_id: int | None
    eos_ids: list[int]
    pad_id: int | None
    add_bos: bool
    _utf8_errors = "tinyllm.replace_per_byte"
    _start_rule = "none"  # how decode drops the leading space: see _strip_start
    _special_ends_byte_run = False  # whether a special token cuts an incomplete UTF-8 sequence

    @classmethod
    def from_spec(cls, spec: dict) -> "Tokenizer":
        if not isinstance(spec, dict):
            raise FormatError(f"tokenizer spec must be a dict, got {type(spec).__name__}")
        kind = spec.get("kind")
        kinds = {"sentencepiece": SentencePieceTokenizer, "tokenizer.json": TokenizersJsonTokenizer}
        if kind in kinds:
            try:
                tokenizer = kinds[kind](spec)
            except (TypeError, KeyError, AttributeError, ValueError, IndexError, OverflowError, RecursionError) as e:
                # a spec from a model file whose values have the wrong shape somewhere
                raise FormatError(f"malformed {kind} tokenizer spec ({type(e).__name__}: {e})") from None
            if tokenizer.vocab_size > MAX_VOCAB:
                raise FormatError(f"tokenizer has {tokenizer.vocab_size} tokens (at most {MAX_VOCAB} are supported)")
            return tokenizer
        raise UnsupportedError(
            f"tokenizer spec kind {kind!r} is not supported (known kinds: 'sentencepiece', 'tokenizer.json')"
        )

    def __init__(self, spec: dict):
        # Subclasses set vocab_size and their special ids before calling this.
        missing = [k for k in _COMMON_KEYS if k not in spec]
        if missing:
            raise FormatError(f"tokenizer spec ({spec.get('kind')}) is missing key(s) {missing}")
        self.spec = spec
        self.bos_id = self._check_id("bos_id", spec["bos_id"], optional=True)
        eos_ids = spec["eos_ids"]
        if not isinstance(eos_ids, list):
            raise FormatError(f"tokenizer spec eos_ids must be a list of ints, got {eos_ids!r}")
        self.eos_ids = [self._check_id("eos_ids", i, optional=False) for i in eos_ids]
        self.pad_id = self._check_id("pad_id", spec["pad_id"], optional=True)
        if not isinstance(spec["add_bos"], bool):
            raise FormatError(f"tokenizer spec add_bos must be true or false, got {spec['add_bos']!r}")
        if spec["add_bos"] and self.bos_id is None:
            raise FormatError("tokenizer spec has add_bos=true but no bos_id")
        self.add_bos = spec["add_bos"]
        # HF counts bos/eos/pad among the special tokens whatever the vocabulary says.
        self._special_ids |= {i for i in (self.bos_id, self.pad_id, *self.eos_ids) if i is not None}
        self._bytes_cache: dict[int, bytes] = {}

    def _check_id(self, key: str, value, optional: bool) -> int | None:
        if value is None and optional:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
            raise FormatError(
                f"tokenizer spec {key}: {value!r} is not a token id of this {self.vocab_size}-token vocabulary"
            )
        return value

    def _check_token(self, token_id) -> int:
        try:
            token_id = operator.index(token_id)  # also numpy integers
        except TypeError:
            raise TinyLLMError(f"token id must be an integer, got {token_id!r}") from None
        if not 0 <= token_id < self.vocab_size:
            raise TinyLLMError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return token_id

    # ---- encoding ----------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Text -> ids; BOS first when add_bos (default: the spec's add_bos)."""
        if not isinstance(text, str):
            raise TinyLLMError(f"encode() needs a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: undecodable command-line bytes, bad JSON escapes
            raise TinyLLMError(f"text is not valid Unicode (character {e.start} is a lone surrogate, "
                               "as from invalid UTF-8 input)") from None
        ids = self._encode_text(text, parse_special)
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise TinyLLMError("encode(add_bos=True): this tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        return ids

    # ---- decoding ----------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Ids of a whole sequence -> text (the leading space is handled as at the start of text)."""
        stream = StreamDecoder(self, skip_leading_space=True, skip_special=skip_special)
        return "".join(stream.push(i) for i in ids) + stream.flush()

    def stream(self, skip_leading_space: bool = False) -> StreamDecoder:
        """A streaming decoder. skip_leading_space=True: the ids start a sequence, so the leading
        space is dropped as decode() drops it (SentencePiece-style tokenizers only); False: they
        continue text already shown (e.g. generated tokens after a prompt), keep every space."""
        return StreamDecoder(self, skip_leading_space=skip_leading_space)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes this token adds to the output stream (b"" for special tokens)."""
        token_id = self._check_token(token_id)
        data = self._bytes_cache.get(token_id)
        if data is None:
            data = b"" if token_id in self._special_ids else self._piece_bytes(token_id)
            self._bytes_cache[token_id] = data
        return data

    def is_special(self, token_id: int) -> bool:
        return self._check_token(token_id) in self._special_ids

    def _token_kind(self, token_id: int) -> str:
        """'special', 'byte' (a byte-fallback <0xNN> piece) or 'piece' (ordinary text)."""
        if token_id in self._special_ids:
            return "special"
        return "byte" if self._byte_value(token_id) is not None else "piece"

    def _byte_value(self, token_id: int) -> int | None:
        return None

    def _strip_start(self, token_id: int, kind: str, data: bytes) -> tuple[bytes, bool]:
        """Drop the leading space at the start of a sequence as the reference decoder does.
        Returns (data, finished): finished=False keeps the next token at the start."""
        rule = self._start_rule
        if rule == "none":
            return data, True
        if kind == "special" and not data:  # skipped special tokens are invisible
            return data, False
        if rule == "sentencepiece":
            # sentencepiece Decode(): the first piece loses its '▁'; byte pieces and visible
            # specials end the start; with remove_extra_whitespaces every leading '▁' goes.
            if kind == "piece" and data.startswith(b" "):
                data = data[1:]
                return data, bool(data) or not self._remove_extra_whitespaces
            return data, bool(data)
        if rule == "strip_one_space":  # tokenizers Strip(" ", 1, 0) after Fuse: the whole text
            return (data[1:] if data.startswith(b" ") else data), True
        if rule == "metaspace":  # tokenizers Metaspace decoder: token 0 loses every '▁'
            if kind == "piece":
                data = self.token_text(token_id).replace(SPACE_SYMBOL, "").encode("utf-8")
            return data, True
        raise AssertionError(rule)

    def _sentencepiece_style_bytes(self, text: str, byte_value: int | None) -> bytes:
        if byte_value is not None:
            return bytes([byte_value])
        return text.replace(SPACE_SYMBOL, " ").encode("utf-8")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids}, pad_id={self.pad_id}, add_bos={self.add_bos})")


# ---- SentencePiece ----------------------------------------------------------------------------


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _protobuf_fields(buf: bytes) -> Iterable[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message; enough wire format to read two flags."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
        elif wire_type == 2:
            size, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise FormatError(f"SentencePiece model: unexpected protobuf wire type {wire_type}")
        yield field, value


def sentencepiece_normalizer_flags(model: bytes) -> dict[str, bool]:
    """add_dummy_prefix / remove_extra_whitespaces of a ModelProto's normalizer_spec (field 3)
    and whether it has a denormalizer (field 5), which the Python API does not expose."""
    flags = {"add_dummy_prefix": True, "remove_extra_whitespaces": True, "denormalizer": False}
    for field, value in _protobuf_fields(model):
        if field == 3:
            for sub, sub_value in _protobuf_fields(value):
                if sub == 3:
                    flags["add_dummy_prefix"] = bool(sub_value)
                elif sub == 4:
                    flags["remove_extra_whitespaces"] = bool(sub_value)
        elif field == 5:  # denormalizer_spec: rules in precompiled_charsmap (2) or a tsv (6)
            flags["denormalizer"] = any(sub in (2, 6) and sub_value for sub, sub_value in _protobuf_fields(value))
    return flags


class SentencePieceTokenizer(Tokenizer):
    """processor: the sentencepiece.SentencePieceProcessor that encodes."""

    _special_ends_byte_run = True

    def __init__(self, spec: dict):
        import sentencepiece

        if not isinstance(spec.get("model"), str):
            raise FormatError("sentencepiece tokenizer spec needs 'model': base64 text of tokenizer.model")
        try:
            model = base64.b64decode(spec["model"], validate=True)
        except (binascii.Error, ValueError) as e:
            raise FormatError(f"sentencepiece tokenizer spec: 'model' is not valid base64 ({e})") from None
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_proto=model)
            flags = sentencepiece_normalizer_flags(model)
        except (RuntimeError, OSError, IndexError, FormatError) as e:
            raise FormatError(f"sentencepiece tokenizer spec: 'model' is not a SentencePiece model ({e})") from None
        if self.processor.get_piece_size() == 0:
            raise FormatError("sentencepiece tokenizer spec: 'model' holds no pieces")
        if flags["denormalizer"]:
            raise UnsupportedError("SentencePiece models with denormalizer_spec rules are not supported")
        self._remove_extra_whitespaces = flags["remove_extra_whitespaces"]
        if flags["add_dummy_prefix"] or flags["remove_extra_whitespaces"]:
            self._start_rule = "sentencepiece"

        sp = self.processor
        n_pieces = sp.get_piece_size()
        self._special_ids = {i for i in range(n_pieces) if sp.is_control(i) or sp.is_unknown(i)}
        # literal text -> (id, special, lstrip, rstrip): control/unk pieces, then HF added tokens
        literals = {sp.id_to_piece(i): (i, True, False, False) for i in self._special_ids}
        self._added_text: dict[int, str] = {}
        added = spec.get("added_tokens", [])
        if not isinstance(added, list):
            raise FormatError("sentencepiece tokenizer spec: 'added_tokens' must be a list")
        for entry in added:
            try:
                token_id, content = entry["id"], entry["content"]
                special = bool(entry.get("special", False))
                lstrip, rstrip = bool(entry.get("lstrip", False)), bool(entry.get("rstrip", False))
            except (TypeError, KeyError):
                raise FormatError(f"sentencepiece tokenizer spec: bad added token {entry!r} "
                                  "(needs id, content)") from None
            if (not isinstance(token_id, int) or not 0 <= token_id < MAX_VOCAB or not isinstance(content, str)
                    or not content):
                raise FormatError(f"sentencepiece tokenizer spec: bad added token {entry!r}")
            self._added_text[token_id] = content
            literals[content] = (token_id, special, lstrip, rstrip)
            if special:
                self._special_ids.add(token_id)
            else:
                self._special_ids.discard(token_id)
        self.vocab_size = max([n_pieces, *(i + 1 for i in self._added_text)])
        self._split_all = self._literal_pattern(literals, specials_too=True)
        self._split_plain = self._literal_pattern(literals, specials_too=False)
        super().__init__(spec)

    @staticmethod
    def _literal_pattern(literals: dict, specials_too: bool) -> tuple[re.Pattern | None, list[int]]:
        """One regex matching any of the literals (longest first, as HF); group k+1 is literal k."""
        chosen = sorted((text for text, v in literals.items() if specials_too or not v[1]), key=len, reverse=True)
        if not chosen:
            return None, []
        alternatives = []
        for text in chosen:
            _, _, lstrip, rstrip = literals[text]
            alternatives.append((r"\s*" if lstrip else "") + f"({re.escape(text)})" + (r"\s*" if rstrip else ""))
        return re.compile("|".join(alternatives)), [literals[text][0] for text in chosen]

    def _encode_text(self, text: str, parse_special: bool) -> list[int]:
        pattern, literal_ids = self._split_all if parse_special else self._split_plain
        if pattern is None:
            return self.processor.encode(text)
        out, pos = [], 0
        for match in pattern.finditer(text):  # each run of text between literals is encoded alone
            out += self.processor.encode(text[pos:match.start()])
            out.append(literal_ids[match.lastindex - 1])
            pos = match.end()
        return out + self.processor.encode(text[pos:])

    def token_text(self, token_id: int) -> str:
        token_id = self._check_token(token_id)
        if token_id in self._added_text:
            return self._added_text[token_id]
        if token_id >= self.processor.get_piece_size():
            raise TinyLLMError(f"token id {token_id} is neither a SentencePiece piece nor an added token")
        return self.processor.id_to_piece(token_id)

    def token_to_id(self, text: str) -> int | None:
        """The id of the token whose vocabulary string is exactly text, else None."""
        for token_id, content in self._added_text.items():
            if content == text:
                return token_id
        sp = self.processor
        token_id = sp.piece_to_id(text)  # unknown text maps to unk_id: check it round-trips
        return token_id if token_id < sp.get_piece_size() and sp.id_to_piece(token_id) == text else None

    def _byte_value(self, token_id: int) -> int | None:
        sp = self.processor
        if token_id in self._added_text or token_id >= sp.get_piece_size() or not sp.is_byte(token_id):
            return None
        return int(_BYTE_PIECE.match(sp.id_to_piece(token_id)).group(1), 16)

    def _piece_bytes(self, token_id: int) -> bytes:
        return self._sentencepiece_style_bytes(self.token_text(token_id), self._byte_value(token_id))


# ---- tokenizer.json ---------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_UNICODE_TO_BYTE = {ch: b for b, ch in _bytes_to_unicode().items()}
_SP_STYLE_DECODERS = {"Replace", "ByteFallback", "Fuse", "Strip", "Metaspace"}


def _decoder_style(decoder) -> tuple[str, str]:
    """(vocabulary style, start rule) of a tokenizer.json decoder, or UnsupportedError."""
    if decoder is None:
        raise UnsupportedError("tokenizer.json without a decoder is not supported")
    parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    types = [p.get("type") for p in parts]
    if types and all(t == "ByteLevel" for t in types):
        return "byte_level", "none"
    if not types or not set(types) <= _SP_STYLE_DECODERS:
        raise UnsupportedError(
            f"tokenizer.json decoder {types or decoder.get('type')} is not supported "
            "(supported: ByteLevel; SentencePiece-style Metaspace or Replace/ByteFallback/Fuse/Strip)"
        )
    start_rule = "none"
    for part in parts:
        kind = part["type"]
        if kind == "Replace" and (part.get("pattern") != {"String": SPACE_SYMBOL} or part.get("content") != " "):
            raise UnsupportedError(f"tokenizer.json decoder {part} is not supported (only Replace '▁' -> ' ')")
        if kind == "Strip":
            if (part.get("content"), part.get("start"), part.get("stop")) != (" ", 1, 0):
                raise UnsupportedError(f"tokenizer.json decoder {part} is not supported (only Strip(' ', 1, 0))")
            start_rule = "strip_one_space"
        if kind == "Metaspace":
            if part.get("replacement", SPACE_SYMBOL) != SPACE_SYMBOL:
                raise UnsupportedError(f"tokenizer.json decoder {part} is not supported (only replacement '▁')")
            # tokenizers < 0.14 wrote add_prefix_space instead of prepend_scheme
            scheme = part.get("prepend_scheme", "always" if part.get("add_prefix_space", True) else "never")
            start_rule = "metaspace" if scheme != "never" else start_rule
    return "sentencepiece", start_rule


class TokenizersJsonTokenizer(Tokenizer):
    def __init__(self, spec: dict):
        import tokenizers

        text = spec.get("json")
        if not isinstance(text, str):
            raise FormatError("tokenizer.json tokenizer spec needs 'json': the text of tokenizer.json")
        try:
            parsed = json.loads(text)
            self._tok = tokenizers.Tokenizer.from_str(text)
            self._lock = threading.Lock()
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise FormatError(f"tokenizer.json tokenizer spec: 'json' is not a valid tokenizer.json ({e})") from None
        self._style, self._start_rule = _decoder_style(parsed.get("decoder"))
        if self._style == "byte_level":
            self._utf8_errors = "replace"  # tokenizers' ByteLevel decoder: String::from_utf8_lossy
        self._byte_fallback = bool(parsed.get("model", {}).get("byte_fallback", False))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._special_ids = {t["id"] for t in parsed.get("added_tokens", []) if t.get("special")}
        super().__init__(spec)

    def _encode_text(self, text: str, parse_special: bool) -> list[int]:
        # encode_special_tokens=True: special tokens are ordinary text; non-special added tokens still match.
        # The flag lives on the shared tokenizer object: one encode at a time sets and uses it.
        with self._lock:
            self._tok.encode_special_tokens = not parse_special
            return self._tok.encode(text, add_special_tokens=False).ids

    def token_text(self, token_id: int) -> str:
        token_id = self._check_token(token_id)
        text = self._tok.id_to_token(token_id)
        if text is None:
            raise TinyLLMError(f"token id {token_id} has no entry in this tokenizer.json")
        return text

    def token_to_id(self, text: str) -> int | None:
        """The id of the token whose vocabulary string is exactly text, else None."""
        return self._tok.token_to_id(text)

    def _byte_value(self, token_id: int) -> int | None:
        if self._style != "sentencepiece" or not self._byte_fallback:
            return None
        match = _BYTE_PIECE.match(self.token_text(token_id))
        return int(match.group(1), 16) if match else None

    def _piece_bytes(self, token_id: int) -> bytes:
        text = self.token_text(token_id)
        if self._style == "sentencepiece":
            return self._sentencepiece_style_bytes(text, self._byte_value(token_id))
        try:
            return bytes(_UNICODE_TO_BYTE[ch] for ch in text)
        except KeyError:  # not a byte-level string (e.g. an added token "  "): its own UTF-8
            return text.encode("utf-8")
