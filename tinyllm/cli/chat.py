"""`tinyllm chat`: an interactive, streaming conversation."""
from __future__ import annotations

import click

from . import main
from .options import load_model, model_argument, runtime_options, sampling_options

HELP = "Commands: /reset (forget the conversation), /quit (or Ctrl-D). Ctrl-C stops an answer."


@main.command()
@model_argument
@click.option("--system", default=None, help="System prompt.")
@click.option("-n", "--max-tokens", "max_tokens", type=int, default=512, show_default=True, help="Max tokens per answer.")
@sampling_options
@runtime_options
def chat(model, system, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed,
         backend, threads, n_ctx, device):
    """Chat with MODEL (default: the bundled model)."""
    from ..chat import ChatSession

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    m = load_model(model, backend, threads, n_ctx, device)
    session = ChatSession(m, system=system, temperature=temperature, top_k=top_k, top_p=top_p,
                          min_p=min_p, repeat_penalty=repeat_penalty, seed=seed)
    mode = "chat template" if m.chat_template else "plain continuation (the model has no chat template)"
    click.echo(f"{m.name}: {mode}. {HELP}", err=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo()
            continue
        if not line.strip():
            continue
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip() == "/reset":
            session.reset()
            click.echo("(conversation cleared)", err=True)
            continue
        answer = session.send(line, max_new_tokens=max_tokens)
        try:
            for piece in answer:
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            answer.close()
            click.echo(" [stopped]", nl=False)
        click.echo()
