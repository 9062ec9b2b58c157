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
