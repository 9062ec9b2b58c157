"""Chat: a multi-turn conversation with a model, rendered through its chat template.

Each turn renders the whole history and tokenizes it; ``Model.eval`` keeps the longest
prefix its KV cache already holds, so a new turn only computes the tokens after it (the
new user message, and whatever of the last answer re-tokenizes differently).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, Iterator

from tinyllm.errors import TinyLLMError
from tinyllm.generate import Decoding, GenerationStats
from tinyllm.sampling import Sampler
from tinyllm.templates import ChatTemplate, render_template, resolve_template  # noqa: F401  (render_template: API)

ROLES = ("system", "user", "assistant")


class ContextWarning(UserWarning):
    """The conversation outgrew the context: old turns were dropped or an answer was cut."""


def turn_stops(tokenizer, template: ChatTemplate) -> tuple[list[int], list[str]]:
    """Token ids and strings that end an answer: every eos id, the end-of-turn tokens the
    template uses, and the template's stop strings (markers that are not tokens become strings)."""
    ids = list(tokenizer.eos_ids)
    strings = list(template.stop)
    for marker in template.markers:
        token = tokenizer.token_to_id(marker)
        if token is not None and tokenizer.is_special(token):
            if token not in ids:
                ids.append(token)
        elif marker not in strings:  # plain text in this vocabulary: stop on the string
            strings.append(marker)
    return ids, strings


def check_conversation(messages) -> list[dict]:
    """Validate a conversation (a list of {"role", "content"} dicts); return a clean copy."""
    if not isinstance(messages, list):
        raise TinyLLMError(f"a conversation is a list of messages, got {type(messages).__name__}")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise TinyLLMError(f"message {i} must be {{'role': one of {'/'.join(ROLES)}, 'content': str}}, got {m!r}")
        if m["role"] == "system" and i > 0:
            raise TinyLLMError(f"message {i}: a system message may only come first")
        clean.append({"role": m["role"], "content": m["content"]})
    return clean


class ChatSession:
    """A conversation with ``model``.

    ``send(text)`` adds a user turn and streams the answer as text pieces; the answer joins
    the history when it ends, also when the consumer stops early (Ctrl-C), with what was
    shown. When the history no longer fits the context (with room for the answer), the
    oldest turns are dropped, the system prompt kept, and ``on_notice`` says so (default: a
    :class:`ContextWarning`). ``stats`` describes the last answer (tokens, speed).
    """

    def __init__(self, model, system: str | None = None, template: str | None = None,
                 max_new_tokens: int = 512, stop=None, on_notice: Callable[[str], None] | None = None,
                 temperature=None, top_k=None, top_p=None, min_p=None, repeat_penalty=None,
                 repeat_last_n=None, seed=None, logprobs: int | None = None, grammar=None):
        self.model = model
        self.template = resolve_template(template, model.chat_template)
        self.system = system
        self.messages: list[dict] = []
        self.max_new_tokens = max_new_tokens
        sampler = Sampler(model.sampling_params(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                                repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed))
        stop_ids, stop_strings = turn_stops(model.tokenizer, self.template)
        self.decoding = Decoding(sampler, stop_strings + list(stop or []), stop_ids,
                                 skip_leading_space=not self.template.continuation, logprobs=logprobs, grammar=grammar)
        self.on_notice = on_notice or (lambda text: warnings.warn(text, ContextWarning, stacklevel=3))
        self.stats: GenerationStats | None = None

    @property
    def stop_ids(self) -> list[int]:
        """The token ids that end an answer (every eos id, and the template's end-of-turn tokens)."""
        return self.decoding.stop_ids

    # -- the conversation --------------------------------------------------------------

    def history(self) -> list[dict]:
        """The messages the template sees: the system prompt (if any), then the turns."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def reset(self) -> None:
        """Forget the turns (the system prompt stays)."""
        self.messages = []

    def load_messages(self, messages) -> None:
        """Replace the conversation; a leading system message becomes the system prompt."""
        messages = check_conversation(messages)
        self.system = messages.pop(0)["content"] if messages and messages[0]["role"] == "system" else None
        self.messages = messages

    def save(self, path) -> None:
        """Write the conversation as JSON: {"messages": [{"role", "content"}, ...]}."""
        try:
            Path(path).write_text(json.dumps({"messages": self.history()}, ensure_ascii=False, indent=2) + "\n",
                                  encoding="utf-8")
        except OSError as e:
            raise TinyLLMError(f"cannot save the conversation to {str(path)!r}: {e.strerror or e}") from None

    def load(self, path) -> None:
        """Read a conversation written by :meth:`save` (or a bare list of messages)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise TinyLLMError(f"cannot read the conversation {str(path)!r}: {e.strerror or e}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TinyLLMError(f"{str(path)!r} is not a JSON conversation: {e}") from None
        self.load_messages(data.get("messages") if isinstance(data, dict) else data)

    # -- prompts -------------------------------------------------------------------------

    def render(self, add_generation_prompt: bool = True) -> str:
        tok = self.model.tokenizer
        special = {"bos_token": tok.token_text(tok.bos_id) if tok.bos_id is not None else "",
                   "eos_token": tok.token_text(tok.eos_ids[0]) if tok.eos_ids else ""}
        return self.template.render(self.history(), add_generation_prompt=add_generation_prompt, **special)

    def prompt_ids(self) -> list[int]:
        """The rendered history as token ids. Special-token text in the template becomes its
        token; BOS is prepended when the tokenizer adds one and the template did not (as llama.cpp does)."""
        tok = self.model.tokenizer
        ids = tok.encode(self.render(), add_bos=False, parse_special=True)
        if tok.add_bos and (not ids or ids[0] != tok.bos_id):
            ids.insert(0, tok.bos_id)
        return ids

    def _fit_context(self, max_new_tokens: int) -> list[int]:
        """Prompt ids that leave room for an answer, dropping the oldest turns if needed."""
        n_ctx = self.model.n_ctx
        room = min(max_new_tokens, n_ctx // 4)  # the answer may have less when even one turn is this long
        dropped = 0
        ids = self.prompt_ids()
        while len(ids) + room > n_ctx and len(self.messages) > 1:
            del self.messages[0]
            dropped += 1
            while len(self.messages) > 1 and self.messages[0]["role"] != "user":
                del self.messages[0]  # a turn starts with the user: drop its answer with it
                dropped += 1
            ids = self.prompt_ids()
        if len(ids) >= n_ctx:
            raise TinyLLMError(f"the message does not fit the context: {len(ids)} prompt tokens"
                               f"{' with the system prompt' if self.system else ''}, context length {n_ctx}")
        if dropped:
            self.on_notice(f"context full ({n_ctx} tokens): dropped the {dropped} oldest message(s)"
                           f"{', kept the system prompt' if self.system else ''}")
        return ids

    # -- answering -----------------------------------------------------------------------

    def send(self, text: str, max_new_tokens: int | None = None, stream: bool = True):
        """Add a user turn and answer it: an iterator of text pieces (``stream=True``) or the text."""
        if not isinstance(text, str) or not text.strip():
            raise TinyLLMError("a chat message must be non-empty text")
        pieces = self._answer(text, max_new_tokens or self.max_new_tokens)
        return pieces if stream else "".join(pieces)

    def _answer(self, text: str, max_new_tokens: int) -> Iterator[str]:
        self.messages.append({"role": "user", "content": text})
        try:
            prompt = self._fit_context(max_new_tokens)
        except BaseException:
            self.messages.pop()
            raise
        self.stats = stats = GenerationStats()
        pieces = self.decoding.stream(self.model, prompt, max_new_tokens, stats=stats)
        answer = []
        try:
            for piece in pieces:
                answer.append(piece)
                yield piece
        finally:
            pieces.close()
            self.messages.append({"role": "assistant", "content": "".join(answer)})
            if stats.finish_reason == "context":
                self.on_notice(f"the answer was cut off: the context ({self.model.n_ctx} tokens) is full")
