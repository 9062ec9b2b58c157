"""The OpenAI-compatible HTTP API and the web chat page, as one Starlette app.

    GET  /                      the chat page (tinyllm/web/index.html)
    GET  /health                {"status": "ok", "busy", "waiting", counters}
    GET  /v1/models             the one loaded model, with its context length
    POST /v1/completions        text completion, streaming or not
    POST /v1/chat/completions   chat with the model's template, streaming or not
    POST /v1/embeddings         mean-pooled, unit-length final hidden states
    POST /tokenize, /detokenize the model's tokenizer (vLLM's and llama-server's shapes)
    GET  /tokenizer_info        its special tokens and chat template (lm-eval's remote tokenizer)

Starlette (with uvicorn) gives routing, streaming responses and disconnect detection on a
well-kept ASGI stack; everything here is the OpenAI mapping, the queue and the checks.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tinyllm import __version__
from tinyllm.errors import TinyLLMError
from tinyllm.generate import Piece
from tinyllm.server.errors import APIError, bad_request
from tinyllm.server.generation import GenerationRun
from tinyllm.server.guards import LOOPBACK_HOSTS, GuardMiddleware
from tinyllm.server.logprobs import chat_logprobs, completion_logprobs
from tinyllm.server.schemas import (
    GenerationRequest,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_embeddings,
    parse_tokenize,
)
from tinyllm.server.worker import GenerationFailed, Job, ModelWorker, QueueFull
from tinyllm.templates import resolve_template

DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_TIMEOUT = 30.0  # seconds a client may take to send its request body
FINGERPRINT = f"tinyllm-{__version__}"
TOKENIZER_ROUTES = ("/tokenize", "/detokenize", "/tokenizer_info")


class BearerAuth:
    """ASGI middleware: every /v1/ route needs ``Authorization: Bearer <api_key>``."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope["path"].startswith("/v1/") or scope["path"] in TOKENIZER_ROUTES):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if not auth:
                err = APIError(401, "Missing API key: send the header 'Authorization: Bearer <key>' "
                                    "(this server was started with --api-key).", code="invalid_api_key")
                return await err.response()(scope, receive, send)
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                err = APIError(401, "Incorrect API key provided.", code="invalid_api_key")
                return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)


async def read_json_body(request: Request, limit: int, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """The request body as a JSON object; 413 past ``limit`` bytes (counted, not trusted),
    408 when it takes longer than ``timeout`` seconds to arrive, 400 for anything that is not
    valid JSON text (deep nesting and lone surrogates included)."""
    too_big = APIError(413, f"Request body too large: the limit is {limit} bytes.", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        raw = await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"The request body did not arrive within {timeout:g} s (tinyllm serve --timeout).",
                       code="request_timeout") from None

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=no_constants)
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # lone surrogates (\ud800) cannot be text
    except RecursionError:
        raise bad_request("The request body is nested too deeply.", code="invalid_json") from None
    except (ValueError, UnicodeError) as e:
        raise bad_request(f"The request body is not valid JSON text: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return body


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class JobStreamingResponse(StreamingResponse):
    """An SSE stream that cancels its job however it ends: finished, client gone, or error."""

    def __init__(self, job: Job, content, headers: dict):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


class Service:
    """The endpoints, sharing one model, one worker and the server's limits."""

    def __init__(self, model, api_key, max_queue, max_tokens, max_body_bytes, model_id, chat_template, timeout,
                 parallel=1):
        self.model = model
        self.timeout = timeout
        self.shutting_down = False
        self.chat_template = chat_template
        self.template = resolve_template(chat_template, model.chat_template)  # a bad name fails here, at startup
        self.model_id = model_id or model.name
        self.max_tokens = min(max_tokens or model.n_ctx, model.n_ctx)
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key
        self.worker = ModelWorker(max_queue, model, parallel)
        self._page = (resources.files("tinyllm") / "web" / "index.html").read_text(encoding="utf-8")

    def begin_shutdown(self) -> None:
        """The server is stopping: every running or waiting request ends now, open streams with
        an error event, so clients learn why and the server has nothing left to cancel.
        Safe to call from a signal handler (it only sets flags)."""
        self.shutting_down = True
        self.worker.cancel_all()

    # -- informational routes ---------------------------------------------------------

    async def index(self, request: Request) -> Response:
        return HTMLResponse(self._page)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", **self.worker.stats()})

    def model_card(self) -> dict:
        m = self.model
        created = int(m.path.stat().st_mtime) if m.path.exists() else 0
        return {"id": self.model_id, "object": "model", "created": created,
                "owned_by": "tinyllm", "context_length": m.n_ctx, "architecture": m.metadata["architecture"],
                "chat_template": self.template.name, "max_tokens": self.max_tokens,
                "auth": self.api_key is not None}

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def get_model(self, request: Request) -> Response:
        self._check_model(request.path_params["model"])
        return JSONResponse(self.model_card())

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_id:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_id}'.",
                           param="model", code="model_not_found")

    # -- embeddings and the tokenizer ------------------------------------------------------

    async def embeddings(self, request: Request) -> Response:
        body = await read_json_body(request, self.max_body_bytes, self.timeout)
        inputs, fmt = parse_embeddings(body)
        model = self.model
        ids = await run_in_threadpool(lambda: [model.tokenize(x) if isinstance(x, str) else x for x in inputs])
        for i, x in enumerate(ids):
            if any(not 0 <= t < model.config.vocab_size for t in x):
                raise bad_request(f"input[{i}]: token ids must be in 0..{model.config.vocab_size - 1}", param="input")
            if len(x) > model.n_ctx:
                raise bad_request(f"input[{i}] has {len(x)} tokens; this model's context length is {model.n_ctx}",
                                  param="input", code="context_length_exceeded")
        def embed(cancelled, on):
            yield on.embed(ids)

        vectors = await self._run_on_model(embed)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()}
                for i, v in enumerate(vectors[0])]
        n = sum(len(x) for x in ids)
        return JSONResponse({"object": "list", "data": data, "model": self.model_id,
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    async def _run_on_model(self, run) -> list:
        """Queue ``run`` behind the generations; its results (what its iterator yields)."""
        if self.shutting_down:
            raise self._shutdown_error()
        job = Job(run)
        self._submit(job)
        try:
            return [x async for x in job.pieces()]
        except GenerationFailed as e:
            raise APIError(500, f"The model failed: {e}", type="server_error", code="generation_failed") from None
        finally:
            job.cancel()

    def _submit(self, job: Job) -> int:
        try:
            return self.worker.submit(job)
        except QueueFull as e:
            raise APIError(503, f"The server is busy: {e} (limit {self.worker.max_queue}, "
                                "tinyllm serve --max-queue). Retry later.",
                           type="server_error", code="queue_full", headers={"Retry-After": "1"}) from None

    async def tokenize(self, request: Request) -> Response:
        text, add_special = parse_tokenize(await read_json_body(request, self.max_body_bytes, self.timeout))
        tokens = await run_in_threadpool(self.model.tokenize, text, None if add_special else False)
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": self.model.n_ctx})

    async def detokenize(self, request: Request) -> Response:
        tokens = parse_detokenize(await read_json_body(request, self.max_body_bytes, self.timeout))
        vocab = self.model.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in tokens):
            raise bad_request(f"token ids must be in 0..{vocab - 1}", param="tokens")
        text = self.model.detokenize(tokens)
        return JSONResponse({"prompt": text, "content": text})

    async def tokenizer_info(self, request: Request) -> Response:
        tok = self.model.tokenizer

        def text(token_id):
            return None if token_id is None else tok.token_text(token_id)

        return JSONResponse({"tokenizer_class": type(tok).__name__, "bos_token": text(tok.bos_id),
                             "eos_token": text(tok.eos_ids[0] if tok.eos_ids else None),
                             "pad_token": text(tok.pad_id), "add_bos_token": tok.add_bos,
                             "model_max_length": self.model.n_ctx, "vocab_size": tok.vocab_size,
                             "chat_template": self.model.chat_template})

    # -- generation -----------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        body = await read_json_body(request, self.max_body_bytes, self.timeout)
        return await self._generate(request, parse_completion(body))

    async def chat_completions(self, request: Request) -> Response:
        body = await read_json_body(request, self.max_body_bytes, self.timeout)
        return await self._generate(request, parse_chat(body))

    def _prepare(self, req: GenerationRequest) -> GenerationRun:
        # on a thread-pool thread: a slow chat template (time-limited) delays only this request
        return GenerationRun(self.model, req, self.max_tokens, self.chat_template)

    def _shutdown_error(self) -> APIError:
        return APIError(503, "The server is shutting down.", type="server_error", code="server_shutdown")

    async def _generate(self, request: Request, req: GenerationRequest) -> Response:
        if self.shutting_down:
            raise self._shutdown_error()
        run = await run_in_threadpool(self._prepare, req)  # any model name: the one model answers
        job = Job(run.pieces, run.prompt_ids)
        ahead = self._submit(job)
        headers = {"X-Queue-Position": str(ahead)}
        kind = "chat.completion" if req.endpoint == "chat" else "text_completion"
        head = {"id": f"{'chatcmpl' if req.endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": kind, "created": int(time.time()), "model": self.model_id,
                "system_fingerprint": FINGERPRINT}
        if req.stream:
            return JobStreamingResponse(job, self._stream(req, run, job, head), headers)
        return await self._complete(request, req, run, job, head, headers)

    def _logprobs(self, req, entries):
        if req.logprobs is None:
            return None
        if req.endpoint == "chat":
            return chat_logprobs(self.model.tokenizer, entries)
        return completion_logprobs(self.model.tokenizer, entries)

    async def _complete(self, request, req, run, job, head, headers) -> Response:
        async def collect() -> list[Piece]:
            return [piece async for piece in job.pieces()]

        text_task = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            await asyncio.wait({text_task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            job.cancel()  # a no-op once finished; frees the model when the client has gone
            gone.cancel()
            if not text_task.done():
                text_task.cancel()
        if not text_task.done() or text_task.cancelled():
            return Response(status_code=499)  # the client closed the connection; nobody reads this
        if self.shutting_down:
            raise self._shutdown_error()
        try:
            pieces = text_task.result()
        except GenerationFailed as e:
            raise APIError(500, f"Generation failed: {e}", type="server_error", code="generation_failed") from None
        text = "".join(p.text for p in pieces)
        logprobs = self._logprobs(req, [e for p in pieces for e in p.logprobs])
        if req.endpoint == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": run.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": run.finish_reason}
        return JSONResponse({**head, "choices": [choice], "usage": run.usage}, headers=headers)

    async def _stream(self, req, run, job, head):
        chat = req.endpoint == "chat"
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        usage_field = {"usage": None} if req.include_usage else {}

        def chunk(delta_or_text, finish_reason=None, entries=None):
            logprobs = None if entries is None else self._logprobs(req, entries)
            if chat:
                choice = {"index": 0, "delta": delta_or_text, "logprobs": logprobs, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": delta_or_text, "logprobs": logprobs, "finish_reason": finish_reason}
            return sse({**head, "choices": [choice], **usage_field})

        if chat:
            yield chunk({"role": "assistant", "content": ""})
        try:
            async for piece in job.pieces():
                yield chunk({"content": piece.text} if chat else piece.text, entries=piece.logprobs)
        except GenerationFailed as e:
            yield sse(APIError(500, f"Generation failed: {e}", type="server_error", code="generation_failed").body())
        else:
            if self.shutting_down:
                yield sse(self._shutdown_error().body())
                yield "data: [DONE]\n\n"
                return
            yield chunk({} if chat else "", run.finish_reason)
            if req.include_usage:
                yield sse({**head, "choices": [], "usage": run.usage})
        yield "data: [DONE]\n\n"


def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()


def create_app(model, api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE, max_tokens: int | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, model_id: str | None = None,
               chat_template: str | None = None, allowed_hosts=LOOPBACK_HOSTS,
               timeout: float = DEFAULT_TIMEOUT, parallel: int = 1) -> Starlette:
    """The server for one loaded ``model``. ``parallel``: requests decoded at once (continuous
    batching, each in a KV cache slot of its own); ``max_queue``: requests that may wait while
    every slot is busy (more get 503); ``max_tokens``: the most one request may generate (default and
    ceiling: the context length); ``model_id``: the name clients use (default: the file's stem);
    ``chat_template``: a built-in template name or Jinja file instead of the model's own;
    ``allowed_hosts``: the Host header values answered (default: loopback names; None: any);
    ``timeout``: seconds a client may take to send its request body."""
    if api_key is not None and not api_key.strip():
        raise TinyLLMError("the API key is empty: give a non-empty --api-key (or none, for no authentication)")
    if not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
        raise TinyLLMError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise TinyLLMError(f"parallel must be a positive integer (slots), got {parallel!r}")
    service = Service(model, api_key, max_queue, max_tokens, max_body_bytes, model_id, chat_template, timeout,
                      parallel)
    routes = [
        Route("/", service.index),
        Route("/health", service.health),
        Route("/v1/models", service.list_models),
        Route("/v1/models/{model:path}", service.get_model),
        Route("/v1/completions", service.completions, methods=["POST"]),
        Route("/v1/chat/completions", service.chat_completions, methods=["POST"]),
        Route("/v1/embeddings", service.embeddings, methods=["POST"]),
        Route("/tokenize", service.tokenize, methods=["POST"]),
        Route("/detokenize", service.detokenize, methods=["POST"]),
        Route("/tokenizer_info", service.tokenizer_info),
    ]

    @asynccontextmanager
    async def lifespan(app):
        service.worker.start()
        yield
        service.worker.stop()

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        APIError: lambda request, exc: exc.response(),
        HTTPException: _http_error,
    })
    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)
    app.add_middleware(GuardMiddleware, allowed_hosts=allowed_hosts)  # outermost: checked first
    app.state.service = service
    return app
