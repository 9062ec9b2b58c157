"""`tinyllm perplexity`: how well a model predicts a text, as llama.cpp's perplexity tool reports it."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from tinyllm.cli import main
from tinyllm.cli.options import load_model, runtime_options
from tinyllm.errors import TinyLLMError


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--chunks", type=click.IntRange(min=1), default=None,
              help="Score at most this many windows (default: all).")
@runtime_options
def perplexity(model, file, chunks, backend, threads, n_ctx, device):
    """Perplexity of MODEL over the text in FILE.

    The text is cut into windows of --ctx tokens (default 512, or the model's context when
    shorter); the second half of each window is scored, as llama.cpp's perplexity does.
    Prints "Final estimate: PPL = x +/- standard error"."""
    from tinyllm.perplexity import DEFAULT_CTX, perplexity

    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as e:
        raise TinyLLMError(f"cannot read {file!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise TinyLLMError(f"{file!r} is not UTF-8 text: {e}") from None
    m = load_model(model, backend, threads, n_ctx, device)
    window = n_ctx or min(DEFAULT_CTX, m.n_ctx)
    tokens = m.tokenize(text, special=False)
    bar = None

    def progress(done, total, running):
        nonlocal bar
        if bar is None:
            click.echo(f"{len(tokens)} tokens, {total} chunks of {window} tokens, "
                       f"scoring the last {window - 1 - window // 2} of each", err=True)
            bar = click.progressbar(length=total, label="perplexity", file=sys.stderr,
                                    item_show_func=lambda ppl: f"PPL {ppl:.4f}" if ppl else None)
        else:
            bar.update(1, running)
        if done == total:
            bar.render_finish()

    result = perplexity(m, tokens, n_ctx=window, max_chunks=chunks, progress=progress)
    click.echo(" ".join(f"[{i + 1}]{p:.4f}," for i, p in enumerate(result.running)))
    click.echo(f"Final estimate: {result}")
