"""Log-probabilities of tokens: what a model thought of the text it read or wrote.

One place for the arithmetic every consumer shares: perplexity and KL divergence, the
server's ``logprobs`` / ``echo`` fields, ``Model.loglikelihood`` and the lm-eval backend.
Log-probabilities are those of the model's own distribution (a log-softmax of the raw
logits), before any sampling filter, penalty, temperature or grammar mask, as vLLM returns
them by default: they say how likely the model found a token, not how the sampler drew it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(..., vocab) -> (..., vocab) float64 log-probabilities."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - (top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))


@dataclass
class TokenLogprob:
    """One token and its log-probability (None for the first token of a text: nothing
    predicts it); ``top``: the most likely tokens at that position, most likely first, as
    (id, logprob); ``offset``: where its text starts, in characters, once it is placed in a text."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)
    offset: int | None = None


def token_logprob(logits: np.ndarray, token: int, n_top: int = 0) -> TokenLogprob:
    """logits (vocab,) at one position -> the chosen ``token``'s entry with its ``n_top`` rivals."""
    lp = log_softmax(logits)
    top: list[tuple[int, float]] = []
    if n_top > 0:
        n_top = min(n_top, lp.size)
        best = np.argpartition(-lp, n_top - 1)[:n_top]
        best = best[np.argsort(-lp[best], kind="stable")]
        top = [(int(i), float(lp[i])) for i in best]
    return TokenLogprob(int(token), float(lp[token]), top)


def sequence_logprobs(logits: np.ndarray, targets, n_top: int = 0) -> list[TokenLogprob]:
    """logits (T, vocab) whose row t predicts targets[t] -> one entry per target."""
    return [token_logprob(row, t, n_top) for row, t in zip(logits, targets)]


def token_string(tokenizer, token_id: int) -> str:
    """A token as OpenAI's ``token`` field shows it: its text, a special token's own text, or
    ``bytes:\\xNN..`` for a piece that is not valid UTF-8 by itself (part of a character)."""
    if tokenizer.is_special(token_id):
        return tokenizer.token_text(token_id)
    data = tokenizer.token_bytes(token_id)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def token_bytes(tokenizer, token_id: int) -> list[int]:
    """The UTF-8 bytes OpenAI's ``bytes`` field lists for a token."""
    if tokenizer.is_special(token_id):
        return list(tokenizer.token_text(token_id).encode("utf-8"))
    return list(tokenizer.token_bytes(token_id))
