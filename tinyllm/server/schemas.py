"""The OpenAI request subset tinyllm serves: parsed and validated before anything is queued.

Every field a client may send is either used, accepted as a no-op at its neutral value
(``n=1``, ``presence_penalty=0``, ``tools=[]``, ...), or rejected with a 400 that names
it. Nothing is silently ignored. Omitted sampling options take the model's defaults, as in
``tinyllm generate``. ``model`` may be any name: one model is served, and answers carry its
name (llama-server's rule), so clients written for another server work unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from tinyllm.errors import TinyLLMError
from tinyllm.server.errors import bad_request, unsupported
from tinyllm.structured import Grammar

MAX_STOP_STRINGS = 16    # OpenAI allows 4; lm-eval tasks send more, and llama-server takes any number
MAX_LOGPROBS = 20        # alternatives per token (OpenAI's top_logprobs limit; vLLM's default)
MAX_STOP_LENGTH = 1024   # characters in one stop string (matching is linear either way; this bounds memory)

# Sampling options a request may set (llama.cpp's server names for the non-OpenAI ones).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n", "seed")


def _neutral(*values):
    return lambda v: any(v is x or (type(v) is type(x) and v == x) for x in values)


# field -> (accepted when, why anything else is refused)
_ONE_CHOICE = "tinyllm returns one choice per request"
_NO_TOOLS = "tinyllm does not implement tool or function calling"
_PENALTY = "use repeat_penalty (tinyllm's penalty on recent tokens) instead"
UNSUPPORTED = {
    "n": (_neutral(None, 1), _ONE_CHOICE),
    "best_of": (_neutral(None, 1), _ONE_CHOICE),
    "presence_penalty": (_neutral(None, 0, 0.0), _PENALTY),
    "frequency_penalty": (_neutral(None, 0, 0.0), _PENALTY),
    "logit_bias": (lambda v: v is None or v == {}, "tinyllm does not implement logit_bias"),
    "suffix": (_neutral(None, ""), "tinyllm does not implement insertion (suffix)"),
    "tools": (lambda v: v is None or v == [], _NO_TOOLS),
    "tool_choice": (_neutral(None, "none"), _NO_TOOLS),
    "functions": (lambda v: v is None or v == [], _NO_TOOLS),
    "function_call": (_neutral(None, "none"), _NO_TOOLS),
    "parallel_tool_calls": (_neutral(None, True, False), _NO_TOOLS),
    "modalities": (lambda v: v is None or v == ["text"], "tinyllm only produces text"),
    "audio": (_neutral(None), "tinyllm only produces text"),
    "prediction": (_neutral(None), "tinyllm does not implement predicted outputs"),
    "store": (_neutral(None, False), "tinyllm stores nothing"),
    "metadata": (lambda v: v is None or v == {}, "tinyllm stores nothing"),
    "service_tier": (_neutral(None, "auto", "default"), "tinyllm has one service tier"),
    "reasoning_effort": (_neutral(None), "tinyllm models do not reason"),
    "web_search_options": (_neutral(None), "tinyllm has no web search"),
}
COMMON_FIELDS = {"model", "stream", "stream_options", "max_tokens", "stop", "user", "logprobs", "response_format",
                 "grammar", *SAMPLING_FIELDS}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class GenerationRequest:
    """A validated request: either ``prompt`` (completions) or ``messages`` (chat)."""

    endpoint: str                              # "chat" or "completion"
    model: str | None = None
    prompt: str | list[int] | None = None      # text, or token ids
    messages: list[dict] | None = None         # [{"role", "content"}]; "developer" becomes "system"
    max_tokens: int | None = None              # None: the endpoint's default
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    sampling: dict = field(default_factory=dict)  # SAMPLING_FIELDS that were given
    logprobs: int | None = None                # alternatives listed per token; None: no logprobs
    echo: bool = False                         # completions: the prompt first, with its logprobs
    grammar: Grammar | None = None             # response_format / grammar; None: free text


# -- typed field readers: each names the field in its error ------------------------------

def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__.replace("str", "string").replace("dict", "object")


def _number(body: dict, name: str, lo: float, hi: float | None = None, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad_request(f"{name} must be a number, not {_type_name(v)}", param=name)
    if not math.isfinite(v):  # 1e999 parses as infinity
        raise bad_request(f"{name} must be a finite number, got {v}", param=name)
    if (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
        lo_text = f"> {lo}" if lo_open else f">= {lo}"
        raise bad_request(f"{name} must be {lo_text}" + (f" and <= {hi}" if hi is not None else "") + f", got {v}",
                          param=name)
    return float(v)


def _integer(body: dict, name: str, lo: int, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad_request(f"{name} must be an integer, not {_type_name(v)}", param=name)
    if v < lo or (hi is not None and v > hi):
        raise bad_request(f"{name} must be >= {lo}" + (f" and <= {hi}" if hi is not None else "") + f", got {v}",
                          param=name)
    return v


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"{name} must be true or false, not {_type_name(v)}", param=name)
    return v


def _string(body: dict, name: str):
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise bad_request(f"{name} must be a string, not {_type_name(v)}", param=name)
    return v


# -- request parts -----------------------------------------------------------------------

def _check_fields(body: dict, allowed: set) -> None:
    for name, value in body.items():
        if name in UNSUPPORTED:
            accepted, why = UNSUPPORTED[name]
            if not accepted(value):
                raise unsupported(name, value, why)
        elif name not in allowed:
            raise bad_request(f"Unrecognized request argument supplied: {name}", param=name,
                              code="unrecognized_argument")


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    if any(len(s) > MAX_STOP_LENGTH for s in stops):
        raise bad_request(f"each stop string may have at most {MAX_STOP_LENGTH} characters", param="stop")
    return [s for s in stops if s]


def _sampling(body: dict) -> dict:
    values = {
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 0.0, 1.0, lo_open=True),
        "top_k": _integer(body, "top_k", 0),
        "min_p": _number(body, "min_p", 0.0, 1.0),
        "repeat_penalty": _number(body, "repeat_penalty", 0.0, lo_open=True),
        "repeat_last_n": _integer(body, "repeat_last_n", 0),
        "seed": _integer(body, "seed", 0, 2**63 - 1),
    }
    if values["min_p"] == 1.0:
        raise bad_request("min_p must be < 1", param="min_p")
    return {k: v for k, v in values.items() if v is not None}


def _content_text(content, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or "type" not in part:
                raise bad_request(f"{where}.content parts must be objects with a type", param="messages")
            if part["type"] != "text":
                raise unsupported(f"{where}.content[].type", part["type"], "tinyllm models read text only")
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{where}.content text part needs a string 'text'", param="messages")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{where}.content must be a string or a list of text parts, not {_type_name(content)}",
                      param="messages")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise bad_request("messages is required", param="messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad_request("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object, not {_type_name(m)}", param="messages")
        role = m.get("role")
        if role in ("tool", "function"):
            raise unsupported(f"{where}.role", role, _NO_TOOLS)
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param="messages")
        for key, value in m.items():
            if key in ("tool_calls", "function_call", "tool_call_id") and value:
                raise unsupported(f"{where}.{key}", value, _NO_TOOLS)
            if key not in ("role", "content", "name", "tool_calls", "function_call", "tool_call_id", "refusal"):
                raise bad_request(f"Unrecognized argument supplied in {where}: {key}", param="messages")
        if m.get("name") is not None:
            raise unsupported(f"{where}.name", m["name"], "chat templates here take no participant names")
        out.append({"role": ROLES[role], "content": _content_text(m.get("content"), where)})
    return out


def _prompt(body: dict) -> str | list[int]:
    """One prompt: text or token ids (also as a one-element batch, as the openai client sends)."""
    p = body.get("prompt")
    if p is None:
        raise bad_request("prompt is required", param="prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p
    if isinstance(p, list) and len(p) > 1 and all(isinstance(t, (str, list)) for t in p):
        raise unsupported("prompt", f"<{len(p)} prompts>", "one prompt per request; send them one by one")
    raise bad_request("prompt must be a string or a list of token ids", param="prompt")


def _common(body: dict, endpoint: str) -> GenerationRequest:
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad_request("stream_options must be an object with only include_usage", param="stream_options")
        include_usage = _boolean(options, "include_usage")
    _string(body, "user")
    return GenerationRequest(endpoint=endpoint, model=_string(body, "model"), stop=_stop(body), stream=stream,
                             include_usage=include_usage, sampling=_sampling(body),
                             max_tokens=_integer(body, "max_tokens", 0), grammar=_grammar(body))


def _grammar(body: dict) -> Grammar | None:
    """``response_format`` (OpenAI: text, json_object, json_schema) or ``grammar`` (llama-server:
    GBNF text); compiled now, so a bad schema is a 400 before anything is queued."""
    fmt, gbnf = body.get("response_format"), body.get("grammar")
    if gbnf is not None:
        if fmt is not None and fmt != {"type": "text"}:
            raise bad_request("give response_format or grammar, not both", param="grammar")
        if not isinstance(gbnf, str):
            raise bad_request(f"grammar must be a string (GBNF), not {_type_name(gbnf)}", param="grammar")
        return _compiled("grammar", Grammar.gbnf, gbnf)
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise bad_request("response_format must be an object with a type", param="response_format")
    kind = fmt["type"]
    if kind == "text":
        _only(fmt, {"type"}, "response_format")
        return None
    if kind == "json_object":
        _only(fmt, {"type"}, "response_format")
        return _compiled("response_format", lambda _: Grammar.json_object(), None)
    if kind == "json_schema":
        _only(fmt, {"type", "json_schema"}, "response_format")
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("response_format.json_schema must be an object with a schema",
                              param="response_format.json_schema")
        _only(spec, {"name", "schema", "strict", "description"}, "response_format.json_schema")
        for key in ("name", "description"):
            if spec.get(key) is not None and not isinstance(spec[key], str):
                raise bad_request(f"response_format.json_schema.{key} must be a string",
                                  param=f"response_format.json_schema.{key}")
        _boolean(spec, "strict")
        schema = spec.get("schema", {})  # OpenAI: no schema means any JSON
        if not isinstance(schema, (dict, bool)):
            raise bad_request("response_format.json_schema.schema must be a JSON Schema object",
                              param="response_format.json_schema.schema")
        return _compiled("response_format.json_schema.schema", Grammar.json_schema, schema)
    raise bad_request(f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                      param="response_format.type")


def _only(obj: dict, keys: set, where: str) -> None:
    extra = sorted(set(obj) - keys)
    if extra:
        raise bad_request(f"Unrecognized argument supplied in {where}: {extra[0]}",
                          param=extra[0] if where == "the request" else f"{where}.{extra[0]}")


def _compiled(param: str, build, source) -> Grammar:
    try:
        return build(source)
    except TinyLLMError as e:
        raise bad_request(str(e), param=param) from None


def parse_chat(body: dict) -> GenerationRequest:
    _check_fields(body, CHAT_FIELDS)
    req = _common(body, "chat")
    req.messages = _messages(body)
    alt = _integer(body, "max_completion_tokens", 1)
    if alt is not None and req.max_tokens is not None and alt != req.max_tokens:
        raise bad_request("max_tokens and max_completion_tokens disagree; send one", param="max_completion_tokens")
    req.max_tokens = req.max_tokens if alt is None else alt
    if req.max_tokens == 0:
        raise bad_request("max_tokens must be >= 1 for a chat completion", param="max_tokens")
    if _boolean(body, "logprobs"):
        req.logprobs = _integer(body, "top_logprobs", 0, MAX_LOGPROBS) or 0
    elif body.get("top_logprobs") is not None:
        raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    return req


def parse_completion(body: dict) -> GenerationRequest:
    _check_fields(body, COMPLETION_FIELDS)
    req = _common(body, "completion")
    req.prompt = _prompt(body)
    req.echo = _boolean(body, "echo")
    if body.get("logprobs") is not False:  # false: what some clients send for "none"
        req.logprobs = _integer(body, "logprobs", 0, MAX_LOGPROBS)
    if req.max_tokens == 0 and not req.echo:
        raise bad_request("max_tokens must be >= 1 (0, generating nothing, is only allowed with echo: "
                          "the prompt's logprobs)", param="max_tokens")
    return req


# -- embeddings and tokenizer routes ---------------------------------------------------------

MAX_EMBEDDING_INPUTS = 256  # texts in one /v1/embeddings request


def _token_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                             for t in value)


def parse_embeddings(body: dict) -> tuple[list, str]:
    """``input`` (a string, a list of strings, token ids, or a list of token-id lists) and
    ``encoding_format`` ("float" or "base64")."""
    _only(body, {"input", "model", "encoding_format", "user", "dimensions"}, "the request")
    _string(body, "model")
    _string(body, "user")
    if body.get("dimensions") is not None:
        raise unsupported("dimensions", body["dimensions"], "embeddings have the model's hidden size")
    fmt = _string(body, "encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad_request(f"encoding_format must be float or base64, got {fmt!r}", param="encoding_format")
    v = body.get("input")
    if isinstance(v, str) or _token_ids(v):
        inputs = [v]
    elif isinstance(v, list) and v and all(isinstance(x, str) or _token_ids(x) for x in v):
        inputs = v
    else:
        raise bad_request("input must be a string, a list of strings, or (lists of) token ids", param="input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise bad_request(f"input takes at most {MAX_EMBEDDING_INPUTS} items, got {len(inputs)}", param="input")
    if any(x == "" for x in inputs):
        raise bad_request("input must not contain empty strings", param="input")
    return inputs, fmt


def parse_tokenize(body: dict) -> tuple[str, bool]:
    """vLLM's ``{"prompt", "add_special_tokens"}`` or llama-server's ``{"content", "add_special"}``."""
    _only(body, {"prompt", "content", "add_special_tokens", "add_special", "model", "with_pieces"}, "the request")
    key = "prompt" if "prompt" in body else "content"
    text = _string(body, key)
    if text is None:
        raise bad_request("prompt (the text to tokenize) is required", param="prompt")
    add_special = _boolean(body, "add_special_tokens", True) and _boolean(body, "add_special", True)
    return text, add_special


def parse_detokenize(body: dict) -> list[int]:
    _only(body, {"tokens", "model"}, "the request")
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise bad_request("tokens must be a list of token ids", param="tokens")
    return tokens
