"""A loaded model: weights on a backend, a KV cache, a tokenizer, and the ways to run it."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Iterator

import numpy as np

from tinyllm.arch.common import hidden_states
from tinyllm.converters.llama2c import is_llama2c
from tinyllm.errors import TinyLLMError, reading
from tinyllm.fileformat import ModelFile, file_kind
from tinyllm.kernels import get_backend
from tinyllm.kvcache import Batch, KVCache, Segment, cache_dtype, kv_cache_bytes
from tinyllm.logprobs import TokenLogprob, sequence_logprobs
from tinyllm.sampling import SamplingParams
from tinyllm.tokenizer import Tokenizer
from tinyllm.validate import check_allocation, check_source

DEFAULT_MAX_CTX = 4096  # KV cache positions allocated unless n_ctx asks for more
SAMPLING_OPTIONS = {f.name for f in fields(SamplingParams)}  # what generate_batch passes on to generate


def _runtime_tensor(t):
    """1-D tensors (norm weights, biases) run as plain float32 arrays; matrices as QTensors."""
    return np.asarray(t.parts["w"], dtype=np.float32) if len(t.shape) == 1 else t


class Model:
    """``tinyllm.load(path)`` returns one of these.

    The KV cache (``self.cache``, a :class:`tinyllm.kvcache.KVCache`) remembers the tokens it
    holds; ``eval`` reuses what it can of them, so a chat that extends its history only
    computes the new turn.
    """

    def __init__(self, source, backend: str | None = None, threads: int | None = None,
                 n_ctx: int | None = None, device: str | None = None, cache_type: str | None = None):
        self.path = Path(source.path)
        where = str(self.path)
        # validate, then map: nothing from the source reaches a kernel before these checks
        self.arch, self.config = check_source(source, where)
        self.metadata = source.metadata
        self.tokenizer = Tokenizer.from_spec(self.metadata["tokenizer"])
        self.chat_template = self.metadata.get("chat_template")
        self.generation_defaults = dict(self.metadata.get("generation") or {})
        if n_ctx is not None and (not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < 1):
            raise TinyLLMError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        context = self.config.context_length
        self.n_ctx = min(n_ctx or min(context, DEFAULT_MAX_CTX), context)
        cfg = self.config
        if cache_type is not None:
            cache_dtype(cache_type)  # an unknown name is refused before anything is allocated
        if device == "cuda":
            backend = "cuda"
        # the backend object holds the model's own settings (threads, SIMD width, device); its
        # begin() applies them in whichever thread runs a forward (a server runs it on its own)
        self.ops = get_backend(backend, threads=threads)
        self.cache_type = cache_type or self.ops.cache_types[0]
        if device != "cuda":  # a device cache lives in GPU memory, which this check does not see
            smaller = " or --cache-type f16" if self.cache_type == "f32" else ""
            check_allocation(kv_cache_bytes(cfg, self.n_ctx, self.cache_type),
                             f"the KV cache for {self.n_ctx} positions", f"load with a smaller n_ctx (--ctx){smaller}")
        self.cache = self.new_cache()  # before the weights: a cache type the backend refuses costs no upload
        self.file_tensors = source.tensors
        self.weights = {name: self.ops.prepare(_runtime_tensor(t)) for name, t in source.tensors.items()}
        if "output" not in self.weights:  # tied embeddings
            self.weights["output"] = self.weights["tok_embeddings"]

    def new_cache(self) -> KVCache:
        """An empty KV cache of this model's context, for a sequence of its own (``eval_batch``)."""
        cfg = self.config
        return KVCache(self.ops, cfg.num_hidden_layers, cfg.n_kv_heads, self.n_ctx, cfg.head_dim, self.cache_type)

    @property
    def tokens(self) -> list[int]:
        """The token ids the KV cache holds, position by position."""
        return self.cache.tokens

    @classmethod
    def load(cls, path, backend=None, threads=None, n_ctx=None, device=None, verify=True, progress=None,
             cache_type=None) -> "Model":
        path = Path(path)
        if device not in (None, "cpu", "cuda"):
            raise TinyLLMError(f"unknown device {device!r}; choose cpu or cuda")
        if device == "cuda" and backend not in (None, "cuda"):  # one choice, never silently overridden
            raise TinyLLMError(f"device cuda runs the cuda backend; backend {backend!r} runs on the CPU: give one")
        if device == "cpu" and backend == "cuda":
            raise TinyLLMError("backend 'cuda' runs on the GPU: use device='cuda' (--device cuda)")
        if device == "cuda":
            from tinyllm.device import check_cuda
            check_cuda()
        with reading(path):
            kind = file_kind(path)
            if kind == "gguf":
                from tinyllm.converters.gguf import open_gguf
                source = open_gguf(path, progress=progress)  # progress(done, total): GGUF tensors regrouped
            elif kind is None and path.is_file() and is_llama2c(path):
                raise TinyLLMError(f"{str(path)!r} is a llama2.c checkpoint: convert it first with "
                                   f"`tinyllm convert {path} -o model.q4` (with its tokenizer.bin beside it, "
                                   "or --tokenizer)")
            else:
                source = ModelFile(path, verify=verify)
            return cls(source, backend=backend, threads=threads, n_ctx=n_ctx, device=device, cache_type=cache_type)

    @property
    def name(self) -> str:
        return self.path.stem

    # -- running the network -----------------------------------------------------------

    def _forward(self, tokens, start_pos: int, last_only: bool, head=None) -> np.ndarray:
        """One sequence in ``self.cache``: tokens at positions start_pos.. -> (T or 1, vocab)."""
        return self._run(tokens, Batch.single(self.cache, start_pos, len(tokens)), last_only, head)

    def _run(self, tokens, batch: Batch, last_only: bool, head=None) -> np.ndarray:
        """The forward pass over a batch's rows: (T, vocab), or a row per segment if last_only."""
        for s in batch.segments:
            if s.start + s.length > self.n_ctx:
                raise TinyLLMError(f"{s.start + s.length} tokens exceed the context length ({self.n_ctx})")
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise TinyLLMError(f"token id out of range 0..{self.config.vocab_size - 1}")
        extra = {} if head is None else {"head": head}
        self.ops.begin(len(ids))
        try:
            out = self.ops.to_numpy(self.arch.forward(self.config, self.weights, self.ops, batch, ids, last_only,
                                                      **extra))
        finally:
            self.ops.end()
        if not np.isfinite(out).all():  # weights that overflow float32: say so, never sample from NaN
            raise TinyLLMError("the model computed NaN or infinite logits (its weights overflow float32 arithmetic)")
        return out

    def eval(self, tokens: list[int]) -> np.ndarray:
        """Make the cache hold ``tokens``; return the next-token logits (vocab,).
        Only tokens after the longest prefix already in the cache are computed."""
        return self.eval_batch([self.cache], [tokens])[0]

    def eval_batch(self, caches: list[KVCache], sequences: list[list[int]]) -> np.ndarray:
        """``eval`` for several sequences at once, each in its own cache (``new_cache()``): one
        forward pass over all their new tokens, so a decode step of B sequences streams the
        weights once. Returns the next-token logits of each (B, vocab)."""
        if len(caches) != len(sequences) or not caches:
            raise TinyLLMError("eval_batch() takes one cache per sequence, and at least one")
        if len({id(c) for c in caches}) != len(caches):
            raise TinyLLMError("eval_batch(): each sequence needs a cache of its own")
        sequences = [list(tokens) for tokens in sequences]
        segments, new = [], []
        for cache, tokens in zip(caches, sequences):
            if not tokens:
                raise TinyLLMError("cannot evaluate an empty token sequence")
            if len(tokens) > self.n_ctx:
                raise TinyLLMError(f"prompt of {len(tokens)} tokens exceeds the context length ({self.n_ctx})")
            keep = cache.reusable(tokens)
            cache.trim(keep)  # an interrupted forward must not leave stale claims
            segments.append(Segment(cache, keep, len(tokens) - keep))
            new += tokens[keep:]
        logits = self._run(new, Batch(segments), last_only=True)
        for cache, tokens in zip(caches, sequences):
            cache.tokens = tokens
        return logits

    def logits(self, tokens) -> np.ndarray:
        """Logits for every position of ``tokens`` from an empty context: (T, vocab)."""
        tokens = [int(t) for t in tokens]
        self.cache.clear()
        out = self._forward(tokens, 0, last_only=False)
        self.cache.tokens = tokens
        return out

    def score(self, tokens, start: int = 1) -> np.ndarray:
        """The logits that predict ``tokens[start:]``, each from the tokens before it:
        (len(tokens) - start, vocab). The cache then holds ``tokens``; what it already held of
        ``tokens[:start - 1]`` is not computed again (a shared context scored once)."""
        tokens = [int(t) for t in tokens]
        if not 1 <= start < len(tokens):
            raise TinyLLMError(f"score(): start must be in 1..{len(tokens) - 1} for {len(tokens)} tokens, got {start}")
        if len(tokens) > self.n_ctx:
            raise TinyLLMError(f"{len(tokens)} tokens exceed the context length ({self.n_ctx})")
        keep = min(self.cache.reusable(tokens), start - 1)
        self.cache.trim(keep)
        out = self._forward(tokens[keep:], keep, last_only=False)
        self.cache.tokens = tokens
        return out[start - 1 - keep:len(tokens) - 1 - keep]

    def token_logprobs(self, tokens, start: int = 1, top: int = 0) -> list[TokenLogprob]:
        """Each of ``tokens[start:]`` with its log-probability given the tokens before it, and
        the ``top`` most likely tokens at its position."""
        tokens = [int(t) for t in tokens]
        return sequence_logprobs(self.score(tokens, start), tokens[start:], top)

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        """log P(continuation | context), summed over the continuation's tokens, and whether
        greedy decoding from ``context`` would write exactly them: what lm-evaluation-harness
        asks of a model for multiple-choice tasks. The pair is tokenized as lm-eval does; a
        context too long for the window loses its start (as lm-eval's Hugging Face backend)."""
        context_ids, continuation_ids = self.encode_pair(context, continuation)
        if not continuation_ids:
            raise TinyLLMError("loglikelihood(): the continuation is empty")
        if len(continuation_ids) >= self.n_ctx:
            raise TinyLLMError(f"a continuation of {len(continuation_ids)} tokens does not fit the context "
                               f"({self.n_ctx})")
        context_ids = context_ids[max(0, len(context_ids) + len(continuation_ids) - self.n_ctx):]
        entries = self.token_logprobs(context_ids + continuation_ids, start=len(context_ids), top=1)
        return sum(e.logprob for e in entries), all(e.top[0][0] == e.token for e in entries)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a context and of its continuation, split where the context's own
        tokens end in the tokens of the whole text; the context's trailing spaces move to the
        continuation (lm-eval's rule: " Paris" is one token, not " " + "Paris"). An empty
        context is BOS (or, without one, the first eos token), so the first token is scored."""
        if not isinstance(context, str) or not isinstance(continuation, str):
            raise TinyLLMError("context and continuation must be text")
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        if not context:
            return [self.prefix_id], self.tokenize(continuation, add_bos=False)
        whole = self.tokenize(context + continuation)  # special-token text parsed, as Hugging Face tokenizers do
        context_ids = self.tokenize(context)
        return context_ids, whole[len(context_ids):]

    @property
    def prefix_id(self) -> int:
        """What an empty context is when a text's first token must be scored: BOS, else the
        first eos token (lm-eval's prefix token)."""
        tok = self.tokenizer
        if tok.bos_id is None and not tok.eos_ids:
            raise TinyLLMError("this tokenizer has neither a BOS nor an eos token to start a text from")
        return tok.bos_id if tok.bos_id is not None else tok.eos_ids[0]

    def embed(self, texts, pooling: str = "mean", normalize: bool = True) -> np.ndarray:
        """One vector per text (n, hidden): the final normalized hidden states of its tokens,
        averaged (``pooling="mean"``) or the last one's (``"last"``), scaled to unit length
        when ``normalize``. ``texts``: a string, or a list of strings or of token-id lists."""
        if pooling not in ("mean", "last"):
            raise TinyLLMError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, (str, list)) for t in texts):
            raise TinyLLMError("embed() takes a string or a non-empty list of strings (or of token-id lists)")
        out = []
        for text in texts:
            ids = self.tokenize(text) if isinstance(text, str) else [int(i) for i in text]
            if not ids:
                raise TinyLLMError("cannot embed an empty text with a tokenizer that adds no BOS token")
            if len(ids) > self.n_ctx:
                raise TinyLLMError(f"a text of {len(ids)} tokens exceeds the context length ({self.n_ctx})")
            self.cache.clear()
            h = self._forward(ids, 0, last_only=pooling == "last", head=hidden_states)   # (T, D)
            self.cache.tokens = ids
            v = h.astype(np.float64).mean(axis=0)
            if normalize:
                v /= max(np.linalg.norm(v), 1e-12)
            out.append(v.astype(np.float32))
        return np.stack(out)

    def reset(self) -> None:
        self.cache.clear()

    @property
    def compiles(self) -> bool:
        """Whether the backend compiles kernels on first use (Numba: CPU and CUDA)."""
        return self.ops.compiles

    def warm_up(self) -> None:
        """Run the two kinds of forward pass generation uses (a prompt, then one token) on a
        throwaway sequence, so that a compiling backend compiles (or loads from its cache)
        every kernel this model needs now rather than in the first answer. The cache is
        left empty."""
        n = min(2, self.n_ctx)
        self.eval([self.prefix_id] * n)
        if self.n_ctx > n:
            self.eval([self.prefix_id] * (n + 1))
        self.cache.clear()

    # -- text ------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Text -> token ids. ``add_bos``: prepend BOS (default: as the tokenizer does);
        ``special``: literal special-token text such as "<s>" becomes that token."""
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=special)

    def detokenize(self, ids) -> str:
        """Token ids -> text (special tokens are invisible)."""
        return self.tokenizer.decode(ids)

    def sampling_params(self, **overrides) -> SamplingParams:
        """Sampling settings: tinyllm's defaults, then the model's generation_config, then
        explicit overrides (None: not given). do_sample=false in the config means greedy."""
        d = self.generation_defaults
        params = {}
        if "temperature" in d:
            params["temperature"] = float(d["temperature"])
        if d.get("do_sample") is False:
            params["temperature"] = 0.0
        for ours, theirs in (("top_k", "top_k"), ("top_p", "top_p"), ("min_p", "min_p"),
                             ("repeat_penalty", "repetition_penalty")):
            if theirs in d:
                params[ours] = d[theirs]
        params.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**params)

    def generate(self, prompt, max_new_tokens: int = 256, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repeat_penalty: float | None = None, repeat_last_n: int | None = None, seed: int | None = None,
                 stop=None, stream: bool = True, add_bos: bool | None = None, stats=None,
                 json_schema=None, grammar=None):
        """Continue ``prompt`` (text, or a list of token ids). With ``stream=True`` returns an
        iterator of text pieces as they are decoded; otherwise the whole text. Stops at any
        eos id, at a ``stop`` string (never shown, even when split across tokens), after
        ``max_new_tokens`` or at the end of the context. ``stats``: a GenerationStats to fill.
        ``json_schema`` (a dict or JSON text; True: any JSON object) or ``grammar`` (llama.cpp
        GBNF text, or a tinyllm.structured.Grammar): the text is held to it token by token."""
        ids, decoding = self._continuation(prompt, add_bos, stop, json_schema, grammar, temperature=temperature,
                                           top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                                           repeat_last_n=repeat_last_n, seed=seed)
        pieces: Iterator[str] = decoding.stream(self, ids, max_new_tokens, stats=stats)
        return pieces if stream else "".join(pieces)

    # -- chat ------------------------------------------------------------------------

    def _continuation(self, prompt, add_bos, stop, json_schema, grammar, **sampling):
        """A prompt's token ids, checked, and the Decoding that continues it."""
        from tinyllm.generate import Decoding
        from tinyllm.structured import grammar_from

        ids = self.tokenize(prompt, add_bos=add_bos) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise TinyLLMError("empty prompt: give some text, or add_bos=True to start from BOS")
        if len(ids) >= self.n_ctx:
            raise TinyLLMError(f"prompt of {len(ids)} tokens does not fit the context length ({self.n_ctx})")
        return ids, Decoding.continuing(self, ids, stop, grammar=grammar_from(json_schema, grammar), **sampling)

    def generate_batch(self, prompts: list, max_new_tokens: int = 256, parallel: int | None = None,
                       on_text=None, stop=None, add_bos: bool | None = None, json_schema=None, grammar=None,
                       **sampling) -> list[str]:
        """Continue every prompt of ``prompts`` at once (continuous batching, tinyllm.batching):
        up to ``parallel`` (default: all of them) decode together, one forward pass per step
        for all, and the next prompt joins as one finishes. Returns the texts in prompt order,
        each the same as ``generate`` gives alone (greedy, or with a seed); ``on_text(i, piece)``
        sees each piece as it is decoded (called from the generation threads, one at a time).
        Options as for :meth:`generate`, for every prompt."""
        import threading

        from tinyllm.batching import Batcher

        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise TinyLLMError("generate_batch() takes a non-empty list of prompts")
        unknown = sorted(set(sampling) - SAMPLING_OPTIONS)
        if unknown:
            raise TinyLLMError(f"generate_batch(): unknown option {unknown[0]!r}; sampling options are "
                               + ", ".join(sorted(SAMPLING_OPTIONS)))
        jobs = [self._continuation(p, add_bos, stop, json_schema, grammar, **sampling) for p in prompts]
        batcher = Batcher(self, min(parallel or len(jobs), len(jobs)))  # closed below: its step thread ends
        texts: list = [None] * len(jobs)
        failures: list[BaseException] = []
        lock = threading.Lock()
        queue = iter(range(len(jobs)))

        def run() -> None:
            while not failures:
                with lock:
                    i = next(queue, None)
                if i is None:
                    return
                ids, decoding = jobs[i]
                parts = []
                try:
                    with batcher.slot() as slot:
                        for piece in decoding.stream(slot, ids, max_new_tokens):
                            parts.append(piece)
                            if on_text is not None:
                                with lock:
                                    on_text(i, piece)
                except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
                    failures.append(e)
                    return
                texts[i] = "".join(parts)

        threads = [threading.Thread(target=run, daemon=True) for _ in range(batcher.slots)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            batcher.close()
        if failures:
            raise failures[0]
        return texts

    def chat_session(self, system: str | None = None, template: str | None = None, **options):
        """A multi-turn conversation (:class:`tinyllm.chat.ChatSession`): ``session.send(text)``
        streams each answer; the KV cache keeps the history already computed. ``template``: a
        built-in (tinyllm.templates.BUILTIN: chatml, llama-3, mistral, ...) or a Jinja file, instead of
        the model's own."""
        from tinyllm.chat import ChatSession

        return ChatSession(self, system=system, template=template, **options)

    def chat(self, messages: list[dict], max_new_tokens: int = 512, stream: bool = False,
             template: str | None = None, json_schema=None, grammar=None, **options):
        """Answer the last (user) message of ``messages`` ([{"role", "content"}, ...], an
        optional system message first): the answer text, or an iterator of pieces with
        ``stream=True``. Sampling and structured-output options as for :meth:`generate`."""
        from tinyllm.chat import ChatSession, check_conversation
        from tinyllm.structured import grammar_from

        messages = check_conversation(messages)
        if not messages or messages[-1]["role"] != "user":
            raise TinyLLMError("chat(messages): the last message must be the user's")
        session = ChatSession(self, template=template, max_new_tokens=max_new_tokens,
                              grammar=grammar_from(json_schema, grammar), **options)
        session.load_messages(messages[:-1])
        return session.send(messages[-1]["content"], stream=stream)
