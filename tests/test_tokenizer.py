"""Tokenizers against their oracles: llama.cpp's test vectors, sentencepiece and tokenizers'
own decode, transformers' AutoTokenizer for the special ids; streaming equals decode."""
from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path

import pytest

from tinyllm.converters.hf_tokenizer import chat_template_from_hf_dir, tokenizer_spec_from_hf_dir
from tinyllm.errors import FormatError, TinyLLMError, UnsupportedError
from tinyllm.tokenizer import Tokenizer, sentencepiece_normalizer_flags

from .conftest import shared

VECTOR_SETS = {  # tokenizer folder -> llama.cpp test-vector stem
    "llama2-tokenizer": "ggml-vocab-llama-spm.gguf",
    "gpt-j-6b-tokenizer": "ggml-vocab-gpt-2.gguf",
    "gpt-neox-20b-tokenizer-mpt": "ggml-vocab-mpt.gguf",
    "falcon-7b-instruct-tokenizer": "ggml-vocab-falcon.gguf",
}
HF_FOLDERS = ["stories260K-hf", "falcon-7b-instruct-tokenizer", "gpt-j-6b-tokenizer", "replit-code-v1_5-3b-mpt-config"]
ALL_FOLDERS = [*VECTOR_SETS, "stories260K-hf", "replit-code-v1_5-3b-mpt-config"]

# NFC text without runs of spaces (stories260K's model collapses those, as sentencepiece should)
UNICODE_TEXTS = [
    "Hello world",
    "Füße, naïve café, Ελληνικά, кириллица",
    "日本語のテキストと中文字符",
    "emoji 😀🎉 family 👩‍👩‍👧 flag 🇫🇷 skin 👍🏽",
    "combining q\u0307 a\u0331 and Devanagari नमस्ते",
    "tabs\tand\nnew lines\r\nend",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 outside the BMP 𐍈",
]


def _folder_config(folder: Path) -> dict:
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _load(name: str) -> Tokenizer:
    folder = shared(name)
    return Tokenizer.from_spec(tokenizer_spec_from_hf_dir(folder, _folder_config(folder)))


_cache: dict[str, Tokenizer] = {}


def tokenizer(name: str) -> Tokenizer:
    if name not in _cache:
        _cache[name] = _load(name)
    return _cache[name]


@pytest.fixture(scope="module")
def sp_style_json(tmp_path_factory) -> str:
    """stories260K's tokenizer.model converted by transformers to tokenizer.json (HF LLaMA
    style: Metaspace pre-tokenizer, Replace/ByteFallback/Fuse/Strip decoder, byte_fallback)."""
    pytest.importorskip("google.protobuf")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(shared("stories260K-hf"), local_files_only=True)
    return hf.backend_tokenizer.to_str()


def _json_spec(text: str, **ids) -> dict:
    return {"kind": "tokenizer.json", "json": text, "bos_id": 1, "eos_ids": [2], "pad_id": None, "add_bos": True, **ids}


def _with_decoder(text: str, decoder: dict) -> str:
    parsed = json.loads(text)
    parsed["decoder"] = decoder
    return json.dumps(parsed)


METASPACE = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}


def _read_vectors(folder: Path, stem: str) -> list[tuple[str, list[int]]]:
    texts = (folder / f"{stem}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    lines = (folder / f"{stem}.out").read_text(encoding="utf-8").split("\n")
    assert texts[-1] == "" and lines[-1] == ""  # both files end with a separator / newline
    texts, lines = texts[:-1], lines[:-1]
    assert len(texts) == len(lines) == 46
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines)]


# ---- encoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VECTOR_SETS))
def test_llamacpp_vectors(name):
    vectors = _read_vectors(shared(name), VECTOR_SETS[name])
    tok = tokenizer(name)
    assert tok.spec["kind"] == ("sentencepiece" if name == "llama2-tokenizer" else "tokenizer.json")
    wrong = [(text, ids, tok.encode(text, add_bos=False)) for text, ids in vectors
             if tok.encode(text, add_bos=False) != ids]
    assert not wrong
    assert vectors[2] == ("", [])  # the parsing kept the empty string and its empty line


def test_add_bos():
    llama, gptj = tokenizer("llama2-tokenizer"), tokenizer("gpt-j-6b-tokenizer")
    assert llama.encode("Hello world") == [1, 15043, 3186]
    assert llama.encode("Hello world", add_bos=False) == [15043, 3186]
    assert gptj.encode("Hello world") == [15496, 995]
    assert gptj.encode("Hello world", add_bos=True) == [50256, 15496, 995]
    with pytest.raises(TinyLLMError, match="no BOS"):
        tokenizer("gpt-neox-20b-tokenizer-mpt").encode("x", add_bos=True)


def test_parse_special_sentencepiece():
    tok = tokenizer("llama2-tokenizer")
    # each run of text after a special token gets its own dummy-prefix space, as Meta's code does
    assert tok.encode("<s>[INST] hi [/INST]", add_bos=False) == [1, 518, 25580, 29962, 7251, 518, 29914, 25580, 29962]
    assert tok.encode("a</s>b<unk>", add_bos=False) == [263, 2, 289, 0]
    plain = tok.encode("a</s>b", add_bos=False, parse_special=False)
    assert 2 not in plain and tok.decode(plain) == "a</s>b"


def test_parse_special_matches_transformers_on_a_llama2_chat(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")
    shutil.copy(shared("llama2-tokenizer", "tokenizer.model"), tmp_path)
    shutil.copy(shared("stories260K-hf", "tokenizer_config.json"), tmp_path)  # LlamaTokenizer, add_bos_token
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    tok = Tokenizer.from_spec(tokenizer_spec_from_hf_dir(tmp_path, {}))
    chat = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! </s><s>[INST] Why? [/INST]"
    for text in [chat, "a</s>b", "你好 😀 é", "\n\nx"]:
        assert tok.encode(text) == hf.encode(text)


def test_parse_special_tokenizer_json():
    falcon = tokenizer("falcon-7b-instruct-tokenizer")
    assert falcon.encode("Hi<|endoftext|>") == [*falcon.encode("Hi"), 11]
    assert 11 not in falcon.encode("Hi<|endoftext|>", parse_special=False)
    replit = tokenizer("replit-code-v1_5-3b-mpt-config")
    inst = replit.token_to_id("[INST]")
    assert inst is not None and inst in replit.encode("[INST] hi")
    assert inst not in replit.encode("[INST] hi", parse_special=False)
    # non-special added tokens (GPT-NeoX's runs of spaces) match whatever parse_special says
    neox = tokenizer("gpt-neox-20b-tokenizer-mpt")
    assert neox.encode("a  b", parse_special=False) == neox.encode("a  b") and 50276 in neox.encode("a  b")


def test_sentencepiece_added_tokens():
    spec = tokenizer_spec_from_hf_dir(shared("stories260K-hf"), {})
    spec["added_tokens"] = [
        {"id": 512, "content": "<|im_start|>", "special": True, "lstrip": False, "rstrip": False},
        {"id": 513, "content": "<|im_end|>", "special": True, "lstrip": False, "rstrip": True},
        {"id": 514, "content": "<tool>", "special": False, "lstrip": False, "rstrip": False},
    ]
    tok = Tokenizer.from_spec(spec)
    assert tok.vocab_size == 515
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>\n<tool>", add_bos=False)
    assert ids[0] == 512 and ids[-2:] == [513, 514]  # rstrip: the "\n" after <|im_end|> is swallowed
    assert tok.is_special(512) and not tok.is_special(514)
    assert tok.token_bytes(512) == b"" and tok.token_bytes(514) == b"<tool>"
    assert tok.token_text(513) == "<|im_end|>" and tok.token_to_id("<|im_end|>") == 513
    plain = tok.encode("<|im_start|>x<tool>", add_bos=False, parse_special=False)
    assert 512 not in plain and plain[-1] == 514
    assert tok.decode(ids) == "user\nHi<tool>"


# ---- token strings and bytes --------------------------------------------------------------------


def test_token_text_and_bytes():
    llama = tokenizer("llama2-tokenizer")
    assert (llama.token_text(1), llama.token_bytes(1), llama.is_special(1)) == ("<s>", b"", True)
    assert (llama.token_text(15043), llama.token_bytes(15043)) == ("\u2581Hello", b" Hello")
    assert (llama.token_text(231), llama.token_bytes(231)) == ("<0xE4>", b"\xe4")
    assert llama.is_special(0) and not llama.is_special(15043)
    gptj = tokenizer("gpt-j-6b-tokenizer")
    assert (gptj.token_text(18435), gptj.token_bytes(18435)) == ("\u0120Hello", b" Hello")
    assert gptj.token_text(50256) == "<|endoftext|>" and gptj.token_bytes(50256) == b""
    assert gptj.token_bytes(50300) == b"<|extratoken_44|>"  # non-special added token: its text
    assert tokenizer("gpt-neox-20b-tokenizer-mpt").token_bytes(50276) == b"  "


def test_sp_style_tokenizer_json_bytes(sp_style_json):
    tok = Tokenizer.from_spec(_json_spec(sp_style_json))
    assert tok.token_bytes(3 + 0xE4) == b"\xe4" and tok.token_bytes(410) == b" "
    assert tok.token_bytes(1) == b"" and tok.token_text(1) == "<s>"


# ---- decoding and streaming ---------------------------------------------------------------------


def _stream_all(tok: Tokenizer, ids, skip_leading_space=True) -> tuple[list[str], str]:
    stream = tok.stream(skip_leading_space=skip_leading_space)
    pieces = [stream.push(i) for i in ids]
    return pieces, "".join(pieces) + stream.flush()


@pytest.mark.parametrize("name", ALL_FOLDERS)
def test_round_trip_and_stream(name):
    tok = tokenizer(name)
    for text in UNICODE_TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        pieces, streamed = _stream_all(tok, ids)
        assert streamed == text
        assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("decoder", ["converted", "metaspace"])
def test_round_trip_and_stream_sp_style_json(sp_style_json, decoder):
    text = sp_style_json if decoder == "converted" else _with_decoder(sp_style_json, METASPACE)
    tok = Tokenizer.from_spec(_json_spec(text))
    for sample in UNICODE_TEXTS:
        ids = tok.encode(sample)
        assert tok.decode(ids) == sample
        pieces, streamed = _stream_all(tok, ids)
        assert streamed == sample and not any("\ufffd" in p for p in pieces)


def test_split_character_is_held_back():
    tok = tokenizer("llama2-tokenizer")
    text = "\u00e9\u946b\U0001F600"  # é 鑫 😀: the last two only exist as byte-fallback pieces
    ids = tok.encode(text, add_bos=False)
    assert [tok.token_text(i) for i in ids[-7:]] == ["<0xE9>", "<0x91>", "<0xAB>",
                                                     "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    pieces, streamed = _stream_all(tok, ids)
    assert pieces[-7:] == ["", "", "\u946b", "", "", "", "\U0001F600"]
    assert streamed == text
    stream = tok.stream()  # cut mid-character: the incomplete tail becomes U+FFFD at flush only,
    assert [stream.push(i) for i in ids[-4:-1]] == ["", "", ""]  # one per byte, as sentencepiece
    assert stream.flush() == "\ufffd" * 3 == tok.decode(ids[-4:-1])


@pytest.mark.parametrize("name", ALL_FOLDERS)
def test_prompt_then_continuation(name):
    """A prompt shown with decode(), then generated tokens streamed after it, reads as decode(all)."""
    tok = tokenizer(name)
    text = "Once upon a time there was a 🐉 named Ωmega."
    ids = tok.encode(text)
    assert tok.decode(ids) == text and _stream_all(tok, ids, skip_leading_space=True)[1] == text
    first_visible = 2 if tok.add_bos else 1  # the prompt shows some text, so later spaces are real
    cuts = [c for c in range(first_visible, len(ids)) if "\ufffd" not in tok.decode(ids[:c])]  # not mid-character
    assert len(cuts) > 8
    for cut in cuts:
        _, generated = _stream_all(tok, ids[cut:], skip_leading_space=False)
        assert tok.decode(ids[:cut]) + generated == text, cut


def test_sentencepiece_normalizer_flags():
    # Meta's Llama-2 model keeps whitespace; llama2.c's stories260K model collapses it (SOURCE.txt)
    assert sentencepiece_normalizer_flags(shared("llama2-tokenizer", "tokenizer.model").read_bytes()) == \
        {"add_dummy_prefix": True, "remove_extra_whitespaces": False, "denormalizer": False}
    assert sentencepiece_normalizer_flags(shared("stories260K-hf", "tokenizer.model").read_bytes()) == \
        {"add_dummy_prefix": True, "remove_extra_whitespaces": True, "denormalizer": False}


def test_leading_space_rules():
    llama = tokenizer("llama2-tokenizer")
    assert llama.decode([1, 15043]) == "Hello"  # BOS is invisible, the first piece loses its space
    assert llama.decode([1, 15043], skip_special=False) == "<s> Hello"  # as HF
    assert llama.decode([29871, 15043]) == " Hello" and llama.decode([13, 15043]) == "\n Hello"
    assert _stream_all(llama, [15043], skip_leading_space=False)[1] == " Hello"
    gptj = tokenizer("gpt-j-6b-tokenizer")  # byte-level BPE keeps every space
    assert gptj.decode([18435]) == " Hello" and _stream_all(gptj, [18435])[1] == " Hello"


def _random_ids(rng: random.Random, vocab: int, favourites: list[int], exclude=()) -> list[int]:
    ids = [rng.choice([rng.randrange(vocab), rng.choice(favourites)]) for _ in range(rng.randrange(9))]
    return [i for i in ids if i not in exclude]


@pytest.mark.parametrize("name", ["llama2-tokenizer", "stories260K-hf"])
def test_decode_matches_sentencepiece_on_random_ids(name):
    import sentencepiece

    ref = sentencepiece.SentencePieceProcessor(model_file=str(shared(name, "tokenizer.model")))
    tok, rng = tokenizer(name), random.Random(0)
    byte_ids = list(range(3, 259))  # invalid UTF-8 runs too: sentencepiece gives one U+FFFD per byte
    for _ in range(1500):
        space = tok.token_to_id("\u2581")  # a lone "▁" piece exercises the leading-space rule
        ids = _random_ids(rng, tok.vocab_size, [1, 2, space, space, 259, *rng.sample(byte_ids, 3)], exclude={0})
        assert tok.decode(ids) == ref.decode(ids), ids
        assert _stream_all(tok, ids)[1] == tok.decode(ids)


@pytest.mark.parametrize("name", ["gpt-j-6b-tokenizer", "gpt-neox-20b-tokenizer-mpt", "falcon-7b-instruct-tokenizer"])
def test_decode_matches_tokenizers_on_random_ids(name):
    import tokenizers

    ref = tokenizers.Tokenizer.from_file(str(shared(name, "tokenizer.json")))
    tok, rng = tokenizer(name), random.Random(0)
    for _ in range(1500):
        ids = _random_ids(rng, tok.vocab_size, [*tok.eos_ids, 50276 % tok.vocab_size, 0, 1, 11])
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), ids
        assert tok.decode(ids, skip_special=False) == ref.decode(ids, skip_special_tokens=False), ids
        assert _stream_all(tok, ids)[1] == tok.decode(ids)


@pytest.mark.parametrize("decoder", ["converted", "metaspace"])
def test_sp_style_json_decode_matches_tokenizers(sp_style_json, decoder):
    import tokenizers

    text = sp_style_json if decoder == "converted" else _with_decoder(sp_style_json, METASPACE)
    tok, ref, rng = Tokenizer.from_spec(_json_spec(text)), tokenizers.Tokenizer.from_str(text), random.Random(0)
    # valid text only: on invalid byte runs HF's ByteFallback differs from sentencepiece (documented);
    # a bare Metaspace decoder leaves <0xNN> pieces as text, so no byte pieces there
    pieces = list(range(259, 512))
    for _ in range(1500):
        ids = [rng.choice([*pieces, 410, 1, 2, 1]) for _ in range(rng.randrange(9))]
        if decoder == "converted" and rng.random() < 0.5:
            ids += tok.encode(rng.choice(UNICODE_TEXTS), add_bos=False)
        for skip in (True, False):
            assert tok.decode(ids, skip_special=skip) == ref.decode(ids, skip_special_tokens=skip), ids
        assert _stream_all(tok, ids)[1] == tok.decode(ids)


def test_numpy_ids_accepted():
    np = pytest.importorskip("numpy")
    tok = tokenizer("llama2-tokenizer")
    ids = np.array(tok.encode("Hello world"), dtype=np.int64)
    assert tok.decode(ids) == "Hello world" and tok.stream().push(ids[1]) == " Hello"


# ---- specs from Hugging Face folders ------------------------------------------------------------


def _ids(value) -> list[int]:
    return [] if value is None else value if isinstance(value, list) else [value]


@pytest.mark.parametrize("name", HF_FOLDERS)
def test_spec_from_hf_dir_matches_transformers(name):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")
    folder = shared(name)
    config = _folder_config(folder)
    generation = json.loads((folder / "generation_config.json").read_text() or "{}") \
        if (folder / "generation_config.json").is_file() else {}
    # a blank config: Replit's MPT config (grouped_query_attention) fails transformers' own validation
    hf = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                                    config=transformers.PretrainedConfig())
    spec = tokenizer_spec_from_hf_dir(folder, config)
    tok = Tokenizer.from_spec(json.loads(json.dumps(spec)))
    assert tok.spec == spec
    expected_bos = hf.bos_token_id if hf.bos_token_id is not None else config.get("bos_token_id")
    assert tok.bos_id == expected_bos
    assert tok.eos_ids[0] == hf.eos_token_id
    want = {hf.eos_token_id, *_ids(config.get("eos_token_id")), *_ids(generation.get("eos_token_id"))}
    assert set(tok.eos_ids) == want
    hf_ids = hf.encode("Hello world")
    assert tok.add_bos == (hf.bos_token_id is not None and hf_ids[0] == hf.bos_token_id)
    assert tok.encode("Hello world") == hf_ids
    assert tok.vocab_size == len(hf)


def test_spec_from_hf_dir_merges_eos_and_reads_pad(tmp_path):
    shutil.copy(shared("stories260K-hf", "tokenizer.model"), tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": False, "eos_token": {"content": "</s>", "special": True}, "pad_token": "<unk>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    spec = tokenizer_spec_from_hf_dir(tmp_path, {"eos_token_id": [9, 2]})
    assert (spec["bos_id"], spec["eos_ids"], spec["pad_id"], spec["add_bos"]) == (1, [2, 9, 7], 0, False)


def test_spec_from_hf_dir_added_tokens_json(tmp_path):
    shutil.copy(shared("stories260K-hf", "tokenizer.model"), tmp_path)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|im_start|>": 512, "<|im_end|>": 513}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tok = Tokenizer.from_spec(tokenizer_spec_from_hf_dir(tmp_path, {"eos_token_id": 2}))
    assert tok.vocab_size == 514 and tok.eos_ids == [513, 2]
    assert tok.encode("<|im_start|>Hi<|im_end|>", add_bos=False) == [512, *tok.encode("Hi", add_bos=False), 513]
    assert tok.is_special(513) and not tok.is_special(512)  # only named specials are special in added_tokens.json


def test_chat_template_from_hf_dir(tmp_path):
    assert chat_template_from_hf_dir(shared("stories260K-hf")) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert chat_template_from_hf_dir(tmp_path) == "{{ messages }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert chat_template_from_hf_dir(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")  # the separate file wins, as in transformers
    assert chat_template_from_hf_dir(tmp_path) == "J"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "rag", "template": "R"}]}))
    with pytest.raises(TinyLLMError, match="none named 'default'"):
        chat_template_from_hf_dir(tmp_path)


# ---- bad input ----------------------------------------------------------------------------------


def test_missing_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TinyLLMError) as err:
        tokenizer_spec_from_hf_dir(tmp_path, {})
    message = str(err.value)
    assert str(tmp_path) in message and "tokenizer.model" in message and "tokenizer.json" in message


def test_named_token_missing_from_vocabulary(tmp_path):
    shutil.copy(shared("stories260K-hf", "tokenizer.model"), tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(TinyLLMError, match="pad_token '<pad>'.*not in the tokenizer's vocabulary"):
        tokenizer_spec_from_hf_dir(tmp_path, {})


def test_config_eos_outside_vocabulary(tmp_path):
    shutil.copy(shared("stories260K-hf", "tokenizer.model"), tmp_path)
    with pytest.raises(TinyLLMError, match="eos_ids: 600"):
        tokenizer_spec_from_hf_dir(tmp_path, {"eos_token_id": 600})
    with pytest.raises(TinyLLMError, match="expected a token id"):
        tokenizer_spec_from_hf_dir(tmp_path, {"eos_token_id": "</s>"})


def test_bad_specs():
    good = tokenizer_spec_from_hf_dir(shared("stories260K-hf"), {})
    cases = [
        ("not a dict", FormatError, "must be a dict"),
        ({**good, "kind": "wordpiece"}, UnsupportedError, "kind 'wordpiece'"),
        ({k: v for k, v in good.items() if k != "eos_ids"}, FormatError, r"missing key\(s\) \['eos_ids'\]"),
        ({**good, "model": "not base64!"}, FormatError, "not valid base64"),
        ({**good, "model": base64.b64encode(b"\x01garbage").decode()}, FormatError, "not a SentencePiece model"),
        ({**good, "model": ""}, FormatError, "holds no pieces"),
        ({**good, "eos_ids": [512]}, FormatError, "eos_ids: 512 is not a token id of this 512-token vocabulary"),
        ({**good, "eos_ids": 2}, FormatError, "eos_ids must be a list"),
        ({**good, "bos_id": None}, FormatError, "add_bos=true but no bos_id"),
        ({**good, "add_bos": "yes"}, FormatError, "add_bos must be true or false"),
        ({**good, "added_tokens": [{"content": "<x>"}]}, FormatError, "bad added token"),
        (_json_spec("{not json"), FormatError, "not a valid tokenizer.json"),
    ]
    for spec, error, message in cases:
        with pytest.raises(error, match=message):
            Tokenizer.from_spec(spec)


def test_unsupported_tokenizer_json_decoder():
    text = shared("gpt-j-6b-tokenizer", "tokenizer.json").read_text(encoding="utf-8")
    for decoder, message in [({"type": "WordPiece", "prefix": "##", "cleanup": True}, r"decoder \['WordPiece'\]"),
                             (None, "without a decoder"),
                             ({"type": "Sequence",
                               "decoders": [{"type": "Strip", "content": " ", "start": 2, "stop": 0}]}, "only Strip")]:
        with pytest.raises(UnsupportedError, match=message):
            Tokenizer.from_spec(_json_spec(_with_decoder(text, decoder), bos_id=None, eos_ids=[], add_bos=False))


def test_bad_token_ids():
    tok = tokenizer("stories260K-hf")
    for bad in (512, -1):
        with pytest.raises(TinyLLMError, match="outside the vocabulary"):
            tok.decode([5, bad])
        with pytest.raises(TinyLLMError, match="outside the vocabulary"):
            tok.stream().push(bad)
    with pytest.raises(TinyLLMError, match="must be an integer"):
        tok.token_bytes("5")
    with pytest.raises(TinyLLMError, match="needs a str"):
        tok.encode(b"bytes")
