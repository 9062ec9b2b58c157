"""The generation loop: prompt ids in, streamed text pieces out, with every way to stop."""
from __future__ import annotations

from typing import Iterator

from .sampling import Sampler


class StopStringFilter:
    """Holds text back while it could still become a stop string, so a stop string
    split across tokens is never printed and then retracted."""

    def __init__(self, stops):
        self.stops = [s for s in (stops or []) if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Return what can be shown now; sets ``stopped`` once a stop string appears."""
        if not self.stops:
            return text
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler,
                 stop_ids=None) -> Iterator[int]:
    """Yield new token ids until an eos id, ``max_new_tokens`` or the context end."""
    stop_ids = set(model.tokenizer.eos_ids if stop_ids is None else stop_ids)
    tokens = list(prompt_ids)
    logits = model.eval(tokens)
    for i in range(max_new_tokens):
        token = sampler(logits, tokens)
        if token in stop_ids:
            return
        yield token
        tokens.append(token)
        if i + 1 == max_new_tokens or len(tokens) >= model.n_ctx:
            return
        logits = model.eval(tokens)


def stream_text(model, ids: Iterator[int], stop=None, skip_leading_space: bool = False) -> Iterator[str]:
    """Turn a stream of token ids into text pieces, cutting at the first stop string."""
    decoder = model.tokenizer.stream(skip_leading_space=skip_leading_space)
    stops = StopStringFilter(stop)
    for token in ids:
        piece = stops.push(decoder.push(token))
        if piece:
            yield piece
        if stops.stopped:
            ids.close() if hasattr(ids, "close") else None
            return
    tail = stops.push(decoder.flush())
    tail += "" if stops.stopped else stops.flush()
    if tail:
        yield tail
