"""Perplexity of a model over a text, computed exactly as llama.cpp's perplexity tool does.

The text is tokenized once (with BOS when the tokenizer adds one) and cut into
non-overlapping windows of ``n_ctx`` tokens (a partial last window is dropped). Each window
is evaluated from an empty cache, its first token replaced by BOS when the tokenizer adds
BOS. Only the second half is scored (so every scored token has at least n_ctx/2 tokens of
context): the logits at positions first .. n_ctx-2 predict tokens first+1 .. n_ctx-1, with
first = n_ctx // 2. PPL = exp(mean NLL); its standard error is PPL * SE(mean NLL), the
delta-method estimate llama.cpp prints as "PPL = x +/- y".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from tinyllm.errors import TinyLLMError

DEFAULT_CTX = 512  # the window of most published llama.cpp perplexity tables (-c 512)


def token_nll(logits: np.ndarray, targets) -> np.ndarray:
    """Negative log-likelihood of each target: logits (T, vocab), targets (T,) -> (T,) float64."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
    return log_z - x[np.arange(len(x)), np.asarray(targets, dtype=np.int64)]


def windows(model, tokens: list[int], n_ctx: int, max_chunks: int | None = None) -> list[list[int]]:
    """The windows llama.cpp scores: consecutive n_ctx-token chunks, BOS first when the tokenizer adds one."""
    if n_ctx < 4:
        raise TinyLLMError(f"perplexity needs a context of at least 4 tokens, got {n_ctx}")
    if n_ctx > model.n_ctx:
        raise TinyLLMError(f"context {n_ctx} exceeds the model's context length ({model.n_ctx})")
    if len(tokens) < 2 * n_ctx:  # llama.cpp's own rule
        raise TinyLLMError(f"you need at least {2 * n_ctx} tokens to evaluate perplexity with a context of {n_ctx}; "
                           f"the text tokenizes to only {len(tokens)} tokens")
    if max_chunks is not None and max_chunks < 1:
        raise TinyLLMError(f"the number of chunks must be at least 1, got {max_chunks}")
    tok = model.tokenizer
    n_chunks = len(tokens) // n_ctx if max_chunks is None else min(max_chunks, len(tokens) // n_ctx)
    out = []
    for i in range(n_chunks):
        window = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if tok.add_bos:
            window[0] = tok.bos_id
        out.append(window)
    return out


def score_window(model, window: list[int]) -> np.ndarray:
    """NLL of the second half of one window: (n_ctx - 1 - n_ctx//2,) float64."""
    first = len(window) // 2
    logits = model.logits(window)  # (n_ctx, vocab), from an empty cache
    return token_nll(logits[first:-1], window[first + 1:])


@dataclass
class PerplexityResult:
    perplexity: float
    stderr: float                     # standard error of the perplexity
    n_ctx: int
    tokens: int                       # tokens scored
    running: list[float] = field(default_factory=list)  # the estimate after each chunk ([1], [2], ... in llama.cpp)

    def __str__(self) -> str:
        return f"PPL = {self.perplexity:.4f} +/- {self.stderr:.5f}"


class PerplexityAccumulator:
    """Adds up chunk NLLs in float64, as llama.cpp does (sum and sum of squares)."""

    def __init__(self, n_ctx: int):
        self.n_ctx, self.count, self.nll, self.nll2, self.running = n_ctx, 0, 0.0, 0.0, []

    def add(self, nll: np.ndarray) -> float:
        """Add one chunk; return the running perplexity."""
        self.count += len(nll)
        self.nll += float(nll.sum())
        self.nll2 += float((nll * nll).sum())
        self.running.append(math.exp(self.nll / self.count))
        return self.running[-1]

    def result(self) -> PerplexityResult:
        mean = self.nll / self.count
        ppl = math.exp(mean)
        var = self.nll2 / self.count - mean * mean
        se = math.sqrt(var / (self.count - 1)) if var > 0 and self.count > 1 else 0.0
        return PerplexityResult(ppl, ppl * se, self.n_ctx, self.count, list(self.running))


def perplexity(model, text, n_ctx: int | None = None, max_chunks: int | None = None,
               progress=None) -> PerplexityResult:
    """Perplexity of ``model`` over ``text`` (a string, or token ids with BOS already first
    when the model uses one) with windows of ``n_ctx`` tokens (default: 512, or the model's
    context when shorter). ``progress(done, total, running_ppl)`` is called before the first
    window (done=0, running_ppl None) and after each one."""
    tokens = model.tokenize(text, special=False) if isinstance(text, str) else [int(t) for t in text]
    n_ctx = n_ctx or min(DEFAULT_CTX, model.n_ctx)
    acc = PerplexityAccumulator(n_ctx)
    chunks = windows(model, tokens, n_ctx, max_chunks)
    if progress:
        progress(0, len(chunks), None)
    for done, window in enumerate(chunks, 1):
        running = acc.add(score_window(model, window))
        if progress:
            progress(done, len(chunks), running)
    return acc.result()
