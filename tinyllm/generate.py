"""The generation loop: prompt ids in, streamed text pieces out, with every way to stop."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np

from tinyllm.kvcache import reusable_prefix as cached_prefix  # noqa: F401  (the rule, for the API)
from tinyllm.logprobs import TokenLogprob, token_logprob
from tinyllm.sampling import Sampler


@dataclass
class GenerationStats:
    """What one generation did and how fast (filled in while it runs)."""
    prompt_tokens: int = 0       # tokens in the prompt
    cached_tokens: int = 0       # of those, already in the KV cache (not recomputed)
    prompt_seconds: float = 0.0  # computing the rest of the prompt and the first token
    new_tokens: int = 0          # tokens generated (stop tokens not counted)
    decode_steps: int = 0        # one-token forward passes after the prompt
    decode_seconds: float = 0.0
    finish_reason: str | None = None  # "eos", "length", "context", "stop"; None: interrupted

    @property
    def prompt_tokens_per_second(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        computed = self.prompt_tokens - self.cached_tokens
        return (f"prompt: {self.prompt_tokens} tokens ({self.cached_tokens} cached, {computed} computed) "
                f"{self.prompt_tokens_per_second:.1f} tok/s | decode: {self.new_tokens} tokens "
                f"{self.decode_tokens_per_second:.1f} tok/s")


class Constraint(Protocol):
    """What a grammar does to generation (tinyllm.structured): forbid tokens, follow choices."""

    def mask(self, logits: np.ndarray) -> np.ndarray: ...  # (vocab,) -> a copy, forbidden tokens at -inf
    def advance(self, token: int) -> None: ...             # the token chosen from the masked logits


def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler,
                 stop_ids=None, stats: GenerationStats | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 observe: Callable[[np.ndarray, int], None] | None = None,
                 constraint: Constraint | None = None) -> Iterator[int]:
    """Yield new token ids until a stop id (default: every eos id of the tokenizer),
    ``max_new_tokens``, the end of the context, or ``should_stop()`` after a token (a client
    that has gone: finish_reason stays None). ``stats``, when given, is filled in.
    ``observe(logits, token)`` sees each choice with the model's raw logits (vocab,);
    ``constraint`` masks the logits before the sampler picks and follows each pick."""
    stop_ids = set(model.tokenizer.eos_ids if stop_ids is None else stop_ids)
    stats = stats if stats is not None else GenerationStats()
    tokens = list(prompt_ids)
    stats.prompt_tokens, stats.cached_tokens = len(tokens), model.cache.reusable(tokens)
    start = time.perf_counter()
    logits = model.eval(tokens)
    for i in range(max_new_tokens):
        token = sampler(logits if constraint is None else constraint.mask(logits), tokens)
        if observe is not None:
            observe(logits, token)
        if constraint is not None:
            constraint.advance(token)
        if i == 0:
            stats.prompt_seconds = time.perf_counter() - start
        if token in stop_ids:
            stats.finish_reason = "eos"
            return
        stats.new_tokens += 1
        yield token
        if should_stop is not None and should_stop():
            return
        tokens.append(token)
        if i + 1 == max_new_tokens:
            break
        if len(tokens) >= model.n_ctx:
            stats.finish_reason = "context"
            return
        step = time.perf_counter()
        logits = model.eval(tokens)
        stats.decode_seconds += time.perf_counter() - step
        stats.decode_steps += 1
    stats.finish_reason = "length"


class StopStringFilter:
    """Holds text back while it could still become a stop string, so a stop string
    split across tokens is never printed and then retracted.

    Each stop string runs a Knuth-Morris-Pratt matcher over the text as it streams in: its
    state is the length of the longest prefix of that stop string the text ends with, which
    is exactly how much must be held back for it. Work per character is amortized constant
    per stop string, so a generation costs time linear in its text, whatever the stops."""

    def __init__(self, stops):
        self.stops = list(dict.fromkeys(s for s in (stops or []) if s))
        self._fail = [_failure_table(s) for s in self.stops]
        self._state = [0] * len(self.stops)
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Return what can be shown now; sets ``stopped`` once a stop string appears."""
        if not self.stops:
            return text
        base = len(self.pending)
        self.pending += text
        cut = None  # where the earliest stop string completed in this piece begins
        for k, (stop, fail) in enumerate(zip(self.stops, self._fail)):
            state = self._state[k]
            for i, ch in enumerate(text):
                while state and stop[state] != ch:
                    state = fail[state - 1]
                if stop[state] == ch:
                    state += 1
                if state == len(stop):
                    begin = base + i + 1 - len(stop)
                    cut = begin if cut is None else min(cut, begin)
                    break
            self._state[k] = state
        if cut is not None:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = max(self._state)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _failure_table(s: str) -> list[int]:
    """KMP: fail[i] = length of the longest proper prefix of s[:i+1] that is also its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


@dataclass
class Piece:
    """A piece of generated text and the tokens whose text begins in it (their
    log-probabilities, when the generation records them)."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Decoding:
    """How one generation picks its tokens and where it ends, built in one place for the
    Python API, the chat session and the server: the sampler, the stop strings, the stop
    token ids (None: the tokenizer's eos ids), whether the text starts afresh (its leading
    space dropped, as a whole-sequence decode drops it), how many alternatives each token's
    log-probability lists (None: none recorded), and the grammar the text must follow
    (tinyllm.structured.Grammar; None: free text)."""

    sampler: Sampler
    stop: list[str]
    stop_ids: list[int] | None = None
    skip_leading_space: bool = False
    logprobs: int | None = None
    grammar: object | None = None

    @classmethod
    def continuing(cls, model, prompt_ids: list[int], stop=None, logprobs: int | None = None, grammar=None,
                   **sampling) -> "Decoding":
        """For text that continues ``prompt_ids`` (completions): the model's sampling defaults
        under the given options. A prompt of special tokens only (BOS) starts a text."""
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        starts_text = all(model.tokenizer.is_special(i) for i in prompt_ids)
        return cls(Sampler(model.sampling_params(**sampling)), stops, None, starts_text, logprobs, grammar)

    def stream(self, model, prompt_ids: list[int], max_new_tokens: int, stats: GenerationStats | None = None,
               should_stop: Callable[[], bool] | None = None) -> Iterator[str]:
        """The generation's text pieces as they are decoded."""
        pieces = self.pieces(model, prompt_ids, max_new_tokens, stats, should_stop)
        try:
            yield from (p.text for p in pieces if p.text)
        finally:
            pieces.close()

    def pieces(self, model, prompt_ids: list[int], max_new_tokens: int, stats: GenerationStats | None = None,
               should_stop: Callable[[], bool] | None = None) -> Iterator[Piece]:
        """The generation as :class:`Piece` s: text with the log-probabilities of its tokens."""
        recorded: deque[TokenLogprob] | None = None
        observe = None
        if self.logprobs is not None:
            recorded = deque()
            n_top = self.logprobs

            def observe(logits, token):
                recorded.append(token_logprob(logits, token, n_top))
        stop_ids = model.tokenizer.eos_ids if self.stop_ids is None else self.stop_ids
        constraint = None if self.grammar is None else self.grammar.constraint(model.tokenizer, stop_ids)
        ids = generate_ids(model, prompt_ids, max_new_tokens, self.sampler, stop_ids, stats, should_stop,
                           observe, constraint)
        try:
            yield from stream_pieces(model, ids, self.stop, self.skip_leading_space, stats, recorded)
        finally:
            ids.close()


def stream_text(model, ids: Iterator[int], stop=None, skip_leading_space: bool = False,
                stats: GenerationStats | None = None) -> Iterator[str]:
    """Turn a stream of token ids into text pieces, cutting at the first stop string.
    ``skip_leading_space``: the ids start a text of their own (an answer), so its leading
    space is dropped as a whole-sequence decode drops it; False: they continue the prompt."""
    for piece in stream_pieces(model, ids, stop, skip_leading_space, stats):
        if piece.text:
            yield piece.text


def stream_pieces(model, ids: Iterator[int], stop=None, skip_leading_space: bool = False,
                  stats: GenerationStats | None = None, recorded: deque | None = None) -> Iterator[Piece]:
    """:func:`stream_text` as :class:`Piece` s. ``recorded``: the TokenLogprob of each id,
    appended as the id is produced; a token's entry goes out with the piece that shows the
    start of its text, so the tokens of a stop string (never shown) are never listed."""
    decoder = model.tokenizer.stream(skip_leading_space=skip_leading_space)
    stops = StopStringFilter(stop)
    waiting: deque[tuple[int, TokenLogprob]] = deque()  # (where its text starts, entry), not yet shown
    produced = shown = 0  # characters decoded so far, and of those given out

    def take(limit: int) -> list[TokenLogprob]:
        out = []
        while waiting and waiting[0][0] < limit:
            start, entry = waiting.popleft()
            entry.offset = start
            out.append(entry)
        return out

    for token in ids:
        if recorded is not None:
            waiting.append((produced, recorded.popleft()))
        text = decoder.push(token)
        produced += len(text)
        piece = stops.push(text)
        shown += len(piece)
        if piece:
            yield Piece(piece, take(shown))
        if stops.stopped:
            if hasattr(ids, "close"):
                ids.close()
            if stats is not None:
                stats.finish_reason = "stop"
            return
    tail = stops.push(decoder.flush())
    if stops.stopped and stats is not None:
        stats.finish_reason = "stop"
    tail += "" if stops.stopped else stops.flush()
    rest = take(shown + len(tail) if stops.stopped else produced + 1)  # no stop: every token was shown
    if tail or rest:
        yield Piece(tail, rest)
