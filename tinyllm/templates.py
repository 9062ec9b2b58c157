"""Chat templates: Hugging Face Jinja templates rendered as transformers renders them, and
built-in fallbacks for checkpoints that carry none.

A template turns a list of messages ``[{"role": "system"|"user"|"assistant", "content": str}]``
into the prompt text the model was tuned on. A model file keeps its own template
(tokenizer_config.json ``chat_template``, stored in the .q4 header at conversion); the
built-ins here are chosen explicitly (``tinyllm chat --template chatml``).
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tinyllm.errors import TinyLLMError

# Built-ins. chatml and llama-2 are the templates their reference checkpoints ship
# (teknium/OpenHermes-2.5-Mistral-7B and meta-llama/Llama-2-7b-chat-hf tokenizer_config.json).
CHATML = ("{% for message in messages %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

LLAMA_2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
           "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
           "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
           "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if loop.index0 == 0 and system_message != false %}"
           "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
           "{% else %}{% set content = message['content'] %}{% endif %}"
           "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
           "{% endfor %}")

# Stanford Alpaca's prompt (its README), one Instruction/Response block per exchange; a
# system message replaces the preamble.
ALPACA = ("{% if messages and messages[0]['role'] == 'system' %}{% set preamble = messages[0]['content'] %}"
          "{% set loop_messages = messages[1:] %}{% else %}"
          "{% set preamble = 'Below is an instruction that describes a task. "
          "Write a response that appropriately completes the request.' %}"
          "{% set loop_messages = messages %}{% endif %}{{ preamble + '\n\n' }}"
          "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
          "{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
          "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + '\n\n' }}{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}")

# No roles at all: the system text, then the turns as one running text, each user turn on a
# new line. The model's answer continues the user's text (a base model "chats" by continuing).
PLAIN = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
         "{% else %}{% if message['role'] == 'user' and not loop.first"
         " and messages[loop.index0 - 1]['role'] != 'system' %}"
         "{{ '\n' }}{% endif %}{{ message['content'] }}{% endif %}{% endfor %}")


# The templates these checkpoints ship in tokenizer_config.json (vicuna ships none: the one
# llama.cpp's test-chat-template.cpp uses for eachadea/vicuna-13b-1.1, FastChat's v1.1 format).
# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA_3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
           "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
           "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
           "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# mistralai/Mistral-7B-Instruct-v0.2 ("v1", with system)
MISTRAL = ("{%- if messages[0]['role'] == 'system' %}\n"
           "    {%- set system_message = messages[0]['content'] %}\n"
           "    {%- set loop_messages = messages[1:] %}\n"
           "{%- else %}\n"
           "    {%- set loop_messages = messages %}\n"
           "{%- endif %}\n\n"
           "{{- bos_token }}\n"
           "{%- for message in loop_messages %}\n"
           "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
           "        {{- raise_exception('After the optional system message, conversation roles must alternate "
           "user/assistant/user/assistant/...') }}\n"
           "    {%- endif %}\n"
           "    {%- if message['role'] == 'user' %}\n"
           "        {%- if loop.first and system_message is defined %}\n"
           "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
           "        {%- else %}\n"
           "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
           "        {%- endif %}\n"
           "    {%- elif message['role'] == 'assistant' %}\n"
           "        {{- ' ' + message['content'] + eos_token}}\n"
           "    {%- else %}\n"
           "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an "
           "initial optional system message!') }}\n"
           "    {%- endif %}\n"
           "{%- endfor %}\n")

# HuggingFaceH4/zephyr-7b-beta
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
          "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
          "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
          "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
          "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")

# eachadea/vicuna-13b-1.1 (FastChat v1.1; the checkpoint ships no template)
VICUNA = ("{%- for message in messages %}{%- if message['role'] == 'system' -%}"
          "{{- '' + message['content'] + '\n\n' -}}{%- else -%}{%- if message['role'] == 'user' -%}"
          "{{-'USER: ' + message['content'] + '\n'-}}{%- else -%}{{-'ASSISTANT: ' + message['content'] + '</s>\n' -}}"
          "{%- endif -%}{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{-'ASSISTANT:'-}}{%- endif -%}")

# google/gemma-7b-it
GEMMA = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
         "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")

# microsoft/Phi-3-mini-4k-instruct
PHI_3 = ("{% for message in messages %}{% if message['role'] == 'system' %}"
         "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
         "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
         "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")


@dataclass(frozen=True)
class ChatTemplate:
    name: str               # a built-in's name, "model" (the model's own) or a file path
    source: str             # Jinja text
    stop: tuple = ()        # stop strings that end an answer written in this format
    continuation: bool = False  # the answer continues the prompt's text (keep its leading space)
    markers: tuple = field(default=(), compare=False)  # end-of-turn strings found in the source

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **special_tokens) -> str:
        return render_template(self.source, messages, add_generation_prompt=add_generation_prompt, **special_tokens)


BUILTIN = {
    "chatml": ChatTemplate("chatml", CHATML, stop=("<|im_end|>", "<|im_start|>")),
    "llama-2": ChatTemplate("llama-2", LLAMA_2, stop=("[INST]",)),
    "alpaca": ChatTemplate("alpaca", ALPACA, stop=("\n\n### ", "### Instruction:")),
    "plain": ChatTemplate("plain", PLAIN, continuation=True),
    "llama-3": ChatTemplate("llama-3", LLAMA_3, stop=("<|eot_id|>", "<|start_header_id|>")),
    "mistral": ChatTemplate("mistral", MISTRAL, stop=("[INST]",)),
    "zephyr": ChatTemplate("zephyr", ZEPHYR, stop=("<|user|>", "<|system|>")),
    "vicuna": ChatTemplate("vicuna", VICUNA, stop=("\nUSER:", "</s>")),
    "gemma": ChatTemplate("gemma", GEMMA, stop=("<end_of_turn>", "<start_of_turn>")),
    "phi-3": ChatTemplate("phi-3", PHI_3, stop=("<|end|>", "<|user|>")),
}

# Tokens that end a turn in the common chat formats. When a template uses one and the
# vocabulary has it as a token, generation stops on it even when it is not the tokenizer's
# eos (the "wrong end-of-turn token" failure: ChatML on a model whose eos is </s>).
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
                       "</s>")


def _raise(message):
    raise TinyLLMError(f"chat template error: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' override: Jinja's own tojson escapes HTML characters
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


# Limits on rendering a template (it comes from a model file: a stranger's program).
TEMPLATE_SECONDS = 2.0          # wall time of one render
TEMPLATE_MAX_CHARS = 1 << 22    # the output, and any one string or list a template builds
_BIG_WIDTH = re.compile(r"[%{][^%{}]*?\d{6,}")  # a printf/format width or precision of 6+ digits


class TemplateLimitError(TinyLLMError):
    """A chat template ran past a resource limit."""


def _limit(message: str):
    raise TemplateLimitError(f"chat template error: {message}")


def _check_size(value):
    if isinstance(value, (str, list, tuple, dict)) and len(value) > TEMPLATE_MAX_CHARS:
        _limit(f"it built a value of {len(value)} items (the limit is {TEMPLATE_MAX_CHARS})")
    return value


def _check_args(args, kwargs) -> None:
    """Refuse integer arguments that would size a string or list past the limit (a width, a count)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > TEMPLATE_MAX_CHARS:
            _limit(f"argument {a} is out of range")


def _check_format(text) -> None:
    """Refuse printf / str.format widths of six or more digits before formatting runs."""
    if isinstance(text, str) and _BIG_WIDTH.search(text):
        _limit("a format width of six or more digits")


class _LimitedCodeGenerator(CodeGenerator):
    """The ``~`` operator goes through the environment, which checks the result's size."""

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox (no Python internals reachable) plus resource limits: arithmetic, calls,
    filters and concatenation that would build strings or lists past TEMPLATE_MAX_CHARS, or
    numbers past a few thousand digits, are refused before they run; a render runs under a
    deadline (checked on every line the template executes) and an output limit."""

    code_generator_class = _LimitedCodeGenerator
    intercepted_binops = frozenset(["+", "*", "**", "%"])

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > TEMPLATE_MAX_CHARS:
                    _limit(f"repeating a sequence {n} times")
        elif operator == "**":
            if isinstance(right, int) and isinstance(left, int) and abs(left) > 1 and right > 10_000:
                _limit(f"{left} ** {right} is too large")
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                if len(left) + len(right) > TEMPLATE_MAX_CHARS:
                    _limit("concatenation too long")
        elif operator == "%":
            _check_format(left)
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own signature)
        _check_args(args, kwargs)
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)  # str.format / format_map, as the sandbox runs them
        if wrapped is not None:
            _check_format(value.__self__)
        return wrapped

    def checked_concat(self, parts):
        return _check_size("".join(map(str, parts)))


def _checked_filter(name: str, f):
    """A filter with the limits: integer arguments bounded (the filtered value itself, and the
    context or environment a pass_* filter receives first, are not arguments), the format
    filter's format string checked, the result's size checked."""
    passes = getattr(f, "jinja_pass_arg", None)
    skip = 2 if passes is not None else 1

    def checked(*args, **kwargs):
        _check_args(args[skip:], kwargs)
        if name == "format" and len(args) >= skip:
            _check_format(args[skip - 1])
        return _check_size(f(*args, **kwargs))

    if passes is not None:
        checked.jinja_pass_arg = passes
    return checked


def _environment() -> LimitedEnvironment:
    """The environment transformers' apply_chat_template uses: sandboxed (a template from a
    model file cannot reach Python internals), trim_blocks/lstrip_blocks, loop controls,
    raise_exception, strftime_now and a tojson that does not escape HTML; with limits."""
    env = LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _checked_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()


class _Deadline:
    """A trace function for the rendering thread only: past the deadline, the next line the
    template executes raises. (Jinja compiles templates to Python, so every loop iteration
    and macro call runs lines; the C-level operations that could run long are refused above.)"""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def __call__(self, frame, event, arg):
        if time.monotonic() > self.deadline:
            _limit(f"rendering took longer than {TEMPLATE_SECONDS:g} s")
        return self


def render_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
    """Render a Hugging Face chat template as transformers does, within the limits above.
    ``extra`` carries the special token strings (bos_token, eos_token, ...) and anything else
    the template reads. Every failure is a TinyLLMError."""
    _check_messages(messages)
    previous = sys.gettrace()
    sys.settrace(_Deadline(TEMPLATE_SECONDS))
    try:
        out, size = [], 0
        for piece in _ENV.from_string(template).generate(messages=messages,
                                                         add_generation_prompt=add_generation_prompt, **extra):
            size += len(piece)
            if size > TEMPLATE_MAX_CHARS:
                _limit(f"its output passed {TEMPLATE_MAX_CHARS} characters")
            out.append(piece)
        return "".join(out)
    except TinyLLMError:
        raise
    except jinja2.TemplateError as e:  # syntax errors, sandbox violations, undefined calls
        raise TinyLLMError(f"chat template error: {type(e).__name__}: {e}") from None
    except RecursionError:
        raise TemplateLimitError("chat template error: recursion too deep") from None
    except MemoryError:
        raise TemplateLimitError("chat template error: out of memory") from None
    except Exception as e:  # a template can provoke any Python error (a stranger's program)
        raise TinyLLMError(f"chat template error: {type(e).__name__}: {e}") from None
    finally:
        sys.settrace(previous)


def _check_messages(messages) -> None:
    if not isinstance(messages, list):
        raise TinyLLMError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TinyLLMError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")


def resolve_template(name: str | None, model_template: str | None) -> ChatTemplate:
    """The template to chat with: ``name`` (a built-in, or a file holding a Jinja template)
    when given, else the model's own, else "plain"."""
    if name is None:
        if model_template:
            return _with_markers(_compiled(ChatTemplate("model", model_template), "the model's chat template"))
        return BUILTIN["plain"]
    if name in BUILTIN:
        return _with_markers(BUILTIN[name])
    path = Path(name)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TinyLLMError(f"cannot read chat template file {name!r}: {e}") from None
        return _with_markers(_compiled(ChatTemplate(str(path), text), f"chat template file {name!r}"))
    raise TinyLLMError(f"unknown chat template {name!r}: choose one of {', '.join(BUILTIN)}, or give a Jinja file")


def _compiled(t: ChatTemplate, what: str) -> ChatTemplate:
    """``t``, once its Jinja source has compiled: a broken template is refused when chosen,
    not at the first message."""
    try:
        _ENV.from_string(t.source)
    except jinja2.TemplateSyntaxError as e:
        raise TinyLLMError(f"{what} is not a valid Jinja template (line {e.lineno}: {e.message})") from None
    except TinyLLMError:
        raise
    return t


def _with_markers(t: ChatTemplate) -> ChatTemplate:
    markers = tuple(m for m in END_OF_TURN_MARKERS if m in t.source)
    return ChatTemplate(t.name, t.source, t.stop, t.continuation, markers)
