"""The README's examples, run as written: its Python blocks and its curl command, against a
real `tinyllm serve` (the only change: the port, 8080 in the README, is a free one here) and
with the files the Python API block names (the SmolLM2 GGUF from ../shared, a text to score)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tinyllm
from tinyllm.server import create_app

from .conftest import shared
from .server_helpers import convert_stories, serving

README = Path(__file__).resolve().parent.parent / "README.md"
README_URL = "http://127.0.0.1:8080"


def section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def python_blocks(title: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", section(title), flags=re.S)


def run_python(code: str, cwd: Path) -> str:
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"README example failed:\n{code}\n--- stderr ---\n{r.stderr[-4000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def server(stories_hf, tmp_path_factory):
    path = convert_stories(stories_hf, tmp_path_factory)
    with serving(create_app(tinyllm.load(path))) as s:
        yield s


def test_serve_examples_run_as_written(server, tmp_path):
    blocks = python_blocks("Serve")
    assert len(blocks) == 2 and README_URL in blocks[0]
    out = run_python("\n".join(blocks).replace(README_URL, server.url), tmp_path)
    assert '"color"' in out  # the structured answer was printed


def test_serve_curl_example_runs_as_written(server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    command = re.search(r"\n    (curl .*?)\n\n", section("Serve"), flags=re.S).group(1)
    command = command.replace("\\\n", " ").replace(README_URL, server.url)
    r = subprocess.run(["bash", "-c", command + " --silent --fail-with-body"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert '"chat.completion"' in r.stdout


def test_python_api_and_structured_output_examples_run_as_written(tmp_path):
    gguf = shared("smollm2-135m-instruct-q4_1-gguf", "SmolLM2-135M-Instruct.Q4_1.gguf")
    (tmp_path / gguf.name).symlink_to(gguf)
    story = ("The sea was calm that morning, and the fishermen went out before dawn. They came back with "
             "nets full of silver fish, and the whole village gathered on the shore to share the catch. ")
    (tmp_path / "wiki.test.raw").write_text(story * 40, encoding="utf-8")  # > 1024 tokens: two windows of 512
    api, = python_blocks("Python API")
    structured, = python_blocks("Structured output")
    out = run_python(api + "\n" + structured, tmp_path)
    assert "PPL =" in out and "prompt:" in out
    assert (tmp_path / "chat.json").exists()
