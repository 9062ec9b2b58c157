"""Chat templates against transformers' apply_chat_template, and the multi-turn session:
end-of-turn tokens, KV-cache reuse, context overflow, interruption, save/load."""
from __future__ import annotations

import json
import warnings

import pytest

import tinyllm
from tinyllm.chat import ChatSession, ContextWarning, turn_stops
from tinyllm.converters.convert import convert_hf
from tinyllm.errors import TinyLLMError
from tinyllm.templates import BUILTIN, render_template, resolve_template
from tinyllm.tokenizer import Tokenizer

from .conftest import shared

SYSTEM = {"role": "system", "content": "You are a careful assistant."}
TURNS = [{"role": "user", "content": "Hi there! "}, {"role": "assistant", "content": " Hello, how can I help?"},
         {"role": "user", "content": "Tell me a story\nabout a cat."}]
CONVERSATIONS = {"one-turn": TURNS[:1], "system+one-turn": [SYSTEM, *TURNS[:1]],
                 "multi-turn": TURNS, "system+multi-turn": [SYSTEM, *TURNS]}


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(shared("stories260K-hf"))


@pytest.fixture(scope="module")
def stories_path(stories_hf, tmp_path_factory):
    return convert_hf(stories_hf, tmp_path_factory.mktemp("chat") / "stories.q4", quant="f32")


@pytest.fixture
def model(stories_path):
    return tinyllm.load(stories_path, backend="numpy")


def _hf_render(hf_tokenizer, template, messages, add_generation_prompt):
    hf_tokenizer.chat_template = template
    return hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


# -- templates ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILTIN))
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_builtin_templates_render_as_transformers(hf_tokenizer, name, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    try:
        expected = _hf_render(hf_tokenizer, BUILTIN[name].source, messages, add_generation_prompt)
    except Exception as e:  # the template refuses this conversation (gemma: no system role): so must we
        with pytest.raises(TinyLLMError, match="chat template error"):
            BUILTIN[name].render(messages, add_generation_prompt=add_generation_prompt,
                                 bos_token="<s>", eos_token="</s>")
        assert "not supported" in str(e) or "alternate" in str(e)
        return
    ours = BUILTIN[name].render(messages, add_generation_prompt=add_generation_prompt,
                                bos_token="<s>", eos_token="</s>")
    assert ours == expected


@pytest.mark.parametrize("name", ["llama-3", "mistral", "zephyr", "vicuna", "gemma", "phi-3"])
def test_builtin_templates_tokenize_as_transformers(hf_tokenizer, model, name):
    """Token for token: the conversation rendered and tokenized by transformers
    (apply_chat_template(tokenize=True)) and by tinyllm, with the same SentencePiece vocabulary.
    The turns carry no edge spaces: this stories260K tokenizer.model folds runs of spaces
    (remove_extra_whitespaces), which sentencepiece honours and transformers' fast tokenizer
    does not; the rendering test above covers the spaces."""
    hf_tokenizer.chat_template = BUILTIN[name].source
    turns = [{"role": t["role"], "content": t["content"].strip()} for t in TURNS]
    messages = turns if name == "gemma" else [SYSTEM, *turns]
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                return_dict=False)
    text = BUILTIN[name].render(messages, bos_token="<s>", eos_token="</s>")
    assert model.tokenizer.encode(text, add_bos=False) == list(expected)


def test_builtin_templates_write_the_documented_formats():
    # the formats as their model cards write them, independent of the Jinja sources
    messages = [SYSTEM, *TURNS]
    assert BUILTIN["chatml"].render(messages) == (
        "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\nHi there! <|im_end|>\n"
        "<|im_start|>assistant\n Hello, how can I help?<|im_end|>\n"
        "<|im_start|>user\nTell me a story\nabout a cat.<|im_end|>\n<|im_start|>assistant\n")
    assert BUILTIN["llama-2"].render(messages, bos_token="<s>", eos_token="</s>") == (
        "<s>[INST] <<SYS>>\nYou are a careful assistant.\n<</SYS>>\n\nHi there! [/INST] Hello, how can I help? </s>"
        "<s>[INST] Tell me a story\nabout a cat. [/INST]")
    assert BUILTIN["alpaca"].render(TURNS[:1]) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nHi there! \n\n### Response:\n")
    assert BUILTIN["plain"].render([SYSTEM, *TURNS]) == (
        "You are a careful assistant.\n\nHi there!  Hello, how can I help?\nTell me a story\nabout a cat.")


def _gguf_chat_template():
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(shared("smollm2-135m-instruct-q4_1-gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    field = reader.fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_real_model_template_renders_as_transformers(hf_tokenizer, conversation):
    template = _gguf_chat_template()  # SmolLM2-135M-Instruct's own (ChatML with a default system prompt)
    messages = CONVERSATIONS[conversation]
    ours = resolve_template(None, template).render(messages, bos_token="<|im_start|>", eos_token="<|im_end|>")
    assert ours == _hf_render(hf_tokenizer, template, messages, True)
    assert ours.endswith("<|im_start|>assistant\n")


def test_llama2_prompt_ids_match_transformers(hf_tokenizer, model):
    # one turn: with an answer, the template writes " </s>", and the SentencePiece run before
    # a special token loses its trailing space here (as in sentencepiece) but not in HF
    messages = [SYSTEM, {"role": "user", "content": "Tell me a story\nabout a cat."}]
    session = model.chat_session(template="llama-2")
    session.load_messages(messages)
    hf_tokenizer.chat_template = BUILTIN["llama-2"].source
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert session.prompt_ids() == list(expected)
    assert session.prompt_ids().count(model.tokenizer.bos_id) == 1  # the template's own BOS, not added twice


def test_bos_added_when_the_template_has_none(model):
    session = model.chat_session(template="chatml")
    session.messages = TURNS[:1]
    ids = session.prompt_ids()
    assert ids[0] == model.tokenizer.bos_id and ids[1] != model.tokenizer.bos_id


def test_templates_run_sandboxed_and_errors_are_clear():
    with pytest.raises(tinyllm.TinyLLMError, match="SecurityError"):
        render_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])
    with pytest.raises(tinyllm.TinyLLMError, match="roles must alternate"):
        BUILTIN["llama-2"].render([TURNS[0], TURNS[0]], bos_token="<s>", eos_token="</s>")
    with pytest.raises(tinyllm.TinyLLMError, match="TemplateSyntaxError"):
        render_template("{% for m in messages %}", [])
    with pytest.raises(tinyllm.TinyLLMError, match="message 0"):
        render_template(BUILTIN["chatml"].source, [{"role": "user"}])


def test_template_choice(tmp_path):
    assert resolve_template(None, None).name == "plain"
    assert resolve_template(None, "{{ x }}").name == "model"
    assert resolve_template("chatml", "{{ x }}").name == "chatml"
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ m.content }}<|eot_id|>{% endfor %}")
    t = resolve_template(str(f), None)
    assert t.render(TURNS[:1]) == "Hi there! <|eot_id|>" and t.markers == ("<|eot_id|>",)
    with pytest.raises(tinyllm.TinyLLMError, match="unknown chat template 'orca'.*chatml"):
        resolve_template("orca", None)
    assert resolve_template("vicuna", None).name == "vicuna"  # a built-in now


# -- stopping at the end of a turn -------------------------------------------------------


def _with_special_token(model, token_id: int, text: str) -> None:
    """Give the model's tokenizer an extra special token (an override of an existing id)."""
    spec = dict(model.tokenizer.spec, added_tokens=[{"id": token_id, "content": text, "special": True}])
    model.tokenizer = Tokenizer.from_spec(spec)


def test_end_of_turn_markers_become_stop_tokens_or_strings(model):
    chatml = resolve_template("chatml", None)
    ids, strings = turn_stops(model.tokenizer, chatml)  # stories260K has no <|im_end|> token
    assert ids == model.tokenizer.eos_ids and "<|im_end|>" in strings
    _with_special_token(model, 500, "<|im_end|>")
    ids, _ = turn_stops(model.tokenizer, chatml)
    assert ids == [*model.tokenizer.eos_ids, 500]


def test_chat_stops_at_the_end_of_turn_token(model, tmp_path):
    # A template whose end-of-turn token is not the tokenizer's eos, and only follows answers,
    # so the first prompt is the same whether or not the vocabulary has that token.
    template = tmp_path / "eot.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% if m.role == 'assistant' %}<|eot_id|>{% endif %}"
                        "{% endfor %}")
    session = model.chat_session(template=str(template), temperature=0, max_new_tokens=12)
    session.send("Once upon a time", stream=False)
    answer_ids = model.tokens[session.stats.prompt_tokens:]  # the cache: prompt + answer but its last token
    k = next(k for k in range(2, len(answer_ids)) if answer_ids[k] not in answer_ids[:k])
    model.reset()
    _with_special_token(model, answer_ids[k], "<|eot_id|>")  # now this model ends its turns with that token
    session = model.chat_session(template=str(template), temperature=0, max_new_tokens=12)
    assert answer_ids[k] in session.stop_ids and answer_ids[k] not in model.tokenizer.eos_ids
    answer = session.send("Once upon a time", stream=False)
    assert session.stats.finish_reason == "eos" and session.stats.new_tokens == k
    assert answer == model.tokenizer.decode(answer_ids[:k])


# -- conversation state --------------------------------------------------------------------


def _record_forward(model, monkeypatch):
    calls = []
    real = model._run

    def spy(tokens, batch, last_only):
        calls.append((batch.segments[0].start, len(tokens)))
        return real(tokens, batch, last_only)

    monkeypatch.setattr(model, "_run", spy)
    return calls


def test_second_turn_computes_only_the_new_tokens(model, monkeypatch):
    session = model.chat_session(template="chatml", system="Tell stories.", temperature=0, max_new_tokens=20)
    session.send("Once upon a time", stream=False)
    first = session.stats
    calls = _record_forward(model, monkeypatch)
    session.send("What happened next?", stream=False)
    # the cache held turn 1's prompt and answer (all but the answer's last token, never evaluated)
    assert session.stats.cached_tokens == first.prompt_tokens + first.new_tokens - 1
    start_pos, n = calls[0]  # the prefill of turn 2 starts there
    assert start_pos == session.stats.cached_tokens and start_pos + n == session.stats.prompt_tokens


def test_context_overflow_drops_oldest_turns_and_keeps_system(stories_path):
    model = tinyllm.load(stories_path, backend="numpy", n_ctx=128)
    notices = []
    session = model.chat_session(template="chatml", system="Tell stories.", temperature=0, max_new_tokens=24,
                                 on_notice=notices.append)
    questions = ["Once upon a time", "What did Lily do?", "And then?", "Who was there?", "How did it end?"]
    for q in questions:
        session.send(q, stream=False)
        assert len(session.prompt_ids()) <= model.n_ctx and len(model.tokens) <= model.n_ctx
    assert any("dropped" in n and "kept the system prompt" in n for n in notices)
    history = session.history()
    assert history[0] == {"role": "system", "content": "Tell stories."}
    assert history[1]["role"] == "user" and history[1]["content"] != questions[0]
    assert history[-2] == {"role": "user", "content": questions[-1]}


def test_overflow_warns_by_default(stories_path):
    model = tinyllm.load(stories_path, backend="numpy", n_ctx=64)
    session = model.chat_session(template="plain", temperature=0, max_new_tokens=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            session.send("Once upon a time there was a girl", stream=False)
    assert any(issubclass(w.category, ContextWarning) for w in caught)


def test_answer_cut_by_the_context_says_so(stories_path):
    model = tinyllm.load(stories_path, backend="numpy", n_ctx=64)
    notices = []
    session = model.chat_session(template="plain", temperature=0, max_new_tokens=200, on_notice=notices.append)
    session.send("Once upon a time", stream=False)
    assert session.stats.finish_reason == "context" and len(model.tokens) <= 64
    assert any("cut off" in n for n in notices)


def test_message_longer_than_the_context_is_refused(stories_path):
    model = tinyllm.load(stories_path, backend="numpy", n_ctx=32)
    session = model.chat_session(template="chatml", system="Be brief.")
    with pytest.raises(tinyllm.TinyLLMError, match="does not fit the context.*32"):
        session.send("Once upon a time " * 20, stream=False)
    assert session.messages == []  # nothing half-added


def test_stopping_early_keeps_what_was_shown(model):
    session = model.chat_session(template="chatml", temperature=0, max_new_tokens=50)
    pieces = session.send("Once upon a time")
    shown = "".join(next(pieces) for _ in range(3))
    pieces.close()  # the consumer stops (Ctrl-C in the REPL)
    assert session.messages[-1] == {"role": "assistant", "content": shown}
    assert session.send("Go on", stream=False)  # the conversation goes on
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]


def test_seeded_chat_is_reproducible(stories_path):
    answers = []
    for _ in range(2):
        m = tinyllm.load(stories_path, backend="numpy")
        s = m.chat_session(template="plain", temperature=1.0, seed=7, max_new_tokens=20)
        answers.append([s.send("Once upon a time", stream=False), s.send("The end.", stream=False)])
    assert answers[0] == answers[1]


def test_save_and_load(model, tmp_path):
    session = model.chat_session(template="chatml", system="Tell stories.", temperature=0, max_new_tokens=8)
    session.send("Once upon a time", stream=False)
    path = tmp_path / "chat.json"
    session.save(path)
    saved = json.loads(path.read_text())["messages"]
    assert saved[0] == {"role": "system", "content": "Tell stories."} and len(saved) == 3
    other = model.chat_session(template="chatml")
    other.load(path)
    assert other.history() == session.history() and other.render() == session.render()


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a JSON conversation"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "message 0 must be"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}', "only come first"),
    ('{"messages": "hi"}', "list of messages"),
])
def test_load_rejects_bad_conversations(model, tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    session = model.chat_session()
    with pytest.raises(tinyllm.TinyLLMError, match=message):
        session.load(path)
    with pytest.raises(tinyllm.TinyLLMError, match="cannot read"):
        session.load(tmp_path / "missing.json")


def test_model_chat_api(model):
    messages = [{"role": "system", "content": "Tell stories."}, {"role": "user", "content": "Once upon a time"}]
    answer = model.chat(messages, template="chatml", temperature=0, max_new_tokens=16)
    session = ChatSession(model, system="Tell stories.", template="chatml", temperature=0, max_new_tokens=16)
    assert answer == session.send("Once upon a time", stream=False) and answer
    streamed = list(model.chat(messages, template="chatml", temperature=0, max_new_tokens=16, stream=True))
    assert len(streamed) > 1 and "".join(streamed) == answer
    with pytest.raises(tinyllm.TinyLLMError, match="last message must be the user's"):
        model.chat([*messages, {"role": "assistant", "content": "x"}])
    with pytest.raises(tinyllm.TinyLLMError, match="non-empty"):
        model.chat([{"role": "user", "content": "  "}])


# -- a real chat-tuned model ---------------------------------------------------------------

# ../shared/models/smollm2-135m-instruct-q4_1-gguf/SOURCE.txt: the verified ChatML prompt for one
# user turn (the template adds SmolLM's default system prompt) and its greedy answer.
SMOLLM_PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
                 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


@pytest.fixture(scope="module")
def smollm():
    return tinyllm.load(shared("smollm2-135m-instruct-q4_1-gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                        backend="numpy", n_ctx=256)


def test_real_chat_model_prompt(smollm):
    session = smollm.chat_session(temperature=0)
    assert session.template.name == "model" and 2 in session.stop_ids  # <|im_end|> ends the turn
    session.messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert session.prompt_ids() == SMOLLM_PROMPT


@pytest.mark.slow
def test_real_chat_model_answers_and_ends_its_turn(smollm):
    answer = smollm.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0,
                         max_new_tokens=16)
    assert answer == "The capital of France is Paris."
