"""Perplexity of a model over a text, computed exactly as llama.cpp's perplexity tool does.

The text is tokenized once (with BOS when the tokenizer adds one) and cut into
non-overlapping windows of ``n_ctx`` tokens (a partial last window is dropped). Each window
is evaluated from an empty cache, its first token replaced by BOS when the tokenizer adds
BOS. Only the second half is scored (so every scored token has at least n_ctx/2 tokens of
context): the logits at positions first .. n_ctx-2 predict tokens first+1 .. n_ctx-1, with
first = n_ctx // 2. PPL = exp(mean NLL); its standard error is PPL * SE(mean NLL), the
delta-method estimate llama.cpp prints as "PPL = x +/- y".

With a reference model (``kl_divergence``), both models score the same windows and each
scored position adds KL(P_ref || P_model) of the next-token distributions, whether the two
agree on the most likely token, and both NLLs; the summary is the one llama-perplexity's
--kl-divergence prints: mean KLD, same-top-token rate, PPL ratio and difference, each with
its standard error (from the per-token values, paired where two models are compared).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from tinyllm.errors import TinyLLMError
from tinyllm.logprobs import log_softmax

DEFAULT_CTX = 512  # the window of most published llama.cpp perplexity tables (-c 512)


def token_nll(logits: np.ndarray, targets) -> np.ndarray:
    """Negative log-likelihood of each target: logits (T, vocab), targets (T,) -> (T,) float64."""
    return -log_softmax(logits)[np.arange(len(logits)), np.asarray(targets, dtype=np.int64)]


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


def text_tokens(model, text) -> list[int]:
    """A text as the evaluators read it (no special-token parsing), or token ids as they are."""
    return model.tokenize(text, special=False) if isinstance(text, str) else [int(t) for t in text]


def scored_logits(model, window: list[int]) -> tuple[np.ndarray, list[int]]:
    """The second half of one window: its logits (n_ctx - 1 - n_ctx//2, vocab), from an empty
    cache, and the tokens they predict."""
    first = len(window) // 2
    return model.logits(window)[first:-1], window[first + 1:]


def score_window(model, window: list[int]) -> np.ndarray:
    """NLL of the second half of one window: (n_ctx - 1 - n_ctx//2,) float64."""
    return token_nll(*scored_logits(model, window))


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
    tokens = text_tokens(model, text)
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


def _mean_se(v: np.ndarray) -> tuple[float, float]:
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


@dataclass
class KLDivergenceResult:
    """A model against a reference on the same scored tokens; each figure with its standard error."""

    tokens: int
    ppl: tuple[float, float]              # the model's perplexity
    ppl_reference: tuple[float, float]
    ppl_ratio: tuple[float, float]        # PPL / PPL_reference = exp(mean NLL difference)
    ppl_delta: tuple[float, float]        # PPL - PPL_reference
    kld: tuple[float, float]              # mean KL(P_reference || P_model), nats
    kld_max: float
    kld_p99: float
    same_top: tuple[float, float]         # fraction of positions whose most likely token agrees

    def __str__(self) -> str:
        f = "{:.6f} +/- {:.6f}".format
        return "\n".join([
            f"PPL(model)          : {f(*self.ppl)}", f"PPL(reference)      : {f(*self.ppl_reference)}",
            f"PPL ratio           : {f(*self.ppl_ratio)}", f"PPL difference      : {f(*self.ppl_delta)}",
            f"Mean KLD            : {f(*self.kld)}", f"99.0% KLD           : {self.kld_p99:.6f}",
            f"Maximum KLD         : {self.kld_max:.6f}",
            f"Same top token      : {100 * self.same_top[0]:.3f} +/- {100 * self.same_top[1]:.3f} %",
            f"Tokens scored       : {self.tokens}"])


class KLDivergenceAccumulator:
    """Per-token KLD, top-token agreement and both NLLs, kept for the summary's statistics."""

    def __init__(self):
        self.kld, self.same, self.nll, self.nll_ref = [], [], [], []

    def add(self, logits: np.ndarray, ref_logits: np.ndarray, targets) -> float:
        """One window's scored positions: logits of both (T, vocab), targets (T,); returns the running mean KLD."""
        lq, lp = log_softmax(logits), log_softmax(ref_logits)
        rows = np.arange(len(lq))
        t = np.asarray(targets, dtype=np.int64)
        self.kld.append(np.maximum((np.exp(lp) * (lp - lq)).sum(axis=1), 0))
        self.same.append((lq.argmax(axis=1) == lp.argmax(axis=1)).astype(np.float64))
        self.nll.append(-lq[rows, t])
        self.nll_ref.append(-lp[rows, t])
        return float(np.concatenate(self.kld).mean())

    def result(self) -> KLDivergenceResult:
        kld, same, nll, nll_ref = (np.concatenate(v) for v in (self.kld, self.same, self.nll, self.nll_ref))
        n = len(kld)
        (m, se), (mr, ser), (md, sed) = _mean_se(nll), _mean_se(nll_ref), _mean_se(nll - nll_ref)
        ppl, ppl_ref, ratio = math.exp(m), math.exp(mr), math.exp(md)
        p_same = float(same.mean())
        return KLDivergenceResult(
            tokens=n, ppl=(ppl, ppl * se), ppl_reference=(ppl_ref, ppl_ref * ser), ppl_ratio=(ratio, ratio * sed),
            ppl_delta=(ppl - ppl_ref, ppl_ref * ratio * sed), kld=_mean_se(kld), kld_max=float(kld.max()),
            kld_p99=float(np.quantile(kld, 0.99)),
            same_top=(p_same, math.sqrt(p_same * (1 - p_same) / max(n - 1, 1))))


def kl_divergence(model, reference, text, n_ctx: int | None = None, max_chunks: int | None = None,
                  progress=None) -> KLDivergenceResult:
    """``model`` against ``reference`` (e.g. the unquantized weights) over the windows that
    ``perplexity`` scores; both must share a tokenizer. ``progress(done, total, running_kld)``
    as in perplexity."""
    if model.tokenizer.vocab_size != reference.tokenizer.vocab_size:
        raise TinyLLMError(f"the reference's vocabulary ({reference.tokenizer.vocab_size} tokens) differs from "
                           f"the model's ({model.tokenizer.vocab_size}): KL divergence compares the same tokens")
    tokens = text_tokens(model, text)
    if isinstance(text, str) and text_tokens(reference, text) != tokens:
        raise TinyLLMError("the reference tokenizes the text differently from the model: they need the same tokenizer")
    n_ctx = n_ctx or min(DEFAULT_CTX, model.n_ctx, reference.n_ctx)
    if n_ctx > reference.n_ctx:
        raise TinyLLMError(f"context {n_ctx} exceeds the reference's context length ({reference.n_ctx})")
    acc = KLDivergenceAccumulator()
    chunks = windows(model, tokens, n_ctx, max_chunks)
    if progress:
        progress(0, len(chunks), None)
    for done, window in enumerate(chunks, 1):
        (logits, targets), (ref_logits, _) = scored_logits(model, window), scored_logits(reference, window)
        if logits.shape != ref_logits.shape:
            raise TinyLLMError(f"the model gives {logits.shape[1]} logits per token, "
                               f"the reference {ref_logits.shape[1]}")
        running = acc.add(logits, ref_logits, targets)
        if progress:
            progress(done, len(chunks), running)
    return acc.result()
