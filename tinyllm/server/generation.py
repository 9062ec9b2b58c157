"""One request's generation: its prompt as token ids, checked against the context, then run
token by token on the model's worker thread, stopping as soon as the client has gone."""
from __future__ import annotations

import threading
from typing import Iterator

from tinyllm.chat import ChatSession
from tinyllm.errors import TinyLLMError
from tinyllm.generate import Decoding, GenerationStats, Piece
from tinyllm.logprobs import TokenLogprob
from tinyllm.server.errors import bad_request
from tinyllm.server.schemas import GenerationRequest

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", None: "stop"}


class GenerationRun:
    """A validated request bound to its prompt ids, sampler and stops. Built on the event
    loop's side (errors become 400s); :meth:`pieces` runs it on the worker thread."""

    def __init__(self, model, req: GenerationRequest, max_tokens_limit: int, template: str | None = None):
        self.model = model
        self.stats = GenerationStats()
        self.echo_text: str | None = None
        param = "messages" if req.messages is not None else "prompt"
        try:
            if req.messages is not None:
                self._chat_prompt(req, template)
            else:
                self._completion_prompt(req)
        except TinyLLMError as e:  # a chat template that rejects the conversation, for example
            raise bad_request(str(e), param=param) from None
        except ValueError as e:  # sampling settings SamplingParams refuses
            raise bad_request(str(e)) from None
        if not self.prompt_ids:
            raise bad_request("the prompt is empty (and this model's tokenizer adds no BOS token)", param=param)
        self.max_tokens = self._max_tokens(req, max_tokens_limit, param)

    def _chat_prompt(self, req: GenerationRequest, template: str | None) -> None:
        session = ChatSession(self.model, template=template, stop=req.stop, logprobs=req.logprobs,
                              grammar=req.grammar, **req.sampling)
        session.load_messages(req.messages)
        self.prompt_ids = session.prompt_ids()
        self.decoding = session.decoding

    def _completion_prompt(self, req: GenerationRequest) -> None:
        model = self.model
        if isinstance(req.prompt, str):
            self.prompt_ids = model.tokenize(req.prompt)
        else:
            vocab = model.config.vocab_size
            if any(not 0 <= t < vocab for t in req.prompt):
                raise bad_request(f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
            self.prompt_ids = list(req.prompt)
        self.decoding = Decoding.continuing(model, self.prompt_ids, req.stop, logprobs=req.logprobs,
                                            grammar=req.grammar, **req.sampling)
        self.echo_text = (req.prompt if isinstance(req.prompt, str) else model.detokenize(self.prompt_ids)) \
            if req.echo else None

    def _max_tokens(self, req: GenerationRequest, limit: int, param: str) -> int:
        n_prompt, n_ctx = len(self.prompt_ids), self.model.n_ctx
        room = n_ctx - n_prompt
        if room <= 0:
            raise bad_request(f"This model's maximum context length is {n_ctx} tokens; the prompt has {n_prompt}.",
                              param=param, code="context_length_exceeded")
        if req.max_tokens == 0:  # echo only: the prompt's logprobs, nothing generated
            return 0
        if req.max_tokens is None:
            default = room if req.endpoint == "chat" else COMPLETION_DEFAULT_MAX_TOKENS
            return min(default, room, limit)
        if req.max_tokens > limit:
            raise bad_request(f"max_tokens={req.max_tokens} exceeds this server's limit of {limit} "
                              "(tinyllm serve --max-tokens)", param="max_tokens")
        if req.max_tokens > room:
            raise bad_request(f"This model's maximum context length is {n_ctx} tokens; you requested "
                              f"{n_prompt + req.max_tokens} ({n_prompt} in the prompt, {req.max_tokens} for the "
                              f"completion). Lower max_tokens or shorten the prompt.",
                              param="max_tokens", code="context_length_exceeded")
        return req.max_tokens

    @property
    def finish_reason(self) -> str:
        return FINISH_REASONS[self.stats.finish_reason]

    @property
    def usage(self) -> dict:
        n, new = len(self.prompt_ids), self.stats.new_tokens
        return {"prompt_tokens": n, "completion_tokens": new, "total_tokens": n + new,
                "prompt_tokens_details": {"cached_tokens": self.stats.cached_tokens}}

    def pieces(self, cancelled: threading.Event, model=None) -> Iterator[Piece]:
        """Pieces of text (with their tokens' logprobs when asked) as they are decoded, after
        the echoed prompt when asked. ``cancelled`` is checked after every token, so a client
        that has gone costs at most one more forward pass. ``model``: what to run on (a batch
        slot; default the model the request was prepared for)."""
        model = self.model if model is None else model
        if self.echo_text is not None:
            yield Piece(self.echo_text, self._prompt_logprobs(model))
        if self.max_tokens == 0:
            self.stats.finish_reason = "length"
            return
        shift = len(self.echo_text or "")  # text offsets count from the start of the choice's text
        for piece in self.decoding.pieces(model, self.prompt_ids, self.max_tokens, stats=self.stats,
                                          should_stop=cancelled.is_set):
            for entry in piece.logprobs:
                entry.offset += shift
            yield piece

    def _prompt_logprobs(self, model) -> list[TokenLogprob]:
        """The prompt's tokens, each scored given those before it; the first has no logprob."""
        n_top = self.decoding.logprobs
        if n_top is None:
            return []
        ids = self.prompt_ids
        first = [TokenLogprob(ids[0], None)]
        rest = model.token_logprobs(ids, 1, n_top) if len(ids) > 1 else []
        entries = first + rest
        decoder, offset = self.model.tokenizer.stream(skip_leading_space=True), 0
        for entry in entries:  # where each token's text starts in the echoed prompt
            entry.offset = offset
            offset += len(decoder.push(entry.token))
        return entries
