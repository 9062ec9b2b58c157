"""The spellings people bring from llama.cpp: -m, -f, -c, --temp, --n-predict, chat -p; GPU
layer flags refused with a reason; --quant in llama-quantize's upper case (test_kquant); and
values the CLI clamps are said, not silently changed."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import tinyllm
from tinyllm.cli import main

BUNDLED = Path(tinyllm.__file__).parent / "data" / "stories260K.q4"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_generate_with_llama_cpp_spellings_equals_tinyllm_s(tmp_path):
    ours = run("generate", BUNDLED, "-p", "Once upon", "--max-tokens", 12, "--temperature", 0, "--ctx", 64,
               "--backend", "numpy")
    theirs = run("generate", "-m", BUNDLED, "-p", "Once upon", "--n-predict", 12, "--temp", 0, "-c", 64,
                 "--backend", "numpy")
    assert ours.exit_code == 0 and theirs.exit_code == 0, theirs.output
    assert ours.output == theirs.output and ours.output.startswith("Once upon")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon", encoding="utf-8")
    from_file = run("generate", BUNDLED, "-f", prompt, "-n", 12, "--temp", 0, "-c", 64, "--backend", "numpy")
    assert from_file.exit_code == 0 and from_file.output == ours.output


@pytest.mark.parametrize("args, message", [
    (["-m", "elsewhere.q4", "-p", "x"], "two models given"),
    (["-p", "x", "-f", "prompt.txt"], "-p or with -f, not both"),
    (["-ngl", "99", "-p", "x"], "does not split layers"),
    (["--n-gpu-layers", "99"], "does not split layers"),
])
def test_flags_that_cannot_work_are_refused_in_one_line(args, message, tmp_path):
    (tmp_path / "prompt.txt").write_text("hi")
    with CliRunner().isolated_filesystem(temp_dir=tmp_path):
        Path("prompt.txt").write_text("hi")
        r = CliRunner().invoke(main, ["generate", str(BUNDLED), *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_chat_one_shot_prints_the_answer_and_exits():
    r = run("chat", BUNDLED, "-p", "Once upon a time", "-n", 8, "--temp", 0, "--template", "plain",
            "--backend", "numpy")
    assert r.exit_code == 0, r.output
    assert r.output.strip() and ">" not in r.output  # no REPL prompt
    empty = run("chat", BUNDLED, "-p", "  ")
    assert empty.exit_code == 2 and "empty" in empty.output


def test_clamping_is_said_not_silent():
    """A --ctx past the model's context, a bench size past it: the run goes on, and says what it did."""
    r = run("generate", BUNDLED, "-p", "Once", "-n", 3, "--temp", 0, "--ctx", 100000, "--backend", "numpy")
    assert r.exit_code == 0 and "--ctx 100000 is more than" in r.output and "using 512" in r.output
    b = run("bench", BUNDLED, "-p", 600, "-p", 8, "-n", 600, "-r", 1, "--probe-mb", 0, "--backend", "numpy")
    assert b.exit_code == 0, b.output
    assert "prefill of 600 tokens skipped" in b.output and "decode timed for 510 steps, not 600" in b.output
    assert any(line.startswith("prefill") and " 8 tokens" in line for line in b.output.splitlines())
    short = run("generate", BUNDLED, "-p", "Once upon a", "-n", 10, "--temp", 0, "--ctx", 8, "--backend", "numpy")
    assert short.exit_code == 0 and "stopped after 4 of 10 tokens: the context (8 tokens) is full" in short.output


def test_slow_kernel_compilation_is_announced_and_runs_before_the_first_answer(monkeypatch):
    import time

    from tinyllm.cli import options

    calls = []

    class SlowModel:
        compiles = True

        def warm_up(self):
            time.sleep(0.3)
            calls.append("warm")

    said = []
    monkeypatch.setattr(options, "COMPILE_NOTICE_AFTER", 0.05)
    monkeypatch.setattr(options, "_interactive", lambda: True)
    monkeypatch.setattr(options, "say", said.append)
    options.warm_up(SlowModel())
    assert calls == ["warm"] and len(said) == 1 and "compiling the Numba kernels" in said[0]
    thread = options.warm_up(SlowModel(), background=True)
    assert thread.is_alive()  # the REPL waits for its first message meanwhile
    thread.join()
    assert calls == ["warm", "warm"] and not thread.errors

    class FastModel(SlowModel):
        def warm_up(self):
            calls.append("fast")

    said.clear()
    options.warm_up(FastModel())
    time.sleep(0.1)
    assert said == []  # cached kernels load quickly: nothing to say
    monkeypatch.setattr(options, "_interactive", lambda: False)
    options.warm_up(SlowModel())
    assert said == []  # not a terminal: quiet


def test_warm_up_leaves_the_cache_empty():
    import tinyllm

    m = tinyllm.load(BUNDLED, n_ctx=2)
    m.warm_up()
    assert m.tokens == [] and m.compiles


def test_interactive_flag_spellings(tmp_path):
    r = run("generate", BUNDLED, "-i", "-p", "x")
    assert r.exit_code == 2 and "tinyllm chat" in r.output
    r = run("chat", BUNDLED, "-i", "-p", "x")
    assert r.exit_code == 2 and "give one of them" in r.output
    r = CliRunner().invoke(main, ["chat", str(BUNDLED), "-i", "--backend", "numpy"], input="Once upon\n")
    assert r.exit_code == 0, r.output


def test_messages_say_what_they_mean(tmp_path):
    from tinyllm.cli.options import plural

    assert (plural(1, "chunk"), plural(2, "chunk")) == ("1 chunk", "2 chunks")
    assert "default: 512" in run("perplexity", "--help").output  # the window it really uses
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }", encoding="utf-8")
    r = CliRunner().invoke(main, ["chat", str(BUNDLED), "--template", str(broken)], input="hello\n")
    assert r.exit_code == 1 and "not a valid Jinja template" in r.output and "hello" not in r.output
    info = run("info", BUNDLED).output
    assert "tokenizer" in info and "SentencePiece" in info and "1 tensors" not in info


def test_checks_before_echo_and_hints_for_directories(stories_hf):
    r = run("generate", BUNDLED, "-p", "x" * 3000, "-n", 2)
    assert r.exit_code == 1 and "does not fit the context" in r.output and "xxx" not in r.output
    r = run("info", stories_hf)
    assert r.exit_code == 1 and "convert it first with `tinyllm convert DIR -o model.q4`" in r.output
