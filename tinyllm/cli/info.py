"""`tinyllm info`: what is inside a model file."""
from __future__ import annotations

import click

from tinyllm.cli import main
from tinyllm.cli.options import model_argument, progress_bar


@main.command()
@model_argument
def info(model):
    """Describe MODEL: architecture, sizes, quant formats, tokenizer, context."""
    from tinyllm.defaults import resolve_model
    from tinyllm.info import describe_file

    path = resolve_model(model, announce=False)
    rows = describe_file(path, progress=progress_bar(f"reading {path.name}", only_on_terminal=True))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
