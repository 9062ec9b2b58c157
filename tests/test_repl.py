"""`tinyllm chat` driven as a person drives it: in a pseudo-terminal, typing, pressing
Ctrl-C in the middle of an answer and Ctrl-D to leave."""
from __future__ import annotations

import io
import json
import os
import sys

import pytest

from tinyllm.converters.convert import convert_hf

pexpect = pytest.importorskip("pexpect")

PROMPT = "\r\n> "


@pytest.fixture(scope="module")
def stories_path(stories_hf, tmp_path_factory):
    return convert_hf(stories_hf, tmp_path_factory.mktemp("repl") / "stories.q4", quant="f32")


def _spawn(*args):
    env = dict(os.environ, TERM="dumb")  # no readline escape sequences
    return pexpect.spawn(sys.executable, ["-c", "from tinyllm.cli import main; main()", "chat", *args],
                         env=env, encoding="utf-8", timeout=60, dimensions=(40, 250))


def test_two_turns_ctrl_c_reset_ctrl_d(stories_path, tmp_path):
    # plain template: the bundled story model continues the user's text; 400 tokens take long
    # enough (~1 s with the NumPy backend) that Ctrl-C lands in the middle of the answer
    child = _spawn(str(stories_path), "--backend", "numpy", "--template", "plain", "--temperature", "0",
                   "-n", "400", "--system", "A story.", "--verbose")
    child.logfile_read = transcript = io.StringIO()
    try:
        child.expect("template plain")
        child.expect_exact("> ")
        child.sendline("Once upon a time")
        child.expect_exact("there was a little girl")  # the answer is arriving...
        child.sendintr()                                # ...and still being generated: stop it
        child.expect_exact("[stopped]")
        child.expect_exact("> ")

        child.sendline("Lily went to the park")         # turn two, answered in full
        child.expect(r"prompt: (\d+) tokens \((\d+) cached")
        cached = int(child.match.group(2))
        child.expect_exact("> ")

        saved = tmp_path / "chat.json"
        child.sendline(f"/save {saved}")
        child.expect_exact("saved to")
        child.expect_exact("> ")
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.expect_exact("> ")
        child.sendline(f"/save {tmp_path / 'after-reset.json'}")
        child.expect_exact("> ")
        child.sendeof()                                 # Ctrl-D
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0

    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "A story." and messages[1]["content"] == "Once upon a time"
    interrupted = messages[2]["content"]
    assert interrupted.startswith(", there was a little girl")
    assert interrupted in transcript.getvalue().replace("\r\n", "\n")
    assert len(interrupted) < 1000  # cut short: 400 tokens of story are longer
    assert messages[3]["content"] == "Lily went to the park" and messages[4]["content"]
    # turn two reused the cache: system prompt, turn one and the interrupted answer
    assert cached >= len("A story. Once upon a time".split()) + 3
    after = json.loads((tmp_path / "after-reset.json").read_text())["messages"]
    assert after == [{"role": "system", "content": "A story."}]


def test_commands_and_bad_input(stories_path, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    child = _spawn(str(stories_path), "--backend", "numpy", "--template", "chatml", "-n", "8")
    try:
        child.expect_exact("> ")
        child.sendline(f"/load {bad}")
        child.expect_exact("is not a JSON conversation")
        child.expect_exact("> ")
        child.sendline("/system Be brief.")
        child.expect_exact("(system prompt set)")
        child.expect_exact("> ")
        child.sendline("/frobnicate")
        child.expect_exact("unknown command /frobnicate")
        child.expect_exact("> ")
        child.sendintr()                                # Ctrl-C at the prompt: a fresh prompt
        child.expect_exact("> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_unknown_template_is_a_clear_error(stories_path):
    child = _spawn(str(stories_path), "--backend", "numpy", "--template", "nonsense")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and "unknown chat template 'nonsense'" in child.before
