"""Structured output: generation held to a JSON schema or a grammar, enforced token by token.

The constraint engine is llguidance (the one llama.cpp and vLLM use): it compiles a JSON
schema, a llama.cpp GBNF grammar, a Lark grammar or a regular expression into a parser over
bytes and, before each token, gives the set of tokens that keep the text a valid prefix.
tinyllm sets every other token's logit to -inf before the sampler sees the logits, so the
sampler's settings still apply among the allowed tokens, and tells the parser which token
was chosen. Once the text is complete the parser allows only the generation's stop tokens.
Chosen over xgrammar (its wheel requires torch, transformers and triton) and outlines-core
(JSON schemas only through a regular expression, so no recursive schemas, and a vocabulary
index built per grammar up front): llguidance has no Python dependencies, builds its parser
lazily, reads the grammar formats users already have (JSON Schema, llama.cpp GBNF, Lark,
regex), and its mask costs 0.3-0.8 ms per token on a 49k-token vocabulary here (BENCHMARKS.md).
"""
from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

import numpy as np

from tinyllm.errors import TinyLLMError

# Tokenizer -> {"vocab": its byte table, stop ids: LLTokenizer}
_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _llguidance():
    try:
        import llguidance
    except ImportError:  # a dependency, but say what to do if an environment lacks it
        raise TinyLLMError("structured output needs the llguidance package: pip install llguidance") from None
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar: what a generation's text must match. Build it with :meth:`json_schema`,
    :meth:`json_object`, :meth:`gbnf`, :meth:`lark` or :meth:`regex`; each refuses a bad
    grammar with a TinyLLMError that says what is wrong."""

    kind: str
    source: str      # the schema (JSON text) or grammar text, as given
    compiled: str    # llguidance's grammar

    @classmethod
    def json_schema(cls, schema) -> "Grammar":
        """Text that parses as JSON and validates against ``schema`` (a dict or JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise TinyLLMError(f"the JSON schema is not valid JSON: {e}") from None
        if isinstance(schema, bool):  # JSON Schema's true/false; true: any JSON value
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, dict):
            raise TinyLLMError(f"a JSON schema must be an object, not {type(schema).__name__}")
        LLMatcher = _llguidance().LLMatcher
        try:
            compiled = LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except (ValueError, TypeError) as e:
            raise TinyLLMError(f"the JSON schema cannot be used: {e}") from None
        return cls._checked("json_schema", json.dumps(schema), compiled)

    @classmethod
    def json_object(cls) -> "Grammar":
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def gbnf(cls, text: str) -> "Grammar":
        """A llama.cpp GBNF grammar (its ``root`` rule is the whole text)."""
        from llguidance.gbnf_to_lark import gbnf_to_lark

        cls._text(text, "GBNF grammar")
        try:
            lark = gbnf_to_lark(text)
        except Exception as e:  # the converter raises its own types for every syntax error
            raise TinyLLMError(f"the GBNF grammar cannot be read: {e}") from None
        return cls._checked("gbnf", text, _llguidance().LLMatcher.grammar_from_lark(lark))

    @classmethod
    def lark(cls, text: str) -> "Grammar":
        """A Lark grammar in llguidance's dialect (its ``start`` rule is the whole text)."""
        cls._text(text, "Lark grammar")
        return cls._checked("lark", text, _llguidance().LLMatcher.grammar_from_lark(text))

    @classmethod
    def regex(cls, pattern: str) -> "Grammar":
        """Text that matches the regular expression ``pattern`` as a whole."""
        cls._text(pattern, "regular expression")
        return cls._checked("regex", pattern, _llguidance().LLMatcher.grammar_from_regex(pattern))

    @staticmethod
    def _text(text, what: str) -> None:
        if not isinstance(text, str) or not text.strip():
            raise TinyLLMError(f"the {what} must be non-empty text")

    @classmethod
    def _checked(cls, kind: str, source: str, compiled: str) -> "Grammar":
        is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(compiled)
        if is_error:
            raise TinyLLMError(f"the {kind.replace('_', ' ')} cannot be used: {messages[0]}")
        return cls(kind, source, compiled)

    def constraint(self, tokenizer, stop_ids) -> "GrammarConstraint":
        """A fresh constraint for one generation that ends on any of ``stop_ids``."""
        return GrammarConstraint(self, lltokenizer(tokenizer, stop_ids))


def grammar_from(json_schema=None, grammar=None) -> Grammar | None:
    """The Python API's and CLI's two options as one Grammar: ``json_schema`` (a dict, JSON
    text, or True for any JSON object) or ``grammar`` (GBNF text, or a Grammar); None: free text."""
    if json_schema is not None and grammar is not None:
        raise TinyLLMError("give json_schema or grammar, not both")
    if isinstance(grammar, Grammar):
        return grammar
    if grammar is not None:
        return Grammar.gbnf(grammar)
    if json_schema is True:
        return Grammar.json_object()
    return None if json_schema is None else Grammar.json_schema(json_schema)


def lltokenizer(tokenizer, stop_ids):
    """llguidance's view of a tokenizer: each token's bytes (special tokens marked with a
    0xFF byte, so grammar text never matches them) and its encoder; the byte table once per
    tokenizer, llguidance's tokenizer once per set of stop tokens (0.32 s for SmolLM2's 49k
    tokens with the first matcher, BENCHMARKS.md)."""
    stop_ids = tuple(stop_ids)
    if not stop_ids:
        raise TinyLLMError("structured output needs a stop token to end on, and this generation has none")
    cache = _TOKENIZERS.setdefault(tokenizer, {})
    if stop_ids not in cache:
        llg = _llguidance()
        vocab = cache.setdefault("vocab", _GuidanceVocab(tokenizer))
        cache[stop_ids] = llg.LLTokenizer(llg.TokenizerWrapper(vocab), n_vocab=tokenizer.vocab_size,
                                          eos_token=list(stop_ids))
    return cache[stop_ids]


class _GuidanceVocab:
    """The tokenizer interface llguidance's TokenizerWrapper reads (its eos id is overridden
    by the LLTokenizer's eos_token list)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_ids[0] if tokenizer.eos_ids else 0
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]
        special = set(self.special_token_ids)
        self.tokens = [b"\xff" + tokenizer.token_text(i).encode("utf-8") if i in special else tokenizer.token_bytes(i)
                       for i in range(tokenizer.vocab_size)]

    def __call__(self, text) -> list[int]:
        """Token ids whose bytes are exactly ``text`` (llguidance's contract). SentencePiece
        prepends a space to what it encodes and may fold whitespace; such text is encoded
        after a newline, whose tokens are then dropped, or failing that, greedily."""
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        text = data.decode("utf-8", errors="replace")
        ids = self._encode(text)
        if self._bytes(ids) == data:
            return ids
        ids = self._encode("\n" + text)
        for cut in range(1, min(len(ids), 3)):
            if self._bytes(ids[:cut]) in (b"\n", b" \n") and self._bytes(ids[cut:]) == data:
                return ids[cut:]
        return self._greedy(data)

    def _greedy(self, data: bytes) -> list[int]:
        """Longest vocabulary match first; every byte has a token in byte-level and byte-fallback vocabularies."""
        if not hasattr(self, "_by_bytes"):
            self._by_bytes = {}
            for i, b in enumerate(self.tokens):
                if b and not b.startswith(b"\xff"):
                    self._by_bytes.setdefault(b, i)
            self._longest = max(map(len, self._by_bytes))
        out, pos = [], 0
        while pos < len(data):
            for n in range(min(self._longest, len(data) - pos), 0, -1):
                token = self._by_bytes.get(data[pos:pos + n])
                if token is not None:
                    out.append(token)
                    pos += n
                    break
            else:
                pos += 1  # a byte no token holds: llguidance then sees the mismatch and refuses the grammar
        return out

    def _encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_bos=False, parse_special=False)

    def _bytes(self, ids) -> bytes:
        return b"".join(self.tokens[i] for i in ids)


class GrammarConstraint:
    """One generation's parser state (the generate loop's Constraint)."""

    def __init__(self, grammar: Grammar, lltok):
        llg = _llguidance()
        self.matcher = llg.LLMatcher(lltok, grammar.compiled, log_level=0)
        if self.matcher.is_error():
            raise TinyLLMError(f"the {grammar.kind.replace('_', ' ')} cannot be used: {self.matcher.get_error()}")
        self.vocab = lltok.vocab_size
        self._bits = np.zeros((self.vocab + 31) // 32, dtype=np.int32)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._check()
        n = min(logits.shape[-1], self.vocab)  # a model may have more logits than tokens (padding): never allowed
        allowed = np.zeros(logits.shape[-1], dtype=bool)
        allowed[:n] = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:n]
        if not allowed.any():
            raise TinyLLMError("the grammar allows no token here (it cannot be completed with this vocabulary)")
        return np.where(allowed, logits, -np.inf).astype(logits.dtype, copy=False)

    def advance(self, token: int) -> None:
        self.matcher.consume_token(int(token))
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise TinyLLMError(f"structured output failed: {self.matcher.get_error()}")
