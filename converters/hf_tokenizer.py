"""Hugging Face checkpoint directory -> tokenizer spec (see tinyllm.tokenizer) and chat template.

Files read, all optional except one tokenizer file:
  tokenizer.model          SentencePiece model (preferred when present)
  tokenizer.json           tokenizers' format (used when there is no tokenizer.model)
  tokenizer_config.json    add_bos_token, bos/eos/pad_token, added_tokens_decoder, chat_template
  special_tokens_map.json  bos/eos/pad_token when tokenizer_config.json does not name them
  added_tokens.json        {content: id} of older checkpoints (SentencePiece only)
  generation_config.json   bos/eos/pad_token_id (eos may be a list)
  chat_template.jinja      the chat template (wins over tokenizer_config.json, as in transformers)
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

from tinyllm.errors import TinyLLMError
from tinyllm.tokenizer import SentencePieceTokenizer, Tokenizer

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TinyLLMError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TinyLLMError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_string(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value, where: str) -> list[int]:
    """config/generation_config *_token_id: absent, an int, or a list of ints."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TinyLLMError(f"{where}: expected a token id or a list of token ids, got {value!r}")
    return values


def _sentencepiece_added_tokens(path: Path, tok_config: dict, special_strings: set[str]) -> list[dict]:
    """HF added tokens on top of tokenizer.model: added_tokens_decoder, else added_tokens.json."""
    added = []
    decoder = tok_config.get("added_tokens_decoder") or {}
    for key, entry in decoder.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or not key.isdigit():
            raise TinyLLMError(f"{path / 'tokenizer_config.json'}: bad added_tokens_decoder entry {key!r}: {entry!r}")
        if entry.get("single_word"):
            raise TinyLLMError(f"{path / 'tokenizer_config.json'}: added token {entry['content']!r} uses "
                               "single_word, which tinyllm does not implement")
        added.append({"id": int(key), "content": entry["content"], "special": bool(entry.get("special", False)),
                      "lstrip": bool(entry.get("lstrip", False)), "rstrip": bool(entry.get("rstrip", False))})
    if not added:
        for content, token_id in _read_json(path / "added_tokens.json").items():
            added.append({"id": token_id, "content": content, "special": content in special_strings,
                          "lstrip": False, "rstrip": False})
    return sorted(added, key=lambda t: t["id"])


def _adds_bos_by_template(tokenizer_json: dict, bos_string: str | None) -> bool:
    """Whether tokenizer.json's post-processor puts the BOS token first in a single sequence."""
    processor = tokenizer_json.get("post_processor") or {}
    processors = processor.get("processors", []) if processor.get("type") == "Sequence" else [processor]
    for proc in processors:
        if proc.get("type") == "TemplateProcessing" and proc.get("single"):
            first = proc["single"][0]
            return "SpecialToken" in first and first["SpecialToken"]["id"] == bos_string
    return False


def tokenizer_spec_from_hf_dir(path: Path, config: dict) -> dict:
    """The tokenizer spec of a Hugging Face checkpoint directory; config is its config.json."""
    path = Path(path)
    tok_config = _read_json(path / "tokenizer_config.json")
    special_map = _read_json(path / "special_tokens_map.json")
    generation = _read_json(path / "generation_config.json")

    def named(key: str) -> str | None:  # e.g. "bos_token" -> "<s>"
        return _token_string(tok_config.get(key)) or _token_string(special_map.get(key))

    strings = {name: named(name) for name in ("bos_token", "eos_token", "pad_token")}
    if (path / "tokenizer.model").is_file():
        additional = special_map.get("additional_special_tokens") or tok_config.get("additional_special_tokens") or []
        special_strings = {s for s in [*strings.values(), *map(_token_string, additional)] if s}
        model = base64.b64encode((path / "tokenizer.model").read_bytes()).decode("ascii")
        spec = {"kind": "sentencepiece", "model": model,
                "added_tokens": _sentencepiece_added_tokens(path, tok_config, special_strings)}
        add_bos_default = True  # LlamaTokenizer's default, the class a bare tokenizer.model gets
    elif (path / "tokenizer.json").is_file():
        text = (path / "tokenizer.json").read_text(encoding="utf-8")
        spec = {"kind": "tokenizer.json", "json": text}
        try:
            add_bos_default = _adds_bos_by_template(json.loads(text), strings["bos_token"])
        except json.JSONDecodeError as e:
            raise TinyLLMError(f"{path / 'tokenizer.json'}: not valid JSON ({e})") from None
    else:
        raise TinyLLMError(f"{path}: no tokenizer found (looked for {' and '.join(TOKENIZER_FILES)})")

    # A provisional tokenizer resolves the named token strings to ids.
    try:
        lookup = Tokenizer.from_spec({**spec, "bos_id": None, "eos_ids": [], "pad_id": None, "add_bos": False})
    except TinyLLMError as e:
        raise type(e)(f"{path}: {e}") from None
    model_ids = {}  # a SentencePiece model's own bos/eos ids: used when no file names the tokens
    if isinstance(lookup, SentencePieceTokenizer):
        model_ids = {name: i for name, i in (("bos_token", lookup.processor.bos_id()),
                                              ("eos_token", lookup.processor.eos_id())) if i >= 0}
    named_ids: dict[str, list[int]] = {}  # "bos_token" -> [id], or [] when no file names one
    for name, string in strings.items():
        token_id = None if string is None else lookup.token_to_id(string)
        if string is not None and token_id is None:
            raise TinyLLMError(f"{path}: {name} {string!r} (tokenizer_config.json / special_tokens_map.json) "
                               "is not in the tokenizer's vocabulary")
        named_ids[name] = [] if token_id is None else [token_id]
        if not named_ids[name] and name in model_ids:
            named_ids[name] = [model_ids[name]]

    def config_ids(key: str) -> list[int]:  # config.json's, then generation_config.json's
        return (_id_list(config.get(key), f"config.json {key}")
                + _id_list(generation.get(key), f"{path / 'generation_config.json'} {key}"))

    # The tokenizer's own token first (chat templates use it), then the configs' ids.
    bos_id = next(iter(named_ids["bos_token"] + config_ids("bos_token_id")), None)
    eos_ids = list(dict.fromkeys(named_ids["eos_token"] + config_ids("eos_token_id")))
    pad_id = next(iter(named_ids["pad_token"] + config_ids("pad_token_id")), None)

    add_bos = tok_config.get("add_bos_token", add_bos_default)
    if not isinstance(add_bos, bool):
        raise TinyLLMError(f"{path / 'tokenizer_config.json'}: add_bos_token must be true or false, got {add_bos!r}")
    add_bos = add_bos and bos_id is not None  # as HF: nothing to add without a BOS token
    spec.update(bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id, add_bos=add_bos)
    Tokenizer.from_spec(spec)  # every id must exist in the vocabulary: fail here, not at load time
    return spec


def chat_template_from_hf_dir(path: Path) -> str | None:
    """The checkpoint's chat template (Jinja source), or None when it has none."""
    path = Path(path)
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(path / "tokenizer_config.json").get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise TinyLLMError(f"{path / 'tokenizer_config.json'}: chat_template lists templates {sorted(map(str, named))} "
                           "but none named 'default'")
    raise TinyLLMError(f"{path / 'tokenizer_config.json'}: chat_template must be a string or a list, "
                       f"got {type(template).__name__}")
