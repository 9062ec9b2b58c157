"""`tinyllm perplexity`: how well a model predicts a text, as llama.cpp's perplexity tool reports it."""
from __future__ import annotations

import sys

import click

from tinyllm.cli import main
from tinyllm.cli.options import load_model, plural, read_text, runtime_options


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--chunks", type=click.IntRange(min=1), default=None,
              help="Score at most this many windows (default: all).")
@click.option("--kl-divergence", "reference", type=click.Path(dir_okay=False), default=None,
              help="Also run REFERENCE (e.g. the unquantized model) on the same windows and report the KL "
                   "divergence of MODEL's next-token distributions from it, as llama-perplexity --kl-divergence.")
@runtime_options(ctx_help="Window of tokens scored at a time (default: 512, or the model's context when shorter).")
def perplexity(model, file, chunks, reference, backend, threads, n_ctx, device):
    """Perplexity of MODEL over the text in FILE.

    The text is cut into windows of --ctx tokens (default 512, or the model's context when
    shorter); the second half of each window is scored, as llama.cpp's perplexity does.
    Prints "Final estimate: PPL = x +/- standard error"; with --kl-divergence, the mean KLD,
    the same-top-token rate and the PPL ratio and difference against the reference."""
    from tinyllm.perplexity import DEFAULT_CTX, kl_divergence, perplexity

    text = read_text(file)
    m = load_model(model, backend, threads, n_ctx, device)
    ref = load_model(reference, backend, threads, n_ctx, device) if reference else None
    window = n_ctx or min(DEFAULT_CTX, m.n_ctx, *([ref.n_ctx] if ref else []))
    tokens = m.tokenize(text, special=False)
    bar = None

    def progress(done, total, running):
        nonlocal bar
        if bar is None:
            click.echo(f"{plural(len(tokens), 'token')}, {plural(total, 'chunk')} of {window} tokens, "
                       f"scoring the last {window - 1 - window // 2} of each", err=True)
            shown = "KLD {:.5f}" if ref else "PPL {:.4f}"
            bar = click.progressbar(length=total, label="kl-divergence" if ref else "perplexity", file=sys.stderr,
                                    item_show_func=lambda v: shown.format(v) if v else None)
        else:
            bar.update(1, running)
        if done == total:
            bar.render_finish()

    if ref:
        click.echo(str(kl_divergence(m, ref, text, n_ctx=window, max_chunks=chunks, progress=progress)))
        return
    result = perplexity(m, tokens, n_ctx=window, max_chunks=chunks, progress=progress)
    click.echo(" ".join(f"[{i + 1}]{p:.4f}," for i, p in enumerate(result.running)))
    click.echo(f"Final estimate: {result}")
