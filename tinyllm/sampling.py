"""Choosing the next token from logits: greedy, or sampled with the usual filters."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tinyllm.errors import TinyLLMError


@dataclass
class SamplingParams:
    temperature: float = 0.8      # 0: greedy (argmax)
    top_k: int = 40               # 0: off
    top_p: float = 0.95           # 1.0: off
    min_p: float = 0.05           # 0.0: off
    repeat_penalty: float = 1.0   # 1.0: off
    repeat_last_n: int = 64       # window of recent tokens the penalty looks at
    seed: int | None = None       # None: a fresh random seed

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TinyLLMError(f"{name} must be a finite number, got {value!r}")
        for name in ("top_k", "repeat_last_n", "seed"):
            value = getattr(self, name)
            if not (value is None and name == "seed") and (isinstance(value, bool) or not isinstance(value, int)):
                raise TinyLLMError(f"{name} must be an integer, got {value!r}")
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (0.0 <= self.min_p < 1.0, f"min_p must be in [0, 1), got {self.min_p}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (self.repeat_penalty > 0, f"repeat_penalty must be > 0, got {self.repeat_penalty}"),
            (self.repeat_last_n >= 0, f"repeat_last_n must be >= 0, got {self.repeat_last_n}"),
            (self.seed is None or 0 <= self.seed < 2**64, f"seed must be in 0..2^64-1, got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TinyLLMError(message)


class Sampler:
    """Applies, in llama.cpp's order: repeat penalty, top-k, top-p, min-p, temperature,
    then draws from what is left. One sampler is one random stream: a seed makes a whole
    generation (or conversation) reproducible."""

    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, recent: list[int] = ()) -> int:
        logits = np.asarray(logits, dtype=np.float64).copy()  # (vocab,)
        p = self.p
        if p.repeat_penalty != 1.0 and p.repeat_last_n and len(recent):
            seen = np.unique(np.asarray(recent[-p.repeat_last_n:], dtype=np.int64))
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))
        if p.top_k and p.top_k < logits.size:
            candidates = np.argpartition(-logits, p.top_k - 1)[:p.top_k]
            order = candidates[np.argsort(-logits[candidates], kind="stable")]
        else:
            order = np.argsort(-logits, kind="stable")
        probs = np.exp(logits[order] - logits[order[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:  # the smallest head whose probability reaches top_p
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            order, probs = order[:keep], probs[:keep]
        if p.min_p > 0:
            keep = probs >= p.min_p * probs[0]
            order, probs = order[keep], probs[keep]
        with np.errstate(over="ignore"):  # a tiny temperature: every gap to the top becomes -inf
            scaled = (logits[order] - logits[order].max()) / p.temperature
        probs = np.exp(scaled)
        probs /= probs.sum()
        return int(order[self.rng.choice(len(order), p=probs)])
