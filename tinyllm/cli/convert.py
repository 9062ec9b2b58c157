"""`tinyllm convert`: a Hugging Face checkpoint directory, a GGUF file or a llama2.c checkpoint -> one .q4 file."""
from __future__ import annotations

import click

from tinyllm.cli import main
from tinyllm.cli.options import progress_bar
from tinyllm.converters.recipe import CHOICES, QUANTIZERS


@main.command()
@click.argument("source", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .q4 file to write.")
@click.option("--quant", type=click.Choice(CHOICES, case_sensitive=False), default=None,
              help="Format of the weight matrices (norms and biases stay f32). Default: q4_0 for a "
                   "Hugging Face directory; for a GGUF file, its own formats where tinyllm has them. "
                   "q4_k: 4.5 bits like q4_0, much closer to the original (FORMAT.md); q6_k: ggml's Q6_K (6.56 bits); "
                   "q4_k_m / q4_k_s: q4_k with q6_k for the tensors that matter most, after llama.cpp's mixes "
                   "of those names.")
@click.option("--quantizer", type=click.Choice(QUANTIZERS), default="nearest", show_default=True,
              help="How q4_0/q4_1 blocks are encoded: round to nearest (bit-identical to llama.cpp) or an "
                   "error-minimizing search (same format, closer values). q4_k and q6_k always search. gptq: "
                   "the searched grids, their codes rounded so that errors cancel in each layer's output "
                   "(needs --imatrix from `tinyllm imatrix --covariance`).")
@click.option("--imatrix", type=click.Path(dir_okay=False), default=None,
              help="An importance matrix (tinyllm imatrix, or llama-imatrix's GGUF file) weighting the search "
                   "by how much each input channel matters.")
@click.option("--tokenizer", type=click.Path(dir_okay=False, exists=True), default=None,
              help="A llama2.c checkpoint's tokenizer.bin (default: tokenizer.bin or the one tok*.bin beside it).")
@click.option("--learn-rounding", "learn_rounding", type=click.Path(dir_okay=False), default=None,
              metavar="TEXT", help="After converting, fit the q4_*/q6_k codes, their scales and the norm gains to the "
                                   "original on this calibration text by gradient descent (LLaMA-family Hugging Face "
                                   "checkpoints, small models; needs pip install 'tinyllm[tune]'; "
                                   "converters/learned_rounding.py).")
@click.option("--learn-steps", type=int, default=None,
              help="Steps of --learn-rounding (default 400, 16 windows of 512 tokens each).")
def convert(source, output, quant, quantizer, imatrix, tokenizer, learn_rounding, learn_steps):
    """Convert SOURCE (a Hugging Face model directory, a .gguf file, or a llama2.c .bin
    checkpoint with its tokenizer.bin) into a tinyllm .q4 file."""
    from tinyllm.converters.convert import convert as convert_model

    path = convert_model(source, output, quant=quant, progress=progress_bar(f"converting {source}"),
                         quantizer=quantizer, imatrix=imatrix, tokenizer=tokenizer,
                         learn_rounding=learn_rounding, learn_steps=learn_steps,
                         learn_progress=progress_bar(f"learning rounding on {learn_rounding}"))
    click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
