"""`tinyllm imatrix`: an importance matrix from calibration text, for `tinyllm convert --imatrix`."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from tinyllm.cli import main
from tinyllm.cli.options import load_model, plural, read_text, runtime_options


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The importance matrix to write (llama.cpp's GGUF imatrix format).")
@click.option("--chunks", type=click.IntRange(min=1), default=None,
              help="Use at most this many windows of the text (default: all).")
@click.option("--covariance", is_flag=True,
              help="Also save each matrix's input covariance, for `tinyllm convert --quantizer gptq` "
                   "(n_in^2 floats per matrix: fine for small models, ~28 GB for a 7B one).")
@runtime_options
def imatrix(model, file, output, chunks, covariance, backend, threads, n_ctx, device):
    """Run MODEL over the calibration text in FILE and save, for every weight matrix, the mean
    squared activation of each input channel. Use a text unlike the one you will evaluate on.

    Run it on the best-precision model you have (f32/f16 or q8_0), then:
    tinyllm convert SOURCE --quant q4_k --imatrix OUTPUT -o model.q4
    (with --covariance: tinyllm convert SOURCE --quant q4_k --quantizer gptq --imatrix OUTPUT -o model.q4)"""
    from tinyllm.imatrix import collect, write_imatrix

    if device == "cuda":
        raise click.UsageError("imatrix runs on the CPU (--device cpu)")
    text = read_text(file)
    m = load_model(model, backend, threads, n_ctx, device)
    bar = click.progressbar(length=1, label="imatrix", file=sys.stderr)

    def progress(done, total):
        bar.length = total
        bar.update(1)

    sums, counts, n_chunks, window, covariances = collect(m, text, n_ctx=n_ctx, max_chunks=chunks, progress=progress,
                                                          covariance=covariance)
    bar.render_finish()
    write_imatrix(output, m.metadata["architecture"], m.config, sums, counts, dataset=Path(file).name, chunks=n_chunks,
                  chunk_size=window, covariances=covariances)
    click.echo(f"wrote {output}: {len(sums)} matri{'x' if len(sums) == 1 else 'ces'}, "
               f"{plural(n_chunks, 'chunk')} of {window} tokens")
