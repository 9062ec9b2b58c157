"""`tinyllm convert`: a Hugging Face checkpoint directory (or a GGUF file) -> one .q4 file."""
from __future__ import annotations

import sys

import click

from tinyllm.cli import main
from tinyllm.converters.recipe import CHOICES, QUANTIZERS


@main.command()
@click.argument("source", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .q4 file to write.")
@click.option("--quant", type=click.Choice(CHOICES, case_sensitive=False), default=None,
              help="Format of the weight matrices (norms and biases stay f32). Default: q4_0 for a "
                   "Hugging Face directory; for a GGUF file, its own formats where tinyllm has them. "
                   "q4_k: 4.5 bits like q4_0, much closer to the original (FORMAT.md); q4_k_m / q4_k_s: q4_k "
                   "with 8 bits for the tensors that matter most, after llama.cpp's mixes of those names.")
@click.option("--quantizer", type=click.Choice(QUANTIZERS), default="nearest", show_default=True,
              help="How q4_0/q4_1 blocks are encoded: round to nearest (bit-identical to llama.cpp) or an "
                   "error-minimizing search (same format, closer values). q4_k always searches.")
@click.option("--imatrix", type=click.Path(dir_okay=False), default=None,
              help="An importance matrix (tinyllm imatrix, or llama-imatrix's GGUF file) weighting the search "
                   "by how much each input channel matters.")
def convert(source, output, quant, quantizer, imatrix):
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

    path = convert_model(source, output, quant=quant, progress=progress, quantizer=quantizer, imatrix=imatrix)
    click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
