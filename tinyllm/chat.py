"""Chat: templates that turn messages into a prompt, and a multi-turn session."""
from __future__ import annotations

from typing import Iterator

from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TinyLLMError


def _raise(message):
    raise TinyLLMError(f"chat template error: {message}")


def render_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
    """Render a Hugging Face chat template the way transformers does: a sandboxed Jinja
    environment (a template from a model file cannot run code), trim_blocks/lstrip_blocks."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)


class ChatSession:
    """A conversation with a model. With a chat template, each turn renders the whole
    history; the model's KV cache reuses the prefix it already holds. Without one, turns
    are plain text continuation."""

    def __init__(self, model, system: str | None = None, **sampling):
        self.model = model
        self.system = system
        self.sampling = sampling
        self.messages: list[dict] = []

    def reset(self) -> None:
        self.messages = []

    def history(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def prompt_ids(self) -> list[int]:
        tok = self.model.tokenizer
        if self.model.chat_template:
            text = render_template(self.model.chat_template, self.history(), add_generation_prompt=True,
                                   bos_token=tok.token_text(tok.bos_id) if tok.bos_id is not None else "",
                                   eos_token=tok.token_text(tok.eos_ids[0]) if tok.eos_ids else "")
            return tok.encode(text, add_bos=False)
        text = "\n".join(m["content"] for m in self.history())
        return tok.encode(text + ("\n" if self.messages else ""))

    def send(self, text: str, max_new_tokens: int = 512) -> Iterator[str]:
        """Add a user turn and stream the answer; the answer joins the history as it ends
        (also when the consumer stops early, e.g. on Ctrl-C)."""
        self.messages.append({"role": "user", "content": text})
        answer = []
        try:
            for piece in self.model.generate(self.prompt_ids(), max_new_tokens=max_new_tokens, **self.sampling):
                answer.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(answer).strip()})
