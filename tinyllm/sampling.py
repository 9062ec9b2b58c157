"""Choosing the next token from logits: greedy, or sampled with the usual filters."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40            # 0: off
    top_p: float = 0.95        # 1.0: off
    min_p: float = 0.05        # 0.0: off
    repeat_penalty: float = 1.0   # 1.0: off
    repeat_last_n: int = 64    # window of recent tokens the penalty looks at
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError("min_p must be in [0, 1)")
        if self.top_k < 0 or self.repeat_last_n < 0 or self.repeat_penalty <= 0:
            raise ValueError("top_k and repeat_last_n must be >= 0, repeat_penalty > 0")


class Sampler:
    """Applies, in llama.cpp's order: repeat penalty, top-k, top-p, min-p, temperature."""

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
        order = np.argsort(-logits, kind="stable")
        if p.top_k:
            order = order[:p.top_k]
        probs = np.exp(logits[order] - logits[order[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            order, probs = order[:keep], probs[:keep]
        if p.min_p > 0:
            keep = probs >= p.min_p * probs[0]
            order, probs = order[keep], probs[keep]
        scaled = logits[order] / p.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        return int(order[self.rng.choice(len(order), p=probs)])
