"""`tinyllm convert`: a Hugging Face checkpoint directory (or a GGUF file) -> one .q4 file."""
from __future__ import annotations

import sys

import click

from tinyllm.cli import main
from tinyllm.kernels.quant import FORMATS


@main.command()
@click.argument("source", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .q4 file to write.")
@click.option("--quant", type=click.Choice(FORMATS), default=None,
              help="Format of the weight matrices (norms and biases stay f32). Default: q4_0 for a "
                   "Hugging Face directory; for a GGUF file, its own formats where tinyllm has them.")
def convert(source, output, quant):
    """Convert SOURCE (a Hugging Face model directory or a .gguf file) into a tinyllm .q4 file."""
    from tinyllm.converters.convert import convert as convert_model

    bar = None

    def progress(done, total):
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=total, label=f"converting {source}", file=sys.stderr)
        bar.update(1)
        if done == total:
            bar.render_finish()

    path = convert_model(source, output, quant=quant, progress=progress)
    click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
