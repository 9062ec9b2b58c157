"""Where `tinyllm chat` finds a model when none is named."""
from __future__ import annotations

from pathlib import Path

import click

DATA = Path(__file__).parent / "data"
BUNDLED_MODEL = DATA / "stories260K.q4"
BUNDLED_NOTICE = ("Using the bundled stories260K model: a tiny 260K-parameter LLaMA trained on children's "
                  "stories. It continues stories; it cannot chat. For a real model, convert one with "
                  "`tinyllm convert HF_DIR -o model.q4` and run `tinyllm chat model.q4`.")


def resolve_model(model: str | None, announce: bool = True) -> Path:
    """The named model, or the default one (with a notice saying which)."""
    if model:
        return Path(model)
    if announce:
        click.secho(BUNDLED_NOTICE, err=True, fg="yellow")
    return BUNDLED_MODEL
