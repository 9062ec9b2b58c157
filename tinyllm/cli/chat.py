"""`tinyllm chat`: an interactive, streaming conversation."""
from __future__ import annotations

import sys

import click

from tinyllm.cli import main
from tinyllm.cli.options import load_model, model_argument, runtime_options, sampling_options, valid_text, warm_up
from tinyllm.errors import TinyLLMError
from tinyllm.templates import BUILTIN

HELP = """Commands:
  /reset         forget the conversation (keeps the system prompt)
  /system TEXT   set the system prompt (/system alone shows it)
  /save FILE     save the conversation as JSON
  /load FILE     load a conversation saved with /save
  /help          this text
  /quit          leave (or Ctrl-D)
Ctrl-C stops an answer; the conversation keeps what was shown."""


def _note(text: str, color: str = "yellow") -> None:
    click.secho(text, err=True, fg=color)


def _command(session, line: str) -> bool:
    """Run a /command; False means quit."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        session.reset()
        _note("(conversation cleared)")
    elif name == "/system":
        if arg:
            session.system = arg
            _note("(system prompt set)")
        else:
            _note(f"(system prompt: {session.system!r})")
    elif name in ("/save", "/load"):
        if not arg:
            _note(f"usage: {name} FILE", "red")
        else:
            try:
                session.save(arg) if name == "/save" else session.load(arg)
                _note(f"(conversation {'saved to' if name == '/save' else 'loaded from'} {arg}: "
                      f"{len(session.messages)} messages)")
            except TinyLLMError as e:
                _note(f"error: {e}", "red")
    elif name == "/help":
        _note(HELP, "cyan")
    else:
        _note(f"unknown command {name}; /help lists them", "red")
    return True


def _answer(session, line: str, max_tokens: int, verbose: bool) -> bool:
    """Stream one answer to stdout, flushed piece by piece; Ctrl-C ends it early. False: it failed."""
    pieces = session.send(line, max_new_tokens=max_tokens)
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pieces.close()  # the answer so far joins the conversation
        sys.stdout.write("\n")
        _note("[stopped]")
    except TinyLLMError as e:
        _note(f"error: {e}", "red")
        return False
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    if verbose and session.stats is not None:
        from tinyllm.benchmark import threads_in_words

        threads = threads_in_words(session.model.ops)
        _note(session.stats.summary() + (f" | {threads}" if threads else ""), "cyan")
    return True


@main.command()
@model_argument
@click.option("--system", default=None, callback=valid_text, help="System prompt.")
@click.option("--template", default=None,
              help=f"Chat template: {', '.join(BUILTIN)}, or a Jinja file "
                   "(default: the model's own; plain if it has none).")
@click.option("-n", "--max-tokens", "--n-predict", "max_tokens", type=click.IntRange(min=1), default=512,
              show_default=True, help="Max tokens per answer.")
@click.option("-p", "--prompt", default=None, callback=valid_text,
              help="Answer this one message, print the answer and exit (no REPL).")
@click.option("--stop", multiple=True, callback=valid_text, help="Also end an answer at this string (repeatable).")
@click.option("--repeat-last-n", type=click.IntRange(min=0), default=None,
              help="Window of recent tokens the repeat penalty sees (default 64).")
@click.option("-i", "--interactive", is_flag=True,
              help="The conversation REPL (the default; llama.cpp's spelling). Not with -p.")
@click.option("-v", "--verbose", is_flag=True, help="Print prompt and decode speed after each answer.")
@sampling_options
@runtime_options
def chat(model, system, template, max_tokens, prompt, stop, repeat_last_n, interactive, verbose, temperature, top_k,
         top_p, min_p, repeat_penalty, seed, backend, threads, n_ctx, device):
    """Chat with MODEL (default: the cached SmolLM2 chat model, else the bundled story model)."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    if prompt is not None and not prompt.strip():
        raise click.UsageError("-p/--prompt is empty: give the message to answer")
    if prompt is not None and interactive:
        raise click.UsageError("-p answers one message and exits; -i is the conversation: give one of them")
    m = load_model(model, backend, threads, n_ctx, device, fetch=sys.stdin.isatty())  # first run: fetch the chat model
    session = m.chat_session(system=system, template=template, max_new_tokens=max_tokens, stop=list(stop),
                             on_notice=_note, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed)
    if prompt is not None:  # one-shot
        warm_up(m)
        if not _answer(session, prompt, max_tokens, verbose):
            sys.exit(1)
        return
    which = session.template.name
    if which == "plain" and template is None:
        which = "plain (the model has no chat template; choose one with --template)"
    _note(f"{m.name}: template {which}, context {m.n_ctx} tokens. /help for commands, Ctrl-D to quit.", "cyan")
    warming = warm_up(m, background=True)  # compiles while the first message is typed
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
        if line.startswith("/"):
            if not _command(session, line):
                return
            continue
        if warming is not None:
            warming.join()
            if warming.errors:
                raise warming.errors[0]
            warming = None
        _answer(session, line, max_tokens, verbose)
