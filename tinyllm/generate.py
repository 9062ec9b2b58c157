"""The generation loop: prompt ids in, streamed text pieces out, with every way to stop."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

from tinyllm.kvcache import reusable_prefix as cached_prefix  # noqa: F401  (the rule, for the API)
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


def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler,
                 stop_ids=None, stats: GenerationStats | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Iterator[int]:
    """Yield new token ids until a stop id (default: every eos id of the tokenizer),
    ``max_new_tokens``, the end of the context, or ``should_stop()`` after a token (a client
    that has gone: finish_reason stays None). ``stats``, when given, is filled in."""
    stop_ids = set(model.tokenizer.eos_ids if stop_ids is None else stop_ids)
    stats = stats if stats is not None else GenerationStats()
    tokens = list(prompt_ids)
    stats.prompt_tokens, stats.cached_tokens = len(tokens), model.cache.reusable(tokens)
    start = time.perf_counter()
    logits = model.eval(tokens)
    for i in range(max_new_tokens):
        token = sampler(logits, tokens)
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
class Decoding:
    """How one generation picks its tokens and where it ends, built in one place for the
    Python API, the chat session and the server: the sampler, the stop strings, the stop
    token ids (None: the tokenizer's eos ids), and whether the text starts afresh (its
    leading space dropped, as a whole-sequence decode drops it)."""

    sampler: Sampler
    stop: list[str]
    stop_ids: list[int] | None = None
    skip_leading_space: bool = False

    @classmethod
    def continuing(cls, model, prompt_ids: list[int], stop=None, **sampling) -> "Decoding":
        """For text that continues ``prompt_ids`` (completions): the model's sampling defaults
        under the given options. A prompt of special tokens only (BOS) starts a text."""
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        starts_text = all(model.tokenizer.is_special(i) for i in prompt_ids)
        return cls(Sampler(model.sampling_params(**sampling)), stops, None, starts_text)

    def stream(self, model, prompt_ids: list[int], max_new_tokens: int, stats: GenerationStats | None = None,
               should_stop: Callable[[], bool] | None = None) -> Iterator[str]:
        """The generation's text pieces as they are decoded."""
        ids = generate_ids(model, prompt_ids, max_new_tokens, self.sampler, self.stop_ids, stats, should_stop)
        try:
            yield from stream_text(model, ids, self.stop, skip_leading_space=self.skip_leading_space, stats=stats)
        finally:
            ids.close()


def stream_text(model, ids: Iterator[int], stop=None, skip_leading_space: bool = False,
                stats: GenerationStats | None = None) -> Iterator[str]:
    """Turn a stream of token ids into text pieces, cutting at the first stop string.
    ``skip_leading_space``: the ids start a text of their own (an answer), so its leading
    space is dropped as a whole-sequence decode drops it; False: they continue the prompt."""
    decoder = model.tokenizer.stream(skip_leading_space=skip_leading_space)
    stops = StopStringFilter(stop)
    for token in ids:
        piece = stops.push(decoder.push(token))
        if piece:
            yield piece
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
    if tail:
        yield tail
