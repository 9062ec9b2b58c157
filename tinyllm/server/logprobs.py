"""Token log-probabilities in OpenAI's two response shapes.

Chat completions list one object per token: ``{"token", "logprob", "bytes", "top_logprobs":
[{"token", "logprob", "bytes"}]}`` under ``choices[].logprobs.content``. Completions use the
older columns: ``tokens``, ``token_logprobs``, ``top_logprobs`` (one ``{token: logprob}`` dict
per token, null where there is no logprob) and ``text_offset`` (where each token's text
starts in the choice's text).
"""
from __future__ import annotations

from tinyllm.logprobs import TokenLogprob, token_bytes, token_string


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    def one(token: int, logprob: float) -> dict:
        return {"token": token_string(tokenizer, token), "logprob": logprob, "bytes": token_bytes(tokenizer, token)}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries],
            "refusal": None}


def completion_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    """``entries``' offsets count from the start of the choice's text (echo included)."""
    def top(e: TokenLogprob):
        if e.logprob is None:
            return None
        alternatives: dict[str, float] = {}
        for t, lp in e.top:  # tokens that show the same text keep the likelier one
            alternatives.setdefault(token_string(tokenizer, t), lp)
        return alternatives

    return {"tokens": [token_string(tokenizer, e.token) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [top(e) for e in entries],
            "text_offset": [e.offset or 0 for e in entries]}
