"""`tinyllm convert`: a Hugging Face checkpoint directory (or a GGUF file) -> one .q4 file."""
from __future__ import annotations

import click

from tinyllm.cli import main


@main.command()
@click.argument("source", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .q4 file to write.")
@click.option("--quant", type=click.Choice(["q4_0", "q4_1", "q8_0", "f16", "f32"]), default=None,
              help="Format of the weight matrices (norms and biases stay f32). Default: q4_0 for a "
                   "Hugging Face directory; for a GGUF file, its own formats where tinyllm has them.")
def convert(source, output, quant):
    """Convert SOURCE (a Hugging Face model directory or a .gguf file) into a tinyllm .q4 file."""
    from pathlib import Path

    from tinyllm.converters.convert import convert_hf
    from tinyllm.errors import TinyLLMError

    src = Path(source)
    if not src.exists():
        raise TinyLLMError(f"{source!r} does not exist")
    if src.is_file() and src.suffix.lower() == ".gguf":
        from tinyllm.converters.gguf import convert_gguf

        path = convert_gguf(src, output, quant=quant)
        click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        return
    quant = quant or "q4_0"
    bar = None

    def progress(done, total):
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=total, label=f"converting to {quant}", file=click.get_text_stream("stderr"))
        bar.update(1)
        if done == total:
            bar.render_finish()

    path = convert_hf(src, output, quant=quant, progress=progress)
    size = path.stat().st_size
    click.echo(f"wrote {path} ({size / 2**20:.1f} MiB)")
